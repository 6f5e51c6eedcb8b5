"""Dataflow facts of a Keras functional model for :mod:`gd_core.dataflow`.

Every layer call in the functional graph becomes an op reading the call's input tensors and owning
the layer's trainable weights; a ``MultiHeadAttention`` call is opened up into its query, key and
value projections, the scores, its dropout site, the product with the values and the output
projection, so that its dropout guards Q, K and V and the dropout after it the output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gd_core.dataflow import Op

from .layer import keras


def _tid(t: Any) -> str:
    return f"k{id(t)}"


def _mha_ops(
    op: Any, node: Any, outs: list[str], weights: Callable[[Any], list[str]], site: str | None
) -> list[Op]:
    args = list(node.arguments.args)
    kwargs = dict(node.arguments.kwargs)
    query = args[0] if args else kwargs.get("query")
    value = args[1] if len(args) > 1 else kwargs.get("value")
    key = args[2] if len(args) > 2 else kwargs.get("key")
    key = value if key is None else key
    p = f"mha{id(op)}"
    q, k, v, s, sd, c = (f"{p}#{x}" for x in ("q", "k", "v", "s", "sd", "c"))
    mask = [_tid(t) for t in node.arguments.keras_tensors if t is not query and t is not value]
    mask = [m for m in mask if key is None or m != _tid(key)]
    ops = [
        Op(f"{p}.query", (_tid(query),), (q,), tuple(weights(op._query_dense))),
        Op(f"{p}.key", (_tid(key),), (k,), tuple(weights(op._key_dense))),
        Op(f"{p}.value", (_tid(value),), (v,), tuple(weights(op._value_dense))),
        Op(f"{p}.scores", (q, k, *mask), (s,)),
    ]
    if site is not None:
        ops.append(Op(site, (s,), (sd,), site=True))
    else:
        ops.append(Op(f"{p}.softmax", (s,), (sd,)))
    ops.append(Op(f"{p}.context", (sd, v), (c,)))
    ops.append(Op(f"{p}.output", (c,), tuple(outs), tuple(weights(op._output_dense))))
    return ops


def ops_of(
    graph_model: Any,
    weights: Callable[[Any], list[str]],
    site_of: Callable[[Any], str | None],
    trailing: Callable[[Any], list[str] | None] = lambda layer: None,
) -> list[Op]:
    """Ops of a functional model's graph in execution order. ``weights(layer)``: canonical names
    of the trainable weights a layer (with its sublayers) holds; ``site_of(layer)``: the site a
    layer is (``None``: not one); ``trailing(layer)``: for a layer holding dropout sites of its
    own (keras_hub's ``TransformerEncoder``), the weights after its last inner site (``None``:
    it holds none).

    A layer holding sites is a boundary, like a site: its inner sites guard what comes before
    them inside it (the layer-order rule), so what it reads is not joined with its weights (an
    embedding dropout feeding a transformer layer guards the embeddings only), and only its
    weights after its last inner site belong to a site downstream."""
    ops: list[Op] = []
    k = 0
    for depth in sorted(graph_model._nodes_by_depth, reverse=True):
        for node in graph_model._nodes_by_depth[depth]:
            op = node.operation
            if isinstance(op, keras.layers.InputLayer):
                continue
            ins = [_tid(t) for t in node.arguments.keras_tensors]
            outs = [_tid(t) for t in node.outputs]
            if isinstance(op, keras.layers.MultiHeadAttention):
                ops += _mha_ops(op, node, outs, weights, site_of(op._dropout_layer))
                continue
            site = site_of(op)
            k += 1
            if site is not None:
                ops.append(Op(site, ins[:1], outs, site=True))
                continue
            tail = trailing(op)
            if tail is not None:
                name = f"{getattr(op, 'name', 'op')}#{k}"
                mid = [f"{name}#inner"]
                ops.append(Op(f"{name}#sites", ins, mid if tail else outs, site=True))
                if tail:
                    ops.append(Op(f"{name}#tail", mid, outs, tuple(tail)))
                continue
            params = weights(op) if isinstance(op, keras.layers.Layer) else []
            norm = "Normalization" in type(op).__name__ and "Batch" not in type(op).__name__
            add = type(op).__name__ == "Add"  # keras.layers.Add and the `x + y` operation
            name = f"{getattr(op, 'name', 'op')}#{k}"
            ops.append(Op(name, ins, outs, tuple(params), norm=norm, add=add))
    return ops
