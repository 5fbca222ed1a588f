"""Benchmark of the frozen-prefix cache: TransRec training throughput and peak memory with per-batch
dedup only vs dedup + the frozen-prefix cache (transrec.shards.prefix_cache), same model, same data.

Each (preset, batch, mode) runs in a fresh subprocess so that peak memory is its own (CPU: peak RSS
of the process, which counts the touched pages of memory-mapped stores; GPU: peak allocated CUDA
memory). A step is what the trainer does per micro-batch: assemble the batch from the item content
(dedup + gather, and the cached prefixes in the cache mode), move it to the device, forward,
backward, AdamW step. A producer thread assembles batches ahead, as loader workers would.
sequences/s = batch x timed steps / wall time of the timed steps. The cache's one-time build
(seconds, bytes per item per modality) is reported beside it.

Presets:

- ``cpu-tiny``: text ``small`` (4-layer BERT, 256 hidden, random init) with the top 1 block
  trainable + image ``tiny`` (3-stage ResNet) with the top stage trainable at 64x64, batch 32 and
  128, fp32 on the CPU;
- ``cpu-pretrained``: all-MiniLM-L6-v2 (top 2 of 6 blocks) + EfficientNet-Lite0 (top 2 of 7
  stages) at 128x128, batch 32, fp32 on the CPU;
- ``gpu`` (``--gpu``): BERT-base layout (12 x 768, random init) top 2 blocks + ResNet-18 layout last
  2 stages, 224x224 images, 25 positions, batch 64 and 256, bf16 autocast on CUDA.

Item content is an ArrayContent over memory-mapped arrays (what the item cache is), random token ids
(titles of 6..max_len tokens) and random pixels; half the items are images. Sequences draw items
with a power-law popularity, so a batch repeats items as real feedback does (the dedup ratio is
printed). Speed does not depend on what the titles say, so random content is fair here.

    .venv/bin/python benchmarks/prefix_cache.py                    # CPU presets
    .venv/bin/python benchmarks/prefix_cache.py --presets cpu-tiny --batches 32
    python benchmarks/prefix_cache.py --gpu                        # on a CUDA machine
    python benchmarks/prefix_cache.py --gpu --batches 256 --repeats 1 --steps 12 --csv OUT/prefix_cache.csv
    .venv/bin/python benchmarks/prefix_cache.py --gpu --smoke      # the GPU path at toy sizes, CPU

Rows are appended to benchmarks/results/prefix_cache.csv with the machine stamp (date, machine or
card, versions, commit) and the device measured on; a PNG per machine kind goes beside it
(prefix_cache_cpu.png / prefix_cache_gpu.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from bench_common import append_rows, stamp, stamped  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CSV_PATH = RESULTS / "prefix_cache.csv"
# after the machine stamp's columns (bench_common.stamped)
FIELDS = ["device", "preset", "text_encoder", "image_encoder", "image_size", "positions", "batch", "mode",
          "precision", "cache_dtype", "seq_per_s", "speedup", "step_ms", "assembly_ms", "unique_items",
          "dedup_ratio", "eval_items_per_s", "eval_speedup", "peak_mem_gib", "mem_kind", "cache_build_s",
          "text_bytes_per_item", "image_bytes_per_item", "cache_disk_gib", "n_items", "steps", "note"]


def _import_transrec():
    """``import transrec.*``; without an installed project, from the repo root."""
    try:
        import transrec.shards.prefix_cache  # lazy: the probe for an installed project  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))  # the repo root: transrec/<room> are links to its folders
        import transrec.shards.prefix_cache  # lazy: from the repo root  # noqa: F401


@dataclass
class Preset:
    name: str
    text: str
    text_trainable: int
    image: str
    image_trainable: int
    image_size: int
    text_len: int
    positions: int  # history positions (window = positions + 1)
    batches: tuple[int, ...]
    n_items: int
    steps: int
    warmup: int
    device: str  # "cpu" | "cuda"
    precision: str  # fp32 | bf16 (autocast)
    dim: int = 128


PRESETS = {
    "cpu-tiny": Preset("cpu-tiny", "small", 1, "tiny", 1, 64, 24, 20, (32, 128), 3000, 8, 2, "cpu", "fp32"),
    "cpu-pretrained": Preset("cpu-pretrained", "minilm", 2, "efficientnet-lite0", 2, 128, 24, 20, (32,),
                             1200, 4, 1, "cpu", "fp32"),
    "gpu": Preset("gpu", "base", 2, "resnet18", 2, 224, 32, 25, (64, 256), 20000, 30, 5, "cuda", "bf16",
                  dim=256),
}
SMOKE = {"n_items": 200, "steps": 2, "warmup": 1, "batches": (4,), "image_size": 32, "text_len": 12,
         "positions": 6, "device": "cpu", "precision": "fp32", "text": "tiny", "text_trainable": 1}


# ----------------------------------------------------------------------------- one measurement

def make_catalogue(p: Preset, folder: Path, seed: int = 0):
    """An ArrayContent over memory-mapped arrays (the item cache's layout), half text half image."""
    from transrec.shards.batch import IMAGE, TEXT, ArrayContent  # lazy: after _import_transrec()

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mod = np.where(rng.random(p.n_items) < 0.5, IMAGE, TEXT).astype(np.int8)
    row = np.zeros(p.n_items, np.int64)
    nt, ni = int((mod == TEXT).sum()), int((mod == IMAGE).sum())
    row[mod == TEXT], row[mod == IMAGE] = np.arange(nt), np.arange(ni)
    tok_path, img_path = folder / "tokens.npy", folder / "images.npy"
    if not img_path.is_file():
        tokens = rng.integers(1000, 30000, (nt, p.text_len)).astype(np.int32)
        tokens[:, 0] = 101  # [CLS]
        np.save(folder / "lengths.npy", rng.integers(6, p.text_len + 1, nt).astype(np.int32))
        np.save(tok_path, tokens)
        images = np.lib.format.open_memmap(folder / "images.tmp.npy", mode="w+", dtype=np.uint8,
                                           shape=(ni, 3, p.image_size, p.image_size))
        for s in range(0, ni, 512):
            images[s:s + 512] = rng.integers(0, 256, images[s:s + 512].shape, dtype=np.uint8)
        images.flush()
        del images
        os.replace(folder / "images.tmp.npy", img_path)
    return ArrayContent(mod, row, np.load(tok_path, mmap_mode="r"), np.load(folder / "lengths.npy"),
                        np.load(img_path, mmap_mode="r"))


def window_batches(p: Preset, batch: int, n_batches: int, seed: int = 1):
    """Windows of positions + 1 items drawn with power-law popularity (rank^-0.8)."""
    rng = np.random.default_rng(seed)
    pop = (np.arange(p.n_items) + 1.0) ** -0.8
    pop = pop[rng.permutation(p.n_items)]
    pop /= pop.sum()
    log_q = np.log(pop)
    out = [[rng.choice(p.n_items, p.positions + 1, p=pop) for _ in range(batch)] for _ in range(n_batches)]
    return out, log_q


def model_config(p: Preset):
    from transrec.models import (  # lazy: after _import_transrec()
        ImageEncoderConfig,
        ModelConfig,
        TextEncoderConfig,
        UserEncoderConfig,
    )

    return ModelConfig(
        dim=p.dim,
        text=TextEncoderConfig(name=p.text, trainable=p.text_trainable, max_len=p.text_len, pooling="cls"),
        image=ImageEncoderConfig(name=p.image, image_size=p.image_size, trainable=p.image_trainable,
                                 pooling="mean"),
        user=UserEncoderConfig(layers=2, heads=2, dropout=0.1, max_len=p.positions),
    )


def peak_memory(device) -> tuple[float, str]:
    import torch  # lazy: fast --help

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss"


def run_one(p: Preset, batch: int, mode: str, work: Path, cache_dtype: str, loss_impl: str,
            producers: int = 1, eval_items: int = 1024) -> dict:
    import torch  # lazy: fast --help

    from transrec.models import build_model  # lazy: after _import_transrec()
    from transrec.models.prefix import maybe_wrap  # lazy: after _import_transrec()
    from transrec.shards.batch import collate_windows  # lazy: after _import_transrec()
    from transrec.shards.prefix_cache import PrefixCachedContent  # lazy: after _import_transrec()

    device = torch.device(p.device)
    torch.manual_seed(0)
    content = make_catalogue(p, work / "content")
    cfg = model_config(p)
    cfg.loss.impl = loss_impl
    model = build_model(cfg)
    note = ""
    build_s = 0.0
    bytes_per = {"text": 0.0, "image": 0.0}
    disk = 0.0
    if mode in ("build", "dedup+prefix"):
        lines: list[str] = []
        content = maybe_wrap(content, model, cache_dir=work / "prefix", dtype=cache_dtype, device=device,
                             progress=False, log=lines.append)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        if not isinstance(content, PrefixCachedContent):
            raise SystemExit(f"prefix cache did not apply: {lines}")
        for name, store in content.stores.items():
            build_s += float(store.meta["build_seconds"])
            bytes_per[name] = store.bytes_per_item
            disk += store.nbytes / 2**30
    if mode == "build":  # the one-time build, in its own process so its memory is not counted
        return {"cache_build_s": build_s}
    model.to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_batches = p.warmup + p.steps
    windows, log_q = window_batches(p, batch, n_batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if p.precision == "bf16" and device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    # producer threads assemble (dedup + gather + pin) batches ahead of the steps, as loader workers do
    q: queue.Queue = queue.Queue(maxsize=2 + producers)
    assembly = []

    def produce(k: int):
        for i in range(k, n_batches, producers):
            t0 = time.perf_counter()
            b = collate_windows(windows[i], np.arange(batch), p.positions + 1, content, log_q)
            if device.type == "cuda":
                b = b.pin_memory()
            assembly.append(time.perf_counter() - t0)
            q.put(b)

    threads = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(producers)]
    for th in threads:
        th.start()
    uniques = []
    t_start = None
    for i in range(n_batches):
        if i == p.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        b = q.get().to(device, non_blocking=True)
        uniques.append(b.num_unique)
        with amp:
            loss, _ = model(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    for th in threads:
        th.join()
    # evaluation encodes the catalogue through the same content source (eval mode, chunked)
    model.eval()
    n_eval = min(eval_items, p.n_items)
    with torch.no_grad(), amp:
        t0 = time.perf_counter()
        for s in range(0, n_eval, 512):
            items = np.arange(s, min(s + 512, n_eval))
            text, image = content.gather(items)
            model.encode_items(torch.from_numpy(items).to(device),
                               text.to(device, non_blocking=True) if text is not None else None,
                               image.to(device, non_blocking=True) if image is not None else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        eval_s = time.perf_counter() - t0
    mem, mem_kind = peak_memory(device)
    valid = batch * (p.positions + 1)
    return {
        "seq_per_s": batch * p.steps / wall, "eval_items_per_s": n_eval / eval_s,
        "step_ms": 1000 * wall / p.steps,
        "assembly_ms": 1000 * float(np.mean(assembly[p.warmup:])), "unique_items": float(np.mean(uniques)),
        "dedup_ratio": valid / float(np.mean(uniques)), "peak_mem_gib": mem, "mem_kind": mem_kind,
        "cache_build_s": build_s, "text_bytes_per_item": bytes_per["text"],
        "image_bytes_per_item": bytes_per["image"], "cache_disk_gib": disk, "final_loss": float(loss),
        "note": note,
    }


# ----------------------------------------------------------------------------- driver

def child(args) -> None:
    _import_transrec()
    spec = json.loads(args.one)
    p = Preset(**{**spec["preset"], "batches": tuple(spec["preset"]["batches"])})
    out = run_one(p, spec["batch"], spec["mode"], Path(spec["work"]), spec["cache_dtype"], spec["loss_impl"],
                  spec["producers"], spec["eval_items"])
    print("RESULT " + json.dumps(out), flush=True)


def measure(p: Preset, batch: int, mode: str, work: Path, args) -> dict:
    spec = {"preset": asdict(p), "batch": batch, "mode": mode, "work": str(work),
            "cache_dtype": args.cache_dtype, "loss_impl": args.loss_impl,
            "producers": args.producers or (min(8, max(1, (os.cpu_count() or 2) // 2))
                                            if p.device == "cuda" else 1),
            "eval_items": args.eval_items or (8192 if p.device == "cuda" else 1024)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stderr.splitlines() if mode == "build" else []:
        if line.startswith("prefix cache") or line.startswith("frozen-prefix"):
            print("   ", line)
    res = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not res:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{p.name} batch {batch} {mode} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(res[-1][len("RESULT "):])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # lazy: matplotlib only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    groups = sorted({(r["preset"], int(r["batch"])) for r in rows})
    labels = [f"{pr}\nbatch {b}" for pr, b in groups]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(groups) + 3), 4))
    for ax, key, ylabel in ((axes[0], "seq_per_s", "sequences / s"), (axes[1], "peak_mem_gib", "peak GiB")):
        for k, mode in enumerate(("dedup", "dedup+prefix")):
            vals = [next((float(r[key]) for r in rows if (r["preset"], int(r["batch"])) == g
                          and r["mode"] == mode), 0.0) for g in groups]
            xs = [i + (k - 0.5) * 0.38 for i in range(len(groups))]
            bars = ax.bar(xs, vals, width=0.38, label=mode)
            if key == "seq_per_s" and mode == "dedup+prefix":
                for bar, g in zip(bars, groups):
                    sp = next((r["speedup"] for r in rows if (r["preset"], int(r["batch"])) == g
                               and r["mode"] == mode), "")
                    ax.annotate(f"{float(sp):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_title("training throughput")
    axes[1].set_title(f"peak memory ({rows[0]['mem_kind']})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="run the GPU preset (BERT-base + ResNet-18, 224px)")
    ap.add_argument("--presets", default="", help="comma-separated preset names (default: the CPU ones)")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes (default: the preset's)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script runs")
    ap.add_argument("--cache-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--loss-impl", default="auto", choices=["auto", "torch", "chunked", "triton"])
    ap.add_argument("--producers", type=int, default=0,
                    help="batch-assembly threads (default: 1 on the CPU, up to 8 with CUDA)")
    ap.add_argument("--eval-items", type=int, default=0,
                    help="items encoded for the evaluation figure (default: 1024 CPU, 8192 CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (batch, mode); the best is kept")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    ap.add_argument("--no-write", action="store_true", help="print only (no CSV/PNG)")
    ap.add_argument("--csv", type=Path, default=None,
                    help="append the rows to this CSV instead (no PNG; with --smoke too), as measured")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per run (default: the preset's)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        child(args)
        return
    _import_transrec()
    default = ["gpu"] if args.gpu else ["cpu-tiny", "cpu-pretrained"]
    names = [s for s in args.presets.split(",") if s] or default
    for n in names:
        if n not in PRESETS:
            raise SystemExit(f"unknown preset {n!r}; choose from {', '.join(PRESETS)}")
    import torch  # lazy: fast --help

    rows = []
    run = stamp()
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as tmp:
        for n in names:
            p = PRESETS[n]
            if args.smoke:
                p = Preset(**{**asdict(p), **SMOKE})
            if args.steps:
                p = Preset(**{**asdict(p), "steps": args.steps})
            if p.device == "cuda" and not torch.cuda.is_available():
                raise SystemExit(f"preset {n} needs CUDA (no device found); use --smoke to check it on "
                                 "the CPU")
            batches = [int(b) for b in args.batches.split(",") if b] or list(p.batches)
            print(f"== {p.name}: text {p.text} top {p.text_trainable} trainable, image {p.image} top "
                  f"{p.image_trainable} trainable at {p.image_size}px, {p.positions} positions, "
                  f"{p.n_items} items, {p.precision} on {p.device} of {run['machine']}, "
                  f"cache {args.cache_dtype}", flush=True)
            work = Path(tmp) / p.name
            measure(p, batches[0], "build", work, args)  # catalogue + prefix stores, built once
            for b in batches:
                # modes alternate, repeated; the best run of each is kept (a shared machine is noisy)
                best: dict[str, dict] = {}
                for _ in range(args.repeats):
                    for mode in ("dedup", "dedup+prefix"):
                        r = measure(p, b, mode, work, args)
                        if mode not in best or r["seq_per_s"] > best[mode]["seq_per_s"]:
                            best[mode] = r
                batch_rows = []
                for mode in ("dedup", "dedup+prefix"):
                    r = best[mode]
                    speed = r["seq_per_s"] / best["dedup"]["seq_per_s"]
                    r["eval_speedup"] = r["eval_items_per_s"] / best["dedup"]["eval_items_per_s"]
                    r["note"] = f"best of {args.repeats}"
                    print(f"  batch {b:4d} {mode:13s} {r['seq_per_s']:9.1f} seq/s  {speed:5.2f}x  "
                          f"step {r['step_ms']:8.1f} ms (assembly {r['assembly_ms']:.1f} ms)  "
                          f"unique {r['unique_items']:.0f} (dedup {r['dedup_ratio']:.2f}x)  "
                          f"peak {r['peak_mem_gib']:.2f} GiB  eval {r['eval_items_per_s']:.0f} items/s "
                          f"({r['eval_speedup']:.2f}x)", flush=True)
                    batch_rows.append({
                        **run, "device": p.device, "preset": p.name + ("-smoke" if args.smoke else ""),
                        "text_encoder": f"{p.text} top{p.text_trainable}",
                        "image_encoder": f"{p.image} top{p.image_trainable}", "image_size": p.image_size,
                        "positions": p.positions, "batch": b, "mode": mode, "precision": p.precision,
                        "cache_dtype": args.cache_dtype if mode != "dedup" else "",
                        "speedup": round(speed, 3), "n_items": p.n_items, "steps": p.steps,
                        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                           if k in FIELDS},
                    })
                rows += batch_rows
                if args.csv:
                    append_rows(args.csv, batch_rows, stamped(FIELDS))
    if args.csv:
        print(f"wrote {args.csv}")
        return
    if args.no_write or args.smoke:
        return
    append_rows(CSV_PATH, rows, stamped(FIELDS))
    kind = "gpu" if any(PRESETS[n].device == "cuda" for n in names) else "cpu"
    png = RESULTS / f"prefix_cache_{kind}.png"
    # the plot shows the latest row of every (preset, batch, mode) measured on the machine named in each row
    with CSV_PATH.open() as f:
        latest = {(r["preset"], r["batch"], r["mode"]): r for r in csv.DictReader(f)
                  if r["machine"] == rows[0]["machine"]}
    plot(list(latest.values()), png, f"{rows[0]['machine']}  |  latest {run['date']}  |  "
         f"commit {run['commit']}  |  prefix cache {args.cache_dtype}")
    print(f"wrote {CSV_PATH} and {png}")


if __name__ == "__main__":
    main()
