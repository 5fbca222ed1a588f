"""The ``transrec`` command line.

Each room registers its own subcommands: ``transrec.shards.cli`` (``shards synth|build|convert``)
and ``transrec.engine.cli`` (``train``, ``eval``, ``export``, ``transfer``, ``compare``, ``demo``,
``plot``). Errors a user can fix are raised as :class:`transrec.errors.UserError` and printed as
one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from transrec import __version__
from transrec.errors import UserError

# Modules that define ``register(subparsers)``; a missing module is skipped so the CLI works
# while a room is still being built.
_ROOMS = ("transrec.shards.cli", "transrec.engine.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transrec",
        description="Transferable recommendation from mixture-of-modality feedback.",
        epilog="Example: transrec demo --out demo_out",
    )
    parser.add_argument("--version", action="version", version=f"transrec {__version__}")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from
    # the environment (LOCAL_RANK), so the flag is accepted and otherwise ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _ROOMS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"transrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transrec: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
