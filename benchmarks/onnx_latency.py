"""User-encoder latency: onnxruntime (the exported graph) against PyTorch, on the CPU.

Run: .venv/bin/python benchmarks/onnx_latency.py [--presets tiny,small-gpu --batches 1,64 --repeats 300]

For each preset, its user encoder (``model.user``: layers, heads, max length; ``model.dim``) with
random weights, float32, eval mode, is exported by
:func:`~transrec.inference.onnx_export.export_user_encoder` (the item towers are not part of it, so
the preset's text and image encoders are never built or loaded). Both runtimes then turn the same
histories into scoring user vectors: ``--length`` items each (default: the preset's
``data.max_len``, the window a Recommender reads), right-aligned, full masks; PyTorch is
``model.encode_users`` plus the cosine normalisation under ``torch.inference_mode``, onnxruntime is
:class:`~transrec.inference.onnx_export.OnnxUserEncoder` (CPUExecutionProvider) on numpy arrays.
Each (preset, batch, runtime) gets ``--warmup`` untimed calls, then ``--repeats`` timed ones, one
``time.perf_counter`` pair per call; the table gives the median and the 99th percentile in
milliseconds and users per second at the median. Both runtimes use ``--threads`` intra-op threads
(default: torch's count). The runtimes alternate in blocks of 10 calls so that a load change on a
shared machine hits both alike; the load average is printed and recorded.

Rows are appended to benchmarks/results/onnx_latency.csv with the machine stamp (date, machine,
versions, commit; ``--csv``: another file; ``--no-csv``: none). ``--quick``: 30 repeats, 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transrec.config import build_config  # noqa: E402
from transrec.config.model import user_kind  # noqa: E402
from transrec.inference.onnx_export import OnnxUserEncoder, export_user_encoder  # noqa: E402
from transrec.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "onnx_latency.csv"
BLOCK = 10  # calls per runtime before switching to the other


def user_model(preset: str):
    """(config, model): the preset's user encoder inside an ID model of 16 items (the same
    ``UserEncoder`` and scoring rule as the preset's TransRec; no item towers to build)."""
    cfg = build_config(preset, None, [])
    m = cfg.model
    cfg.model = dataclasses.replace(m, kind="id", n_items=16,
                                    user=dataclasses.replace(m.user, kind=user_kind(m)))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, n_items=16).float().eval()


def quantiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def measure(model, enc: OnnxUserEncoder, batch: int, length: int, *, warmup: int, repeats: int,
            cosine: bool, seed: int) -> dict[str, list[float]]:
    """Per-call seconds of each runtime on one batch of ``batch`` histories of ``length`` items."""
    rng = np.random.default_rng(seed)
    history = rng.standard_normal((batch, length, enc.dim), dtype=np.float32)
    mask = np.ones((batch, length), dtype=bool)
    h_t, m_t = torch.from_numpy(history), torch.from_numpy(mask)

    def torch_call():
        with torch.inference_mode():
            u = model.encode_users(h_t, m_t)
            return F.normalize(u, dim=-1) if cosine else u

    def onnx_call():
        return enc(history, mask)

    calls = {"pytorch": torch_call, "onnxruntime": onnx_call}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    while len(times["onnxruntime"]) < repeats:
        for name, fn in calls.items():
            for _ in range(min(BLOCK, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small-gpu",
                    help="config presets whose user encoders are timed (default: %(default)s)")
    ap.add_argument("--batches", default="1,64",
                    help="users per call, comma-separated (default: %(default)s)")
    ap.add_argument("--length", type=int, default=0,
                    help="items per history (default: the preset's data.max_len)")
    ap.add_argument("--repeats", type=int, default=300, help="timed calls per runtime (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls first (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of both runtimes (default: torch's count)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="30 repeats, 5 warm-up calls")
    ap.add_argument("--csv", default=str(CSV),
                    help="results file rows are appended to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="do not append to a results file")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup = 30, 5
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches: comma-separated positive integers, got {args.batches!r}")
    if not presets or not batches or min(batches) < 1:
        ap.error("--presets and --batches need at least one entry each; batches are at least 1")
    if args.repeats < 1 or args.warmup < 0 or args.length < 0:
        ap.error("--repeats must be at least 1; --warmup and --length at least 0")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    import onnxruntime as ort  # lazy: fast --help

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx_latency_") as tmp:
        for preset in presets:
            cfg, model = user_model(preset)
            u = cfg.model.user
            length = args.length or int(cfg.data.max_len)
            if length > int(u.max_len):
                ap.error(f"--length {length} is over {preset}'s model.user.max_len {u.max_len}")
            t0 = time.perf_counter()
            info = export_user_encoder(model, cfg, Path(tmp) / f"{preset}.onnx", opset=args.opset)
            export_s = time.perf_counter() - t0
            enc = OnnxUserEncoder(info["path"], threads=threads)
            cosine = info["metric"] == "cosine"
            for batch in batches:
                times = measure(model, enc, batch, length, warmup=args.warmup, repeats=args.repeats,
                                cosine=cosine, seed=args.seed)
                for runtime, secs in times.items():
                    med, p99 = quantiles(secs)
                    rows.append({"preset": preset, "dim": int(cfg.model.dim), "layers": int(u.layers),
                                 "heads": int(u.heads), "user_kind": str(u.kind), "max_len": int(u.max_len),
                                 "length": length, "batch": batch, "runtime": runtime,
                                 "median_ms": round(med, 4), "p99_ms": round(p99, 4),
                                 "users_per_s": round(batch / med * 1e3, 1), "repeats": args.repeats,
                                 "warmup": args.warmup, "threads": threads, "opset": info["opset"],
                                 "onnxruntime": ort.__version__, "metric": info["metric"],
                                 "parity_max_abs_diff": f"{info['parity_max_abs_diff']:.2e}",
                                 "export_s": round(export_s, 2), "load": round(os.getloadavg()[0], 1)})

    command = "benchmarks/onnx_latency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    s = stamp()
    print("User encoder latency per call (random weights, float32, full right-aligned masks), "
          "PyTorch eager vs onnxruntime CPUExecutionProvider")
    print(f"{s['machine']}; torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads; "
          f"{args.repeats} timed calls after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}; "
          f"commit {s['commit']}; command: {command}")
    print("| preset | dim × layers × heads | length | batch | PyTorch median / p99 (ms) "
          "| onnxruntime median / p99 (ms) | speed-up (median) | parity |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["preset"], r["batch"], r["runtime"]): r for r in rows}
    for preset in presets:
        for batch in batches:
            pt, ox = by[(preset, batch, "pytorch")], by[(preset, batch, "onnxruntime")]
            print(f"| {preset} | {pt['dim']} × {pt['layers']} × {pt['heads']} | {pt['length']} | {batch} "
                  f"| {pt['median_ms']:.3f} / {pt['p99_ms']:.3f} "
                  f"| {ox['median_ms']:.3f} / {ox['p99_ms']:.3f} "
                  f"| {pt['median_ms'] / ox['median_ms']:.2f}× | {ox['parity_max_abs_diff']} |")
    if not args.no_csv:
        append_rows(args.csv, [{**s, **r} for r in rows])
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
