"""Export consolidated weights from a run's checkpoint to safetensors, and load them back.

An export folder::

    model.safetensors   full fp32 weights (plain names), or the trained tensors only for LoRA
    config.yaml         the run's whole config (its ``model`` section rebuilds the module)
    export.json         format, kind ("full" | "adapter"), base export (adapter), step, source run

Any ZeRO stage: the checkpoint's partitions are consolidated in one process, on the CPU, with no
process group (``deepspeed.utils.zero_to_fp32`` for stages 1-3 and bf16; the model-states file for
fp32 stage 0). A LoRA run that started from an export writes its adapter and the other trained
tensors only (kind "adapter", a few percent of the model) and names that export as its base;
``--full`` merges the adapters into the base weights instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transrec.engine.checkpoint import CheckpointError, CheckpointManager

from transrec.errors import ConfigError, UserError

EXPORT_FORMAT = 1
WEIGHTS = "model.safetensors"
META = "export.json"


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None) -> tuple[dict, dict]:
    """(fp32 state dict with plain module names, checkpoint manifest) of the run's latest checkpoint."""
    ck = CheckpointManager(run_dir)
    tag = tag or ck.latest()
    if tag is None:
        raise CheckpointError(f"{Path(run_dir)}: no complete checkpoint to export "
                              f"(train first: `transrec train --data DIR --out {run_dir}`)")
    ck._verify(tag)
    man = ck.manifest(tag)
    folder = ck.dir / tag
    zero_files = list(folder.glob("*zero_pp_rank_*optim_states.pt"))
    if zero_files:
        import logging

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ck.dir), tag=tag)
    else:
        states = folder / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{folder}: no model states file to export from")
        sd = torch.load(states, map_location="cpu", weights_only=True)["module"]
    sd = {k.removeprefix("module."): v.detach().float().cpu().contiguous() if v.is_floating_point()
          else v.detach().cpu().contiguous() for k, v in sd.items()}
    return sd, man


def export_run(run_dir: str | Path, out: str | Path, *, full: bool = False, tag: str | None = None) -> Path:
    """Write an export folder for ``run_dir`` (see the module docstring); returns ``out``."""
    from safetensors.torch import save_file
    from transrec.models import build_model
    from transrec.models.lora import has_lora, merge_lora

    from transrec.config import from_dict, load_yaml, save_yaml

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = from_dict(load_yaml(run_dir / "config.yaml"))
    sd, man = consolidated_state_dict(run_dir, tag)
    model = build_model(cfg.model, n_items=man.get("n_items"))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{run_dir}: checkpoint does not fit its config.yaml (missing {missing[:3]})")
    meta = {"format": EXPORT_FORMAT, "kind": "full", "step": man["client"]["step"],
            "source_run": str(run_dir),
            "model_kind": cfg.model.kind, "n_items": man.get("n_items"), "zero_stage": man["zero_stage"]}
    lora = has_lora(model)
    if lora and cfg.run.init_from and not full:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v for k, v in sd.items() if k in trained}
        meta.update(kind="adapter", base=str(Path(cfg.run.init_from).resolve()))
    else:
        if lora:
            model.load_state_dict({k: sd[k] for k in own}, strict=True)
            merge_lora(model)
            tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v
                       for k, v in model.state_dict().items()}
            cfg.model.text.lora = cfg.model.image.lora = None
        else:
            tensors = {k: sd[k] for k in own}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(tensors, str(out / WEIGHTS))
    cfg.run.init_from = "" if meta["kind"] == "full" else cfg.run.init_from
    save_yaml(cfg, out / "config.yaml")
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def read_export(path: str | Path) -> dict:
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"{p}: not an export folder (needs {META} and {WEIGHTS}; "
                        "make one with `transrec export --run RUN --out EXPORT`)")
    meta = json.loads((p / META).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{p / META}: export format {meta.get('format')!r}, "
                        f"this transrec reads {EXPORT_FORMAT}")
    return meta


def export_config(path: str | Path):
    """The whole config an export was trained with."""
    from transrec.config import from_dict, load_yaml

    return from_dict(load_yaml(Path(path) / "config.yaml"))


def load_export_into(model: torch.nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load an export into ``model`` (which may carry LoRA adapters the export lacks).

    A "full" export fills every non-adapter weight (strict: all must be present); an "adapter" export
    first loads its base export, then its own tensors (every one must exist in the model).
    """
    from safetensors.torch import load_file
    from transrec.models.lora import load_base_weights

    meta = read_export(path)
    sd = load_file(str(Path(path) / WEIGHTS))
    if meta["kind"] == "adapter":
        load_export_into(model, meta["base"], strict=strict)
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
    load_base_weights(model, sd, strict=strict)
