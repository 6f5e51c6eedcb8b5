"""``gd demo``: profile the bundled MiniLM and apply it in torch, ONNX and Keras, offline."""

from __future__ import annotations

import argparse

from ..args import SubParsers, add_command, int_option

EPILOG = """examples:
  gd demo                                   # MiniLM on Python's own documentation, ./gd-demo-out
  gd demo --corpus wiki.txt --samples 256   # your text
  gd demo --model ./my-bert --out /tmp/demo # your model (a save_pretrained folder)

Stages whose framework is not installed (Keras, ONNX) print a skip line instead of failing.
"""


def run(args: argparse.Namespace) -> int:
    """``gd demo``: profile, show, plot and apply everywhere, offline."""
    from ..demo import run_demo

    run_demo(
        out_dir=args.out,
        corpus=args.corpus,
        model=args.model,
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    return 0


def add_parser(sub: SubParsers) -> None:
    """Add ``gd demo`` to the ``gd`` parser."""
    dm = add_command(
        sub, "demo", "profile the bundled MiniLM and apply it in torch, ONNX and Keras", EPILOG
    )
    dm.add_argument("--corpus", metavar="FILE", help="text file (default: Python's own docs)")
    dm.add_argument(
        "--model",
        default="minilm",
        metavar="PATH",
        help="'minilm' (default) or a save_pretrained folder",
    )
    dm.add_argument(
        "--out", default="gd-demo-out", metavar="DIR", help="output folder (%(default)s)"
    )
    int_option(dm, "--samples", 64, "N", "Fisher samples")
    int_option(dm, "--seq-len", 64, "L", "tokens per sample", low=2)
    int_option(dm, "--batch-size", 16, "B", "samples per batch")
    dm.add_argument("--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=run)
