"""Tiling and launch configuration shared by the Triton forward and backward kernels: the single source
of truth for which kernel specialisations a launch can reach (the launchers and ``sm90_check`` both
read it).

The embedding dimension is split into NUM_DC <= 4 chunks of BLOCK_DC columns: the fp32
accumulators (dQ rows in the fused forward or the dQ pass, dK rows in the dK pass) are one
[BLOCK, BLOCK_DC] tile per chunk, so D = 768 uses 3 x 256 instead of a 1024-wide padded tile.
Four stages have a table each: "fwd" (forward with the dQ accumulator), "lse" (forward without it),
"bwd" (dK pass), "dq" (dQ pass); which of them a training step runs is the design (``DESIGN``).
On a GPU the block sizes are autotuned per (kernel, D class, element size) with keys bucketed to
powers of two (the number of unique items changes every batch; retuning per batch would cost
seconds). Under TRITON_INTERPRET=1 one fixed small tile is used so CPU tests stay fast.

What a launch can vary, and so what the sm_90 check compiles: the input dtype (``LAUNCH_DTYPES``;
inputs are made contiguous and 16-byte aligned first, a missing bias becomes zeros, see
``triton_op.canonical_inputs``), D (its layout below), the gradient switches, EVEN_M, split-M or not
(PARTIAL, see SPLIT_DEFAULT), and a config of the table of its class. Tiles pinned on a GPU must name
a config of that table, so the autotuned and the pinned paths reach the same set. Sizes (N, M, the
number of split-M chunks and the autotune keys) are not specialised on.
"""

from __future__ import annotations

import os

import torch

from transrec.kernels.interface import KernelInputError

MAX_DC = 4
MAX_BLOCK_DC = 256
MAX_D = MAX_DC * MAX_BLOCK_DC  # wider rows have no config that fits a block's shared memory
INTERPRET_BLOCK = 32
LAUNCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100, H200)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def d_layout(d: int, block_dc: int | None = None) -> tuple[int, int, bool]:
    """(BLOCK_DC, NUM_DC, EVEN_D) for embedding size ``d``."""
    if block_dc is None:
        block_dc = max(min(next_pow2(d), MAX_BLOCK_DC), next_pow2(-(-d // MAX_DC)), 16)
    num_dc = -(-d // block_dc)
    if num_dc > MAX_DC:
        raise ValueError(f"block_dc={block_dc} splits D={d} into more than {MAX_DC} chunks")
    return block_dc, num_dc, d % block_dc == 0


def d_class(block_dc: int, num_dc: int) -> str:
    """small: one chunk of <= 128 columns; d256: one of 256; large: 2-3 chunks (D <= 768); xl: 4."""
    if num_dc > 3:
        return "xl"
    if num_dc > 1:
        return "large"
    return "d256" if block_dc >= 256 else "small"


# The D values the sm_90 check compiles per class: the widest row of each class (aligned rows of unit
# stride, every chunk full: tiles copied asynchronously into shared memory) and a ragged one whose rows
# are not 16-byte aligned (masked columns, loads pipelined differently: at D = 1000 a config needed
# 1 KB more than at 1024). A D that is a multiple of 16 but not of BLOCK_DC loads as the widest one
# does (16-byte aligned rows, masks constant over 16 columns). Each D adds ~126 specialisations, about
# 15 s of compiling on two cores.
CHECK_D = {"small": (128, 100), "d256": (256, 200), "large": (768, 520), "xl": (1024, 1000)}

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, resident]): rows of q x rows of k per tile; resident
# (default True) keeps the loop-invariant tile (q in the forward, k in the backward) in registers when
# D is one chunk, else it is reloaded every step. Chosen for Hopper: fp32 accumulators of
# BLOCK x BLOCK_DC per chunk must stay in registers, k/q tiles pipelined in shared memory
# (<= 227 KB a block; aligned rows of unit stride are copied asynchronously into num_stages - 1
# buffers in flight), wgmma wants tiles of >= 64 rows per warpgroup.
# Keys (D class, bytes per input element). Every row fits in shared memory under Triton 3.6 (the GPU
# image) and the pinned Triton for every reachable specialisation (tests/test_kernels_sm90.py).
# Registers and spill stack per thread from `sm90_check fwd|bwd D` (bf16, Triton 3.6 / pinned):
_FWD = {
    ("small", 2): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
                   (128, 128, 4, 2)],
    # D = 256: 0-16 B spill at 64x32x8w and 64x64x8w/2, 56-232 B at the 128-row tiles.
    ("d256", 2): [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2, False),
                  (128, 32, 8, 3), (128, 64, 8, 3)],
    # D <= 768: the fp32 dQ accumulator (BLOCK_M x D) spills in every config; least at 32x32x4w/3 (200 B,
    # no wgmma), 64x32x8w/2 (192 / 920 B); 64x64 fits only without pipelining (1 stage, 196,608 B),
    # spilling 1-1.7 KB. 4-warp 64-row tiles dropped (2.6-3.2 KB).
    ("large", 2): [(64, 64, 8, 1), (64, 64, 16, 1), (64, 32, 8, 2), (32, 64, 4, 2), (64, 32, 8, 1),
                   (32, 32, 4, 3)],
    # D <= 1024: only 32- or 64-row tiles with one k tile in flight fit (200-230 KB).
    ("xl", 2): [(32, 64, 4, 2), (32, 64, 8, 2), (64, 32, 8, 1), (32, 32, 4, 3), (64, 32, 4, 1)],
    ("small", 4): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 8, 1)],
    ("d256", 4): [(64, 32, 8, 1), (32, 32, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1)],
    ("large", 4): [(32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 4, 1)],
    ("xl", 4): [(32, 16, 4, 1), (16, 32, 4, 1)],
}
# Backward dK pass: BLOCK_N rows of k own the dK accumulator, BLOCK_M rows of q stream past.
_BWD = {
    ("small", 2): [(128, 128, 8, 3), (64, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4),
                   (128, 128, 4, 2)],
    # D = 256: 0 B spill under 3.6, 16-128 B under the pinned Triton; 128x64x8w/3 dropped (233,472 B).
    ("d256", 2): [(64, 64, 8, 2), (64, 64, 8, 4), (64, 64, 8, 3), (64, 64, 8, 2, False), (64, 128, 8, 2),
                  (64, 128, 8, 3)],
    # D <= 768: tiles of 32 rows of k run transposed (ACC_T, triton_backward.py): 32x32x8w/2-3 use wgmma
    # without spill (204-248 registers; the plain 64x32x8w/2 they replace spilled 24-32 B without
    # wgmma, and transposed needs 214-251 KB), 32x32x4w/3 spills 104 B; 32x64x8w/2 (24 / 832 B),
    # 64x64 only unpipelined (0.9-1.6 KB). 32x64x4w dropped (2-3 KB).
    ("large", 2): [(64, 64, 8, 1), (64, 64, 16, 1), (32, 32, 8, 2), (32, 32, 8, 3), (32, 64, 8, 2),
                   (32, 32, 4, 3)],
    # D <= 1024: transposed 32x32x8w/2-3 use wgmma without spill (236-255 registers); the plain 64x32/2
    # rows they replace need 328-333 KB transposed. 64x32x8w/1 spills 272-960 B, 32x32x4w/3 440-504 B.
    ("xl", 2): [(32, 32, 8, 2), (32, 32, 8, 3), (32, 64, 8, 1), (32, 32, 4, 3), (64, 32, 8, 1)],
    # 4-byte rows of fewer than 64 rows of k run transposed too (all fit; not timed on a card yet).
    ("small", 4): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (64, 128, 8, 1)],
    ("d256", 4): [(64, 32, 8, 1), (32, 32, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1)],
    ("large", 4): [(32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 4, 1)],
    ("xl", 4): [(32, 16, 4, 1), (16, 32, 4, 1)],
}
# Forward without dQ ("split" design, or no gradient for q): the logits tile and row statistics only.
# One D chunk: the forward kernel without its accumulator (no spill in any row, 58-126 registers at
# D = 256). Several chunks: the D-loop kernel (triton_forward._lse_kernel), whose shared memory does
# not grow with D: 128x128 tiles pipelined 3-4 deep at D = 768 and 1024, 203-212 registers, no spill
# (the chunked forward had to stay at 64x32 or unpipelined 64x64 there). 128x256 dropped (spills).
_LSE = {
    **{key: list(rows) for key, rows in _FWD.items() if key[0] in ("small", "d256")},
    ("large", 2): [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3),
                   (64, 64, 4, 4)],
    ("xl", 2): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3), (64, 64, 4, 4)],
    ("large", 4): [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3)],
    ("xl", 4): [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3)],
}
# dQ pass ("split" design): BLOCK_M rows of q own the dQ accumulator, BLOCK_N rows of k stream past;
# tiles of fewer than 64 rows run transposed (ACC_T, see triton_backward.py) to keep wgmma. One chunk:
# the forward's rows (no spill at 64x32 and 64x64x8w/2, 40-64 B at 64x64/3 and 128x64). D = 768:
# 32x32x8w/2-3 transposed is the only wgmma row without spill (230-248 registers); 64-row rows spill
# 112-1128 B (the 64 x 768 fp32 accumulator alone is 192 registers a thread at 8 warps) but are kept
# for the sweep to weigh against the 32-row ones.
_DQ = {
    **{key: list(rows) for key, rows in _FWD.items() if key[0] in ("small", "d256")},
    ("large", 2): [(32, 32, 8, 2), (32, 32, 8, 3), (32, 64, 8, 1), (64, 32, 8, 2), (64, 64, 8, 1)],
    ("xl", 2): [(32, 32, 8, 2), (32, 32, 8, 1), (32, 64, 8, 1), (32, 32, 4, 3), (64, 32, 8, 1)],
    ("large", 4): [(32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 4, 1)],
    ("xl", 4): [(32, 16, 4, 1), (16, 32, 4, 1)],
}
TABLES = {"fwd": _FWD, "lse": _LSE, "bwd": _BWD, "dq": _DQ}

# Where dQ is formed (kernels/triton_forward.py, triton_backward.py):
#   "fused"  the forward accumulates A = sum_j p_ij k_j - k_t (fp32 [N, D], saved for backward);
#            backward = the dK pass + one elementwise product. 8 N M D flops; the forward carries a
#            rescaled [BLOCK_M, D] fp32 accumulator (it spills at D = 768).
#   "split"  the forward computes LSE and the target logit only; backward = the dK pass + a dQ pass
#            (flash-attention-2 style). 10 N M D flops; no [N, D] fp32 buffer; each kernel holds
#            one accumulator without rescaling.
# The choice per D class is meant to be made by the GPU sweep (benchmarks/kernel_bench.py --designs);
# until a card has timed both it stays "fused", the design the H200 figures in docs/kernel.md were
# measured with. TRANSREC_TRITON_DESIGN=fused|split overrides it for every class.
DESIGNS = ("fused", "split")
DESIGN = {"small": "fused", "d256": "fused", "large": "fused", "xl": "fused"}
DESIGN_ENV = "TRANSREC_TRITON_DESIGN"

# Split over the streamed dimension (flash-decoding style): where the programs of a kernel (one per
# BLOCK rows owned: rows of q in the forward and the dQ pass, rows of k in the dK pass) are fewer
# than SPLIT_WAVES waves of the card's SMs, each row tile is cut into S programs, each streaming one
# chunk of the other side (chunks are whole BLOCK tiles) and writing partial results: (max, sum, target
# logit) [S, N] fp32 in the LSE forward, merged by a combine kernel; dQ [N, S, D] or dK [M, S, D] fp32
# partials (no rescaling: the LSE is known in backward), summed over S by torch (deterministic, no
# atomics). Only the LSE forward splits (the fused forward keeps its dQ accumulator whole: its partial
# A would need rescaling per chunk and an [S, N, D] buffer in the forward). Partial buffers of the
# backward passes stay under SPLIT_BUFFER_BYTES (S is lowered to fit): O(S (N + M) D), never N x M.
# Opt-in until a card has timed it (benchmarks/kernel_bench.py --sweep): "off" by default; "auto" uses
# split_count; an integer forces S. $TRANSREC_TRITON_SPLIT, or the ``split`` argument of a call.
# sm_90 (`sm90_check lse|dq|bwd D --split S`, Triton 3.6 / 3.9): the split launches use the same tables;
# D = 256, S = 3: no spill in any row (bwd 64x64x8w/2 unresident 0 / 24 B); D = 768, S = 2: the same
# rows spill as unsplit (none for the lse table and the transposed 32x32x8w dq/bwd rows).
SPLIT_DEFAULT = "off"
SPLIT_ENV = "TRANSREC_TRITON_SPLIT"
SMS = 132  # streaming multiprocessors of an H100 / H200 SXM (the launchers read the card's own count)
SPLIT_WAVES = 2  # fewer programs than this many waves of SMs: split
SPLIT_MIN_STEPS = 4  # at least this many streamed tiles per chunk (the pipeline fills, partials amortise)
SPLIT_MAX = 16
SPLIT_BUFFER_BYTES = 256 << 20

_TUNED: dict = {}


def split_mode(override=None):
    """"off", "auto" or a forced S >= 1: ``override`` (an argument), else $TRANSREC_TRITON_SPLIT, else
    SPLIT_DEFAULT."""
    choice = override if override is not None else (os.environ.get(SPLIT_ENV) or SPLIT_DEFAULT)
    if isinstance(choice, str) and choice not in ("off", "auto"):
        choice = int(choice) if choice.isdigit() else choice
    if choice in ("off", "auto") or (type(choice) is int and choice >= 1):
        return choice
    source = "split" if override is not None else SPLIT_ENV
    raise KernelInputError(f"{source} must be 'off', 'auto' or a positive integer, got {choice!r}")


def split_count(owned: int, streamed: int, block_owned: int, block_streamed: int, sms: int = SMS,
                waves: int = SPLIT_WAVES, min_steps: int = SPLIT_MIN_STEPS,
                max_split: int = SPLIT_MAX) -> int:
    """The heuristic S: 1 when cdiv(owned, block_owned) programs fill ``waves`` waves of ``sms`` SMs,
    else enough chunks to get there, each of at least ``min_steps`` streamed tiles, at most
    ``max_split``. E.g. 8192 rows in 64-row tiles (128 programs) over 8192 items: S = 3 at 132 SMs."""
    tiles = -(-owned // block_owned)
    target = waves * sms
    if tiles >= target:
        return 1
    steps = -(-streamed // block_streamed)
    return max(1, min(-(-target // tiles), steps // min_steps, max_split))


def num_splits(mode, owned: int, streamed: int, block_owned: int, block_streamed: int,
               partial_row_bytes: int = 0, sms: int = SMS) -> int:
    """S for one launch: ``mode`` from split_mode; a forced S is taken as given, then lowered so that
    the partial buffer (``partial_row_bytes`` per owned row and chunk) stays under SPLIT_BUFFER_BYTES."""
    if mode == "off":
        return 1
    s = split_count(owned, streamed, block_owned, block_streamed, sms) if mode == "auto" else int(mode)
    if partial_row_bytes and s > 1:
        s = min(s, max(1, SPLIT_BUFFER_BYTES // (owned * partial_row_bytes)))
    return max(1, s)


def sm_count(device) -> int:
    """SMs of ``device`` (a CUDA card), SMS elsewhere (the interpreter, the sm_90 check)."""
    if getattr(device, "type", device) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS


def design(dclass: str, override: str | None = None) -> str:
    """The design ("fused" or "split") a launch of D class ``dclass`` runs: ``override`` (an argument),
    else $TRANSREC_TRITON_DESIGN, else the ``DESIGN`` table."""
    choice = override or os.environ.get(DESIGN_ENV) or DESIGN[dclass]
    if choice not in DESIGNS:
        source = "design" if override else DESIGN_ENV
        raise KernelInputError(f"{source} must be one of {DESIGNS}, got {choice!r}")
    return choice


def resident(config: tuple) -> bool:
    return bool(config[4]) if len(config) > 4 else True


def table(stage: str, dclass: str, itemsize: int = 2) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages, resident) rows a launch of ``stage`` may use."""
    return [tuple(c[:4]) + (resident(c),) for c in TABLES[stage][dclass, 4 if itemsize >= 4 else 2]]


def config_kwargs(row: tuple) -> dict:
    """Launch keywords of one table row (what ``triton.Config(...).all_kwargs()`` holds)."""
    return dict(BLOCK_M=row[0], BLOCK_N=row[1], RESIDENT=row[4], num_warps=row[2], num_stages=row[3])


def pinned(stage: str, dclass: str, itemsize: int, block_m: int | None, block_n: int | None,
           resident_: bool) -> dict:
    """Launch keywords of tiles pinned on a GPU: the first table row with those tiles. Any other tile
    is refused (it was never compiled by the sm_90 check, and may not fit in shared memory)."""
    rows = table(stage, dclass, itemsize)
    for row in rows:
        if (block_m in (None, row[0])) and (block_n in (None, row[1])) and row[4] == resident_:
            return config_kwargs(row)
    raise ValueError(f"tiles block_m={block_m}, block_n={block_n}, resident={resident_} are not in the "
                     f"{stage} table for D class {dclass!r} ({itemsize}-byte inputs): pick one of "
                     f"{[(r[0], r[1], r[4]) for r in rows]} (any tile runs under TRITON_INTERPRET=1)")


def tuned(kernel, stage: str, dclass: str, itemsize: int = 2):
    """The autotuned launcher of ``kernel`` for one D class and element size (built once, lazily)."""
    import triton  # optional: only GPU and interpreter launches need triton

    key = (stage, dclass, itemsize)
    if key not in _TUNED:
        configs = []
        for row in table(stage, dclass, itemsize):
            kw = config_kwargs(row)
            configs.append(triton.Config({k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "RESIDENT")},
                                         num_warps=kw["num_warps"], num_stages=kw["num_stages"]))
        keys = ["N_KEY", "M_KEY", "D"]
        keys += {"fwd": ["COMPUTE_DQ"], "bwd": ["COMPUTE_DK", "COMPUTE_DB"]}.get(stage, [])
        keys += ["NUM_SPLITS"] if stage != "fwd" else []  # a split launch may want other tiles
        _TUNED[key] = triton.autotune(configs=configs, key=keys)(kernel)
    return _TUNED[key]


class Launch:
    """One kernel launch, built before it runs so that the sm_90 check can compile exactly what the
    launcher would: ``kernel[grid](*args, **kwargs)``. ``kernel`` is an autotuner, the heuristics
    wrapper or the jitted function itself; ``after`` (split launches) runs once the kernel is queued."""

    def __init__(self, kernel, grid, args: tuple, kwargs: dict, after=None):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs
        self.after = after  # a split launch: merges the partial results (the combine step)

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)
        if self.after is not None:
            self.after()
