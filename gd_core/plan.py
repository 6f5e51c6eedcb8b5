"""The plan: what ``apply`` installs at every dropout site, decided once for every adapter.

An adapter lists its model's sites (``gd_core.Site``), their current probabilities and the
model's :class:`~gd_core.fingerprint.Fingerprint` (canonical names and layout), and calls
:func:`make_plan` with what the user passed. The plan says, per site, the probability, where it
came from (``profile``, ``given``, ``keep``, ``upper``), the per-unit rates for unit granularity
and why a site has none. The adapter only translates the plan into its framework.

Example:
    >>> from gd_core import Site
    >>> sites = [Site("enc.dropout", ("enc.weight",)), Site("head.dropout", ("head.weight",))]
    >>> plan = make_plan({"enc.dropout": 0.05}, sites, {"head.dropout": 0.1}, None,
    ...                  framework="torch")
    >>> [(s.site, s.p, s.source) for s in plan]
    [('enc.dropout', 0.05, 'given'), ('head.dropout', 0.1, 'keep')]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cache as _cache
from .align import align, check_same_model, find_renaming, resolve
from .cache import find_cached
from .errors import ProfileMismatchError, ProfileNotFoundError, bad_argument
from .fingerprint import Fingerprint
from .profile import SensitivityProfile, _mapping_dict
from .sites import BySite, Site
from .validate import check_choice, check_fraction, check_probability

GRANULARITIES: tuple[str, ...] = ("site", "unit")
MISSING_POLICIES: tuple[str, ...] = ("keep", "upper", "error")


@dataclass(frozen=True)
class SitePlan:
    """One site of a plan.

    Attributes:
        site: the model's site name.
        p: the site probability to install (for per-unit rates, their mean).
        source: ``profile``, ``given`` (a ``{site: p}`` the user passed), ``keep`` (a site the
            profile lacks keeps its p) or ``upper`` (such a site gets the mapping's ``p_upper``).
        rates: per-unit probabilities (unit granularity, from the profile's unit scores), else
            None.
        note: why a site has no per-unit rates under unit granularity ("" otherwise).
    """

    site: str
    p: float
    source: str
    rates: np.ndarray | None = None
    note: str = ""


@dataclass
class Plan(BySite[SitePlan]):
    """Per-site decisions of :func:`make_plan`, in the model's site order."""

    entries: list[SitePlan]
    granularity: str = "site"
    absent: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: SensitivityProfile | None = None

    def _by_site(self) -> list[SitePlan]:
        return self.entries

    def probabilities(self) -> dict[str, float]:
        return {e.site: e.p for e in self.entries}


def _given(
    given: Mapping[str, Any], names: Sequence[str], hint: str
) -> tuple[dict[str, float], list[str]]:
    renaming = find_renaming([str(k) for k in given], names)
    probs = {renaming(str(k)): v for k, v in given.items()}
    absent = [k for k in probs if k not in set(names)]
    if absent:  # a name the user typed that is no site here is a mistake in every adapter
        raise bad_argument(
            "profile",
            "a dict whose keys are dropout sites of this model",
            absent[:3],
            f"use names from {hint}, e.g. {list(names)[:3]}",
        )
    out = {
        site: check_probability(p, f"profile[{site!r}]", "pass a dropout probability, e.g. 0.1")
        for site, p in probs.items()
    }
    return out, absent


def _load(profile: Any, fix: str) -> SensitivityProfile:
    """A :class:`SensitivityProfile` from a profile or the path of a saved one.

    Example:
        >>> _load(3, "pass a profile")
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: profile: expected None (use the cache), a SensitivityProfile, the path of a saved one, or {site: p}, received 'int'; fix: pass a profile
    """
    if isinstance(profile, SensitivityProfile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return SensitivityProfile.load(profile)
    raise bad_argument(
        "profile",
        "None (use the cache), a SensitivityProfile, the path of a saved one, or {site: p}",
        type(profile).__name__,
        fix,
    )


def make_plan(
    profile: Any,
    sites: Sequence[Site] | Sequence[str],
    current: Mapping[str, float],
    fingerprint: Fingerprint | None,
    *,
    mapping: str | Mapping[str, Any] | None = None,
    missing: str = "keep",
    strict: bool = True,
    granularity: str = "site",
    spread: float = 1.0,
    framework: str = "",
    not_found: tuple[str, str] | None = None,
    lookup: Callable[[Sequence[str], Fingerprint], SensitivityProfile | None] | None = None,
) -> Plan:
    """Decide every site's probability from what the user passed to an adapter's ``apply``.

    Args:
        profile: a :class:`SensitivityProfile`, the path of a saved one, a dict ``{site: p}``
            (installed as given), or None (a cached profile of this model, found by
            ``fingerprint``).
        sites: the model's sites in the model's order: ``Site`` objects (a site whose ``units``
            is set must have as many unit scores in the profile, else ProfileMismatchError), or
            names (the adapter checks unit widths itself, e.g. at run time).
        current: each site's current probability (for ``missing='keep'`` and the report).
        fingerprint: the model's parameters (canonical names and layout), or None.
        mapping: overrides the profile's score-to-probability mapping.
        missing: what sites the profile lacks get: ``keep``, ``upper`` (``p_upper``), ``error``.
        strict: apply :func:`check_same_model` (a ``{site: p}`` dict naming a key that is no
            site of the model is refused whatever ``strict`` is).
        granularity: ``site`` or ``unit`` (per-unit rates from the profile's unit scores).
        spread: how far unit rates spread around the site's p (``[0, 1]``).
        framework: the adapter's name, used in messages (``adapters.<framework>.sites``).
        not_found: ``(what, fix)`` worded into the error when no profile is cached.
        lookup: the cache lookup (default :func:`gd_core.cache.find_cached`).
    """
    check_choice(granularity, "granularity", GRANULARITIES)
    check_choice(missing, "missing", MISSING_POLICIES)
    spread = check_fraction(spread, "spread")
    site_objs = {s.name: s for s in sites if isinstance(s, Site)}
    names = [s.name if isinstance(s, Site) else str(s) for s in sites]
    hint = f"adapters.{framework}.sites(model)" if framework else "the adapter's sites(model)"
    notes: list[str] = []
    aligned: SensitivityProfile | None = None
    unit_p: dict[str, np.ndarray] = {}
    if isinstance(profile, Mapping):
        given, absent = _given(profile, names, hint)
        upper = float(_mapping_dict(mapping)["p_upper"])
        chosen: dict[str, tuple[float, str]] = {n: (given[n], "given") for n in names if n in given}
        for n in names:
            if n not in chosen:
                chosen[n] = (
                    (upper, "upper") if missing == "upper" else (float(current.get(n, 0.0)), "keep")
                )
        lacking = [n for n in names if n not in given]
    else:
        if profile is None:
            if fingerprint is None:
                raise bad_argument(
                    "profile",
                    "a profile (this model has no fingerprint to look one up)",
                    None,
                    "pass profile=... (a SensitivityProfile or the path of a saved one)",
                )
            prof = (lookup or find_cached)(names, fingerprint)
            if prof is None:
                what, fix = not_found or (
                    "this model",
                    f"run adapters.{framework}.profile(..., cache=True) once",
                )
                raise ProfileNotFoundError(
                    f"profile: expected a sensitivity profile for {what}, received none "
                    f"(profile=None) and no compatible profile is cached in "
                    f"{_cache.cache_dir()}; fix: {fix}"
                )
        else:
            prof = _load(profile, f"pass profile=adapters.{framework}.profile(...) or a saved path")
        aligned = align(prof, names, None, strict=False)
        if not any(s in set(names) for s in aligned.site_names):
            raise ProfileMismatchError(
                "profile: expected a profile whose sites match this model's dropout sites, "
                f"received sites like {prof.site_names[:2]} while the model has {names[:2]} "
                "(not one site in common, whatever prefix is renamed); fix: compute a profile "
                f"for this model (adapters.{framework or '<framework>'}.profile or gd profile)"
            )
        if strict:
            notes.extend(check_same_model(aligned, names, fingerprint))
        if aligned.site_names != prof.site_names:
            notes.append(
                f"profile sites renamed to this model's names (e.g. {prof.site_names[0]!r} -> "
                f"{aligned.site_names[0]!r})"
            )
        absent = [s for s in aligned.site_names if s not in set(names)]
        lacking = [n for n in names if n not in set(aligned.site_names)]
        if not (lacking and missing == "error"):
            chosen = resolve(aligned, names, current, mapping=mapping, missing=missing)
        if granularity == "unit":
            from_profile = {s: p for s, (p, src) in chosen.items() if src == "profile"}
            unit_p = aligned.unit_probabilities(from_profile, spread=spread)
    if lacking and missing == "error":
        raise ProfileMismatchError(
            f"profile: expected a probability for every dropout site, received none for "
            f"{lacking[:3]}; fix: pass missing='keep' (leave them) or missing='upper' (p_upper)"
        )
    if absent:
        notes.append(
            f"{len(absent)} profile site(s) have no dropout site in this model (no Dropout node, "
            f"layer or module of that name: an exporter folded them away, or the model "
            f"differs): {absent[:4]}"
        )
    entries = []
    for n in names:
        p, source = chosen[n]
        p = check_probability(p, f"probability of site {n!r}", "lower the mapping's p_upper")
        rates, note = None, ""
        if granularity == "unit" and source in ("profile", "given"):
            rates = unit_p.get(n)
            if source == "given":
                note = "a given probability is one per site"
            elif rates is None:
                note = "no unit scores in the profile"
            else:
                units = site_objs[n].units if n in site_objs else None
                if units is not None and len(rates) != units:
                    raise ProfileMismatchError(
                        f"profile: expected {units} unit scores for site {n!r} (its input's "
                        f"last axis), received {len(rates)}; fix: compute the profile on this "
                        "model, or use granularity='site'"
                    )
        entries.append(SitePlan(n, p, source, rates, note))
    return Plan(entries, granularity, absent, notes, aligned)
