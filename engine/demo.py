"""``transrec demo``: the whole story on a CPU in minutes.

1. synthesise a *source* and a *target* mixture-of-modality world (disjoint items and users, shared
   attribute semantics, half the items titles and half pictures);
2. pretrain a tiny TransRec (text + image item encoders, transformer user encoder) on the source;
3. export its consolidated weights;
4. on the scarce target, train scratch vs pretrained-full vs pretrained-LoRA TransRec and the
   ID-based SASRec at three budgets of optimizer steps (each run keeps its best step by validation),
   evaluate by full ranking, and print the table at the smallest budget, the budget curve (test
   NDCG@10 per mode and budget) and one line naming the leader at each budget.

Everything lands in ``--out`` (default ``demo_out``): ``data/``, ``pretrain/`` (a run folder),
``pretrained/`` (the export), ``target/steps-N/<mode>/`` (run folders per budget),
``target/compare.{md,csv,json,png}``, ``target/budget.{md,csv,png}``, ``pretrain.png`` and ``demo.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transrec.config import preset_demo_cpu
from transrec.engine.consolidate import export_run
from transrec.engine.plot import plot_runs
from transrec.engine.tracking import say as log_line
from transrec.engine.trainer import Trainer
from transrec.engine.transfer import (
    budget_leaders,
    budget_table,
    compare,
    format_table,
    leaders_line,
    mode_difference,
)
from transrec.errors import UserError
from transrec.shards.synth import synthesize


@dataclass
class DemoSize:
    source_users: int
    source_items: int
    target_users: int
    target_items: int
    pretrain_steps: int
    target_budgets: tuple[int, ...]  # optimizer steps on the target: the first is the main table's
    batch_size: int
    target_batch_size: int
    dropouts: tuple[str, ...] = ("0.1", "0.5")  # the user encoder's dropout, tuned for every mode
    evaluations: int = 5  # validations per target run (the best step is picked among them)


SIZES = {
    # Sized for a 2-core CPU: a few minutes in all, pretrained > scratch on target NDCG@10.
    "full": DemoSize(source_users=2000, source_items=600, target_users=300, target_items=300,
                     pretrain_steps=120, target_budgets=(30, 100, 300), batch_size=64, target_batch_size=32),
    # The test suite's reduced demo: same code path, seconds.
    "reduced": DemoSize(source_users=160, source_items=80, target_users=80, target_items=60,
                        pretrain_steps=12, target_budgets=(6, 12), batch_size=16, target_batch_size=16),
}

_MADE = ("data", "pretrain", "pretrained", "target", "pretrain.png", "demo.json", "demo.md")


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").is_file() and not (out / "data").is_dir():
            raise UserError(f"{out}: exists and is not a demo folder; pass another --out")
        for name in _MADE:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out: str | Path = "demo_out", *, seed: int = 0, size: str = "full", show: bool = True,
             progress: str = "auto") -> dict:
    """``show``: the narration and the final table (False: silent); ``progress``: ``run.progress`` of
    every training (bars, or plain lines on stderr)."""
    if size not in SIZES:
        raise UserError(f"demo size must be one of {', '.join(SIZES)}, got {size!r}")
    sz = SIZES[size]
    out = Path(out)
    t0 = time.time()
    _prepare(out)

    def say(msg: str) -> None:
        if show:
            log_line(f"[{time.time() - t0:6.1f}s] {msg}")

    say(f"synthesising source ({sz.source_users} users, {sz.source_items} items) and target "
        f"({sz.target_users} users, {sz.target_items} items) worlds, seed {seed}")
    src = synthesize(out / "data" / "source", domain="source", n_users=sz.source_users,
                     n_items=sz.source_items, seed=seed)
    tgt = synthesize(out / "data" / "target", domain="target", n_users=sz.target_users,
                     n_items=sz.target_items, seed=seed)

    cfg = preset_demo_cpu()
    cfg.data.path, cfg.run.out, cfg.run.seed = str(src), str(out / "pretrain"), seed
    cfg.data.batch_size = sz.batch_size
    cfg.optim.steps = sz.pretrain_steps
    cfg.optim.warmup_steps = max(sz.pretrain_steps // 10, 1)
    cfg.run.log_every = max(sz.pretrain_steps // 12, 1)
    cfg.eval.every = max(sz.pretrain_steps // 2, 1) if size == "full" else 0
    cfg.run.progress = progress if show else "off"
    say(f"pretraining TransRec on the source: {sz.pretrain_steps} steps of {sz.batch_size} sequences")
    trainer = Trainer(cfg)
    try:
        pre = trainer.fit()
    finally:
        trainer.close()
    say(f"source test NDCG@10 {pre.metrics['test']['ndcg@10']:.4f}; exporting weights")
    export = export_run(out / "pretrain", out / "pretrained")

    target_overrides = [f"data.batch_size={sz.target_batch_size}", f"run.seed={seed}",
                        f"run.progress={cfg.run.progress}"]
    budgets = ", ".join(str(b) for b in sz.target_budgets)
    say(f"transfer to the target: scratch, pretrained full, pretrained LoRA, ID SASRec at {budgets} "
        f"steps each, each with the user dropout in {{{', '.join(sz.dropouts)}}} that validates best "
        f"(best step by validation)")
    all_rows = compare(export, tgt, out / "target", modes=("scratch", "full", "lora"), id_baseline=True,
                       overrides=target_overrides, id_overrides=["optim.lr=0.005"],
                       show=None if show else False, budgets=sz.target_budgets,
                       tune=[("model.user.dropout", list(sz.dropouts))], evaluations=sz.evaluations)
    first = sz.target_budgets[0]
    rows = [r for r in all_rows if r["budget"] == first]
    plot_runs([out / "pretrain"], out / "pretrain.png")
    elapsed = time.time() - t0
    table = format_table(all_rows)
    curve = budget_table(all_rows)
    leaders = leaders_line(all_rows)
    gain, lo, hi = mode_difference(all_rows, "full", "scratch", budget=first)
    gain_line = (f"pretrained (full) - scratch at {first} steps, test NDCG@10 (history masked): {gain:+.4f} "
                 f"[95% CI {lo:+.4f}, {hi:+.4f}]")
    summary = {"seconds": round(elapsed, 1), "seed": seed, "size": asdict(sz),
               "source_test": pre.metrics.get("test", {}), "rows": rows, "budget_rows": all_rows,
               "leaders": [{"budget": b, "protocol": p, "leader": lead, "tied": tied}
                           for p in ("masked", "ranked") for b, lead, tied in budget_leaders(all_rows, p)],
               "pretrained_minus_scratch_ndcg@10": round(gain, 5),
               "pretrained_minus_scratch_ndcg@10_ci": [round(lo, 5), round(hi, 5)]}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    head = (f"Target test metrics at each budget (full ranking over all {sz.target_items} target items; "
            f"intervals: 95 % bootstrap over the {sz.target_users} target users):")
    (out / "demo.md").write_text(f"{head}\n\n{table}\n\n{gain_line}\n\nTest NDCG@10 by budget:\n\n{curve}"
                                 f"\n\n{leaders}\n\nelapsed {elapsed:.1f} s\n")
    if show:
        print()
        print(head)
        print(table)
        print(f"\n{gain_line}")
        print("\nTest NDCG@10 by budget (in brackets: each run's best step by validation, its dropout):")
        print(curve)
        print(leaders)
        print(f"plots: {out / 'target' / 'budget.png'}, {out / 'target' / 'compare.png'}, "
              f"{out / 'pretrain.png'}")
        print(f"elapsed: {elapsed:.1f} s")
    return summary
