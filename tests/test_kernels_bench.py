"""CI smoke of the kernel benchmark's CPU mode (chunked vs eager) and of its GPU code paths run on
the CPU (--dry-run; the design sweep with the kernels under the interpreter): they run and write
their rows."""

from __future__ import annotations

import csv
import os

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark

from transrec.kernels import triton_config as tc


def _bench(monkeypatch):
    return load_benchmark(monkeypatch, "kernel_bench.py", "bench_kernels")


def test_cpu_benchmark_smoke(tmp_path, capsys, monkeypatch):
    bench = _bench(monkeypatch)
    assert bench.main(["--cpu", "--shapes", "256x32,512x16", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").read_text().splitlines()))
    assert {(r["provider"], r["n"]) for r in rows} == {(p, n) for p in ("chunked", "torch")
                                                      for n in ("256", "512")}
    for r in rows:
        assert float(r["ms_median"]) > 0 and r["commit"] and r["device"] == "cpu" and r["torch"]
        assert r["flop_formula"] == "6*N*M*D" and r["note"].startswith("rel err")
    assert "chunked" in capsys.readouterr().out


def test_agreement_check_catches_a_wrong_provider(monkeypatch):
    """Every provider is compared with the reference before it is timed: a loss with another
    temperature, or without the bias, must be caught."""
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
            assert r["device"] == "dry-run:cpu" and r["dtype"] == "bf16" and float(r["ms_median"]) > 0
            assert r["note"].startswith("rel err") and "MISMATCH" not in r["note"]
    assert list(tmp_path.glob("kernels_*.png"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU dry run of the Triton stages "
                    "needs TRITON_INTERPRET=1 (set by conftest where there is no GPU)")
def test_design_sweep_dry_run(tmp_path, monkeypatch):
    """--sweep on the CPU (the kernels under the interpreter): each design (and split-M variant) as a
    provider in every mode, then each kernel stage at each config of its table with that exact config,
    unsplit and split, every row checked against the float32 reference first."""
    bench = _bench(monkeypatch)
    for stage in bench.STAGES:  # two configs a stage (time): one row each, with its own warps and stages
        monkeypatch.setitem(tc.TABLES[stage], ("small", 2), [(32, 32, 4, 2), (32, 32, 8, 3, False)])
    providers = ["transrec", "transrec:fused", "transrec:split", "transrec:split:2"]  # (time: one split-M)
    assert set(providers) <= set(bench.DESIGN_PROVIDERS)
    assert bench.main(["--dry-run", "--sweep", "--shapes", "40x16", "--check-n", "48", "--out",
                       str(tmp_path), "--providers", ",".join(providers)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").read_text().splitlines()))
    got = {(r["provider"], r["mode"]) for r in rows}
    assert got >= {(p, m) for p in providers for m in ("full", "forward", "backward")}
    stages = [r for r in rows if r["mode"] == "stage"]
    # each config unsplit, then split-M where it splits: "auto" does not at 40 rows, a forced 2 does
    # (not the fused forward, whose dQ accumulator is never split)
    configs = ("config 32x32 w4 s2 r1", "config 32x32 w8 s3 r0")
    assert [(r["provider"], r["note"].split(";")[0]) for r in stages] == [
        (f"stage:{s}", c + x) for s in bench.STAGES for c in configs
        for x in ("", " S2")[:1 if s == "fwd" else 2]]
    for r in rows:
        assert "MISMATCH" not in r["note"] and "failed" not in r["note"], r
        assert float(r["ms_median"]) > 0 and "rel err" in r["note"]
    assert {r["flop_formula"] for r in stages} == {"4*N*M*D", "2*N*M*D"}
