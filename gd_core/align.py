"""Match a profile to a model: name prefixes, parameter compatibility, and sites the profile lacks.

A profile is usually computed on a bare pretrained encoder (``encoder.layer.0...``) and applied to
a task model that wraps it (``bert.encoder.layer.0...``) and adds a new head. :func:`align`
finds the renaming and applies the one same-model rule (:func:`check_same_model`), and :func:`resolve` decides each model site's probability, including sites the profile does not
know (policy ``keep``, ``upper`` or ``error``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

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
    distinct = len(set(profile_sites))
    for cand in _candidates(profile_sites, model_sites):
        if len({cand(s) for s in profile_sites}) < distinct:
            continue  # it would give two profile sites one name (`attn.dropout` and `dropout`)
        hits = sum(cand(s) in model for s in profile_sites)
        if hits > best_hits:
            best, best_hits = cand, hits
    # a renaming is a change of prefix of the *whole* profile (an encoder inside a task model),
    # so it must place at least half of the profile's sites; one site that happens to share a
    # last component (GPT-2's `transformer.h.0.mlp.dropout` and BERT's head `dropout`) is not
    # a correspondence between two architectures
    if best != Renaming() and 2 * best_hits < len(set(profile_sites)):
        return Renaming()
    return best


def layer_pattern(name: str) -> str:
    """A site or parameter name with its layer indices replaced by ``#``.

    Example:
        >>> layer_pattern("transformer.h.11.mlp.dropout")
        'transformer.h.#.mlp.dropout'
    """
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "#", name)


def layer_differences(
    profile_sites: Sequence[str], model_sites: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Sites of repeated layers that only one side has: (model sites the profile lacks, profile
    sites the model lacks), among names whose layer pattern both sides share (so a new task
    head is not a difference, a third transformer block is).

    Example:
        >>> layer_differences(["h.0.drop", "h.1.drop"], ["h.0.drop", "h.1.drop", "h.2.drop", "head"])
        (['h.2.drop'], [])
    """
    prof, model = list(profile_sites), list(model_sites)
    prof_set, model_set = set(prof), set(model)
    prof_pats = {layer_pattern(s) for s in prof}
    model_pats = {layer_pattern(s) for s in model}
    extra_model = [
        s for s in model
        if s not in prof_set and layer_pattern(s) != s and layer_pattern(s) in prof_pats
    ]  # fmt: skip
    extra_prof = [
        s for s in prof
        if s not in model_set and layer_pattern(s) != s and layer_pattern(s) in model_pats
    ]  # fmt: skip
    return extra_model, extra_prof


def prefix_mismatches(
    profile_sites: Sequence[str], model_sites: Sequence[str]
) -> list[tuple[str, str]]:
    """(profile site, model site) pairs that name one site under two prefixes after the
    renaming: neither side has the other's name, and one ends with ``"." +`` the other. A
    renaming applies one prefix to the whole profile, so such a pair is a partial match.

    Example:
        >>> prefix_mismatches(["emb.drop", "l0.attn.drop"], ["emb.drop", "bb.l0.attn.drop"])
        [('l0.attn.drop', 'bb.l0.attn.drop')]
    """
    prof, model = set(profile_sites), set(model_sites)
    out = []
    for s in profile_sites:
        if s in model:
            continue
        for m in model_sites:
            if m not in prof and (m.endswith("." + s) or s.endswith("." + m)):
                out.append((s, m))
                break
    return out


def check_same_model(
    profile: SensitivityProfile,
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint | None,
) -> list[str]:
    """The one "same model?" rule; returns notes (never silent) or raises ProfileMismatchError.

    ``profile`` is already renamed into the model's names. A profile belongs to a model when

    1. at least one of its sites is a site of the model;
    2. every profiled parameter the model has has the same shape (canonical layout), and the same
       number of elements for parameters known only by size;
    3. it shares at least one parameter with the model (when both list parameters);
    4. it covers the same set of layers: no site of a repeated layer (a name that differs from
       a site of the other side only in a layer index) exists on one side only
       (:func:`layer_differences`);
    5. its sites take one prefix: no profile site matches a model site only under another prefix
       than the renaming's (:func:`prefix_mismatches`, a partial match).

    A profiled parameter the model lacks (a pooler an exporter dropped) is allowed and reported
    in the returned notes, as are profile sites the model lacks outside repeated layers.
    """
    here = set(model_sites)
    if not any(s in here for s in profile.site_names):
        raise ProfileMismatchError(
            "profile: expected a profile whose sites match this model's dropout sites, received "
            f"sites like {profile.site_names[:2]} while the model has {list(model_sites)[:2]}; "
            "fix: compute a profile for this model (gd profile --model ...)"
        )
    partial = prefix_mismatches(profile.site_names, model_sites)
    if partial:
        shown = ", ".join(f"{s!r} vs model {m!r}" for s, m in partial[:4])
        more = f" and {len(partial) - 4} more" if len(partial) > 4 else ""
        raise ProfileMismatchError(
            "profile: expected one name prefix for all of its sites, received sites that match "
            f"this model's only under another prefix than the others ({shown}{more}); fix: "
            "compute the profile on this model, or pass strict=False to apply the sites that "
            "match by name (the others follow missing=...)"
        )
    # sites the profile knows but could not score (metadata "unscored_sites": frozen or no
    # parameters) count as covered; they follow missing=..., and apply's report says so
    unscored = [str(s) for s in dict(profile.metadata.get("unscored_sites") or {})]
    extra_model, extra_prof = layer_differences([*profile.site_names, *unscored], model_sites)
    extra_prof = [s for s in extra_prof if s not in unscored]
    if extra_model or extra_prof:
        said = []
        if extra_model:
            said.append(f"model sites the profile lacks: {extra_model[:3]}")
        if extra_prof:
            said.append(f"profile sites the model lacks: {extra_prof[:3]}")
        raise ProfileMismatchError(
            "profile: expected a profile of the same layers as this model, received one that "
            f"covers a different set ({'; '.join(said)}); fix: compute a profile for this "
            "model, or pass strict=False to apply the sites that match (the others follow "
            "missing=...)"
        )
    notes: list[str] = []
    if unscored:
        notes.append(
            f"profile: {len(unscored)} site(s) were not scored when it was computed "
            f"({dict(profile.metadata['unscored_sites'])}); they follow missing=..."
        )
    if model_fingerprint is not None:
        mine = {n: tuple(s) for n, s in model_fingerprint.params}
        known: dict[str, str] = {}
        problems: list[str] = []
        if profile.fingerprint is not None:
            for name, shape in profile.fingerprint.params:
                known[name] = name
                if name in mine and tuple(shape) != mine[name]:
                    problems.append(
                        f"{name}: shape {tuple(shape)} in profile vs {mine[name]} in model"
                    )
        for name, size in profile.tensor_sizes.items():
            if name in known:
                continue
            known[name] = name
            if name in mine and int(np.prod(mine[name], dtype=np.int64)) != int(size):
                problems.append(
                    f"{name}: {size} elements in profile vs shape {mine[name]} in model"
                )
        if known and mine and not any(n in mine for n in known):
            problems.append(
                f"none of its parameters (e.g. {list(known)[:2]}) is a parameter of this model "
                f"(which has e.g. {list(mine)[:2]})"
            )
        if problems:
            more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
            raise ProfileMismatchError(
                "profile: expected a profile computed on this model's parameters, received one "
                f"from a different model ({'; '.join(problems[:4])}{more}); fix: compute a "
                "profile for this model, or pass strict=False if the difference is intended"
            )
        lacking = [n for n in known if n not in mine]
        if lacking and mine:
            notes.append(
                f"{len(lacking)} profiled parameter(s) are not in this model (e.g. "
                f"{lacking[:3]}); their sites' scores still count in the mapping"
            )
    return notes


def align(
    profile: SensitivityProfile,
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint | None,
    *,
    strict: bool = True,
) -> SensitivityProfile:
    """Rename ``profile`` into the model's names and, with ``strict``, check it belongs to this
    model (:func:`check_same_model`, which raises a :class:`ProfileMismatchError` saying what
    differs).
    """
    renaming = find_renaming(profile.site_names, model_sites)
    out = profile.translate(renaming) if renaming != Renaming() else profile
    if strict:
        check_same_model(out, model_sites, model_fingerprint)
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
