"""Models: shapes, padding, dedup vs per-position encoding, losses vs float64 references, causal
masking, gradient checkpointing, the prefix/tail split, absent modalities, LoRA, overfitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transrec.config import Config
from transrec.config.model import user_kind
from transrec.errors import ConfigError, UserError
from transrec.kernels import KernelInputError
from transrec.models import (
    ImageEncoderConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    SequentialRecommender,
    TextEncoderConfig,
    UserEncoderConfig,
    build_model,
    load_adapters,
    load_base_weights,
    merge_lora,
    save_adapters,
    trainable_report,
)
from transrec.models.lora import inject_lora
from transrec.models.losses import Criterion, bce_sampled, first_copy, sample_negatives
from transrec.models.text import TextItemEncoder
from transrec.models.user import UserEncoder
from transrec.shards.batch import IMAGE, TEXT, ArrayContent, TextContent, collate_windows

# ---------------------------------------------------------------------------------------------
# helpers


def make_content(n_items: int, seed: int = 0, image_frac: float = 0.5, T: int = 12, size: int = 32):
    rng = np.random.default_rng(seed)
    mod = (rng.random(n_items) < image_frac).astype(np.int8)  # 1 = IMAGE
    row = np.zeros(n_items, np.int64)
    nt, ni = int((mod == TEXT).sum()), int((mod == IMAGE).sum())
    row[mod == TEXT] = np.arange(nt)
    row[mod == IMAGE] = np.arange(ni)
    tokens = rng.integers(1000, 3000, (nt, T)).astype(np.int32)
    lengths = rng.integers(2, T + 1, nt)
    images = rng.integers(0, 256, (ni, 3, size, size)).astype(np.uint8)
    return ArrayContent(mod, row, tokens, lengths, images)


def make_batch(content, B: int = 6, L: int = 7, seed: int = 1, min_len: int = 2, log_q=None):
    rng = np.random.default_rng(seed)
    n = content.n_items
    windows = [rng.choice(n, size=int(rng.integers(min_len, L + 1)), replace=True) for _ in range(B)]
    if log_q is None:
        pop = rng.random(n) + 0.05
        log_q = np.log(pop / pop.sum())
    return collate_windows(windows, np.arange(B), L, content, log_q)


def tiny_cfg(kind: str = "bidirectional", dim: int = 32, text_trainable=1, image_trainable=2,
             dropout: float = 0.0, **kw) -> ModelConfig:
    return ModelConfig(
        dim=dim,
        text=TextEncoderConfig(name="tiny", trainable=text_trainable, max_len=12,
                               pooling=kw.pop("tpool", "cls")),
        image=ImageEncoderConfig(name="tiny", image_size=32, trainable=image_trainable,
                                 pooling=kw.pop("ipool", "mean")),
        user=UserEncoderConfig(kind=kind, layers=2, heads=2, dropout=dropout, max_len=8),
        loss=LossConfig(**kw.pop("loss", {})),
        **kw,
    )


@pytest.fixture(scope="module")
def content():
    return make_content(40)


# ---------------------------------------------------------------------------------------------
# shapes and interface


def test_shapes_and_interface(content):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    batch = make_batch(content, B=5, L=7)
    table = model.encode_items(batch.unique_items, batch.text, batch.image)
    assert table.shape == (batch.num_unique, 32)
    users = model.encode_users(table[batch.inverse[:, :-1]], batch.mask[:, :-1])
    assert users.shape == (5, 32)
    loss, metrics = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss", "count", "loss_sum"} <= set(metrics)
    assert metrics["count"].item() == batch.mask[:, -2].sum().item()
    torch.testing.assert_close(metrics["loss_sum"] / metrics["count"], loss.detach())
    spec = model.content_spec()
    assert spec["max_text_len"] == 12 and spec["image_size"] == 32
    assert (__import__("pathlib").Path(spec["tokenizer"]) / "vocab.txt").exists()
    groups = model.param_groups()
    enc_ids = {id(p) for p in model.text_encoder.backbone.parameters()} | \
        {id(p) for p in model.image_encoder.backbone.parameters()}
    assert groups["encoders"] and all(id(p) in enc_ids for p in groups["encoders"])
    assert groups["rest"] and not any(id(p) in enc_ids for p in groups["rest"])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(groups["encoders"]) + len(groups["rest"]) == n_trainable
    assert "total" in trainable_report(model)


def test_id_model_shapes(content):
    model = build_model(ModelConfig(kind="id", dim=16, user=UserEncoderConfig(max_len=8)), n_items=40)
    batch = make_batch(content)
    assert model.encode_items(batch.unique_items, None, None).shape == (batch.num_unique, 16)
    assert model.content_spec() is None
    loss, _ = model(batch)
    loss.backward()
    assert model.item_emb.weight.grad is not None


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="model.user.kind"):
        build_model(ModelConfig(kind="transrec", user=UserEncoderConfig(kind="sideways")))
    with pytest.raises(ConfigError, match="model.text.trainable"):
        build_model(tiny_cfg(text_trainable="most"))
    with pytest.raises(ConfigError, match="only 2 blocks"):
        build_model(tiny_cfg(text_trainable=3))
    with pytest.raises(ConfigError, match="neither a preset"):
        build_model(ModelConfig(text=TextEncoderConfig(name="/no/such/folder")))
    with pytest.raises(ConfigError, match="needs a ViT"):
        build_model(tiny_cfg(ipool="cls"))
    with pytest.raises(ConfigError, match="number of items"):
        build_model(ModelConfig(kind="id"))


# ---------------------------------------------------------------------------------------------
# padding, causality


@pytest.mark.parametrize("kind,input_norm", [("bidirectional", False), ("causal", False), ("causal", True)])
def test_user_encoder_padding_never_changes_outputs(kind, input_norm):
    torch.manual_seed(0)
    cfg = UserEncoderConfig(kind=kind, layers=2, heads=2, dropout=0.1, max_len=10, input_norm=input_norm)
    enc = UserEncoder(cfg, 16).eval()
    assert (enc.in_ln is not None) == input_norm
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    out = enc(x, mask)
    # garbage at padded positions
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    torch.testing.assert_close(enc(x2, mask)[mask], out[mask])
    # more left padding (right-aligned positions keep their ids)
    xp = torch.cat([torch.randn(3, 3, 16), x], dim=1)
    mp = torch.cat([torch.zeros(3, 3, dtype=torch.bool), mask], dim=1)
    torch.testing.assert_close(enc(xp, mp)[:, 3:][mask], out[mask])
    assert torch.isfinite(out).all()


def test_text_padding_tokens_never_change_item_embedding():
    torch.manual_seed(0)

    for pooling in ("cls", "mean", "attn"):
        enc = TextItemEncoder(TextEncoderConfig(name="tiny", trainable=1, pooling=pooling), 8).eval()
        ids = torch.randint(1000, 2000, (3, 5))
        attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
        a = enc(TextContent(ids, attn, torch.arange(3)))
        ids2 = torch.cat([ids, torch.randint(1000, 2000, (3, 4))], 1)
        ids2[:, :5][attn == 0] = 7  # other junk in padded slots
        attn2 = torch.cat([attn, torch.zeros(3, 4, dtype=attn.dtype)], 1)
        b = enc(TextContent(ids2, attn2, torch.arange(3)))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_encoder_never_looks_ahead():
    torch.manual_seed(0)
    enc = UserEncoder(UserEncoderConfig(kind="causal", layers=2, heads=2, dropout=0.0, max_len=8), 16).eval()
    x = torch.randn(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :2] = False
    out = enc(x, mask)
    for t in range(8):
        x2 = x.clone()
        x2[:, t:] = torch.randn(2, 8 - t, 16)
        out2 = enc(x2, mask)
        torch.testing.assert_close(out2[:, :t], out[:, :t])
        if t < 7:
            assert not torch.allclose(out2[:, t:], out[:, t:])
    bi_cfg = UserEncoderConfig(kind="bidirectional", layers=1, heads=2, dropout=0.0, max_len=8)
    bi = UserEncoder(bi_cfg, 16).eval()
    x2 = x.clone()
    x2[:, -1] = torch.randn(2, 16)
    assert not torch.allclose(bi(x2, mask)[0, 0], bi(x, mask)[0, 0])  # bidirectional does look ahead


# ---------------------------------------------------------------------------------------------
# dedup vs naive per-position encoding


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_dedup_equals_per_position_encoding(content, kind):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(kind=kind, text_trainable=1, image_trainable=1, tpool="attn"))
    model.eval()  # BatchNorm batch statistics differ between U and P items; eval makes them equal
    batch = make_batch(content, B=6, L=8, seed=3)
    assert batch.num_unique < int(batch.mask.sum())  # the batch does repeat items
    loss_d, m_d = model(batch)
    grads_d = torch.autograd.grad(loss_d, [p for p in model.parameters() if p.requires_grad])
    loss_n, m_n = model(batch, dedup=False)
    grads_n = torch.autograd.grad(loss_n, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss_d, loss_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_d["count"], m_n["count"])
    for a, b in zip(grads_d, grads_n):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # embeddings: per-position rows equal the table rows they dedup to
    table = model.encode_items(batch.unique_items, batch.text, batch.image)
    content_src = content
    pos_items = batch.seq[batch.mask].numpy()
    t, i = content_src.gather(np.arange(content_src.n_items))
    full = model.encode_items(torch.arange(content_src.n_items), t, i)
    torch.testing.assert_close(table[batch.inverse[batch.mask]], full[torch.from_numpy(pos_items)],
                               atol=1e-5, rtol=1e-5)


def test_single_modality_batch_runs_every_encoder(content):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(text_trainable="all", image_trainable="all"))
    model.train()
    text_items = np.flatnonzero(content.modality == TEXT)
    windows = [text_items[:4], text_items[3:8]]
    batch = collate_windows(windows, np.arange(2), 5, content, np.zeros(content.n_items))
    assert batch.image is None
    bn = model.image_encoder.backbone.embedder.embedder.normalization
    before = bn.running_mean.clone()
    loss, _ = model(batch)
    loss.backward()
    # every trainable parameter of the absent encoder got a (zero) gradient, its BatchNorm statistics
    # did not move; the table values are those of the text encoder alone
    for name, p in model.image_encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.count_nonzero(p.grad) == 0, name
    torch.testing.assert_close(bn.running_mean, before)
    model.eval()
    model.run_absent_encoders = False
    with torch.no_grad():
        a = model.encode_items(batch.unique_items, batch.text, None)
        model.run_absent_encoders = True
        b = model.encode_items(batch.unique_items, batch.text, None)
    torch.testing.assert_close(a, b)


def test_absent_modality_with_cached_prefix_runs_the_tail_only(content):
    """When the batch's content comes as frozen-prefix activations, the dummy of an absent modality
    runs only that encoder's tail too (every rank then runs the same modules, cache or not)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(text_trainable=1, image_trainable=1)).train()
    text_items = np.flatnonzero(content.modality == TEXT)
    batch = collate_windows([text_items[:4], text_items[2:7]], np.arange(2), 5, content,
                            np.zeros(content.n_items))
    calls = {"text_stem": 0, "image_stem": 0, "image_tail": 0}
    te, ie = model.text_encoder, model.image_encoder
    hooks = [te.backbone.embeddings.register_forward_hook(lambda *a: calls.__setitem__(
                 "text_stem", calls["text_stem"] + 1)),
             ie.backbone.embedder.register_forward_hook(lambda *a: calls.__setitem__(
                 "image_stem", calls["image_stem"] + 1)),
             ie.tail_blocks()[0].register_forward_hook(lambda *a: calls.__setitem__(
                 "image_tail", calls["image_tail"] + 1))]
    batch.text.prefix = te.forward_prefix(batch.text.input_ids, batch.text.attention_mask)
    calls.update(text_stem=0, image_stem=0, image_tail=0)
    loss, _ = model(batch)
    loss.backward()
    for h in hooks:
        h.remove()
    assert calls == {"text_stem": 0, "image_stem": 0, "image_tail": 1}
    assert all(p.grad is not None for p in ie.parameters() if p.requires_grad)
    # text from the cache, images not (say image fine-tuning cannot be cached): the image dummy runs
    # whole, as real images would
    ie.serves_cached_prefix = False
    hooks = [ie.backbone.embedder.register_forward_hook(lambda *a: calls.__setitem__(
                 "image_stem", calls["image_stem"] + 1))]
    calls.update(image_stem=0)
    model(batch)
    hooks[0].remove()
    assert calls["image_stem"] == 1


# ---------------------------------------------------------------------------------------------
# losses against float64 references


def _inbatch_reference(q, k, target, row_mask, log_q, tau):
    """Hand-written float64 loop: mean over valid rows of -log softmax with logits q.k/tau - log q."""
    q, k = q.double().numpy(), k.double().numpy()
    log_q = log_q.double().numpy()
    total, count = 0.0, 0
    for i in range(q.shape[0]):
        if not row_mask[i]:
            continue
        logits = [float(q[i] @ k[j]) / tau - log_q[j] for j in range(k.shape[0])]
        m = max(logits)
        lse = m + math.log(sum(math.exp(z - m) for z in logits))
        total += lse - logits[int(target[i])]
        count += 1
    return total / count


def test_inbatch_logq_equals_float64_reference():
    g = torch.Generator().manual_seed(0)
    n, u, d = 7, 11, 5
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(u, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, u, (n,), generator=g)
    k[target[0]] = q[0] * 2.0  # a peaky row, as in-batch positives are
    pop = torch.tensor([50.0, 1, 3, 7, 0.5, 20, 2, 9, 4, 1.5, 30], dtype=torch.float64)
    log_q = (pop / pop.sum()).log()
    row_mask = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    items = torch.arange(u)
    for tau, logq in ((1.0, True), (0.3, True), (0.3, False)):
        crit = Criterion(LossConfig(kind="softmax", temperature=tau, logq=logq, impl="torch"))
        loss, metrics = crit(q, k, target, row_mask, log_q, items)
        ref = _inbatch_reference(q, k, target, row_mask, log_q if logq else torch.zeros(u), tau)
        assert abs(loss.item() - ref) < 1e-10
        assert metrics["count"].item() == 5
    # logQ changes the loss when popularity is non-uniform
    a = Criterion(LossConfig(logq=True, impl="torch"))(q, k, target, row_mask, log_q, items)[0]
    b = Criterion(LossConfig(logq=False, impl="torch"))(q, k, target, row_mask, log_q, items)[0]
    assert abs(a.item() - b.item()) > 1e-3


def test_a_kernel_input_error_reaches_the_user_as_one_line():
    """The kernels raise their own ValueError; the loss turns it into a UserError, same words."""
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    target, row_mask = torch.tensor([0, 4, 2]), torch.ones(3, dtype=torch.bool)
    log_q, items = torch.zeros(5), torch.arange(5)
    crit = Criterion(LossConfig(temperature=0.0, impl="torch"))  # not validated: built in Python
    with pytest.raises(UserError, match="temperature must be finite and > 0, got 0.0") as info:
        crit(q, k, target, row_mask, log_q, items)
    assert isinstance(info.value.__cause__, KernelInputError) and "\n" not in str(info.value)


def test_bce_equals_reference_and_never_samples_the_positive():
    g = torch.Generator().manual_seed(1)
    n, u, d, kneg = 6, 9, 4, 3
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(u, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, u, (n,), generator=g)
    row_mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    neg = sample_negatives(target, torch.arange(u), kneg, generator=g)
    assert neg.shape == (n, kneg) and not (neg == target[:, None]).any()
    got = bce_sampled(q, k, target, neg, row_mask, temperature=0.5)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))
    for i in range(n):
        if not row_mask[i]:
            assert got[i].item() == 0.0
            continue
        ref = -math.log(sig(float(q[i] @ k[target[i]]) / 0.5))
        ref -= sum(math.log(1.0 - sig(float(q[i] @ k[j]) / 0.5)) for j in neg[i].tolist())
        assert abs(got[i].item() - ref) < 1e-10
    # many draws: never the positive, every other item reachable
    tgt = torch.tensor([0, 4, 8] * 200)
    negs = sample_negatives(tgt, torch.arange(u), 5)
    assert not (negs == tgt[:, None]).any()
    assert set(negs[tgt == 4].unique().tolist()) == set(range(u)) - {4}
    assert sample_negatives(torch.tensor([0]), torch.arange(1), 4).shape == (1, 0)
    # through the criterion: normalised by the number of valid rows
    crit = Criterion(LossConfig(kind="bce", num_negatives=kneg, temperature=0.5))
    loss, metrics = crit(q, k, target, row_mask, torch.zeros(u), torch.arange(u))
    assert metrics["count"].item() == 5 and torch.isfinite(loss)


def test_global_negatives_mask_cross_rank_duplicates():
    """Two simulated ranks share item 7: the gathered table keeps one copy; the loss on rank 1 equals
    the loss over the deduplicated table."""
    g = torch.Generator().manual_seed(2)
    d = 4
    items0, items1 = torch.tensor([1, 3, 7]), torch.tensor([2, 7, 9, 11])
    k0 = torch.randn(3, d, generator=g, dtype=torch.float64)
    k1 = torch.randn(4, d, generator=g, dtype=torch.float64)
    k1[1] = k0[2]  # same item, same embedding
    lq0 = torch.randn(3, generator=g, dtype=torch.float64)
    lq1 = torch.randn(4, generator=g, dtype=torch.float64)
    lq1[1] = lq0[2]

    def gather(keys, items, log_q):  # what rank 1 sees after an all-gather
        return torch.cat([k0, keys]), torch.cat([items0, items]), torch.cat([lq0, log_q]), 3

    keep, first = first_copy(torch.cat([items0, items1]))
    assert keep.tolist() == [True, True, True, True, False, True, True]
    assert first.tolist() == [0, 1, 2, 3, 2, 5, 6]
    q = torch.randn(3, d, generator=g, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])  # rank-local rows: item 7, item 2, item 11
    row_mask = torch.ones(3, dtype=torch.bool)
    crit = Criterion(LossConfig(kind="softmax", negatives="global", impl="torch", temperature=0.7))
    crit.gather_fn = gather
    loss, metrics = crit(q, k1, target, row_mask, lq1, items1)
    dedup_keys = torch.cat([k0, k1[[0, 2, 3]]])
    dedup_lq = torch.cat([lq0, lq1[[0, 2, 3]]])
    ref = _inbatch_reference(q, dedup_keys, torch.tensor([2, 3, 5]), row_mask, dedup_lq, 0.7)
    assert abs(loss.item() - ref) < 1e-10
    crit_b = Criterion(LossConfig(kind="bce", negatives="global", num_negatives=50))
    crit_b.gather_fn = gather
    assert torch.isfinite(crit_b(q, k1, target, row_mask, lq1, items1)[0])


# ---------------------------------------------------------------------------------------------
# prefix / tail split (the frozen-prefix cache builds on it)


def test_prefix_tail_split(content):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(text_trainable=1, image_trainable=1, dropout=0.1))
    model.train()
    te, ie = model.text_encoder, model.image_encoder
    batch = make_batch(content, B=6, L=7, seed=5)
    assert te.prefix_is_cacheable() and ie.prefix_is_cacheable()
    # the prefix is frozen, eval-mode and gradient-free; tail(prefix(x)) is the encoder
    assert not any(m.training for m in te.prefix_modules())
    tp = te.forward_prefix(batch.text.input_ids, batch.text.attention_mask)
    ip = ie.forward_prefix(batch.image.pixels)
    assert tp.shape[:2] == batch.text.input_ids.shape and not tp.requires_grad
    assert ip.shape[1:] == ie.prefix_item_shape and not ip.requires_grad
    te.eval()
    ie.eval()
    torch.testing.assert_close(te(batch.text), te.forward_tail(tp, batch.text.attention_mask))
    torch.testing.assert_close(te.forward_prefix(batch.text), tp)  # content objects work too
    torch.testing.assert_close(ie.forward_prefix(batch.image), ip)
    torch.testing.assert_close(ie(batch.image), ie.forward_tail(ip))
    # a batch carrying the prefix runs only the tail: same loss and gradients
    model.eval()
    loss_a, _ = model(batch)
    ga = torch.autograd.grad(loss_a, [p for p in model.parameters() if p.requires_grad])
    batch.text.prefix, batch.image.prefix = tp, ip
    loss_b, _ = model(batch)
    gb = torch.autograd.grad(loss_b, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    # the hash covers frozen weights only
    h = te.frozen_hash()
    with torch.no_grad():
        te.backbone.encoder.layer[1].output.dense.weight.add_(1.0)  # trainable block
    assert te.frozen_hash() == h
    with torch.no_grad():
        te.backbone.encoder.layer[0].output.dense.weight.add_(1.0)  # frozen block
    assert te.frozen_hash() != h
    hi = ie.frozen_hash()
    model.train()
    batch.text.prefix = batch.image.prefix = None
    model(batch)[0].backward()  # a training step leaves the frozen prefix (and its BatchNorm stats) alone
    assert ie.frozen_hash() == hi
    with torch.no_grad():
        ie.backbone.embedder.embedder.normalization.running_var.mul_(2.0)  # frozen stem statistics
    assert ie.frozen_hash() != hi


def test_prefix_not_cacheable_cases():
    full = build_model(tiny_cfg(text_trainable="all", image_trainable="all"))
    assert "fully fine-tuned" in full.text_encoder.prefix_not_cacheable_reason()
    assert not full.image_encoder.prefix_is_cacheable()
    cfg = tiny_cfg()
    cfg.text.frozen_dropout = True
    m = build_model(cfg).train()
    assert "dropout" in m.text_encoder.prefix_not_cacheable_reason()
    assert m.eval().text_encoder.prefix_is_cacheable()
    cfg = tiny_cfg(text_trainable=1)
    cfg.text.lora = LoRAConfig(r=2)
    m = build_model(cfg)
    assert m.text_encoder.prefix_is_cacheable()  # adapters sit in the trainable top block only

    inject_lora([m.text_encoder.backbone.encoder.layer[0]], "bert", LoRAConfig(r=2))
    for p in m.text_encoder.backbone.encoder.layer[0].parameters():
        p.requires_grad_(False)
    assert "LoRA" in m.text_encoder.prefix_not_cacheable_reason()


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def test_gradient_checkpointing_same_gradients(content):
    batch = make_batch(content, B=6, L=7, seed=7)
    grads, losses = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(kind="causal", text_trainable="all", image_trainable=2, dropout=0.1)
        cfg.text.grad_ckpt = cfg.image.grad_ckpt = cfg.user.grad_ckpt = ckpt
        model = build_model(cfg).train()
        torch.manual_seed(123)  # same dropout masks
        loss, _ = model(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_only_adapters_and_round_trips(content, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(text_trainable="all", image_trainable=2)
    cfg.text.lora = LoRAConfig(r=4, alpha=8)
    cfg.image.lora = LoRAConfig(r=2, alpha=4)
    model = build_model(cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for enc in (model.text_encoder, model.image_encoder):
        assert enc.lora_layers > 0
        for n, p in enc.backbone.named_parameters():
            assert p.requires_grad == (".lora_" in n), n
    assert any("user." in n for n in names) and any("proj" in n for n in names)
    backbone_before = {n: p.detach().clone() for n, p in model.named_parameters()
                       if "backbone" in n and ".lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(content, B=6, L=7, seed=9)
    model.train()
    for _ in range(2):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    for n, v in backbone_before.items():
        if "running_" not in n:
            assert torch.equal(after[n].detach(), v), n
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and any(p.detach().abs().sum() > 0 for p in lora_b)  # B starts at 0, it moved
    report = trainable_report(model)
    assert "LoRA" in report

    # adapter-only save/load: a fresh model with the same base weights reproduces the outputs
    model.eval()
    with torch.no_grad():
        ref = model.encode_items(batch.unique_items, batch.text, batch.image)
    path = tmp_path / "adapters.safetensors"
    n_saved = save_adapters(model, path)
    assert n_saved == sum(".lora_" in n for n in model.state_dict())
    torch.manual_seed(1)
    fresh = build_model(cfg)
    non_lora = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    fresh.load_state_dict(non_lora, strict=False)
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_items(batch.unique_items, batch.text, batch.image), ref)
    load_adapters(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_items(batch.unique_items, batch.text, batch.image), ref)

    # merge for export: plain parameter names, same outputs, loads into a model without LoRA
    assert merge_lora(fresh) > 0
    assert not any(".lora_" in k or "base_layer" in k for k in fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_items(batch.unique_items, batch.text, batch.image), ref,
                                   atol=1e-5, rtol=1e-4)
    plain = build_model(tiny_cfg(text_trainable="all", image_trainable=2)).eval()
    plain.load_state_dict(fresh.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_items(batch.unique_items, batch.text, batch.image), ref,
                                   atol=1e-5, rtol=1e-4)
    # and plain weights load into a LoRA model (transfer from a full export)
    lora_again = build_model(cfg)
    load_base_weights(lora_again, plain.state_dict())
    lora_again.eval()
    with torch.no_grad():  # fresh adapters (B = 0) leave the base model's outputs
        torch.testing.assert_close(lora_again.encode_items(batch.unique_items, batch.text, batch.image),
                                   ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# overfitting a tiny batch


@pytest.mark.parametrize("kind", ["transrec", "id"])
def test_tiny_model_overfits_a_batch(content, kind):
    torch.manual_seed(0)
    if kind == "id":
        user = UserEncoderConfig(layers=1, heads=2, dropout=0.0, max_len=8)
        model = build_model(ModelConfig(kind="id", dim=32, user=user), n_items=content.n_items)
        steps, lr = 30, 1e-2
    else:
        model = build_model(tiny_cfg(text_trainable=1, image_trainable=1))
        steps, lr = 25, 3e-3
    batch = make_batch(content, B=8, L=7, seed=11, min_len=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    first = None
    for _ in range(steps):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        final = model(batch)[0].item()
    chance = math.log(batch.num_unique)  # loss of a uniform softmax over the unique items
    # the loss falls at least 10x from the first step and ends far below chance
    assert final < first / 10 and final < 0.2 * chance, (first, final, chance)


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_model_trains_under_autocast_bf16(content, kind):
    """Autocast gives the loss an fp32 user side (LayerNorm) and a bf16 item side: it must train,
    with every trainable parameter getting a finite gradient, and agree with the fp32 loss at
    bf16 accuracy (a few bf16 roundings per layer over a loss of order log U)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(kind, text_trainable=1, image_trainable=1))
    batch = make_batch(content, B=8, L=7, seed=3, min_len=3)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        fp32 = model(batch)[0].item()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(fp32, rel=0.05)
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("text_encoder"))


@pytest.mark.parametrize("kind", ["transrec", "id"])
def test_export_round_trip_is_exact(content, kind, tmp_path):
    """save_export then from_export gives the same architecture and every weight bit for bit."""
    torch.manual_seed(0)
    cfg = Config(model=tiny_cfg() if kind == "transrec" else ModelConfig(kind="id", dim=32))
    model = build_model(cfg.model, n_items=content.n_items)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # not the initialisation a fresh build would give
    out = model.save_export(tmp_path / "exp", cfg, {"kind": "full", "n_items": content.n_items})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["exp"]  # no temporary folder left
    again = SequentialRecommender.from_export(out)
    assert type(again) is type(model) and not again.training
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_catalogue_negatives_are_a_full_softmax_over_the_item_table(content):
    """negatives=catalogue on the ID model: cross-entropy over every item (no logQ), against a
    float64 reference; gradients reach table rows that are not in the batch."""
    torch.manual_seed(0)
    user = UserEncoderConfig(layers=1, heads=2, dropout=0.0, max_len=8)
    cfg = ModelConfig(kind="id", dim=16, user=user, loss=LossConfig(negatives="catalogue", temperature=0.5))
    model = build_model(cfg, n_items=content.n_items).double()
    assert model.user.causal  # the ID model's "auto" user encoder is SASRec's
    batch = make_batch(content, B=5, L=7, seed=2, min_len=3)
    loss, metrics = model(batch)
    table = model.item_emb.weight
    out = model.user(table[batch.seq.clamp_min(0)[:, :-1]], batch.mask[:, :-1])
    q = out.reshape(-1, 16)
    target, valid = model.targets(batch)
    logits = (q @ table.T) / 0.5
    ref = F.cross_entropy(logits[valid], batch.unique_items[target][valid], reduction="mean")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert int(metrics["count"]) == int(valid.sum()) and int(metrics["num_keys"]) == content.n_items
    loss.backward()
    outside = torch.ones(content.n_items, dtype=torch.bool)
    outside[batch.unique_items] = False
    assert outside.any() and table.grad[outside].abs().sum() > 0  # negatives beyond the batch


def test_user_kind_auto_and_catalogue_checks():
    assert user_kind(ModelConfig(kind="id")) == "causal"
    assert user_kind(ModelConfig(kind="transrec")) == "bidirectional"
    assert user_kind(ModelConfig(kind="id", user=UserEncoderConfig(kind="bidirectional"))) == "bidirectional"
    for negatives in ("memory", "catalogue"):  # a softmax over more candidates; bce samples from the batch
        with pytest.raises(ConfigError, match=f"negatives={negatives} needs model.loss.kind=softmax"):
            build_model(ModelConfig(loss=LossConfig(kind="bce", negatives=negatives)))
