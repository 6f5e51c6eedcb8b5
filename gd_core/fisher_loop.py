"""The one Fisher estimation loop every adapter runs.

An adapter supplies a :class:`FisherEngine`: per-sample squared-gradient sums for one batch (in
its framework), how to measure and slice a batch, and where pending sums live (its device, its
ranks). Everything else of the loop is decided here, once: argument checks, ``max_samples``
(the last batch is truncated), empty input, the non-finite policy (``raise``: a
:class:`NonFiniteGradientError` naming the parameter or the loss; ``skip``: offending samples are
found, skipped and counted; every sample skipped: the same :class:`NonFiniteGradientError`),
the progress bar, and checkpoint/resume bookkeeping.

Example:
    >>> import numpy as np
    >>> class Squares(NumpyEngine):  # per-sample gradient of sample x is x itself
    ...     def sq_grad_sums(self, batch):
    ...         return BatchSums({"w": (batch ** 2).sum(0)}, len(batch))
    >>> result = estimate([np.ones((2, 3)), 2 * np.ones((2, 3))], Squares(), progress=False)
    >>> result.count, result["w"].tolist()
    (4, [2.5, 2.5, 2.5])
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NonFiniteGradientError, bad_argument
from .fisher import FisherAccumulator, FisherResult
from .validate import check_choice, check_int

NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")
LOSS = ""
"""The name :meth:`FisherEngine.nonfinite` and :attr:`BatchSums.bad` use for the loss itself."""


@dataclass
class BatchSums:
    """What an engine computes for one batch.

    Attributes:
        sums: ``{parameter: sum over the batch's samples of squared per-sample gradients}`` in
            the engine's own array type.
        n: the number of samples the sums cover.
        losses: per-sample losses (anything ``np.asarray`` reads), if known: a non-finite loss
            lets the loop drop that sample without isolating every sample.
        exact: True when the engine itself left non-finite samples out of ``sums`` (``n``
            counts the others) and ``bad`` names the first non-finite quantity it met.
        bad: with ``exact``: the first non-finite parameter, :data:`LOSS` for the loss, None.
    """

    sums: Mapping[str, Any]
    n: int
    losses: Any = None
    exact: bool = False
    bad: str | None = None


class FisherEngine:
    """The framework part of Fisher estimation. Subclasses implement :meth:`sq_grad_sums` and
    usually :meth:`size`, :meth:`take`, :meth:`nonfinite`, :meth:`add` and :meth:`flush`."""

    rank: int = 0
    world: int = 1

    def sq_grad_sums(self, batch: Any) -> BatchSums:
        raise NotImplementedError

    def size(self, batch: Any) -> int:
        return len(batch)

    def take(self, batch: Any, index: slice | Sequence[int]) -> Any:
        return batch[index if isinstance(index, slice) else np.asarray(index)]

    def nonfinite(self, sums: Mapping[str, Any]) -> list[str]:
        """Names of the parameters whose sums hold NaN or Inf."""
        return [n for n, s in sums.items() if not np.all(np.isfinite(np.asarray(s)))]

    def add(self, sums: Mapping[str, Any], n: int) -> None:
        raise NotImplementedError

    def flush(
        self, counted: int, skipped: int, local: int
    ) -> tuple[dict[str, np.ndarray], int, int, list[int]]:
        """Hand over the pending sums as float64 arrays (summed over ranks), the sample and
        skipped counts (summed over ranks) and every rank's samples seen; then reset."""
        raise NotImplementedError

    def skip_batches(self, k: int) -> None:
        """Called once when resuming past ``k`` batches (e.g. to keep a seeded loss in step)."""

    def barrier(self) -> None:
        """Wait for every rank (distributed engines)."""

    def sync_progress(self, done: bool, batches_done: int) -> tuple[bool, list[int]]:
        """One round every rank takes part in: whether *every* rank has run out of batches, and
        each rank's batch count. Distributed engines all-reduce both (ranks may be handed
        different numbers of batches); a single process answers for itself."""
        return done, [batches_done]


class NumpyEngine(FisherEngine):
    """An engine whose sums are handed over as NumPy arrays and kept in float64 on the host."""

    def __init__(self) -> None:
        self.pending: dict[str, np.ndarray] = {}

    def add(self, sums: Mapping[str, Any], n: int) -> None:
        for name, s in sums.items():
            arr = np.asarray(s, dtype=np.float64)
            if name in self.pending:
                self.pending[name] = self.pending[name] + arr
            else:
                self.pending[name] = np.array(arr, dtype=np.float64, copy=True)

    def flush(
        self, counted: int, skipped: int, local: int
    ) -> tuple[dict[str, np.ndarray], int, int, list[int]]:
        out, self.pending = self.pending, {}
        return out, counted, skipped, [local]


def nonfinite_error(name: str | None) -> NonFiniteGradientError:
    """The one error for a NaN/Inf gradient (``name``: the parameter) or loss (:data:`LOSS`)."""
    fix = (
        "check the loss and inputs of that batch, or pass on_nonfinite='skip' to skip and count "
        "such samples"
    )
    if not name:
        return NonFiniteGradientError(
            f"loss: expected finite per-sample losses, received NaN or Inf; fix: {fix}"
        )
    return NonFiniteGradientError(
        f"gradient of parameter {name!r} contains NaN or Inf; fix: {fix}", parameter=name
    )


def progress_bar(total: int | None, enabled: bool) -> Any:
    """A tqdm bar counting samples (None when disabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, unit="sample", desc="Fisher", disable=None, file=sys.stderr)


def _finite_mask(losses: Any, size: int) -> np.ndarray | None:
    if losses is None:
        return None
    arr = np.asarray(losses, dtype=np.float64).reshape(-1)
    return np.isfinite(arr) if arr.size == size else None


def _step(engine: FisherEngine, batch: Any, size: int, policy: str) -> tuple[int, int]:
    """Add one batch; returns (samples counted, samples skipped)."""
    got = engine.sq_grad_sums(batch)
    if got.exact:
        if got.bad is not None and policy == "raise":
            raise nonfinite_error(got.bad)
        engine.add(got.sums, got.n)
        return got.n, size - got.n
    finite = _finite_mask(got.losses, size)
    bad_loss = finite is not None and not bool(finite.all())
    bad = engine.nonfinite(got.sums)
    if not bad_loss and not bad:
        engine.add(got.sums, got.n)
        return got.n, 0
    if policy == "raise":
        raise nonfinite_error(bad[0] if bad else LOSS)
    skipped = 0
    if bad_loss and finite is not None:
        keep = [int(i) for i in np.flatnonzero(finite)]
        skipped = size - len(keep)
        if not keep:
            return 0, size
        batch, size = engine.take(batch, keep), len(keep)
        got = engine.sq_grad_sums(batch)
        if not engine.nonfinite(got.sums):
            engine.add(got.sums, got.n)
            return got.n, skipped
    counted = 0  # finite losses, a non-finite gradient somewhere: isolate the samples
    for i in range(size):
        one = engine.sq_grad_sums(engine.take(batch, slice(i, i + 1)))
        ok = _finite_mask(one.losses, 1)
        if engine.nonfinite(one.sums) or (ok is not None and not bool(ok.all())):
            skipped += 1
        else:
            engine.add(one.sums, one.n)
            counted += one.n
    return counted, skipped


def estimate(
    batches: Iterable[Any],
    engine: FisherEngine,
    *,
    max_samples: int | None = None,
    progress: bool = True,
    on_nonfinite: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    run: Mapping[str, Any] | None = None,
    result: Callable[[FisherAccumulator], Any] | None = None,
) -> Any:
    """Run the loop over ``batches`` with ``engine``; returns the Fisher diagonal.

    ``run`` identifies the estimation (e.g. ``{"loss": "mlm"}``); it is stored in the
    accumulator's metadata with the number of processes, and a checkpoint of another run is
    refused on resume. With ``checkpoint`` the accumulator is saved atomically every
    ``checkpoint_every`` batches and at the end; ``resume=True`` loads it and skips the batches
    it already counts. ``max_samples`` counts samples per process. ``result`` builds what is
    returned from the final accumulator (default :meth:`FisherResult.from_accumulator`).
    """
    max_samples = check_int(max_samples, "max_samples", 1, 1000, optional=True)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 1, 50)  # type: ignore[assignment]
    check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
    if resume and checkpoint is None:
        raise bad_argument(
            "checkpoint",
            "a checkpoint path when resume=True",
            None,
            "pass checkpoint='fisher.ckpt.npz' (the file an interrupted run wrote)",
        )
    ident = {**dict(run or {}), "world_size": engine.world}
    acc = FisherAccumulator(on_nonfinite)  # type: ignore[arg-type]
    batches_done = local = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        acc = FisherAccumulator.load(checkpoint)
        acc.on_nonfinite = on_nonfinite  # type: ignore[assignment]
        theirs = {k: acc.metadata.get(k) for k in ident}
        theirs["world_size"] = int(acc.metadata.get("world_size", 1))
        # an empty checkpoint (``gd profile`` writes one carrying its run settings before the
        # first batch) holds no sums, so it cannot belong to another run
        if (acc.count + acc.skipped) and any(theirs[k] not in (None, v) for k, v in ident.items()):
            raise bad_argument(
                "resume",
                f"a checkpoint of the same run ({ident})",
                f"one of {theirs}",
                "delete the checkpoint file or pass resume=False to start over",
            )
        batches_done = int(acc.metadata.get("batches_done", 0))
        per_rank = acc.metadata.get("rank_batches")
        if isinstance(per_rank, list) and len(per_rank) == engine.world:
            batches_done = int(per_rank[engine.rank])
        local = int(list(acc.metadata.get("rank_samples", [0] * engine.world))[engine.rank])
    acc.metadata.update(ident)
    engine.skip_batches(batches_done)
    bar = progress_bar(max_samples, progress and engine.rank == 0)
    pending = [0, 0]  # counted, skipped since the last flush
    seen = False

    def flush() -> None:
        arrays, n, skipped, ranks = engine.flush(pending[0], pending[1], local)
        if n or skipped:
            acc.add(arrays if n else {}, n, skipped=skipped)
        pending[0] = pending[1] = 0
        acc.metadata["rank_samples"] = ranks
        acc.metadata["batches_done"] = batches_done

    def save() -> None:
        flush()
        if engine.rank == 0 and checkpoint is not None:
            acc.save(checkpoint)
        engine.barrier()

    def sync(done: bool) -> bool:
        # every flush is a collective round; ranks handed fewer batches keep taking part in the
        # others' rounds (adding nothing) until every rank is done, so unequal shards neither
        # hang nor end with a partial profile
        everyone, per_rank = engine.sync_progress(done, batches_done)
        acc.metadata["rank_batches"] = per_rank
        if checkpoint is not None:
            save()
        else:
            flush()
        return everyone

    try:
        for i, batch in enumerate(batches):
            seen = True
            if i < batches_done:
                continue
            if max_samples is not None and local >= max_samples:
                break
            size = engine.size(batch)
            if max_samples is not None and local + size > max_samples:
                size = max_samples - local
                batch = engine.take(batch, slice(0, size))
            counted, skipped = _step(engine, batch, size, on_nonfinite)
            pending[0] += counted
            pending[1] += skipped
            local += counted + skipped
            batches_done += 1
            if bar is not None:
                bar.update(size)
            if checkpoint is not None and batches_done % checkpoint_every == 0:
                sync(False)
        while not sync(True):
            pass
    finally:
        if bar is not None:
            bar.close()
    if acc.count == 0 and acc.skipped:
        raise NonFiniteGradientError(
            f"every one of the {acc.skipped} samples had a non-finite gradient or loss; fix: "
            "check the model and loss (e.g. a learning rate that diverged, or log(0) in the loss)"
        )
    if acc.count == 0:
        raise bad_argument(
            "batches",
            "at least one batch with samples",
            "an empty iterable" if not seen else "batches with no samples",
            "pass a non-empty iterable of batches",
        )
    return (result or FisherResult.from_accumulator)(acc)


REPORTED = ("fisher_engine", "fisher_fallback")  # carried into a profile's metadata


def reported(
    acc: FisherAccumulator, info: Mapping[str, Any], fallback: str, log: logging.Logger
) -> FisherResult:
    """The result of a run whose engine computed some tensors another way, saying so.

    ``info`` is the engine's ``{"engine": name, "fallback": {tensor: reason}}`` (``fallback``
    may be absent where the engine has none); both go into the accumulator's metadata
    (``fisher_engine``, ``fisher_fallback``, kept by a profile made from it) and a non-empty
    fallback is logged at INFO on ``log`` as "estimate_fisher: <fallback> for N tensor(s): ...".

    Example:
        >>> import logging
        >>> acc = FisherAccumulator()
        >>> _ = acc.add({"w": np.ones(2)}, 2)
        >>> info = {"engine": "per_sample", "fallback": {"w": "no rule"}}
        >>> r = reported(acc, info, "the exact loop", logging.getLogger("demo"))
        >>> r.accumulator.metadata["fisher_fallback"]
        {'w': 'no rule'}
    """
    acc.metadata["fisher_engine"] = info["engine"]
    if "fallback" in info:
        acc.metadata["fisher_fallback"] = dict(info["fallback"])
        if info["fallback"]:
            log.info(
                "estimate_fisher: %s for %d tensor(s): %s",
                fallback,
                len(info["fallback"]),
                ", ".join(f"{n} ({why})" for n, why in info["fallback"].items()),
            )
    return FisherResult.from_accumulator(acc)


def engine_metadata(result: FisherResult) -> dict[str, Any]:
    """What :func:`reported` put in a result's metadata, for the profile made from it."""
    meta = result.accumulator.metadata
    return {k: meta[k] for k in REPORTED if k in meta}
