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
from transrec.engine.plot import plot_budget, plot_comparison
from transrec.engine.ranking import protocol_prefix
from transrec.engine.tracking import say
from transrec.engine.trainer import Trainer
from transrec.errors import ConfigError
from transrec.models.export import export_config, read_export

MODES = ("scratch", "full", "topk", "lora")


# The target recipe of every mode, the ID baseline's included (the overrides come after it, so any
# key can be set back). A target is small: the demo's has 300 users, so a step of 64 sequences is a
# fifth of an epoch and 1,000 steps are 200 epochs. Two settings keep a run from memorising it:
# - the user encoder trains at every position of a target sequence (causal), not at the last one
#   only; trained at the last position, pretrained runs fitted their few targets within a few dozen
#   steps and then declined;
# - the user encoder's dropout is 0.5 (SASRec's for sparse data), not the pretraining presets' 0.1.
# The ID model's user encoder is causal in any case; the dropout applies to it too, so the baseline
# gets the same regularisation. docs/transfer.md has the measurements.
TARGET_RECIPE = {"model.user.kind": "causal", "model.user.dropout": 0.5}


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
    for key, value in TARGET_RECIPE.items():
        set_key(cfg, key, value)
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
    (prefixed, see :func:`transrec.engine.ranking.protocol_prefix`)."""
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
    base = list(TABLE_COLUMNS)
    if any("budget" in r for r in rows):  # a budget curve: which budget each row trained with
        base.insert(1, ("budget", "budget"))
    cols = base + [(f"{PROTOCOLS[x]} {m}", f"{m.upper()} {PROTOCOLS[x]}")
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
            show: bool | None = None, budgets: Iterable[int] | None = None) -> list[dict]:
    """Each mode (and the ID baseline) on the target; one row each, table files in ``out``. ``show`` as
    in :func:`run_transfer`; False also drops the line on stderr that starts each mode.

    ``budgets`` (optimizer steps, e.g. ``(30, 100, 300)``): every mode runs once per budget, each
    run with its own schedule (warm-up and decay fitted to its budget) in ``out/steps-N/<mode>``;
    the rows carry a ``budget`` column, and ``out/budget.{csv,md,png}`` hold test NDCG@10 against
    the budget per mode with the leader at each budget (:func:`budget_leaders`)."""
    out = Path(out)
    todo = list(modes) + (["id"] if id_baseline else [])
    steps = sorted({int(b) for b in budgets}) if budgets else [None]
    if any(b is not None and b < 1 for b in steps):
        raise ConfigError(f"budgets must be positive step counts, got {list(budgets or [])}")
    rows = []
    for budget in steps:
        where = out if budget is None or len(steps) == 1 else out / f"steps-{budget}"
        for mode in todo:
            name = mode if mode != "id" else "id-sasrec"
            if show is not False:
                say(f"== {name} on {data}" + (f", {budget} steps" if budget else ""))
            extra = list(overrides) + (list(id_overrides) if mode == "id" else [])
            if budget is not None:
                extra += _fitted_schedule(extra, budget)
            row = run_transfer(pretrained, data, mode, where / name, topk=topk, overrides=extra, show=show)
            if budget is not None:
                row["budget"] = budget
            rows.append(row)
    write_comparison(rows, out, title=f"Transfer to {data} from {pretrained}")
    if len(steps) > 1:
        write_budget_curve(rows, out, title=f"Transfer to {data}: test NDCG@10 by budget")
    return rows


def _fitted_schedule(overrides: list[str], budget: int) -> list[str]:
    """``optim.steps`` = the budget, and unless the overrides set them, the warm-up and the
    validation interval scaled to it (a tenth of the budget each, at least one step)."""
    keys = {parse_override(o)[0] for o in overrides}
    out = [f"optim.steps={budget}"]
    if "optim.warmup_steps" not in keys:
        out.append(f"optim.warmup_steps={max(budget // 10, 1)}")
    if "eval.every" not in keys:
        out.append(f"eval.every={max(budget // 10, 1)}")
    return out


def budget_leaders(rows: list[dict], metric: str = "test_ndcg@10") -> list[tuple[int, str, float]]:
    """(budget, leading mode, its value) for each budget of ``rows``, in budget order."""
    out = []
    for b in sorted({r["budget"] for r in rows if "budget" in r}):
        best = max((r for r in rows if r.get("budget") == b), key=lambda r: r.get(metric, float("-inf")))
        out.append((b, best["mode"], float(best.get(metric, float("nan")))))
    return out


def leaders_line(rows: list[dict]) -> str:
    """One line: which mode leads test NDCG@10 at each budget."""
    parts = [f"{b} steps: {m} ({v:.4f})" for b, m, v in budget_leaders(rows)]
    return "best test NDCG@10 by budget: " + "; ".join(parts)


def budget_table(rows: list[dict], metric: str = "test_ndcg@10") -> str:
    """A markdown table: one row per mode, one column per budget, ``metric`` (best step in brackets)."""
    budgets = sorted({r["budget"] for r in rows if "budget" in r})
    modes = list(dict.fromkeys(r["mode"] for r in rows if "budget" in r))
    cell = {(r["mode"], r["budget"]): r for r in rows if "budget" in r}
    split, _, key = metric.partition("_")
    name = f"{split} {key.upper()}"
    lines = ["| mode | " + " | ".join(f"{name} at {b} steps (best step)" for b in budgets) + " |",
             "|---|" + "|".join("---" for _ in budgets) + "|"]
    for m in modes:
        vals = []
        for b in budgets:
            r = cell.get((m, b))
            vals.append("" if r is None else f"{r.get(metric, float('nan')):.4f} ({r.get('eval_step', '')})")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_budget_curve(rows: list[dict], out: str | Path, title: str = "") -> None:
    """``budget.csv`` (mode, budget, best step, test/valid metrics), ``budget.md`` (the table and
    the leaders line) and ``budget.png`` (test NDCG@10 against the budget, one line per mode)."""
    out = Path(out)
    cols = ["mode", "budget", "eval_step", "test_ndcg@10", "test_hr@10", "test_mrr", "valid_ndcg@10",
            "seconds", "run"]
    with open(out / "budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows([r for r in rows if "budget" in r])
    (out / "budget.md").write_text((f"{title}\n\n" if title else "") + budget_table(rows) + "\n\n"
                                   + leaders_line(rows) + "\n")
    plot_budget(rows, out / "budget.png", title=title)
