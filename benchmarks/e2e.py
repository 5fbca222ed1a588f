"""End-to-end training throughput: the engine against a naive TransRec-style loop.

Run (CPU, tiny presets):   .venv/bin/python benchmarks/e2e.py
Run (GPU):                 python benchmarks/e2e.py --preset base-gpu --batch 256,64 --max-len 24
Peak memory per ZeRO stage: python benchmarks/e2e.py --preset base-gpu --batch 256 --steps 2 \
                               --sides engine-zero0,engine-zero2,engine-zero3 --out zero_memory.csv

Both sides train the same model (built from the preset with the same seed), on the same synthetic
data through the same loader order, with the same global batch and sequence length:

- **naive**: what a straightforward TransRec trainer does. Every position's item is encoded
  separately (an item seen at 5 positions of a batch is encoded 5 times), fp32, the user x item logit
  matrix is materialised and fed to ``F.cross_entropy``, no checkpointing, a plain ``torch.optim.AdamW``
  over the trainable weights. (Written in this file, on purpose, not taken from the engine.)
- **engine**: ``transrec.engine.trainer.Trainer``: DeepSpeed (ZeRO stage and precision from the
  preset), one encoder pass per modality over the batch's unique items, in-batch softmax through the
  kernel dispatcher (chunked on the CPU, Triton on GPUs), warmup + cosine, two learning rates.
  Every engine side is measured by ``transrec.engine.bench.measure``, the function behind
  ``transrec bench``: its figures come from the same code as the command's (seq/s and unique items/s
  over the plain timed steps, after the warm-up and the one step whose FLOPs are counted), and its row
  adds the achieved FLOP/s and MFU.

The two do not optimise the same objective: the naive logits have one column per *position*, so an
item seen at 5 positions is 5 columns and a target's own copies at other positions count as
negatives; the engine's columns are the batch's unique items. So the ratio engine / naive mixes
speed with a change of objective. The other sides split it into its parts:

- **naive-unique**: the naive loop (fp32, plain AdamW, materialised logits) over the batch's unique
  items: each encoded once, one logit column each: the engine's objective, without the engine.
  naive-unique / naive is what deduplication (with the objective it implies) buys;
- **engine-noprefix** (``data.prefix_cache=false``), **engine-torch** (``model.loss.impl=torch``,
  the N x M logits materialised) and **engine-fp32** (``deepspeed.precision=fp32``): the engine with
  one lever off; engine / engine-X is what that lever buys;
- **engine-zero0..3** (``deepspeed.zero_stage=S``): peak memory per ZeRO stage on one device.

Each side runs in its own process (peak memory is per process: max RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU); ``--in-process`` runs them one after another in this
process instead (a quick check of the code paths: peak memory is then the process's so far).
Reported: sequences/s, items encoded/s (the encoder inputs per second: positions for naive, unique
items for naive-unique and the engine), peak memory, the speed-up over naive; for the naive sides
also sequences per CPU-second of the process (the steadier figure on a shared machine) and the loss,
for the engine sides MFU. Rows are appended to benchmarks/results/e2e.csv with the machine stamp
(date, machine, versions, commit) and a bar chart is written to benchmarks/results/e2e.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench_common import append_rows, stamp, stamped  # noqa: E402  (benchmarks/ is the script folder)

from transrec.config import build_config

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def make_config(args):
    return build_config(args.preset, overrides=[
        f"data.path={args.data}", f"run.out={args.run}", f"data.batch_size={args.batch}",
        f"data.max_len={args.max_len}", f"model.user.max_len={args.max_len}",
        f"optim.steps={args.warmup + args.steps}", "run.progress=false", "run.tensorboard=false",
        "run.resume=false", f"run.log_every={10**6}", *args.override])


def peak_memory_mb() -> float:
    import torch  # lazy: fast --help

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# side -> (loop, config overrides for that side, what it is)
SIDES = {
    "naive": ("naive", [], "fp32, every position encoded, one logit column per position (copies too)"),
    "naive-unique": ("naive-unique", [], "fp32, each unique item encoded once, logits over unique items"),
    "engine": ("engine", [], "the preset as it is"),
    "engine-noprefix": ("engine", ["data.prefix_cache=false"], "without the frozen-prefix cache"),
    "engine-torch": ("engine", ["model.loss.impl=torch"], "loss through materialised torch logits"),
    "engine-fp32": ("engine", ["deepspeed.precision=fp32"], "fp32 instead of the preset's precision"),
    **{f"engine-zero{k}": ("engine", [f"deepspeed.zero_stage={k}"], f"ZeRO stage {k}") for k in range(4)},
}
CORE_SIDES = ("naive", "engine")  # the sides that run at every batch size
DEFAULT_SIDES = "naive,naive-unique,engine,engine-noprefix,engine-torch,engine-fp32"
# after the machine stamp's columns (bench_common.stamped)
FIELDS = ["preset", "batch", "positions", "side", "seq_per_s", "seq_per_cpu_s", "items_encoded_per_s",
          "peak_mb", "speedup_wall", "speedup_cpu", "load_avg", "zero_stage", "precision", "steps", "mfu",
          "note"]


# ----------------------------------------------------------------------------- the naive loop

def naive_step(model, batch, temperature: float, logq: bool, l2: bool):
    """Encode every valid position's item on its own, materialise the logits, cross-entropy."""
    import torch  # lazy: fast --help
    import torch.nn.functional as F  # lazy: fast --help

    from transrec.shards.batch import ImageContent, TextContent  # lazy: fast --help

    mask = batch.mask
    rows = batch.inverse[mask]  # the unique-item row of every valid position
    p = int(rows.shape[0])
    positions = torch.arange(p, device=rows.device)
    text = image = None
    if batch.text is not None:  # per-position copies of the content (no dedup)
        where = torch.full((batch.num_unique,), -1, dtype=torch.long, device=rows.device)
        where[batch.text.index] = torch.arange(batch.text.index.shape[0], device=rows.device)
        r = where[rows]
        sel = r >= 0
        text = TextContent(batch.text.input_ids[r[sel]], batch.text.attention_mask[r[sel]], positions[sel])
    if batch.image is not None:
        where = torch.full((batch.num_unique,), -1, dtype=torch.long, device=rows.device)
        where[batch.image.index] = torch.arange(batch.image.index.shape[0], device=rows.device)
        r = where[rows]
        sel = r >= 0
        image = ImageContent(batch.image.pixels[r[sel]], positions[sel])
    emb = model.encode_items(positions, text, image)  # [P, d], one row per position
    full = torch.zeros(*mask.shape, emb.shape[1], dtype=emb.dtype, device=emb.device)
    full[mask] = emb
    out = model.user(full[:, :-1], mask[:, :-1])
    q = out[:, -1]  # bidirectional: the last position predicts the target
    keys = emb  # every position is a candidate (duplicates included), as a naive loop has it
    pos_of = torch.zeros(mask.shape, dtype=torch.long, device=emb.device)
    pos_of[mask] = positions
    target = pos_of[:, -1]
    if l2:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    logits = q @ keys.T / temperature  # [B, P] materialised
    if logq:
        logits = logits - batch.unique_log_q[rows][None, :]
    valid = mask[:, -1] & mask[:, -2]
    return F.cross_entropy(logits[valid], target[valid])


def naive_unique_step(model, batch, temperature: float, logq: bool, l2: bool):
    """The naive loop over the batch's unique items: each encoded once, one logit column each (the
    engine's objective), logits materialised, fp32."""
    import torch.nn.functional as F  # lazy: fast --help

    mask = batch.mask
    table = model.encode_items(batch.unique_items, batch.text, batch.image)  # [U, d]
    out = model.user(table[batch.inverse[:, :-1]], mask[:, :-1])
    q, keys = out[:, -1], table
    target = batch.inverse[:, -1]
    if l2:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    logits = q @ keys.T / temperature  # [B, U] materialised
    if logq:
        logits = logits - batch.unique_log_q.to(logits.device)[None, :]
    valid = mask[:, -1] & mask[:, -2]
    return F.cross_entropy(logits[valid], target[valid])


def run_naive(args) -> dict:
    import torch  # lazy: fast --help

    from transrec.engine.data import make_loader, open_data  # lazy: fast --help
    from transrec.engine.trainer import seed_everything  # lazy: fast --help
    from transrec.models import build_model  # lazy: fast --help

    cfg = make_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.run.seed)
    ds, content = open_data(cfg)
    model = build_model(cfg.model, n_items=ds.n_items).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    loader = make_loader(cfg, ds, content, "train", batch_size=cfg.data.batch_size, rank=0, world=1)
    loader.set_epoch(0)
    lc = cfg.model.loss
    seqs = items = 0
    losses = []
    it = iter(loader)
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        try:
            batch = next(it)
        except StopIteration:
            loader.set_epoch(step)
            it = iter(loader)
            batch = next(it)
        batch = batch.to(device)
        step_fn = naive_unique_step if args.loop == "naive-unique" else naive_step
        loss = step_fn(model, batch, lc.temperature, lc.logq, lc.l2_normalize)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step >= args.warmup:
            seqs += batch.batch_size
            items += int(batch.mask.sum()) if args.loop == "naive" else int(batch.num_unique)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seq_per_s": seqs / dt, "items_per_s": items / dt, "seq_per_cpu_s": seqs / cpu, "seconds": dt,
            "loss_first": losses[0], "loss_last": losses[-1], "zero_stage": "", "precision": "fp32"}


def run_engine(args) -> dict:
    """An engine side, measured as ``transrec bench`` measures (its library function, one row)."""
    from transrec.engine import bench  # lazy: fast --help

    overrides = [f"data.batch_size={args.batch}", f"data.max_len={args.max_len}",
                 f"model.user.max_len={args.max_len}", *args.override]
    cfg = bench.bench_config(args.preset, None, overrides, data=args.data, run=Path(args.run),
                             warmup=args.warmup, steps=args.steps)
    row = bench.measure(cfg, warmup=args.warmup, steps=args.steps, label=args.side, overrides=overrides)
    return {"seq_per_s": row["seq_per_s"], "seq_per_cpu_s": row["seq_per_cpu_s"],
            "items_per_s": row["items_per_s"],
            "seconds": row["step_ms"] * args.steps / 1e3, "loss_first": None, "loss_last": None,
            "zero_stage": row["zero_stage"], "precision": row["precision"], "mfu": row["mfu"],
            "peak_mb": row["gpu_alloc_mib"] if row["gpu"] else row["rss_mib"], "bench": row}


# ----------------------------------------------------------------------------- orchestration

def side_args(args, side: str, batch: int, run: str) -> argparse.Namespace:
    loop, extra, _ = SIDES[side]
    return argparse.Namespace(**{**vars(args), "batch": batch, "run": run, "loop": loop, "side": side,
                                 "override": [*args.override, *extra]})


def one(args) -> int:
    fn = run_engine if args.loop == "engine" else run_naive
    res = fn(args)
    res.setdefault("peak_mb", peak_memory_mb())
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_side(args, side: str, batch: int, tmp: str) -> dict:
    run = str(Path(tmp) / f"run-{side}-{batch}")
    if args.in_process:
        import torch  # lazy: fast --help

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        a = side_args(args, side, batch, run)
        res = (run_engine if a.loop == "engine" else run_naive)(a)
        res.setdefault("peak_mb", peak_memory_mb())
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return res
    cmd = [sys.executable, __file__, "--one", SIDES[side][0], "--preset", args.preset, "--batch", str(batch),
           "--max-len", str(args.max_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--data", args.data, "--run", run, "--side", side, *args.override, *SIDES[side][1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    return json.loads(line[-1][7:])


def ratio(res: dict, a: str, b: str) -> str:
    if a in res and b in res:
        return f"{res[a]['seq_per_s'] / res[b]['seq_per_s']:.2f}x"
    return "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="config preset (tiny on the CPU, base-gpu on a GPU)")
    ap.add_argument("--batch", default="64,256", help="global batch sizes to measure (comma-separated)")
    ap.add_argument("--max-len", type=int, default=20, help="history positions per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--data", default="", help="dataset folder (default: a synthetic source world)")
    ap.add_argument("--sides", default=DEFAULT_SIDES,
                    help=f"comma-separated, in this order, from: {', '.join(SIDES)}")
    ap.add_argument("--ablations-at", default="",
                    help="batch sizes where the sides beyond naive and engine run (default: all)")
    ap.add_argument("--world", default="",
                    help="folder for the synthetic world: made there once, then reused with its caches")
    ap.add_argument("--in-process", action="store_true",
                    help="run every side in this process (quick; peak memory is then cumulative)")
    ap.add_argument("--no-plot", action="store_true", help="CSV rows only, no PNG")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e.csv"))
    ap.add_argument("--bench-out", default="", metavar="DIR",
                    help="also write the engine sides' full `transrec bench` rows (step-time breakdown, "
                         "FLOPs, MFU) to DIR/bench.json and DIR/bench.md (default: not written)")
    ap.add_argument("override", nargs="*", help="config overrides (key=value) for every side")
    ap.add_argument("--one", choices=["naive", "naive-unique", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.batch, args.loop = int(args.batch), args.one
        return one(args)

    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    sides = [x for x in args.sides.split(",") if x]
    unknown = [x for x in sides if x not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    ablate_at = {int(b) for b in args.ablations_at.split(",") if b.strip()} or set(batches)
    run = stamp()
    print(f"# e2e training benchmark  {run['date']}  {run['machine']}  commit {run['commit']}  "
          f"python {run['python']}  torch {run['torch']}")
    print(f"# load average before start: {os.getloadavg()[0]:.2f} (other processes share these cores; "
          "seq/cpu-s of the naive sides divides by the process's own CPU time and is the steadier figure "
          "then)")
    rows, bench_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else Path(tmp) / "world"
        if not args.data and (world / "manifest.json").is_file():
            args.data = str(world)
            print(f"synthetic world: reused from {world}")
        elif not args.data:
            from transrec.shards.synth import synthesize  # lazy: fast --help

            args.data = str(synthesize(world, domain="source", n_users=args.users,
                                       n_items=args.items, min_len=args.max_len + 3,
                                       max_len=args.max_len + 10, seed=0))
            print(f"synthetic world: {args.users} users, {args.items} items (half image 32x32), "
                  f"sequences of {args.max_len + 3}-{args.max_len + 10} items")
        from transrec.engine.data import open_data  # lazy: fast --help

        args.run = str(Path(tmp) / "run")
        first = argparse.Namespace(**{**vars(args), "batch": batches[0]})
        open_data(make_config(first))  # the item cache, built once outside the timed processes
        cfg = make_config(first)
        m = cfg.model
        cond = (f"preset {args.preset}: text {m.text.name} (trainable {m.text.trainable}), "
                f"image {m.image.name} {m.image.image_size}px, user {m.user.layers}x{m.dim}, "
                f"{args.max_len + 1} positions, "
                f"{args.steps} timed steps after {args.warmup}; engine ZeRO-{cfg.deepspeed.zero_stage} "
                f"{cfg.deepspeed.precision}, naive fp32")
        print(f"# {cond}")
        if args.override:
            print(f"# overrides for every side: {' '.join(args.override)}")
        for side in sides:
            extra = f" ({' '.join(SIDES[side][1])})" if SIDES[side][1] else ""
            print(f"#   {side:16s} {SIDES[side][2]}{extra}")
        if "naive" in sides:
            print("# note: naive's logits have one column per position, so a target's copies at other "
                  "positions are negatives: its objective differs from the engine's as well as its speed; "
                  "naive-unique has the engine's objective")
        if args.in_process:
            print("# sides run in one process: peak memory is the process's so far, not the side's own")
        print("# engine sides: measured by transrec.engine.bench.measure (as `transrec bench`); "
              "seq/cpu-s and the loss are the naive loop's only, MFU the engine's")
        print(f"{'batch':>5} {'side':>16} {'seq/s':>8} {'seq/cpu-s':>10} {'items enc/s':>12} {'peak MB':>8} "
              f"{'loss first->last / MFU':>22}")
        failed: list[str] = []
        for batch in batches:
            res = {}
            for side in sides:
                if batch not in ablate_at and side not in CORE_SIDES:
                    continue
                try:
                    r = res[side] = run_side(args, side, batch, tmp)
                except (SystemExit, Exception) as e:  # one side failing costs only its row
                    if isinstance(e, Exception):
                        traceback.print_exc()
                    print(f"{batch:5d} {side:>16} FAILED: {e}", flush=True)
                    failed.append(f"{side}@{batch}")
                    continue
                per_cpu = r["seq_per_cpu_s"]  # None on the engine sides (the naive loop times its CPU)
                tail = f"{r['loss_first']:8.3f}->{r['loss_last']:.3f}" if "bench" not in r else \
                    "MFU " + ("-" if r["mfu"] is None else f"{r['mfu']:.2%}")
                print(f"{batch:5d} {side:>16} {r['seq_per_s']:8.1f} "
                      f"{'-' if per_cpu is None else f'{per_cpu:.1f}':>10} {r['items_per_s']:12.0f} "
                      f"{r['peak_mb']:8.0f} {tail:>22}", flush=True)
                ref = res.get("naive", {"seq_per_s": float("nan"), "seq_per_cpu_s": None})
                ref_cpu = ref["seq_per_cpu_s"]
                rows.append({**run, "preset": args.preset, "batch": batch, "positions": args.max_len + 1,
                             "side": side, "seq_per_s": round(r["seq_per_s"], 2),
                             "seq_per_cpu_s": "" if per_cpu is None else round(per_cpu, 2),
                             "items_encoded_per_s": round(r["items_per_s"], 1),
                             "peak_mb": round(r["peak_mb"], 1),
                             "speedup_wall": round(r["seq_per_s"] / ref["seq_per_s"], 3),
                             "speedup_cpu": "" if None in (per_cpu, ref_cpu) else round(per_cpu / ref_cpu, 3),
                             "load_avg": round(os.getloadavg()[0], 2), "zero_stage": r["zero_stage"],
                             "precision": r["precision"], "steps": args.steps,
                             "mfu": "" if r.get("mfu") is None else round(r["mfu"], 5),
                             "note": " ".join(args.override + SIDES[side][1])
                             + (" in-process" if args.in_process else "")})
                # written as measured: a run cut short keeps its rows
                append_rows(args.out, rows[-1:], stamped(FIELDS))
                if "bench" in r and args.bench_out:
                    from transrec.engine import bench  # lazy: fast --help

                    bench_rows.append({**r["bench"], "label": f"{side} batch {batch}"})
                    command = ["python", "benchmarks/e2e.py", *sys.argv[1:]]
                    bench.write_outputs(Path(args.bench_out), bench_rows, command)
            if "naive" in res and "engine" in res:
                wall = res["engine"]["seq_per_s"] / res["naive"]["seq_per_s"]
                print(f"{batch:5d} engine / naive: {wall:.2f}x wall")
            if "engine" in res and len(res) > 2:
                print(f"{batch:5d} what each part buys (seq/s ratios): "
                      f"dedup + objective (naive-unique / naive) {ratio(res, 'naive-unique', 'naive')}, "
                      f"engine over naive-unique {ratio(res, 'engine', 'naive-unique')}, "
                      f"prefix cache (engine / engine-noprefix) {ratio(res, 'engine', 'engine-noprefix')}, "
                      f"kernel (engine / engine-torch) {ratio(res, 'engine', 'engine-torch')}, "
                      f"{cfg.deepspeed.precision} (engine / engine-fp32) "
                      f"{ratio(res, 'engine', 'engine-fp32')}")
    out = Path(args.out)
    if failed:
        print(f"failed: {', '.join(failed)}")
    if args.no_plot or not rows or not {"naive", "engine"} <= set(sides):
        print(f"wrote {out}")
        return 1 if failed else 0
    png = out.with_suffix(".png")
    plot(rows, png, cond)
    print(f"wrote {out} and {png}")
    return 1 if failed else 0


def plot(rows, png, cond) -> None:
    import matplotlib  # lazy: matplotlib only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    batches = sorted({r["batch"] for r in rows})
    panels = (("seq_per_s", "sequences / s (wall)"), ("items_encoded_per_s", "items encoded / s"),
              ("peak_mb", "peak memory (MB)"))
    sides = list(dict.fromkeys(r["side"] for r in rows))
    colours = {"naive": "#999999", "naive-unique": "#cccccc", "engine": "#2a6fdb"}
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    width = 0.8 / len(sides)
    for ax, (key, label) in zip(axes, panels):
        for k, side in enumerate(sides):
            vals = [next((r[key] for r in rows if r["batch"] == b and r["side"] == side), 0.0)
                    for b in batches]
            xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(batches))]
            bars = ax.bar(xs, vals, width=width, color=colours.get(side), label=side)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['machine']} - {cond}", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
