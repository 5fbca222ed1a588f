#!/usr/bin/env bash
# A proof and benchmark of the GPU path, for anyone with one CUDA GPU (the target figures are set for
# an H100/H200), each part under its own time cap. Run it in the repo root:
#   bash benchmarks/gpu_proof.sh                     # every part
#   bash benchmarks/gpu_proof.sh --dry-run           # every part on the CPU at toy sizes (tests/test_gpu_proof.py)
#   bash benchmarks/gpu_proof.sh --only e2e,memory   # some parts only (names below)
# Options:
#   --out DIR           where the results go (default: proof_out/ in the working directory)
#   --deadline SECONDS  an overall time limit (default: none); a part is skipped when fewer than 15 s
#                       are left for it
#   --only PARTS        comma-separated part names
#   --dry-run           the CPU at toy sizes (each part's time cap doubled); figures meaningless,
#                       the code paths real
#   --bench-synth U,I   the synthetic world of the bench part: users and items (default: 10000,5000)
#   --bench-steps N     the bench part's timed steps per measurement (default: 6, after 2 warm-up steps)
# Needs: torch with CUDA, Triton, transformers and peft. The rest (DeepSpeed, WebDataset, the peer
# kernels, this project) is taken from the environment, or from the wheels in .whl/ that
# `bash benchmarks/fetch_wheels.sh` collects, for a machine that cannot reach a package index.
# Parts, in this order, each under its own time cap (and the deadline, if one is given), so a part
# that fails or hangs never costs the others:
#   env     card, versions; installs the wheels in .whl/ that the environment lacks into /tmp/site
#   tests   the GPU tests (pytest -m gpu tests/test_kernels.py) and tests/test_kernels_convergence.py
#   e2e     benchmarks/e2e.py --preset base-gpu, batch 256 and 64: naive fp32 and the engine; at 256
#           also naive over unique items, the engine without the prefix cache, with impl=torch, in fp32
#           (the engine sides measured by transrec bench's library function)
#   bench   transrec bench --preset small-gpu, then base-gpu, each at its own batch, on a --synth world
#           (--bench-synth) with --ablate dedup,prefix_cache,kernel,bf16: throughput, step-time
#           breakdown, model FLOPs and MFU of the full engine and of each switch off in turn
#   memory  peak GPU memory of base-gpu at batch 256 under ZeRO 0, 2 and 3 on one card
#   prefix  benchmarks/prefix_cache.py --gpu: dedup alone vs dedup + the frozen-prefix cache
#   kernels benchmarks/kernel_bench.py, forward+backward, at 65536^2x256, 32768^2x256, 32768^2x768, 8192^2x256
#   ksweep  (only when named: --only env,ksweep, a run of its own) the kernel design sweep,
#           benchmarks/kernel_bench.py --sweep at the four kernel shapes: each design of the Triton kernels
#           (full / forward / backward) and, where the card is underfilled, its split-M variants,
#           then each kernel stage alone at each config of its table (unsplit, and split where the
#           shape splits); its rows choose kernels/triton_config.py's DESIGN, SPLIT_DEFAULT and
#           tables. kernels.csv + its PNG.
# Output, written as the parts run: proof.log (every part's output), summary.txt (each part's status
# and time, then the target figures), e2e.csv + e2e.png, bench_<preset>.json + bench_<preset>.md
# (transrec bench's rows and table), zero_memory.csv, prefix_cache.csv, kernels.csv + kernels_<card>.png.
# To keep the results: `python benchmarks/proof_summary.py --merge DIR` appends DIR's rows to the CSVs
# in benchmarks/results/ (the bench rows to bench.csv; every row starts with the machine stamp: date,
# card, versions, commit) and copies the PNGs beside them.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
CALLER_DIR=$PWD  # a relative --out is taken from here
cd "$(dirname "$SELF")/.."

tree_hash() {  # the package files a project wheel is built from (the same in every copy of the tree)
  find transrec engine inference kernels models shards pyproject.toml -type f ! -path '*/__pycache__/*' \
    ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"
}
need_value() {  # need_value OPTION VALUE PATTERN
  if [ -z "$2" ] || ! [[ "$2" =~ $3 ]]; then
    echo "gpu_proof.sh: $1 needs a value${4:+ ($4)}, got '${2}' (see --help)" >&2
    exit 2
  fi
}

DRY=0
ONLY=""
PART=""
DEADLINE_S=""
OUT_ARG=""
# the bench part's sizes (exported: the parts run in children of this script)
export PROOF_BENCH_SYNTH=${PROOF_BENCH_SYNTH:-10000,5000} PROOF_BENCH_STEPS=${PROOF_BENCH_STEPS:-6}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) need_value "$1" "${2:-}" '^[a-z0-9,]+$' "part names"; ONLY=",$2,"; shift ;;
    --out) need_value "$1" "${2:-}" '.' "a folder"; OUT_ARG=$2; shift ;;
    --deadline) need_value "$1" "${2:-}" '^[0-9]+$' "seconds"; DEADLINE_S=$2; shift ;;
    --bench-synth) need_value "$1" "${2:-}" '^[0-9]+,[0-9]+$' "USERS,ITEMS"; PROOF_BENCH_SYNTH=$2; shift ;;
    --bench-steps) need_value "$1" "${2:-}" '^[1-9][0-9]*$' "a step count"; PROOF_BENCH_STEPS=$2; shift ;;
    --part) PART=$2; shift ;;  # internal: one part, run by this script under its time cap
    --tree-hash) tree_hash; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_proof.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$PART" ]; then  # a child: the parent's output folder
  OUT_DIR=$PROOF_OUT
else
  OUT_DIR=${OUT_ARG:-proof_out}
  [[ "$OUT_DIR" = /* ]] || OUT_DIR=$CALLER_DIR/$OUT_DIR
  mkdir -p "$OUT_DIR"
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
  export PROOF_OUT=$OUT_DIR
fi
LOG=$OUT_DIR/proof.log
SUMMARY=$OUT_DIR/summary.txt
if [ $DRY = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
else
  PY=${PYTHON:-python3}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
DEADLINE=${DEADLINE_S:+$((START + DEADLINE_S))}  # empty: no overall limit
if [ -z "${TRANSREC_GIT_SHA:-}" ] && ! git rev-parse --git-dir >/dev/null 2>&1 && [ -f .whl/SOURCE ]; then
  # a source tree without .git: the commit the project's wheel in .whl/ was built from
  export TRANSREC_GIT_SHA=$(awk '$1 == "git" {print $2}' .whl/SOURCE)
fi

say() { echo "$*" | tee -a "$LOG"; }
FAILED=0

# run_part NAME CAP_SECONDS: part_NAME runs in a child of this script under `timeout` (which ends
# the child's whole process group); its output goes to proof.log (its tail to the terminal), its
# status, time and exit code to summary.txt.
run_part() {
  local name=$1 cap=$2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
  [ $DRY = 0 ] || cap=$((cap * 2))  # the toy sizes on a CPU take longer than the real ones on the card
  local t=$cap
  if [ -n "$DEADLINE" ]; then
    local left=$((DEADLINE - $(date +%s)))
    t=$((cap < left ? cap : left))
  fi
  if [ "$t" -lt 15 ]; then
    printf '%-8s %-9s %7s  %s\n' "$name" skipped 0 "no time left under the ${DEADLINE_S} s deadline" >> "$SUMMARY"
    say "=== $name: skipped, no time left"
    FAILED=1
    return 0
  fi
  say "=== $name  (cap ${t} s, $(( $(date +%s) - START )) s in)  $(date +%T)"
  local before t0 rc status
  before=$(wc -l < "$LOG")
  t0=$(date +%s)
  timeout -k 10 "$t" bash "$SELF" --part "$name" $( [ $DRY = 1 ] && echo --dry-run ) >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ $rc = 0 ] || FAILED=1
  tail -n +"$((before + 1))" "$LOG" | grep -v '^Autotuning\|^with key\|^finished after\|^best config\|^Triton autotuning' \
    | tail -n 6
  printf '%-8s %-9s %7s  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" \
    "$( [ $rc = 0 ] || echo "exit $rc" )" >> "$SUMMARY"
  say "=== $name: $status (exit $rc) after $(( $(date +%s) - t0 )) s"
}

# setup_path: /tmp/site (the installed wheels) first on PYTHONPATH; where transrec (with its bundled
# tokenizer files) is still not importable, a shim folder holding only a link to the repo's transrec/.
setup_path() {
  if [ $DRY = 0 ] && [ -d /tmp/site ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $PY -P -c "import transrec.shards.cache as t, sys; sys.exit(0 if t.BUNDLED_TOKENIZER.is_dir() else 1)" \
      2>/dev/null; then
    mkdir -p "$WORK/shim"
    rm -rf "$WORK/shim/transrec"
    ln -sfn "$PWD/transrec" "$WORK/shim/transrec"  # its rooms are links to the repo folders
    export PYTHONPATH=$WORK/shim${PYTHONPATH:+:$PYTHONPATH}
    echo "transrec from the repo folders (shim in $WORK/shim)"
  fi
}

# ----------------------------------------------------------------------------- parts
part_env() {
  if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    # A wheel from .whl/ is installed where the environment lacks its distribution or has an older
    # version; the project's wheel only if it was built from this very tree (else the repo folders
    # are used).
    local want
    want=$(TREE="$(tree_hash)" $PY - <<'EOF'
import importlib.metadata as md, os, pathlib, re
try:
    from packaging.version import Version
except ImportError:  # numeric parts only
    def Version(v):
        return tuple(int(x) for x in re.findall(r"\d+", v))
tree = os.environ["TREE"]
src = pathlib.Path(".whl/SOURCE")
built = dict(l.split(None, 1) for l in src.read_text().splitlines() if " " in l) if src.is_file() else {}
for w in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, ver = w.name.split("-")[:2]
    if name == "transrec":
        if built.get("tree", "").strip() == tree:
            print(w)
        else:
            print(f"# {w.name}: built from another tree ({built.get('tree', '?').strip()} != {tree}); "
                  "using the repo folders", flush=True)
        continue
    try:
        have = md.version(re.sub(r"[-_.]+", "-", name))
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(ver):
        print(w)
    else:
        print(f"# {w.name}: the environment has {have}")
EOF
)
    echo "$want" | grep '^#'
    local files
    files=$(echo "$want" | grep -v '^#' | tr '\n' ' ')
    echo "installing into /tmp/site: $files"
    if [ -n "${files// /}" ]; then
      # shellcheck disable=SC2086
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $files \
        || return 1
    fi
  fi
  setup_path
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
  $PY -P - <<'EOF'
import importlib, importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
bad = []
for mod, dist in [("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                  ("deepspeed", "deepspeed"), ("webdataset", "webdataset"), ("pydantic", "pydantic"),
                  ("transrec.engine.trainer", "transrec"), ("liger_kernel", "liger-kernel"),
                  ("cut_cross_entropy", "cut-cross-entropy")]:
    try:
        m = importlib.import_module(mod)
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "(repo folders)"
        print(f"  {dist:18s} {v:14s} {getattr(m, '__file__', '')}")
    except Exception as e:  # a missing peer kernel only costs its benchmark rows
        print(f"  {dist:18s} MISSING: {type(e).__name__}: {e}")
        if dist not in ("liger-kernel", "cut-cross-entropy", "triton"):
            bad.append(dist)
from transrec.models.text import tokenizer_path
print("  text presets tokenize with", tokenizer_path("base"))
sys.exit(1 if bad else 0)
EOF
}

part_tests() {
  # -k: the tests marked gpu (a marker is a keyword) and the convergence module. -P: the working
  # directory is not put first on sys.path (the repo's transrec/ would hide the installed package).
  $PY -P -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_kernels_convergence.py \
    -k "gpu or convergence"
}

part_e2e() {
  if [ $DRY = 1 ]; then
    $PY benchmarks/e2e.py "${E2E_DRY[@]}" --batch 16 --in-process --world "$WORK/world" \
      --out "$OUT_DIR/e2e.csv" "${E2E_DRY_CFG[@]}"
  else
    $PY benchmarks/e2e.py --preset base-gpu --batch 256,64 --max-len 24 --steps 8 --warmup 2 \
      --ablations-at 256 --world "$WORK/world" --out "$OUT_DIR/e2e.csv"
  fi
}

part_bench() {
  # one `transrec bench` per preset, in one folder of $WORK (the --synth world is made there once);
  # each preset's bench.json and bench.md are copied out as soon as its measurements end
  local presets=(small-gpu base-gpu) synth=$PROOF_BENCH_SYNTH steps=(--warmup 2 --steps "$PROOF_BENCH_STEPS")
  local extra=() p rc=0
  if [ $DRY = 1 ]; then  # the tiny preset with the GPU presets' switches (as the dry e2e)
    presets=(tiny) synth=200,100 steps=(--warmup 1 --steps 1)
    extra=("${E2E_DRY_CFG[@]}" data.batch_size=16 data.max_len=6 model.user.max_len=6)
  fi
  for p in "${presets[@]}"; do
    rm -f "$WORK/bench/bench.json" "$WORK/bench/bench.md"
    $PY -P -m transrec.cli bench --preset "$p" --synth "$synth" "${steps[@]}" \
      --ablate dedup,prefix_cache,kernel,bf16 --out "$WORK/bench" "${extra[@]}" \
      && cp "$WORK/bench/bench.json" "$OUT_DIR/bench_$p.json" && cp "$WORK/bench/bench.md" "$OUT_DIR/bench_$p.md" \
      || rc=1
  done
  return $rc
}

part_memory() {
  local sides=engine-zero0,engine-zero2,engine-zero3
  if [ $DRY = 1 ]; then
    $PY benchmarks/e2e.py "${E2E_DRY[@]}" --batch 16 --sides $sides --in-process --no-plot \
      --world "$WORK/world" --out "$OUT_DIR/zero_memory.csv" "${E2E_DRY_CFG[@]}"
  else
    $PY benchmarks/e2e.py --preset base-gpu --batch 256 --max-len 24 --steps 2 --warmup 1 --sides $sides \
      --no-plot --world "$WORK/world" --out "$OUT_DIR/zero_memory.csv"
  fi
}

part_prefix() {
  if [ $DRY = 1 ]; then
    $PY benchmarks/prefix_cache.py --gpu --smoke --repeats 1 --csv "$OUT_DIR/prefix_cache.csv"
  else
    $PY benchmarks/prefix_cache.py --gpu --batches 256 --repeats 1 --steps 12 --csv "$OUT_DIR/prefix_cache.csv"
  fi
}

part_ksweep() {
  if [ $DRY = 1 ]; then  # the Triton code path under the interpreter, one toy shape
    TRITON_INTERPRET=1 $PY benchmarks/kernel_bench.py --dry-run --sweep --check-n 64 --shapes 40x16 --out "$OUT_DIR"
  else  # 8192^2x256 first (the cheapest shape, and split-M's: 128 programs of 64 rows on 132 SMs), then
    # D = 768 (the design question is sharpest there); rows are written as they are measured
    TRITON_PRINT_AUTOTUNING=1 $PY benchmarks/kernel_bench.py --sweep \
      --shapes 8192x256,32768x768,32768x256,65536x256 --out "$OUT_DIR"
  fi
}

part_kernels() {
  if [ $DRY = 1 ]; then
    $PY benchmarks/kernel_bench.py --dry-run --modes full --providers transrec,torch --out "$OUT_DIR"
  else
    TRITON_PRINT_AUTOTUNING=1 $PY benchmarks/kernel_bench.py --modes full \
      --shapes 65536x256,32768x256,32768x768,8192x256 --out "$OUT_DIR"
  fi
}

# the dry run's toy e2e: the tiny preset with base-gpu's levers (top blocks trained so the prefix
# cache applies, ZeRO-2, bf16, loader workers)
E2E_DRY=(--preset tiny --max-len 6 --steps 1 --warmup 1 --users 120 --items 80)
E2E_DRY_CFG=(model.text.trainable=1 model.image.trainable=1 deepspeed.zero_stage=2 deepspeed.precision=bf16
             data.num_workers=1)

if [ -n "$PART" ]; then  # a child: run one part and report its exit status
  [ "$PART" = env ] || [ -n "${PROOF_PATH_READY:-}" ] || setup_path >/dev/null
  "part_$PART"
  exit $?
fi

WORK=$(mktemp -d)
export WORK
trap 'rm -rf "$WORK"' EXIT
{
  echo "# gpu_proof $(date '+%Y-%m-%d %H:%M:%S')  commit ${TRANSREC_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null)}$( [ $DRY = 1 ] && echo '  DRY RUN: toy sizes on the CPU, figures meaningless')"
  printf '%-8s %-9s %7s  %s\n' part status seconds note
} > "$SUMMARY"
: > "$LOG"

run_part env 90
setup_path > "$WORK/path.txt"
tee -a "$LOG" < "$WORK/path.txt"
export PROOF_PATH_READY=1
run_part tests 130
run_part e2e 170
run_part bench 600
run_part memory 70
run_part prefix 80
run_part kernels 150
if [[ "$ONLY" == *",ksweep,"* ]]; then  # never part of the default proof (minutes of its own)
  run_part ksweep 440
fi

echo "# total $(( $(date +%s) - START )) s" >> "$SUMMARY"
$PY benchmarks/proof_summary.py "$OUT_DIR" $( [ $DRY = 1 ] && echo --dry-run ) >> "$SUMMARY" 2>&1 || FAILED=1
say ""
cat "$SUMMARY"
exit $FAILED
