#!/usr/bin/env bash
# One GPU session's kernel checks, prepared to run once in under 10 minutes (device tool, repo root):
#   TRANSREC_GIT_SHA=<the commit here> bash benchmarks/gpu_kernels.sh    (the copy there has no .git)
# 1. installs carried wheels from .whl/ if any (liger-kernel, cut-cross-entropy: fetch them here first
#    with `bash benchmarks/fetch_bench_wheels.sh`, then carry ".whl"),
# 2. runs the kernel tests on CUDA (the @gpu bf16 tests and the Triton cases on real kernels),
# 3. runs benchmarks/kernels.py (all providers x modes x shapes, bf16; autotuning printed),
# writing logs, the CSV rows and the PNG to $OUT (or benchmarks/results/gpu_run without $OUT).
# Afterwards, here: append $OUT/kernels.csv's rows to benchmarks/results/kernels.csv and commit the PNG.
# Without CUDA it runs the tests (interpreted) and the CPU benchmark instead, so it can be tried anywhere.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# transrec.* without installing the project: a shim package whose subpackages are the repo folders.
if ! $PY -c "import transrec.kernels" 2>/dev/null; then
  SHIM=$(mktemp -d)
  mkdir "$SHIM/transrec"
  cp transrec/*.py "$SHIM/transrec/"
  for p in kernels models shards engine; do ln -s "$PWD/$p" "$SHIM/transrec/$p"; done
  export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import liger_kernel; print('liger-kernel present')" 2>&1 | tail -1
  $PY -c "import cut_cross_entropy; print('cut-cross-entropy present')" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

# -P: the working directory is not put first on sys.path, where the repo's own transrec/ (without its
# subpackages) would hide the shim.
timeout 240 $PY -P -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_kernels_convergence.py \
  2>&1 | tee "$OUT/pytest_kernels.txt"
echo "tests done after $(( $(date +%s) - START )) s"

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  TRITON_PRINT_AUTOTUNING=1 timeout $(( 560 - ($(date +%s) - START) )) $PY benchmarks/kernels.py --out "$OUT" \
    2>&1 | tee "$OUT/bench_kernels.txt"
else
  $PY benchmarks/kernels.py --cpu --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.txt"
fi
echo "all done after $(( $(date +%s) - START )) s"
