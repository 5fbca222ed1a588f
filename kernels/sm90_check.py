"""Compile the Triton kernels for Hopper (sm_90) on any machine, no GPU needed, and print each
config's registers, spill stack and shared memory (Triton ships ptxas and cuobjdump).

    .venv/bin/python -m transrec.kernels.sm90_check fwd 256          # stage (fwd|bwd), D: autotune table
    .venv/bin/python -m transrec.kernels.sm90_check bwd 768 --sweep  # a wider grid, least spill first

A config over the card's shared memory (227 KB a block on H100) cannot launch: the autotuner skips it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
import time

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90


def compile_one(stage: str, d: int, bm: int, bn: int, warps: int, stages: int, resident: bool = True) -> dict:
    import triton
    from transrec.kernels.triton_backward import _bwd_dk_kernel
    from transrec.kernels.triton_config import d_layout
    from transrec.kernels.triton_forward import _fwd_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bdc, ndc, even = d_layout(d)
    common = dict(HAS_BIAS=True, EVEN_D=even, NUM_DC=ndc, BLOCK_DC=bdc, BLOCK_M=bm, BLOCK_N=bn,
                  RESIDENT=resident, DOT_FP32=False, IEEE=False)
    if stage == "fwd":
        fn, consts = _fwd_kernel, dict(common, COMPUTE_DQ=True, EVEN_M=False)
        ptrs = dict(Q="*bf16", K="*bf16", BIAS="*fp32", TGT="*i64", LOSS="*fp32", LSE2="*fp32", A="*fp32")
    else:
        fn, consts = _bwd_dk_kernel, dict(common, COMPUTE_DK=True, COMPUTE_DB=True)
        ptrs = dict(Q="*bf16", K="*bf16", BIAS="*fp32", TGT="*i64", LSE2="*fp32", G="*fp32", DK="*bf16",
                    DB="*fp32")
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in ("scale2", "inv_tau") else "i32")
           for a in fn.arg_names}
    t0 = time.time()
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    num = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", res)) else -1
    return dict(stage=stage, d=d, bm=bm, bn=bn, warps=warps, stages=stages, resident=resident,
                reg=num("REG"), stack=num("STACK"), shared=k.metadata.shared,
                wgmma="wgmma" in k.asm.get("ptx", ""), seconds=time.time() - t0)


def show(r: dict) -> str:
    fits = "" if r["shared"] <= SMEM_LIMIT else "  (over the shared-memory limit)"
    return (f"{r['stage']} D={r['d']} BLOCK_M={r['bm']} BLOCK_N={r['bn']} warps={r['warps']} "
            f"stages={r['stages']} resident={int(r['resident'])}: REG:{r['reg']} STACK:{r['stack']} "
            f"shared={r['shared']} wgmma={r['wgmma']} ({r['seconds']:.0f} s){fits}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="sm_90 register/spill/shared-memory report of the kernels")
    ap.add_argument("stage", choices=["fwd", "bwd"])
    ap.add_argument("d", type=int)
    ap.add_argument("--sweep", action="store_true", help="a wider grid than the autotune table")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from transrec.kernels.triton_config import _BWD, _FWD, d_class, d_layout, resident

    bdc, ndc, _ = d_layout(args.d)
    if args.sweep:
        grid = [c for c in itertools.product([64, 128], [32, 64, 128], [4, 8, 16], [2, 3, 4],
                                             [True, False] if ndc == 1 else [True])]
    else:
        table = (_FWD if args.stage == "fwd" else _BWD)[d_class(bdc, ndc)]
        grid = [tuple(c[:4]) + (resident(c),) for c in table]
    results = []
    for c in grid:
        try:
            results.append(compile_one(args.stage, args.d, *c))
        except Exception as e:  # noqa: BLE001 (a config the compiler refuses is reported, not fatal)
            print(f"{args.stage} D={args.d} {c}: compile failed: {type(e).__name__}: {str(e)[:160]}")
            continue
        print(show(results[-1]), flush=True)
    if args.sweep:
        print("\nleast spill first (fits in shared memory only):")
        fit = [r for r in results if r["shared"] <= SMEM_LIMIT]
        for r in sorted(fit, key=lambda r: (r["stack"], -r["bm"] * r["bn"])):
            print(show(r))


if __name__ == "__main__":
    main()
