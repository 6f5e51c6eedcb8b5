"""The ``gd`` sub-commands beyond ``show``: ``profile``, ``apply-onnx``, ``landscape``, ``demo``.

Importing this module registers them in :data:`adapters.cli.EXTRA_COMMANDS`; it imports no
framework (``gd --version`` and ``gd --help`` stay fast). Each command imports what it needs when
it runs, and a missing optional framework ends in one line naming the extra to install.

Example:
    >>> from adapters.cli import main
    >>> main(["profile", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gd_core import MAPPINGS, ArgumentError
from gd_core._io import atomic_write_bytes

from . import cli
from .cli import CLIError

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]

EPILOG_PROFILE = """examples:
  gd profile --model minilm --corpus wiki.txt --samples 1000 --out minilm.profile.npz
  gd profile --model ./my-bert --corpus wiki.txt --objective mlm --seq-len 128
  gd profile --model minilm --corpus wiki.txt --out minilm.profile.npz --resume   # after Ctrl-C
  torchrun --nproc-per-node 4 -m adapters.cli profile --model ./my-bert --corpus wiki.txt

The corpus is a UTF-8 text file with one paragraph per line (WikiText headings are skipped).
Progress is checkpointed to OUT.partial.npz every --checkpoint-every batches; rerun the same
command with --resume to continue an interrupted run (or, with --keep-checkpoint, to extend a
finished one with a larger --samples).
"""

EPILOG_APPLY_ONNX = """examples:
  gd apply-onnx classifier.onnx minilm.profile.npz classifier.guided.onnx
  gd apply-onnx classifier.onnx minilm.profile.npz out.onnx --ratios-as-inputs --p-upper 0.2

Export the model from torch in training mode first (torch.onnx.export(..., training=
torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)); see docs/onnx.md.
"""

EPILOG_LANDSCAPE = """examples:
  gd landscape --model minilm --profile minilm.profile.npz --corpus wiki.txt --out land.png
  gd landscape --model ./my-bert --profile bert.profile.npz --corpus wiki.txt --out l.png \\
      --directions 5 --radius 0.3 --points 15 --normalization plain

Moves only the parameters guarded by the top half of the profile's sites, only those of the
bottom half, and all guarded parameters, along the same random directions, and plots the loss
against the step size (see docs/plots.md).
"""

EPILOG_DEMO = """examples:
  gd demo                                   # MiniLM on Python's own documentation, ./gd-demo-out
  gd demo --corpus wiki.txt --samples 256   # your text
  gd demo --model ./my-bert --out /tmp/demo # your model (a save_pretrained folder)

Stages whose framework is not installed (Keras, ONNX) print a skip line instead of failing.
"""

#: accumulator checkpoints are at most this many reference samples for the contrastive loss
REFERENCE_SAMPLES = 32


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _positive(low: int = 1) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, received {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, received {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, received {text!r}")
    return value


def _mapping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mapping", choices=MAPPINGS, default=None, help="score-to-p mapping")
    p.add_argument("--p-lower", type=float, default=None, help="p of the most important site")
    p.add_argument("--p-upper", type=float, default=None, help="p of the least important site")
    p.add_argument("--target-mean", type=float, default=None, help="rescale to this mean p")


def _mapping_override(args: argparse.Namespace) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if args.mapping:
        out["name"] = args.mapping
    for key in ("p_lower", "p_upper", "target_mean"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out or None


def _text_args(p: argparse.ArgumentParser, samples: int, batch_size: int) -> None:
    p.add_argument(
        "--objective",
        choices=("mlm", "clm", "contrastive"),
        default=None,
        help="pretraining loss (default: mlm for a masked-LM checkpoint, clm for a causal LM, "
        "contrastive for a bare encoder such as minilm)",
    )
    p.add_argument(
        "--samples",
        type=_positive(),
        default=samples,
        metavar="N",
        help="paragraphs to use (%(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=_positive(2),
        default=64,
        metavar="L",
        help="tokens per sample (%(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive(),
        default=batch_size,
        metavar="B",
        help="samples per batch (%(default)s)",
    )
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


def quiet_transformers() -> None:
    """Offline, no download attempts, no progress bars or warnings from transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import transformers.utils.logging as tlog
    except ImportError:
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


@dataclass
class Dist:
    """Where this process stands in a (possibly) distributed run."""

    rank: int = 0
    world: int = 1
    device: Any = "cpu"
    owned: bool = False  # this process initialised the process group

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", *, distributed: bool = True) -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) and pick the device.

    gloo on CPU, nccl on CUDA (one GPU per local rank). Without ``WORLD_SIZE`` (or with
    ``distributed=False``) this is a single process on ``device``.

    Example:
        >>> init_distributed("cpu").world  # doctest: +SKIP
        1
    """
    from ._lazy import require

    torch = require("torch", "gd profile")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if distributed else 1
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ArgumentError(
            f"--device: expected a device this machine has, received {device!r} without a CUDA "
            "GPU; fix: pass --device cpu"
        )
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ArgumentError(
            f"--device: expected auto, cpu, cuda or cuda:N, received {device!r}; fix: pass "
            "--device cpu"
        ) from exc
    if world <= 1:
        return Dist(0, 1, dev, False)
    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owned = True
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owned)


def _finish_distributed(d: Dist) -> None:
    if d.owned:
        import torch

        torch.distributed.destroy_process_group()


def _say(d: Dist | None, *lines: str) -> None:
    if d is None or d.main:
        for line in lines:
            print(line, flush=True)


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def prepare_text(
    model: str,
    corpus_path: str | None,
    *,
    objective: str | None,
    samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    device: Any = "cpu",
    rank: int = 0,
    world: int = 1,
) -> tuple[Any, Any, list[dict[str, Any]], Any, dict[str, Any]]:
    """Corpus, model, this rank's batches and the per-sample loss, ready for estimation.

    Returns ``(text model, corpus, batches, loss, notes)``; ``notes`` has ``used`` (samples in
    the run, all ranks) and ``available`` (paragraphs in the corpus).

    Example:
        >>> tm, corpus, batches, loss, notes = prepare_text(  # doctest: +SKIP
        ...     "minilm", None, objective=None, samples=8, seq_len=32, batch_size=4, seed=0)
    """
    from . import corpus as gdc

    text = gdc.load_corpus(corpus_path)  # a bad corpus fails before the model loads
    quiet_transformers()
    tm = gdc.load_text_model(model, objective)
    cfg = getattr(tm.model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ArgumentError(
            f"--seq-len: expected at most {limit} (the model's maximum sequence length), "
            f"received {seq_len}; fix: pass --seq-len {min(limit, 128)}"
        )
    tm.model.to(device)
    chosen = gdc.select(text.texts, samples, seed)
    if len(chosen) < world:
        raise ArgumentError(
            f"--samples: expected at least one sample per process ({world}), received "
            f"{len(chosen)}; fix: pass a larger --samples or use fewer processes"
        )
    if world > 1:
        # Whole batches go to ranks in turn (rank r takes global batches r, r+W, ...), so a
        # distributed run sees the same batches -- hence the same masks -- as a single process.
        # Every rank must run the same number of batches (their checkpoints are collective).
        per = len(chosen) // world
        if per >= batch_size:
            used = (len(chosen) // (batch_size * world)) * batch_size * world
        else:
            batch_size, used = per, per * world
    else:
        used = len(chosen)
    chosen = chosen[:used]
    globally = gdc.tokenize(tm.tokenizer, chosen, seq_len=seq_len, batch_size=batch_size)
    batches = [_to_device(b, device) for b in gdc.shard(globally, rank, world)]
    refs = None
    if tm.objective == "contrastive":
        # a fixed negative bank, the same whatever --samples is (so a run can be extended)
        ref_texts = gdc.select(text.texts, min(REFERENCE_SAMPLES, len(text.texts)), seed)
        refs = _to_device(
            gdc.tokenize(tm.tokenizer, ref_texts, seq_len=seq_len, batch_size=len(ref_texts))[0],
            device,
        )
    loss = gdc.objective_loss(tm, seed=seed, references=refs)
    loss.name = tm.objective
    notes = {
        "used": used,
        "available": len(text.texts),
        "requested": samples,
        "batch_size": batch_size,
    }
    return tm, text, batches, loss, notes


# --------------------------------------------------------------------------------------------
# gd profile
# --------------------------------------------------------------------------------------------


def _default_out(model: str) -> str:
    name = Path(model.rstrip("/\\")).name or "model"
    return f"{name}.profile.npz"


def _run_key(args: argparse.Namespace, tm: Any, text: Any, world: int) -> dict[str, Any]:
    import adapters.torch as gdt

    return {
        "model": args.model,
        "fingerprint": gdt.fingerprint(tm.model).digest,
        "corpus_sha256": text.sha256,
        "objective": tm.objective,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "world_size": world,
    }


def _check_resume(key_path: Path, key: dict[str, Any], ckpt: Path) -> None:
    if not key_path.exists():
        return
    try:
        old = json.loads(key_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in key.items() if old.get(k) != v]
    if diffs:
        raise CLIError(
            f"--resume: expected the settings of the interrupted run, received different ones "
            f"({'; '.join(diffs[:3])}); fix: rerun with the original settings, or delete "
            f"{ckpt} to start over"
        )


def cmd_profile(args: argparse.Namespace) -> int:
    """``gd profile``: Fisher of a pretrained model on a corpus, written as a profile."""
    out = Path(args.out or _default_out(args.model))
    if out.exists() and out.is_dir():
        raise CLIError(f"--out: expected a file path, received the folder {str(out)!r}")
    ckpt = Path(f"{out}.partial.npz")
    key_path = Path(f"{out}.partial.json")
    d = init_distributed(args.device)
    try:
        return _profile(args, d, out, ckpt, key_path)
    finally:
        _finish_distributed(d)


def _profile(args: argparse.Namespace, d: Dist, out: Path, ckpt: Path, key_path: Path) -> int:
    import adapters.torch as gdt
    from gd_core import cache

    start = time.perf_counter()
    tm, text, batches, loss, notes = prepare_text(
        args.model,
        args.corpus,
        objective=args.objective,
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        device=d.device,
        rank=d.rank,
        world=d.world,
    )
    if notes["used"] < notes["requested"]:
        why = (
            f"the corpus has {notes['available']} paragraphs"
            if notes["available"] < notes["requested"]
            else f"equal shares for {d.world} processes"
        )
        _say(d, f"gd profile: note: using {notes['used']} samples ({why})")
    key = _run_key(args, tm, text, d.world)
    if args.resume and ckpt.exists():
        _check_resume(key_path, key, ckpt)
        _say(d, f"gd profile: resuming from {ckpt}")
    elif args.resume:
        _say(d, f"gd profile: note: no partial run at {ckpt}; starting from the beginning")
    elif ckpt.exists():
        _say(
            d, f"gd profile: note: replacing the earlier partial run {ckpt} (--resume continues it)"
        )
    if d.main:
        atomic_write_bytes(key_path, json.dumps(key, indent=1).encode("utf-8"))
    _say(
        d,
        f"gd profile: {tm.name} ({type(tm.model).__name__}), objective {tm.objective}, "
        f"{notes['used']} samples x {args.seq_len} tokens from {text.source}, "
        f"{d.world} process(es) on {d.device}",
    )
    meta = {
        "model": tm.name,
        "model_path": tm.path,
        **text.metadata(),
        "seq_len": args.seq_len,
        "objective": tm.objective,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "world_size": d.world,
    }
    try:
        prof = gdt.profile(
            tm.model,
            batches,
            loss=loss,
            max_samples=sum(int(b["input_ids"].shape[0]) for b in batches),
            progress=not args.quiet,
            checkpoint=ckpt,
            checkpoint_every=args.checkpoint_every,
            resume=bool(args.resume),
            mapping=_mapping_override(args),
            metadata=meta,
            seed=args.seed,
        )
    except KeyboardInterrupt:
        if d.main and ckpt.exists():
            print(
                f"gd profile: interrupted; the last checkpoint is {ckpt}; run the same command "
                "with --resume to continue",
                file=sys.stderr,
            )
        raise
    if not d.main:
        return 0
    prof.save(out)
    if args.cache:
        cache.store(prof)
    if not args.keep_checkpoint:
        for p in (ckpt, key_path):
            if p.exists():
                p.unlink()
    elapsed = time.perf_counter() - start
    done = int(prof.metadata.get("samples", 0))
    if done > notes["used"]:
        print(
            f"gd profile: note: the resumed checkpoint already covered {done} samples, more "
            f"than --samples {notes['used']}"
        )
    print(prof.table())
    print(f"profile written to {out} ({done} samples, {elapsed:.0f} s)")
    if args.cache:
        print(f"cached as {cache.cache_path(prof.fingerprint)}")  # type: ignore[arg-type]
    print(f"next: gd show {out} --plot {out.with_suffix('').with_suffix('')}.png")
    return 0


# --------------------------------------------------------------------------------------------
# gd apply-onnx
# --------------------------------------------------------------------------------------------


def cmd_apply_onnx(args: argparse.Namespace) -> int:
    """``gd apply-onnx``: rewrite an ONNX graph's dropout ratios from a profile."""
    from ._lazy import require

    src = Path(args.input)
    if not src.is_file():
        raise CLIError(
            f"IN.onnx: expected an ONNX file, received {str(src)!r}, which does not exist"
        )
    profile = cli.load_profile(args.profile)
    onnx = require("onnx", "gd apply-onnx")
    import adapters.onnx as gdo

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise CLIError(
            f"IN.onnx: expected an ONNX model, received {str(src)!r}, which onnx cannot read "
            f"({type(exc).__name__}); fix: export the model again"
        ) from exc
    override = _mapping_override(args)
    new, report = gdo.apply(
        model,
        profile,
        mapping=None if override is None else {**profile.mapping, **override},
        ratios_as_inputs=args.ratios_as_inputs,
        missing=args.missing,
    )
    path = atomic_write_bytes(args.output, new.SerializeToString())
    print(report)
    print(f"guided ONNX model written to {path}")
    if args.ratios_as_inputs:
        print("feed each ratio input every step: adapters.onnx.ratio_feeds(report, ...)")
    return 0


# --------------------------------------------------------------------------------------------
# gd landscape
# --------------------------------------------------------------------------------------------


def cmd_landscape(args: argparse.Namespace) -> int:
    """``gd landscape``: the loss-landscape diagnostic (top- vs bottom-Fisher parameters)."""
    from . import landscape

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out: expected a .png file name, received {str(out)!r}")
    profile = cli.load_profile(args.profile)
    d = init_distributed(args.device, distributed=False)  # one process computes it all
    try:
        tm, text, batches, loss, notes = prepare_text(
            args.model,
            args.corpus,
            objective=args.objective,
            samples=args.samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
            device=d.device,
        )
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
        _finish_distributed(d)
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


# --------------------------------------------------------------------------------------------
# gd demo
# --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``gd demo``: profile, show, plot and apply everywhere, offline."""
    from .demo import run_demo

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


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def _sub(sub: SubParsers, name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        help=help_,
        description=help_[0].upper() + help_[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def register(sub: SubParsers) -> None:
    """Add ``profile``, ``apply-onnx``, ``landscape`` and ``demo`` to the ``gd`` parser.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers(dest="command"))
        >>> p.parse_args(["landscape", "--model", "m", "--profile", "p", "--corpus", "c",
        ...               "--out", "x.png"]).directions
        3
    """
    p = _sub(
        sub, "profile", "estimate a pretrained model's Fisher and write a profile", EPILOG_PROFILE
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="'minilm' (bundled) or a save_pretrained folder",
    )
    p.add_argument("--corpus", required=True, metavar="FILE", help="text, one paragraph per line")
    p.add_argument("--out", metavar="PROFILE", help="output file (default: <model>.profile.npz)")
    _text_args(p, samples=128, batch_size=8)
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial.npz")
    p.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep OUT.partial.npz after success (to extend the run later with --resume)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive(),
        default=25,
        metavar="K",
        help="batches between checkpoints (%(default)s)",
    )
    p.add_argument("--cache", action="store_true", help="also store it in the per-user cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _mapping_args(p)
    p.set_defaults(func=cmd_profile)

    a = _sub(
        sub, "apply-onnx", "set an ONNX graph's dropout ratios from a profile", EPILOG_APPLY_ONNX
    )
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
    _mapping_args(a)
    a.set_defaults(func=cmd_apply_onnx)

    ls = _sub(
        sub,
        "landscape",
        "plot the loss along random directions for high- vs low-Fisher parameters",
        EPILOG_LANDSCAPE,
    )
    ls.add_argument(
        "--model", required=True, metavar="PATH", help="'minilm' or a save_pretrained folder"
    )
    ls.add_argument("--profile", required=True, help="a profile of that model")
    ls.add_argument("--corpus", required=True, metavar="FILE", help="text, one paragraph per line")
    ls.add_argument("--out", required=True, metavar="FILE.png", help="where to write the plot")
    ls.add_argument(
        "--directions",
        type=_positive(),
        default=3,
        metavar="K",
        help="random directions (%(default)s)",
    )
    ls.add_argument(
        "--radius",
        type=_positive_float,
        default=0.5,
        metavar="R",
        help="largest step (%(default)s)",
    )
    ls.add_argument(
        "--points",
        type=_positive(3),
        default=11,
        metavar="P",
        help="odd number of steps (%(default)s)",
    )
    ls.add_argument(
        "--normalization",
        choices=("filter", "plain"),
        default="filter",
        help="filter: steps relative to each row's norm; plain: to the group's norm",
    )
    _text_args(ls, samples=16, batch_size=16)
    ls.add_argument("--quiet", action="store_true", help="no progress bar")
    ls.set_defaults(func=cmd_landscape)

    dm = _sub(
        sub, "demo", "profile the bundled MiniLM and apply it in torch, ONNX and Keras", EPILOG_DEMO
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
    dm.add_argument(
        "--samples", type=_positive(), default=64, metavar="N", help="Fisher samples (%(default)s)"
    )
    dm.add_argument(
        "--seq-len",
        type=_positive(2),
        default=64,
        metavar="L",
        help="tokens per sample (%(default)s)",
    )
    dm.add_argument(
        "--batch-size",
        type=_positive(),
        default=16,
        metavar="B",
        help="samples per batch (%(default)s)",
    )
    dm.add_argument("--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=cmd_demo)


if register not in cli.EXTRA_COMMANDS:
    cli.EXTRA_COMMANDS.append(register)
