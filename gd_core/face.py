"""The options every adapter's public functions share, defined once.

Each adapter's ``estimate_fisher``, ``profile`` and ``apply`` name their framework's own
parameters explicitly and take the options below as keywords, typed with
``**options: Unpack[FisherOptions]`` (``ProfileOptions``, ``ApplyOptions``). Their names,
defaults and checks live here and nowhere else, so the three adapters cannot drift apart: an
adapter turns what it was given into settings with :meth:`FisherSettings.of` (and the others),
which fills in the defaults and refuses a keyword the function does not take.

Example:
    >>> s = FisherSettings.of({"max_samples": 64}, "estimate_fisher")
    >>> s.max_samples, s.progress, s.on_nonfinite
    (64, True, 'raise')
    >>> sorted(s.loop())[:3]
    ['checkpoint', 'checkpoint_every', 'max_samples']
    >>> FisherSettings.of({"max_sample": 64}, "estimate_fisher")
    Traceback (most recent call last):
    ...
    TypeError: estimate_fisher() got an unexpected keyword argument 'max_sample'; did you mean 'max_samples'? ...
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypedDict

from . import cache as _cache
from .fingerprint import Fingerprint
from .profile import SensitivityProfile
from .sites import Site

__all__ = [
    "ApplyOptions",
    "ApplySettings",
    "FisherOptions",
    "FisherSettings",
    "ProfileOptions",
    "ProfileSettings",
]


class FisherOptions(TypedDict, total=False):
    """The Fisher loop's options, taken by every adapter's ``estimate_fisher`` and ``profile``.

    ``max_samples`` (stop after this many samples, per process; default the whole data),
    ``progress`` (a progress bar), ``chunk_size`` (split each batch into pieces of at most this
    many samples; the framework's per-sample buffers are held for one piece at a time),
    ``on_nonfinite`` (``"raise"``: ``NonFiniteGradientError`` naming the tensor; ``"skip"``:
    drop and count such samples), ``checkpoint`` / ``checkpoint_every`` / ``resume`` (save the
    accumulator atomically every so many batches and at the end; continue an interrupted run).
    Defaults: :class:`FisherSettings`.
    """

    max_samples: int | None
    progress: bool
    chunk_size: int | None
    on_nonfinite: str
    checkpoint: str | os.PathLike[str] | None
    checkpoint_every: int
    resume: bool


class ProfileOptions(FisherOptions, total=False):
    """:class:`FisherOptions` plus what ``profile`` does with the Fisher diagonal.

    ``aggregation`` (how a site's score is made from its tensors, see
    ``gd_core.SensitivityProfile.from_fisher``), ``mapping`` (the score-to-probability mapping
    stored in the profile; default ``linear_rank`` over [0.0, 0.1]), ``cache`` (store the
    profile in the per-user cache, where ``apply(model)`` finds it), ``metadata`` (merged into
    the profile's). Defaults: :class:`ProfileSettings`.
    """

    aggregation: str
    mapping: str | Mapping[str, Any] | None
    cache: bool
    metadata: Mapping[str, Any] | None


class ApplyOptions(TypedDict, total=False):
    """The options of every adapter's ``apply`` (see :func:`gd_core.plan.make_plan`).

    ``mapping`` (overrides the profile's score-to-probability mapping, e.g.
    ``{"p_upper": 0.2}``), ``granularity`` (``"site"`` or ``"unit"``: per-unit rates from the
    profile's unit scores), ``missing`` (sites the profile lacks: ``"keep"``, ``"upper"`` or
    ``"error"``), ``strict`` (refuse a profile made on a model with other parameters),
    ``spread`` (per-unit rates' spread around the site's rate), ``schedule`` (a
    :class:`gd_core.schedules.Schedule` or its dict, stepped per optimizer step). Defaults:
    :class:`ApplySettings`.
    """

    mapping: str | Mapping[str, Any] | None
    granularity: str
    missing: str
    strict: bool
    spread: float
    schedule: Any


class _Settings:
    """Settings made from the keywords a public function was given."""

    @classmethod
    def of(cls, given: Mapping[str, Any], function: str) -> Self:
        """Settings from the keywords ``function`` was given (a ``TypeError`` names the
        function for any other keyword, as Python would, with the nearest option)."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in given:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise TypeError(
                    f"{function}() got an unexpected keyword argument {key!r}; {hint}"
                    f"its shared options are {', '.join(names)} (gd_core.face.{cls.__name__})"
                )
        return cls(**given)


@dataclass(frozen=True)
class FisherSettings(_Settings):
    """:class:`FisherOptions` with every default filled in."""

    max_samples: int | None = None
    progress: bool = True
    chunk_size: int | None = None
    on_nonfinite: str = "raise"
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int = 50
    resume: bool = False

    def loop(self) -> dict[str, Any]:
        """The keywords of :func:`gd_core.fisher_loop.estimate` (all but ``chunk_size``, which
        sizes the adapter's engine)."""
        names = [f.name for f in dataclasses.fields(FisherSettings)]
        return {n: getattr(self, n) for n in names if n != "chunk_size"}

    def fisher(self) -> dict[str, Any]:
        """These settings as ``estimate_fisher`` keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FisherSettings)}


@dataclass(frozen=True)
class ProfileSettings(FisherSettings):
    """:class:`ProfileOptions` with every default filled in."""

    aggregation: str = "tensor_mean"
    mapping: str | Mapping[str, Any] | None = None
    cache: bool = False
    metadata: Mapping[str, Any] | None = None

    def finish(
        self,
        build: Callable[..., SensitivityProfile],
        fisher: Any,
        sites: Sequence[Site],
        fingerprint: Fingerprint,
        metadata: Mapping[str, Any],
        **extra: Any,
    ) -> SensitivityProfile:
        """The profile ``build`` makes from ``fisher`` under these settings (``build`` is
        ``SensitivityProfile.from_fisher`` or an adapter's equivalent taking its keywords): the
        adapter's ``metadata`` under the user's ``metadata`` option, stored in the per-user
        cache when ``cache`` is set.

        Example:
            >>> import numpy as np
            >>> from gd_core import SensitivityProfile, Site
            >>> s = ProfileSettings.of({"metadata": {"note": "mine"}}, "profile")
            >>> sites = [Site("d1", ("a",)), Site("d2", ("b",))]
            >>> fisher = {"a": np.ones(2), "b": np.zeros(2)}
            >>> prof = s.finish(SensitivityProfile.from_fisher, fisher, sites, None, {"note": "x"})
            >>> prof.probabilities(), prof.metadata["note"]
            ({'d1': 0.0, 'd2': 0.1}, 'mine')
        """
        prof = build(
            fisher,
            sites,
            aggregation=self.aggregation,
            mapping=self.mapping,
            fingerprint=fingerprint,
            metadata={**metadata, **dict(self.metadata or {})},
            **extra,
        )
        if self.cache:
            _cache.store(prof)
        return prof


@dataclass(frozen=True)
class ApplySettings(_Settings):
    """:class:`ApplyOptions` with every default filled in."""

    mapping: str | Mapping[str, Any] | None = None
    granularity: str = "site"
    missing: str = "keep"
    strict: bool = True
    spread: float = 1.0
    schedule: Any = None

    def plan(self) -> dict[str, Any]:
        """The keywords of :func:`gd_core.plan.make_plan`."""
        return {
            "mapping": self.mapping,
            "missing": self.missing,
            "strict": self.strict,
            "granularity": self.granularity,
            "spread": self.spread,
        }
