"""Text -> batches -> per-sample loss, the pipeline every profile of this package is made with
(``gd profile``, ``gd landscape``, ``gd demo`` and the benchmarks' ``bench/glue.py``).

* :func:`text_batches` tokenises chosen paragraphs into (this rank's) batches and builds the
  objective's per-sample loss, with an optional bank of reference paragraphs (the contrastive
  objective's negatives);
* :func:`prepare_text` is what the commands run: corpus, model, sample choice, then
  :func:`text_batches`;
* :func:`profile_metadata` is the metadata a profile of such a run records.

Example:
    >>> tm, corpus, batches, loss, notes = prepare_text(  # doctest: +SKIP
    ...     "minilm", None, objective=None, samples=8, seq_len=32, batch_size=4, seed=0)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from gd_core import ArgumentError

from . import corpus as gdc
from .distributed import Dist

#: the contrastive objective's fixed negative bank has at most this many paragraphs
REFERENCE_SAMPLES = 32


def quiet_transformers() -> None:
    """Offline, no download attempts, no progress bars or warnings from transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import transformers.utils.logging as tlog
    except ImportError:  # nothing to quieten; loading a model names the extra to install
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def text_batches(
    tm: gdc.TextModel,
    texts: Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    references: Sequence[str] | None = None,
    device: Any = "cpu",
    rank: int = 0,
    world: int = 1,
) -> tuple[list[dict[str, Any]], Any]:
    """This rank's batches of ``texts`` and the per-sample loss of ``tm.objective``.

    Whole batches go to ranks in turn (:func:`gd_cli.corpus.shard`). ``references`` (paragraphs,
    tokenised as one batch) are the contrastive objective's negatives; pass the same ones on every
    rank and when resuming.

    Example:
        >>> batches, loss = text_batches(tm, texts, seq_len=32, batch_size=8)  # doctest: +SKIP
    """
    globally = gdc.tokenize(tm.tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
    batches = [_to_device(b, device) for b in gdc.shard(globally, rank, world)]
    refs = None
    if references is not None:
        bank = gdc.tokenize(tm.tokenizer, references, seq_len=seq_len, batch_size=len(references))
        refs = _to_device(bank[0], device)
    return batches, gdc.objective_loss(tm, seed=seed, references=refs)


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
    refs = None
    if tm.objective == "contrastive":
        # a fixed negative bank, the same whatever --samples is (so a run can be extended)
        refs = gdc.select(text.texts, min(REFERENCE_SAMPLES, len(text.texts)), seed)
    batches, loss = text_batches(
        tm,
        chosen[:used],
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        references=refs,
        device=device,
        rank=rank,
        world=world,
    )
    loss.name = tm.objective
    notes = {
        "used": used,
        "available": len(text.texts),
        "requested": samples,
        "batch_size": batch_size,
    }
    return tm, text, batches, loss, notes


def prepare_text_for(args: argparse.Namespace, d: Dist) -> tuple[Any, ...]:
    """:func:`prepare_text` with a command's options (``--model``, ``--corpus`` and those of
    :func:`gd_cli.args.text_args`) for the process ``d`` (its device and share).

    Example:
        >>> tm, corpus, batches, loss, notes = prepare_text_for(args, Dist())  # doctest: +SKIP
    """
    return prepare_text(
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


def profile_metadata(tm: gdc.TextModel, text: gdc.Corpus, seq_len: int) -> dict[str, Any]:
    """The metadata a profile of ``tm`` on ``text`` records: model, corpus, length, objective.

    Example:
        >>> tm = gdc.TextModel(None, None, "mlm", "tiny", "/m/tiny")
        >>> sorted(profile_metadata(tm, gdc.Corpus(("a",), "c.txt", "00"), 16))
        ['corpus', 'corpus_sha256', 'model', 'model_path', 'objective', 'seq_len']
    """
    return {
        "model": tm.name,
        "model_path": tm.path,
        **text.metadata(),
        "seq_len": seq_len,
        "objective": tm.objective,
    }
