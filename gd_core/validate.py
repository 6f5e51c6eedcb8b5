"""The one validation of probabilities, rates, counts and choices, with one wording.

Every adapter and the core check a dropout probability, a vector of per-unit rates, a sample
count or a named choice through these functions, so a bad value is refused with the same message
everywhere: ``<name>: expected <what>, received <value>; fix: <how>`` (an :class:`ArgumentError`,
a ``ValueError``; a value of the wrong type raises :class:`ArgumentTypeError`, also a
``TypeError``). A layer that mirrors a framework class passes ``wording`` to keep that class's
own message (the library's fix follows it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, bad_argument

PROBABILITY = "a float in [0, 1)"
RATES = "probabilities in [0, 1)"
RATES_SHAPE = "a non-empty 1-D sequence of probabilities (one per unit)"

Wording = Callable[[str, str, Any], str]
"""``(name, expected, received value) -> message head``; the library appends ``; fix: ...``."""


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _error(
    cls: type[ArgumentError], name: str, expected: str, received: Any, fix: str, wording: Any
) -> ArgumentError:
    if wording is None:
        return bad_argument(name, expected, received, fix, cls)  # type: ignore[return-value]
    return cls(f"{wording(name, expected, received)}; fix: {fix}")


def check_probability(
    value: Any,
    name: str = "p",
    fix: str | None = None,
    *,
    wording: Wording | None = None,
) -> float:
    """A dropout probability: a finite real number in ``[0, 1)``.

    Example:
        >>> check_probability(0.1)
        0.1
        >>> check_probability(1.0, "rate")
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: rate: expected a float in [0, 1), received 1.0; fix: pass a dropout probability, e.g. rate=0.1
    """
    fix = fix or f"pass a dropout probability, e.g. {name}=0.1"
    if not _is_real(value):
        raise _error(ArgumentTypeError, name, PROBABILITY, value, fix, wording)
    p = float(value)
    if not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise _error(ArgumentError, name, PROBABILITY, value, fix, wording)
    return p


def check_rates(
    values: Any,
    name: str = "rates",
    fix: str | None = None,
    *,
    wording: Wording | None = None,
) -> np.ndarray:
    """Per-unit probabilities: a non-empty 1-D float64 array, every entry in ``[0, 1)``.

    Example:
        >>> check_rates([0.0, 0.2]).tolist()
        [0.0, 0.2]
        >>> check_rates([0.1, 1.0])
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: rates: expected probabilities in [0, 1), received rates[1]=1.0; fix: clip the rates to [0, 1)
    """
    if isinstance(values, (str, bytes)) or isinstance(values, bool):
        raise _error(ArgumentTypeError, name, RATES, values, fix or "pass e.g. [0.0, 0.1]", wording)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _error(
            ArgumentTypeError, name, RATES, values, fix or "pass e.g. [0.0, 0.1]", wording
        ) from None
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise _error(
            ArgumentError, name, RATES_SHAPE, values, fix or "pass e.g. [0.0, 0.1]", wording
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0) | (arr >= 1))
    if bad.size:
        raise _error(
            ArgumentError,
            name,
            RATES,
            Shown(f"{name}[{int(bad[0])}]={float(arr[bad[0]])!r}"),
            fix or f"clip the {name} to [0, 1)",
            wording,
        )
    return arr


class Shown(str):
    """A received value already written out (shown as is, without quotes)."""

    def __repr__(self) -> str:
        return str(self)


def check_fraction(value: Any, name: str, fix: str | None = None) -> float:
    """A real number in ``[0, 1]`` (a spread, a multiplier).

    Example:
        >>> check_fraction(1, "spread")
        1.0
    """
    fix = fix or f"pass e.g. {name}=1.0"
    if not _is_real(value):
        raise bad_argument(name, "a float in [0, 1]", value, fix, ArgumentTypeError)
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise bad_argument(name, "a float in [0, 1]", value, fix)
    return v


def check_int(
    value: Any, name: str, low: int, example: Any, *, optional: bool = False
) -> int | None:
    """An int ``>= low`` (or None when ``optional``).

    Example:
        >>> check_int(0, "max_samples", 1, 1000)
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: max_samples: expected an int >= 1, received 0; fix: pass e.g. max_samples=1000
    """
    if value is None and optional:
        return None
    expected = f"an int >= {low}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise bad_argument(name, expected, value, f"pass e.g. {name}={example}", ArgumentTypeError)
    if value < low:
        raise bad_argument(name, expected, value, f"pass e.g. {name}={example}")
    return int(value)


def check_known(
    values: Sequence[str], name: str, known: Sequence[str], what: str, fix: str | None = None
) -> list[str]:
    """``values`` as a list, when every one is among ``known`` (names of parameters, weights...).

    Example:
        >>> check_known(["b"], "params", ["a", "b"], "names of this model's parameters")
        ['b']
        >>> check_known(["c"], "params", ["a", "b"], "names of this model's parameters")
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: params: expected names of this model's parameters, received ['c']; fix: use names such as ['a', 'b']
    """
    values = list(values)
    have = set(known)
    unknown = [v for v in values if v not in have]
    if unknown:
        raise bad_argument(name, what, unknown[:3], fix or f"use names such as {list(known)[:3]}")
    return values


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (the first is suggested as the fix).

    Example:
        >>> check_choice("unit", "granularity", ("site", "unit"))
        'unit'
    """
    if not isinstance(value, str) or value not in choices:
        raise bad_argument(name, f"one of {tuple(choices)}", value, f"use {name}={choices[0]!r}")
    return value


def check_type(value: Any, name: str, types: type | tuple[type, ...], what: str, fix: str) -> Any:
    """``value`` when it is an instance of ``types``; else the error names what was received.

    Example:
        >>> check_type({"a": 1}, "state_dict", dict, "a mapping {name: array}", "pass a dict")
        {'a': 1}
        >>> check_type([1], "state_dict", dict, "a mapping {name: array}", "pass a dict")
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: state_dict: expected a mapping {name: array}, received 'list'; fix: pass a dict
    """
    if not isinstance(value, types):
        raise bad_argument(name, what, type(value).__name__, fix)
    return value
