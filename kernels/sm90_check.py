"""Compile the Triton kernels for Hopper (sm_90) on any machine, no GPU needed, and print each
autotune config's registers, spill stack and shared memory (Triton ships ptxas and cuobjdump).

    .venv/bin/python -m transrec.kernels.sm90_check fwd 256      # stage (fwd|bwd), D
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stage, d = argv[0], int(argv[1])
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from transrec.kernels.triton_backward import _bwd_dk_kernel
    from transrec.kernels.triton_config import _BWD, _FWD, d_class, d_layout
    from transrec.kernels.triton_forward import _fwd_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bdc, ndc, even = d_layout(d)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for bm, bn, w, st in (_FWD if stage == "fwd" else _BWD)[d_class(bdc, ndc)]:
        common = dict(HAS_BIAS=True, EVEN_D=even, NUM_DC=ndc, BLOCK_DC=bdc, BLOCK_M=bm, BLOCK_N=bn,
                      DOT_FP32=False, IEEE=False)
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
                           options=dict(num_warps=w, num_stages=st))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        usage = " ".join(x for x in res.split() if x.startswith(("REG:", "STACK:")))
        print(f"{stage} D={d} BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={st}: {usage} "
              f"shared={k.metadata.shared} wgmma={'wgmma' in k.asm.get('ptx', '')} "
              f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
