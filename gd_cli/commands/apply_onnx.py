"""``gd apply-onnx``: rewrite the dropout ratios of an exported ONNX training graph."""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters import require
from gd_core._io import atomic_write_bytes

from ..args import CLIError, SubParsers, add_command, load_profile, mapping_args, mapping_override

EPILOG = """examples:
  gd apply-onnx classifier.onnx minilm.profile.npz classifier.guided.onnx
  gd apply-onnx classifier.onnx minilm.profile.npz out.onnx --ratios-as-inputs --p-upper 0.2

Export the model from torch in training mode first (torch.onnx.export(..., training=
torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)); see docs/onnx.md.
"""


def run(args: argparse.Namespace) -> int:
    """``gd apply-onnx``: rewrite an ONNX graph's dropout ratios from a profile."""
    src = Path(args.input)
    if not src.is_file():
        raise CLIError(
            f"IN.onnx: expected an ONNX file, received {str(src)!r}, which does not exist"
        )
    profile = load_profile(args.profile)
    onnx = require("onnx", "gd apply-onnx")
    import adapters.onnx as gdo

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise CLIError(
            f"IN.onnx: expected an ONNX model, received {str(src)!r}, which onnx cannot read "
            f"({type(exc).__name__}); fix: export the model again"
        ) from exc
    override = mapping_override(args)
    report = gdo.apply(
        model,
        profile,
        mapping=None if override is None else {**profile.mapping, **override},
        ratios_as_inputs=args.ratios_as_inputs,
        missing=args.missing,
    )
    path = atomic_write_bytes(args.output, report.model.SerializeToString())
    print(report)
    print(f"guided ONNX model written to {path}")
    if args.ratios_as_inputs:
        print("feed each ratio input every step: adapters.onnx.ratio_feeds(report, ...)")
    return 0


def add_parser(sub: SubParsers) -> None:
    """Add ``gd apply-onnx`` to the ``gd`` parser."""
    a = add_command(sub, "apply-onnx", "set an ONNX graph's dropout ratios from a profile", EPILOG)
    a.add_argument("input", metavar="IN.onnx", help="model exported in training mode")
    a.add_argument("profile", metavar="PROFILE", help="a profile file written by `gd profile`")
    a.add_argument("output", metavar="OUT.onnx", help="where to write the rewritten model")
    a.add_argument(
        "--ratios-as-inputs",
        action="store_true",
        help="make each ratio a graph input (to schedule it during training)",
    )
    a.add_argument(
        "--missing",
        choices=("keep", "upper", "error"),
        default="keep",
        help="what dropout sites the profile lacks get (default: keep their ratio)",
    )
    mapping_args(a)
    a.set_defaults(func=run)
