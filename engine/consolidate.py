"""Export a run's checkpoint as a model folder (:mod:`transrec.models.export`), and load a run's
trained model without DeepSpeed.

Any ZeRO stage: the checkpoint's partitions are consolidated in one process, on the CPU, with no
process group (``deepspeed.utils.zero_to_fp32`` for stages 1-3 and bf16; the model-states file for
fp32 stage 0), every file scanned and loaded weights-only
(:func:`~transrec.engine.checkpoint.check_no_pickle`). A LoRA run that started from an export
writes its adapter and the other trained tensors only (kind "adapter", a few percent of the
model) and names that export as its base; ``--full`` merges the adapters into the base weights instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from transrec.config import Config, from_dict, load_yaml
from transrec.engine.checkpoint import CheckpointError, CheckpointManager, check_no_pickle, weights_only_loads
from transrec.errors import UserError
from transrec.models import SequentialRecommender, build_model
from transrec.models.export import check_export_target
from transrec.models.lora import has_lora, merge_lora
from transrec.shards.dataset import Dataset
from transrec.shards.format import unsanitize_key


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
    check_no_pickle(folder)
    zero_files = list(folder.glob("*zero_pp_rank_*optim_states.pt"))
    with weights_only_loads(folder):
        if zero_files:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ck.dir), tag=tag)
            states = folder / "mp_rank_00_model_states.pt"
            if states.is_file():
                # ZeRO-1 records no frozen parameters for zero_to_fp32 (ZeRO-2 does); its model-states
                # file holds the whole module, frozen weights included (ZeRO-3 writes partitions instead).
                module = torch.load(states, map_location="cpu", weights_only=True)["module"]
                sd.update({k: v for k, v in module.items() if k not in sd})
        else:
            states = folder / "mp_rank_00_model_states.pt"
            if not states.is_file():
                raise CheckpointError(f"{folder}: no model states file to export from")
            sd = torch.load(states, map_location="cpu", weights_only=True)["module"]
    sd = {k.removeprefix("module."): v.detach().float().cpu().contiguous() if v.is_floating_point()
          else v.detach().cpu().contiguous() for k, v in sd.items()}
    return sd, man


def load_run(run_dir: str | Path, tag: str | None = None) -> tuple[Config, SequentialRecommender, dict]:
    """(config, model holding the checkpoint's weights, checkpoint manifest) of a run folder: the
    latest complete checkpoint, or ``tag``. Every module weight must be in the checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = from_dict(load_yaml(run_dir / "config.yaml"))
    sd, man = consolidated_state_dict(run_dir, tag)
    model = build_model(cfg.model, n_items=man.get("n_items"))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{run_dir}: checkpoint does not fit its config.yaml (missing {missing[:3]})")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return cfg, model, man


def catalogue_ids(data: str | Path, n_items: int) -> list[str]:
    """The item ids of the dataset a hybrid model trained on (its per-item vectors' rows);
    UserError when the dataset is gone or holds another number of items."""
    try:
        ds = Dataset.open(data)
    except (OSError, UserError) as exc:
        raise UserError(f"the model's per-item vectors (model.item.id_residual) are exported with the ids "
                        f"of the items they belong to, read from its dataset {data}: {exc}") from None
    if ds.n_items != n_items:
        raise UserError(f"{data}: {ds.n_items} items, but the model's per-item vectors are {n_items}; "
                        "export with the dataset the run trained on")
    return [unsanitize_key(k) for k in ds.item_ids]


def export_run(run_dir: str | Path, out: str | Path, *, full: bool = False, tag: str | None = None,
               overwrite: bool = False, step: str | int | None = None) -> Path:
    """Write an export folder for ``run_dir`` (see :mod:`transrec.models.export`); returns ``out``.
    The checkpoint: ``tag``, else ``step`` (``last``, ``best`` or a step number), else the best one
    when the run has one (``run.monitor``), else the latest.
    ``out`` is never the run folder, its dataset or a folder holding them; a non-empty folder that is
    not an earlier export is replaced only with ``overwrite``."""
    protect = {"run folder": run_dir}
    if (Path(run_dir) / "config.yaml").is_file():
        protect["dataset folder"] = load_yaml(Path(run_dir) / "config.yaml").get("data", {}).get("path", "")
    check_export_target(out, overwrite=overwrite, protect=protect)
    if tag is None:
        if not (Path(run_dir) / "config.yaml").is_file():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
        tag = CheckpointManager(run_dir).resolve(step)
    cfg, model, man = load_run(run_dir, tag)
    meta = {"kind": "full", "step": man["client"]["step"], "source_run": str(run_dir),
            "n_items": man.get("n_items"), "zero_stage": man["zero_stage"]}
    if getattr(model, "item_residual", None) is not None:  # the hybrid: whose items its vectors are
        meta["item_ids"] = catalogue_ids(cfg.data.path, int(model.item_residual.weight.shape[0]))
    tensors = None  # every weight of the model
    lora = has_lora(model)
    if lora and cfg.run.init_from and not full:
        tensors = {n: p.detach().float().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        meta.update(kind="adapter", base=str(Path(cfg.run.init_from).resolve()))
    else:
        if lora:
            merge_lora(model)
            cfg.model.text.lora = cfg.model.image.lora = None
        cfg.run.init_from = ""
    return model.save_export(out, cfg, meta, tensors=tensors, overwrite=overwrite, protect=protect)
