#!/usr/bin/env bash
# Puts into .whl/ every wheel a GPU machine without network needs for benchmarks/gpu_proof.sh: the
# project itself (built from this working tree), DeepSpeed (built here: it has no wheel on the index),
# the pure packages the GPU image lacks (webdataset, hjson, pydantic, ...) and the kernel benchmark's
# peers (liger-kernel, cut-cross-entropy). Run here, in the repo root, right before the GPU run (the
# device tool then carries ".whl"):
#   bash benchmarks/fetch_wheels.sh
# Binary wheels are for CPython 3.12 on manylinux x86_64 (the GPU image). Versions are the ones this
# project's .venv runs with. gpu_proof.sh installs a carried wheel only where the image lacks the
# distribution or has an older version, and checks that the project wheel matches the tree it runs in
# (.whl/SOURCE holds the hash of the package files the wheel was built from).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
rm -f .whl/transrec-*.whl .whl/SOURCE

# 1. pure or CPython-3.12 wheels from the index (pip skips files already in .whl/)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
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
echo ".whl total: $(du -cb .whl/* | tail -1 | cut -f1) bytes"
# What the device tool carries: the working tree (tracked + untracked, not ignored) and .whl; 64 MiB at most.
TREE=$( (git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | grep total$ || echo 0) \
        | awk '{s+=$1} END {print s}')
WHL=$(du -cb .whl/* | tail -1 | cut -f1)
echo "carried: tree ${TREE} + .whl ${WHL} = $((TREE + WHL)) bytes (limit 67108864)"
[ $((TREE + WHL)) -le 67108864 ] || { echo "over the 64 MiB the device tool carries" >&2; exit 1; }
