"""The sensitivity profile: the artifact users compute once per pretrained model and reuse.

On disk a profile is one ``.npz`` file (read with ``allow_pickle=False``) holding a JSON header
(format, version, sites, mapping, fingerprint, metadata) and float64 arrays (site scores, per-tensor
Fisher means, optional per-unit scores). See ``docs/profile-format.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from ._io import atomic_write_npz, read_npz
from ._version import __version__
from .errors import GuidedDropoutError, ProfileError, bad_argument
from .fingerprint import Fingerprint
from .mappings import map_scores, unit_probabilities
from .names import translator
from .sites import AGGREGATIONS, Site, check_sites, site_score_from_stats, tensor_stats, unit_scores

PROFILE_FORMAT = "guided-dropout-profile"
PROFILE_VERSION = 1
DEFAULT_MAPPING: dict[str, Any] = {
    "name": "linear_rank",
    "p_lower": 0.0,
    "p_upper": 0.1,
    "target_mean": None,
}


class MappingOverrides(TypedDict, total=False):
    """Keywords that override single values of a score-to-probability mapping: the
    probabilities of the most and least important site (``p_lower``, ``p_upper``) and the mean
    probability some mappings aim for (``target_mean``); None keeps the mapping's value."""

    p_lower: float | None
    p_upper: float | None
    target_mean: float | None


def _mapping_dict(mapping: str | Mapping[str, Any] | None, **overrides: Any) -> dict[str, Any]:
    if mapping is None:
        out = dict(DEFAULT_MAPPING)
    elif isinstance(mapping, str):
        out = {**DEFAULT_MAPPING, "name": mapping}
    elif isinstance(mapping, Mapping):
        out = {**DEFAULT_MAPPING, **mapping}
    else:
        raise bad_argument(
            "mapping",
            "a mapping name or a dict like {'name': 'linear_rank', 'p_upper': 0.1}",
            mapping,
            "pass mapping='linear_rank'",
        )
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


@dataclass(frozen=True)
class SensitivityProfile:
    """Per-site Fisher scores of a pretrained model and the dropout probabilities they imply.

    Example:
        >>> import numpy as np
        >>> sites = [Site("a.dropout", ("a.weight",)), Site("b.dropout", ("b.weight",))]
        >>> fisher = {"a.weight": np.array([4.0, 2.0]), "b.weight": np.array([1.0, 1.0])}
        >>> prof = SensitivityProfile.from_fisher(fisher, sites)
        >>> prof.probabilities()
        {'a.dropout': 0.0, 'b.dropout': 0.1}
    """

    sites: tuple[Site, ...]
    scores: np.ndarray
    tensor_means: Mapping[str, float] = field(default_factory=dict)
    tensor_sizes: Mapping[str, int] = field(default_factory=dict)
    unit_scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    aggregation: str = "tensor_mean"
    mapping: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_MAPPING))
    fingerprint: Fingerprint | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_fisher(
        cls,
        fisher: Mapping[str, Any],
        sites: Sequence[Site],
        *,
        aggregation: str = "tensor_mean",
        mapping: str | Mapping[str, Any] | None = None,
        fingerprint: Fingerprint | None = None,
        metadata: Mapping[str, Any] | None = None,
        with_units: bool = True,
    ) -> SensitivityProfile:
        """Aggregate a per-parameter Fisher diagonal into a profile.

        The per-tensor Fisher means of every tensor in ``fisher`` are kept (``tensor_means``),
        also of tensors no site guards (the base weights LoRA adapts, see ``adapters.torch``).
        """
        sites_t = tuple(check_sites(sites))
        guarded = {p for s in sites_t for p in s.params}
        # every tensor estimated, not only the guarded ones: LoRA rates read the others
        stats = tensor_stats({p: fisher[p] for p in (*guarded, *fisher) if p in fisher})
        units: dict[str, np.ndarray] = {}
        if with_units:
            for s in sites_t:
                u = unit_scores(fisher, s) if s.unit_axes else None
                if u is not None:
                    units[s.name] = u
        return cls.from_stats(
            stats,
            sites_t,
            units,
            aggregation=aggregation,
            mapping=mapping,
            fingerprint=fingerprint,
            metadata=metadata,
        )

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, tuple[float, int]],
        sites: Sequence[Site],
        unit_scores: Mapping[str, np.ndarray] | None = None,
        *,
        aggregation: str = "tensor_mean",
        mapping: str | Mapping[str, Any] | None = None,
        fingerprint: Fingerprint | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SensitivityProfile:
        """A profile from per-tensor Fisher statistics ``{tensor: (mean, element count)}`` (what
        an engine that never forms the element-wise diagonal computes) and per-site unit scores.
        Site scores are aggregated here, by ``aggregation``; the mapping is validated now.

        Example:
            >>> sites = [Site("a.dropout", ("a.weight",)), Site("b.dropout", ("b.weight",))]
            >>> prof = SensitivityProfile.from_stats({"a.weight": (3.0, 2), "b.weight": (1.0, 2)}, sites)
            >>> prof.probabilities()
            {'a.dropout': 0.0, 'b.dropout': 0.1}
        """
        sites_t = tuple(check_sites(sites))
        prof = cls(
            sites=sites_t,
            scores=np.array([site_score_from_stats(s, stats, aggregation) for s in sites_t]),
            tensor_means={p: float(m) for p, (m, _) in stats.items()},
            tensor_sizes={p: int(n) for p, (_, n) in stats.items()},
            unit_scores=dict(unit_scores or {}),
            aggregation=aggregation,
            mapping=_mapping_dict(mapping),
            fingerprint=fingerprint,
            metadata=dict(metadata or {}),
        )
        prof.probabilities()  # validate the mapping now, not at apply time
        return prof

    # -- views --------------------------------------------------------------------------------
    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"site {name!r} is not in this profile (sites: {self.site_names[:4]}...)")

    def probability_array(
        self, mapping: str | Mapping[str, Any] | None = None, **overrides: Unpack[MappingOverrides]
    ) -> np.ndarray:
        """Probabilities in site order, under the stored mapping or an override (a mapping name
        or dict, and/or :class:`MappingOverrides` keywords: ``p_lower``, ``p_upper``,
        ``target_mean``)."""
        m = _mapping_dict(self.mapping if mapping is None else mapping, **overrides)
        bounds = {k: m[k] for k in MappingOverrides.__annotations__}
        scores = np.asarray(self.scores, dtype=np.float64)
        if m["name"] != "depth_linear" and scores.ndim == 1 and not np.all(np.isfinite(scores)):
            bad = [self.sites[i] for i in np.flatnonzero(~np.isfinite(scores))]
            empty = [s.name for s in bad if not s.params]
            why = f"; {empty[:4]} guard no parameters" if empty else ""
            raise bad_argument(
                "scores",
                "a finite score for every site",
                f"NaN/Inf for sites {[s.name for s in bad][:5]}{why}",
                "give those sites guarded parameters (a site mapping), leave out sites the "
                "forward never calls, or estimate Fisher again",
            )
        return map_scores(self.scores, m["name"], **bounds)

    def probabilities(
        self, mapping: str | Mapping[str, Any] | None = None, **overrides: Unpack[MappingOverrides]
    ) -> dict[str, float]:
        """``{site name: dropout probability}`` under the stored mapping or an override (as
        :meth:`probability_array` takes)."""
        probs = self.probability_array(mapping, **overrides)
        return {s.name: float(p) for s, p in zip(self.sites, probs, strict=True)}

    def unit_probabilities(
        self, site_p: Mapping[str, float] | None = None, *, spread: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Per-unit probabilities for sites that have unit scores (mean = the site's p)."""
        probs = self.probabilities() if site_p is None else dict(site_p)
        return {
            name: unit_probabilities(u, probs[name], spread=spread)
            for name, u in self.unit_scores.items()
            if name in probs
        }

    def with_mapping(
        self, mapping: str | Mapping[str, Any] | None = None, **overrides: Unpack[MappingOverrides]
    ) -> SensitivityProfile:
        """A copy whose stored mapping is replaced (validated)."""
        m = _mapping_dict(self.mapping if mapping is None else mapping, **overrides)
        out = replace(self, mapping=m)
        out.probabilities()
        return out

    def reaggregate(self, aggregation: str) -> SensitivityProfile:
        """Recompute site scores with another aggregation from the stored per-tensor means."""
        stats = {p: (self.tensor_means[p], self.tensor_sizes[p]) for p in self.tensor_means}
        scores = np.array([site_score_from_stats(s, stats, aggregation) for s in self.sites])
        return replace(self, scores=scores, aggregation=aggregation)

    def translate(self, names: Mapping[str, str] | Callable[[str], str]) -> SensitivityProfile:
        """Rename sites and parameters (e.g. from one framework's convention to another's)."""
        fn = translator(names)
        sites = tuple(
            Site(
                fn(s.name),
                tuple(fn(p) for p in s.params),
                s.units,
                {fn(p): a for p, a in s.unit_axes.items()},
                s.kind,
            )
            for s in self.sites
        )
        return replace(
            self,
            sites=sites,
            tensor_means={fn(k): v for k, v in self.tensor_means.items()},
            tensor_sizes={fn(k): v for k, v in self.tensor_sizes.items()},
            unit_scores={fn(k): v for k, v in self.unit_scores.items()},
            fingerprint=None
            if self.fingerprint is None
            else Fingerprint.from_shapes([(fn(n), s) for n, s in self.fingerprint.params]),
        )

    def table(self, mapping: str | Mapping[str, Any] | None = None) -> str:
        """A readable table: site, Fisher score, rank (1 = most important), probability."""
        probs = self.probability_array(mapping)
        order = np.argsort(-self.scores, kind="stable")
        rank = np.empty(len(self.sites), dtype=int)
        rank[order] = np.arange(1, len(self.sites) + 1)
        width = max(len("site"), *(len(s.name) for s in self.sites))
        lines = [f"{'site':<{width}}  {'fisher':>11}  {'rank':>4}  {'p':>6}"]
        lines.append("-" * len(lines[0]))
        for s, score, r, p in zip(self.sites, self.scores, rank, probs, strict=True):
            lines.append(f"{s.name:<{width}}  {score:11.4e}  {r:4d}  {p:6.4f}")
        m = _mapping_dict(self.mapping if mapping is None else mapping)
        lines.append(
            f"{len(self.sites)} sites; mapping {m['name']} [{m['p_lower']}, {m['p_upper']}]"
            + (f" rescaled to mean {m['target_mean']}" if m["target_mean"] is not None else "")
            + f"; mean p {probs.mean():.4f}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"SensitivityProfile(sites={len(self.sites)}, aggregation={self.aggregation!r}, "
            f"mapping={self.mapping.get('name')!r}, samples={self.metadata.get('samples')})"
        )

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile atomically (temp file in the same folder, then rename)."""
        tensor_names = list(self.tensor_means)
        unit_names = list(self.unit_scores)
        header = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "library_version": __version__,
            "sites": [s.to_dict() for s in self.sites],
            "aggregation": self.aggregation,
            "mapping": dict(self.mapping),
            "fingerprint": None if self.fingerprint is None else self.fingerprint.to_list(),
            "fingerprint_digest": None if self.fingerprint is None else self.fingerprint.digest,
            "tensor_names": tensor_names,
            "unit_sites": unit_names,
            "metadata": dict(self.metadata),
        }
        arrays: dict[str, Any] = {
            "scores": np.asarray(self.scores, dtype=np.float64),
            "tensor_means": np.array([self.tensor_means[n] for n in tensor_names], np.float64),
            "tensor_sizes": np.array([self.tensor_sizes[n] for n in tensor_names], np.int64),
        }
        for i, name in enumerate(unit_names):
            arrays[f"units_{i}"] = np.asarray(self.unit_scores[name], dtype=np.float64)
        return atomic_write_npz(path, json.dumps(header, default=_json_default), arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityProfile:
        """Read a profile; a truncated, corrupt, foreign or newer-version file raises ProfileError."""
        header, arrays = read_npz(path, "profile", kind=(PROFILE_FORMAT, PROFILE_VERSION))
        try:
            prof = _from_stored(header, arrays)
        except (GuidedDropoutError, KeyError, TypeError, ValueError, AttributeError) as exc:
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise ProfileError(
                f"profile file {str(path)!r} is incomplete or inconsistent ({type(exc).__name__}: "
                f"{text}); fix: recompute it"
            ) from exc
        digest = header.get("fingerprint_digest")
        if prof.fingerprint is not None and digest != prof.fingerprint.digest:
            raise ProfileError(
                f"profile file {str(path)!r} has a corrupt fingerprint (its digest does not "
                "match); fix: recompute it"
            )
        return prof


def _float_vector(arrays: Mapping[str, np.ndarray], key: str, size: int | None) -> np.ndarray:
    """A stored float64 vector of non-negative, finite values (of ``size`` entries if given)."""
    arr = arrays[key]
    if arr.dtype != np.float64 or arr.ndim != 1 or (size is not None and arr.shape != (size,)):
        want = "(n,)" if size is None else f"({size},)"
        raise ValueError(
            f"{key!r}: expected float64 of shape {want}, found {arr.dtype} {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{key!r}: expected finite Fisher values >= 0, found negative, NaN or Inf")
    return arr


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: expected a list of strings")
    if len(set(value)) != len(value):
        raise ValueError(f"{what}: expected unique names")
    return value


def _site_from_stored(d: Any) -> Site:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ValueError(f"site entry {d!r:.80}: expected an object with a name")
    params = _str_list(d.get("params", []), f"site {d['name']!r} params")
    units = d.get("units")
    if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
        raise ValueError(f"site {d['name']!r}: units {units!r} is not a positive int")
    axes = d.get("unit_axes", {})
    if not isinstance(axes, dict) or not all(
        isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in axes.values()
    ):
        raise ValueError(f"site {d['name']!r}: unit_axes {axes!r:.80} is not {{param: axis}}")
    if not isinstance(d.get("kind", "module"), str):
        raise ValueError(f"site {d['name']!r}: kind is not a string")
    return Site.from_dict({**d, "params": params})


def _from_stored(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SensitivityProfile:
    """Build and check a profile from a file's header and arrays (any inconsistency raises)."""
    if not isinstance(header.get("sites"), list):
        raise ValueError("'sites': expected a list")
    sites = tuple(check_sites([_site_from_stored(d) for d in header["sites"]]))
    by_name = {s.name: s for s in sites}
    scores = _float_vector(arrays, "scores", len(sites))
    names = _str_list(header["tensor_names"], "tensor_names")
    means = _float_vector(arrays, "tensor_means", len(names))
    sizes = arrays["tensor_sizes"]
    if sizes.dtype != np.int64 or sizes.shape != (len(names),) or np.any(sizes < 0):
        raise ValueError(f"'tensor_sizes': expected {len(names)} counts >= 0 (int64)")
    unit_sites = _str_list(header["unit_sites"], "unit_sites")
    units = {}
    for i, name in enumerate(unit_sites):
        if name not in by_name:
            raise ValueError(f"unit scores of {name!r}, which is not one of the profile's sites")
        # a site's unit count, when known, is the length its unit scores must have
        units[name] = _float_vector(arrays, f"units_{i}", by_name[name].units)
    expected = {
        "scores",
        "tensor_means",
        "tensor_sizes",
        *(f"units_{i}" for i in range(len(units))),
    }
    if set(arrays) != expected:
        raise ValueError(f"unexpected arrays {sorted(set(arrays) - expected)[:3]}")
    aggregation = header["aggregation"]
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS}")
    if not isinstance(header["mapping"], dict):
        raise ValueError("'mapping': expected an object")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata': expected an object")
    fp = header.get("fingerprint")
    prof = SensitivityProfile(
        sites=sites,
        scores=scores,
        tensor_means={n: float(m) for n, m in zip(names, means, strict=True)},
        tensor_sizes={n: int(z) for n, z in zip(names, sizes, strict=True)},
        unit_scores=units,
        aggregation=str(aggregation),
        mapping=_mapping_dict(header["mapping"]),
        fingerprint=None if fp is None else Fingerprint.from_list(fp),
        metadata=dict(metadata),
    )
    prof.unit_probabilities()  # the stored mapping and unit scores give valid probabilities
    return prof


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serialisable")
