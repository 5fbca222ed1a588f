"""The ``transrec`` command line.

Each room registers its own subcommands: ``transrec.shards.cli`` (``shards
synth|build|convert|info``), ``transrec.engine.cli`` (``train``, ``eval``, ``export``,
``transfer``, ``compare``, ``demo``, ``plot``, ``bench``, ``launch``) and ``transrec.inference.cli``
(``recommend``, ``vectors``, ``serve``). Imports go one way: this module imports theirs, theirs never
import it. Errors a user can fix are raised as :class:`transrec.errors.UserError` and printed as one
line with a non-zero exit: 2, or the error's own ``exit_code`` (a failed write,
:class:`transrec.storage.WriteFailed`: 74).
"""

from __future__ import annotations

import argparse
import os
import sys

from transrec import __version__
from transrec.engine import cli as engine_cli
from transrec.errors import UserError
from transrec.inference import cli as inference_cli
from transrec.shards import cli as shards_cli

# Models load from local folders only; tokenizers run in this process's threads, not in forks.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The modules that define ``register(subparsers)``, in the order of the help's command list.
_SUBCOMMANDS = (shards_cli, engine_cli, inference_cli)


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
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        result = args.func(args)
    except UserError as exc:  # one line; its own exit code when it carries one (a failed write: 74)
        print(f"transrec: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", None) or 2)
    except KeyboardInterrupt:
        print("transrec: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
