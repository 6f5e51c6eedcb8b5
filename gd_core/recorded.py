"""A plan recorded in a saved model (``config.json``'s ``guided_dropout``), checked before use.

``apply`` records what it installed as plain JSON (``{"version": 1, "granularity": "site" or
"unit", "sites": {site: p or [per-unit rates]}}``) so ``save_pretrained`` keeps it and
``apply(model)`` after loading restores it. A file can be edited by hand or written by another
version: :func:`check_recorded` refuses anything else with one error naming the file and field,
what was expected, what was received and the fix, and :func:`compare_sites` says which recorded
sites the model lacks (and which of its sites the plan lacks) so the adapter can note them.

Example:
    >>> check_recorded({"version": 1, "granularity": "site", "sites": {"d": 0.05}}, "cfg")
    {'version': 1, 'granularity': 'site', 'sites': {'d': 0.05}}
    >>> check_recorded({"version": 99, "sites": {"d": 0.05}}, "config.json")
    Traceback (most recent call last):
    ...
    gd_core.errors.ProfileError: config.json: field 'guided_dropout.version': expected 1 (the recorded-plan version this library reads), received 99; fix: upgrade guided-dropout to read it, or delete the field 'guided_dropout' and call apply(model, profile) again
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ProfileError, _show

RECORDED_KEY = "guided_dropout"
RECORDED_VERSION = 1
GRANULARITIES = ("site", "unit")
_REDO = f"delete the field '{RECORDED_KEY}' and call apply(model, profile) again"


def _error(where: str, field: str, expected: str, received: Any, fix: str = _REDO) -> ProfileError:
    return ProfileError(
        f"{where}: field '{field}': expected {expected}, received {_show(received)}; fix: {fix}"
    )


def _probability(value: Any, where: str, field: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise _error(where, field, "a probability in [0, 1)", value)
    return float(value)


def check_recorded(rec: Any, where: str) -> dict[str, Any]:
    """The recorded plan ``rec`` checked and normalised (floats, lists of floats), else
    :class:`~gd_core.errors.ProfileError`. ``where`` names it in messages (the file or the
    config field: e.g. ``/path/config.json`` or ``BertModel.config``).

    Example:
        >>> check_recorded("0.1", "cfg")
        Traceback (most recent call last):
        ...
        gd_core.errors.ProfileError: cfg: field 'guided_dropout': expected an object {"version": 1, "granularity": "site" or "unit", "sites": {site: p or [per-unit rates]}}, received '0.1'; fix: delete the field 'guided_dropout' and call apply(model, profile) again
        >>> check_recorded({"version": 1, "sites": {"d": None}}, "cfg")
        Traceback (most recent call last):
        ...
        gd_core.errors.ProfileError: cfg: field 'guided_dropout.sites['d']': expected a probability in [0, 1) or a non-empty list of them (per-unit rates), received None; fix: delete the field 'guided_dropout' and call apply(model, profile) again
    """
    if not isinstance(rec, Mapping):
        raise _error(
            where,
            RECORDED_KEY,
            'an object {"version": 1, "granularity": "site" or "unit", "sites": {site: p or '
            "[per-unit rates]}}",
            rec,
        )
    version = rec.get("version")
    if version != RECORDED_VERSION or isinstance(version, bool):
        raise _error(
            where,
            f"{RECORDED_KEY}.version",
            f"{RECORDED_VERSION} (the recorded-plan version this library reads)",
            version,
            f"upgrade guided-dropout to read it, or {_REDO}",
        )
    unknown = sorted(set(rec) - {"version", "granularity", "sites"})
    if unknown:
        raise _error(where, RECORDED_KEY, "only the keys version, granularity, sites", unknown)
    granularity = rec.get("granularity", "site")
    if granularity not in GRANULARITIES:
        raise _error(where, f"{RECORDED_KEY}.granularity", "'site' or 'unit'", granularity)
    sites = rec.get("sites")
    if not isinstance(sites, Mapping) or not sites:
        raise _error(where, f"{RECORDED_KEY}.sites", "a non-empty object {site: p}", sites)
    out: dict[str, float | list[float]] = {}
    for name, value in sites.items():
        field = f"{RECORDED_KEY}.sites[{name!r}]"
        if isinstance(value, list) and value:
            out[str(name)] = [_probability(v, where, f"{field}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = _probability(value, where, field)
        else:
            raise _error(
                where,
                field,
                "a probability in [0, 1) or a non-empty list of them (per-unit rates)",
                value,
            )
    return {"version": RECORDED_VERSION, "granularity": granularity, "sites": out}


def check_unit_count(where: str, site: str, rates: Sequence[float], units: int | None) -> None:
    """Refuse per-unit rates whose count is not the site's unit count (when that is known).

    Example:
        >>> check_unit_count("cfg", "d", [0.1, 0.2], 3)
        Traceback (most recent call last):
        ...
        gd_core.errors.ProfileError: cfg: field 'guided_dropout.sites['d']': expected 3 per-unit rates (the features site 'd' drops), received 2 rates; fix: delete the field 'guided_dropout' and call apply(model, profile) again
    """
    if units is not None and units > 1 and len(rates) != units:
        raise ProfileError(
            f"{where}: field '{RECORDED_KEY}.sites[{site!r}]': expected {units} per-unit rates "
            f"(the features site {site!r} drops), received {len(rates)} rates; fix: {_REDO}"
        )


def compare_sites(recorded: Mapping[str, Any], model_sites: Sequence[str]) -> list[str]:
    """Notes on sites the plan and the model do not share (empty when they match).

    Example:
        >>> compare_sites({"a": 0.1, "gone": 0.2}, ["a", "new"])
        ["the recorded plan names sites this model does not have, skipped: ['gone']", "sites the recorded plan does not name keep their current p: ['new']"]
    """
    names = set(model_sites)
    extra = [s for s in recorded if s not in names]
    absent = [s for s in model_sites if s not in recorded]
    notes = []
    if extra:
        notes.append(f"the recorded plan names sites this model does not have, skipped: {extra}")
    if absent:
        notes.append(f"sites the recorded plan does not name keep their current p: {absent}")
    return notes
