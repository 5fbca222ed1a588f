"""The figures a GPU proof run is read for, from the CSVs and the ``transrec bench`` JSON files that
benchmarks/gpu_proof.sh wrote, each beside its target where it has one (benchmark figures, not tests:
a figure below its target is reported, not failed).

    python benchmarks/proof_summary.py DIR [--dry-run]   # print them (gpu_proof.sh: into summary.txt)
    python benchmarks/proof_summary.py --merge DIR       # DIR's rows -> benchmarks/results/*.csv, + PNGs

``--merge`` appends each CSV's rows to the file of the same name, and the rows of every
``bench_<preset>.json`` to bench.csv (``transrec.engine.bench.FIELDS``, the command's columns).
Exit status 1 when a file that a part should have written is missing or empty.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

from bench_common import append_rows  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CSVS = ("e2e.csv", "zero_memory.csv", "prefix_cache.csv", "kernels.csv")
BENCH_GLOB = "bench_*.json"  # the bench part: one transrec bench JSON per preset
E2E_TARGETS = {256: 12.0, 64: 6.0}
PREFIX_TARGET = 2.5
MEMORY_TARGET_GIB = 12.0
LEVERS = (("dedup+objective", "naive-unique", "naive"), ("prefix cache", "engine", "engine-noprefix"),
          ("kernel", "engine", "engine-torch"), ("precision", "engine", "engine-fp32"))


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def bench_rows(folder: Path) -> list[dict]:
    """The rows of every ``bench_<preset>.json`` in ``folder`` (a file that is not one is skipped)."""
    rows = []
    for path in sorted(folder.glob(BENCH_GLOB)):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += [r for r in (doc.get("rows") if isinstance(doc, dict) else None) or [] if isinstance(r, dict)]
    return rows


def bench_lines(rows: list[dict]) -> list[str]:
    """Per measured config: seq/s, step time, TFLOP/s and MFU; then its ablations (the rows labelled
    ``LABEL -SWITCH``) as the full engine's seq/s over the seq/s with that switch off."""
    full: dict[str, dict] = {}
    ablations: dict[str, list[str]] = {}
    for r in rows:
        label = str(r.get("label", ""))
        base, sep, switch = label.rpartition(" -")
        if sep and base in full:
            f = full[base]
            if f.get("seq_per_s") and r.get("seq_per_s"):
                ablations[base].append(f"{switch} {f['seq_per_s'] / r['seq_per_s']:.2f}x")
            continue
        full[label], ablations[label] = r, []
    lines = []
    for label, r in full.items():
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.2%}"
        lines.append(f"bench {label} batch {r.get('batch')} ({r.get('precision')}, "
                     f"ZeRO-{r.get('zero_stage')}, {r.get('world')} rank(s)): {r['seq_per_s']:.1f} seq/s, "
                     f"step {r['step_ms']:.1f} ms, {r['tflops']:.3g} TFLOP/s, MFU {mfu}")
        if ablations[label]:
            lines.append(f"    {label}: full engine / switch off, seq/s: " + ", ".join(ablations[label]))
    return lines


def verdict(value: float, target: float | None, higher: bool, dry: bool) -> str:
    if target is None:
        return ""
    sign = ">=" if higher else "<="
    if dry:
        return f"(target {sign} {target:g} on the GPU; dry run: not comparable)"
    ok = value >= target if higher else value <= target
    return f"(target {sign} {target:g}: {'met' if ok else 'NOT met'})"


def summarise(folder: Path, dry: bool) -> int:
    missing = [name for name in CSVS if not read(folder / name)]
    bench = bench_rows(folder)
    if not bench:
        missing.append(BENCH_GLOB)
    print("# target figures (benchmark figures, not tests)")
    e2e = read(folder / "e2e.csv")
    by = {(int(r["batch"]), r["side"]): r for r in e2e}
    for batch in sorted({b for b, _ in by}, reverse=True):
        eng, naive = by.get((batch, "engine")), by.get((batch, "naive"))
        if eng and naive:
            x = float(eng["seq_per_s"]) / float(naive["seq_per_s"])
            print(f"e2e {eng['preset']} batch {batch}: engine / naive fp32 {x:.2f}x seq/s "
                  f"({float(eng['seq_per_s']):.1f} vs {float(naive['seq_per_s']):.1f}) "
                  f"{verdict(x, E2E_TARGETS.get(batch), True, dry)}")
        parts = []
        for label, a, b in LEVERS:
            ra, rb = by.get((batch, a)), by.get((batch, b))
            if ra and rb:
                parts.append(f"{label} {float(ra['seq_per_s']) / float(rb['seq_per_s']):.2f}x")
        if parts:
            print(f"    batch {batch} levers: " + ", ".join(parts))
    for line in bench_lines(bench):
        print(line)
    for r in read(folder / "prefix_cache.csv"):
        if r["mode"] == "dedup+prefix":
            x = float(r["speedup"])
            print(f"frozen-prefix cache over dedup alone, {r['preset']} batch {r['batch']}: {x:.2f}x seq/s "
                  f"{verdict(x, PREFIX_TARGET, True, dry)}")
    for r in read(folder / "zero_memory.csv"):
        gib = float(r["peak_mb"]) / 1024
        target = MEMORY_TARGET_GIB if r["zero_stage"] == "2" and r["batch"] == "256" else None
        print(f"peak memory {r['preset']} batch {r['batch']} ZeRO-{r['zero_stage']} {r['precision']}: "
              f"{gib:.2f} GiB {verdict(gib, target, False, dry)}".rstrip())
    kern = read(folder / "kernels.csv")
    for shape in dict.fromkeys((r["n"], r["d"]) for r in kern):
        ms = {r["provider"]: float(r["ms_median"]) for r in kern
              if (r["n"], r["d"]) == shape and r["mode"] == "full" and r["ms_median"]}
        if "transrec" in ms:
            others = ", ".join(f"{p} {v:.3g} ms ({v / ms['transrec']:.2f}x)" for p, v in ms.items()
                               if p != "transrec")
            print(f"kernel {shape[0]}^2 x {shape[1]} fwd+bwd: transrec {ms['transrec']:.3g} ms; {others}")
        else:
            print(f"kernel {shape[0]}^2 x {shape[1]}: no transrec row (failed its check or not reached)")
    if missing:
        print(f"missing or empty: {', '.join(missing)}")
    return 1 if missing else 0


def merge(folder: Path) -> int:
    summary = folder / "summary.txt"
    if summary.is_file() and "DRY RUN" in summary.read_text():
        print(f"{folder} holds a dry run: nothing merged", file=sys.stderr)
        return 1
    for name in CSVS:
        rows = read(folder / name)
        if rows:
            append_rows(RESULTS / name, rows, list(rows[0]))
            print(f"{len(rows)} rows -> {RESULTS / name}")
    rows = bench_rows(folder)
    if rows:
        from transrec.engine.bench import FIELDS  # lazy: torch, for the merge only

        extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIELDS]  # e.g. a sweep's
        append_rows(RESULTS / "bench.csv", rows, [*FIELDS, *extra])
        print(f"{len(rows)} rows -> {RESULTS / 'bench.csv'}")
    card = next((r["machine"] for r in read(folder / "e2e.csv")), "")
    for png in folder.glob("*.png"):
        dest = png.name
        if png.name == "e2e.png" and card:
            dest = "e2e_" + re.sub(r"\W+", "_", card).strip("_") + ".png"
        shutil.copyfile(png, RESULTS / dest)
        print(f"{png.name} -> {RESULTS / dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the output folder of a gpu_proof.sh run (its --out)")
    ap.add_argument("--dry-run", action="store_true", help="a dry run's figures: no target verdicts")
    ap.add_argument("--merge", action="store_true", help="append the rows to benchmarks/results/ instead")
    args = ap.parse_args(argv)
    return merge(args.folder) if args.merge else summarise(args.folder, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
