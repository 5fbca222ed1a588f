"""CI smoke of the kernel benchmark's CPU mode (chunked vs eager): it runs and writes its rows."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: benchmarks/common.py
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cpu_benchmark_smoke(tmp_path, capsys, monkeypatch):
    bench = _bench(monkeypatch)
    assert bench.main(["--cpu", "--shapes", "256x32,512x16", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert {(r["provider"], r["n"]) for r in rows} == {(p, n) for p in ("chunked", "torch")
                                                      for n in ("256", "512")}
    for r in rows:
        assert float(r["ms_median"]) > 0 and r["git_sha"] and r["machine"].startswith("cpu")
        assert r["flop_formula"] == "6*N*M*D" and r["note"].startswith("rel err")
    assert "chunked" in capsys.readouterr().out


def test_agreement_check_catches_a_wrong_provider(monkeypatch):
    """Every provider is compared with the reference before it is timed: a loss with another
    temperature, or without the bias, must be caught."""
    import torch
    import torch.nn.functional as F

    bench = _bench(monkeypatch)
    monkeypatch.setattr(bench, "CHECK_N", 96)
    tol = bench.AGREE_TOL[torch.float32]
    assert bench.agreement(bench.provider("torch"), 16, torch.float32, "cpu") <= tol
    assert bench.agreement(bench.provider("chunked"), 16, torch.float32, "cpu") <= tol
    wrong_tau = lambda q, k, t, b: F.cross_entropy((q @ k.T) / (2 * bench.TAU) + b, t)
    no_bias = lambda q, k, t, b: F.cross_entropy((q @ k.T) / bench.TAU, t)
    assert bench.agreement(wrong_tau, 16, torch.float32, "cpu") > 100 * tol
    assert bench.agreement(no_bias, 16, torch.float32, "cpu") > 100 * tol
