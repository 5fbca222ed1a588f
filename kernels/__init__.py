"""transrec.kernels: the in-batch softmax (a linear cross-entropy over the batch's unique items)
behind one dispatcher, :func:`inbatch_softmax`; see :mod:`transrec.kernels.dispatch` for the
implementations and the Triton designs.

The package stands alone: besides the bare-name guard below (transrec._toplevel) it imports nothing
of transrec outside itself. Its choices and its error type (:mod:`transrec.kernels.interface`) load
without torch, so a configuration can name them; the dispatcher loads on first use of a name that
needs it."""

from transrec._toplevel import bare_import

if not bare_import(__name__, __file__):  # a bare `import kernels` gets the installed distribution
    import importlib

    from transrec.kernels.interface import IMPLS, REDUCTIONS, Impl, KernelInputError

    _LAZY = {name: "transrec.kernels.dispatch"
             for name in ("auto_impl", "inbatch_softmax", "inbatch_softmax_reference", "reduce_rows")}

    def __getattr__(name: str):
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(list(globals()) + list(_LAZY))

__all__ = ["IMPLS", "REDUCTIONS", "Impl", "KernelInputError", "auto_impl", "inbatch_softmax",
           "inbatch_softmax_reference", "reduce_rows"]
