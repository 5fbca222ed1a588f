#!/usr/bin/env bash
# Downloads the kernel benchmark's peers (the `bench` extra) as wheels into .whl/ for a GPU machine
# that cannot reach PyPI; benchmarks/gpu_kernels.sh installs whatever .whl/ holds. Run here, in the
# repo root, before the GPU run (the device tool carries ".whl"):
#   bash benchmarks/fetch_bench_wheels.sh
# Both are pure-Python wheels (Triton kernels inside); their only needs, torch and triton, are on the
# GPU machine already. The versions are those whose calls benchmarks/kernels.py was checked against.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l .whl
