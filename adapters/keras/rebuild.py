"""A copy of a graph model with its dropout layers replaced, where ``keras.models.clone_model``
cannot make one (private; :func:`adapters.keras.apply` uses it).

``clone_model`` rebuilds every layer from its ``get_config()``; some keras_hub layers cannot be
(``LlamaTransformerDecoder.get_config`` reads an attribute it never sets; ``DeiTEmbeddings`` is
not deserializable from its own config). A keras_hub backbone is built again from *its* config
instead (``type(model).from_config(model.get_config())``, the way ``from_preset`` makes one), its
weights copied, and the dropout layers replaced in the copy: those held as attributes as for a
subclassed model (:func:`adapters.keras.holders._rewrite_in_place`), those that are nodes of the
functional graph by pointing their nodes at the new layer. The input model is left unchanged.

Keras names a layer made without a name from a process-wide counter, so a copy's layers can be
named ``moe_block_3`` where the original's are ``moe_block_1``; the copy's layers take the
original's names (by position in the layer tree, which the same config makes alike), and so do
its weights made without a name (SigLIP's attention-pooling probe: ``variable_1`` for
``variable``), so the copy has the original's canonical weight names and a profile of one applies to the other strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .discovery import ModelIndex, _fingerprint, _is_graph_model, is_site, own_weights
from .holders import _cannot_rewrite, _rewrite_in_place, _swap_tracked, carry, config_of


def _kind(layer: Any) -> str:
    return "site" if is_site(layer) else type(layer).__name__


def align_names(old: ModelIndex, new_model: Any) -> ModelIndex:
    """Give ``new_model``'s layers the names of ``old``'s at the same position of the layer tree
    (a copy of the same architecture; the model itself may differ: ``clone_model`` makes a
    keras_hub backbone a plain functional model); where the trees differ, nothing is renamed."""
    new = ModelIndex.build(new_model)
    if [_kind(x) for x in old.layers[1:]] != [_kind(x) for x in new.layers[1:]]:
        return new  # not laid out alike: the names stay (the caller compares the weights)
    renamed = False
    for a, b in zip(old.layers[1:], new.layers[1:], strict=True):
        if a.name != b.name:
            b.name = a.name
            renamed = True
        mine, theirs = own_weights(a), own_weights(b)
        if len(mine) != len(theirs):
            continue
        for va, vb in zip(mine, theirs, strict=True):  # weights made without a name, likewise
            if va.name != vb.name and tuple(va.shape) == tuple(vb.shape) and hasattr(vb, "_name"):
                vb._name = va.name
                renamed = True
    return ModelIndex.build(new_model) if renamed else new


def _swap_node(graph: Any, old: Any, new: Any) -> bool:
    """Point the nodes of functional ``graph`` that call ``old`` at ``new`` (False: none do)."""
    nodes = list(getattr(old, "_inbound_nodes", []))
    keys = getattr(graph, "_nodes", None)
    if not nodes or keys is None:
        return False
    ours = [i for i in range(len(nodes)) if f"{id(old)}_ib-{i}" in keys]
    if not ours:
        return False
    for node in nodes:
        node.operation = new
    new._inbound_nodes = nodes
    new._outbound_nodes = list(getattr(old, "_outbound_nodes", []))
    for i in ours:
        keys.discard(f"{id(old)}_ib-{i}")
        keys.add(f"{id(new)}_ib-{i}")
    ops = graph._operations
    for i, op in enumerate(ops):
        if op is old:
            ops[i] = new
    for group in getattr(graph, "_operations_by_depth", {}).values():
        for i, op in enumerate(group):
            if op is old:
                group[i] = new
    if hasattr(graph, "_nnx_op_mapping"):
        graph._setup_nnx_op_mapping()
    _swap_tracked(getattr(graph, "_tracker", None), old, new)
    return True


def rebuilt(model: Any, idx: ModelIndex, factories: Mapping[int, Callable[[], Any]]) -> Any:
    """A copy of graph ``model`` built from its config, weights copied, the site layers of
    ``factories`` (by id in ``idx``) replaced by what the factories make."""
    try:
        new_model = type(model).from_config(config_of(model))
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise _cannot_rewrite(
            model, f"the model could not be built again from its config ({exc!s:.200})"
        ) from exc
    new = align_names(idx, new_model)
    same = [_kind(x) for x in idx.layers[1:]] == [_kind(x) for x in new.layers[1:]]
    if not same or _fingerprint(new) != _fingerprint(idx):
        raise _cannot_rewrite(model, "the rebuilt model's weights differ from the original's")
    for name, var in idx.variables.items():
        new.variables[name].assign(var.value)
    made: dict[int, Any] = {}
    moved: dict[int, Callable[[], Any]] = {}
    for a, b in zip(idx.layers, new.layers, strict=True):
        if id(a) in factories:
            made[id(b)] = factories[id(a)]()
            moved[id(b)] = lambda b=b: made[id(b)]
    swapped: set[int] = set()
    for layer in new.layers:
        graph = new.parent.get(id(layer))
        if id(layer) in made and graph is not None and _is_graph_model(graph):
            if _swap_node(graph, layer, made[id(layer)]):
                swapped.add(id(layer))
    _rewrite_in_place(new_model, new, moved, done=swapped)
    for layer in new.layers[1:]:
        if new.contains_site(layer) and not is_site(layer):
            carry(layer)  # a layer making its own dropout layers keeps the new ones when saved
    return new_model
