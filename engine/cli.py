"""Engine subcommands: train, eval, export, transfer, compare, demo, plot, bench.

:func:`register` adds them to the ``transrec`` command line (:mod:`transrec.cli`, which imports this
module; nothing here imports it back)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from transrec.config import build_config
from transrec.errors import UserError

_RAW = argparse.RawDescriptionHelpFormatter
PROGRESS = ("auto", "on", "off")  # run.progress
ONNX_FILE = "user_encoder.onnx"  # transrec export --onnx, inside the export folder


def _add_config_args(p: argparse.ArgumentParser, preset_default: str | None = "tiny") -> None:
    p.add_argument("--preset", default=preset_default,
                   help="named preset: tiny, demo-cpu, small-gpu, base-gpu, sasrec, transrec-paper "
                        "(default: %(default)s)")
    p.add_argument("--config", metavar="FILE", help="YAML file applied on top of the preset")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. optim.lr=3e-4 deepspeed.zero_stage=2")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what counts.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("DEEPSPEED_LOG_LEVEL", "warning")


def _exit_code(run, run_dir=None):
    """``run()``; an error that carries its own exit code (a diverged run: 3, a failed write: 74) is
    printed as one line and returned as that code, others go up to the root's handler (exit 2). A
    run stopped by a signal (:class:`~transrec.engine.preempt.RunStopped`) prints its line once and
    returns 75. A collective that failed because a peer rank is gone prints one line naming it and
    ``run_dir``'s latest checkpoint, and returns 69 (:class:`~transrec.engine.preempt.PeerLost`)."""
    from transrec.engine.preempt import RunStopped  # lazy: fast --help

    try:
        return run()
    except RunStopped as exc:  # not an error: the line once (rank 0), the code on every rank
        from transrec.engine import distributed as D  # lazy: fast --help

        if D.is_main():
            print(f"transrec: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        print(f"transrec: error: {exc}", file=sys.stderr)
        return code
    except RuntimeError as exc:
        from transrec.engine import distributed as D  # lazy: fast --help
        from transrec.engine.preempt import PeerLost, peer_lost_line  # lazy: fast --help

        who = D.lost_peer(exc)
        if who is None:
            raise
        print(f"transrec: error: rank {D.rank()}: {peer_lost_line(who, run_dir)}", file=sys.stderr,
              flush=True)
        return PeerLost.exit_code


# ----------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from transrec.engine import distributed as D  # lazy: fast --help
    from transrec.engine.trainer import train  # lazy: fast --help

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.out:
        overrides.append(f"run.out={args.out}")
    cfg = build_config(args.preset, args.config, overrides)
    _quiet_deepspeed()
    res = _exit_code(lambda: train(cfg), cfg.run.out)
    if isinstance(res, int):
        return res
    if D.is_main():
        best = res.metrics.get("best", {})
        print(json.dumps({"run": str(res.run_dir), "step": res.step, **{
            f"{s}_{k}": round(v, 5) for s in ("valid", "test") for k, v in res.metrics.get(s, {}).items()
            if k != "users"}, **({"best_step": best["step"], **{
                f"best_{s}_{k}": round(v, 5) for s in ("valid", "test") for k, v in best.get(s, {}).items()
                if k != "users"}} if best else {})}))
    return 0


def cmd_eval(args) -> int:
    from transrec.engine.standalone import evaluate_run  # lazy: fast --help

    res = evaluate_run(args.run, data=args.data, splits=args.split, item_chunk=args.item_chunk,
                       progress=args.progress)
    print(json.dumps(res, indent=1))
    return 0


def cmd_export(args) -> int:
    from transrec.engine.consolidate import export_run  # lazy: fast --help
    from transrec.models.export import read_export  # lazy: fast --help

    out = export_run(args.run, args.out, full=args.full, overwrite=args.overwrite, step=args.step)
    meta = read_export(out)
    print(f"exported {meta['kind']} weights of {args.run} (step {meta['step']}) to {out}")
    if args.onnx:
        from transrec.inference.onnx_export import export_user_encoder  # lazy: onnx, on request only
        from transrec.models import SequentialRecommender  # lazy: fast --help
        from transrec.models.export import export_config  # lazy: fast --help

        side = export_user_encoder(SequentialRecommender.from_export(out), export_config(out),
                                   Path(out) / ONNX_FILE)
        print(f"user encoder as ONNX (opset {side['opset']}, {side['metric']} scoring, largest difference to "
              f"PyTorch {side['parity_max_abs_diff']:.1e}) written to {Path(out) / ONNX_FILE}")
    return 0


def cmd_transfer(args) -> int:
    _quiet_deepspeed()
    from transrec.engine import distributed as D  # lazy: fast --help
    from transrec.engine.transfer import format_table, run_transfer  # lazy: fast --help

    overrides = list(args.overrides)
    if args.steps:
        overrides.append(f"optim.steps={args.steps}")
    row = _exit_code(lambda: run_transfer(args.pretrained, args.data, args.mode, args.out, topk=args.topk,
                                          overrides=overrides), args.out)
    if isinstance(row, int):
        return row
    if D.is_main():
        print(format_table([row]))
    return 0


def cmd_compare(args) -> int:
    _quiet_deepspeed()
    from transrec.engine.transfer import (  # lazy: fast --help
        MODES,
        budget_table,
        compare,
        format_table,
        leaders_line,
    )

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--modes: unknown mode {bad[0]!r}; modes: {', '.join(MODES)}")
    overrides = list(args.overrides)
    try:
        budgets = [int(b) for b in str(args.steps or "").split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--steps: optimizer steps, one number or several (30,100,300), got "
                        f"{args.steps!r}") from None
    if any(b < 1 for b in budgets):
        raise UserError(f"--steps: budgets must be positive, got {args.steps!r}")
    if len(budgets) == 1:
        overrides.append(f"optim.steps={budgets[0]}")
    tune = []
    for text in args.tune:
        key, sep, values = text.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise UserError(f"--tune takes KEY=V1,V2,... (e.g. model.user.dropout=0.1,0.5), got {text!r}")
        tune.append((key.strip(), vals))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds: integers, e.g. 0,1,2, got {args.seeds!r}") from None
    rows = _exit_code(lambda: compare(args.pretrained, args.data, args.out, modes=modes,
                                      id_baseline=not args.no_id, topk=args.topk, overrides=overrides,
                                      budgets=budgets if len(budgets) > 1 else None, tune=tune,
                                      seeds=seeds or None))
    if isinstance(rows, int):
        return rows
    print(format_table(rows))
    if len(budgets) > 1:
        print()
        print(budget_table(rows))
    print(leaders_line(rows))
    if len(budgets) > 1:
        print(f"budget curve: {args.out}/budget.png, {args.out}/budget.csv")
    print(f"table and plot: {args.out}/compare.md, {args.out}/compare.png")
    return 0


def cmd_demo(args) -> int:
    _quiet_deepspeed()
    from transrec.engine.demo import run_demo  # lazy: fast --help

    run_demo(args.out, seed=args.seed, size=args.size, progress=args.progress)
    return 0


def cmd_plot(args) -> int:
    from transrec.engine.plot import plot_runs  # lazy: fast --help

    out = args.out or os.path.join(args.runs[0], "curves.png")
    path = plot_runs(args.runs, out, metric=args.metric)
    print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    _quiet_deepspeed()
    from transrec.engine.bench import run  # lazy: fast --help

    return run(args)


def cmd_launch(args) -> int:
    if not args.args or args.args[0] in ("-h", "--help"):
        print(args.launch_help(), file=sys.stdout if args.args else sys.stderr)
        return 0 if args.args else 2
    from transrec.engine.launch import launch  # lazy: torch's elastic launcher

    return launch(args.args)


# ----------------------------------------------------------------------------- parser

def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (one process, or many under deepspeed/torchrun)", formatter_class=_RAW,
        description="Train TransRec (or the ID baseline) on a dataset folder with DeepSpeed.\n"
                    "Resumes from RUN's latest checkpoint when there is one (run.resume=true).",
        epilog="examples:\n"
               "  transrec train --data data/source --out runs/a --preset tiny optim.steps=200\n"
               "  deepspeed --num_gpus 2 --no_local_rank --module transrec.cli train --data D --out R \\\n"
               "      deepspeed.zero_stage=2\n"
               "  torchrun --nproc_per_node 2 -m transrec.cli train --data D --out R \\\n"
               "      model.loss.negatives=global")
    p.add_argument("--data", help="dataset folder (data.path)")
    p.add_argument("--out", help="run folder (run.out)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "launch", help="torchrun for train/transfer/compare, ending with transrec's line and exit code",
        formatter_class=_RAW, prefix_chars="+", add_help=False, usage="transrec launch [torchrun options] "
        "-- train|transfer|compare ARGS...",
        description="Runs the command on every rank with torchrun's agent (the same options: "
                    "--nproc-per-node, --nnodes, --rdzv-endpoint, ...). SIGTERM, SIGINT, SIGUSR1 and "
                    "SIGUSR2 are passed on to the ranks; when they stop on it the launcher exits 75, "
                    "a rank killed outright ends it with one line and 69, otherwise it exits with the "
                    "ranks' own code. Ranks are never restarted.",
        epilog="examples:\n"
               "  transrec launch --nproc-per-node 2 -- train --data D --out R deepspeed.zero_stage=2\n"
               "  transrec launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\\n"
               "      --rdzv-endpoint node1:29500 -- train --data /shared/data --out /shared/runs/a \\\n"
               "      --preset small-gpu")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="torchrun's options, then -- and the transrec command with its arguments")
    p.set_defaults(func=cmd_launch, launch_help=p.format_help)

    p = sub.add_parser(
        "eval", help="full-ranking evaluation of a run's latest checkpoint", formatter_class=_RAW,
        description="Encode every item once, rank all items for every user (history masked), report "
                    "HR/NDCG@K and MRR.",
        epilog="example:\n  transrec eval --run runs/a --split test")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", help="dataset folder (default: the run's data.path)")
    p.add_argument("--split", default="valid,test", help="valid, test or valid,test (default: %(default)s)")
    p.add_argument("--item-chunk", type=int, default=None, help="items per encoder pass")
    p.add_argument("--progress", choices=PROGRESS, default=None,
                   help="bars: on, off, or auto (when stderr is a terminal); default: the run's run.progress")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", help="consolidated weights to safetensors (adapter-only for LoRA)", formatter_class=_RAW,
        description="Consolidate a checkpoint (any ZeRO stage) into EXPORT/model.safetensors with "
                    "config.yaml and export.json: the best one (run.monitor) when the run has one, else "
                    "the latest.",
        epilog="examples:\n  transrec export --run runs/a --out exports/a\n"
               "  transrec export --run runs/a --out exports/a-last --step last")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True,
                   help="export folder: new, empty or an earlier export (replaced once the new one is whole)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty folder that is not an export (never a run or dataset folder)")
    p.add_argument("--full", action="store_true", help="LoRA runs: merge adapters into full weights")
    p.add_argument("--onnx", action="store_true",
                   help=f"also write the user encoder as EXPORT/{ONNX_FILE} (history item vectors in, user "
                        "vector out; checked against PyTorch with onnxruntime)")
    p.add_argument("--step", default=None, metavar="last|best|N",
                   help="which checkpoint: last, best or a step number (default: best when the run "
                        "has one, else last)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "transfer", help="fine-tune a pretrained export on a target dataset", formatter_class=_RAW,
        description="Modes: scratch (same architecture, random init), full, topk (top-k encoder blocks), "
                    "lora (adapters only).",
        epilog="example:\n  transrec transfer --pretrained exports/a --data data/target --mode lora "
               "--out runs/t-lora --steps 100")
    p.add_argument("--pretrained", required=True, help="export folder")
    p.add_argument("--data", required=True, help="target dataset folder")
    p.add_argument("--mode", required=True, choices=["scratch", "full", "topk", "lora"])
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--topk", type=int, default=2, help="blocks trained per encoder in topk mode")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (optim.steps)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser(
        "compare", help="several transfer modes + the ID baseline on one target, one table",
        formatter_class=_RAW,
        description="Runs each mode with the same budget, evaluates on valid/test, writes "
                    "OUT/compare.{md,csv,json,png}.",
        epilog="examples:\n  transrec compare --pretrained exports/a --data data/target --out runs/cmp "
               "--modes scratch,full,topk,lora --steps 100\n"
               "  transrec compare --pretrained exports/a --data data/target --out runs/curve "
               "--steps 30,100,300")
    p.add_argument("--pretrained", required=True, help="export folder")
    p.add_argument("--data", required=True, help="target dataset folder")
    p.add_argument("--out", required=True, help="folder for the runs and the table")
    p.add_argument("--modes", default="scratch,full,lora", help="comma-separated (default: %(default)s)")
    p.add_argument("--no-id", action="store_true", help="leave out the ID-based SASRec baseline")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", "--budgets", default="", metavar="N[,N...]",
                   help="optimizer steps per run; several (e.g. 30,100,300) run every mode at each budget "
                        "and write the budget curve OUT/budget.{png,csv,md}")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every mode (the ID baseline too) with each value at each budget and keep the "
                        "value with the best validation metric (run.monitor); repeatable (the grid of all "
                        "combinations), e.g. --tune model.user.dropout=0.1,0.3,0.5")
    p.add_argument("--seeds", default="", metavar="S[,S...]",
                   help="repeat every run with each run.seed; rows report the mean and the spread over seeds")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "demo", help="synthesise two worlds, pretrain, transfer, print the table (CPU, minutes)",
        formatter_class=_RAW,
        description="The one-command demo: source and target synthetic worlds, TransRec pretrained on the "
                    "source, then scratch vs pretrained full vs pretrained LoRA vs ID SASRec on the target.",
        epilog="example:\n  transrec demo --out demo_out")
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", choices=PROGRESS, default="auto",
                   help="run.progress of every training: bars (on), plain lines on stderr (off), or bars "
                        "when stderr is a terminal (auto, the default)")
    p.add_argument("--size", default="full", choices=["full", "reduced"], help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "plot", help="PNG curves of loss and validation metrics", formatter_class=_RAW,
        description="Reads RUN/metrics.jsonl of each run and draws loss and validation curves.",
        epilog="example:\n  transrec plot runs/a runs/b --out curves.png")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", help="PNG path (default: RUN/curves.png of the first run)")
    p.add_argument("--metric", default="ndcg@10", help="validation metric (default: %(default)s)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "bench", help="training throughput: step-time breakdown, counted FLOPs, MFU, ablations, sweeps",
        formatter_class=_RAW,
        description="Trains a config as `transrec train` would (one process, or every rank under torchrun/"
                    "deepspeed) and reports seq/s, unique items, text tokens and images per second, the time "
                    "of each part of a step, model FLOPs per step (torch.utils.flop_counter), achieved "
                    "FLOP/s "
                    "and MFU against the device's peak (a published GPU peak; on a CPU a measured matmul "
                    "peak), peak memory and the efficiency switches in effect. Writes OUT/bench.json and "
                    "OUT/bench.md.",
        epilog="examples:\n"
               "  transrec bench --preset tiny --synth 2000,1000\n"
               "  transrec bench --preset demo-cpu --synth 2000,1000 \\\n"
               "      --ablate dedup,prefix_cache,kernel,bf16\n"
               "  transrec bench --preset tiny --synth 2000,1000 --sweep data.batch_size=64,128,256\n"
               "  transrec bench --preset tiny --synth 2000,1000 --sweep world=1,2\n"
               "  torchrun --nproc_per_node 8 -m transrec.cli bench --preset base-gpu --data D --out B\n"
               "  transrec bench --compare machine-a/bench.json machine-b/bench.json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="dataset folder to train on")
    src.add_argument("--synth", metavar="USERS,ITEMS",
                     help="a synthetic source world of that size, made once under OUT and reused")
    p.add_argument("--image-frac", type=float, default=0.5,
                   help="share of image items in a --synth world (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps, once plain (throughput) and once with the step clock (default: "
                        "%(default)s)")
    p.add_argument("--ablate", metavar="SWITCHES",
                   help="comma-separated switches to turn off in turn, with the ratio against the full "
                        "engine: dedup, prefix_cache, kernel, bf16")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="one row per value of a config key (or world=1,2,4: one launch per rank count, with "
                        "the scaling efficiency), and OUT/bench_sweep.png")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="the ratio table B / A of two bench results, matched by row label")
    p.add_argument("--label", help="the row's name (default: the preset)")
    p.add_argument("--out", default="bench", help="output folder (default: %(default)s)")
    p.add_argument("--in-process", action="store_true",
                   help="with --ablate or --sweep: measure every configuration in this process, one after "
                        "another (by default each runs in a process of its own: the same start for each, "
                        "and its own peak memory)")
    p.add_argument("--no-dedup", action="store_true", help=argparse.SUPPRESS)  # --ablate dedup's child
    _add_config_args(p)
    p.set_defaults(func=cmd_bench)
