"""PNG curves of runs (``transrec plot RUN ...``) and bar charts of transfer comparisons."""

from __future__ import annotations

from pathlib import Path

import yaml

from transrec.engine.tracking import read_metrics
from transrec.errors import UserError


def _plt():
    import matplotlib  # lazy: only plotting pays for matplotlib

    matplotlib.use("Agg")  # no display: the backend is chosen before pyplot loads
    import matplotlib.pyplot as plt  # lazy: after the backend

    return plt


def run_label(run: str | Path) -> str:
    """A legend entry that tells runs apart: the folder's last two path parts, then what was trained
    (the ID model, LoRA, a start from an export, else the preset) from its config.yaml."""
    run = Path(run)
    tail = "/".join(run.resolve().parts[-2:])
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        return tail
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    model, run_cfg = cfg.get("model") or {}, cfg.get("run") or {}
    if model.get("kind") == "id":
        what = "id"
    elif (model.get("text") or {}).get("lora") or (model.get("image") or {}).get("lora"):
        what = "lora"
    elif run_cfg.get("init_from"):
        what = "from " + Path(run_cfg["init_from"]).name
    else:
        what = cfg.get("preset") or "transrec"
    return f"{tail} ({what})"


def validation_note(points: dict[str, int]) -> str | None:
    """What the validation panel says instead of dots when no run has a curve (two or more points)."""
    if any(n >= 2 for n in points.values()):
        return None
    return ("no validation curve: each run has at most one validation evaluation\n"
            "(set eval.every to evaluate during training)")


def plot_runs(runs: list[str | Path], out: str | Path, metric: str = "ndcg@10") -> Path:
    """Training loss (left) and validation ``metric`` (right) against steps, one line per run."""
    plt = _plt()
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    any_data = False
    points: dict[str, int] = {}
    for run in runs:
        recs = read_metrics(run)
        if not recs:
            raise UserError(f"{run}: no metrics.jsonl (not a run folder, or nothing logged yet)")
        name = run_label(run)
        tr = [r for r in recs if r["kind"] == "train" and "loss" in r]
        if tr:
            ax_l.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
            any_data = True
        ev = [r for r in recs if r["kind"] == "eval" and r.get("split") == "valid" and metric in r]
        points[name] = len(ev)
        if len(ev) >= 2:
            ax_m.plot([r["step"] for r in ev], [r[metric] for r in ev], marker="o", label=name)
    if not any_data:
        raise UserError("no training records to plot")
    ax_l.set(xlabel="step", ylabel="training loss", title="loss")
    ax_m.set(xlabel="step", ylabel=f"valid {metric}", title=f"validation {metric}")
    note = validation_note(points)
    if note:
        ax_m.text(0.5, 0.5, note, ha="center", va="center", fontsize=9, transform=ax_m.transAxes)
    return _save(fig, out, (ax_l, ax_m))


def plot_comparison(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Grouped bars of test HR@10 / NDCG@10 / MRR per mode, plus each run's loss curve."""
    plt = _plt()
    fig, (ax_b, ax_l) = plt.subplots(1, 2, figsize=(12, 4.2))
    metrics = [("test_hr@10", "HR@10"), ("test_ndcg@10", "NDCG@10"), ("test_mrr", "MRR")]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(metrics))]
        vals = [r.get(k, 0.0) for k, _ in metrics]
        bars = ax_b.bar(xs, vals, width=width, label=r["mode"])
        for b, v in zip(bars, vals):
            ax_b.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        run = r.get("run")
        if run:
            tr = [x for x in read_metrics(run) if x["kind"] == "train"]
            if tr:
                ax_l.plot([x["step"] for x in tr], [x["loss"] for x in tr], label=r["mode"])
    ax_b.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], [n for _, n in metrics])
    ax_b.set(ylabel="test (full ranking)", title=title[:80] or "transfer comparison")
    ax_b.legend(fontsize=8)
    ax_l.set(xlabel="step", ylabel="training loss", title="target training loss")
    return _save(fig, out, (ax_l,))


def _interval_key(row: dict, metric: str) -> str:
    """Where a row keeps the interval of a test metric under its own protocol (masked_/ranked_)."""
    protocol = "masked" if row.get("exclude_history", True) else "ranked"
    return f"{protocol}_{metric.removeprefix('test_')}"


def plot_budget(rows: list[dict], out: str | Path, title: str = "", metric: str = "test_ndcg@10") -> Path:
    """``metric`` against the optimizer-step budget, one line per mode (rows with a ``budget``), with
    its 95 % bootstrap interval over test users as a band where the rows carry one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    modes = list(dict.fromkeys(r["mode"] for r in rows if "budget" in r))
    for m in modes:
        pts = sorted((r["budget"], r.get(metric, float("nan"))) for r in rows
                     if r.get("mode") == m and "budget" in r)
        line, = ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=m)
        band = sorted((r["budget"], r[f"{_interval_key(r, metric)}_lo"], r[f"{_interval_key(r, metric)}_hi"])
                      for r in rows if r.get("mode") == m and "budget" in r
                      and f"{_interval_key(r, metric)}_lo" in r)
        if band:  # the 95 % bootstrap interval over test users
            ax.fill_between([b for b, _, _ in band], [lo for _, lo, _ in band], [hi for _, _, hi in band],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in rows if "budget" in r})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set(xlabel="optimizer steps on the target (log scale)", ylabel=metric.replace("_", " "),
           title=title[:80] or "budget curve")
    return _save(fig, out, (ax,))


def _save(fig, out: str | Path, grid_axes) -> Path:
    """A grid and (where there are labelled lines) a legend on ``grid_axes``, then the PNG at ``out``."""
    for ax in grid_axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out
