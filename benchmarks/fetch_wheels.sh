#!/usr/bin/env bash
# Offline install helper for benchmarks/gpu_proof.sh: collects into .whl/ every wheel the proof needs
# beyond torch (CUDA), Triton, transformers and peft, for a GPU machine that cannot reach a package
# index: the project itself (built from this working tree), DeepSpeed (built from its source release:
# it has no wheel on the index), the pure packages a CUDA image with torch usually lacks (webdataset,
# hjson, pydantic, ...) and the kernel benchmark's peers (liger-kernel, cut-cross-entropy). Run it in
# the repo root where the index can be reached, then take the repo with .whl/ to the GPU machine:
#   bash benchmarks/fetch_wheels.sh [--python-version 3.12]
#   --python-version X.Y  the GPU machine's Python, for the binary wheels (default 3.12; manylinux x86_64)
# Versions are those of requirements/linux-x86_64-cpu.lock where it pins them. gpu_proof.sh installs
# a wheel from .whl/ only where the environment lacks the distribution or has an older version, and
# checks that the project wheel matches the tree it runs in (.whl/SOURCE holds the hash of the
# package files the wheel was built from).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
PYVER=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=${2:?--python-version needs X.Y}; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; exit 0 ;;
    *) echo "fetch_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "fetch_wheels.sh: --python-version must look like 3.12" >&2; exit 2; }
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
rm -f .whl/transrec-*.whl .whl/SOURCE

# 1. pure or CPython wheels for the GPU machine's Python, from the index (pip skips files already in .whl/)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  webdataset==1.0.2 braceexpand==0.1.7 \
  hjson==3.1.0 einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1

# 2. DeepSpeed from its source release (no compiled ops: they build just in time where needed)
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  $PY -m pip wheel -q deepspeed==0.19.8 --no-deps --no-build-isolation -w .whl
fi

# 3. the project, from a clean copy of this working tree (tracked and untracked files, not ignored
#    ones: no stale build/ folder can slip old files in), package data included (the tokenizer files)
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$SRC"
$PY -m pip wheel -q "$SRC" --no-deps --no-build-isolation -w .whl
{
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)"
  echo "tree $(bash benchmarks/gpu_proof.sh --tree-hash)"
} > .whl/SOURCE

ls -l .whl
echo ".whl/: $(du -cb .whl/* | tail -1 | cut -f1) bytes"
