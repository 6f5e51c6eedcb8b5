"""What the ``gd`` commands share before any work starts: the user-facing error, argument types,
option groups, the sub-command factory and reading a profile argument.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> mapping_args(p)
    >>> mapping_override(p.parse_args(["--p-upper", "0.2"]))
    {'p_upper': 0.2}
    >>> mapping_override(p.parse_args([])) is None
    True
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gd_core import MAPPINGS, SensitivityProfile

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def positive(low: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``.

    Example:
        >>> positive(2)("3")
        3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, received {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, received {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0.

    Example:
        >>> positive_float("0.5")
        0.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, received {text!r}")
    return value


def mapping_args(p: argparse.ArgumentParser) -> None:
    """``--mapping``, ``--p-lower``, ``--p-upper``, ``--target-mean``."""
    p.add_argument("--mapping", choices=MAPPINGS, default=None, help="score-to-p mapping")
    p.add_argument("--p-lower", type=float, default=None, help="p of the most important site")
    p.add_argument("--p-upper", type=float, default=None, help="p of the least important site")
    p.add_argument("--target-mean", type=float, default=None, help="rescale to this mean p")


def mapping_override(args: argparse.Namespace) -> dict[str, Any] | None:
    """The mapping fields the user set with :func:`mapping_args` (None when none)."""
    out: dict[str, Any] = {}
    if args.mapping:
        out["name"] = args.mapping
    for key in ("p_lower", "p_upper", "target_mean"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out or None


def int_option(
    p: argparse.ArgumentParser, flag: str, default: int, metavar: str, help_: str, low: int = 1
) -> None:
    """An option taking an int >= ``low``, its default shown in the help.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> int_option(p, "--points", 11, "P", "odd number of steps", low=3)
        >>> p.parse_args([]).points, p.parse_args(["--points", "5"]).points
        (11, 5)
    """
    p.add_argument(
        flag, type=positive(low), default=default, metavar=metavar, help=f"{help_} (%(default)s)"
    )


def text_args(p: argparse.ArgumentParser, samples: int, batch_size: int) -> None:
    """The options of a command that reads text into a model: objective, sizes, seed, device."""
    p.add_argument(
        "--objective",
        choices=("mlm", "clm", "contrastive"),
        default=None,
        help="pretraining loss (default: mlm for a masked-LM checkpoint, clm for a causal LM, "
        "contrastive for a bare encoder such as minilm)",
    )
    int_option(p, "--samples", samples, "N", "paragraphs to use")
    int_option(p, "--seq-len", 64, "L", "tokens per sample", low=2)
    int_option(p, "--batch-size", batch_size, "B", "samples per batch")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="sample choice and masking seed (%(default)s)",
    )
    p.add_argument(
        "--device", default="auto", metavar="D", help="auto (CUDA if available), cpu, cuda, cuda:1"
    )


def add_command(sub: SubParsers, name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
    """A sub-command parser whose description is its help line and whose epilog keeps its layout."""
    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        help=help_,
        description=help_[0].upper() + help_[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def load_profile(path: str) -> SensitivityProfile:
    """The profile file a command was given (a missing file is a :class:`CLIError`).

    Example:
        >>> load_profile("no-such.profile.npz")
        Traceback (most recent call last):
        ...
        gd_cli.args.CLIError: profile file 'no-such.profile.npz' does not exist; create one with `gd profile`
    """
    if not Path(path).exists():
        raise CLIError(f"profile file {path!r} does not exist; create one with `gd profile`")
    return SensitivityProfile.load(path)
