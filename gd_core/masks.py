"""Reference inverted-dropout masks and the statistical bounds adapters are tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import bad_argument
from .mappings import MAX_P


def _check_p(p: Any, shape: Sequence[int]) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim > 1:
        raise bad_argument(
            "p",
            "a float or a 1-D array of per-unit probabilities",
            arr.shape,
            "pass one probability per unit of the last axis",
        )
    if arr.ndim == 1 and (len(shape) == 0 or arr.shape[0] != shape[-1]):
        raise bad_argument(
            "p",
            f"{shape[-1] if shape else 0} per-unit probabilities (the last axis)",
            f"{arr.shape[0]} values",
            "pass one probability per feature of the last axis",
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 1):
        raise bad_argument("p", "probabilities in [0, 1)", p, "clip them to [0, 1)")
    return arr


def reference_mask(
    shape: Sequence[int], p: float | np.ndarray, rng: np.random.Generator | int
) -> np.ndarray:
    """An inverted dropout mask: keep with probability ``1-p`` and scale kept values by ``1/(1-p)``.

    ``p`` is a scalar or per-unit probabilities broadcast over the last axis.

    Example:
        >>> m = reference_mask((2, 3), [0.0, 0.5, 0.0], rng=0)
        >>> sorted(set(m[:, 1].tolist()) | {0.0, 2.0}) == [0.0, 2.0], m[:, 0].tolist()
        (True, [1.0, 1.0])
    """
    shape = tuple(int(s) for s in shape)
    probs = _check_p(p, shape)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    keep = gen.random(shape) >= probs
    return np.where(keep, 1.0 / (1.0 - probs), 0.0)


def reference_dropout(
    x: np.ndarray, p: float | np.ndarray, rng: np.random.Generator | int, training: bool = True
) -> np.ndarray:
    """Apply a reference mask (identity when not training)."""
    x = np.asarray(x)
    if not training:
        return x
    return x * reference_mask(x.shape, p, rng)


def binomial_halfwidth(n: int, p: float, confidence: float = 0.999) -> float:
    """Half-width of a normal-approximation interval for a binomial fraction over ``n`` trials.

    An observed drop fraction over ``n`` independent elements with drop probability ``p`` lies
    within ``p +- binomial_halfwidth(n, p)`` with the given confidence (two-sided).

    Example:
        >>> round(binomial_halfwidth(10_000, 0.1), 4)
        0.01
    """
    if n <= 0:
        raise bad_argument("n", "a positive int", n, "count the elements observed")
    z = _z(confidence)
    return z * math.sqrt(max(p * (1.0 - p), 1e-12) / n) + 1.0 / n


def mean_halfwidth(n: int, p: float, confidence: float = 0.999) -> float:
    """Half-width for the mean of ``n`` inverted-dropout multipliers (expected value 1)."""
    if p <= 0:
        return 1.0 / n
    z = _z(confidence)
    return z * math.sqrt(p / ((1.0 - min(p, MAX_P)) * n)) + 1.0 / n


def _z(confidence: float) -> float:
    if not 0.5 < confidence < 1.0:
        raise bad_argument("confidence", "a float in (0.5, 1)", confidence, "use 0.999")
    # inverse normal CDF by bisection on erf (no SciPy dependency)
    target = 1.0 - (1.0 - confidence) / 2.0
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
