"""Module scopes of torch's default (dynamo) exporter, read from node metadata.

The TorchScript exporter names each node by the module path that emitted it
(``/bert/encoder/layer.0/attention/self/Softmax``); discovery, parameter names and inserted sites
are built from those names. torch's default exporter (``torch.onnx.export(..., dynamo=True)``,
the default since torch 2.9) names nodes ``node_softmax`` and records the module path in each
node's ``metadata_props`` instead: ``pkg.torch.onnx.name_scopes`` is the list of module paths from
the root (``['', 'bert', 'bert.encoder', 'bert.encoder.layer.0', ..., 'softmax']``, the last
entry being the FX node). :func:`with_scopes` gives such a graph TorchScript-style node names so
that every path of the adapter reads it the same way.
"""

from __future__ import annotations

import ast
from typing import Any

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _module_parts(value: str) -> tuple[str, ...] | None:
    """``('bert', 'encoder', 'layer.0')`` from a name_scopes entry; None if unreadable."""
    try:
        scopes = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return None
    modules = [s for s in scopes[:-1] if s]  # the last entry is the FX node, '' the root
    parts: list[str] = []
    prev = ""
    for path in modules:
        if prev and path.startswith(prev + "."):
            parts.append(path[len(prev) + 1 :])
        elif not prev:
            parts.append(path)
        else:
            return None  # not a chain of nested modules
        prev = path
    return tuple(parts)


def has_metadata_scopes(model: Any) -> bool:
    """Whether the graph's nodes carry dynamo module scopes and no TorchScript scoped names."""
    nodes = model.graph.node
    if any(n.name.startswith("/") for n in nodes):
        return False
    return any(p.key == NAME_SCOPES for n in nodes for p in n.metadata_props)


def with_scopes(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` whose nodes are named ``/<module parts>/<OpType>`` from their
    metadata (unique names; nodes without metadata keep theirs), and the number renamed. A
    graph without dynamo scopes is returned as is (0)."""
    if not has_metadata_scopes(model):
        return model, 0
    from .graph import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node}
    count: dict[str, int] = {}
    renamed = 0
    for node in out.graph.node:
        value = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
        parts = _module_parts(value) if value is not None else None
        if parts is None:
            continue
        base = "/" + "/".join((*parts, node.op_type))
        k = count.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        count[base] = k + 1
        taken.add(name)
        node.name = name
        renamed += 1
    return out, renamed


__all__ = ["NAME_SCOPES", "has_metadata_scopes", "with_scopes"]
