"""In-batch softmax over the batch's unique items (linear cross-entropy) behind one dispatcher.

Model code calls :func:`inbatch_softmax` only and never imports triton.
"""

from __future__ import annotations

from transrec.kernels.reference import inbatch_softmax_reference


def inbatch_softmax(q, k, target, *, bias=None, temperature=1.0, row_mask=None, reduction="mean",
                    impl="auto"):
    """loss_i = LSE_j(q_i.k_j/tau + b_j) - (q_i.k_{t_i}/tau + b_{t_i}); rows with row_mask False drop out.

    ``impl``: "auto" | "triton" | "torch" | "chunked". (Only the torch reference exists so far.)
    """
    return inbatch_softmax_reference(q, k, target, bias=bias, temperature=temperature,
                                     row_mask=row_mask, reduction=reduction)


__all__ = ["inbatch_softmax", "inbatch_softmax_reference"]
