"""What callers of the in-batch softmax name, importing nothing beyond the standard library (no
torch): the implementations, the reductions and the one error type.

A configuration lists the implementations from :data:`Impl` (one list for the kernels and every
config that picks one); the kernels raise :class:`KernelInputError`, a plain ``ValueError``, which
their callers turn into their own error types.
"""

from __future__ import annotations

import typing
from typing import Literal

# "auto" picks triton or chunked per call (transrec.kernels.dispatch.auto_impl)
Impl = Literal["auto", "triton", "torch", "chunked"]
IMPLS: tuple[str, ...] = typing.get_args(Impl)
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


class KernelInputError(ValueError):
    """Bad input to the in-batch softmax: a one-line message naming the argument and what is wrong
    with it."""
