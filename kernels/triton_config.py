"""Tiling and launch configuration shared by the Triton forward and backward kernels.

The embedding dimension is split into NUM_DC <= 4 chunks of BLOCK_DC columns: the fp32
accumulators (dQ rows in the forward, dK rows in the backward) are one [BLOCK, BLOCK_DC] tile per
chunk, so D = 768 uses 3 x 256 instead of a 1024-wide padded tile. On a GPU the block sizes are
autotuned per (kernel, D class) with keys bucketed to powers of two (the number of unique items
changes every batch; retuning per batch would cost seconds). Under TRITON_INTERPRET=1 one fixed
small tile is used so CPU tests stay fast.
"""

from __future__ import annotations

import os

MAX_DC = 4
INTERPRET_BLOCK = 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def d_layout(d: int, block_dc: int | None = None) -> tuple[int, int, bool]:
    """(BLOCK_DC, NUM_DC, EVEN_D) for embedding size ``d``."""
    if block_dc is None:
        block_dc = max(min(next_pow2(d), 256), next_pow2(-(-d // MAX_DC)), 16)
    num_dc = -(-d // block_dc)
    if num_dc > MAX_DC:
        raise ValueError(f"block_dc={block_dc} splits D={d} into more than {MAX_DC} chunks")
    return block_dc, num_dc, d % block_dc == 0


def d_class(block_dc: int, num_dc: int) -> str:
    if num_dc > 1:
        return "large"
    return "d256" if block_dc >= 256 else "small"


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, resident]): rows of q x rows of k per tile; resident
# (default True) keeps the loop-invariant tile (q in the forward, k in the backward) in registers when
# D is one chunk, else it is reloaded every step. Chosen for Hopper: fp32 accumulators of
# BLOCK x BLOCK_DC per chunk must stay in registers, k/q tiles pipelined in shared memory
# (<= ~227 KB), wgmma wants tiles of >= 64 rows per warpgroup.
_FWD = {
    "small": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
              (128, 128, 4, 2)],
    # sm_90 spill stack (Triton 3.6, `sm90_check fwd 256 --sweep`): 0 B at 64x32x8w, 24 B at 64x64x8w/2
    # stages, 216-1664 B at the others tried; 128-row tiles kept for their larger MMAs.
    "d256": [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2, False),
             (128, 32, 8, 3), (128, 64, 8, 3)],
    # D > 256: the fp32 dQ accumulator (BLOCK_M x D) spills in every config (>= 1.75 KB at D = 768);
    # configs over the 227 KB of shared memory dropped (e.g. 128x64x16w needs 295 KB).
    "large": [(64, 64, 16, 2), (64, 64, 16, 3), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2),
              (64, 64, 8, 3)],
}
# Backward dK pass: BLOCK_N rows of k own the dK accumulator, BLOCK_M rows of q stream past.
_BWD = {
    "small": [(128, 128, 8, 3), (64, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4),
              (128, 128, 4, 2)],
    # sm_90 spill stack: 8-16 B at 64x64x8w, 240-250 B at 64x128x8w, 576-976 B at the others tried.
    "d256": [(64, 64, 8, 2), (64, 64, 8, 4), (64, 64, 8, 3), (64, 64, 8, 2, False), (64, 128, 8, 2),
             (64, 128, 8, 3), (128, 64, 8, 3)],
    # D > 256: the dK accumulator spills everywhere; 64x32x16w spills least (440 B) but runs without
    # wgmma (32-row accumulator), kept for the autotuner to weigh.
    "large": [(64, 64, 16, 2), (64, 64, 16, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 16, 3)],
}

_TUNED: dict = {}


def resident(config: tuple) -> bool:
    return bool(config[4]) if len(config) > 4 else True


def tuned(kernel, stage: str, dclass: str):
    """The autotuned launcher of ``kernel`` for one D class (built once, lazily)."""
    import triton

    key = (stage, dclass)
    if key not in _TUNED:
        table = _FWD if stage == "fwd" else _BWD
        configs = [triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "RESIDENT": resident(c)}, num_warps=c[2],
                                 num_stages=c[3]) for c in table[dclass]]
        keys = ["N_KEY", "M_KEY", "D", "HAS_BIAS"]
        keys += ["COMPUTE_DQ"] if stage == "fwd" else ["COMPUTE_DK", "COMPUTE_DB"]
        _TUNED[key] = triton.autotune(configs=configs, key=keys)(kernel)
    return _TUNED[key]
