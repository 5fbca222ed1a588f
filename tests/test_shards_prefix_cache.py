"""Frozen-prefix cache: the tail on cached prefixes equals the full encoder (outputs and gradients),
reuse and rebuild, concurrent builders, the fallback log lines, and training/evaluation with and
without the cache; the store written and read without a model, importing no model code; the
not-cacheable reason of every case."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from transrec.errors import DataError
from transrec.models import (
    ImageEncoderConfig,
    LoRAConfig,
    ModelConfig,
    TextEncoderConfig,
    UserEncoderConfig,
    build_model,
)
from transrec.models import prefix as prefix_build
from transrec.models.lora import inject_lora
from transrec.models.prefix import build_or_load_prefix_store, maybe_wrap
from transrec.shards import prefix_cache as pc
from transrec.shards.batch import IMAGE, TEXT, ArrayContent, collate_windows
from transrec.shards.prefix_cache import PrefixCachedContent, from_words, to_words


def make_content(n_items: int = 48, seed: int = 0, T: int = 12, size: int = 32) -> ArrayContent:
    rng = np.random.default_rng(seed)
    mod = (np.arange(n_items) % 2).astype(np.int8)  # alternating TEXT / IMAGE
    row = np.zeros(n_items, np.int64)
    nt, ni = int((mod == TEXT).sum()), int((mod == IMAGE).sum())
    row[mod == TEXT], row[mod == IMAGE] = np.arange(nt), np.arange(ni)
    tokens = rng.integers(1000, 3000, (nt, T)).astype(np.int32)
    lengths = rng.integers(2, T + 1, nt).astype(np.int32)
    images = rng.integers(0, 256, (ni, 3, size, size)).astype(np.uint8)
    return ArrayContent(mod, row, tokens, lengths, images)


def tiny_cfg(text_trainable=1, image_trainable=1, tpool="mean", image="tiny", dropout=0.1) -> ModelConfig:
    return ModelConfig(
        dim=32,
        text=TextEncoderConfig(name="tiny", trainable=text_trainable, max_len=12, pooling=tpool),
        image=ImageEncoderConfig(name=image, image_size=32, trainable=image_trainable, pooling="mean"),
        user=UserEncoderConfig(layers=1, heads=2, dropout=dropout, max_len=8),
    )


@pytest.fixture(scope="module")
def content():
    return make_content()


def _grads(module, out: torch.Tensor, weight: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad((out.float() * weight).sum(), params)


# ---------------------------------------------------------------------------------------------
# tail on the cached prefix == the full encoder (prefix in eval mode)


@pytest.mark.parametrize("which,dtype", [
    ("text-mean", "fp32"), ("text-mean", "bf16"), ("text-attn", "fp32"), ("text-attn", "bf16"),
    ("image-tiny", "fp32"), ("image-tiny", "bf16"),
    ("image-efficientnet-lite0", "fp32"),  # pretrained, BatchNorm in the frozen stages
])
def test_tail_on_cached_prefix_equals_full_encoder(content, tmp_path, which, dtype):
    kind, variant = which.split("-", 1)
    torch.manual_seed(0)
    if kind == "text":
        model = build_model(tiny_cfg(text_trainable=1, tpool=variant))
        enc = model.text_encoder
    else:
        model = build_model(tiny_cfg(image_trainable=1 if variant == "tiny" else 2, image=variant))
        enc = model.image_encoder
    assert enc.n_frozen_blocks >= 1 and enc.prefix_is_cacheable()
    wrapped = maybe_wrap(content, model, cache_dir=tmp_path, dtype=dtype, progress=False)
    assert isinstance(wrapped, PrefixCachedContent)
    enc.eval()  # the frozen prefix is in eval mode in both; the tail too, so outputs are deterministic
    items = np.array([3, 0, 7, 4, 11, 2, 9, 6, 13, 8, 40, 41, 19, 22])  # mixed, unsorted
    plain_t, plain_i = content.gather(items)
    cach_t, cach_i = wrapped.gather(items)
    plain, cached = (plain_t, cach_t) if kind == "text" else (plain_i, cach_i)
    assert cached.prefix is not None and cached.prefix.dtype == pc.DTYPES[dtype][0]
    torch.testing.assert_close(cached.index, plain.index)
    if kind == "text":
        torch.testing.assert_close(cached.attention_mask, plain.attention_mask)
    else:
        assert cached.pixels.numel() == 0  # pixels of cached image items are never read
    full = enc(plain)  # the whole encoder from raw content
    tail = enc(cached)  # the tail only, on the cached prefix
    assert tail.requires_grad
    w = torch.randn_like(full)
    g_full, g_tail = _grads(enc, full, w), _grads(enc, tail, w)
    assert len(g_full) == len(g_tail) > 0
    if dtype == "fp32":
        torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_tail, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        return
    # bf16: exactly what the tail computes on the prefix rounded to bf16 (outputs and gradients) ...
    if kind == "text":
        pre = enc.forward_prefix(plain.input_ids, plain.attention_mask)
        ref = enc.forward_tail(pre.to(torch.bfloat16), plain.attention_mask)
    else:
        ref = enc.forward_tail(enc.forward_prefix(plain.pixels).to(torch.bfloat16))
    torch.testing.assert_close(tail, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_tail, _grads(enc, ref, w)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # ... and within bf16 rounding (8 mantissa bits, 2^-8 relative) of the fp32 truth, in norm
    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert rel(tail, full) <= 2 ** -8 * 4, rel(tail, full)
    # (over all parameters at once: some gradients are zero in exact arithmetic, e.g. attention key
    # biases, so a per-tensor relative error would compare rounding noise with nothing)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert rel(flat(g_tail), flat(g_full)) <= 2 ** -8 * 8, rel(flat(g_tail), flat(g_full))


def test_words_round_trip():
    x = torch.randn(5, 7, 3)
    for dt, (tdt, _) in pc.DTYPES.items():
        torch.testing.assert_close(from_words(to_words(x, dt), dt), x.to(tdt), rtol=0, atol=0)


def test_gathered_batch_moves_in_one_transfer_and_pickles(content, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    wrapped = maybe_wrap(content, model, cache_dir=tmp_path, progress=False)
    rng = np.random.default_rng(2)
    windows = [rng.choice(content.n_items, 6) for _ in range(5)]
    batch = collate_windows(windows, np.arange(5), 7, wrapped, np.zeros(content.n_items))
    assert batch.text.prefix.device.type == "cpu" and batch.image.prefix.device.type == "cpu"
    moved = batch.to("meta")
    assert moved.text.prefix.device.type == "meta" and moved.image.prefix.device.type == "meta"
    # a loader worker receives the source by pickling: memory maps are reopened, not copied
    clone = pickle.loads(pickle.dumps(wrapped))
    a, b = wrapped.gather(np.arange(20)), clone.gather(np.arange(20))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.prefix, y.prefix)
    assert isinstance(clone.image_store.data, np.memmap)
    assert clone.row.shape == content.row.shape  # other attributes are the inner source's


# ---------------------------------------------------------------------------------------------
# reuse and rebuild


def test_reuse_when_nothing_changed_rebuild_when_something_did(content, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    te = model.text_encoder

    def store(enc=te, c=content, dtype="bf16"):
        return build_or_load_prefix_store(c, enc, TEXT, cache_dir=tmp_path, dtype=dtype, progress=False)

    first = store()

    def no_build(*a, **k):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(prefix_build, "write_text_prefix", no_build)
        assert store().path == first.path
        with torch.no_grad():  # a trainable (tail) weight changes during training: still reused
            te.backbone.encoder.layer[1].output.dense.weight.add_(0.5)
        assert store().path == first.path
        # every input of the key rebuilds: frozen weights, frozen depth, item set, dtype
        with torch.no_grad():
            te.backbone.encoder.layer[0].output.dense.weight.add_(0.5)
        with pytest.raises(AssertionError, match="rebuilt"):
            store()
    paths = {first.path, store().path}
    torch.manual_seed(0)
    deeper = build_model(tiny_cfg(text_trainable=0)).text_encoder  # same init, 2 frozen blocks
    paths.add(store(enc=deeper).path)
    other = make_content(seed=1)
    paths.add(store(c=other).path)
    paths.add(store(dtype="fp16").path)
    assert len(paths) == 5
    assert store(c=other).path in paths  # and each is then reused
    # the rebuilt store holds the new weights' outputs
    s = store()
    te.eval()
    text, _ = content.gather(np.flatnonzero(content.modality == TEXT)[:4])
    want = te.forward_prefix(text.input_ids, text.attention_mask).to(torch.bfloat16)
    got = s.gather(np.flatnonzero(content.modality == TEXT)[:4], width=text.input_ids.shape[1])
    m = text.attention_mask.bool()
    # the store ran the prefix over other batch sizes than these 4 items, so its fp32 sums may take
    # another order and round to the neighbouring bf16 value: one bf16 step (2^-8 relative) apart
    torch.testing.assert_close(got[m].float(), want[m].float(), rtol=2**-7, atol=1e-5)


def _concurrent_builder(cache_dir, log_path, q):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    lines = []
    s = build_or_load_prefix_store(make_content(), model.image_encoder, IMAGE, cache_dir=cache_dir,
                                   progress=False, log_fn=lines.append)
    with open(log_path, "a") as f:
        f.writelines(line + "\n" for line in lines)
    q.put(str(s.path))


def test_two_processes_build_once(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log_path = tmp_path / "log.txt"
    procs = [ctx.Process(target=_concurrent_builder, args=(tmp_path / "c", log_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    built = [x for x in log_path.read_text().splitlines() if "built" in x]
    assert len(built) == 1, built
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]  # no half-written folder


# ---------------------------------------------------------------------------------------------
# falling back: one log line each


def _wrap_lines(caplog, content, model, tmp_path, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transrec.prefix_cache"):
        out = maybe_wrap(content, model, kw.pop("cfg", None), tmp_path, progress=False, **kw)
    lines = [r.getMessage() for r in caplog.records if r.name == "transrec.prefix_cache"]
    return out, lines


def test_fallback_cases_each_log_one_line(content, tmp_path, caplog):
    cases = []
    cases.append(("off", build_model(tiny_cfg()), {"enabled": False}, "data.prefix_cache=false"))
    cases.append(("full", build_model(tiny_cfg("all", "all")), {}, "fully fine-tuned"))
    cfg = tiny_cfg("all", "all")
    cfg.text.lora, cfg.image.lora = LoRAConfig(r=2), LoRAConfig(r=2)
    cases.append(("lora-everywhere", build_model(cfg), {}, "LoRA adapters in every block"))
    m = build_model(tiny_cfg(1, "all"))
    inject_lora([m.text_encoder.backbone.encoder.layer[0]], "bert", LoRAConfig(r=2))
    for p in m.text_encoder.backbone.encoder.layer[0].parameters():
        p.requires_grad_(False)
    cases.append(("lora-frozen", m, {}, "LoRA"))
    cfg = tiny_cfg(1, "all")
    cfg.text.frozen_dropout = True
    cases.append(("dropout", build_model(cfg).train(), {}, "dropout"))
    cases.append(("id", build_model(ModelConfig(kind="id", n_items=content.n_items)), {},
                  "no content item encoder"))
    for name, model, kw, needle in cases:
        out, lines = _wrap_lines(caplog, content, model, tmp_path, **kw)
        assert out is content, name
        assert len(lines) == 1 and needle in lines[0], (name, lines)
        assert "\n" not in lines[0]


def test_partial_cache_runs_absent_dummies_like_real_content(content, tmp_path, caplog):
    model = build_model(tiny_cfg(1, "all"))  # text top-1 trainable (cacheable), image fully tuned
    out, lines = _wrap_lines(caplog, content, model, tmp_path)
    assert isinstance(out, PrefixCachedContent) and out.image_store is None and out.text_store is not None
    on = [x for x in lines if x.startswith("frozen-prefix cache on")]
    assert len(on) == 1 and "not cached: image" in on[0] and "fully fine-tuned" in on[0]
    text, image = out.gather(np.arange(10))
    assert text.prefix is not None and image.prefix is None and image.pixels.shape[1:] == (3, 32, 32)
    # each encoder is told whether its content comes cached, so that a batch without images runs the
    # image encoder's dummy whole, as real images would run (what keeps ZeRO-3 ranks in step)
    assert model.text_encoder.serves_cached_prefix is True
    assert model.image_encoder.serves_cached_prefix is False
    text_only = np.flatnonzero(content.modality == TEXT)
    batch = collate_windows([text_only[:5], text_only[3:9]], np.arange(2), 7, out, np.zeros(content.n_items))
    assert batch.image is None and batch.text.prefix is not None
    loss, _ = model(batch)
    loss.backward()
    stem = model.image_encoder.prefix_modules()[0]
    assert all(p.grad is not None for p in stem.parameters())  # the stem ran: the dummy ran whole
    # and a full fallback marks both encoders as running whole
    _wrap_lines(caplog, content, model, tmp_path, enabled=False)
    assert model.text_encoder.serves_cached_prefix is False


# ---------------------------------------------------------------------------------------------
# training and evaluation with and without the cache


def _train(model, content, batches_windows, n_items, steps, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    log_q = np.log(np.full(n_items, 1.0 / n_items))
    losses = []
    for i in range(steps):
        windows = batches_windows[i % len(batches_windows)]
        batch = collate_windows(windows, np.arange(len(windows)), 7, content, log_q)
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _catalogue(model, content, chunk=16):
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, content.n_items, chunk):
            items = np.arange(s, min(s + chunk, content.n_items))
            t, i = content.gather(items)
            out.append(model.encode_items(torch.from_numpy(items), t, i))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_and_evaluation_same_with_and_without_cache(content, tmp_path, dtype):
    rng = np.random.default_rng(7)
    batches = [[rng.choice(content.n_items, int(rng.integers(3, 8))) for _ in range(8)] for _ in range(3)]
    torch.manual_seed(0)
    base = build_model(tiny_cfg(1, 1))  # BERT top 1 of 2, ResNet top 1 of 3 stages; dropout in the tail
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    other = build_model(tiny_cfg(1, 1))
    other.load_state_dict(state)
    wrapped = maybe_wrap(content, other, cache_dir=tmp_path, dtype=dtype, progress=False)
    assert isinstance(wrapped, PrefixCachedContent)
    plain_losses = _train(base, content, batches, content.n_items, steps=5)
    cached_losses = _train(other, wrapped, batches, content.n_items, steps=5)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=tol, atol=tol)
    assert plain_losses[-1] < plain_losses[0]  # it trains
    # evaluation encodes the catalogue through the same wrapped source
    a, b = _catalogue(base, content), _catalogue(other, wrapped)
    torch.testing.assert_close(b, a, rtol=tol * 5, atol=tol * 5)


# ---------------------------------------------------------------------------------------------
# the store alone, and the policy beside the encoders


def test_the_store_imports_no_model_code():
    """shards holds the storage only: importing it pulls in no model, engine or model library."""
    code = ("import sys, transrec.shards.prefix_cache; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'peft', 'deepspeed', 'timm', 'torchvision') "
            "or m.startswith(('transrec.models', 'transrec.engine', 'transrec.kernels')))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [], proc.stdout


def test_store_written_and_read_without_a_model(content, tmp_path):
    """Writers fill a store from any tensors, rows in any order; the reader and the content wrapper
    give them back (text padded to the batch's width with zeros), no encoder involved."""
    gen = torch.Generator().manual_seed(0)
    text_items = np.flatnonzero(content.modality == TEXT)
    image_items = np.flatnonzero(content.modality == IMAGE)
    text, image = content.gather(text_items)
    mask = text.attention_mask.bool()
    hidden = torch.randn(len(text_items), mask.shape[1], 5, generator=gen)
    maps = torch.randn(len(image_items), 4, 2, 2, generator=gen)
    stores = {}
    for modality, items in ((TEXT, text_items), (IMAGE, image_items)):
        folder = pc.store_path(tmp_path, modality, f"k{modality}")
        folder.mkdir()
        if modality == TEXT:
            writer = pc.TextStoreWriter(folder, mask.sum(1).numpy(), 5, "fp16")
            order = np.random.default_rng(1).permutation(len(items))
            for s in range(0, len(items), 7):  # rows in another order than the store's
                sel = order[s:s + 7]
                writer.write(sel, hidden[sel], text.attention_mask[sel])
        else:
            writer = pc.ImageStoreWriter(folder, len(items), (4, 2, 2), "bf16")
            writer.write(0, maps[:10])
            writer.write(10, maps[10:])
        facts = writer.close()
        given = {"key": f"k{modality}", "dtype": writer.dtype, **facts}
        meta = pc.finish_store(folder, content, modality, items, given)
        assert pc.is_complete(folder) and meta["n_rows"] == len(items)
        stores[modality] = pc.PrefixStore(folder)
    pick = np.array([5, 0, 3])
    got = stores[TEXT].gather(text_items[pick], width=mask.shape[1])
    want = (hidden[pick] * mask[pick, :, None]).to(torch.float16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(stores[IMAGE].gather(image_items[pick]), maps[pick].to(torch.bfloat16),
                               rtol=0, atol=0)
    with pytest.raises(DataError, match="has no image prefix"):
        stores[IMAGE].gather(text_items[:1])
    wrapped = PrefixCachedContent(content, stores[TEXT], stores[IMAGE])
    t, i = wrapped.gather(np.array([text_items[3], image_items[2], text_items[0]]))
    torch.testing.assert_close(t.prefix, (hidden[[3, 0]] * mask[[3, 0], :, None])[:, :t.input_ids.shape[1]]
                               .to(torch.float16), rtol=0, atol=0)
    torch.testing.assert_close(i.prefix, maps[[2]].to(torch.bfloat16), rtol=0, atol=0)
    assert i.pixels.numel() == 0


def test_each_not_cacheable_case_has_its_reason():
    """The encoder's own answer, as the encoder stands and for a run that will train it."""

    def enc(text_trainable=1, image_trainable=1, lora=False, frozen_dropout=False, image="tiny"):
        cfg = tiny_cfg(text_trainable, image_trainable, image=image)
        cfg.text.frozen_dropout = cfg.image.frozen_dropout = frozen_dropout
        if lora:
            cfg.text.lora = LoRAConfig(r=2)
        return build_model(cfg)

    def reasons(e):
        return e.prefix_not_cacheable_reason(), e.prefix_not_cacheable_reason(for_training=True)

    assert reasons(enc().text_encoder) == (None, None)
    assert reasons(enc(lora=True).text_encoder) == (None, None)  # adapters in the trainable block only
    full = ("bert encoder is fully fine-tuned (trainable='all'): no frozen prefix",) * 2
    assert reasons(enc("all").text_encoder) == full
    assert reasons(enc(2).text_encoder) == (  # every block trains, the stem does not
        None, "bert encoder has no frozen block (trainable='all'): full fine-tuning")
    assert reasons(enc("all", lora=True).text_encoder) == (
        None, "bert encoder has LoRA adapters in every block (trainable='all'): no frozen block")
    m = enc()
    m.text_encoder.backbone.embeddings.word_embeddings.weight.requires_grad_(True)
    assert reasons(m.text_encoder) == ("bert encoder has trainable parameters in its prefix",) * 2
    m = enc()
    inject_lora([m.text_encoder.backbone.encoder.layer[0]], "bert", LoRAConfig(r=2))
    for p in m.text_encoder.backbone.encoder.layer[0].parameters():
        p.requires_grad_(False)
    assert reasons(m.text_encoder) == ("bert encoder has LoRA adapters on frozen blocks",) * 2
    m = enc(frozen_dropout=True)
    assert reasons(m.train().text_encoder) == (
        "bert encoder keeps dropout active in its frozen blocks (frozen_dropout=True)",) * 2
    assert reasons(m.eval().text_encoder) == (
        None, "bert encoder keeps dropout active in its frozen blocks in training (frozen_dropout=True)")
    # a ResNet has no dropout: frozen_dropout changes nothing; EfficientNet's drop-connect is random
    assert reasons(m.train().image_encoder) == (None, None)
    m = enc(frozen_dropout=True, image="efficientnet-lite0", image_trainable=2)
    assert reasons(m.eval().image_encoder) == (None, "efficientnet encoder keeps dropout active in its "
                                                     "frozen blocks in training (frozen_dropout=True)")
