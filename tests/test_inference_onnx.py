"""The user encoder as ONNX: parity with the PyTorch path (causal and bidirectional, cosine and dot,
bf16 weights, every length from 1 to the encoder's max), the Recommender's top-k from the graph's
user vectors, a failed parity check leaving no file, and one-line errors for bad inputs."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from transrec.config import build_config  # noqa: E402
from transrec.errors import UserError  # noqa: E402
from transrec.inference import onnx_export  # noqa: E402
from transrec.inference.onnx_export import (  # noqa: E402
    META_KEY,
    OnnxUserEncoder,
    check_parity,
    export_user_encoder,
)
from transrec.inference.recommender import Recommender  # noqa: E402
from transrec.inference.scoring import item_keys, user_states  # noqa: E402
from transrec.models import build_model  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.format import unsanitize_key  # noqa: E402
from transrec.shards.synth import synthesize  # noqa: E402

# (user encoder kind, cosine, input_norm, weights dtype): each exported once (ID models: no item
# towers to build; the user encoder is the same module as TransRec's). The end-to-end test below
# adds a float32 bidirectional cosine TransRec and a float32 causal dot-product ID model.
VARIANTS = {
    "causal-dot-inputnorm": ("causal", False, True, torch.float32),
    "bidirectional-cosine-bf16": ("bidirectional", True, False, torch.bfloat16),
}


def _id_config(kind: str, cosine: bool, input_norm: bool, max_len: int = 12):
    return build_config("tiny", None, ["model.kind=id", f"model.user.kind={kind}",
                                       f"model.loss.l2_normalize={str(cosine).lower()}",
                                       f"model.user.input_norm={str(input_norm).lower()}",
                                       f"model.user.max_len={max_len}", "data.max_len=8"])


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def exported(request, tmp_path_factory):
    kind, cosine, input_norm, dtype = VARIANTS[request.param]
    cfg = _id_config(kind, cosine, input_norm)
    torch.manual_seed(1)
    model = build_model(cfg.model, n_items=30)
    with torch.no_grad():  # positions and LayerNorms away from their init, so each one matters
        for name, p in model.user.named_parameters():
            p.add_(0.3 * torch.randn_like(p) if ("ln" in name or name == "pos.weight") else 0)
    model = model.to(dtype).eval()
    path = tmp_path_factory.mktemp("onnx") / "users.onnx"
    info = export_user_encoder(model, cfg, path)
    return model, cfg, path, info


def _reference(fp32, history: torch.Tensor, mask: torch.Tensor, cosine: bool) -> torch.Tensor:
    """The PyTorch path in float32: user_states over a table holding the history's rows (padding
    pointing at row 0, as the Recommender pads), normalised for cosine."""
    b, n, d = history.shape
    hist = torch.arange(b * n).view(b, n).masked_fill(~mask, -1)
    states = user_states(fp32, history.reshape(b * n, d), hist, mask)
    return F.normalize(states, dim=-1) if cosine else states


def _masks(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    counts = torch.randint(1, n + 1, (b,), generator=gen)
    counts[0] = n
    return torch.arange(n)[None, :] >= (n - counts)[:, None]


def test_graph_matches_pytorch_at_every_length_and_batch(exported):
    model, cfg, path, info = exported
    cosine = bool(cfg.model.loss.l2_normalize)
    max_len = int(cfg.model.user.max_len)
    assert info["parity_max_abs_diff"] <= 1e-4
    enc = OnnxUserEncoder(path)
    gen = torch.Generator().manual_seed(7)
    fp32 = copy.deepcopy(model).float()
    worst = 0.0
    for b in (1, 5, 17):
        for n in (1, 2, 7, max_len):
            history = torch.randn(b, n, int(cfg.model.dim), generator=gen)
            mask = _masks(b, n, gen)
            want = _reference(fp32, history, mask, cosine)
            got = torch.from_numpy(enc(history.numpy(), mask.numpy()))
            assert got.shape == (b, int(cfg.model.dim)) and got.dtype == torch.float32
            worst = max(worst, float((got - want).abs().max()))
            if cosine:
                torch.testing.assert_close(got.norm(dim=-1), torch.ones(b), rtol=0, atol=1e-5)
            # padding holds anything, NaN included: the same users
            noisy = history.clone()
            noisy[~mask] = float("nan")
            torch.testing.assert_close(torch.from_numpy(enc(noisy.numpy(), mask.numpy())), got,
                                       rtol=0, atol=1e-6)
    assert worst <= 1e-4, worst
    # right-aligned: the same items in a longer window (more left padding) are the same users, the
    # same items left-aligned are not
    history = torch.randn(3, 4, int(cfg.model.dim), generator=gen).numpy()
    short = enc(history, np.ones((3, 4), dtype=bool))
    pad = np.zeros((3, max_len - 4, int(cfg.model.dim)), dtype=np.float32)
    window = np.zeros((3, max_len), dtype=bool)
    window[:, -4:] = True
    np.testing.assert_allclose(enc(np.concatenate([pad, history], axis=1), window), short, rtol=0, atol=1e-5)
    left = enc(np.concatenate([history, pad], axis=1), window[:, ::-1].copy())
    assert np.abs(left - short).max() > 1e-3


def test_sidecar_and_metadata(exported):
    model, cfg, path, info = exported
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["dim"] == 64 and side["max_length"] == 12 and side["history_window"] == 8
    assert side["metric"] == ("cosine" if cfg.model.loss.l2_normalize else "dot")
    assert side["user_kind"] == cfg.model.user.kind and side["opset"] >= 18
    assert side["torch"] == torch.__version__ and "item encoders" in side["not_in_graph"]
    proto = onnx.load(str(path))
    assert json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])["metric"] == side["metric"]
    assert [i.name for i in proto.graph.input] == ["history", "mask"]
    assert [o.name for o in proto.graph.output] == ["user"]
    types = {i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT in types
    assert not types & {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}
    assert not list(path.parent.glob("*.tmp"))


def test_parity_check_catches_another_model(exported, tmp_path):
    model, cfg, path, _ = exported
    other = copy.deepcopy(model).float()
    with torch.no_grad():
        # the newest item's position only, off the all-ones direction every LayerNorm removes
        other.user.pos.weight[-1] += 0.05 * torch.randn(other.user.pos.weight.shape[1])
    with pytest.raises(UserError, match="differs from PyTorch") as err:
        check_parity(other, path)
    assert "\n" not in str(err.value)


def test_failed_parity_leaves_no_file(monkeypatch, tmp_path):
    cfg = _id_config("causal", True, False, max_len=4)
    model = build_model(cfg.model, n_items=10).eval()
    path = tmp_path / "users.onnx"
    path.write_bytes(b"the earlier file")

    def fail(*_a, **_k):
        raise UserError("ONNX user encoder differs from PyTorch by 1 (> atol 0.0001)")

    monkeypatch.setattr(onnx_export, "check_parity", fail)
    with pytest.raises(UserError, match="differs"):
        export_user_encoder(model, cfg, path)
    assert path.read_bytes() == b"the earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.onnx"]  # no temporary, no sidecar
    with pytest.raises(UserError, match="opset 17"):
        export_user_encoder(model, cfg, path, opset=17)
    (tmp_path / "export.json").write_text('{"model_kind": "id"}')  # an export folder's own file
    with pytest.raises(UserError, match="not an ONNX sidecar"):
        export_user_encoder(model, cfg, tmp_path / "export.onnx")
    assert (tmp_path / "export.json").read_text() == '{"model_kind": "id"}'


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_rec")
    data = synthesize(root / "data", domain="target", n_users=20, n_items=40, seed=3, min_len=4, max_len=14)
    return root, data


@pytest.mark.parametrize("overrides", [[], ["model.kind=id", "model.loss.l2_normalize=false"]],
                         ids=["transrec-bidirectional-cosine", "id-causal-dot"])
def test_top10_from_onnx_users_equals_the_recommender(world, overrides):
    root, data = world
    name = "-".join(overrides) or "transrec"
    cfg = build_config("tiny", None, [f"data.path={data}", "eval.batch_size=4", *overrides])
    torch.manual_seed(0)
    n_items = Dataset.open(data).n_items
    model = build_model(cfg.model, n_items=n_items)
    exp = model.save_export(root / f"export-{name}", cfg, {"kind": "full", "step": 0, "n_items": n_items})
    rec = Recommender.from_export(exp, device="cpu")
    vectors = rec.add_items(data=data)  # [n_items, d], dataset order: the table's rows
    ids = [unsanitize_key(k) for k in Dataset.open(data).item_ids]
    assert rec.item_ids == ids
    info = export_user_encoder(rec.model, cfg, root / f"{name}.onnx")
    assert info["metric"] == ("cosine" if rec.l2 else "dot")
    enc = OnnxUserEncoder(root / f"{name}.onnx")

    rng = np.random.default_rng(5)
    histories = [list(rng.choice(ids, size=n)) for n in (1, 3, 7, 10, 14, 25)]  # longer than the window too
    window = info["history_window"]
    history = np.zeros((len(histories), window, enc.dim), dtype=np.float32)
    mask = np.zeros((len(histories), window), dtype=bool)
    row_of = {i: r for r, i in enumerate(ids)}
    for u, h in enumerate(histories):
        last = [row_of[i] for i in h[-window:]]
        history[u, window - len(last):] = vectors[last].numpy()
        mask[u, window - len(last):] = True
    users = torch.from_numpy(enc(history, mask))
    scores = users @ item_keys(vectors, info["metric"] == "cosine").T
    top = torch.topk(scores, 10, dim=1)
    want = rec.recommend_many(histories, 10, exclude_history=False)
    for u, r in enumerate(want):
        assert [ids[j] for j in top.indices[u].tolist()] == r.ids
        np.testing.assert_allclose(top.values[u].numpy(), np.asarray(r.scores), rtol=0, atol=1e-4)


@pytest.mark.parametrize("history, mask, message", [
    (np.zeros((2, 3, 32), np.float32), np.ones((2, 3), bool), r"history must be \[batch, length, 64\]"),
    (np.zeros((2, 3, 64), np.float64), np.ones((2, 3), bool), "history must be a float32"),
    (np.zeros((2, 3, 64), np.float32), np.ones((2, 3), np.int64), "mask must be a bool"),
    (np.zeros((2, 3, 64), np.float32), np.ones((2, 4), bool), r"mask must be \[batch, length\]"),
    (np.zeros((3, 64), np.float32), np.ones((3,), bool), r"history must be \[batch, length, 64\]"),
    (np.zeros((1, 13, 64), np.float32), np.ones((1, 13), bool), "longer than the encoder's max length 12"),
    (np.zeros((0, 3, 64), np.float32), np.ones((0, 3), bool), "at least one user"),
    ([[[0.0] * 64]], np.ones((1, 1), bool), "float32 numpy array"),
])
def test_bad_inputs_are_one_line_errors(exported, history, mask, message):
    enc = OnnxUserEncoder(exported[2])
    with pytest.raises(UserError, match=message) as err:
        enc(history, mask)
    assert "\n" not in str(err.value)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OnnxUserEncoder(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable ONNX file") as err:
        OnnxUserEncoder(tmp_path / "junk.onnx")
    assert "\n" not in str(err.value)
