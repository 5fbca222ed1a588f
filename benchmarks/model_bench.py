"""Benchmark of a TransRec training step (forward + backward) with the tiny presets.

Variants, each at batch 32 and 128, L = 20 input positions (windows of 21), half text / half image
items drawn from a 3,000-item catalogue with Zipf(1.0) popularity, text up to 32 tokens, 32x32 images:

  naive       every position's item encoded separately (top-1 blocks trainable)
  dedup       one encoder pass per modality over the batch's unique items (top-1 trainable)
  dedup+ckpt  dedup with gradient checkpointing on both item encoders and the user encoder
  full        dedup, every encoder weight trainable
  full+ckpt   full with gradient checkpointing
  lora        dedup, LoRA r=8 on every block, base weights frozen

Per row: step time (forward + backward; the minimum over the timed steps, which other load on a
shared machine can only lengthen, and the median) and the item-encoder time alone (``encode_items``
forward + backward, minimum), the number of items encoded (positions P vs unique U, dedup ratio P/U),
the activation memory autograd saves for backward (``saved_mib``: every saved tensor's storage
once, weights excluded, recorded with saved-tensor hooks; deterministic, what checkpointing cuts)
and the peak memory of the step: on the CPU the rise of the process's peak RSS over the RSS before
the first step, each variant in a fresh subprocess (so peaks do not mix); on a GPU
torch.cuda.max_memory_allocated above the memory held before the step. Expectation: dedup cuts
encoder time by about the dedup ratio (``paired_encoder_speedup``: naive and dedup encoder passes
alternated on one model in one process, a ratio that other load on the machine hardly moves);
checkpointing lowers peak memory.

    .venv/bin/python benchmarks/model_bench.py                   # all rows, CSV + PNG in benchmarks/results/
    .venv/bin/python benchmarks/model_bench.py --batches 32 --variants naive,dedup --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from bench_common import append_rows, stamp, stamped  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ["naive", "dedup", "dedup+ckpt", "full", "full+ckpt", "lora"]
# after the machine stamp's columns (bench_common.stamped)
FIELDS = ["device", "dtype", "variant", "batch", "seq_len", "positions", "unique", "dedup_ratio", "step_ms",
          "step_ms_median", "encoder_ms", "peak_mib", "saved_mib", "trainable_params", "total_params",
          "paired_encoder_speedup", "note"]
N_ITEMS, SEQ_LEN, TEXT_LEN, IMAGE_SIZE, DIM = 3000, 20, 32, 32, 64


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_world(seed: int = 0):
    from transrec.shards.batch import ArrayContent  # lazy: after __main__ puts the repo root on sys.path

    rng = np.random.default_rng(seed)
    mod = (rng.random(N_ITEMS) < 0.5).astype(np.int8)
    row = np.zeros(N_ITEMS, np.int64)
    nt, ni = int((mod == 0).sum()), int((mod == 1).sum())
    row[mod == 0], row[mod == 1] = np.arange(nt), np.arange(ni)
    tokens = rng.integers(1000, 29000, (nt, TEXT_LEN)).astype(np.int32)
    lengths = rng.integers(8, TEXT_LEN + 1, nt)
    images = rng.integers(0, 256, (ni, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
    pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 1.0
    pop = pop[rng.permutation(N_ITEMS)]
    pop /= pop.sum()
    return ArrayContent(mod, row, tokens, lengths, images), pop


def make_batch(content, pop, batch: int, seed: int):
    from transrec.shards.batch import collate_windows  # lazy: after __main__ puts the repo root on sys.path

    rng = np.random.default_rng(seed)
    windows = [rng.choice(N_ITEMS, size=SEQ_LEN + 1, p=pop) for _ in range(batch)]
    return collate_windows(windows, np.arange(batch), SEQ_LEN + 1, content, np.log(pop))


def model_cfg(variant: str):
    from transrec.models import (  # lazy: after __main__ puts the repo root on sys.path
        ImageEncoderConfig,
        LoRAConfig,
        ModelConfig,
        TextEncoderConfig,
        UserEncoderConfig,
    )

    full = variant.startswith("full")
    lora = variant == "lora"
    ckpt = variant.endswith("+ckpt")
    trainable = "all" if (full or lora) else 1
    return ModelConfig(
        dim=DIM,
        text=TextEncoderConfig(name="tiny", trainable=trainable, grad_ckpt=ckpt, max_len=TEXT_LEN,
                               lora=LoRAConfig(r=8) if lora else None),
        image=ImageEncoderConfig(name="tiny", image_size=IMAGE_SIZE, trainable=trainable, grad_ckpt=ckpt,
                                 lora=LoRAConfig(r=8) if lora else None),
        user=UserEncoderConfig(kind="bidirectional", layers=2, heads=2, dropout=0.1, max_len=SEQ_LEN,
                               grad_ckpt=ckpt),
    )


def run_one(variant: str, batch_size: int, reps: int, device: str) -> dict:
    """One row, in this process (called in a fresh subprocess by the driver)."""
    import torch  # lazy: fast --help

    from transrec.models import build_model  # lazy: after __main__ puts the repo root on sys.path

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    content, pop = make_world()
    model = build_model(model_cfg(variant)).to(device).train()
    batches = [make_batch(content, pop, batch_size, seed=s).to(device) for s in range(reps + 1)]
    dedup = variant != "naive"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(b):
        loss, _ = model(b, dedup=dedup)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def encoder_step(b):
        if dedup:
            out = model.encode_items(b.unique_items, b.text, b.image)
        else:  # the per-position content, as the naive forward builds it
            out = _per_position_table(model, b)
        out.sum().backward()
        model.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mib()
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # every tensor autograd keeps for backward, once per storage, weights excluded
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batches[0])  # warm-up (and the peak: activations + gradients of a whole step)
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else peak_rss_mib() - base
    times, enc_times = [], []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        sync()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        encoder_step(b)
        sync()
        enc_times.append(time.perf_counter() - t0)
    paired = ""
    if variant == "dedup":  # naive and dedup encoder passes alternated on one model: load-proof ratio
        naive_t, dedup_t = [], []
        for b in batches[1:]:
            for fn, acc in ((lambda x: _per_position_table(model, x), naive_t),
                            (lambda x: model.encode_items(x.unique_items, x.text, x.image), dedup_t)):
                t0 = time.perf_counter()
                fn(b).sum().backward()
                model.zero_grad(set_to_none=True)
                sync()
                acc.append(time.perf_counter() - t0)
        paired = round(min(naive_t) / min(dedup_t), 2)
    b = batches[1]
    positions = int(b.mask.sum())
    return {
        "variant": variant, "batch": batch_size, "seq_len": SEQ_LEN, "positions": positions,
        "unique": b.num_unique, "dedup_ratio": round(positions / b.num_unique, 3),
        "step_ms": round(1000 * min(times), 1), "step_ms_median": round(1000 * statistics.median(times), 1),
        "encoder_ms": round(1000 * min(enc_times), 1),
        "peak_mib": round(peak, 1), "saved_mib": round(sum(saved.values()) / 2**20, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()), "paired_encoder_speedup": paired,
    }


def _per_position_table(model, b):
    import torch  # lazy: fast --help

    from transrec.shards.batch import (  # lazy: after __main__ puts the repo root on sys.path
        ImageContent,
        TextContent,
    )

    rows = b.inverse[b.mask]
    p, u = int(rows.shape[0]), b.num_unique
    positions = torch.arange(p, device=rows.device)
    text = image = None
    if b.text is not None:
        t_row = torch.full((u,), -1, dtype=torch.long, device=rows.device)
        t_row[b.text.index] = torch.arange(b.text.index.shape[0], device=rows.device)
        r = t_row[rows]
        sel = r >= 0
        text = TextContent(b.text.input_ids[r[sel]], b.text.attention_mask[r[sel]], positions[sel])
    if b.image is not None:
        i_row = torch.full((u,), -1, dtype=torch.long, device=rows.device)
        i_row[b.image.index] = torch.arange(b.image.index.shape[0], device=rows.device)
        r = i_row[rows]
        sel = r >= 0
        image = ImageContent(b.image.pixels[r[sel]], positions[sel])
    return model.encode_items(positions, text, image)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # lazy: matplotlib only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(batches), 1)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    for j, bsz in enumerate(batches):
        sel = {r["variant"]: r for r in rows if r["batch"] == bsz}
        xs = [i + j * width for i in range(len(variants))]
        for ax, key in zip(axes, ("step_ms", "saved_mib")):
            ax.bar(xs, [sel[v][key] if v in sel else 0 for v in variants], width, label=f"batch {bsz}")
    for ax, lab in zip(axes, ("step time (ms, fwd+bwd, min)", "activations saved for backward (MiB)")):
        centre = width * (len(batches) - 1) / 2
        ax.set_xticks([i + centre for i in range(len(variants))], variants, rotation=20)
        ax.set_ylabel(lab)
        ax.legend()

    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(spec["variant"], spec["batch"], spec["reps"], spec["device"])))
        return 0
    import torch  # lazy: fast --help

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    run = stamp()
    cond = (f"{run['machine']} ({device}), fp32, tiny presets (text BERT 2x128, image ResNet 16/32/64), "
            f"d={DIM}, L={SEQ_LEN}, {TEXT_LEN} tokens, {IMAGE_SIZE}x{IMAGE_SIZE} images, half text / half "
            f"image, {N_ITEMS} items Zipf(1.0), torch {torch.__version__}")
    print(f"TransRec step benchmark: {cond}")
    print(f"{'variant':<11} {'batch':>5} {'P':>5} {'U':>5} {'P/U':>5} {'step ms':>9} {'enc ms':>8} "
          f"{'saved MiB':>9} {'peak MiB':>9} {'trainable':>10}")
    rows = []
    # Large blocks through mmap, freed memory trimmed: the process RSS then follows live tensors, so
    # the peak RSS of the step is a fair CPU stand-in for a GPU's max_memory_allocated.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    for bsz in batches:
        for v in variants:
            spec = json.dumps({"variant": v, "batch": bsz, "reps": args.reps, "device": device})
            proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True,
                                  env=env, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{v:<11} {bsz:>5} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[0][7:])
            r = {**run, **r, "device": device, "dtype": "fp32", "note": ""}
            rows.append(r)
            print(f"{v:<11} {bsz:>5} {r['positions']:>5} {r['unique']:>5} {r['dedup_ratio']:>5.2f} "
                  f"{r['step_ms']:>9.1f} {r['encoder_ms']:>8.1f} {r['saved_mib']:>9.1f} "
                  f"{r['peak_mib']:>9.1f} "
                  f"{r['trainable_params']:>10,}")
    if not rows:
        return 1
    print()
    for bsz in batches:
        sel = {r["variant"]: r for r in rows if r["batch"] == bsz}
        if "naive" in sel and "dedup" in sel:
            n, d = sel["naive"], sel["dedup"]
            print(f"batch {bsz}: dedup ratio P/U = {d['dedup_ratio']:.2f}; encoder time naive/dedup = "
                  f"{n['encoder_ms'] / d['encoder_ms']:.2f}x (alternated on one model: "
                  f"{d['paired_encoder_speedup']}x); step time naive/dedup = "
                  f"{n['step_ms'] / d['step_ms']:.2f}x")
        for base in ("dedup", "full"):
            if base in sel and f"{base}+ckpt" in sel:
                a, c = sel[base], sel[f"{base}+ckpt"]
                print(f"batch {bsz}: checkpointing ({base}) saved activations {a['saved_mib']:.0f} -> "
                      f"{c['saved_mib']:.0f} MiB, peak {a['peak_mib']:.0f} -> {c['peak_mib']:.0f} MiB, "
                      f"step {a['step_ms']:.0f} -> {c['step_ms']:.0f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "models.csv"
    append_rows(path, rows, stamped(FIELDS))
    tag = "cuda" if device == "cuda" else "cpu"
    plot(rows, out / f"models_{tag}.png", f"TransRec step, {cond}")
    print(f"wrote {path} and {out / f'models_{tag}.png'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
