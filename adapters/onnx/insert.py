"""Dropout sites for ONNX graphs that have none (an eval-mode export, the ``dynamo=True``
exporter's graph): the places :func:`gd_core.dataflow.insertion_points` gives (the embedding
output and every residual branch before its add), named as the torch adapter names its hook
sites on the same model, and realised as inserted ``Dropout`` nodes.

A site's name is ``<module>.gd_dropout`` (``adapters.torch``'s ``HOOK_CHILD``), ``<module>`` being
the outermost module that returned the dropped tensor, read from the exporter's node scopes: the
shortest scope of the producing node that some reader of the tensor lies outside of. That is the
module whose output a torch forward hook replaces, so a profile made by ``adapters.torch`` on the
model applies to its export. An inserted node reads the tensor, a ratio initializer
``<site>.ratio`` (0.0 until :func:`adapters.onnx.apply` sets it) and the ``True``
``training_mode`` initializer that :func:`~adapters.onnx.apply` gives inert Dropout nodes: ORT
Training's gradient graph drops and its eval graph (``training_mode`` removed) is the identity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gd_core.errors import no_sites

from . import graph as _g
from .graph import INSERT_MARK, TRAINING_MODE_NAME, GraphIndex, onnx

HOOK_CHILD = "gd_dropout"  # adapters.torch.layer.HOOK_CHILD (tests assert they agree)
_PASS_OPS = frozenset({"Cast", "Identity"})
_META = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values


@dataclass(frozen=True)
class Point:
    """Where a site goes: the tensor it drops, the site name, the producing node's position and
    the scope parts of the module the name comes from."""

    tensor: str
    name: str
    after: int
    scope: tuple[str, ...]
    ratio: float = 0.0  # the inserted node's ratio until apply sets it


def _parts(node: Any) -> tuple[str, ...]:
    parts = [p for p in node.name.strip("/").split("/") if p]
    return tuple(parts[:-1]) if node.name.startswith("/") else ()


def _returning(index: GraphIndex, tensor: str) -> tuple[str, ...] | None:
    """Scope parts of the outermost module that returned ``tensor`` (None: no module did, e.g.
    a function called at the root of the model)."""
    scope = _parts(index.nodes[index.producer[tensor]])
    readers = [_parts(index.nodes[i]) for i, _ in index.consumers.get(tensor, [])]
    if tensor in index.outputs:
        readers.append(())
    for k in range(1, len(scope) + 1):
        if any(r[:k] != scope[:k] for r in readers):
            return scope[:k]
    return None


def _upstream(index: GraphIndex, tensor: str) -> str:
    """Through ``Cast``/``Identity`` nodes that are the only reader of their input (the exporter
    records ``hidden.to(float32)`` at the start of an RMSNorm; torch's hook sees the input)."""
    while tensor in index.producer:
        node = index.nodes[index.producer[tensor]]
        if node.op_type not in _PASS_OPS or len(node.input) != 1:
            break
        src = node.input[0]
        data = [i for i, _ in index.consumers.get(src, []) if index.nodes[i].op_type not in _META]
        if src not in index.producer or len(data) != 1:
            break  # (Shape/Size readers of a training-mode export's dynamic axes do not count)
        tensor = src
    return tensor


def points(model: Any) -> tuple[list[Point], list[str]]:
    """``(points, skipped)``: where sites go in a graph without Dropout nodes, and the tensors
    the rule names but no module returned (the torch adapter has no hook site there either)."""
    from .dataflow import insertion_points, ops_of

    params = _g.param_table(model)
    ops, _ = ops_of(model, {k: v.name for k, v in params.items()}, lambda i, n: None)
    index = GraphIndex(model.graph)
    out: list[Point] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for raw in insertion_points(ops):
        tensor = _upstream(index, raw)
        if tensor not in index.producer or tensor in seen or _dropped(index, tensor):
            continue
        seen.add(tensor)
        scope = _returning(index, tensor)
        if scope is None:
            skipped.append(tensor)
            continue
        name = ".".join((*scope, HOOK_CHILD))
        out.append(Point(tensor, name, index.producer[tensor], scope))
    out.extend(_attention_points(index, seen))
    out.sort(key=lambda p: p.after)
    return _one_name_per_call(out), skipped


def _one_name_per_call(where: list[Point]) -> list[Point]:
    """A module whose residual branch is returned by several calls (a shared layer unrolled,
    ALBERT) gets one site as in torch: its second and later calls are named ``<site>_1``, ...,
    which discovery folds back into the first's site (the TorchScript exporter's own suffix for
    a module called again, :func:`adapters.onnx.graph.site_name`)."""
    seen: dict[str, int] = {}
    out = []
    for p in where:
        k = seen.get(p.name, 0)
        seen[p.name] = k + 1
        out.append(p if k == 0 else Point(p.tensor, f"{p.name}_{k}", p.after, p.scope))
    return out


def _dropped(index: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` is a Dropout node's output (a site is there already)."""
    i = index.producer.get(tensor)
    return i is not None and index.nodes[i].op_type == "Dropout"


def _weighting(index: GraphIndex, tensor: str, depth: int = 4) -> str | None:
    """The tensor that weights values in a MatMul (its first input), reached from ``tensor``
    through Cast/Identity/Where/Reshape (the math attention kernel's NaN guard
    ``Where(IsNaN(p), 0, p)``); None if no MatMul reads it so: not attention probabilities."""
    stack, seen = [(tensor, 0)], set()
    while stack:
        current, d = stack.pop()
        if current in seen or d > depth:
            continue
        seen.add(current)
        for i, j in index.consumers.get(current, []):
            node = index.nodes[i]
            if node.op_type == "MatMul" and j == 0:
                return current
            if node.op_type in ("Cast", "Identity", "Where", "Reshape"):
                stack.extend((o, d + 1) for o in node.output if o)
    return None


def _attention_points(index: GraphIndex, seen: set[str]) -> list[Point]:
    """Attention-probability sites: every Softmax inside a module whose result weights values
    in a MatMul, where torch applies the attention's dropout: on the tensor the MatMul reads
    (after the exporter's NaN guard, if any, as in torch's math kernel). Named
    ``<module>.dropout`` after the module that computes it (as a training-mode export names its
    functional Dropout node there, :func:`adapters.onnx.graph.site_name`)."""
    out = []
    for node in index.nodes:
        if node.op_type != "Softmax" or not node.output or node.output[0] in seen:
            continue
        scope = _parts(node)
        weights = _weighting(index, node.output[0]) if scope else None
        if weights is None or weights in seen:
            continue
        if any(
            index.nodes[k].op_type == "Dropout"
            for t in (node.output[0], weights)
            for k, _ in index.consumers.get(t, [])
        ):
            continue  # a Dropout node is there already (a zero attention rate, exported)
        seen.add(weights)
        out.append(Point(weights, ".".join((*scope, "dropout")), index.producer[weights], scope))
    return out


def _holds(site: str, other: str) -> bool:
    """Whether ``other`` (a site name) lies in the parent module of ``site``."""
    return "." in site and other.startswith(site.rsplit(".", 1)[0] + ".")


def _returned_in(index: GraphIndex, site: str) -> frozenset[str]:
    """The tensors a module inside ``site``'s parent module returns (a reader lies outside the
    module that made it): where a dropout module of that parent can act. Used for two profile
    sites guarding the same parameters (T5's ``encoder.dropout`` and ``decoder.dropout`` on the
    shared embedding), which parameters alone cannot place."""
    parent = tuple(site.split(".")[:-1])
    out = set()
    for t in index.producer:
        scope = _returning(index, t)
        if parent and scope is not None and scope[: len(parent)] == parent:
            out.add(t)
    return frozenset(out)


def bare_points(
    model: Any, ops: Any, wanted: dict[str, float], unclaimed: frozenset[str] = frozenset()
) -> list[Point]:
    """Points for profile sites that guard no parameter (a pooler's dropout on the first
    token, which nothing computed from parameters separates from the previous site): such a
    site acts in its parent module before the module's first parametrised op, so it is placed
    on that op's data input, found by the node scopes (``pooler.dropout``: the first node in
    scope ``pooler`` reading a parameter). ``wanted`` is ``{site: ratio}``: the profile has
    no score for such a site, so its node starts at the rate the source model gives it, which
    ``apply`` keeps (``missing="keep"``). Kept only where it guards nothing (or only
    ``unclaimed`` parameters) and leaves what every other site guards unchanged; a site
    without a parent module, or with no such place, gets no point (reported absent)."""
    from gd_core.dataflow import guarded, with_sites

    index = GraphIndex(model.graph)
    params = set(_g.param_table(model))
    before = {k: set(v) for k, v in guarded(ops).items()}
    made = {t for op in ops for t in op.outputs}
    out: list[Point] = []
    for site in wanted:
        parent = site.rsplit(".", 1)[0] if "." in site else ""
        if not parent:
            continue
        for node in index.nodes:
            scope = ".".join(_parts(node))
            if not (scope == parent or scope.startswith(parent + ".")):
                continue
            if not any(t in params for t in node.input):
                continue
            data = [t for t in node.input if t and t not in params and t not in index.inits]
            t = data[0] if data else ""
            if t in index.producer and t in made and not _dropped(index, t):
                got = {k: set(v) for k, v in guarded(with_sites(ops, {t: site})).items()}
                mine = got.pop(site, set())
                if mine <= unclaimed and got == before:
                    at = index.producer[t]
                    out.append(Point(t, site, at, _parts(node), float(wanted[site])))
            break
    return out


def profile_points(
    model: Any, infos: list[Any], table: Mapping[str, Any], prof: Any
) -> list[Point]:
    """Insertion points, named like the profile's sites, for the profile sites that the sites
    of a dropout-free graph do not make up (a classifier head's dropout off the residual
    stream, an FFN's inner dropout inside a residual branch, a rate holder called after the
    embeddings and after each attention): the tensors whose dropping guards exactly the part
    of their parameters no inserted site guards (:func:`gd_core.identity.covers`, with the
    inserted sites in place). An inserted site counts towards a profile site when what it
    guards lies in that profile site's set and no other's; together with the new points they
    make up the profile site, which :func:`_regroup` then merges into one site."""
    from gd_core.align import find_renaming
    from gd_core.dataflow import with_sites
    from gd_core.identity import covers

    from .dataflow import ops_of

    model_params = [p.name for p in table.values()]
    prof_params = [p for s in prof.sites for p in s.params]
    ren = find_renaming(prof_params, model_params) if prof_params and model_params else None
    if ren is None:
        return []
    known = set(model_params)
    # the part of each set the graph has (an exporter folds constants: a position table
    # sliced for a fixed-length example is no parameter of the graph)
    sets = {ren(s.name): frozenset(ren(p) for p in s.params) & known for s in prof.sites}
    sets = {n: f for n, f in sets.items() if f}
    have = [frozenset(i.site.params) for i in infos]
    names_of = {frozenset(i.site.params): i.site.name for i in infos}
    twins = {n for n, f in sets.items() if sum(f == g for g in sets.values()) > 1}
    want: dict[str, list[str]] = {}
    for name, full in sets.items():
        if full in have and (name not in twins or _holds(name, names_of[full])):
            continue
        mine = [h for h in have if h and h <= full and sum(h <= f for f in sets.values()) == 1]
        left = full - frozenset().union(*mine)
        if left:
            want[name] = sorted(left)
    named = {i.site.name for i in infos}
    bare = {
        ren(n): float(p)
        for n, p in unscored_rates(prof).items()
        if ren(n) not in named and 0.0 <= float(p) < 1.0
    }
    if not want and not bare:
        return []
    nodes = {n for info in infos for n in info.nodes}
    try:
        ops, _ = ops_of(
            model,
            {k: v.name for k, v in table.items()},
            lambda i, n: f"#{i}" if i in nodes else None,
        )
        claimed = {ren(p) for s in prof.sites for p in s.params}
        unclaimed = frozenset(known - claimed)
        index = GraphIndex(model.graph)
        scoped = {n: _returned_in(index, n) for n in want if n in twins}
        where = covers(ops, want, unclaimed=unclaimed, allowed=scoped)
        out = [  # before a Cast/Identity that is its one reader, as torch's module sees it
            Point(u, site, index.producer[u], ())
            for site, ts in where.items()
            for u in (_upstream(index, t) for t in ts)
            if u in index.producer
        ]
        if bare:  # sites guarding nothing: where their module acts, with the others in place
            placed = with_sites(ops, {p.tensor: p.name for p in out})
            out.extend(bare_points(model, placed, bare, unclaimed))
    except Exception:  # noqa: BLE001 - a graph the rule cannot read: the sites stay absent
        return []
    return sorted(out, key=lambda p: p.after)


def unscored_rates(prof: Any) -> dict[str, float]:
    """``{site: rate in the source model}`` of the sites the profile could not score (they
    guard no parameter; ``adapters.torch.profile`` records both in the metadata)."""
    unscored = dict(prof.metadata.get("unscored_sites") or {})
    rates = dict(prof.metadata.get("unscored_rates") or {})
    return {str(n): rates[n] for n in unscored if isinstance(rates.get(n), (int, float))}


def insert_in_place(model: Any, where: list[Point]) -> list[str]:
    """Insert one ``Dropout`` node per point (ratio 0.0, ``training_mode`` True); returns the
    site names. Every reader of a point's tensor reads the dropped tensor instead."""
    _g.check_dropout_opset(model, "model")
    index = GraphIndex(model.graph)
    taken = index.names()
    graph = model.graph
    after: dict[int, list[Any]] = {}
    inits = []
    mode = TRAINING_MODE_NAME
    if mode not in index.inits:
        mode = _g.unique_name(TRAINING_MODE_NAME, taken)
        inits.append(onnx.numpy_helper.from_array(np.array(True), mode))
    for p in where:
        ratio = _g.unique_name(f"{p.name}.ratio", taken)
        inits.append(onnx.numpy_helper.from_array(np.array(p.ratio, np.float32), ratio))
        dropped = _g.unique_name(f"{p.tensor}.{HOOK_CHILD}", taken)
        mask = _g.unique_name(f"{dropped}.mask", taken)
        for i, j in index.consumers.get(p.tensor, []):
            graph.node[i].input[j] = dropped
        node = onnx.helper.make_node(
            "Dropout",
            [p.tensor, ratio, mode],
            [dropped, mask],
            name=_g.unique_name("/" + "/".join((*p.name.split("."), "Dropout")), taken),
            doc_string=f"{INSERT_MARK}: {p.name}",
        )
        after.setdefault(p.after, []).append(node)
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    return [p.name for p in where]


def wanted(model: Any) -> bool:
    """Whether sites are to be inserted: the graph has no dropout, as the torch adapter decides
    for a model (``add_sites=None``): no Dropout node with a nonzero (or non-constant) ratio
    (a training-mode export of a model whose only dropout is a zero attention rate, e.g. Qwen2,
    has p = 0 Dropout nodes there), and no per-unit dropout (a graph ``apply`` rewrote at unit
    granularity has its sites already)."""
    if any(_g.gd_role(n) for n in model.graph.node):
        return False
    drops = [n for n in model.graph.node if n.op_type == "Dropout"]
    if not drops:
        return True
    if any(is_inserted(n) for n in drops):
        return False  # sites were inserted already (ratio 0 until apply sets them)
    index = GraphIndex(model.graph)
    return all(_g.dropout_state(index, n)[0] == 0.0 for n in drops)


def is_inserted(node: Any) -> bool:
    """Whether a Dropout node is one :func:`insert_in_place` made."""
    return node.doc_string.startswith(INSERT_MARK)


def insert_sites(model: Any, *, warn: bool = True) -> tuple[list[str], list[str]]:
    """Insert sites into a graph without Dropout nodes (in place): ``(site names, notes)``.

    Example:
        >>> from onnx import helper, TensorProto, numpy_helper
        >>> import numpy as np
        >>> w = numpy_helper.from_array(np.ones((4, 4), np.float32), "f.weight")
        >>> nodes = [helper.make_node("MatMul", ["x", "f.weight"], ["b"], name="/f/MatMul"),
        ...          helper.make_node("Add", ["x", "b"], ["y"], name="/Add")]
        >>> vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "xy"]
        >>> g = helper.make_graph(nodes, "g", vi[:1], vi[1:], [w])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        >>> insert_sites(m)
        (['f.gd_dropout'], [])
        >>> [n.op_type for n in m.graph.node]
        ['MatMul', 'Dropout', 'Add']
    """
    where, skipped = points(model)
    if skipped and not where:
        raise no_sites(
            "export with torch.onnx.export(..., dynamo=False), whose node names carry module "
            "scopes (/model/layers.0/mlp/down_proj/MatMul), or in training mode so that the "
            "Dropout nodes are kept",
            detail=f"{len(skipped)} residual branch(es) to insert sites on, but no node name says "
            f"which module returned them (e.g. {skipped[0]!r}), so no site could be named",
        )
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} insertion point(s) get no site: no module returned the tensor "
            f"(e.g. {skipped[0]!r}), so there is no name a torch profile would use (the torch "
            "adapter has no hook site there either)"
        )
        if warn:
            warnings.warn(notes[-1], stacklevel=3)
    tied = [
        (n.output[0], n.input[0])
        for n in model.graph.node
        if n.op_type == "Identity"
        and len(n.input) == 1
        and n.input[0] in {t.name for t in model.graph.initializer}
        and not n.output[0].startswith(("/", "onnx::"))
    ]
    if tied:
        notes.append(
            f"{len(tied)} parameter(s) are copies of another initializer (an eval-mode export "
            f"merges equal-valued initializers, e.g. {tied[0][0]} = {tied[0][1]}): they train as "
            "one and sites name the initializer kept; export a trained model, or in training mode"
        )
    return insert_in_place(model, where) if where else [], notes


__all__ = [
    "HOOK_CHILD",
    "Point",
    "bare_points",
    "insert_in_place",
    "insert_sites",
    "is_inserted",
    "points",
    "profile_points",
    "unscored_rates",
    "wanted",
]
