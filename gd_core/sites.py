"""Dropout sites and the aggregation of per-parameter Fisher into one score per site.

A *site* is one place where dropout is applied, named canonically with dots
(``bert.encoder.layer.0.attention.self.dropout``), together with the parameter tensors whose
output it guards and the number of units (features along the last axis) it drops.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from .errors import ArgumentError, NoSitesError, bad_argument

T = TypeVar("T")

Aggregation = Literal["tensor_mean", "element_mean"]
AGGREGATIONS: tuple[str, ...] = ("tensor_mean", "element_mean")


class BySite(Generic[T]):
    """A sequence of per-site records (``.site`` names the site) that can also be indexed by
    site name: iterating, ``len`` and ``[site]`` over what :meth:`_by_site` returns.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Row:
        ...     site: str
        >>> class Rows(BySite[Row]):
        ...     def _by_site(self):
        ...         return [Row("a"), Row("b")]
        >>> rows = Rows()
        >>> len(rows), rows["b"]
        (2, Row(site='b'))
    """

    def _by_site(self) -> Sequence[T]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[T]:
        return iter(self._by_site())

    def __len__(self) -> int:
        return len(self._by_site())

    def __getitem__(self, site: str) -> T:
        items = self._by_site()
        for item in items:
            if getattr(item, "site", None) == site:
                return item
        names = [getattr(item, "site", None) for item in items]
        kind = type(self).__name__
        raise KeyError(f"site {site!r} is not in this {kind} (sites: {names[:4]}...)")


@dataclass(frozen=True)
class Site:
    """One dropout location.

    Attributes:
        name: canonical dot-separated name (the dropout module's path in PyTorch terms).
        params: canonical names of the parameter tensors it guards, in model order.
        units: features along the last axis of the tensor it drops (``None`` if unknown).
        unit_axes: for guarded tensors with one axis per unit, that axis (e.g. ``0`` for a torch
            ``Linear.weight``); tensors not listed contribute only to the site score.
        kind: how the adapter realises it (``"module"``, ``"attribute"``, ``"hook"``, ``"node"``).

    Example:
        >>> s = Site("enc.0.dropout", ("enc.0.dense.weight", "enc.0.dense.bias"), units=4)
        >>> s.name, len(s.params)
        ('enc.0.dropout', 2)
    """

    name: str
    params: tuple[str, ...] = ()
    units: int | None = None
    unit_axes: Mapping[str, int] = field(default_factory=dict)
    kind: str = "module"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise bad_argument("name", "a non-empty string", self.name, "name the site")
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "unit_axes", dict(self.unit_axes))
        for p in self.unit_axes:
            if p not in self.params:
                raise bad_argument(
                    f"unit_axes[{p!r}]", "one of the site's params", p, "list it in params first"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": list(self.params),
            "units": self.units,
            "unit_axes": dict(self.unit_axes),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Site:
        return cls(
            name=str(d["name"]),
            params=tuple(d.get("params", ())),
            units=None if d.get("units") is None else int(d["units"]),
            unit_axes={str(k): int(v) for k, v in dict(d.get("unit_axes", {})).items()},
            kind=str(d.get("kind", "module")),
        )


class SiteList(list[Site]):
    """What an adapter's ``sites(model)`` returns: the live sites (a plain list of :class:`Site`),
    plus the facts about the rest of the model.

    Attributes:
        dead: ``{holder name: reason}`` for rate holders (a dropout module, a rate attribute) that
            one training-mode forward never uses: they are not sites, are never profiled and
            ``apply`` leaves them as they are (its report's notes name them).
        unguarded: ``{parameter name: reason}`` for parameters no site guards (empty when the
            adapter did not work it out).
        notes: what the adapter could not do or did differently (a structural guess, stochastic
            depth not handled...).

    Example:
        >>> found = SiteList([Site("drop", ("w",))], dead={"unused": "never called"})
        >>> [s.name for s in found], found["drop"].params, found.dead
        (['drop'], ('w',), {'unused': 'never called'})
    """

    def __init__(
        self,
        sites: Iterable[Site] = (),
        *,
        dead: Mapping[str, str] | None = None,
        unguarded: Mapping[str, str] | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        super().__init__(sites)
        self.dead: dict[str, str] = dict(dead or {})
        self.unguarded: dict[str, str] = dict(unguarded or {})
        self.notes: list[str] = list(notes)

    def __getitem__(self, key: Any) -> Any:
        """A site by position, slice, or name (``found["classifier.dropout"]``)."""
        if not isinstance(key, str):
            return super().__getitem__(key)
        for site in self:
            if site.name == key:
                return site
        why = f": it is dead ({self.dead[key]})" if key in self.dead else ""
        raise KeyError(
            f"site {key!r} is not a live site{why} (sites: {[s.name for s in self][:4]}...)"
        )


def check_sites(sites: Sequence[Site]) -> list[Site]:
    """Validate a site list: at least one, unique names."""
    sites = list(sites)
    if not sites:
        raise NoSitesError(
            "sites: expected at least one dropout site, received none; fix: use a model with "
            "dropout layers, or add sites explicitly (e.g. apply(..., add_missing=True))"
        )
    seen: set[str] = set()
    for s in sites:
        if not isinstance(s, Site):
            raise bad_argument("sites", "a list of Site objects", type(s).__name__, "build Site()s")
        if s.name in seen:
            raise bad_argument("sites", "unique site names", s.name, "rename the duplicate site")
        seen.add(s.name)
    return sites


def _check_method(method: str) -> None:
    if method not in AGGREGATIONS:
        raise bad_argument(
            "aggregation", f"one of {AGGREGATIONS}", method, "use aggregation='tensor_mean'"
        )


def scorable(
    sites: Sequence[Site], frozen: Iterable[str] = ()
) -> tuple[list[Site], dict[str, str]]:
    """The sites a profile can score, and why the others cannot.

    Frozen parameters (not trained, so no Fisher is estimated for them) are left out of the
    sites guarding them; a site left guarding no parameter (or that never guarded any: it drops
    a tensor no parameter computes since the previous site) gets no score and is returned with
    its reason, for the profile's metadata and a warning. ``apply`` treats such a site like any
    other the profile lacks (its ``missing`` policy).

    Example:
        >>> keep, why = scorable(
        ...     [Site("a", ("w", "pos")), Site("b", ("pos",)), Site("c")], frozen=["pos"]
        ... )
        >>> [(s.name, s.params) for s in keep], why["b"]
        ([('a', ('w',))], 'guards only frozen parameters (no Fisher): pos')
        >>> why["c"]
        'guards no parameters (nothing is computed from parameters between it and the previous site)'
    """
    off = set(frozen)
    keep: list[Site] = []
    why: dict[str, str] = {}
    for site in sites:
        if not site.params:
            why[site.name] = (
                "guards no parameters (nothing is computed from parameters between it and the "
                "previous site)"
            )
            continue
        params = tuple(p for p in site.params if p not in off)
        if not params:
            why[site.name] = "guards only frozen parameters (no Fisher): " + ", ".join(
                site.params[:3]
            )
            continue
        if len(params) < len(site.params):
            axes = {p: a for p, a in site.unit_axes.items() if p in params}
            site = replace(site, params=params, unit_axes=axes)
        keep.append(site)
    return keep, why


def tensor_stats(fisher: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """Per-tensor (mean, element count): enough to aggregate a site either way."""
    out = {}
    for name, f in fisher.items():
        arr = np.asarray(f, dtype=np.float64)
        out[name] = (float(arr.mean()) if arr.size else 0.0, int(arr.size))
    return out


def site_score_from_stats(
    site: Site, stats: Mapping[str, tuple[float, int]], method: str = "tensor_mean"
) -> float:
    """Score one site from per-tensor means and sizes.

    ``tensor_mean`` (the paper): mean over guarded tensors of each tensor's mean.
    ``element_mean``: mean over all guarded elements (large tensors weigh more).
    A site that guards no parameter (or none with Fisher) scores NaN; mappings treat it as the
    least important site.
    """
    _check_method(method)
    missing = [p for p in site.params if p not in stats]
    if missing:
        raise ArgumentError(
            f"fisher: expected a Fisher diagonal for every parameter site {site.name!r} guards, "
            f"received none for {missing[:3]}; fix: estimate Fisher on the same model the sites "
            "came from (or pass a site mapping whose names match)"
        )
    if not site.params:
        return float("nan")
    means = np.array([stats[p][0] for p in site.params])
    sizes = np.array([stats[p][1] for p in site.params], dtype=np.float64)
    if method == "tensor_mean":
        return float(means.mean())
    return float((means * sizes).sum() / max(sizes.sum(), 1.0))


def aggregate(
    fisher: Mapping[str, Any], sites: Sequence[Site], method: str = "tensor_mean"
) -> np.ndarray:
    """One score per site from per-parameter Fisher diagonals.

    Example:
        >>> import numpy as np
        >>> f = {"a": np.array([1.0, 3.0]), "b": np.array([10.0])}
        >>> aggregate(f, [Site("s", ("a", "b"))]).tolist()
        [6.0]
        >>> aggregate(f, [Site("s", ("a", "b"))], "element_mean").tolist()
        [4.666666666666667]
    """
    sites = check_sites(sites)
    stats = tensor_stats({p: fisher[p] for s in sites for p in s.params if p in fisher})
    return np.array([site_score_from_stats(s, stats, method) for s in sites], dtype=np.float64)


def unit_scores(fisher: Mapping[str, Any], site: Site) -> np.ndarray | None:
    """Per-unit scores inside a site: for each unit, the mean over the site's tensors that have a
    unit axis of the mean Fisher of that unit's slice. ``None`` when no tensor has a unit axis.

    Example:
        >>> import numpy as np
        >>> f = {"w": np.array([[1.0, 1.0], [4.0, 6.0]]), "b": np.array([2.0, 3.0])}
        >>> s = Site("d", ("w", "b"), units=2, unit_axes={"w": 0, "b": 0})
        >>> unit_scores(f, s).tolist()
        [1.5, 4.0]
    """
    rows = []
    for p, axis in site.unit_axes.items():
        arr = np.asarray(fisher[p], dtype=np.float64)
        moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        rows.append(moved.mean(axis=1))
    if not rows:
        return None
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or (site.units is not None and lengths != {site.units}):
        raise bad_argument(
            f"unit_axes of site {site.name!r}",
            f"axes of length units={site.units}",
            sorted(lengths),
            "point unit_axes at the output-feature axis of each guarded tensor",
        )
    return np.mean(np.stack(rows), axis=0)


def site_mapping(
    mapping: Any,
    site_names: Sequence[str],
    param_names: Collection[str] | None = None,
    *,
    sites_hint: str = "the adapter's sites(model)",
) -> dict[str, list[str]]:
    """Validate a user's override of guarded parameters: ``{site: [param names]}`` or a function
    ``site name -> [param names] | None``. Returns the overrides for the sites it names.

    Example:
        >>> site_mapping({"a.dropout": ["a.weight"]}, ["a.dropout", "b.dropout"], ["a.weight"])
        {'a.dropout': ['a.weight']}
        >>> site_mapping(lambda s: ["a.weight"] if s.startswith("a") else None, ["a.dropout"])
        {'a.dropout': ['a.weight']}
    """
    names = list(site_names)
    if callable(mapping) and not isinstance(mapping, Mapping):
        given = {n: v for n in names if (v := mapping(n)) is not None}
    elif isinstance(mapping, Mapping):
        given = dict(mapping)
        unknown = [k for k in given if k not in names]
        if unknown:
            raise bad_argument(
                "mapping",
                "keys that are dropout site names of this model",
                unknown[:3],
                f"use names from {sites_hint}, e.g. {names[:3]}",
            )
    else:
        raise bad_argument(
            "mapping",
            "None, a dict {site name: [parameter names]} or a function site name -> names",
            type(mapping).__name__,
            "pass e.g. {'encoder.0.dropout': ['encoder.0.dense.weight']}",
        )
    out: dict[str, list[str]] = {}
    for site, params in given.items():
        if isinstance(params, str) or not isinstance(params, Iterable):
            raise bad_argument(
                f"mapping[{site!r}]",
                "a list of parameter names",
                params,
                "wrap a single name in a list",
            )
        params = [str(p) for p in params]
        if param_names is not None:
            bad = [p for p in params if p not in param_names]
            if bad:
                raise bad_argument(
                    f"mapping[{site!r}]",
                    "parameter names of this model",
                    bad[:3],
                    f"use names such as {list(param_names)[:3]}",
                )
        out[site] = params
    return out
