"""Bare top-level names for the project's folders.

The repo root holds the folders ``engine/``, ``inference/``, ``kernels/``, ``models/`` and ``shards/``;
they are the packages ``transrec.engine``, ``transrec.inference``, ``transrec.kernels``,
``transrec.models`` and ``transrec.shards`` (through the symlinks ``transrec/<name> -> ../<name>``)
and are never meant to be imported under their bare names. Python started in the repo root
(``python -c``, ``python -m``, pytest, ``torchrun -m``, a REPL or a notebook) puts the root first
on ``sys.path``, so a bare ``import kernels`` would find the folder instead of the ``kernels``
distribution that other libraries import (transformers does, for its hub kernels). The same holds
for any distribution that ever claims ``engine``, ``models`` or ``shards``.

Each folder's ``__init__`` therefore starts by asking :func:`bare_import`. Under its own package
name the answer is False and the package loads as usual. Imported under the bare name, the folder
steps aside: the name is looked up again on ``sys.path`` without the repo root, and the module
found there (the installed distribution) takes the bare name in ``sys.modules``, which is what the
``import`` statement then returns (never the folder a second time, as a package apart from
``transrec.<name>``). With nothing of that name installed, the import fails with
``ModuleNotFoundError``, as it would anywhere else. Either way the bare name means in the repo root
what it means in every other folder.
"""

from __future__ import annotations

import importlib
import os
import sys

PACKAGES = ("engine", "inference", "kernels", "models", "shards")


def _same_folder(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, folder)
    except OSError:
        return False


def bare_import(name: str, init_file: str) -> bool:
    """True when the package in ``init_file`` is being imported as the bare top-level ``name``;
    ``sys.modules[name]`` then already holds the installed module of that name (or the import
    raises ``ModuleNotFoundError``), and the caller's ``__init__`` must define nothing more."""
    if "." in name:  # transrec.<name>: the package itself
        return False
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    removed = [(i, entry) for i, entry in enumerate(sys.path) if _same_folder(entry, root)]
    for i, _ in reversed(removed):
        del sys.path[i]
    sys.modules.pop(name, None)  # this folder's half-made module: the import below must not find it
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {name}/ in {root} is the package 'transrec.{name}'; "
            f"nothing named {name!r} is installed)", name=name) from None
    finally:
        for i, entry in removed:
            sys.path.insert(i, entry)
    return True
