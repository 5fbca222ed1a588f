"""CI smoke of the kernel benchmark's CPU mode (chunked vs eager): it runs and writes its rows."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_benchmark_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: benchmarks/common.py
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu", "--shapes", "256x32,512x16", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert {(r["provider"], r["n"]) for r in rows} == {(p, n) for p in ("chunked", "torch")
                                                      for n in ("256", "512")}
    for r in rows:
        assert float(r["ms_median"]) > 0 and r["git_sha"] and r["machine"].startswith("cpu")
        assert r["flop_formula"] == "6*N*M*D"
    assert "chunked" in capsys.readouterr().out
