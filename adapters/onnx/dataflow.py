"""Dataflow facts of an ONNX graph for :mod:`gd_core.dataflow`.

Every node becomes an op reading its non-initializer inputs and owning the trainable initializers
it reads (directly, or through ``Transpose``/``Cast``/``Identity`` of an initializer). Dropout
nodes are sites (their ratio and training-mode inputs are not data); ``Shape``/``Size`` outputs
are treated as constants so that a reshape's target shape does not link back into the data path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gd_core.dataflow import Op, guarded, insertion_points, with_sites

_ALIAS_OPS = frozenset({"Transpose", "Cast", "Identity"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
_NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})


#: what a normalisation exported piecewise computes: a mean over the features, and the
#: square root (or reciprocal) of the variance or mean square it divides by
_STATISTIC_OPS = frozenset({"ReduceMean"})
_SCALE_OPS = frozenset({"Sqrt", "Reciprocal"})


def _scope(node: Any) -> str:
    parts = [p for p in node.name.strip("/").split("/") if p]
    return "/".join(parts[:-1])


def _norm_scopes(model: Any) -> set[str]:
    """Scopes whose own nodes compute a normalisation: a mean reduction and a square root (or
    reciprocal) of a statistic, as a LayerNorm or RMSNorm exported piecewise does (opset < 17:
    ``ReduceMean``, ``Sub``, ``Pow``, ``ReduceMean``, ``Add``, ``Sqrt``, ``Div``...). Decided
    from the ops the scope computes, not from what the module is called."""
    ops: dict[str, set[str]] = {}
    for node in model.graph.node:
        ops.setdefault(_scope(node), set()).add(node.op_type)
    return {s for s, kinds in ops.items() if s and kinds & _STATISTIC_OPS and kinds & _SCALE_OPS}


def ops_of(
    model: Any, params: Mapping[str, str], site_of: Callable[[int, Any], str | None]
) -> tuple[list[Op], dict[str, str]]:
    """``(ops, {op name: site name})`` of an ONNX model. ``params``: trainable initializer name
    -> canonical name; ``site_of(i, node)``: the site the Dropout node at position ``i``
    realises (``None``: not one).
    Ops get unique names (node names, or ``node_<i>``); a site realised by several nodes (a module
    called twice) maps several ops to one site name. The nodes of a normalisation module exported
    piecewise (opset < 17: ``ReduceMean``, ``Sub``, ``Pow``...) form one norm op; a ``Cast`` that
    opens it (``hidden.to(float32)`` in an RMSNorm) is an op of its own where the exporter hands
    its output to a node outside the norm too (the residual add)."""
    alias: dict[str, str] = dict(params)  # tensor -> canonical parameter it carries
    constants = {i.name for i in model.graph.initializer}
    ops: list[Op] = []
    site_ops: dict[str, str] = {}
    group: list[tuple[str, list[str], list[str], list[str]]] = []  # pending norm nodes
    group_scope = ""

    def flush() -> None:
        nonlocal group
        if not group:
            return
        made = {o for _, _, outs, _ in group for o in outs}
        ins = [t for _, data, _, _ in group for t in data if t not in made]
        owned = [p for *_, ps in group for p in ps]
        outs = [o for _, _, os_, _ in group for o in os_]
        ops.append(
            Op(group_scope, tuple(dict.fromkeys(ins)), outs, tuple(dict.fromkeys(owned)), norm=True)
        )
        group = []

    norm_scopes = _norm_scopes(model)
    read_in: dict[str, list[str]] = {}  # tensor -> scopes of the nodes reading it
    for node in model.graph.node:
        for t in node.input:
            read_in.setdefault(t, []).append(_scope(node))
    for i, node in enumerate(model.graph.node):
        name = f"{node.name or 'node'}#{i}"
        if node.op_type in _ALIAS_OPS and len(node.input) == 1 and node.input[0] in alias:
            for o in node.output:
                alias[o] = alias[node.input[0]]
            continue
        if node.op_type in _SHAPE_OPS or node.op_type == "Constant":
            constants.update(node.output)
            continue
        site = site_of(i, node) if node.op_type == "Dropout" else None
        ins = [t for t in node.input if t]
        if site is not None:
            data, owned = ins[:1], []
        else:
            data = [t for t in ins if t not in alias and t not in constants]
            owned = [alias[t] for t in ins if t in alias]
        outs = [o for o in node.output if o]
        if site is None and ins and not data and not owned:
            constants.update(outs)  # computed from constants only (shape arithmetic)
            continue
        scope = _scope(node)
        lead_cast = (
            node.op_type in _ALIAS_OPS
            and (scope != group_scope or not group)
            and any(r != scope for o in node.output for r in read_in.get(o, ()))
        )
        if site is None and not lead_cast and (scope in norm_scopes or node.op_type in _NORM_OPS):
            if scope != group_scope:
                flush()
                group_scope = scope or name
            group.append((name, data, outs, owned))
            continue
        flush()
        group_scope = ""
        add = node.op_type in ("Add", "Sum")
        op = Op(name, data, outs, tuple(dict.fromkeys(owned)), site=site is not None, add=add)
        ops.append(op)
        if site is not None:
            site_ops[name] = site
    flush()
    return ops, site_ops


def groups(ops: list[Op], site_ops: Mapping[str, str]) -> dict[str, list[str]]:
    """``{site: guarded canonical parameters}``; nodes of one site pool their groups."""
    out: dict[str, list[str]] = {}
    for op_name, params in guarded(ops).items():
        acc = out.setdefault(site_ops[op_name], [])
        acc.extend(p for p in params if p not in acc)
    return out


__all__ = ["groups", "insertion_points", "ops_of", "with_sites"]
