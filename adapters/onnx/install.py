"""``apply`` for ONNX graphs: rewrite every Dropout's ratio (or per-unit rates) from the plan
:func:`gd_core.plan.make_plan` decides; :func:`ratio_feeds` feeds ratio inputs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Unpack

import numpy as np

from gd_core.errors import bad_argument
from gd_core.face import ApplyOptions, ApplySettings
from gd_core.identity import Correspondence, Pair, correspond, regroup
from gd_core.plan import _load as _load_profile
from gd_core.plan import make_plan
from gd_core.profile import SensitivityProfile
from gd_core.report import ApplyReport, ReportRow
from gd_core.schedules import Schedule
from gd_core.sites import Site
from gd_core.validate import check_probability, check_rates

from . import graph as _g
from . import rewrite as _r
from . import train as _t
from .discovery import ModelLike, _copy, _discover, _load, fingerprint
from .graph import TRAINING_MODE_NAME, GraphIndex, onnx
from .insert import (
    insert_in_place,
    insert_sites,
    is_inserted,
    profile_points,
    unscored_rates,
    wanted,
)
from .rewrite import _f32, _owned_by, _refuse_unit_rewritten, _unit_width, _UnitRewrite

INSERTED = "inserted (the graph had no Dropout node here)"


@dataclass
class OnnxApplyReport(ApplyReport):
    """:class:`gd_core.report.ApplyReport` plus what is particular to a rewritten ONNX graph.

    Attributes:
        ratio_inputs: ``{site: graph input name}`` when ``ratios_as_inputs=True``.
        ratio_names: ``{site: ratio tensor name}`` (initializer or input; ``<site>.rates`` for
            per-unit sites).
        unit_rates: ``{site: per-unit rates}`` of the sites given unit granularity (arrays of the
            dropped tensor's element type, one rate per feature of its last axis).
        nodes: ``{site: Dropout node names}``.
        absent: profile sites (after renaming) with no Dropout node in the graph, e.g.
            attention-probability dropout an exporter folded away.
        activated: sites whose nodes were inert (no ``training_mode``) and now train.
        matched: ``{graph site: profile site}``: each profile site placed on the site guarding
            the same canonical parameters (:func:`gd_core.identity.correspond`).
        pairs: the correspondence itself (:class:`gd_core.identity.Pair`: profile site, graph
            site, and whether they guard the same parameters or only overlap, with the
            differences).
        absent_reasons: ``{site of absent: why}`` for the profile sites with no site here
            (``merged``, ``folded``, ``not exported``), keyed as in ``absent``.
        inserted: sites whose Dropout nodes :mod:`adapters.onnx.insert` added (a graph without
            Dropout nodes: on the embedding output and every residual branch).
        changes: what :func:`prepare_for_training` changed.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> report = apply(example_model(), {"dropout": 0.05})
        >>> report.probabilities(), report.counts()
        ({'dropout': 0.05, 'head_drop': 0.1}, {'given': 1, 'keep': 1})
    """

    ratio_inputs: dict[str, str] = field(default_factory=dict)
    ratio_names: dict[str, str] = field(default_factory=dict)
    unit_rates: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    matched: dict[str, str] = field(default_factory=dict)
    absent_reasons: dict[str, str] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)


def apply(
    model: ModelLike,
    profile: Any = None,
    *,
    sites: Any = None,
    ratios_as_inputs: bool = False,
    repair: bool = True,
    activate: bool = True,
    check: bool = True,
    seed: int | None = None,
    **options: Unpack[ApplyOptions],
) -> OnnxApplyReport:
    """Rewrite every Dropout's ratio from a profile; returns the report, whose ``model`` is the
    new ``ModelProto`` (the input is not changed).

    ``profile`` is a :class:`gd_core.SensitivityProfile` (e.g. from ``adapters.torch.profile``
    on the model you exported), a path to a saved one, ``{site: probability}``, or None to use
    a cached profile of this graph (``profile(..., cache=True)``). The plan is
    :func:`gd_core.plan.make_plan`'s, as in every adapter: names are matched to the graph's
    sites with a prefix renaming; with ``strict`` (see ``docs/onnx.md``, "same model") a profile
    whose sites match none of the graph's, or whose parameters that exist here as initializers
    have other shapes (or that shares no parameter with the graph, or that covers a different
    set of layers), raises :class:`gd_core.ProfileMismatchError`; a ``{site: p}`` key that is
    no site of the graph raises whatever ``strict`` is. ``sites`` is a site mapping (as :func:`sites` takes)
    or a list of :class:`gd_core.Site` to restrict the sites. ``schedule`` (needs
    ``ratios_as_inputs=True``) is kept as ``report.scheduler``; :func:`ratio_feeds` then scales
    the ratios by it every step. ``mapping``
    overrides the profile's score-to-probability mapping; sites the profile lacks follow
    ``missing`` (``keep`` | ``upper`` | ``error``); profile sites with no Dropout node are listed
    in ``report.absent``.

    Each site gets its own float ratio named ``<site>.ratio``: an initializer, or with
    ``ratios_as_inputs=True`` a scalar float graph input (feed it every step, see
    :func:`ratio_feeds`). Shared ratio constants are never modified; ones left unused are
    removed. ``training_mode`` inputs are kept; with ``activate`` a node without one (inert, as
    torch's SDPA export emits for attention probabilities) gets a ``True`` one so the site
    trains. ``repair`` runs :func:`prepare_for_training`. With ``check`` the result must pass
    ``onnx.checker.check_model(full_check=True)`` and strict shape inference. ``seed`` sets the
    Dropout nodes' ``seed`` attributes (``seed``, ``seed + 1``, ... in graph order) so that the
    masks a session draws are reproducible.

    ``granularity="unit"`` gives each site whose dropped tensor has a static feature axis (the
    last) one rate per feature: the profile's per-unit probabilities
    (``profile.unit_probabilities``, mean = the site's p, ``spread`` as there) or, for a site
    without unit scores, its p for every unit. Its Dropout nodes are replaced by
    ``Where(training, x * Cast(RandomUniformLike(x) >= r) / (1 - r), x)`` with ``r`` the float
    initializer (or, with ``ratios_as_inputs``, the graph input) ``<site>.rates`` of shape
    ``[units]``; ``training`` is True in the training graph and False in the eval graph
    ``generate_artifacts`` derives (and False where the node's own ``training_mode`` is). Sites
    without a static feature axis, e.g. attention-probability dropout (last axis = key sequence),
    stay site level; their report rows say why. Rows of unit sites carry ``units``.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> report = apply(example_model(), {"dropout": 0.0, "head_drop": 0.2},
        ...                ratios_as_inputs=True)
        >>> m = report.model
        >>> report.ratio_inputs
        {'dropout': 'dropout.ratio', 'head_drop': 'head_drop.ratio'}
        >>> [i.name for i in m.graph.input]
        ['x', 'dropout.ratio', 'head_drop.ratio']
        >>> report = apply(example_model(), {"dropout": 0.1}, granularity="unit")
        >>> report["dropout"].units, report["dropout"].new_p, report.ratio_names["dropout"]
        (4, 0.1, 'dropout.rates')
    """
    opts = ApplySettings.of(options, "apply")
    proto = _load(model, "model")
    _g.check_ort_compatible(proto)
    _g.check_dropout_opset(proto)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise bad_argument("seed", "an int or None", seed, "pass e.g. seed=0")
    sched = None if opts.schedule is None else Schedule.from_config(opts.schedule)
    if sched is not None and not ratios_as_inputs:
        raise bad_argument(
            "schedule",
            "a schedule only with ratios_as_inputs=True (constant ratios cannot change per step)",
            sched.get_config(),
            "pass ratios_as_inputs=True and feed ratio_feeds(report, step=...) every step",
        )
    _refuse_unit_rewritten(proto)
    out = _copy(proto)
    given_sites = isinstance(sites, Sequence) and not isinstance(sites, str)
    inserted_notes: list[str] = []
    if isinstance(profile, (str, os.PathLike)):  # a saved profile: loaded once, here
        profile = _load_profile(profile, "pass profile=adapters.onnx.profile(...)")
    if isinstance(profile, SensitivityProfile):  # tied torch parameters under another name
        inserted_notes += _untie(out, dict(profile.metadata.get("tied_parameters") or {}))
    dropout_free = wanted(out)
    if dropout_free:
        inserted_notes += insert_sites(out, warn=False)[1]  # sites for a dropout-free graph
    infos, table = _discover(out, "model", mapping=None if given_sites else sites)
    if given_sites:
        infos = _only(infos, sites)
    corr, id_notes = None, []
    if not given_sites and not isinstance(profile, Mapping) and profile is not None:
        prof = _load_profile(profile, "pass profile=adapters.onnx.profile(...) or a saved path")
        if dropout_free:
            more = profile_points(out, infos, table, prof)
            if more:  # torch sites off the residual stream (a head's dropout): where they act
                insert_in_place(out, more)
                infos, table = _discover(out, "model", mapping=sites)
                free = list(unscored_rates(prof))
                kept = [p.name for p in more if any(p.name.endswith(n) for n in free)]
                named = list(dict.fromkeys(p.name for p in more if p.name not in kept))
                if kept:
                    inserted_notes.append(
                        f"{len(kept)} profile site(s) guarding no parameter inserted before "
                        "their module's first parametrised op, at the rate the source model "
                        "gives them (the profile has no score for them): " + ", ".join(kept[:4])
                    )
                if named:
                    inserted_notes.append(
                        f"{len(named)} profile site(s) inserted where dropping guards exactly "
                        f"their parameters ({len(more) - len(kept)} Dropout node(s), one per "
                        "call): "
                        + ", ".join(named[:4])
                        + (f" and {len(named) - 4} more" if len(named) > 4 else "")
                    )
        corr, profile, id_notes = _identify(out, infos, table, prof)
        bare = {corr.renaming(n) for n in unscored_rates(prof)}
        unused = [
            i for i in infos if i.site.name not in corr.names().values() and i.site.name not in bare
        ]
        if (
            dropout_free
            and unused
            and all(is_inserted(out.graph.node[n]) for i in unused for n in i.nodes)
        ):
            # a dropout-free graph gets the sites the profile has, as torch's model has them
            _remove_nodes(out, [n for i in unused for n in i.nodes])
            infos, table = _discover(out, "model", mapping=sites)
            corr, profile, id_notes = _identify(out, infos, table, prof)
            inserted_notes.append(
                f"{len(unused)} residual site(s) not inserted: the profile has no site guarding "
                "their parameters (the source model has no dropout there): "
                + ", ".join(i.site.name for i in unused[:4])
            )
    names = [i.site.name for i in infos]
    current = {i.site.name: (i.ratio if i.ratio is not None else 0.0) for i in infos}
    plan = make_plan(
        profile,
        names,  # unit widths come from the graph's inferred types (_unit_width), not Site.units
        current,
        None if isinstance(profile, Mapping) else fingerprint(out),
        **opts.plan(),
        framework="onnx",
        not_found=(
            f"ONNX graph {out.graph.name!r}",
            "a graph has no pretraining objective to compute one from: make one from the source "
            "model with `gd profile --model PATH --corpus FILE --out model.profile.npz` (or "
            "adapters.torch.apply(model), which computes and caches one) and pass it, or run "
            "`gd apply-onnx`; adapters.onnx.profile(model, batches, cache=True) also works",
        ),
    )
    resolved = {e.site: (e.p, e.source) for e in plan}
    unit_p = {e.site: e.rates for e in plan if e.rates is not None}
    absent = list(plan.absent)
    notes: list[str] = list(plan.notes) + inserted_notes
    report = OnnxApplyReport(framework="onnx", granularity=opts.granularity, scheduler=sched)
    if corr is not None:
        # the plan's generic word on absent sites is replaced by each one's true reason
        notes = [n for n in notes if "have no dropout site in this model" not in n]
        notes.extend(id_notes + corr.notes())
        report.matched = {p.model_site: p.profile_site for p in corr.pairs}
        report.pairs = list(corr.pairs)
        report.absent_reasons = {corr.renaming(a.profile_site): a.describe() for a in corr.absent}
    flipped = [p for p in table.values() if p.transposed]
    if flipped:
        notes.append(
            f"{len(flipped)} initializer(s) hold a torch weight transposed (e.g. "
            f"{flipped[0].onnx_name} = {flipped[0].name}); names, shapes and Fisher are given "
            "in torch layout"
        )

    index = GraphIndex(out.graph)
    taken = index.names()
    replaced: list[str] = []
    drop_names: set[str] = set()
    new_inits: list[Any] = []
    new_inputs: list[Any] = []
    rows: list[ReportRow] = []
    tm_name: str | None = None
    types = _g.inferred_types(out) if opts.granularity == "unit" else {}
    unit = _UnitRewrite(index, taken)
    for info in infos:
        site = info.site.name
        p, source = resolved[site]
        report.nodes[site] = list(info.node_names)
        if all(is_inserted(out.graph.node[i]) for i in info.nodes):
            report.inserted.append(site)
        old = (_f32(info.ratio) if info.ratio is not None else math.nan) if info.active else 0.0
        if info.ratio is None and source == "keep":
            rows.append(
                ReportRow(site, old, old, source, note="ratio is not a constant; left as is")
            )
            continue
        states = [_g.dropout_state(index, out.graph.node[i])[1] for i in info.nodes]
        if not activate and all(a is False for a in states):
            rows.append(
                ReportRow(
                    site,
                    0.0,
                    0.0,
                    source,
                    note="inert (no training_mode): left as is; pass activate=True to train it",
                )
            )
            continue
        level_note = ""
        if opts.granularity == "unit":
            width, dtype, why = _unit_width(info, index, types, unit_p.get(site))
            if width is not None:
                row = unit.rewrite(
                    info,
                    p,
                    source,
                    old,
                    width,
                    dtype,
                    unit_p.get(site),
                    ratios_as_inputs=ratios_as_inputs,
                    activate=activate,
                    report=report,
                )
                if site in report.inserted:
                    row = replace(row, note="; ".join(n for n in (INSERTED, row.note) if n))
                rows.append(row)
                continue
            level_note = f"site level: {why}"
        rname = f"{site}.ratio"
        if rname in taken and _owned_by(index, rname, info.nodes):
            drop_names.add(rname)  # this graph went through apply before: replace our own ratio
        elif rname in taken:
            rname = _g.unique_name(rname, taken)
        else:
            taken.add(rname)
        note = ""
        for i in info.nodes:
            node = out.graph.node[i]
            while len(node.input) < 2:
                node.input.append("")
            if node.input[1] != rname:
                replaced.append(node.input[1])
                node.input[1] = rname
            _, active = _g.dropout_state(index, node)
            if activate and active is False:
                if tm_name is None:
                    tm_name = _g.unique_name(TRAINING_MODE_NAME, taken)
                    new_inits.append(onnx.numpy_helper.from_array(np.array(True), tm_name))
                while len(node.input) < 3:
                    node.input.append("")
                replaced.append(node.input[2])
                node.input[2] = tm_name
                if site not in report.activated:
                    report.activated.append(site)
                note = "was inert (no training_mode); activated"
        value = np.array(p, dtype=np.float32)
        if ratios_as_inputs:
            new_inputs.append(onnx.helper.make_tensor_value_info(rname, onnx.TensorProto.FLOAT, []))
            report.ratio_inputs[site] = rname
        else:
            new_inits.append(onnx.numpy_helper.from_array(value, rname))
        report.ratio_names[site] = rname
        if site in report.inserted:
            note = INSERTED
        if report.matched.get(site, site) != site:
            note = "; ".join(n for n in (note, f"profile site {report.matched[site]}") if n)
        note = "; ".join(n for n in (level_note, note) if n)
        rows.append(ReportRow(site, old, _f32(p), source, note=note))

    replaced.extend(unit.replaced)
    drop_names.update(unit.drop_names)
    new_inits.extend(unit.new_inits)
    new_inputs.extend(unit.new_inputs)
    unit.splice(out)
    if opts.granularity == "unit":
        n_unit = sum(r.units is not None for r in rows)
        notes.append(
            f"unit granularity: {n_unit} site(s) per unit, {len(rows) - n_unit} at site level "
            "(their rows say why)"
        )
    if drop_names:
        keep_inits = [t for t in out.graph.initializer if t.name not in drop_names]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep_inits)
        keep_inputs = [v for v in out.graph.input if v.name not in drop_names]
        del out.graph.input[:]
        out.graph.input.extend(keep_inputs)
    out.graph.initializer.extend(new_inits)
    out.graph.input.extend(new_inputs)
    _r.prune_unused(out, replaced)
    if seed is not None:
        _r.set_seeds(out, int(seed))
    if repair:
        report.changes = _r.repair_in_place(out)
    if check:
        _check_model(out)
    report.rows = rows
    report.absent = absent
    report.notes = notes + _summarise_changes(report.changes)
    report.model = out
    return report


def _identify(
    model: Any, infos: list[Any], table: Mapping[str, Any], prof: SensitivityProfile
) -> tuple[Correspondence, SensitivityProfile, list[str]]:
    """Place each profile site on the graph site guarding the same canonical parameters
    (:func:`gd_core.identity.correspond`): the profile renamed into the graph's site names, and
    the correspondence. A site :mod:`adapters.onnx.insert` added takes the name of the profile
    site it matches (node and site), so the rewritten graph is named like the source model.
    Dropout nodes are first grouped into sites as the profile groups the calls guarding the same
    parameters (:func:`gd_core.identity.regroup`; ``infos`` is changed in place)."""
    infos[:], regrouped = _regroup(model, infos, table, prof)
    corr = correspond(prof.sites, [i.site for i in infos], [p.name for p in table.values()])
    by_name = {i.site.name: i for i in infos}
    taken_sites = set(by_name)
    ren = corr.renaming
    pairs, renamed = [], []
    for pair in corr.pairs:
        info = by_name[pair.model_site]
        wanted_name = ren(pair.profile_site)
        nodes = [model.graph.node[i] for i in info.nodes]
        if (
            wanted_name != pair.model_site
            and wanted_name not in taken_sites
            and all(is_inserted(n) for n in nodes)
        ):
            taken_sites.discard(pair.model_site)
            taken_sites.add(wanted_name)
            names = GraphIndex(model.graph).names()
            for n in nodes:
                n.doc_string = f"{_g.INSERT_MARK}: {wanted_name}"
                n.name = _g.unique_name("/" + "/".join((*wanted_name.split("."), "Dropout")), names)
            info.site = replace(info.site, name=wanted_name)
            info.node_names = [n.name for n in nodes]
            renamed.append(f"{pair.model_site} -> {wanted_name}")
            pair = replace(pair, model_site=wanted_name)
        pairs.append(pair)
    corr.pairs = pairs
    names_map = corr.names()
    notes = regrouped
    if renamed:
        notes.append(
            f"{len(renamed)} inserted site(s) named after the profile site guarding the same "
            f"parameters: {'; '.join(renamed[:4])}" + (" ..." if len(renamed) > 4 else "")
        )
    return corr, prof.translate(lambda n: names_map.get(n, ren(n))), notes


def _untie(model: Any, tied: Mapping[str, str]) -> list[str]:
    """Rename (in place) initializers named by another name of a tied torch parameter
    (``tied``: ``{alias: name}``, the profile's ``tied_parameters``) to the name the profile
    uses, where that name is not in the graph: the dynamo exporter names GPT-2's word
    embedding, tied to the LM head, ``lm_head.weight``. A note says which."""
    names = {t.name for t in model.graph.initializer}
    renamed = {a: n for a, n in tied.items() if a in names and n not in names}
    if not renamed:
        return []
    for t in model.graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in model.graph.node:
        for j, x in enumerate(node.input):
            if x in renamed:
                node.input[j] = renamed[x]
    for v in model.graph.input:
        v.name = renamed.get(v.name, v.name)
    return [
        f"{len(renamed)} initializer(s) renamed to the name of the torch parameter they are tied "
        f"to (the profile's tied_parameters): "
        + ", ".join(f"{a} -> {n}" for a, n in list(renamed.items())[:4])
    ]


def _remove_nodes(model: Any, positions: list[int]) -> None:
    """Remove inserted Dropout nodes (their readers read the node's input again) and the ratio
    initializers only they read."""
    graph = model.graph
    gone = set(positions)
    rewire = {graph.node[i].output[0]: graph.node[i].input[0] for i in gone}
    ratios = {graph.node[i].input[1] for i in gone if len(graph.node[i].input) > 1}
    keep = [n for i, n in enumerate(graph.node) if i not in gone]
    for node in keep:
        for j, t in enumerate(node.input):
            if t in rewire:
                node.input[j] = rewire[t]
    del graph.node[:]
    graph.node.extend(keep)
    read = {t for n in keep for t in n.input}
    inits = [t for t in graph.initializer if t.name not in ratios or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _regroup(
    model: Any, infos: list[Any], table: Mapping[str, Any], prof: SensitivityProfile
) -> tuple[list[Any], list[str]]:
    """The site handles regrouped node by node as the profile groups what they guard (one
    profile site's calls spread over several graph sites are merged; a graph site whose nodes
    belong to several profile sites is split), and a note saying what changed."""
    from .dataflow import groups, ops_of

    by_node = {n: info for info in infos for n in info.nodes}
    try:
        ops, site_ops = ops_of(
            model,
            {k: v.name for k, v in table.items()},
            lambda i, n: f"#{i}" if i in by_node else None,
        )
        parts = {k: tuple(v) for k, v in groups(ops, site_ops).items()}
    except Exception:  # noqa: BLE001 - a graph the rule cannot read keeps its grouping
        return infos, []
    grouping = {f"#{n}": info.site.name for n, info in by_node.items()}
    parts = {c: parts.get(c, ()) for c in grouping}
    new = regroup(prof.sites, parts, grouping)
    if new == grouping:
        return infos, []
    order = {v.name: i for i, v in enumerate(table.values())}
    out: dict[str, Any] = {}
    for info in infos:
        for n, name in zip(info.nodes, info.node_names, strict=True):
            site = new[f"#{n}"]
            handle = out.get(site)
            if handle is None:
                handle = out[site] = _g.SiteHandle(
                    Site(site, (), info.site.units, kind="node"), ratio=info.ratio, active=False
                )
            elif handle.ratio != info.ratio:
                handle.ratio = None
            handle.nodes.append(n)
            handle.node_names.append(name)
            handle.active = bool(handle.active) or bool(info.active)
    for handle in out.values():
        ps = {p for n in handle.nodes for p in parts[f"#{n}"]}
        params = tuple(sorted(ps, key=lambda p: order.get(p, len(order))))
        handle.site = replace(handle.site, params=params)
    changed = sorted({f"{grouping[c]} -> {new[c]}" for c in new if new[c] != grouping[c]})
    note = (
        f"{len(changed)} graph site(s) regrouped node by node as the profile groups what they "
        f"guard (calls of one rate holder named apart, or of two named alike): "
        + "; ".join(changed[:4])
        + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    )
    return list(out.values()), [note]


def _only(infos: list[Any], sites: Sequence[Any]) -> list[Any]:
    """The site infos of the given ``gd_core.Site`` list (their guarded parameters replace)."""
    by_name = {i.site.name: i for i in infos}
    out = []
    for site in sites:
        name = getattr(site, "name", None)
        if name not in by_name:
            raise bad_argument(
                "sites",
                "sites of this graph (gd_core.Site)",
                name if name is not None else type(site).__name__,
                f"use sites from adapters.onnx.sites(model), e.g. {list(by_name)[:3]}",
            )
        by_name[name].site = site
        out.append(by_name[name])
    return out


def _summarise_changes(changes: Sequence[str]) -> list[str]:
    """One note per kind of repair (the full list is ``report.changes``)."""
    kinds = {
        "LayerNormalization": "declared Mean/InvStdDev outputs of {n} LayerNormalization node(s)",
        "mask output": "declared the mask output of {n} Dropout node(s)",
        "ratio set to 0": "set the ratio of {n} inert Dropout node(s) to 0",
    }
    out = []
    for key, text in kinds.items():
        n = sum(key in c for c in changes)
        if n:
            out.append("repair: " + text.format(n=n) + " for ORT training (report.changes)")
    return out


def _check_model(model: Any) -> None:
    try:  # full_check's strict inference, on the weights' shapes only (_skeleton: faster)
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(_g._skeleton(model), check_type=True, strict_mode=True)
    except Exception as exc:
        raise bad_argument(
            "model_proto",
            "a graph that passes onnx.checker.check_model(full_check=True) after rewriting",
            f"{type(exc).__name__}: {str(exc)[:300]}",
            "check the input model with onnx.checker first (or pass check=False to skip)",
        ) from exc


# ---------------------------------------------------------------------------------------------
# feeds
# ---------------------------------------------------------------------------------------------
def ratio_feeds(
    report: OnnxApplyReport | Mapping[str, float],
    *,
    schedule: Schedule | None = None,
    step: int = 0,
    multiplier: float = 1.0,
) -> dict[str, np.ndarray]:
    """Values for the ratio inputs of a graph rewritten with ``ratios_as_inputs=True``.

    Each site's probability times ``multiplier`` (times ``schedule.multiplier(step)``), as a
    float32 scalar keyed by input name; for a per-unit site (``granularity="unit"``) its rates
    times the same factor, as a vector of the rates' type. ``report`` is :func:`apply`'s report,
    or ``{site: p}`` for inputs named ``<site>.ratio``.

    Example:
        >>> from gd_core import Schedule
        >>> feeds = ratio_feeds({"enc.dropout": 0.1}, schedule=Schedule("linear_warmup", 10),
        ...                     step=5)
        >>> {k: round(float(v), 4) for k, v in feeds.items()}
        {'enc.dropout.ratio': 0.05}
    """
    vectors: Mapping[str, np.ndarray] = {}
    if schedule is None and isinstance(report, OnnxApplyReport):
        schedule = report.scheduler
    if isinstance(report, OnnxApplyReport):
        probs = report.probabilities()
        names = dict(report.ratio_inputs)
        vectors = report.unit_rates
        if not names:
            raise bad_argument(
                "report",
                "the report of apply(..., ratios_as_inputs=True)",
                "a report of a graph whose ratios are constants",
                "call apply(model, profile, ratios_as_inputs=True)",
            )
    elif isinstance(report, Mapping):
        probs = {str(k): float(v) for k, v in report.items()}
        names = {k: f"{k}.ratio" for k in probs}
    else:
        raise bad_argument(
            "report", "an OnnxApplyReport or {site: p}", type(report).__name__, "pass the report"
        )
    scale = float(multiplier) * (schedule.multiplier(step) if schedule is not None else 1.0)
    out = {}
    for site, name in names.items():
        if site in vectors:
            rates = check_rates(
                np.asarray(vectors[site], dtype=np.float64) * scale,
                f"rates of {site!r}",
                "lower multiplier",
            )
            out[name] = rates.astype(vectors[site].dtype)
            continue
        p = check_probability(probs[site] * scale, f"ratio of {site!r}", "lower multiplier")
        out[name] = np.array(p, dtype=np.float32)
    return out


def module_inputs(module: Any, feeds: Mapping[str, Any]) -> list[Any]:
    """``feeds`` as the positional arguments ``onnxruntime.training.api.Module`` expects.

    Example:
        >>> class FakeModule:
        ...     training = True
        ...     def input_names(self): return ["x", "drop.ratio", "labels"]
        >>> module_inputs(FakeModule(), {"labels": 2, "x": 0, "drop.ratio": 1})
        [0, 1, 2]
    """
    return _t.module_inputs(list(module.input_names()), feeds)
