"""benchmarks/gpu_proof.sh, the GPU proof and benchmark, in its dry-run mode: every part runs on the CPU
at toy sizes and leaves real rows, so the script keeps working on machines without a GPU; and the
results files' shared vocabulary: the machine stamp of ``transrec bench`` at the head of every row,
the bench rows merged under the command's columns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from transrec.engine import bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
PARTS = ("env", "tests", "e2e", "bench", "memory", "prefix", "kernels")
ABLATIONS = ("dedup", "prefix_cache", "kernel", "bf16")
# what the default parts leave in the output folder (docs/benchmarks.md lists them); the kernel
# plot is named after the card, the bench files after the preset (tiny in the dry run)
WRITTEN = {"proof.log", "summary.txt", "e2e.csv", "e2e.png", "bench_tiny.json", "bench_tiny.md",
           "zero_memory.csv", "prefix_cache.csv", "kernels.csv"}


def rows(path: Path) -> list[dict]:
    assert path.is_file(), f"{path.name} not written"
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def statuses(summary: Path) -> dict[str, str]:
    out = {}
    for line in summary.read_text().splitlines()[2:]:
        if line.startswith("#"):  # the part table ends at "# total"; the target figures follow
            break
        words = line.split()
        if len(words) >= 2 and words[0] in PARTS:
            out[words[0]] = words[1]
    return out


def run(out: Path | None, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    where = ["--out", str(out)] if out is not None else []
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *where, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_rows(tmp_path):
    out = tmp_path / "out"
    proc = run(out)
    summary = out / "summary.txt"
    assert summary.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    text = summary.read_text()
    assert statuses(summary) == {p: "ok" for p in PARTS}, text + (out / "proof.log").read_text()[-4000:]
    assert proc.returncode == 0, text

    e2e = rows(out / "e2e.csv")
    assert [r["side"] for r in e2e] == ["naive", "naive-unique", "engine", "engine-noprefix", "engine-torch",
                                        "engine-fp32"]
    assert all(float(r["seq_per_s"]) > 0 and float(r["peak_mb"]) > 0 for r in e2e)
    side = {r["side"]: r for r in e2e}
    assert side["engine"]["precision"] == "bf16" and side["engine-fp32"]["precision"] == "fp32"
    assert side["engine"]["zero_stage"] == "2" and float(side["naive"]["speedup_wall"]) == 1.0
    assert list(e2e[0])[:len(bench.STAMP)] == list(bench.STAMP)
    assert all(r["commit"] and r["torch"] for r in e2e)
    assert all(float(side[s]["mfu"]) > 0 for s in side if s.startswith("engine"))

    measured = bench.read_rows(out / "bench_tiny.json")  # transrec bench: the full engine, each switch off
    assert [r["label"] for r in measured] == ["tiny", *(f"tiny -{a}" for a in ABLATIONS)]
    full = measured[0]
    switches = (full["dedup"], full["prefix_cache"], full["precision"], full["zero_stage"])
    assert switches == (True, True, "bf16", 2)
    assert all(r["seq_per_s"] > 0 and r["flops_per_step"] > 0 and r["commit"] for r in measured)
    assert "| tiny -bf16 |" in (out / "bench_tiny.md").read_text()

    memory = rows(out / "zero_memory.csv")
    assert sorted(r["zero_stage"] for r in memory) == ["0", "2", "3"]
    assert all(float(r["peak_mb"]) > 0 for r in memory)

    prefix = rows(out / "prefix_cache.csv")
    assert {r["mode"] for r in prefix} == {"dedup", "dedup+prefix"}
    assert all(float(r["seq_per_s"]) > 0 for r in prefix)

    kernels = rows(out / "kernels.csv")
    assert any(r["provider"] == "transrec" and float(r["ms_median"]) > 0 for r in kernels)

    # the target figures are read off the rows
    assert "engine / naive fp32" in text and "frozen-prefix cache over dedup alone" in text
    assert "bench tiny batch 16 (bf16, ZeRO-2, 1 rank(s))" in text
    assert "tiny: full engine / switch off, seq/s: dedup " in text
    assert "ZeRO-2" in text and "kernel 96^2 x 16" in text
    log = (out / "proof.log").read_text()
    assert "passed" in log and "skipped" in log  # convergence test ran; the CUDA tests skip without CUDA
    files = {p.name for p in out.iterdir() if p.is_file()}
    plots = {f for f in files - WRITTEN if f.startswith("kernels_") and f.endswith(".png")}
    assert files - plots == WRITTEN and len(plots) <= 1, sorted(files)


def test_a_part_out_of_time_is_reported_not_run(tmp_path):
    proc = run(None, "--only", "e2e,kernels", "--deadline", "5", cwd=tmp_path)  # under the 15 s a part needs
    out = tmp_path / "proof_out"  # the default: proof_out/ in the working directory
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert statuses(out / "summary.txt") == {"e2e": "skipped", "kernels": "skipped"}
    assert not (out / "kernels.csv").exists()
    assert "missing or empty: e2e.csv" in (out / "summary.txt").read_text()


def test_usage_and_bad_flags():
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0
    for flag in ("--deadline SECONDS", "--out DIR", "--only PARTS", "--dry-run", "--bench-synth U,I",
                 "--bench-steps N"):
        assert flag in usage.stdout, flag
    for bad in (["--deadline"], ["--deadline", "soon"], ["--deadline", "-1"], ["--bogus"],
                ["--bench-synth", "2000"], ["--bench-steps", "0"]):
        proc = subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (bad, proc.stderr)


def _proof_summary(monkeypatch):
    return load_benchmark(monkeypatch, "proof_summary.py")


def _bench_row(label: str, seq_per_s: float) -> dict:
    row = dict.fromkeys(bench.FIELDS)
    row.update(label=label, preset="small-gpu", batch=256, world=1, precision="bf16", zero_stage=2,
               seq_per_s=seq_per_s, step_ms=256e3 / seq_per_s, tflops=12.5, mfu=0.0126, commit="abc1234",
               machine="NVIDIA H100 80GB HBM3", dedup=True)
    return row


def test_bench_rows_are_summarised_and_merged_under_the_command_columns(tmp_path, monkeypatch, capsys):
    summary = _proof_summary(monkeypatch)
    out = tmp_path / "proof"
    out.mkdir()
    rows = [_bench_row("small-gpu", 800.0), _bench_row("small-gpu -dedup", 200.0),
            _bench_row("small-gpu -bf16", 500.0)]
    (out / "bench_small-gpu.json").write_text(json.dumps({"command": ["transrec", "bench"], "rows": rows}))
    (out / "e2e.csv").write_text("date,machine,commit,side,batch,seq_per_s\n"
                                 "2026-12-01,card,abc1234,naive,64,5\n")
    assert summary.summarise(out, dry=False) == 1  # the other parts' files are missing
    text = capsys.readouterr().out
    assert "bench small-gpu batch 256 (bf16, ZeRO-2, 1 rank(s)): 800.0 seq/s" in text and "MFU 1.26%" in text
    assert "small-gpu: full engine / switch off, seq/s: dedup 4.00x, bf16 1.60x" in text
    assert "bench_*.json" not in text.split("missing or empty:")[1]

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(summary, "RESULTS", results)
    assert summary.merge(out) == 0
    with (results / "bench.csv").open(newline="") as f:
        merged = list(csv.DictReader(f))
        header = list(merged[0])
    assert header == list(bench.FIELDS)
    assert [(r["label"], float(r["seq_per_s"])) for r in merged] == [(r["label"], r["seq_per_s"])
                                                                     for r in rows]
    assert merged[0]["commit"] == "abc1234" and merged[0]["dedup"] == "True" and merged[0]["driver"] == ""
    assert (results / "e2e.csv").is_file()
    assert summary.merge(out) == 0  # a second merge appends under the same header
    assert (results / "bench.csv").read_text().count("\n") == 1 + 2 * len(rows)


def test_every_results_file_starts_with_the_machine_stamp(monkeypatch):
    """Every CSV in benchmarks/results/ has the product's stamp columns first (the commit as
    ``commit``), and the scripts' stamp is the product's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_common  # lazy: benchmarks/ (the script folder) is on the path from the line above

    stamp = bench_common.stamp()
    assert list(stamp) == list(bench.STAMP) and stamp["commit"] and stamp["torch"]
    files = sorted((ROOT / "benchmarks" / "results").glob("*.csv"))
    assert files
    for path in files:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        assert header[:len(bench.STAMP)] == list(bench.STAMP), path.name
        assert "git" not in header and "git_sha" not in header, path.name
        assert len(set(header)) == len(header), path.name
