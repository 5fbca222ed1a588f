"""End-to-end training throughput: the engine against a naive TransRec-style loop.

Run (CPU, tiny presets):   .venv/bin/python benchmarks/e2e.py
Run (GPU, later):          python benchmarks/e2e.py --preset small-gpu --batch 256 --steps 30

Both sides train the same model (built from the preset with the same seed), on the same synthetic
data through the same loader order, with the same global batch and sequence length:

- **naive**: what a straightforward TransRec trainer does. Every position's item is encoded
  separately (an item seen at 5 positions of a batch is encoded 5 times), fp32, the user x item logit
  matrix is materialised and fed to ``F.cross_entropy``, no checkpointing, a plain ``torch.optim.AdamW``
  over the trainable weights. (Written here, on purpose, not taken from the engine.)
- **engine**: ``transrec.engine.trainer.Trainer``: DeepSpeed (ZeRO stage and precision from the
  preset), one encoder pass per modality over the batch's unique items, in-batch softmax through the
  kernel dispatcher (chunked on the CPU, Triton on GPUs), warmup + cosine, two learning rates.

Each side runs in its own process (peak memory is per process: max RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU). Reported: sequences/s, items encoded/s (the encoder
inputs per second: positions for naive, unique items for the engine), peak memory, the speed-up.
Rows are appended to benchmarks/results/e2e.csv (date, machine, git sha) and a bar chart is written
to benchmarks/results/e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_rows, cpu_name, git_sha  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} cores (CPU)"


def make_config(args):
    from transrec.config import build_config

    return build_config(args.preset, overrides=[
        f"data.path={args.data}", f"run.out={args.run}", f"data.batch_size={args.batch}",
        f"data.max_len={args.max_len}", f"model.user.max_len={args.max_len}",
        f"optim.steps={args.warmup + args.steps}", "run.progress=false", "run.tensorboard=false",
        "run.resume=false", f"run.log_every={10**6}", *args.override])


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the naive loop

def naive_step(model, batch, temperature: float, logq: bool, l2: bool):
    """Encode every valid position's item on its own, materialise the logits, cross-entropy."""
    import torch
    import torch.nn.functional as F
    from transrec.shards.batch import ImageContent, TextContent

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


def run_naive(args) -> dict:
    import torch
    from transrec.engine.data import make_loader, open_data
    from transrec.engine.trainer import seed_everything
    from transrec.models import build_model

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
        loss = naive_step(model, batch, lc.temperature, lc.logq, lc.l2_normalize)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step >= args.warmup:
            seqs += batch.batch_size
            items += int(batch.mask.sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seq_per_s": seqs / dt, "items_per_s": items / dt, "seq_per_cpu_s": seqs / cpu, "seconds": dt,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_engine(args) -> dict:
    import torch
    from transrec.engine.trainer import Trainer

    cfg = make_config(args)
    trainer = Trainer(cfg, show=False)
    marks = {}

    def mark(tr, step):
        # timed like the naive loop: from the end of the warm-up steps to the end of the last step,
        # inside one run (the loader's start-up and the run's set-up fall in the warm-up, as there)
        if step in (args.warmup, args.warmup + args.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[step] = (time.perf_counter(), time.process_time(), tr.items_encoded)

    trainer.after_step.append(mark)
    res = trainer.fit(steps=args.warmup + args.steps, save_at_end=False, final_eval=False)
    trainer.close()
    (t0, c0, items0), (t1, c1, items1) = marks[args.warmup], marks[args.warmup + args.steps]
    dt, cpu = t1 - t0, c1 - c0
    seqs = args.steps * cfg.data.batch_size
    return {"seq_per_s": seqs / dt, "seq_per_cpu_s": seqs / cpu, "items_per_s": (items1 - items0) / dt,
            "seconds": dt, "loss_first": res.losses[0], "loss_last": res.losses[-1],
            "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision}


# ----------------------------------------------------------------------------- orchestration

def one(args) -> int:
    fn = run_naive if args.one == "naive" else run_engine
    res = fn(args)
    res["peak_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_side(args, side: str, batch: int, tmp: str) -> dict:
    cmd = [sys.executable, __file__, "--one", side, "--preset", args.preset, "--batch", str(batch),
           "--max-len", str(args.max_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--data", args.data, "--run", str(Path(tmp) / f"run-{side}-{batch}"), *args.override]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    return json.loads(line[-1][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="config preset (tiny on the CPU, small-gpu on a GPU)")
    ap.add_argument("--batch", default="64,256", help="global batch sizes to measure (comma-separated)")
    ap.add_argument("--max-len", type=int, default=20, help="history positions per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--data", default="", help="dataset folder (default: a synthetic source world)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e.csv"))
    ap.add_argument("override", nargs="*", help="config overrides (key=value) for both sides")
    ap.add_argument("--one", choices=["naive", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.batch = int(args.batch)
        return one(args)

    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    date, sha = time.strftime("%Y-%m-%d %H:%M"), git_sha()
    mach = machine()
    print(f"# e2e training benchmark  {date}  {mach}  git {sha}  python {sys.version.split()[0]}")
    print(f"# load average before start: {os.getloadavg()[0]:.2f} (other processes share these cores; "
          "seq/cpu-s divides by the process's own CPU time and is the steadier figure then)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:
            from transrec.shards.synth import synthesize

            args.data = str(synthesize(Path(tmp) / "world", domain="source", n_users=args.users,
                                       n_items=args.items, min_len=args.max_len + 3,
                                       max_len=args.max_len + 10, seed=0))
            print(f"synthetic world: {args.users} users, {args.items} items (half image 32x32), "
                  f"sequences of {args.max_len + 3}-{args.max_len + 10} items")
        from transrec.engine.data import open_data

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
        print(f"{'batch':>5} {'side':>7} {'seq/s':>8} {'seq/cpu-s':>10} {'items enc/s':>12} {'peak MB':>8} "
              f"{'loss first->last':>17}")
        for batch in batches:
            res = {side: run_side(args, side, batch, tmp) for side in ("naive", "engine")}
            for side, r in res.items():
                print(f"{batch:5d} {side:>7} {r['seq_per_s']:8.1f} {r['seq_per_cpu_s']:10.1f} "
                      f"{r['items_per_s']:12.0f} {r['peak_mb']:8.0f} "
                      f"{r['loss_first']:8.3f}->{r['loss_last']:.3f}")
            wall = res["engine"]["seq_per_s"] / res["naive"]["seq_per_s"]
            cpu = res["engine"]["seq_per_cpu_s"] / res["naive"]["seq_per_cpu_s"]
            print(f"{batch:5d} engine / naive: {wall:.2f}x wall, {cpu:.2f}x per CPU-second")
            for side, r in res.items():
                rows.append({"date": date, "machine": mach, "git_sha": sha, "preset": args.preset,
                             "batch": batch, "positions": args.max_len + 1, "side": side,
                             "seq_per_s": round(r["seq_per_s"], 2),
                             "seq_per_cpu_s": round(r["seq_per_cpu_s"], 2),
                             "items_encoded_per_s": round(r["items_per_s"], 1),
                             "peak_mb": round(r["peak_mb"], 1),
                             "speedup_wall": round(r["seq_per_s"] / res["naive"]["seq_per_s"], 3),
                             "speedup_cpu": round(r["seq_per_cpu_s"] / res["naive"]["seq_per_cpu_s"], 3),
                             "load_avg": round(os.getloadavg()[0], 2)})
    out = Path(args.out)
    append_rows(out, rows)
    png = out.with_suffix(".png")
    plot(rows, png, cond)
    print(f"wrote {out} and {png}")
    return 0


def plot(rows, png, cond) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    panels = (("seq_per_s", "sequences / s (wall)"), ("seq_per_cpu_s", "sequences / CPU-s"),
              ("items_encoded_per_s", "items encoded / s"), ("peak_mb", "peak memory (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    width = 0.38
    for ax, (key, label) in zip(axes, panels):
        for k, (side, colour) in enumerate((("naive", "#999999"), ("engine", "#2a6fdb"))):
            vals = [next(r[key] for r in rows if r["batch"] == b and r["side"] == side) for b in batches]
            xs = [i + (k - 0.5) * width for i in range(len(batches))]
            bars = ax.bar(xs, vals, width=width, color=colour, label=side)
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
