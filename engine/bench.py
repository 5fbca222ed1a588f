"""``transrec bench``: training throughput, where a step's time goes, model FLOPs and MFU.

One measurement (:func:`measure`) builds the trainer of a config exactly as ``transrec train`` does,
on one process or on every rank of a torchrun/deepspeed launch, and runs four phases:

1. ``warmup`` steps, untimed (allocation, kernel selection, the loader's start);
2. one counted step: model FLOPs by ``torch.utils.flop_counter`` on every rank, summed
   (:mod:`~transrec.engine.flops`), beside the formula's figure where the model has one;
3. ``steps`` plain steps, timed from one device synchronisation to the next: sequences, unique items,
   text tokens and images per second, achieved FLOP/s and MFU against the device's peak
   (:mod:`~transrec.engine.hardware`);
4. ``steps`` steps with the step clock on (:mod:`~transrec.engine.stepclock`): the time of each part
   of a step (data wait, item encoding, user encoder, loss, the rest of the forward, backward,
   optimizer, communication, other), which synchronises the device at every boundary and so is
   measured apart from the throughput.

Under several ranks, every figure is global (sequences of all ranks, FLOPs of all ranks) except the
breakdown, which is the mean over ranks, beside the skew: the slowest rank's compute time (its step
less data wait and communication) over the mean. A row carries the machine stamp, the efficiency
switches in effect and the overrides; rows go to ``OUT/bench.json`` and ``OUT/bench.md``.

:func:`ablate` repeats the measurement with each efficiency switch off in turn (dedup, the
frozen-prefix cache, the loss kernel, bf16); :func:`sweep` once per value of any config key;
:func:`compare` reads two JSON files and gives the ratio of each figure.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from transrec.config import Config, build_config
from transrec.engine import distributed as D
from transrec.engine.flops import analytic_flops, counting
from transrec.engine.hardware import device_peak, machine_stamp
from transrec.engine.stepclock import NO_CLOCK, PARTS, StepClock
from transrec.engine.tracking import say
from transrec.errors import UserError
from transrec.kernels.dispatch import auto_impl

# the switches --ablate turns off, each as (what the row calls it, how)
ABLATIONS = ("dedup", "prefix_cache", "kernel", "bf16")
STAMP = ("date", "machine", "cpu", "cores", "gpu", "gpus", "driver", "python", "torch", "deepspeed",
         "transformers", "triton", "transrec", "commit")
FIELDS = [*STAMP, "label", "preset", "data", "world", "batch", "micro_batch", "accum", "max_len", "warmup",
          "steps", "dedup", "prefix_cache", "kernel", "precision", "zero_stage", "grad_ckpt", "workers",
          "seq_per_s", "seq_per_cpu_s", "items_per_s", "text_tokens_per_s", "images_per_s", "step_ms",
          "flops_per_step",
          "flops_formula_per_step", "tflops", "peak_tflops", "peak_source", "mfu",
          *[f"{p}_ms" for p in PARTS], "breakdown_step_ms", "parts_sum_ms", "comm_share", "rank_skew",
          "gpu_alloc_mib", "gpu_reserved_mib", "rss_mib", "overrides", "note"]


# what a launcher sets for its ranks (a world sweep's launches start without them)
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class BenchError(UserError):
    """A benchmark that cannot run as asked (one line)."""


# ----------------------------------------------------------------------------- data

def parse_synth(text: str) -> tuple[int, int]:
    """``USERS,ITEMS`` -> (users, items)."""
    try:
        users, items = (int(x) for x in text.split(","))
    except ValueError:
        raise BenchError(f"--synth takes USERS,ITEMS (two integers), got {text!r}") from None
    if users < 8 or items < 8:
        raise BenchError(f"--synth {text}: need at least 8 users and 8 items")
    return users, items


def synth_world(out: Path, users: int, items: int, image_frac: float, *, single: bool = False) -> Path:
    """A synthetic source world under ``out`` (made once by rank 0, reused after; collective unless
    ``single``: a process outside any group)."""
    folder = out / f"world-{users}x{items}-img{image_frac:g}"
    if (single or D.rank() == 0) and not (folder / "manifest.json").is_file():
        from transrec.shards.synth import synthesize  # lazy: only a --synth bench writes a world

        say(f"bench: synthetic world of {users} users, {items} items ({image_frac:.0%} images) -> {folder}")
        synthesize(folder, domain="source", n_users=users, n_items=items, image_frac=image_frac, seed=0)
    if not single:
        D.barrier()
    return folder


def bench_config(preset: str, file: str | None, overrides: list[str], *, data: str, run: Path,
                 warmup: int, steps: int) -> Config:
    """The config of a measured run: the preset as trained, with evaluation, logging and resuming off
    and enough optimizer steps for the four phases."""
    cfg = build_config(preset, file, [*overrides, f"data.path={data}", f"run.out={run}"])
    cfg.run.monitor, cfg.eval.every = "", 0
    cfg.run.progress, cfg.run.tensorboard, cfg.run.resume = "off", False, False
    cfg.run.log_every, cfg.run.ckpt_every, cfg.run.ckpt_every_minutes = 10 ** 9, 0, 0
    cfg.optim.steps = warmup + 1 + 2 * steps
    return cfg


# ----------------------------------------------------------------------------- one measurement

def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Counts:
    """Sequences, unique items, text tokens and images handed to the steps."""

    def __init__(self):
        self.seqs = self.items = self.tokens = self.images = 0

    def add(self, batch) -> None:
        rows = batch.row_valid
        self.seqs += batch.batch_size if rows is None else int(rows.sum())
        self.items += int(batch.num_unique)
        if batch.text is not None:
            self.tokens += int(batch.text.attention_mask.sum())
        if batch.image is not None:
            self.images += int(batch.image.index.numel())


def _switches(trainer) -> dict:
    from transrec.models.prefix import PrefixCachedContent  # lazy: the models room, at measurement only

    cfg, net = trainer.cfg, trainer.engine.module
    impl = cfg.model.loss.impl
    if impl == "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
        impl = auto_impl(trainer.device.type, dtype, int(cfg.model.dim))
    m = cfg.model
    return {"dedup": bool(getattr(net, "dedup", False)) if hasattr(net, "text_encoder") else "n/a (ID model)",
            "prefix_cache": isinstance(trainer.content, PrefixCachedContent),
            "kernel": impl, "precision": cfg.deepspeed.precision, "zero_stage": trainer.zero_stage,
            "grad_ckpt": bool(m.text.grad_ckpt or m.image.grad_ckpt or m.user.grad_ckpt),
            "workers": cfg.data.num_workers}


def _gather(values: list[float], device: torch.device, world: int) -> torch.Tensor:
    """[world, len(values)] float64 of every rank's ``values`` (a tensor all-gather; no pickling)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world == 1:
        return t[None].cpu()
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.stack(out).cpu()


def measure(cfg: Config, *, warmup: int, steps: int, label: str, dedup: bool = True,
            overrides: list[str] | None = None) -> dict:
    """One benchmark row (collective under several ranks; every rank returns the same row)."""
    from transrec.engine.trainer import Trainer  # lazy: the trainer imports DeepSpeed's runtime

    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup})")
    run = Path(cfg.run.out)
    if D.rank() == 0 and run.exists():
        shutil.rmtree(run)  # a bench run folder holds nothing worth keeping: the row is the result
    D.barrier()
    device = D.device()
    trainer = Trainer(cfg, show=False)
    try:
        net = trainer.engine.module
        if hasattr(net, "text_encoder"):
            net.dedup = dedup
        switches = _switches(trainer)
        world = trainer.world
        with trainer.stopper:
            if not trainer.begin():
                raise BenchError(f"{run}: nothing to train")
            if device.type == "cuda":  # the peak of training: weights, optimizer state and steps, not set-up
                torch.cuda.reset_peak_memory_stats(device)
            batches = trainer.micro_batches()

            def step(counts: _Counts | None = None, clock=NO_CLOCK) -> list:
                with clock("data"):
                    micro = [next(batches) for _ in range(trainer.accum)]
                with clock("other"):
                    trainer.train_step(micro)
                if counts is not None:
                    for b in micro:
                        counts.add(b)
                return micro

            for _ in range(warmup):
                step()
            with counting(net) as flop:
                micro = step()
            formula = [analytic_flops(net, b) for b in micro]
            formula_total = None if any(f is None for f in formula) else sum(f["total"] for f in formula)

            counts = _Counts()
            t0, c0 = _sync(device), time.process_time()
            for _ in range(steps):
                step(counts)
            plain, cpu = _sync(device) - t0, time.process_time() - c0

            clock = StepClock(device)
            handles = clock.attach(net)
            trainer.clock = clock
            try:
                with clock.communication():
                    t0 = _sync(device)
                    for _ in range(steps):
                        step(clock=clock)
                    timed = _sync(device) - t0
            finally:
                trainer.clock = NO_CLOCK
                for h in handles:
                    h.remove()
            batches.close()
        parts = [clock.totals.get(p, 0.0) for p in PARTS]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        alloc = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 20 if device.type == "cuda" else 0.0
        mine = [plain, timed, counts.seqs, counts.items, counts.tokens, counts.images, flop.total,
                -1.0 if formula_total is None else formula_total, rss, alloc, reserved, cpu, *parts]
        rows = _gather(mine, device, world)
    finally:
        trainer.close()

    P = 12  # where the parts start in each rank's vector
    plain_s = float(rows[:, 0].max())  # the step ends when the slowest rank's does
    timed_s = float(rows[:, 1].max())
    seqs, items, tokens, images = (float(rows[:, i].sum()) for i in range(2, 6))
    flops_step = float(rows[:, 6].sum())
    formula_step = None if (rows[:, 7] < 0).any() else float(rows[:, 7].sum())
    part_ms = {p: float(rows[:, P + i].mean()) / steps * 1e3 for i, p in enumerate(PARTS)}
    waits = rows[:, P + PARTS.index("data")] + rows[:, P + PARTS.index("communication")]
    compute = rows[:, P:].sum(1) - waits
    skew = float(compute.max() / compute.mean()) if float(compute.mean()) > 0 else 1.0
    tflops = flops_step * steps / plain_s / 1e12
    peak = device_peak(device, cfg.deepspeed.precision)
    mfu = tflops / (peak["tflops"] * world) if peak["tflops"] else None
    breakdown_ms = timed_s / steps * 1e3
    row = {**machine_stamp(), "label": label, "preset": cfg.preset, "data": cfg.data.path, "world": world,
           "batch": cfg.data.batch_size, "micro_batch": trainer.micro, "accum": trainer.accum,
           "max_len": cfg.data.max_len, "warmup": warmup, "steps": steps, **switches,
           "seq_per_s": seqs / plain_s, "seq_per_cpu_s": seqs / max(float(rows[:, 11].sum()), 1e-9),
           "items_per_s": items / plain_s, "text_tokens_per_s": tokens / plain_s,
           "images_per_s": images / plain_s, "step_ms": plain_s / steps * 1e3,
           "flops_per_step": flops_step, "flops_formula_per_step": formula_step, "tflops": tflops,
           "peak_tflops": peak["tflops"], "peak_source": peak["source"], "mfu": mfu,
           **{f"{p}_ms": v for p, v in part_ms.items()}, "breakdown_step_ms": breakdown_ms,
           "parts_sum_ms": sum(part_ms.values()),
           "comm_share": part_ms["communication"] / breakdown_ms if breakdown_ms else 0.0,
           "rank_skew": skew, "gpu_alloc_mib": float(rows[:, 9].max()),
           "gpu_reserved_mib": float(rows[:, 10].max()),
           "rss_mib": float(rows[:, 8].max()), "overrides": " ".join(overrides or []), "note": ""}
    return row


# ----------------------------------------------------------------------------- many measurements

def ablation_overrides(name: str, row: dict) -> tuple[list[str], bool] | str:
    """(overrides, dedup) that turn ``name`` off, or why it cannot be (already off, not applicable)."""
    if name == "dedup":
        if row["dedup"] is not True:
            return "the ID model encodes no item content"
        return [], False
    if name == "prefix_cache":
        if not row["prefix_cache"]:
            return "the frozen-prefix cache is not in use (no frozen prefix, or data.prefix_cache=false)"
        return ["data.prefix_cache=false"], True
    if name == "kernel":
        if row["kernel"] == "torch":
            return "the loss already runs through the torch reference"
        return ["model.loss.impl=torch"], True
    if name == "bf16":
        if row["precision"] != "bf16":
            return f"the run is already {row['precision']}"
        return ["deepspeed.precision=fp32"], True
    raise BenchError(f"--ablate {name}: unknown switch; choose from {', '.join(ABLATIONS)}")


def ratio(a, b) -> float | None:
    """``a / b`` of two figures, or None where either is missing or b is zero."""
    if a in (None, "") or b in (None, "") or not float(b):
        return None
    return float(a) / float(b)


# ----------------------------------------------------------------------------- reports

def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):  # 3 significant digits, but whole numbers from 100 up to 1e5
        return f"{v:.0f}" if 100 <= abs(v) < 1e5 else f"{v:.{digits}g}"
    return str(v)


def summary(row: dict) -> str:
    """The human-readable block a measurement prints."""
    ranks = f"{row['world']} rank{'s' if row['world'] > 1 else ''}"
    lines = [f"{row['label']}: {row['preset']} on {row['machine']}, {ranks}, batch {row['batch']} "
             f"(micro {row['micro_batch']} x {row['accum']}), {row['steps']} steps after {row['warmup']}"]
    lines.append(f"  throughput  {row['seq_per_s']:.1f} seq/s | {row['items_per_s']:.0f} unique items/s | "
                 f"{row['text_tokens_per_s']:.0f} text tokens/s | {row['images_per_s']:.0f} images/s | "
                 f"step {row['step_ms']:.1f} ms")
    parts = " | ".join(f"{p.replace('_', ' ')} {row[f'{p}_ms']:.1f}" for p in PARTS if row[f"{p}_ms"] > 0)
    lines.append(f"  breakdown   ms per step (timed steps, {row['breakdown_step_ms']:.1f} ms; parts sum "
                 f"{row['parts_sum_ms']:.1f}): {parts}")
    if row["world"] > 1:
        lines.append(f"  ranks       communication {row['comm_share']:.1%} of the step; slowest rank's "
                     f"compute {row['rank_skew']:.2f}x the mean")
    formula = row["flops_formula_per_step"]
    lines.append(f"  FLOPs       {row['flops_per_step'] / 1e9:.3f} GFLOP per step counted"
                 + (f" (formula {formula / 1e9:.3f})" if formula else " (no formula for this model)")
                 + f"; {row['tflops'] * 1e3:.2f} GFLOP/s achieved")
    if row["mfu"] is not None:
        lines.append(f"  MFU         {row['mfu']:.2%} of {row['peak_tflops'] * 1e3:.1f} GFLOP/s per device "
                     f"({row['peak_source']})")
    else:
        lines.append(f"  MFU         - ({row['peak_source']})")
    mem = f"peak RSS {row['rss_mib']:.0f} MiB"
    if row["gpu"]:
        mem += f"; GPU allocated {row['gpu_alloc_mib']:.0f} MiB, reserved {row['gpu_reserved_mib']:.0f} MiB"
    lines.append(f"  memory      {mem}")
    sw = ", ".join(f"{k.replace('_', ' ')} {_fmt(row[k])}" for k in
                   ("dedup", "prefix_cache", "kernel", "precision", "zero_stage", "grad_ckpt", "workers"))
    lines.append(f"  switches    {sw}")
    if row.get("note"):
        lines.append(f"  note        {row['note']}")
    return "\n".join(lines)


MD_COLUMNS = ("label", "world", "batch", "seq_per_s", "step_ms", "flops_per_step", "tflops", "mfu",
              *[f"{p}_ms" for p in PARTS], "rss_mib", "gpu_alloc_mib", "dedup", "prefix_cache", "kernel",
              "precision", "zero_stage", "machine", "commit")


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(MD_COLUMNS) + " |"
    rule = "|" + "---|" * len(MD_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c in MD_COLUMNS:
            v = r.get(c)
            if c == "mfu" and v is not None:
                cells.append(f"{v:.2%}")
            elif c == "flops_per_step" and v:
                cells.append(f"{v / 1e9:.3f} G")
            else:
                cells.append(_fmt(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body]) + "\n"


def ratio_table(base: list[dict], other: list[dict], base_name: str, other_name: str) -> str:
    """Markdown: for each label in both, other / base of the throughput and every part's time."""
    keys = ("seq_per_s", "step_ms", "tflops", "mfu", *[f"{p}_ms" for p in PARTS], "rss_mib")
    by_label = {r["label"]: r for r in base}
    lines = [f"ratios {other_name} / {base_name}", "", "| label | " + " | ".join(keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    matched = 0
    for r in other:
        b = by_label.get(r["label"])
        if b is None:
            continue
        matched += 1
        cells = [f"{x:.2f}x" if (x := ratio(r.get(k), b.get(k))) is not None else "-" for k in keys]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if not matched:
        raise BenchError(f"{other_name} and {base_name} share no row label "
                         f"({sorted(by_label)} against {sorted(r['label'] for r in other)})")
    return "\n".join(lines) + "\n"


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``bench.json`` (one line naming what is wrong otherwise)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise BenchError(f"{p}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{p}: not a bench JSON file ({exc})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "label" in r for r in rows):
        raise BenchError(f"{p}: not a bench JSON file (no list of rows with labels)")
    return rows


def write_outputs(out: Path, rows: list[dict], command: list[str]) -> None:
    """``OUT/bench.json`` (the rows and the command) and ``OUT/bench.md`` (a table), rank 0 only."""
    if D.rank() != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
             for r in rows]
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps({"command": command, "rows": clean}, indent=1))
    os.replace(tmp, out / "bench.json")
    (out / "bench.md").write_text(f"`{' '.join(command)}`\n\n" + markdown(rows))


def sweep_plot(rows: list[dict], key: str, path: Path) -> None:
    """seq/s and MFU against the swept value, one PNG."""
    import matplotlib  # lazy: plotting only for a sweep

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only for a sweep

    xs = [str(r["sweep_value"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [r["seq_per_s"] for r in rows], color="tab:blue")
    ax.set_xlabel(key)
    ax.set_ylabel("sequences / s", color="tab:blue")
    if all(r["mfu"] is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * r["mfu"] for r in rows], "o-", color="tab:red")
        ax2.set_ylabel("MFU (%)", color="tab:red")
    ax.set_title(f"{rows[0]['preset']} on {rows[0]['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command

def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (key, values)."""
    key, sep, values = text.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
        raise BenchError(f"--sweep takes KEY=V1,V2,... (for example data.batch_size=64,128), got {text!r}")
    return key.strip(), vals


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-") or "run"


def _child(launcher: list[str], args, data: str, out: Path, label: str, extra: list[str],
           dedup: bool = True) -> dict:
    """One measurement in a process of its own (``launcher``: python, or torchrun with its options):
    every configuration starts from the same state (no shape or allocator warmed up by another) and
    its peak memory is its own. Its summary goes to this process's output; its row is returned."""
    cmd = [*launcher, "-m", "transrec.cli", "bench", "--preset", args.preset, "--data", data,
           "--out", str(out),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--label", label,
           *(["--config", args.config] if args.config else []), *([] if dedup else ["--no-dedup"]),
           *args.overrides, *extra]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # a launcher sets its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(f"{label}: the measurement failed with exit {proc.returncode}: {' / '.join(tail)}")
    print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("rows: ")), flush=True)
    (row,) = read_rows(out / "bench.json")
    return row


def world_sweep(args, data: str, worlds: list[str], out: Path) -> list[dict]:
    """One launch per world size (torchrun on this machine), each a bench of its own; rows with the
    scaling efficiency against the smallest world: (seq/s per rank) / (the same at the smallest)."""
    try:
        sizes = sorted({int(w) for w in worlds})
    except ValueError:
        raise BenchError(f"--sweep world takes rank counts, got {','.join(worlds)}") from None
    if sizes[0] < 1:
        raise BenchError("--sweep world: rank counts start at 1")
    rows = []
    for w in sizes:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}"]
        say(f"bench: {w} rank{'s' if w > 1 else ''}")
        row = _child(launcher, args, data, out / f"world{w}", f"{args.label or args.preset} world={w}", [])
        row["sweep_value"] = w
        rows.append(row)
    base = rows[0]["seq_per_s"] / rows[0]["world"]
    for r in rows:
        r["scaling_efficiency"] = r["seq_per_s"] / r["world"] / base
        r["note"] = f"scaling efficiency {r['scaling_efficiency']:.2f} against {rows[0]['world']} rank(s)"
    return rows


def _command(args) -> list[str]:
    """The command line that reproduces this bench (recorded in bench.json and bench.md)."""
    cmd = ["transrec", "bench", "--preset", args.preset]
    for flag in ("config", "data", "synth", "ablate", "sweep", "label"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.synth:
        cmd += ["--image-frac", f"{args.image_frac:g}"]
    cmd += [f for f, on in (("--in-process", args.in_process), ("--no-dedup", args.no_dedup)) if on]
    return [*cmd, "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(args.out),
            *args.overrides]


def run(args) -> int:
    """``transrec bench`` (see :func:`transrec.engine.cli.register`)."""
    if args.compare:
        a, b = args.compare
        print(ratio_table(read_rows(a), read_rows(b), a, b), end="")
        return 0
    if bool(args.data) == bool(args.synth):
        raise BenchError("give the data to train on: --data DATASET or --synth USERS,ITEMS (one of them)")
    ablate = [x.strip() for x in (args.ablate or "").split(",") if x.strip()]
    for name in ablate:
        if name not in ABLATIONS:
            raise BenchError(f"--ablate {name}: unknown switch; choose from {', '.join(ABLATIONS)}")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep and ablate:
        raise BenchError("--sweep and --ablate measure different things: run them one at a time")
    out = Path(args.out)
    label = args.label or args.preset
    command = _command(args)
    if sweep and sweep[0] == "world":  # this process launches the ranks and joins no group itself
        data = str(synth_world(out, *parse_synth(args.synth), args.image_frac, single=True)) if args.synth \
            else args.data
        rows = world_sweep(args, data, sweep[1], out)
        write_outputs(out, rows, command)
        print(markdown(rows), end="")
        sweep_plot(rows, "world", out / "bench_sweep.png")
        return 0
    D.init("auto")
    if args.synth:
        users, items = parse_synth(args.synth)
        data = str(synth_world(out, users, items, args.image_frac))
    else:
        data = args.data

    # several configurations on one process: each in a process of its own (under a launcher, the
    # ranks measure them one after another)
    isolate = D.world_size() == 1 and (bool(ablate) or bool(sweep)) and not args.in_process

    def one(name: str, extra: list[str], dedup: bool = True) -> dict:
        if isolate:
            return _child([sys.executable], args, data, out / "runs" / _slug(name), name, extra, dedup)
        overrides = [*args.overrides, *extra]
        cfg = bench_config(args.preset, args.config, overrides, data=data, run=out / "runs" / _slug(name),
                           warmup=args.warmup, steps=args.steps)
        row = measure(cfg, warmup=args.warmup, steps=args.steps, label=name,
                      dedup=dedup and not args.no_dedup, overrides=overrides)
        if D.rank() == 0:
            print(summary(row), flush=True)
        return row

    rows = []
    if sweep:
        key, values = sweep
        for v in values:
            row = one(f"{label} {key}={v}", [f"{key}={v}"])
            row["sweep_value"] = v
            rows.append(row)
    else:
        rows.append(one(label, []))
    full = rows[0]
    lines = []
    for name in ablate:
        how = ablation_overrides(name, full)
        if isinstance(how, str):
            lines.append(f"| {name} | - | - | n/a: {how} |")
            continue
        extra, dedup = how
        row = one(f"{label} -{name}", extra, dedup)
        gain = ratio(full["seq_per_s"], row["seq_per_s"])
        row["note"] = f"{name} off; the full engine is {gain:.2f}x its seq/s"
        rows.append(row)
        lines.append(f"| {name} | {row['seq_per_s']:.1f} | {gain:.2f}x | {_fmt(row['step_ms'])} ms a step |")
    write_outputs(out, rows, command)
    if D.rank() == 0:
        if lines:
            print(f"\nablations of {label} ({full['seq_per_s']:.1f} seq/s with every switch on):\n"
                  "| switch off | seq/s | full engine / this | note |\n|---|---|---|---|\n"
                  + "\n".join(lines))
        if sweep:
            sweep_plot(rows, sweep[0], out / "bench_sweep.png")
        print(f"rows: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0
