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
import itertools
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from transrec.config import Config, LoRAConfig, parse_override, set_key
from transrec.config.schema import monitor_metric
from transrec.engine.intervals import bootstrap_interval, leader, load_ranks, paired_interval, user_values
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


def _with_intervals(row: dict) -> dict:
    """Text cells of a row's intervals: the value [lo, hi], and its difference to the best row."""
    out = dict(row)
    for p in PROTOCOL_OF:
        key = f"{p}_ndcg@10"
        if f"{key}_lo" in row:
            out[f"{key}_ci"] = f"{row[key]:.4f} [{row[key + '_lo']:.4f}, {row[key + '_hi']:.4f}]"
            d, lo, hi = row[f"{key}_diff"], row[f"{key}_diff_lo"], row[f"{key}_diff_hi"]
            best = (d, lo, hi) == (0.0, 0.0, 0.0)
            out[f"{key}_diff_ci"] = "best" if best else f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
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
    if any("tuned" in r for r in rows):  # after the mode and its budget
        base.insert(2 if base[1][0] == "budget" else 1, ("tuned", "tuned"))
    cols = base + [(f"{PROTOCOLS[x]} {m}", f"{m.upper()} {PROTOCOLS[x]}")
                                  for x in extra for m in ("ndcg@10", "hr@10")]
    if any("masked_ndcg@10_lo" in r for r in rows):
        cols += [(f"{p}_ndcg@10_ci", f"NDCG@10 {PROTOCOLS[PROTOCOL_OF[p]]} [95% CI]") for p in PROTOCOL_OF]
        cols += [(f"{p}_ndcg@10_diff_ci", f"to best, {PROTOCOLS[PROTOCOL_OF[p]]} [95% CI]")
                 for p in PROTOCOL_OF]
    if any("seeds" in r for r in rows):
        cols.append(("test_ndcg@10_sd", "NDCG@10 sd over seeds"))
    head = [t for _, t in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in map(_with_intervals, map(_both_protocols, rows)):
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
    leaders = f"\n\n{leaders_line(rows)}" if any("masked_ndcg@10_tied" in r for r in rows) else ""
    (out / "compare.md").write_text((f"{title}\n\n" if title else "") + format_table(rows) + leaders
                                    + f"\n\n{note}\n")
    plot_comparison(rows, out / "compare.png", title=title)


def compare(pretrained, data, out, *, modes: Iterable[str] = ("scratch", "full", "lora"),
            id_baseline: bool = True,
            topk: int = 2, overrides: Iterable[str] = (), id_overrides: Iterable[str] = (),
            show: bool | None = None, budgets: Iterable[int] | None = None,
            tune: Iterable[tuple[str, list[str]]] = (), seeds: Iterable[int] | None = None,
            evaluations: int = 10) -> list[dict]:
    """Each mode (and the ID baseline) on the target; one row each, table files in ``out``. ``show`` as
    in :func:`run_transfer`; False also drops the line on stderr that starts each mode.

    ``budgets`` (optimizer steps, e.g. ``(30, 100, 300)``): every mode runs once per budget, each
    run with its own schedule (warm-up and decay fitted to its budget) in ``out/steps-N/<mode>``;
    the rows carry a ``budget`` column, and ``out/budget.{csv,md,png}`` hold test NDCG@10 against
    the budget per mode with the leaders at each budget (:func:`leaders_line`); each run validates
    ``evaluations`` times (unless the overrides set ``eval.every``).

    ``tune`` ((key, values) pairs): every mode runs every combination of the values at every budget
    and keeps the one with the best validation metric (``run.monitor``), averaged over seeds; its row
    names the choice (``tuned``) and reports that run's test metrics only. ``seeds``: every run is
    repeated with each ``run.seed``; a row's metrics are the means over seeds, with their standard
    deviation (``*_sd``). Every row gets bootstrap intervals over test users
    (:func:`add_intervals`)."""
    out = Path(out)
    todo = list(modes) + (["id"] if id_baseline else [])
    steps = sorted({int(b) for b in budgets}) if budgets else [None]
    if any(b is not None and b < 1 for b in steps):
        raise ConfigError(f"budgets must be positive step counts, got {list(budgets or [])}")
    tune = [(k, list(vs)) for k, vs in tune]
    grid = [dict(zip([k for k, _ in tune], combo)) for combo in itertools.product(*[vs for _, vs in tune])]
    seed_list = [int(x) for x in seeds] if seeds else [None]
    probe = transfer_config(pretrained, data, "scratch", out, overrides=overrides)
    monitor = "valid_" + (monitor_metric(probe) or "ndcg@10")
    rows = []
    for budget in steps:
        where = out if budget is None or len(steps) == 1 else out / f"steps-{budget}"
        for mode in todo:
            name = mode if mode != "id" else "id-sasrec"
            extra = list(overrides) + (list(id_overrides) if mode == "id" else [])
            if budget is not None:
                extra += _fitted_schedule(extra, budget, evaluations)
            candidates = []
            for setting in grid:
                runs = []
                for seed in seed_list:
                    folder = where / (name + _suffix(setting, seed, len(grid) > 1, len(seed_list) > 1))
                    if show is not False:
                        say(f"== {folder.name} on {data}" + (f", {budget} steps" if budget else ""))
                    chosen = [f"{k}={v}" for k, v in setting.items()]
                    chosen += [f"run.seed={seed}"] if seed is not None else []
                    runs.append(run_transfer(pretrained, data, mode, folder, topk=topk,
                                             overrides=extra + chosen, show=show))
                candidates.append((setting, runs))
            row = _chosen_row(candidates, monitor, tuned=bool(tune))
            if budget is not None:
                row["budget"] = budget
            rows.append(row)
    add_intervals(rows)
    write_comparison(rows, out, title=f"Transfer to {data} from {pretrained}")
    if len(steps) > 1:
        write_budget_curve(rows, out, title=f"Transfer to {data}: test NDCG@10 by budget")
    return rows


def _suffix(setting: dict, seed: int | None, tuned: bool, seeded: bool) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items()] if tuned else []
    parts += [f"seed={seed}"] if seeded else []
    return "".join(f"-{p}" for p in parts)


def _chosen_row(candidates: list[tuple[dict, list[dict]]], monitor: str, *, tuned: bool) -> dict:
    """The candidate with the best mean validation ``monitor`` (ties: the first), as one row: means
    over its seeds, the spread of the test metrics, the choice and what the others scored."""
    def score(c):
        vals = [r.get(monitor) for r in c[1]]
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else float("-inf")

    setting, runs = max(candidates, key=score)  # max keeps the first of equal scores
    row = dict(runs[0])
    if len(runs) > 1:
        for k in runs[0]:
            vals = [r.get(k) for r in runs]
            if k.startswith(("valid_", "test_")) and all(isinstance(v, (int, float)) for v in vals):
                mean = sum(vals) / len(vals)
                row[k] = round(mean, 5)
                if k.startswith("test_"):
                    row[f"{k}_sd"] = round(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)), 5)
        row["seeds"] = len(runs)
        row["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    row["runs"] = [r["run"] for r in runs]
    row["eval_steps"] = [r["eval_step"] for r in runs]
    if tuned:
        row["tuned"] = ", ".join(f"{k}={v}" for k, v in setting.items())
        row["tuning"] = [{"setting": ", ".join(f"{k}={v}" for k, v in s.items()),
                          monitor: round(score((s, rs)), 5)} for s, rs in candidates]
    return row


PROTOCOL_OF = {"masked": True, "ranked": False}  # interval key prefix -> eval.exclude_history


def _row_ranks(row: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each of the row's runs' kept test ranks (one run per seed)."""
    return [load_ranks(run, step)
            for run, step in zip(row.get("runs", [row["run"]]), row.get("eval_steps", [row["eval_step"]]))]


def _user_values(kept: list[tuple[np.ndarray, np.ndarray]], metric: str,
                 protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, per-user ``metric`` under ``protocol`` averaged over the runs of :func:`_row_ranks`)."""
    users, values = None, []
    for u, ranks in kept:
        v = user_values(ranks, metric, protocol)
        if users is None:
            users = u
        elif not np.array_equal(users, u):  # the same target split: the same users
            common, ia, ib = np.intersect1d(users, u, assume_unique=True, return_indices=True)
            users, values, v = common, [x[ia] for x in values], v[ib]
        values.append(v)
    return users, np.mean(values, axis=0)


def mode_difference(rows: list[dict], a: str, b: str, *, budget=None, protocol: str = "masked",
                    metric: str = "ndcg@10") -> tuple[float, float, float]:
    """(mean, 95 % interval low, high) of mode ``a`` minus mode ``b`` in test ``metric`` over the
    users both ranked, paired (rows of ``budget``)."""
    pick = {r["mode"]: r for r in rows if r.get("budget") == budget}
    ua, va = _user_values(_row_ranks(pick[a]), metric, protocol)
    ub, vb = _user_values(_row_ranks(pick[b]), metric, protocol)
    return paired_interval(ua, va, ub, vb)


def add_intervals(rows: list[dict], metrics=("ndcg@10", "hr@10")) -> None:
    """Bootstrap intervals over test users for each row (``masked_ndcg@10_lo`` / ``_hi`` and the same
    for ``ranked_`` and HR@10), and each row's paired difference to the best row of its budget
    (``masked_ndcg@10_diff`` / ``_diff_lo`` / ``_diff_hi``), both protocols."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("budget"), []).append(r)
    for group in groups.values():
        kept = {id(r): _row_ranks(r) for r in group}  # read once, used for every metric and protocol
        for protocol in PROTOCOL_OF:
            for metric in metrics:
                entries = []
                for r in group:
                    users, vals = _user_values(kept[id(r)], metric, protocol)
                    lo, hi = bootstrap_interval(vals)
                    key = f"{protocol}_{metric}"
                    r[key], r[f"{key}_lo"], r[f"{key}_hi"] = (round(float(vals.mean()), 5), round(lo, 5),
                                                               round(hi, 5))
                    entries.append((r["mode"], users, vals))
                _, tied, diffs = leader(entries)
                for r in group:
                    d, lo, hi = diffs[r["mode"]]
                    key = f"{protocol}_{metric}"
                    r[f"{key}_diff"], r[f"{key}_diff_lo"], r[f"{key}_diff_hi"] = (round(d, 5), round(lo, 5),
                                                                               round(hi, 5))
                    r[f"{key}_tied"] = r["mode"] in tied


def _fitted_schedule(overrides: list[str], budget: int, evaluations: int = 10) -> list[str]:
    """``optim.steps`` = the budget, and unless the overrides set them, the warm-up (a tenth of the
    budget) and the validation interval (``evaluations`` per run) scaled to it, at least one step."""
    keys = {parse_override(o)[0] for o in overrides}
    out = [f"optim.steps={budget}"]
    if "optim.warmup_steps" not in keys:
        out.append(f"optim.warmup_steps={max(budget // 10, 1)}")
    if "eval.every" not in keys:
        out.append(f"eval.every={max(budget // max(int(evaluations), 1), 1)}")
    return out


def budget_leaders(rows: list[dict], protocol: str = "masked",
                   metric: str = "ndcg@10") -> list[tuple[int | None, str | None, list[str]]]:
    """(budget, the mode that leads beyond noise or None, the modes tied with the best) for each
    budget of ``rows`` (rows without a budget: one group, budget None), from :func:`add_intervals`'s
    paired intervals: the best leads only when its interval against the runner-up excludes zero."""
    out = []
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("budget"), []).append(r)
    for b in sorted(groups, key=lambda x: (x is None, x or 0)):
        group = groups[b]
        key = f"{protocol}_{metric}"
        tied = [r["mode"] for r in sorted(group, key=lambda r: -r[key]) if r[f"{key}_tied"]]
        lead = tied[0] if len(tied) == 1 else None
        out.append((b, lead, tied))
    return out


def leaders_line(rows: list[dict], metric: str = "ndcg@10") -> str:
    """Two lines, one per protocol: at each budget the mode that leads test ``metric`` beyond noise
    (95 % paired bootstrap interval of its difference to the runner-up excluding zero), or the
    modes that tie within noise ("alone" for a budget that ran one mode: it leads nothing)."""
    lines = []
    for protocol, name in (("masked", "history masked"), ("ranked", "history ranked")):
        parts = []
        for b, lead, tied in budget_leaders(rows, protocol, metric):
            at = f"{b} steps: " if b is not None else ""
            alone = sum(r.get("budget") == b for r in rows) == 1  # nothing to lead
            parts.append(f"{at}{tied[0]} alone" if alone and tied else f"{at}{lead} leads" if lead
                         else f"{at}tie within noise: {', '.join(tied)}")
        lines.append(f"test {metric.upper()}, {name}: " + "; ".join(parts))
    return "\n".join(lines)


def budget_table(rows: list[dict], metric: str = "test_ndcg@10") -> str:
    """A markdown table: one row per mode, one column per budget, ``metric`` (in brackets the best
    step and, for a tuned comparison, the chosen values)."""
    budgets = sorted({r["budget"] for r in rows if "budget" in r})
    modes = list(dict.fromkeys(r["mode"] for r in rows if "budget" in r))
    cell = {(r["mode"], r["budget"]): r for r in rows if "budget" in r}
    split, _, key = metric.partition("_")
    name = f"{split} {key.upper()}"
    tuned = next((r["tuned"] for r in rows if r.get("tuned")), "")
    keys = ", ".join(x.split("=", 1)[0] for x in tuned.split(", ")) if tuned else ""
    what = f"best step; {keys}" if keys else "best step"
    lines = ["| mode | " + " | ".join(f"{name} at {b} steps ({what})" for b in budgets) + " |",
             "|---|" + "|".join("---" for _ in budgets) + "|"]
    for m in modes:
        vals = []
        for b in budgets:
            r = cell.get((m, b))
            if r is None:
                vals.append("")
                continue
            note = str(r.get("eval_step", ""))
            if r.get("tuned"):
                note += "; " + ", ".join(x.split("=", 1)[1] for x in r["tuned"].split(", "))
            vals.append(f"{r.get(metric, float('nan')):.4f} ({note})")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_budget_curve(rows: list[dict], out: str | Path, title: str = "") -> None:
    """``budget.csv`` (mode, budget, best step, test/valid metrics), ``budget.md`` (the table and
    the leaders line) and ``budget.png`` (test NDCG@10 against the budget, one line per mode)."""
    out = Path(out)
    cols = ["mode", "budget", "tuned", "eval_step", "test_ndcg@10", "test_hr@10", "test_mrr", "valid_ndcg@10",
            *[f"{p}_{m}{x}" for p in PROTOCOL_OF for m in ("ndcg@10", "hr@10")
              for x in ("", "_lo", "_hi", "_diff", "_diff_lo", "_diff_hi")],
            "test_ndcg@10_sd", "seeds", "seconds", "run"]
    with open(out / "budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows([r for r in rows if "budget" in r])
    (out / "budget.md").write_text((f"{title}\n\n" if title else "") + budget_table(rows) + "\n\n"
                                   + leaders_line(rows) + "\n")
    plot_budget(rows, out / "budget.png", title=title)
