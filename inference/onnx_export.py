"""The user encoder as an ONNX graph, for serving without torch.

The graph is the user half of a model only: ``history`` float32 ``[batch, length, dim]`` (the
history items' embeddings, the rows of a :class:`~transrec.inference.recommender.Recommender`'s
table, newest last, right-aligned) and ``mask`` bool ``[batch, length]`` (True at items) give
``user`` float32 ``[batch, dim]``, the *scoring* user vector: the user encoder's state at the last
position, L2-normalised when the model scores by cosine (``model.loss.l2_normalize``). So

    scores = user @ item_keys(vectors, l2).T

are the Recommender's scores, ``vectors`` being the items' embeddings (``transrec vectors``) and
:func:`~transrec.inference.scoring.item_keys` normalising them for a cosine model (the sidecar's
``metric`` says which). Batch and length are dynamic, the length from 1 to the user encoder's
``model.user.max_len`` (its learned positions end there; a Recommender reads the last
``data.max_len`` items, the sidecar's ``history_window``).

Not in the graph: the item towers (text and image encoders, with or without LoRA: LoRA adapts the
item encoders only, the user encoder never carries adapters) and the hybrid's per-item vectors;
items enter as vectors. Padding rows may hold anything, NaN included: the graph zeroes them before
the encoder, which ignores them anyway. The weights are exported in float32 whatever the model
holds (bf16 weights are widened exactly).

:func:`export_user_encoder` writes ``<stem>.onnx`` and a ``<stem>.json`` sidecar (the same JSON is
in the graph's metadata, key ``transrec.user_encoder``), and checks the file against the PyTorch
path (:func:`check_parity`) before putting it in place; :class:`OnnxUserEncoder` runs it with
onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transrec.errors import UserError
from transrec.inference.scoring import cosine_scores, unwrap, user_states

INPUTS = ("history", "mask")
OUTPUT = "user"
META_KEY = "transrec.user_encoder"
FORMAT = "transrec user encoder (onnx)"
MIN_OPSET = 18  # the dynamo exporter's floor: below it, it fails to convert down and writes 18
NOT_EXPORTED = ("the item encoders (text and image towers, LoRA or not) and the hybrid's per-item "
                "vectors: items go in as vectors (transrec vectors), the rows of the Recommender's table")


class _ScoringUser(nn.Module):
    """What the graph computes: the user state at the last position, normalised for cosine."""

    def __init__(self, user: nn.Module, l2: bool):
        super().__init__()
        self.user = user
        self.l2 = l2

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # padding rows are zeroed here so that whatever they hold (even NaN) cannot leak: the
        # encoder multiplies them by 0 after the positions, which NaN would survive
        history = torch.where(mask[..., None], history, torch.zeros((), dtype=history.dtype))
        state = self.user.last(history, mask)
        return F.normalize(state, dim=-1) if self.l2 else state


class _Fp32Users(nn.Module):
    """A stand-in model whose ``encode_users`` is the user encoder in float32 (the graph's
    precision), for :func:`user_states` when the model's weights are not float32."""

    def __init__(self, user: nn.Module):
        super().__init__()
        self.user = user

    def encode_users(self, item_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.user.last(item_emb, mask)


def _user_encoder_fp32(model) -> nn.Module:
    """A float32 CPU copy of the model's user encoder in eval mode (dropout off)."""
    user = copy.deepcopy(unwrap(model).user).to("cpu", torch.float32).eval()
    from transrec.models.lora import has_lora, merge_lora  # lazy: peft, only when exporting

    if has_lora(user):  # no config puts adapters here today; fold them if something did
        merge_lora(user)
    return user


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (torchvision ops it skips, deprecations) off: the parity check
    below, not a warning, says whether the graph is right."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _is_sidecar(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_user_encoder(model, cfg, path: str | Path, *, opset: int | None = None) -> dict:
    """Write the user encoder of ``model`` (built from ``cfg``, whose ``data.max_len`` is the
    history window a Recommender reads) as an ONNX file at ``path`` and its JSON sidecar beside it
    (same stem, ``.json``); ``opset``: the ONNX opset (default: the exporter's). The file is checked
    against the PyTorch path (:func:`check_parity`) before it replaces anything at ``path``; a graph
    that fails is removed and :class:`~transrec.errors.UserError` raised. Returns the sidecar's dict
    (plus ``path``)."""
    path = Path(path)
    if opset is not None and int(opset) < MIN_OPSET:
        raise UserError(f"opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or later")
    if path.suffix != ".onnx":
        raise UserError(f"{path}: the ONNX file's name must end in .onnx")
    side = _sidecar_path(path)
    if side.exists() and not _is_sidecar(side):
        raise UserError(f"{side}: exists and is not an ONNX sidecar of transrec; name the .onnx file "
                        "otherwise (its sidecar is <stem>.json)")
    net = unwrap(model)
    user_cfg = net.user.cfg
    max_len = int(net.user.max_len)
    dim = int(net.dim)
    l2 = cosine_scores(net)
    head = _ScoringUser(_user_encoder_fp32(net), l2).eval()

    # torch.onnx's dynamo exporter (torch.export + onnxscript): the graph keeps batch and length
    # symbolic, the length bounded by the learned positions. The TorchScript exporter
    # (dynamo=False, dynamic_axes) is not used: it writes the attention mask's identity as a bool
    # EyeLike, which onnxruntime's CPU provider does not implement, so its file does not load.
    length = min(max_len, 3)  # an example of 2 or more: torch.export specialises sizes 0 and 1
    example = (torch.zeros(2, length, dim), torch.ones(2, length, dtype=torch.bool))  # no RNG draw
    batch_dim = torch.export.Dim("batch", min=1)
    len_dim = torch.export.Dim("length", min=1, max=max_len) if max_len > 1 else None
    shapes = {"history": {0: batch_dim, 1: len_dim}, "mask": {0: batch_dim, 1: len_dim}}
    if len_dim is None:
        shapes = {"history": {0: batch_dim}, "mask": {0: batch_dim}}
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(head, example, None, dynamo=True, input_names=list(INPUTS),
                                        output_names=[OUTPUT], dynamic_shapes=shapes,
                                        opset_version=opset, optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line for the user
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"ONNX export of the user encoder failed (opset {opset or 'default'}): "
                        f"{type(exc).__name__}: {first}") from exc
    opset_used = int(next((v for d, v in program.model.opset_imports.items() if d == ""), opset or 0))
    meta = {
        "format": FORMAT,
        "dim": dim,
        "max_length": max_len,
        "history_window": int(cfg.data.max_len),
        "metric": "cosine" if l2 else "dot",
        "user_kind": str(user_cfg.kind),
        "input_norm": bool(user_cfg.input_norm),
        "model_kind": str(net.cfg.kind),
        "preset": str(getattr(cfg, "preset", "") or ""),
        "opset": opset_used,
        "inputs": {"history": {"dtype": "float32", "shape": ["batch", "length", dim]},
                   "mask": {"dtype": "bool", "shape": ["batch", "length"]}},
        "outputs": {OUTPUT: {"dtype": "float32", "shape": ["batch", dim]}},
        "layout": "right-aligned: the newest item in the last column; mask True at items",
        "scores": "user @ item_keys(vectors).T (item vectors L2-normalised when metric is cosine)",
        "torch": torch.__version__,
        "not_in_graph": NOT_EXPORTED,
    }
    program.model.metadata_props[META_KEY] = json.dumps(meta, sort_keys=True)
    program.model.doc_string = "transrec user encoder: " + meta["scores"]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _quiet_exporter():
            program.save(tmp, external_data=False)
        meta["parity_max_abs_diff"] = check_parity(net, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    side.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {**meta, "path": str(path), "sidecar": str(side)}


def _right_aligned_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` right-aligned masks: row 0 full, row 1 (when there) one item, the rest
    a random count of items from 1 to ``length``."""
    counts = torch.randint(1, length + 1, (batch,), generator=gen)
    counts[0] = length
    if batch > 1:
        counts[1] = 1
    return torch.arange(length)[None, :] >= (length - counts)[:, None]


@torch.no_grad()
def check_parity(model, path: str | Path, *, lengths: Sequence[int] | None = None,
                 batch: Sequence[int] = (1, 5), atol: float = 1e-4, seed: int = 0) -> float:
    """The largest absolute difference between the ONNX file at ``path`` (onnxruntime, CPU) and
    the PyTorch path (:func:`~transrec.inference.scoring.user_states`, normalised for a cosine
    model) over random histories, every size in ``batch`` × ``lengths`` (default: 1, 3 and the
    user encoder's max length), right-aligned masks of several fills. The ONNX side's padding rows
    are random, the PyTorch side's a real row, so the check also says padding is ignored. A model
    whose weights are not float32, or not on the CPU, is compared through a float32 CPU copy of its
    user encoder (what the graph holds). Raises
    :class:`~transrec.errors.UserError` when the difference is over ``atol`` (or not finite)."""
    net = unwrap(model)
    max_len = int(net.user.max_len)
    dim = int(net.dim)
    if lengths is None:
        lengths = (1, 3, max_len)
    lengths = sorted({min(max(int(n), 1), max_len) for n in lengths})
    param = next(net.user.parameters())
    # the model itself when it is float32 on the CPU; else its user encoder as the graph holds it,
    # float32 on the CPU (bf16 weights widened; no TF32 or GPU kernels in the comparison)
    plain = param.dtype == torch.float32 and param.device.type == "cpu"
    ref_model = net if plain else _Fp32Users(_user_encoder_fp32(net))
    device = torch.device("cpu")
    l2 = cosine_scores(net)
    enc = OnnxUserEncoder(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch:
        for n in lengths:
            mask = _right_aligned_mask(int(b), n, gen)
            table = torch.randn(int(b) * n, dim, generator=gen)
            hist = torch.arange(int(b) * n).view(int(b), n).masked_fill(~mask, -1)
            want = user_states(ref_model, table.to(device), hist.to(device), mask.to(device)).cpu()
            if l2:
                want = F.normalize(want, dim=-1)
            history = table[hist.clamp(min=0)]
            history[~mask] = torch.randn(int((~mask).sum()), dim, generator=gen) * 10
            got = torch.from_numpy(enc(history.numpy(), mask.numpy()))
            diff = float((got - want).abs().max())
            if not np.isfinite(diff):
                raise UserError(f"{path}: ONNX user encoder gives non-finite values at batch {b}, length {n}")
            worst = max(worst, diff)
    if worst > atol:
        raise UserError(f"{path}: ONNX user encoder differs from PyTorch by {worst:.3g} (> atol {atol:g})")
    return worst


class OnnxUserEncoder:
    """The exported user encoder under onnxruntime (CPU unless ``providers`` says otherwise):
    ``enc(history, mask)`` -> float32 ``[batch, dim]`` scoring user vectors.

    >>> enc = OnnxUserEncoder("exports/users.onnx")          # doctest: +SKIP
    >>> users = enc(history, mask)  # float32 [B, L, d], bool [B, L] -> [B, d]  # doctest: +SKIP
    ``threads``: onnxruntime's intra-op threads (0: its default).
    """

    def __init__(self, path: str | Path, *, threads: int = 0, providers: Sequence[str] | None = None):
        import onnxruntime as ort  # lazy: the serving extra

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: ONNX file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UserError(f"{self.path}: not a loadable ONNX file ({first})") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUTS):
            raise UserError(f"{self.path}: not a transrec user encoder (inputs {names}, want {list(INPUTS)})")
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        self.meta: dict = json.loads(raw) if raw else {}
        shape = self.session.get_inputs()[0].shape
        self.dim = int(self.meta.get("dim") or shape[-1])
        self.max_length: int | None = self.meta.get("max_length")
        self.metric: str | None = self.meta.get("metric")

    def __repr__(self) -> str:
        return (f"OnnxUserEncoder({str(self.path)!r}, dim={self.dim}, max_length={self.max_length}, "
                f"metric={self.metric})")

    def __call__(self, history: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if not isinstance(history, np.ndarray) or history.dtype != np.float32:
            raise UserError(f"history must be a float32 numpy array, got "
                            f"{getattr(history, 'dtype', type(history).__name__)}")
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise UserError(f"mask must be a bool numpy array, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if history.ndim != 3 or history.shape[-1] != self.dim:
            raise UserError(f"history must be [batch, length, {self.dim}], got {list(history.shape)}")
        if mask.shape != history.shape[:2]:
            raise UserError(f"mask must be [batch, length] = {list(history.shape[:2])}, "
                            f"got {list(mask.shape)}")
        b, n = history.shape[:2]
        if b < 1 or n < 1:
            raise UserError(f"history must hold at least one user and one position, "
                            f"got {list(history.shape)}")
        if self.max_length is not None and n > int(self.max_length):
            raise UserError(f"history of {n} positions is longer than the encoder's max length "
                            f"{self.max_length}; keep the newest {self.max_length} items")
        out = self.session.run([OUTPUT], {"history": np.ascontiguousarray(history),
                                          "mask": np.ascontiguousarray(mask)})
        return out[0]
