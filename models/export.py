"""A model on disk: the export folder every path that saves or loads a trained model goes through.

    model.safetensors   full fp32 weights (plain names), or the trained tensors only (kind "adapter")
    config.yaml         the whole run config (its ``model`` section rebuilds the module)
    export.json         format, kind ("full" | "adapter"), base export (adapter), step, source run

``SequentialRecommender.from_export(path)`` builds the model an export describes and loads it;
``model.load_export(path)`` loads one into a model built otherwise (adapters added, another trainable
set); ``model.save_export(path, ...)`` writes one. Only safetensors and YAML/JSON are read: nothing
is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transrec.config import Config, from_dict, load_yaml, save_yaml
from transrec.errors import ConfigError, UserError
from transrec.locking import pid_alive
from transrec.models.lora import load_base_weights
from transrec.storage import (
    check_space,
    guarded_write,
    replace_folder,
    temporary_beside,
)

EXPORT_FORMAT = 1
WEIGHTS = "model.safetensors"
META = "export.json"


def read_export(path: str | Path) -> dict:
    """The export's metadata (``export.json``); one line naming the problem if it is not one."""
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"{p}: not an export folder (needs {META} and {WEIGHTS}; "
                        "make one with `transrec export --run RUN --out EXPORT`)")
    meta = json.loads((p / META).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{p / META}: export format {meta.get('format')!r}, "
                        f"this transrec reads {EXPORT_FORMAT}")
    return meta


def start_from_export(model: torch.nn.Module, path: str | Path, item_ids: list[str]) -> None:
    """Start a run's ``model`` from an export's weights. Per-item vectors belong to the export's
    catalogue: on the same catalogue (``item_ids``, unsanitised) they carry on, on another (a
    transfer) they start at zero."""
    ids = read_export(path).get("item_ids")
    model.load_export(path, strict=False, catalogue=ids is not None and ids == list(item_ids))


def export_config(path: str | Path) -> Config:
    """The whole config an export was trained with."""
    return from_dict(load_yaml(Path(path) / "config.yaml"))


def load_export_into(model: torch.nn.Module, path: str | Path, *, strict: bool = True,
                     skip: tuple[str, ...] = ()) -> None:
    """Load an export into ``model`` (which may carry LoRA adapters the export lacks).

    A "full" export fills every non-adapter weight (strict: all must be present); an "adapter" export
    first loads its base export, then its own tensors (every one must exist in the model). Keys
    starting with one of ``skip`` are left as the model has them (e.g. the hybrid's per-item vectors,
    which belong to the export's catalogue, on another one).
    """
    meta = read_export(path)
    sd = load_file(str(Path(path) / WEIGHTS))
    if skip:
        sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    if meta["kind"] == "adapter":
        load_export_into(model, meta["base"], strict=strict, skip=skip)
        own = model.state_dict()
        unknown = [k for k in sd if k not in own]
        if unknown:
            raise ConfigError(f"{path}: adapter export does not fit the model (unexpected {unknown[:3]})")
        model.load_state_dict(sd, strict=False)
        return
    if meta.get("model_kind") == "id":
        own = model.state_dict()
        if "item_emb.weight" in own and own["item_emb.weight"].shape != sd.get("item_emb.weight", own[
                "item_emb.weight"]).shape:
            raise ConfigError(f"{path}: an ID model's item table does not transfer to another catalogue")
    load_base_weights(model, sd, strict=strict, skip=skip)


def check_export_target(out: str | Path, *, overwrite: bool = False,
                        protect: dict[str, str | Path] | None = None) -> None:
    """UserError (one line) unless ``out`` may receive an export: a new or empty folder, or an earlier
    export; any other folder only with ``overwrite``; never a file, a run folder, a dataset folder or
    a folder holding one of ``protect`` ({what: path}, e.g. the run and data folders of the export)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pass a folder to --out")
    where = out.resolve()
    filled = out.is_dir() and any(out.iterdir())
    for what, p in (protect or {}).items():
        if not p:
            continue
        pr = Path(p).resolve()
        inside = pr in where.parents and filled and not (out / META).is_file()  # e.g. RUN/checkpoints
        if where == pr or where in pr.parents or inside:
            raise UserError(f"{out}: refused: it is, holds or lies in the {what} {p}; pick another --out")
    if not filled:
        return
    if (out / "checkpoints").is_dir() or (out / "manifest.json").is_file():
        raise UserError(f"{out}: refused: it holds a run or a dataset; pick another --out")
    if not (out / META).is_file() and not overwrite:
        raise UserError(f"{out}: exists, is not empty and is not an export; pick another --out "
                        "(or pass --overwrite to replace it)")


def _remove_dead_temporaries(out: Path) -> None:
    """Remove the ``.NAME.tmp-PID`` folders beside ``out`` whose writer (PID, on this host) is no
    longer running: what a killed export left."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and tmp.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def write_export(out: str | Path, tensors: dict[str, torch.Tensor], cfg: Config, meta: dict, *,
                 overwrite: bool = False, protect: dict[str, str | Path] | None = None) -> Path:
    """Write an export folder: built beside ``out`` under a temporary name, then renamed into place,
    so a killed write never leaves a half export under ``out``. What ``out`` may be:
    :func:`check_export_target`; an earlier export there is replaced only once the new one is whole.
    Too little free space for the weights stops before writing; a write that fails (a full disk, a
    quota) removes the temporary and raises :class:`~transrec.storage.WriteFailed` (one line, exit 74),
    the earlier export untouched."""
    check_export_target(out, overwrite=overwrite, protect=protect)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"export refused: {len(bad)} weight tensors hold NaN or inf (first {bad[0]}): "
                        "the run diverged; export an earlier checkpoint or retrain with a lower optim.lr")
    out = Path(out)
    what, basis = "writing the export", "its weights' size"
    needed = sum(int(t.nbytes) for t in tensors.values()) + 64 * 1024  # + safetensors header, config
    check_space(what, out, needed, basis=basis)
    _remove_dead_temporaries(out)
    tmp = temporary_beside(what, out, needed=needed, basis=basis, noun="the export")
    with guarded_write(what, out, tmp, needed=needed, basis=basis):
        save_file(tensors, str(tmp / WEIGHTS))
        save_yaml(cfg, tmp / "config.yaml")
        (tmp / META).write_text(json.dumps({"format": EXPORT_FORMAT, **meta}, indent=1))
    replace_folder(tmp, out)  # the previous export stays whole until the new one is in place
    return out
