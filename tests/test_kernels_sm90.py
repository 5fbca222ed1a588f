"""The Triton kernels compiled for Hopper (sm_90) on the CPU: every specialisation a launch can reach
fits in one block's shared memory (232,448 B), so the autotuner never meets a config that cannot
launch and a pinned tile never asks for one.

The launches come from the launchers themselves (``kernels/sm90_check.py``): each stage (forward with
and without the dQ accumulator, dK pass, dQ pass: both designs), launch dtype, D class
(``triton_config.CHECK_D``: 768 among them), bias and gradient switch, EVEN_M, split-M or not, and
every config of the autotune tables, specialised by Triton's own binder as on the card. The compiles run in a
subprocess without TRITON_INTERPRET (the kernels must be imported as compiled kernels).

`make test` runs the quick check: every config at the launches that need the most shared memory. The
full sweep (marked ``sm90_sweep``) compiles every launch and checks that premise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transrec.kernels import KernelInputError, sm90_check
from transrec.kernels.triton_config import CHECK_D, LAUNCH_DTYPES, MAX_D, SMEM_LIMIT, pinned, table
from transrec.kernels.triton_op import canonical_inputs

ROOT = Path(__file__).resolve().parents[1]


def _cuda_backend_missing() -> str | None:
    try:
        import triton  # optional: triton with its CUDA backend compiles for sm_90
        from triton.backends import backends  # optional: as above
    except ImportError as e:
        return f"triton not importable ({e})"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return None if ptxas.exists() else f"no ptxas at {ptxas}"


pytestmark = pytest.mark.skipif(_cuda_backend_missing() is not None, reason=str(_cuda_backend_missing()))


def _python(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _verify(tmp_path, *flags) -> list[dict]:
    """``sm90_check verify`` on two compiler processes: its rows, once it has found every one of them
    within the limit and the largest of each stage agreeing with the backend's LLIR stage."""

    out = tmp_path / "sm90.json"
    res = _python("-m", "transrec.kernels.sm90_check", "verify", *flags, "--jobs", "2", "--json", str(out))
    report = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0, f"sm90_check verify failed:\n{report}"
    rows = json.loads(out.read_text())["rows"]
    over = [(r["shared"], r["labels"][0]) for r in rows if r["shared"] > SMEM_LIMIT]
    assert not over, f"specialisations over {SMEM_LIMIT} B of shared memory: {over[:5]}"
    assert all(f"cross-check {stage}" in res.stdout for stage in ("fwd", "lse", "bwd", "dq")), report
    return rows


def _check_coverage(rows, dtypes, launches_per_config: dict):
    """Every stage x D x dtype x table config was compiled, at ``launches_per_config[stage]``
    launches each."""

    labels = [lab.split() for r in rows for lab in r["labels"]]
    for dclass, ds in CHECK_D.items():
        for d in ds:
            for dtype in dtypes:
                name = str(dtype)[6:]
                for stage, launches in launches_per_config.items():
                    mine = [x for x in labels if x[:4] == [stage, dclass, f"D={d}", name]]
                    tiles = {tuple(int(v.split("=")[1]) for v in x[-5:]) for x in mine}
                    want = {(r[0], r[1], r[2], r[3], int(r[4])) for r in table(stage, dclass, dtype.itemsize)}
                    assert tiles == want, f"{stage} {dclass} D={d} {name}: compiled {tiles}, table {want}"
                    assert len(mine) == launches * len(want), (stage, dclass, d, name, len(mine))


@pytest.mark.slow
def test_every_config_fits_in_shared_memory_at_its_largest_launch(tmp_path):
    """The quick check (what `make test` runs): every config of every table, at every D of CHECK_D,
    compiled at the launches that need the most shared memory (``sm90_check.QUICK_*``; the full sweep
    below checks that they do)."""

    rows = _verify(tmp_path, "--quick")
    dtypes = [getattr(torch, name) for name in sm90_check.QUICK_DTYPES]
    assert {d.itemsize for d in dtypes} == {d.itemsize for d in LAUNCH_DTYPES}  # every table
    _check_coverage(rows, dtypes, {"fwd": 1, "lse": 1, "bwd": len(sm90_check.QUICK_BWD), "dq": 1})
    assert all(sm90_check.is_quick(lab) for r in rows for lab in r["labels"])


@pytest.mark.slow
@pytest.mark.sm90_sweep
def test_every_reachable_specialisation_fits_in_shared_memory(tmp_path):
    """The full sweep: each stage, launch dtype, D of CHECK_D, gradient switch, EVEN_M, split-M or not
    and table config; and the premise of the quick check: per (stage, D, element size, config), the
    quick launches reach the largest shared memory of all its launches."""

    rows = _verify(tmp_path)
    # launches per config: the two M (EVEN_M or not) x the gradient switches of the stage x split-M
    # or not (the fused forward never splits)
    _check_coverage(rows, LAUNCH_DTYPES, {"fwd": 2, "lse": 2 * 2, "bwd": 2 * 3 * 2, "dq": 2 * 2})
    size = {str(d)[6:]: d.itemsize for d in LAUNCH_DTYPES}
    largest, quick = {}, {}
    for r in rows:
        for lab in r["labels"]:
            words = lab.split()
            key = (*words[:3], size[words[3]], *words[-5:])
            largest[key] = max(largest.get(key, 0), r["shared"])
            if sm90_check.is_quick(lab):
                quick[key] = max(quick.get(key, 0), r["shared"])
    short = {k: (v, quick.get(k)) for k, v in largest.items() if quick.get(k) != v}
    assert not short, f"the quick launches miss the largest shared memory (all, quick) of: {short}"


@pytest.mark.slow
def test_check_sees_the_launch_specialisation():
    """The check compiles what the card would: a backward config at D = 768 whose q tiles are copied
    asynchronously into shared memory (unit strides, aligned rows) needs more than the limit, the
    allocation-only figure equal to the full compile's; added to the table, ``verify`` reports it and
    fails, its cross-check of the largest agreeing."""
    code = """
import torch
from transrec.kernels import sm90_check as c
from transrec.kernels.triton_config import TABLES, config_kwargs
TABLES["bwd"]["large", 2].append((64, 64, 8, 3))  # before any launch builds the autotuner
label, launch = next(iter(c.launches("bwd", 768, [torch.bfloat16], [1024])))
fn, kw = c.configs_of(launch)[0]
spec = c.Spec(fn, launch.args, dict(kw, **config_kwargs((64, 64, 8, 3, True))))
assert spec.signature["stride_qd"] == "constexpr" and spec.constexprs, spec.signature
print("rc", c.main(["verify", "768", "--stage", "bwd", "--dtype", "bfloat16", "--quick", "--no-cache"]))
short, full = c.shared_bytes(spec), c.full_compile(spec)["shared"]
assert short == full > c.SMEM_LIMIT, (short, full)
"""

    res = _python("-c", code, timeout=300)
    report = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0 and "rc 1" in res.stdout, report
    over = [line for line in res.stdout.splitlines() if line.startswith("OVER")]
    assert over and all("BLOCK_M=64 BLOCK_N=64 warps=8 stages=3" in line for line in over), report
    check = re.search(r"cross-check bwd: LLIR stage (\d+) B, allocation pass (\d+) B", res.stdout)
    assert check and check[1] == check[2] and int(check[1]) > SMEM_LIMIT, report


def test_pinned_tiles_come_from_the_table():

    for stage in ("fwd", "lse", "bwd", "dq"):
        for dclass in ("small", "d256", "large"):
            for size in (2, 4):
                for row in table(stage, dclass, size):
                    kw = pinned(stage, dclass, size, row[0], row[1], row[4])
                    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["RESIDENT"]) == (row[0], row[1], row[4])
                    same_tiles = [r for r in table(stage, dclass, size) if (r[:2], r[4]) == (row[:2], row[4])]
                    assert (kw["num_warps"], kw["num_stages"]) == same_tiles[0][2:4]
    with pytest.raises(ValueError, match="not in the"):
        pinned("bwd", "large", 2, 128, 128, True)


def test_canonical_inputs():

    q = torch.randn(9, 40, dtype=torch.bfloat16)[1:]  # a view whose data starts 80 B in
    k = torch.randn(40, 7).t()  # not contiguous
    q2, k2, t2, b2 = canonical_inputs(q, k.to(torch.bfloat16), torch.zeros(8, dtype=torch.int16),
                                      torch.randn(40, dtype=torch.float16))
    for x in (q2, k2, t2, b2):
        assert x.is_contiguous() and x.data_ptr() % 16 == 0
    assert t2.dtype == torch.int64 and b2.dtype == torch.float32 and q2.dtype == torch.bfloat16
    torch.testing.assert_close(q2, q, rtol=0, atol=0)
    with pytest.raises(KernelInputError, match="float64"):
        canonical_inputs(q.double(), q.double(), t2, None)
    with pytest.raises(KernelInputError, match="at most"):
        canonical_inputs(torch.zeros(2, MAX_D + 1), torch.zeros(3, MAX_D + 1), t2[:2], None)
