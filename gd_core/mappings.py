"""Mappings from site (or unit) scores to dropout probabilities.

All mappings send a *higher* Fisher score to a *lower* dropout probability: important layers are
regularised lightly. ``depth_linear`` ignores scores and rises with depth (LIMA-style per-layer
dropout). Every mapping returns probabilities in ``[p_lower, p_upper]`` unless ``target_mean``
rescales them to an equal regularisation budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ArgumentError, bad_argument

MAPPINGS: tuple[str, ...] = ("linear_rank", "linear_score", "log_score", "depth_linear", "uniform")
MAX_P = 0.999


def check_bounds(p_lower: float, p_upper: float) -> tuple[float, float]:
    """Validate ``0 <= p_lower <= p_upper < 1``."""
    for name, v in (("p_lower", p_lower), ("p_upper", p_upper)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise bad_argument(name, "a float in [0, 1)", v, f"pass e.g. {name}=0.1")
        if not np.isfinite(v) or not 0.0 <= float(v) < 1.0:
            raise bad_argument(name, "a float in [0, 1)", v, f"pass e.g. {name}=0.1")
    if p_lower > p_upper:
        raise bad_argument(
            "p_lower", f"p_lower <= p_upper (p_upper={p_upper})", p_lower, "swap the two bounds"
        )
    return float(p_lower), float(p_upper)


def _check_scores(scores: Any, mapping: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise bad_argument(
            "scores",
            "a non-empty 1-D array (one score per site)",
            f"shape {arr.shape}",
            "pass at least one site's score",
        )
    if mapping != "depth_linear" and not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr)).tolist()
        raise bad_argument(
            "scores",
            "finite scores",
            f"NaN/Inf at positions {bad[:5]}",
            "give those sites guarded parameters (a site mapping) or estimate Fisher again",
        )
    if mapping in ("linear_rank", "linear_score", "log_score") and np.any(arr < 0):
        raise bad_argument("scores", "non-negative Fisher scores", arr.min(), "check the scores")
    return arr


def rank_fractions(scores: np.ndarray) -> np.ndarray:
    """Position of each score in descending order, scaled to [0, 1]; ties share their mean.

    Example:
        >>> rank_fractions(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
        [0.16666666666666666, 1.0, 0.16666666666666666, 0.6666666666666666]
    """
    n = scores.size
    if n == 1:
        return np.array([0.5])
    order = np.argsort(-scores, kind="stable")
    positions = np.empty(n, dtype=np.float64)
    positions[order] = np.arange(n, dtype=np.float64)
    # average positions within groups of equal scores
    uniq, inverse = np.unique(scores, return_inverse=True)
    sums = np.bincount(inverse, weights=positions, minlength=uniq.size)
    counts = np.bincount(inverse, minlength=uniq.size)
    return (sums / counts)[inverse] / (n - 1)


def _normalised(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        return np.full(values.size, 0.5)
    return (values - lo) / (hi - lo)


def map_scores(
    scores: Sequence[float] | np.ndarray,
    mapping: str = "linear_rank",
    *,
    p_lower: float = 0.0,
    p_upper: float = 0.1,
    target_mean: float | None = None,
    depths: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Dropout probability for each score.

    Args:
        scores: one Fisher score per site (higher = more important).
        mapping: ``linear_rank`` (the paper: evenly spaced by rank, highest -> ``p_lower``,
            lowest -> ``p_upper``, ties share), ``linear_score`` / ``log_score`` (interpolate on
            normalised raw / log scores), ``depth_linear`` (rises linearly with ``depths``, default
            site order), ``uniform`` (every site gets ``p_upper``).
        p_lower, p_upper: the probability range, ``0 <= p_lower <= p_upper < 1``.
        target_mean: if given, scale all probabilities so their mean equals it.
        depths: per-site depth for ``depth_linear`` (e.g. layer index); default ``0..n-1``.

    Example:
        >>> map_scores([5.0, 1.0, 3.0]).round(3).tolist()
        [0.0, 0.1, 0.05]
        >>> map_scores([5.0, 1.0, 3.0], target_mean=0.1).round(3).tolist()
        [0.0, 0.2, 0.1]
    """
    if mapping not in MAPPINGS:
        raise bad_argument("mapping", f"one of {MAPPINGS}", mapping, "use mapping='linear_rank'")
    p_lower, p_upper = check_bounds(p_lower, p_upper)
    arr = _check_scores(scores, mapping)
    span = p_upper - p_lower
    if mapping == "linear_rank":
        frac = rank_fractions(arr)
    elif mapping == "linear_score":
        frac = 1.0 - _normalised(arr)
    elif mapping == "log_score":
        positive = arr[arr > 0]
        floor = positive.min() if positive.size else 1.0
        frac = 1.0 - _normalised(np.log(np.maximum(arr, floor)))
    elif mapping == "depth_linear":
        d = np.arange(arr.size, dtype=np.float64) if depths is None else np.asarray(depths, float)
        if d.shape != arr.shape or not np.all(np.isfinite(d)):
            raise bad_argument(
                "depths", f"{arr.size} finite numbers (one per site)", d, "pass one depth per site"
            )
        frac = _normalised(d) if arr.size > 1 else np.array([0.5])
    else:  # uniform
        frac = np.ones(arr.size)
    probs = p_lower + span * frac
    if target_mean is not None:
        probs = rescale_to_mean(probs, target_mean)
    return probs


def rescale_to_mean(probs: np.ndarray, target_mean: float) -> np.ndarray:
    """Multiply probabilities so that their mean is ``target_mean`` (zeros stay zero).

    Example:
        >>> rescale_to_mean(np.array([0.0, 0.05, 0.1]), 0.1).round(3).tolist()
        [0.0, 0.1, 0.2]
    """
    if isinstance(target_mean, bool) or not isinstance(target_mean, (int, float, np.floating)):
        raise bad_argument("target_mean", "a float in [0, 1)", target_mean, "pass e.g. 0.1")
    if not 0.0 <= float(target_mean) < 1.0:
        raise bad_argument("target_mean", "a float in [0, 1)", target_mean, "pass e.g. 0.1")
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs.mean()
    if mean <= 0:
        out = np.full(probs.size, float(target_mean))
    else:
        out = probs * (float(target_mean) / mean)
    if out.max() >= MAX_P:
        raise ArgumentError(
            f"target_mean: expected a mean reachable with every probability below {MAX_P}, "
            f"received {target_mean} (the largest probability would be {out.max():.3f}); "
            "fix: lower target_mean or narrow p_lower..p_upper"
        )
    return out


def shuffled(probs: np.ndarray, seed: int) -> np.ndarray:
    """The same probabilities assigned to sites in a random order (a control for the ordering).

    Example:
        >>> sorted(shuffled(np.array([0.0, 0.05, 0.1]), seed=1).tolist())
        [0.0, 0.05, 0.1]
    """
    rng = np.random.default_rng(seed)
    return np.asarray(probs, dtype=np.float64)[rng.permutation(len(probs))]


def unit_probabilities(
    unit_scores: Sequence[float] | np.ndarray,
    site_p: float,
    *,
    mapping: str = "linear_rank",
    spread: float = 1.0,
) -> np.ndarray:
    """Per-unit probabilities inside one site whose mean equals the site's probability.

    Units are mapped into ``[site_p * (1 - spread), site_p * (1 + spread)]`` (less important units
    get more dropout), then rescaled so the mean is exactly ``site_p``: unit granularity moves the
    site's budget between its units without changing it.

    Example:
        >>> unit_probabilities([4.0, 1.0, 2.0], 0.1).round(3).tolist()
        [0.0, 0.2, 0.1]
    """
    if not 0.0 <= float(site_p) < 1.0:
        raise bad_argument("site_p", "a float in [0, 1)", site_p, "pass the site's probability")
    if not 0.0 <= float(spread) <= 1.0:
        raise bad_argument("spread", "a float in [0, 1]", spread, "pass e.g. spread=1.0")
    arr = _check_scores(unit_scores, mapping)
    if site_p == 0.0:
        return np.zeros(arr.size)
    lo = site_p * (1.0 - spread)
    hi = min(site_p * (1.0 + spread), MAX_P * 0.999)
    probs = map_scores(arr, mapping, p_lower=lo, p_upper=hi)
    mean = probs.mean()
    probs = probs * (site_p / mean) if mean > 0 else np.full(arr.size, site_p)
    return np.clip(probs, 0.0, MAX_P)
