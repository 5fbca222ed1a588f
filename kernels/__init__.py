"""transrec.kernels: the in-batch softmax (a linear cross-entropy over the batch's unique items)
behind one dispatcher, :func:`inbatch_softmax`; see :mod:`transrec.kernels.dispatch` for the
implementations and the Triton designs."""

from transrec._toplevel import bare_import

if not bare_import(__name__, __file__):  # a bare `import kernels` gets the installed distribution
    from transrec.kernels.dispatch import (
        IMPLS,
        REDUCTIONS,
        KernelInputError,
        auto_impl,
        inbatch_softmax,
        inbatch_softmax_reference,
        reduce_rows,
    )

__all__ = ["IMPLS", "REDUCTIONS", "KernelInputError", "auto_impl", "inbatch_softmax",
           "inbatch_softmax_reference", "reduce_rows"]
