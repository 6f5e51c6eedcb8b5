"""``gd landscape``: the loss-landscape diagnostic (high- vs low-Fisher parameters)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..args import (
    CLIError,
    SubParsers,
    add_command,
    int_option,
    load_profile,
    positive_float,
    text_args,
)
from ..distributed import finish_distributed, init_distributed
from ..text import prepare_text_for

EPILOG = """examples:
  gd landscape --model minilm --profile minilm.profile.npz --corpus wiki.txt --out land.png
  gd landscape --model ./my-bert --profile bert.profile.npz --corpus wiki.txt --out l.png \\
      --directions 5 --radius 0.3 --points 15 --normalization plain

Moves only the parameters guarded by the top half of the profile's sites, only those of the
bottom half, and all guarded parameters, along the same random directions, and plots the loss
against the step size (see docs/plots.md).
"""


def run(args: argparse.Namespace) -> int:
    """``gd landscape``: the loss-landscape diagnostic (top- vs bottom-Fisher parameters)."""
    from .. import landscape

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out: expected a .png file name, received {str(out)!r}")
    profile = load_profile(args.profile)
    d = init_distributed(args.device, distributed=False)  # one process computes it all
    try:
        tm, text, batches, loss, notes = prepare_text_for(args, d)
        print(
            f"gd landscape: {tm.name}, objective {tm.objective}, {notes['used']} samples, "
            f"{args.directions} direction(s) x {args.points} points in [-{args.radius:g}, "
            f"{args.radius:g}]"
        )
        res = landscape.loss_landscape(
            tm.model,
            loss,
            batches,
            profile,
            directions=args.directions,
            radius=args.radius,
            points=args.points,
            normalization=args.normalization,
            seed=args.seed,
            progress=not args.quiet,
        )
        path = landscape.plot_landscape(
            res, out, title=f"{tm.name}: loss along random directions ({tm.objective})"
        )
    finally:
        finish_distributed(d)
    print(res.table())
    summ = res.summary()
    top, bottom = summ["top"]["increase_at_radius"], summ["bottom"]["increase_at_radius"]
    if bottom > 0:
        print(
            f"moving the top-50% Fisher parameters raises the loss {top / bottom:.1f}x as much "
            "as moving the bottom-50%"
        )
    print(f"plot written to {path}")
    return 0


def add_parser(sub: SubParsers) -> None:
    """Add ``gd landscape`` to the ``gd`` parser."""
    ls = add_command(
        sub,
        "landscape",
        "plot the loss along random directions for high- vs low-Fisher parameters",
        EPILOG,
    )
    ls.add_argument(
        "--model", required=True, metavar="PATH", help="'minilm' or a save_pretrained folder"
    )
    ls.add_argument("--profile", required=True, help="a profile of that model")
    ls.add_argument("--corpus", required=True, metavar="FILE", help="text, one paragraph per line")
    ls.add_argument("--out", required=True, metavar="FILE.png", help="where to write the plot")
    int_option(ls, "--directions", 3, "K", "random directions")
    ls.add_argument(
        "--radius",
        type=positive_float,
        default=0.5,
        metavar="R",
        help="largest step (%(default)s)",
    )
    int_option(ls, "--points", 11, "P", "odd number of steps", low=3)
    ls.add_argument(
        "--normalization",
        choices=("filter", "plain"),
        default="filter",
        help="filter: steps relative to each row's norm; plain: to the group's norm",
    )
    text_args(ls, samples=16, batch_size=16)
    ls.add_argument("--quiet", action="store_true", help="no progress bar")
    ls.set_defaults(func=run)
