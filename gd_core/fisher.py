"""Streaming accumulation of the empirical Fisher diagonal.

The empirical Fisher diagonal of parameter ``theta`` over samples ``x_1..x_N`` is
``F = 1/N * sum_i (d loss(x_i) / d theta)**2`` -- squared *per-sample* gradients, averaged.
Adapters compute per-sample squared gradients in their framework and hand *sums* over chunks of
samples to :class:`FisherAccumulator`, which keeps float64 sums and the sample count. Partial
accumulators (data shards, distributed ranks, an interrupted run) merge exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._io import atomic_write_npz, read_npz
from .errors import NonFiniteGradientError, ProfileError, ResumeMismatchError, bad_argument

ACCUMULATOR_FORMAT = "gd-fisher-accumulator"
ACCUMULATOR_VERSION = 1

NonFinitePolicy = Literal["raise", "skip"]


class FisherAccumulator:
    """Float64 sums of squared per-sample gradients plus the number of samples they cover.

    Example:
        >>> import numpy as np
        >>> acc = FisherAccumulator()
        >>> acc.add_sample({"w": np.array([1.0, -2.0])})
        True
        >>> acc.add_sample({"w": np.array([3.0, 0.0])})
        True
        >>> acc.count, acc.mean()["w"].tolist()
        (2, [5.0, 2.0])
    """

    def __init__(self, on_nonfinite: NonFinitePolicy = "raise") -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise bad_argument(
                "on_nonfinite", "'raise' or 'skip'", on_nonfinite, "use on_nonfinite='raise'"
            )
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0
        self.skipped = 0
        self.metadata: dict[str, Any] = {}
        #: the settings of the run that produced these sums (stored inside the file, so a resume
        #: can prove it continues the same run; see :meth:`check_settings`)
        self.settings: dict[str, Any] | None = None

    # -- adding -------------------------------------------------------------------------------
    def add_sample(self, grads: Mapping[str, Any]) -> bool:
        """Add one sample's (unsquared) gradients. Returns False if the sample was skipped."""
        squared = {}
        for name, g in grads.items():
            arr = np.asarray(g, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                if self._nonfinite(name):
                    return False
            squared[name] = arr * arr
        self._add_sums(squared, 1)
        return True

    def add(self, sq_sums: Mapping[str, Any], n: int, *, skipped: int = 0) -> bool:
        """Add sums over ``n`` samples of squared per-sample gradients.

        ``skipped`` counts samples the adapter dropped for non-finite gradients (with
        ``on_nonfinite='skip'``, an adapter checks each sample before summing). Returns False when
        the whole chunk was skipped because a sum was non-finite.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise bad_argument("n", "a non-negative int", n, "pass the number of samples summed")
        arrays = {}
        for name, s in sq_sums.items():
            arr = np.asarray(s, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                if self._nonfinite(name, chunk=n):
                    self.skipped += int(skipped)
                    return False
            if np.any(arr < 0):
                raise bad_argument(
                    f"sq_sums[{name!r}]",
                    "sums of squared gradients (all >= 0)",
                    f"an array with minimum {arr.min():g}",
                    "square the per-sample gradients before summing them",
                )
            arrays[name] = arr
        self.skipped += int(skipped)
        self._add_sums(arrays, int(n))
        return True

    def record_skipped(self, n: int = 1) -> None:
        """Count samples an adapter skipped for a non-finite gradient or loss."""
        self.skipped += int(n)

    def _nonfinite(self, name: str, chunk: int = 1) -> bool:
        if self.on_nonfinite == "raise":
            raise NonFiniteGradientError(
                f"gradient of parameter {name!r} contains NaN or Inf; fix: check the loss and "
                "inputs for that sample, or pass on_nonfinite='skip' to skip and count such samples",
                parameter=name,
            )
        self.skipped += chunk
        return True

    def _add_sums(self, arrays: Mapping[str, np.ndarray], n: int) -> None:
        for name, arr in arrays.items():
            current = self.sums.get(name)
            if current is None:
                self.sums[name] = np.array(arr, dtype=np.float64, copy=True)
            elif current.shape != arr.shape:
                raise bad_argument(
                    f"gradient for {name!r}",
                    f"shape {current.shape} (as before)",
                    f"shape {arr.shape}",
                    "hand the accumulator gradients of the same model every time",
                )
            else:
                current += arr
        self.count += n

    # -- combining ----------------------------------------------------------------------------
    def merge(self, other: FisherAccumulator) -> FisherAccumulator:
        """Return a new accumulator equal to having added both inputs' samples to one."""
        if not isinstance(other, FisherAccumulator):
            raise bad_argument(
                "other", "a FisherAccumulator", type(other).__name__, "merge accumulators only"
            )
        mine, theirs = self.settings, other.settings
        if mine is not None and theirs is not None and mine != theirs:
            raise bad_argument(
                "other",
                "an accumulator of the same run settings",
                f"settings that differ ({'; '.join(settings_diff(mine, theirs))})",
                "merge only partial sums of one estimation",
            )
        out = FisherAccumulator(self.on_nonfinite)
        out.metadata = {**other.metadata, **self.metadata}
        out.settings = self.settings if self.settings is not None else other.settings
        for src in (self, other):
            out._add_sums(src.sums, src.count)
            out.skipped += src.skipped
        return out

    __add__ = merge

    @classmethod
    def merge_all(cls, parts: Iterable[FisherAccumulator]) -> FisherAccumulator:
        out = cls()
        for part in parts:
            out = out.merge(part)
        return out

    # -- results ------------------------------------------------------------------------------
    def mean(self) -> dict[str, np.ndarray]:
        """The empirical Fisher diagonal: sums divided by the sample count."""
        if self.count == 0:
            raise bad_argument(
                "accumulator", "at least one sample", "0 samples", "feed it some batches first"
            )
        return {name: s / self.count for name, s in self.sums.items()}

    def __repr__(self) -> str:
        return (
            f"FisherAccumulator(parameters={len(self.sums)}, count={self.count}, "
            f"skipped={self.skipped})"
        )

    def check_settings(self, expected: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Raise :class:`ResumeMismatchError` unless these sums were made with ``expected``.

        A resume is only proven when the settings stored with the sums (in the same file,
        written atomically with them) equal the settings of the run that continues them; an
        accumulator without settings proves nothing and is refused too.

        Example:
            >>> acc = FisherAccumulator()
            >>> acc.settings = {"seq_len": 32, "seed": 0}
            >>> acc.check_settings({"seq_len": 32, "seed": 0})
            >>> acc.check_settings({"seq_len": 16, "seed": 0})
            Traceback (most recent call last):
            ...
            gd_core.errors.ResumeMismatchError: checkpoint: expected the settings of the run that wrote it, received different ones (seq_len 32 -> 16); fix: rerun with the original settings, or delete checkpoint to start over
        """
        fix = f"delete {source} to start over"
        if not isinstance(self.settings, dict):
            raise ResumeMismatchError(
                f"{source}: expected a checkpoint that records its run settings, received one "
                f"without them (written by an older version or by hand), so it cannot be proven "
                f"to belong to this run; fix: {fix}"
            )
        diffs = settings_diff(self.settings, dict(expected))
        if diffs:
            raise ResumeMismatchError(
                f"{source}: expected the settings of the run that wrote it, received different "
                f"ones ({'; '.join(diffs[:4])}); fix: rerun with the original settings, or {fix}"
            )

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state atomically (temp file, then rename) to ``path`` (an ``.npz``).

        The run settings (:attr:`settings`) are in the same file's header, so the sums and the
        settings that produced them are replaced together or not at all.
        """
        meta = {
            "format": ACCUMULATOR_FORMAT,
            "version": ACCUMULATOR_VERSION,
            "count": self.count,
            "skipped": self.skipped,
            "on_nonfinite": self.on_nonfinite,
            "names": list(self.sums),
            "metadata": self.metadata,
            "settings": self.settings,
        }
        arrays = {f"p{i}": arr for i, arr in enumerate(self.sums.values())}
        return atomic_write_npz(path, json.dumps(meta), arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FisherAccumulator:
        """Read a state written by :meth:`save`; errors say whether it is missing or corrupt."""
        kind = (ACCUMULATOR_FORMAT, ACCUMULATOR_VERSION)
        meta, arrays = read_npz(path, "Fisher accumulator", kind=kind)
        on_nonfinite = meta.get("on_nonfinite", "raise")
        acc = cls(on_nonfinite if on_nonfinite in ("raise", "skip") else "raise")
        try:
            names = meta["names"]
            if not isinstance(names, list) or len(names) != len(arrays):
                raise ValueError(f"{len(arrays)} arrays for {names!r}")
            acc.sums = {name: arrays[f"p{i}"].astype(np.float64) for i, name in enumerate(names)}
            acc.count = int(meta["count"])
            acc.skipped = int(meta["skipped"])
            if acc.count < 0 or acc.skipped < 0:
                raise ValueError(f"count {acc.count}, skipped {acc.skipped}")
            if not all(np.all(np.isfinite(a)) and np.all(a >= 0) for a in acc.sums.values()):
                raise ValueError("sums that are negative or not finite")
            acc.metadata = dict(meta.get("metadata") or {})
            settings = meta.get("settings")
            acc.settings = dict(settings) if isinstance(settings, dict) else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(
                f"{path}: accumulator file is incomplete or inconsistent ({type(exc).__name__}: "
                f"{exc}); fix: delete it and recompute"
            ) from exc
        return acc


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["key old -> new", ...]`` for every key whose value differs (missing keys included).

    Example:
        >>> settings_diff({"seq_len": 32, "seed": 0}, {"seq_len": 16, "seed": 0})
        ['seq_len 32 -> 16']
    """
    keys = list(new) + [k for k in old if k not in new]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class FisherResult(dict[str, np.ndarray]):
    """What every adapter's ``estimate_fisher`` returns: ``{parameter name: float64 Fisher
    diagonal}`` plus ``count`` (samples used), ``skipped`` (samples skipped for non-finite values)
    and ``accumulator`` (the :class:`FisherAccumulator`, to save, merge or resume).

    Example:
        >>> import numpy as np
        >>> acc = FisherAccumulator()
        >>> acc.add({"w": np.array([4.0])}, n=2)
        True
        >>> r = FisherResult.from_accumulator(acc)
        >>> r["w"].tolist(), r.count, r.skipped
        ([2.0], 2, 0)
    """

    count: int
    skipped: int
    accumulator: FisherAccumulator

    @classmethod
    def from_accumulator(cls, acc: FisherAccumulator) -> FisherResult:
        out = cls(acc.mean())
        out.count = acc.count
        out.skipped = acc.skipped
        out.accumulator = acc
        return out

    def __repr__(self) -> str:
        return f"FisherResult(parameters={len(self)}, count={self.count}, skipped={self.skipped})"
