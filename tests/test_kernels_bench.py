"""CI smoke of the kernel benchmark's CPU mode (chunked vs eager): it runs and writes its rows."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch

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
    rows = list(csv.DictReader((tmp_path / "kernels.csv").read_text().splitlines()))
    assert {(r["provider"], r["n"]) for r in rows} == {(p, n) for p in ("chunked", "torch")
                                                      for n in ("256", "512")}
    for r in rows:
        assert float(r["ms_median"]) > 0 and r["git_sha"] and r["machine"].startswith("cpu")
        assert r["flop_formula"] == "6*N*M*D" and r["note"].startswith("rel err")
    assert "chunked" in capsys.readouterr().out


def test_agreement_check_catches_a_wrong_provider(monkeypatch):
    """Every provider is compared with the reference before it is timed: a loss with another
    temperature, or without the bias, must be caught."""
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



class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward exploded")


def test_gpu_code_path_dry_run_keeps_going_past_failing_providers(tmp_path, monkeypatch):
    """The one-shot GPU run, executed on the CPU: each provider x mode writes its row as it is
    measured; a provider that disagrees with the reference has MISMATCH in its rows, one failing at
    the timed shape gets 'failed' rows, and the run goes on to the next."""
    bench = _bench(monkeypatch)
    monkeypatch.setattr(bench, "CHECK_N", 64)
    real, eager = bench.provider, bench.eager_loss

    def provider(name):
        if name == "wrong":  # another temperature: caught by the check
            return lambda q, k, t, b: torch.nn.functional.cross_entropy((q @ k.T) + b, t)
        if name == "fragile":  # right at the check's shape, its backward fails at the timed one
            return lambda q, k, t, b: eager(q, k, t, b) if q.shape[0] == 64 else _FailingBackward.apply(
                eager(q, k, t, b))
        return real(name)

    monkeypatch.setattr(bench, "provider", provider)
    assert bench.main(["--dry-run", "--shapes", "48x8", "--providers", "wrong,fragile,transrec,torch",
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").read_text().splitlines()))
    got = {(r["provider"], r["mode"]): r for r in rows}
    modes = ("full", "forward", "backward")
    assert set(got) == {(p, m) for p in ("fragile", "transrec", "torch", "wrong") for m in modes}
    for m in modes:
        assert "MISMATCH" in got["wrong", m]["note"]
        assert "failed: RuntimeError: backward exploded" in got["fragile", m]["note"]
        assert got["fragile", m]["ms_median"] == "nan"
        for p in ("transrec", "torch"):
            r = got[p, m]
            assert r["machine"] == "dry-run:cpu" and r["dtype"] == "bf16" and float(r["ms_median"]) > 0
            assert r["note"].startswith("rel err") and "MISMATCH" not in r["note"]
    assert list(tmp_path.glob("kernels_*.png"))
