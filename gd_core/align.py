"""Match a profile to a model: name prefixes, parameter compatibility, and sites the profile lacks.

A profile is usually computed on a bare pretrained encoder (``encoder.layer.0...``) and applied to
a task model that wraps it (``bert.encoder.layer.0...``) and adds a new head. :func:`align`
finds the renaming, checks that every profiled parameter exists in the model with the same shape,
and :func:`resolve` decides each model site's probability, including sites the profile does not
know (policy ``keep``, ``upper`` or ``error``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ProfileMismatchError, bad_argument
from .fingerprint import Fingerprint
from .profile import SensitivityProfile, _mapping_dict

MissingPolicy = Literal["keep", "upper", "error"]
MISSING_POLICIES: tuple[str, ...] = ("keep", "upper", "error")


@dataclass(frozen=True)
class Renaming:
    """Profile name -> model name: strip ``strip`` from the front, then prepend ``add``."""

    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip) :]
        return self.add + name


def _candidates(profile_sites: Sequence[str], model_sites: Sequence[str]) -> list[Renaming]:
    cands = {Renaming()}
    for s in profile_sites:
        for m in model_sites:
            if m != s and m.endswith("." + s):
                cands.add(Renaming(add=m[: -len(s)]))
            elif m != s and s.endswith("." + m):
                cands.add(Renaming(strip=s[: -len(m)]))
    return sorted(cands, key=lambda r: (len(r.strip) + len(r.add), r.strip, r.add))


def find_renaming(profile_sites: Sequence[str], model_sites: Sequence[str]) -> Renaming:
    """The prefix renaming that matches the most profile sites to model sites.

    Example:
        >>> r = find_renaming(["encoder.0.dropout", "emb.dropout"],
        ...                   ["bert.encoder.0.dropout", "bert.emb.dropout", "dropout"])
        >>> r, r("emb.dropout")
        (Renaming(strip='', add='bert.'), 'bert.emb.dropout')
    """
    model = set(model_sites)
    best, best_hits = Renaming(), -1
    for cand in _candidates(profile_sites, model_sites):
        hits = sum(cand(s) in model for s in profile_sites)
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def align(
    profile: SensitivityProfile,
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint | None,
    *,
    strict: bool = True,
) -> SensitivityProfile:
    """Rename ``profile`` into the model's names and check it belongs to this model.

    With ``strict`` every parameter of the profiled model must exist in this model with the same
    shape (a new task head is fine); otherwise a :class:`ProfileMismatchError` says what differs.
    """
    renaming = find_renaming(profile.site_names, model_sites)
    out = profile.translate(renaming) if renaming != Renaming() else profile
    matched = [s for s in out.site_names if s in set(model_sites)]
    if strict and not matched:
        raise ProfileMismatchError(
            "profile: expected a profile whose sites match this model's dropout sites, received "
            f"sites like {profile.site_names[:2]} while the model has {list(model_sites)[:2]}; "
            "fix: compute a profile for this model (gd profile --model ...)"
        )
    if strict and out.fingerprint is not None and model_fingerprint is not None:
        mine = dict(model_fingerprint.params)
        problems = []
        for name, shape in out.fingerprint.params:
            if name not in mine:
                problems.append(f"missing {name}")
            elif mine[name] != shape:
                problems.append(f"{name}: shape {shape} in profile vs {mine[name]} in model")
        if problems:
            more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
            raise ProfileMismatchError(
                "profile: expected a profile computed on this model's parameters, received one "
                f"from a different model ({'; '.join(problems[:4])}{more}); fix: compute a "
                "profile for this model, or pass strict=False if the difference is intended"
            )
    return out


def resolve(
    profile: SensitivityProfile,
    model_sites: Sequence[str],
    current: Mapping[str, float],
    *,
    mapping: str | Mapping[str, Any] | None = None,
    missing: str = "keep",
) -> dict[str, tuple[float, str]]:
    """Probability and reason for every model site.

    Returns ``{site: (p, source)}`` where source is ``"profile"``, ``"keep"`` (a site the profile
    lacks keeps its current p) or ``"upper"`` (such a site gets the mapping's ``p_upper``).
    """
    if missing not in MISSING_POLICIES:
        raise bad_argument("missing", f"one of {MISSING_POLICIES}", missing, "use missing='keep'")
    probs = profile.probabilities(mapping)
    m = _mapping_dict(profile.mapping if mapping is None else mapping)
    unknown = [s for s in model_sites if s not in probs]
    if unknown and missing == "error":
        raise ProfileMismatchError(
            f"profile: expected a probability for every dropout site, received none for "
            f"{unknown[:3]}; fix: pass missing='keep' (leave them) or missing='upper' (p_upper)"
        )
    out: dict[str, tuple[float, str]] = {}
    for s in model_sites:
        if s in probs:
            out[s] = (probs[s], "profile")
        elif missing == "upper":
            out[s] = (float(m["p_upper"]), "upper")
        else:
            out[s] = (float(current.get(s, 0.0)), "keep")
    return out


def find_cached(
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint,
    loader: Callable[[Fingerprint], SensitivityProfile | None] | None = None,
) -> SensitivityProfile | None:
    """A cached profile compatible with the model (exact fingerprint first, then any that aligns)."""
    from . import cache

    exact = (loader or cache.lookup)(model_fingerprint)
    if exact is not None:
        return exact
    folder = cache.cache_dir()
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.profile.npz")):
        try:
            prof = SensitivityProfile.load(path)
            return align(prof, model_sites, model_fingerprint, strict=True)
        except Exception:  # noqa: BLE001 - an incompatible or unreadable cache entry is skipped
            continue
    return None


def resolve_given(
    given: Mapping[str, Any],
    model_sites: Sequence[str],
    current: Mapping[str, float],
    *,
    mapping: str | Mapping[str, Any] | None = None,
    missing: str = "keep",
    allow_absent: bool = False,
    strict: bool = True,
    sites_hint: str = "the adapter's sites(model)",
) -> tuple[dict[str, tuple[float, str]], list[str]]:
    """Like :func:`resolve` for probabilities a user gives directly as ``{site: p}``.

    Keys are aligned to the model's names by prefix. A key that names no site of the model is an
    error, unless ``allow_absent`` (a graph whose exporter folded some dropout away): then the
    unmatched keys are returned as ``absent``, and with ``strict`` matching none is an error.
    Returns ``({site: (p, source)}, absent)`` with source ``given``, ``keep`` or ``upper``.

    Example:
        >>> resolve_given({"enc.dropout": 0.05}, ["bert.enc.dropout", "head.dropout"],
        ...               {"head.dropout": 0.1})[0]
        {'bert.enc.dropout': (0.05, 'given'), 'head.dropout': (0.1, 'keep')}
    """
    if missing not in MISSING_POLICIES:
        raise bad_argument("missing", f"one of {MISSING_POLICIES}", missing, "use missing='keep'")
    names = list(model_sites)
    renaming = find_renaming([str(k) for k in given], names)
    probs = {renaming(str(k)): v for k, v in given.items()}
    absent = [k for k in probs if k not in set(names)]
    if absent and (not allow_absent or (strict and len(absent) == len(probs))):
        raise bad_argument(
            "profile",
            "a dict whose keys are dropout sites of this model",
            absent[:3],
            f"use names from {sites_hint}, e.g. {names[:3]}",
        )
    for site, p in probs.items():
        if isinstance(p, bool) or not hasattr(p, "__float__"):
            raise bad_argument(f"profile[{site!r}]", "a float in [0, 1)", p, "pass a probability")
        if not 0.0 <= float(p) < 1.0:
            raise bad_argument(
                f"profile[{site!r}]", "a float in [0, 1)", p, "pass a dropout probability"
            )
    unknown = [n for n in names if n not in probs]
    if unknown and missing == "error":
        raise ProfileMismatchError(
            f"profile: expected a probability for every dropout site, received none for "
            f"{unknown[:3]}; fix: pass missing='keep' (leave them) or missing='upper' (p_upper)"
        )
    upper = float(_mapping_dict(mapping)["p_upper"])
    out: dict[str, tuple[float, str]] = {}
    for n in names:
        if n in probs:
            out[n] = (float(probs[n]), "given")
        elif missing == "upper":
            out[n] = (upper, "upper")
        else:
            out[n] = (float(current.get(n, 0.0)), "keep")
    return out, absent
