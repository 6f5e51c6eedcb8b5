"""``gd profile``: estimate a pretrained model's Fisher on a corpus and write a profile.

Resumable (``OUT.partial.npz``, which records the run's settings), data-parallel under ``torchrun``.

Example:
    >>> from gd_cli.main import main
    >>> main(["profile", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..args import (
    CLIError,
    SubParsers,
    add_command,
    int_option,
    mapping_args,
    mapping_override,
    text_args,
)
from ..distributed import Dist, finish_distributed, init_distributed, say
from ..lock import OutputLock
from ..text import prepare_text_for, profile_metadata

EPILOG = """examples:
  gd profile --model minilm --corpus wiki.txt --samples 1000 --out minilm.profile.npz
  gd profile --model ./my-bert --corpus wiki.txt --objective mlm --seq-len 128
  gd profile --model minilm --corpus wiki.txt --out minilm.profile.npz --resume   # after Ctrl-C
  torchrun --nproc-per-node 4 -m gd_cli profile --model ./my-bert --corpus wiki.txt

The corpus is a UTF-8 text file with one paragraph per line (WikiText headings are skipped).
Progress is checkpointed to OUT.partial.npz every --checkpoint-every batches; rerun the same
command with --resume to continue an interrupted run (or, with --keep-checkpoint, to extend a
finished one with a larger --samples).
"""


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


def _check_resume(ckpt: Path, key: dict[str, Any]) -> None:
    """Refuse to continue ``ckpt`` unless the settings stored inside it are this run's."""
    from gd_core import FisherAccumulator, GuidedDropoutError

    try:
        acc = FisherAccumulator.load(ckpt)
        acc.check_settings(key, source=str(ckpt))
    except GuidedDropoutError as exc:
        text = str(exc)
        if "fix:" not in text:
            text += f"; fix: delete {ckpt} to start over"
        raise CLIError(f"--resume: {text}") from exc


def _start_checkpoint(ckpt: Path, key: dict[str, Any], world: int) -> None:
    """Replace any earlier partial run by an empty checkpoint that records this run's settings.

    Every later checkpoint is this accumulator with more samples, saved atomically with the
    settings in its header, so a resume can prove which run it continues.
    """
    from gd_core import FisherAccumulator

    acc = FisherAccumulator()
    acc.settings = dict(key)
    acc.metadata.update({"world_size": world, "batches_done": 0, "rank_samples": [0] * world})
    acc.save(ckpt)


def run(args: argparse.Namespace) -> int:
    """``gd profile``: Fisher of a pretrained model on a corpus, written as a profile."""
    out = Path(args.out or _default_out(args.model))
    if out.exists() and out.is_dir():
        raise CLIError(f"--out: expected a file path, received the folder {str(out)!r}")
    ckpt = Path(f"{out}.partial.npz")
    d = init_distributed(args.device)
    lock = OutputLock(out)
    try:
        _lock_output(lock, d)  # before the checkpoint is touched: one run per --out
        return _profile(args, d, out, ckpt)
    finally:
        lock.release()
        finish_distributed(d)


def _lock_output(lock: OutputLock, d: Dist) -> None:
    """Rank 0 takes the lock; under ``torchrun`` every rank learns whether it got it, so a
    refused run stops on every rank (none waits for the others)."""
    refused = None
    if d.main:
        try:
            lock.acquire()
        except CLIError as exc:
            refused = str(exc)
    if d.world > 1:
        import torch

        box = [refused]
        torch.distributed.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused is not None:
        raise CLIError(refused)
    if lock.note:
        say(d, f"gd profile: note: {lock.note}")


def _profile(args: argparse.Namespace, d: Dist, out: Path, ckpt: Path) -> int:
    import adapters.torch as gdt
    from gd_core import cache

    start = time.perf_counter()
    tm, text, batches, loss, notes = prepare_text_for(args, d)
    if notes["used"] < notes["requested"]:
        why = (
            f"the corpus has {notes['available']} paragraphs"
            if notes["available"] < notes["requested"]
            else f"equal shares for {d.world} processes"
        )
        say(d, f"gd profile: note: using {notes['used']} samples ({why})")
    key = _run_key(args, tm, text, d.world)
    resuming = bool(args.resume) and ckpt.exists()
    if resuming:
        _check_resume(ckpt, key)
        say(d, f"gd profile: resuming from {ckpt}")
    else:
        if args.resume:
            say(d, f"gd profile: note: no partial run at {ckpt}; starting from the beginning")
        elif ckpt.exists():
            say(
                d,
                f"gd profile: note: replacing the earlier partial run {ckpt} "
                "(--resume continues it)",
            )
        if d.main:
            _start_checkpoint(ckpt, key, d.world)
    say(
        d,
        f"gd profile: {tm.name} ({type(tm.model).__name__}), objective {tm.objective}, "
        f"{notes['used']} samples x {args.seq_len} tokens from {text.source}, "
        f"{d.world} process(es) on {d.device}",
    )
    meta = {
        **profile_metadata(tm, text, args.seq_len),
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
            # the main process continues the checkpoint it just started (an empty accumulator that
            # carries the settings); the others start empty unless resuming
            resume=resuming or d.main,
            mapping=mapping_override(args),
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
        if ckpt.exists():
            ckpt.unlink()
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


def add_parser(sub: SubParsers) -> None:
    """Add ``gd profile`` to the ``gd`` parser."""
    p = add_command(
        sub, "profile", "estimate a pretrained model's Fisher and write a profile", EPILOG
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="'minilm' (bundled) or a save_pretrained folder",
    )
    p.add_argument("--corpus", required=True, metavar="FILE", help="text, one paragraph per line")
    p.add_argument("--out", metavar="PROFILE", help="output file (default: <model>.profile.npz)")
    text_args(p, samples=128, batch_size=8)
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial.npz")
    p.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep OUT.partial.npz after success (to extend the run later with --resume)",
    )
    int_option(p, "--checkpoint-every", 25, "K", "batches between checkpoints")
    p.add_argument("--cache", action="store_true", help="also store it in the per-user cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    mapping_args(p)
    p.set_defaults(func=run)
