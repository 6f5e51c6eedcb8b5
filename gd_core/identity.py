"""A site's identity is what it guards: match the sites of a profile to the sites of a model by
the canonical parameters each guards, whatever the sites are called.

The same dropout is named differently by different frameworks and exporters: torch names the
module (``attention.output.dropout``) or the attribute holding a rate (``attn.attn_dropout``), an
ONNX export names the node's scope (``attn.dropout``), and a site inserted into a dropout-free
graph is named after the module whose output it drops (``attention.output.dense.gd_dropout``).
What does not change is the set of parameters a site guards (:mod:`gd_core.dataflow`'s rule,
the same in every adapter). :func:`correspond` pairs sites on that, after the one prefix renaming
of parameter names that places most of them (a profile of ``encoder.*`` applied to a task model
of ``bert.encoder.*``), and gives every profile site without a partner its true reason.

Framework-neutral: adapters pass :class:`~gd_core.sites.Site` lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .align import Renaming, find_renaming
from .errors import ProfileMismatchError
from .sites import Site

#: why a profile site has no site in the model
REASONS = ("merged", "folded", "not exported")


@dataclass(frozen=True)
class Pair:
    """One profile site and the model site guarding the same parameters.

    ``how`` is ``"same parameters"`` (equal guarded sets), ``"overlap"`` (the sets share most of
    their parameters; ``missing``/``extra`` say what differs) or ``"name"`` (no partner by
    parameters, but a site of the same name that no other profile site claims).
    """

    profile_site: str
    model_site: str
    how: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def describe(self) -> str:
        renamed = "" if self.profile_site == self.model_site else " (renamed)"
        text = f"{self.profile_site} -> {self.model_site}{renamed}: {self.how}"
        if self.missing:
            text += (
                f"; {len(self.missing)} of its parameters not guarded here {list(self.missing[:2])}"
            )
        if self.extra:
            text += f"; also guards {list(self.extra[:2])}"
        return text


@dataclass(frozen=True)
class Absent:
    """A profile site with no model site: ``reason`` is one of :data:`REASONS`.

    - ``merged``: the model site guarding most of its parameters (``into``) is the partner of
      another profile site (``shared_with``), so both share one rate here;
    - ``folded``: its parameters are in the model but no site guards them (the exporter left no
      dropout there);
    - ``not exported``: none of its parameters is in the model.
    """

    profile_site: str
    reason: str
    into: str = ""
    shared_with: str = ""

    def describe(self) -> str:
        if self.reason == "merged":
            also = f" together with those of {self.shared_with}" if self.shared_with else ""
            return (
                f"{self.profile_site}: merged into {self.into} (which guards its parameters{also})"
            )
        if self.reason == "folded":
            return f"{self.profile_site}: folded (its parameters are here, no dropout guards them)"
        return f"{self.profile_site}: not exported (none of its parameters is in this model)"


@dataclass
class Correspondence:
    """Result of :func:`correspond`: pairs, absent profile sites, and the parameter renaming."""

    pairs: list[Pair] = field(default_factory=list)
    absent: list[Absent] = field(default_factory=list)
    renaming: Renaming = field(default_factory=Renaming)

    def names(self) -> dict[str, str]:
        """``{profile site: model site}`` of the pairs."""
        return {p.profile_site: p.model_site for p in self.pairs}

    def notes(self) -> list[str]:
        """Report notes: renamed pairs, partial overlaps and absent sites with their reasons."""
        out = []
        renamed = [p for p in self.pairs if p.profile_site != p.model_site]
        if renamed:
            out.append(
                f"{len(renamed)} profile site(s) placed on the site guarding the same parameters "
                f"under another name: "
                + "; ".join(p.describe() for p in renamed[:8])
                + (f" and {len(renamed) - 8} more" if len(renamed) > 8 else "")
            )
        partial = [
            p
            for p in self.pairs
            if p.how != "same parameters" and (p.missing or p.extra) and p not in renamed
        ]
        if partial:
            out.append("guarded sets differ: " + "; ".join(p.describe() for p in partial[:4]))
        for reason in REASONS:
            these = [a for a in self.absent if a.reason == reason]
            if these:
                out.append(
                    f"{len(these)} profile site(s) have no site here ({reason}): "
                    + "; ".join(a.describe() for a in these[:4])
                    + (f" and {len(these) - 4} more" if len(these) > 4 else "")
                )
        return out


def _param_renaming(profile_sites: Sequence[Site], model_sites: Sequence[Site]) -> Renaming:
    prof = [p for s in profile_sites for p in s.params]
    model = [p for s in model_sites for p in s.params]
    return find_renaming(prof, model) if prof and model else Renaming()


def correspond(
    profile_sites: Sequence[Site],
    model_sites: Sequence[Site],
    model_params: Sequence[str] | None = None,
) -> Correspondence:
    """Pair each profile site with the model site guarding the same canonical parameters.

    A profile site and a model site are partners when each is the other's site of largest
    overlap (ties broken by the smaller symmetric difference); equal sets are ``same
    parameters``, others ``overlap``. A profile site left without a partner pairs with a model
    site of the same (renamed) name that no other profile site claims (``name``). Any other
    profile site is :class:`Absent` with its reason; ``model_params``
    (all canonical parameter names of the model) tells ``folded`` from ``not exported``.

    Raises :class:`ProfileMismatchError` when the guarded sets conflict: a profile site whose
    largest overlap is shared equally by two model sites (which of them it is cannot be told).

    Example:
        >>> prof = [Site("enc.0.drop", ("enc.0.w",)), Site("enc.0.attn_drop", ("enc.0.q",))]
        >>> model = [Site("bert.enc.0.drop", ("bert.enc.0.w",)),
        ...          Site("bert.enc.0.attn.dropout", ("bert.enc.0.q",))]
        >>> c = correspond(prof, model)
        >>> c.names()
        {'enc.0.drop': 'bert.enc.0.drop', 'enc.0.attn_drop': 'bert.enc.0.attn.dropout'}
    """
    ren = _param_renaming(profile_sites, model_sites)
    prof = {s.name: frozenset(ren(p) for p in s.params) for s in profile_sites}
    model = {s.name: frozenset(s.params) for s in model_sites}

    def rank(a: frozenset[str], b: frozenset[str]) -> tuple[int, int]:
        return (len(a & b), -len(a ^ b))

    best_model: dict[str, list[str]] = {}
    for p, ps in prof.items():
        if not ps:
            continue
        scored = [(rank(ps, ms), m) for m, ms in model.items() if ps & ms]
        if scored:
            top = max(r for r, _ in scored)
            best_model[p] = [m for r, m in scored if r == top]
    best_prof: dict[str, list[str]] = {}
    for m, ms in model.items():
        scored = [(rank(ms, ps), p) for p, ps in prof.items() if ps and ps & ms]
        if scored:
            top = max(r for r, _ in scored)
            best_prof[m] = [p for r, p in scored if r == top]

    out = Correspondence(renaming=ren)
    known = (
        set(model_params) if model_params is not None else {p for v in model.values() for p in v}
    )
    mutual_of: dict[str, str] = {}
    for s in profile_sites:
        p = s.name
        mutual = [m for m in best_model.get(p, []) if best_prof.get(m) == [p]]
        if len(mutual) > 1:
            raise ProfileMismatchError(
                f"profile: expected each profile site to guard the parameters of one model site, "
                f"received {p!r} whose parameters are guarded equally by {mutual[:3]}; fix: pass "
                "a {site: p} dict for these sites, or mapping={site: [parameters]} to say what "
                "each model site guards"
            )
        if mutual:
            mutual_of[p] = mutual[0]
    taken = set(mutual_of.values())
    for s in profile_sites:
        p, ps = s.name, prof[s.name]
        partner = mutual_of.get(p)
        if partner is not None:
            ms = model[partner]
            how = "same parameters" if ms == ps else "overlap"
            out.pairs.append(Pair(p, partner, how, tuple(sorted(ps - ms)), tuple(sorted(ms - ps))))
            continue
        # the same (renamed) name and no other partner: the same module, read differently
        same = next((n for n in (ren(p), p) if n in model and n not in taken), None)
        if same is not None:
            taken.add(same)
            ms = model[same]
            out.pairs.append(Pair(p, same, "name", tuple(sorted(ps - ms)), tuple(sorted(ms - ps))))
            continue
        cands = best_model.get(p, [])
        if cands:
            others = [q for q in best_prof.get(cands[0], []) if q != p]
            out.absent.append(Absent(p, "merged", cands[0], others[0] if others else ""))
        elif ps & known:
            out.absent.append(Absent(p, "folded"))
        else:
            out.absent.append(Absent(p, "not exported"))
    return out


__all__ = ["REASONS", "Absent", "Correspondence", "Pair", "correspond"]
