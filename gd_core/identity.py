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
from typing import Any

from .align import Renaming, find_renaming
from .dataflow import Op, guarded, with_sites
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


def _by_scope(model_site: str, tied: list[str], ren: Renaming) -> list[str]:
    """Of profile sites guarding the same parameters equally (T5's ``encoder.dropout`` and
    ``decoder.dropout``, both on the shared embedding), the one whose parent module holds the
    model site, when exactly one does; else all of them (a tie)."""
    if len(tied) < 2:
        return tied
    inside = [p for p in tied if "." in p and model_site.startswith(ren(p).rsplit(".", 1)[0] + ".")]
    return inside if len(inside) == 1 else tied


def correspond(
    profile_sites: Sequence[Site],
    model_sites: Sequence[Site],
    model_params: Sequence[str] | None = None,
) -> Correspondence:
    """Pair each profile site with the model site guarding the same canonical parameters.

    A profile site and a model site are partners when each is the other's site of largest
    overlap (ties broken by the smaller symmetric difference, then by module: of profile sites
    guarding the same parameters, the one whose parent module holds the model site); equal sets are ``same
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
            best_prof[m] = _by_scope(m, [p for r, p in scored if r == top], ren)

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


def regroup(
    profile_sites: Sequence[Site],
    parts: dict[str, Sequence[str]],
    grouping: dict[str, str],
) -> dict[str, str]:
    """Group a model's dropout calls (``parts``: ``{call: canonical parameters it guards}``) into
    sites as the profile does, where the model's own grouping (``grouping``: ``{call: site}``)
    differs: a new ``{call: site}``.

    A call belongs to the profile site whose (renamed) guarded set contains its own. A model site
    whose calls belong to several profile sites is split, one site per profile site (an exporter
    named the calls of two rate holders alike: BART's ``dropout`` and ``activation_dropout``, both
    functional in one layer's scope); model sites whose calls all guard parameters of one
    profile site only, none guarding a strict part of what another guards, and that together
    guard all of its parameters that the model guards at all, are merged into one: the calls of one rate holder (a shared layer unrolled into several
    scopes, ALBERT; a module called twice, Dory's attention; a rate holder called at several
    places and placed apart in a dropout-free graph, BART's ``dropout``, XLM's stack dropout). The new sites are named
    like the profile sites (renamed into the model's parameter names). Calls that guard nothing,
    or whose set no profile site contains, keep their site. Nothing changes where the groupings
    agree.

    Example:
        >>> prof = [Site("l.dropout", ("l.a", "l.c")), Site("l.act_dropout", ("l.b",))]
        >>> parts = {"n0": ("l.a",), "n1": ("l.b",), "n2": ("l.c",)}
        >>> regroup(prof, parts, {"n0": "l.dropout", "n1": "l.dropout", "n2": "l.dropout"})
        {'n0': 'l.dropout', 'n1': 'l.act_dropout', 'n2': 'l.dropout'}
    """
    model_params = [p for ps in parts.values() for p in ps]
    prof_params = [p for s in profile_sites for p in s.params]
    ren = find_renaming(prof_params, model_params) if prof_params and model_params else Renaming()
    sets = {s.name: frozenset(ren(p) for p in s.params) for s in profile_sites}
    owner: dict[str, str] = {}
    for call, ps in parts.items():
        mine = frozenset(ps)
        holders = [name for name, full in sets.items() if mine and mine <= full]
        if len(holders) == 1:
            owner[call] = holders[0]
    by_site: dict[str, list[str]] = {}
    for call, site in grouping.items():
        by_site.setdefault(site, []).append(call)
    owned = {
        site: {owner[c] for c in calls}
        for site, calls in by_site.items()
        if all(c in owner for c in calls)
    }
    out = dict(grouping)
    taken = set(by_site)
    for site, owners in owned.items():
        if len(owners) > 1:  # split: one site per profile site
            for c in by_site[site]:
                out[c] = ren(owner[c])
    union = {site: frozenset(p for c in calls for p in parts[c]) for site, calls in by_site.items()}
    anywhere = frozenset(p for ps in parts.values() for p in ps)
    for prof_site, full in sets.items():
        held = [site for site, owners in owned.items() if owners == {prof_site}]
        # a site guarding a strict part of what another of them guards is no call of it (an
        # embedding site where torch has none, before a first layer guarding the embeddings)
        held = [s for s in held if not any(union[s] < union[o] for o in held)]
        merged: list[str] = []
        if len(held) > 1 and frozenset[str]().union(*(union[s] for s in held)) >= full & anywhere:
            # the calls of one rate holder: each guards only its parameters, together all of
            # them the graph guards (a shared layer unrolled, a module called twice)
            merged = held
        if len(merged) > 1:  # merge: the profile site's one rate on every call
            name = ren(prof_site)
            if name in taken and name not in merged:
                name = merged[0]
            for site in merged:
                for c in by_site[site]:
                    out[c] = name
    return out


def placements(
    ops: Sequence[Op],
    wanted: dict[str, Sequence[str]],
    depth: int = 4,
    unclaimed: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Where a profile site that a dropout-free graph lacks acts, when one tensor suffices:
    ``{site: tensor}`` for each site of ``wanted`` (``{site: canonical parameters it guards}``,
    renamed into the graph's names) for which dropping one tensor of ``ops`` guards exactly
    those parameters (:func:`covers` with one part).

    Example:
        >>> ops = [Op("pool", ["h"], ["a"], ["pool.w"]), Op("tanh", ["a"], ["t"]),
        ...        Op("head", ["t"], ["y"], ["head.w"])]
        >>> placements(ops, {"dropout": ["pool.w"]})
        {'dropout': 't'}
    """
    got = covers(ops, wanted, depth, unclaimed)
    return {site: ts[0] for site, ts in got.items() if len(ts) == 1}


def _candidates(
    ops: Sequence[Op], want: frozenset[str], readers: dict[str, list[int]], depth: int
) -> list[str]:
    """The outputs of the ops owning parameters of ``want`` and of up to ``depth`` ops after
    them that own no parameter outside it (an activation, a reshape, a norm of the same site)."""
    cands: dict[str, None] = {}
    frontier = [(i, 0) for i, op in enumerate(ops) if want & set(op.params) and not op.site]
    while frontier:
        i, d = frontier.pop()
        for t in ops[i].outputs:
            if t in cands:
                continue
            cands[t] = None
            if d < depth:
                frontier.extend(
                    (j, d + 1)
                    for j in readers.get(t, [])
                    if not ops[j].site and set(ops[j].params) <= want
                )
    return list(cands)


def covers(
    ops: Sequence[Op],
    wanted: dict[str, Sequence[str]],
    depth: int = 4,
    unclaimed: frozenset[str] = frozenset(),
    allowed: dict[str, frozenset[str]] | None = None,
) -> dict[str, list[str]]:
    """Where each profile site of ``wanted`` (``{site: canonical parameters}``, renamed into the
    graph's names) acts in a dropout-free graph ``ops`` (the sites already inserted in place):
    ``{site: tensors}``, the tensors whose dropping, all together, guards exactly those
    parameters (:func:`gd_core.dataflow.guarded`), each tensor a disjoint part.

    The rule: a torch site guards the union of what each of its calls guards (a rate holder
    called on the embeddings and again after the final norm, a module called once per layer),
    so in a graph without its Dropout nodes it is realised by one dropped tensor per call. The
    candidates are the outputs of the ops owning its parameters and of up to ``depth`` ops
    after them that own no other parameter (an activation, a reshape). One tensor guarding the
    whole set exactly is taken if there is one (of those, the last in execution order: a
    dropout acts on a module's output). Otherwise the set is covered part by part: each time
    the candidate guarding most of what is left and nothing outside the set (ties: the later
    one), placed with the parts chosen before, until nothing is left. Where every tensor
    covering the set also drops another wanted site's parameters (two branches meeting in one
    sum: GPT-NeoX's parallel attention and MLP), the earliest covering tensor (the branch's own
    output, before the sum) is taken. Then all sites are placed together and each must guard
    exactly its set, in disjoint parts; a site that does not is left out (the caller reports it
    absent, with the reason). A place that guards besides only ``unclaimed`` parameters (no
    profile site guards them, e.g. a frozen position table the profile left out) counts as
    exact. ``allowed`` (``{site: tensors}``) restricts a site's candidates: the caller's word on
    where the site's module acts when parameters alone cannot tell (two profile sites guarding
    the same parameters).

    Example — one rate holder called after the embeddings and after the last projection:
        >>> ops = [Op("emb", ["ids"], ["e"], ["emb.w"]), Op("blk", ["e"], ["h"], ["blk.w"]),
        ...        Op("blk.drop", ["h"], ["hd"], site=True), Op("add", ["e", "hd"], ["r"], add=True),
        ...        Op("final", ["r"], ["n"], ["final.w"]), Op("head", ["n"], ["y"], ["head.w"])]
        >>> covers(ops, {"drop": ["emb.w", "final.w"]})
        {'drop': ['e', 'n']}
    """
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs}
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            readers.setdefault(t, []).append(i)
    sets = {site: frozenset(ps) for site, ps in wanted.items() if ps}

    def parts(at: list[str], base: Sequence[Op] = ops) -> list[frozenset[str]]:
        names = {t: f"#part{k}" for k, t in enumerate(at)}
        got = guarded(with_sites(base, names))
        return [frozenset(got.get(names[t], ())) for t in at]

    plan: dict[str, list[str]] = {}
    for site, want in sets.items():
        others = frozenset[str]().union(*(v for k, v in sets.items() if k != site)) - want
        cands = _candidates(ops, want, readers, depth)
        if allowed is not None and site in allowed:
            cands = [t for t in cands if t in allowed[site]]
        found = _cover(want, cands, producer, parts, unclaimed)
        if found is None:  # every tensor covering it also drops another missing site's part
            spill = [
                t
                for t in cands
                if want <= (got := parts([t])[0]) and got - want <= unclaimed | others
            ]
            found = [min(spill, key=lambda t: producer[t])] if spill else None
        if found:
            plan[site] = found
    while plan:  # all placed together, each site must guard exactly its set
        at = [(site, t) for site, ts in plan.items() for t in ts]
        placed = parts([t for _, t in at])
        bad = set()
        for site in plan:
            mine = [g for (s, _), g in zip(at, placed, strict=True) if s == site]
            whole = frozenset[str]().union(*mine)
            if (
                any(not g or bool(g - sets[site] - unclaimed) for g in mine)
                or not sets[site] <= whole
                or sum(len(g - unclaimed) for g in mine) != len(whole - unclaimed)
            ):
                bad.add(site)
        if not bad:
            break
        plan = {k: v for k, v in plan.items() if k not in bad}
    return {site: sorted(ts, key=lambda t: producer[t]) for site, ts in plan.items()}


def _cover(
    want: frozenset[str],
    cands: list[str],
    producer: dict[str, int],
    parts: Any,
    unclaimed: frozenset[str],
) -> list[str] | None:
    """:func:`covers` for one site, its other sites absent: one exact tensor (the last), else
    parts chosen greedily; None when no set of candidates guards exactly ``want``."""

    def fits(got: frozenset[str], allowed: frozenset[str]) -> bool:
        return bool(got & allowed) and got - allowed <= unclaimed

    exact = [t for t in cands if fits(got := parts([t])[0], want) and want <= got]
    if exact:
        return [max(exact, key=lambda t: producer[t])]
    chosen: list[str] = []
    left = want
    while left:
        best: tuple[int, int] | None = None
        pick = ""
        for t in cands:
            if t in chosen:
                continue
            got = parts([*chosen, t])
            if not fits(got[-1], left) or any(not fits(g, want) for g in got[:-1]):
                continue  # a part may not empty or spill an earlier one
            score = (len(got[-1] & left), producer[t])
            if best is None or score > best:
                best, pick = score, t
        if best is None:
            return None
        chosen.append(pick)
        left = want - frozenset[str]().union(*parts(chosen))
    return chosen or None


__all__ = [
    "REASONS",
    "Absent",
    "Correspondence",
    "Pair",
    "correspond",
    "covers",
    "placements",
    "regroup",
]
