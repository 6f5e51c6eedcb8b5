"""The ``gd`` command line.

Every command prints one clear line and exits non-zero on bad input; it never shows a traceback
for a user error (set ``GD_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from gd_core import MAPPINGS, GuidedDropoutError, SensitivityProfile, __version__

EPILOG_SHOW = """examples:
  gd show minilm.profile.npz
  gd show minilm.profile.npz --mapping linear_rank --p-upper 0.3 --target-mean 0.15
  gd show minilm.profile.npz --plot minilm.png
"""


EPILOG_MAIN = """examples:
  gd demo                                           # the whole tour, offline, in a few minutes
  gd profile --model minilm --corpus wiki.txt --out minilm.profile.npz
  gd show minilm.profile.npz --plot minilm.png
  gd apply-onnx classifier.onnx minilm.profile.npz classifier.guided.onnx
  gd landscape --model minilm --profile minilm.profile.npz --corpus wiki.txt --out land.png

`gd COMMAND --help` describes each command; docs/cli.md has the full reference.
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _mapping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mapping", choices=MAPPINGS, default=None, help="score-to-p mapping")
    p.add_argument("--p-lower", type=float, default=None, help="p of the most important site")
    p.add_argument("--p-upper", type=float, default=None, help="p of the least important site")
    p.add_argument("--target-mean", type=float, default=None, help="rescale to this mean p")


def _mapping_from(args: argparse.Namespace, profile: SensitivityProfile) -> dict[str, object]:
    m = dict(profile.mapping)
    if args.mapping:
        m["name"] = args.mapping
    for key in ("p_lower", "p_upper", "target_mean"):
        if getattr(args, key) is not None:
            m[key] = getattr(args, key)
    return m


def load_profile(path: str) -> SensitivityProfile:
    if not Path(path).exists():
        raise CLIError(f"profile file {path!r} does not exist; create one with `gd profile`")
    return SensitivityProfile.load(path)


def cmd_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    mapping = _mapping_from(args, profile)
    print(profile.table(mapping))
    meta = profile.metadata
    if meta:
        keys = ("model", "samples", "loss", "framework", "corpus", "seq_len", "seed")
        print("; ".join(f"{k}={meta[k]}" for k in keys if k in meta))
    if args.plot:
        from .plots import plot_profile

        out = plot_profile(profile, args.plot, mapping=mapping)
        print(f"plot written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gd",
        description="Guided dropout: Fisher-informed per-layer dropout for fine-tuning.",
        epilog=EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"guided-dropout {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    show = sub.add_parser(
        "show",
        help="print a profile's sites, scores and probabilities (and plot them)",
        epilog=EPILOG_SHOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("profile", help="a profile file written by `gd profile`")
    _mapping_args(show)
    show.add_argument("--plot", metavar="FILE.png", help="also write a plot")
    show.set_defaults(func=cmd_show)
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


#: other modules add their sub-commands here (keeps this file small)
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gd`` console script.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        guided-dropout 0.1.0
    """
    try:
        from . import cli_commands  # noqa: F401  (registers profile/demo/... if present)
    except ImportError:
        pass
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


if __name__ == "__main__":  # `python -m adapters.cli` (e.g. under torchrun)
    from adapters.cli import main as _main  # the module the sub-commands register into

    sys.exit(_main())
