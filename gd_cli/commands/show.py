"""``gd show``: print a profile's sites, scores and probabilities; plot them."""

from __future__ import annotations

import argparse

from ..args import SubParsers, load_profile, mapping_args, mapping_override

EPILOG = """examples:
  gd show minilm.profile.npz
  gd show minilm.profile.npz --mapping linear_rank --p-upper 0.3 --target-mean 0.15
  gd show minilm.profile.npz --plot minilm.png
"""


def run(args: argparse.Namespace) -> int:
    """``gd show``."""
    profile = load_profile(args.profile)
    mapping = {**profile.mapping, **(mapping_override(args) or {})}
    print(profile.table(mapping))
    meta = profile.metadata
    if meta:
        keys = ("model", "samples", "loss", "framework", "corpus", "seq_len", "seed")
        print("; ".join(f"{k}={meta[k]}" for k in keys if k in meta))
    if args.plot:
        from ..plots import plot_profile

        out = plot_profile(profile, args.plot, mapping=mapping)
        print(f"plot written to {out}")
    return 0


def add_parser(sub: SubParsers) -> None:
    """Add ``gd show`` to the ``gd`` parser."""
    show = sub.add_parser(
        "show",
        help="print a profile's sites, scores and probabilities (and plot them)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("profile", help="a profile file written by `gd profile`")
    mapping_args(show)
    show.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write a plot (format from the suffix: .png, .jpg, .svg, .pdf...)",
    )
    show.set_defaults(func=run)
