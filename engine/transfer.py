"""Transfer a pretrained TransRec to a target dataset, and compare transfer modes on one target.

Modes (``transrec transfer --mode``):

- ``scratch``: the export's architecture and trainable set, random initialisation (the control);
- ``full``:    start from the export, fine-tune every weight the pretraining trained (its
               ``trainable`` setting; add ``model.text.trainable=all`` to unfreeze a frozen stem);
- ``topk``:    start from the export, fine-tune the top-k blocks of each item encoder (``--topk``,
               the paper trains the top 2) and everything above them;
- ``lora``:    start from the export, freeze the encoder backbones, train LoRA adapters in every
               block plus projections and the user encoder; its export holds those tensors only.

``compare`` runs several modes and the ID-based SASRec baseline (item embeddings cannot transfer to
a catalogue with other items, so it always starts from scratch) with the same optimisation settings,
evaluates each on the target's validation and test splits (at the run's best step by ``run.monitor``,
named in the ``eval_step`` column), prints one table and writes
``compare.json``, ``compare.csv``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import csv
import gc
import json
import time
from collections.abc import Iterable
from pathlib import Path

from transrec.config import Config, LoRAConfig, parse_override, set_key
from transrec.engine.evaluate import protocol_prefix
from transrec.engine.plot import plot_comparison
from transrec.engine.tracking import say
from transrec.engine.trainer import Trainer
from transrec.errors import ConfigError
from transrec.models.export import export_config, read_export

MODES = ("scratch", "full", "topk", "lora")


def transfer_config(pretrained: str | Path, data: str | Path, mode: str, out: str | Path, *, topk: int = 2,
                    overrides: Iterable[str] = ()) -> Config:
    """The target run's config: the export's config with the mode applied, then ``overrides``."""
    if mode not in MODES and mode != "id":
        raise ConfigError(f"transfer mode must be one of {', '.join(MODES)}, got {mode!r}")
    meta = read_export(pretrained)
    if meta.get("model_kind") == "id" and mode != "scratch":
        raise ConfigError(f"{pretrained}: an ID-based model does not transfer to other items; "
                          "pretrain a TransRec (model.kind=transrec)")
    cfg = export_config(pretrained)
    cfg.data.path = str(data)
    cfg.run.out = str(out)
    cfg.run.init_from = "" if mode in ("scratch", "id") else str(Path(pretrained).resolve())
    cfg.run.resume = True
    m = cfg.model
    m.text.lora = m.image.lora = None
    if mode == "topk":
        if topk < 0:
            raise ConfigError(f"--topk must be >= 0, got {topk}")
        m.text.trainable = m.image.trainable = int(topk)
    elif mode == "lora":
        m.text.trainable = m.image.trainable = "all"
        m.text.lora, m.image.lora = LoRAConfig(), LoRAConfig()
    if mode == "id":
        m.kind = "id"
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg


def run_transfer(pretrained, data, mode: str, out, *, topk: int = 2, overrides: Iterable[str] = (),
                 show: bool | None = None) -> dict:
    """Train one mode on the target; returns a row of the comparison table. ``show``: bars (True) or
    plain lines (False); None follows the config's ``run.progress``."""
    cfg = transfer_config(pretrained, data, mode, out, topk=topk, overrides=overrides)
    t0 = time.time()
    trainer = Trainer(cfg, show=show)
    try:
        trainable = sum(_numel(p) for p in trainer.engine.module.parameters() if p.requires_grad)
        res = trainer.fit()
    finally:
        trainer.close()
    row = {"mode": mode if mode != "id" else "id-sasrec", "trainable_params": trainable,
           "steps": res.step, "seconds": round(time.time() - t0, 1),
           "final_loss": round(res.losses[-1], 4) if res.losses else None}
    # the best step's metrics (run.monitor) when the run has them, else the last step's
    best = res.metrics.get("best", {})
    picked = best if "test" in best else res.metrics
    row["eval_step"] = best.get("step", res.step) if picked is best else res.step
    row["exclude_history"] = bool(cfg.eval.exclude_history)
    for split in ("valid", "test"):
        for k, v in picked.get(split, {}).items():
            if k != "users":
                row[f"{split}_{k}"] = round(float(v), 5)
    row["run"] = str(out)
    del trainer
    gc.collect()
    return row


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitioned parameters report 0


TABLE_COLUMNS = (("mode", "mode"), ("trainable_params", "trainable"), ("seconds", "time s"),
                 ("eval_step", "step"),
                 ("test_hr@10", "HR@10"), ("test_ndcg@10", "NDCG@10"), ("test_hr@20", "HR@20"),
                 ("test_ndcg@20", "NDCG@20"), ("test_mrr", "MRR"), ("valid_ndcg@10", "val NDCG@10"))


PROTOCOLS = {True: "history masked", False: "history ranked"}  # eval.exclude_history true / false


def _both_protocols(row: dict) -> dict:
    """The row's test NDCG@10 / HR@10 under each protocol: its own (plain keys) and the other one
    (prefixed, see :func:`transrec.engine.evaluate.protocol_prefix`)."""
    own = bool(row.get("exclude_history", True))
    other = f"test_{protocol_prefix(not own)}"
    out = dict(row)
    for m in ("ndcg@10", "hr@10"):
        out[f"{PROTOCOLS[own]} {m}"] = row.get(f"test_{m}", "")
        out[f"{PROTOCOLS[not own]} {m}"] = row.get(f"{other}{m}", "")
    return out


def format_table(rows: list[dict]) -> str:
    """A markdown table of the comparison (test metrics unless marked 'val', at the step named):
    each run's own protocol in the main columns, then test NDCG@10 / HR@10 under the protocol the
    main columns do not show (both protocols when the rows' own ones differ)."""
    own = {bool(r.get("exclude_history", True)) for r in rows}
    extra = [x for x in (True, False) if len(own) > 1 or x not in own]
    cols = list(TABLE_COLUMNS) + [(f"{PROTOCOLS[x]} {m}", f"{m.upper()} {PROTOCOLS[x]}")
                                  for x in extra for m in ("ndcg@10", "hr@10")]
    head = [t for _, t in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in map(_both_protocols, rows):
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            if isinstance(v, float) and k != "seconds":
                v = f"{v:.4f}"
            elif k == "trainable_params" and isinstance(v, int):
                v = f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(rows: list[dict], out: str | Path, title: str = "") -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "mode", k))
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    protocols = {PROTOCOLS[bool(r.get("exclude_history", True))] for r in rows}
    note = (f"Main columns: test metrics under the runs' own protocol ({', '.join(sorted(protocols))}). "
            "History masked: the items a user already interacted with are removed from the ranking "
            "(eval.exclude_history=true); history ranked: they are ranked like any other item "
            "(eval.exclude_history=false, RecBole's protocol for sequential models).")
    (out / "compare.md").write_text((f"{title}\n\n" if title else "") + format_table(rows) + f"\n\n{note}\n")
    plot_comparison(rows, out / "compare.png", title=title)


def compare(pretrained, data, out, *, modes: Iterable[str] = ("scratch", "full", "lora"),
            id_baseline: bool = True,
            topk: int = 2, overrides: Iterable[str] = (), id_overrides: Iterable[str] = (),
            show: bool | None = None) -> list[dict]:
    """Each mode (and the ID baseline) on the target; one row each, table files in ``out``. ``show`` as
    in :func:`run_transfer`; False also drops the line on stderr that starts each mode."""
    out = Path(out)
    rows = []
    todo = list(modes) + (["id"] if id_baseline else [])
    for mode in todo:
        if show is not False:
            say(f"== {mode if mode != 'id' else 'id-sasrec'} on {data}")
        extra = list(overrides) + (list(id_overrides) if mode == "id" else [])
        rows.append(run_transfer(pretrained, data, mode, out / (mode if mode != "id" else "id-sasrec"),
                                 topk=topk, overrides=extra, show=show))
    write_comparison(rows, out, title=f"Transfer to {data} from {pretrained}")
    return rows
