"""The ``gd`` command line: the parser and :func:`main`.

Every command prints one clear line and exits non-zero on bad input; it never shows a traceback
for a user error (set ``GD_DEBUG=1`` to see one). The sub-commands are the modules of
:mod:`gd_cli.commands`, imported here by name; none of them imports a framework until it runs
(``gd --version`` and ``gd --help`` stay fast).

Example:
    >>> build_parser().parse_args(["show", "x.profile.npz"]).command
    'show'
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gd_core import GuidedDropoutError, __version__

from .args import CLIError
from .commands import apply_onnx, demo, landscape, profile, show

EPILOG_MAIN = """examples:
  gd demo                                           # the whole tour, offline, in a few minutes
  gd profile --model minilm --corpus wiki.txt --out minilm.profile.npz
  gd show minilm.profile.npz --plot minilm.png
  gd apply-onnx classifier.onnx minilm.profile.npz classifier.guided.onnx
  gd landscape --model minilm --profile minilm.profile.npz --corpus wiki.txt --out land.png

`gd COMMAND --help` describes each command; docs/cli.md has the full reference.
"""

#: the sub-commands in the order ``gd --help`` lists them
COMMANDS = (show, profile, apply_onnx, landscape, demo)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``gd`` parser with every sub-command of :data:`COMMANDS`.

    Example:
        >>> p = build_parser()
        >>> p.parse_args(["show", "x.npz", "--p-upper", "0.2"]).p_upper
        0.2
        >>> p.parse_args(["profile", "--model", "m", "--corpus", "c"]).checkpoint_every
        25
        >>> p.parse_args(["apply-onnx", "a.onnx", "p.npz", "b.onnx"]).missing
        'keep'
        >>> p.parse_args(["landscape", "--model", "m", "--profile", "p", "--corpus", "c",
        ...               "--out", "x.png"]).directions
        3
        >>> p.parse_args(["demo"]).samples
        64
    """
    parser = _Parser(
        prog="gd",
        description="Guided dropout: Fisher-informed per-layer dropout for fine-tuning.",
        epilog=EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"guided-dropout {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gd`` console script.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        guided-dropout 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("gd: interrupted", file=sys.stderr)
        return 130
    except (CLIError, GuidedDropoutError, ImportError, OSError, ValueError) as exc:
        # a user-facing error (a missing framework's ImportError names the extra to install)
        if os.environ.get("GD_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(f"gd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug or an environment problem: still one line
        if os.environ.get("GD_DEBUG"):
            raise
        message = " ".join(str(exc).split())[:300]
        print(
            f"gd {args.command}: internal error: {type(exc).__name__}: {message} "
            "(set GD_DEBUG=1 to see the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # `python -m gd_cli.main` (`python -m gd_cli` is the same)
    sys.exit(main())
