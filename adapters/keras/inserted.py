"""Sites inserted into a dropout-free Keras model (issue 23): the dataflow facts, and the hook.

A model whose forward calls no dropout layer (keras_hub's CLIP and SigLIP encoders, Gemma at its
presets' ``dropout=0``) gets sites where :func:`gd_core.dataflow.insertion_points` puts them, as
:mod:`adapters.torch` does: the embedding output and every residual branch before its add. The
residual adds of a keras_hub block happen inside its ``call``, not in the functional graph, so
the facts come from a trace of the model's call: one ``tf.function`` trace of a training
forward (TensorFlow backend), every op of it, with the variables each op reads (its captured
resources) named canonically, and every layer call's returned tensors recorded. Each leaf
layer's call (a ``Dense``, a norm) becomes one :class:`gd_core.dataflow.Op`; the other ops
(the residual adds among them) are ops of their own. Whether an op is an addition, a softmax or
a normalisation is read from the op types (``AddV2``; ``Softmax``; ``Rsqrt`` or ``Sqrt``), never
from layer names.

A point is installed on the layer whose call returns that tensor (the outermost one, below the
model): ``<layer>.gd_dropout``, a :class:`~adapters.keras.GuidedDropout` held by that layer
under the attribute ``gd_dropout`` (not tracked: the model keeps exactly its weights), which
the layer's call runs on its output (an instance ``call`` wrapper, :func:`hook`). A point
that no layer returns (an operation of the graph, e.g. Gemma's ``x * sqrt(hidden_dim)`` on
the embeddings) gets no site, and the sites' notes say so. How such a site is kept in a
``.keras`` file: :mod:`adapters.keras.holders`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gd_core.dataflow import Op, guarded, insertion_points, with_sites

from .calls import guessed_input
from .layer import HOOK, _children, keras

#: what a site inserted here is, in ``Site.kind`` and report rows (torch's name for it)
KIND = "hook"
_BYPASS: list[bool] = []  # non-empty while a trace reads the model without its hooks
_ADD = frozenset({"AddV2", "Add"})
_NORM = frozenset({"Rsqrt", "Sqrt"})


def hooked(layer: Any) -> Any | None:
    """The site ``layer`` holds under :data:`HOOK` (None: none)."""
    drop = vars(layer).get(HOOK) if hasattr(layer, "__dict__") else None
    return drop if isinstance(drop, keras.layers.Layer) else None


def hook(layer: Any, drop: Any, output: int = 0) -> None:
    """Make ``layer``'s call run ``drop`` on its output (the ``output``-th tensor of a structure);
    a second call replaces the dropout. Neither is tracked by Keras (a built layer takes no new
    sublayer), so the weights stay the model's own."""
    object.__setattr__(layer, HOOK, drop)
    object.__setattr__(layer, "_gd_hook_output", int(output))
    if "call" in vars(layer) and getattr(vars(layer)["call"], "_gd_hook", False):
        return
    original = layer.call

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        site = hooked(layer)
        if _BYPASS or site is None:
            return out
        flat = keras.tree.flatten(out)
        k = layer._gd_hook_output
        flat[k] = site(flat[k])  # training comes from the call context
        return keras.tree.pack_sequence_as(out, flat)

    call._gd_hook = True  # type: ignore[attr-defined]
    object.__setattr__(layer, "call", call)


@dataclass
class Flow:
    """One traced training forward: ops in execution order and, for tensors, what returned them."""

    ops: list[Op]
    #: tensor -> (the outermost layer below the model whose call returned it, its output index)
    out_of: dict[str, tuple[Any, int]] = field(default_factory=dict)
    #: tensor an installed hook drops -> the hook's site layer
    hooks: dict[str, Any] = field(default_factory=dict)
    units: dict[str, int | None] = field(default_factory=dict)  # tensor -> last dimension


def backend_ok() -> bool:
    return str(keras.backend.backend()) == "tensorflow"


def trace(
    model: Any,
    layers: Sequence[Any],
    variables: dict[str, Any],
    example: Any,
    sites: dict[int, str] | None = None,
) -> Flow:
    """Trace one training forward of ``model`` (TensorFlow backend) into ops. ``layers``: the
    layers to attribute ops to (not the model); ``variables``: ``{canonical name: variable}``
    of the weights ops own; ``sites``: ``{id(dropout layer): site name}`` of dropout layers in
    ``layers`` to trace as site ops (each call one op, an identity in the trace). Raises
    RuntimeError saying why where no trace can be made."""
    if not backend_ok():
        raise RuntimeError(
            f"inserting sites reads a traced TensorFlow graph; the Keras backend is "
            f"{keras.backend.backend()!r}"
        )
    import tensorflow as tf

    x = guessed_input(model) if example is None else example
    if x is None:
        raise RuntimeError("no input could be guessed from the model's input specs")
    records: list[tuple[Any, int, int, list[Any]]] = []
    site_calls: dict[int, tuple[str, str]] = {}  # record -> (site name, tensor it drops)
    sites = sites or {}
    patched: list[tuple[Any, Any]] = []
    for layer in layers:
        if id(layer) in {id(p) for p, _ in patched}:
            continue
        before = vars(layer).get("call")
        original = layer.call

        def counting(*args: Any, _call: Any = original, _layer: Any = layer, **kw: Any) -> Any:
            graph = tf.compat.v1.get_default_graph()
            start = len(graph.get_operations())
            site = sites.get(id(_layer))
            if site is not None:
                inp = args[0] if args else kw.get("inputs")
                out = tf.identity(inp)
                site_calls[len(records)] = (site, inp.name)
            else:
                out = _call(*args, **kw)
            records.append((_layer, start, len(graph.get_operations()), keras.tree.flatten(out)))
            return out

        object.__setattr__(layer, "call", counting)
        patched.append((layer, before))
    specs = keras.tree.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype), x)
    _BYPASS.append(True)
    try:
        graph = tf.function(lambda inp: model(inp, training=True)).get_concrete_function(specs)
        graph = graph.graph
    except Exception as exc:  # noqa: BLE001 - the caller says why no sites were inserted
        raise RuntimeError(
            f"the traced forward failed ({type(exc).__name__}: {exc!s:.160})"
        ) from exc
    finally:
        _BYPASS.pop()
        for layer, before in patched:
            object.__delattr__(layer, "call")
            if before is not None:
                object.__setattr__(layer, "call", before)
    handles = {}
    for name, var in variables.items():
        handle = getattr(getattr(var, "_value", var), "handle", None)
        if handle is not None:
            handles[id(handle)] = name
    # captured resource tensor -> canonical weight name
    resource = {i.name: handles[id(e)] for e, i in graph.captures if id(e) in handles}
    return _flow(graph, records, resource, site_calls)


def _flow(
    graph: Any,
    records: list[tuple[Any, int, int, list[Any]]],
    resource: dict[str, str],
    site_calls: dict[int, tuple[str, str]],
) -> Flow:
    ops = graph.get_operations()
    owner: list[int | None] = [None] * len(ops)  # innermost record whose call made the op
    for r in sorted(range(len(records)), key=lambda i: records[i][1] - records[i][2]):
        for i in range(records[r][1], records[r][2]):
            owner[i] = r  # larger (outer) calls first, inner ones write over them
    leaf = [all(c is hooked(rec[0]) for c in _children(rec[0])) for rec in records]
    flow = Flow([])
    members: dict[int, list[Any]] = {}
    for i, op in enumerate(ops):
        r = owner[i]
        if r is not None and leaf[r]:
            members.setdefault(r, []).append(op)
    emitted: set[int] = set()
    for i, op in enumerate(ops):
        r = owner[i]
        if r is not None and leaf[r]:
            if r in emitted or op is not members[r][-1]:
                continue
            emitted.add(r)
            if r in site_calls:
                outs = tuple(t.name for t in records[r][3])
                flow.ops.append(Op(site_calls[r][0], (site_calls[r][1],), outs, site=True))
                continue
            flow.ops.append(
                _group(f"{records[r][0].name}#{r}", members[r], records[r][3], resource)
            )
            continue
        ins, params = _reads(op, resource)
        if not ins and not params:
            continue  # constants and graph inputs: nothing to walk back to
        outs = tuple(t.name for t in op.outputs)
        flow.ops.append(
            Op(op.name, ins, outs, params, add=op.type in _ADD, softmax=op.type == "Softmax")
        )
    produced = {t for op in flow.ops for t in op.outputs}
    for layer, _, _, outs in records:  # inner calls end first: the outer ones write over them
        for k, t in enumerate(outs):
            name = getattr(t, "name", None)
            if name in produced:
                flow.out_of[name] = (layer, k)
                shape = getattr(t, "shape", None)
                last = None if not shape else shape[-1]
                flow.units[name] = None if last is None else int(last)
                site = hooked(layer)
                if site is not None and k == getattr(layer, "_gd_hook_output", 0):
                    flow.hooks[name] = site
    return flow


def _reads(op: Any, resource: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ins, params = [], []
    for t in op.inputs:
        if t.name in resource:
            params.append(resource[t.name])
        elif t.dtype.name != "resource":
            ins.append(t.name)
    return tuple(ins), tuple(params)


def _group(name: str, members: list[Any], returned: list[Any], resource: dict[str, str]) -> Op:
    """One leaf layer call as one op: what it reads from outside, what others read of it."""
    inside = {t.name for op in members for t in op.outputs}
    ids = {id(op) for op in members}
    back = {getattr(t, "name", None) for t in returned}
    ins: list[str] = []
    params: list[str] = []
    outs: list[str] = []
    for op in members:
        got, owned = _reads(op, resource)
        ins += [t for t in got if t not in inside and t not in ins]
        params += [p for p in owned if p not in params]
        for t in op.outputs:
            if t.name in back or any(id(c) not in ids for c in t.consumers()):
                outs.append(t.name)
    types = {op.type for op in members}
    return Op(
        name,
        tuple(ins),
        tuple(outs),
        tuple(params),
        norm=bool(types & _NORM) and bool(params),
        add=not params and bool(types & _ADD) and types <= _ADD | {"Identity", "Cast"},
        softmax="Softmax" in types,
    )


@dataclass
class Point:
    """An inserted site: its name, the layer whose output it drops and which output."""

    name: str
    layer: Any
    output: int
    tensor: str
    units: int | None


def points(flow: Flow, name_of: Callable[[Any], str]) -> tuple[list[Point], list[str]]:
    """The insertion points of a dropout-free model (``gd_core.dataflow.insertion_points``) on
    the layers returning them, and notes on those no layer returns."""
    out: list[Point] = []
    notes: list[str] = []
    taken: set[int] = set()
    for t in insertion_points(flow.ops):
        if t not in flow.out_of:
            notes.append(t)
            continue
        layer, k = flow.out_of[t]
        if id(layer) in taken:
            continue  # one site per layer (a layer called twice drops every call's output)
        taken.add(id(layer))
        out.append(Point(f"{name_of(layer)}.{HOOK}", layer, k, t, flow.units.get(t)))
    why = []
    if notes:
        why.append(
            f"{len(notes)} insertion point(s) are computed by an operation of the model, not "
            f"returned by a layer, so no dropout was inserted there (tensors {notes[:3]})"
        )
    return out, why


def groups(flow: Flow, at: dict[str, str]) -> dict[str, list[str]]:
    """What the sites at tensors ``at`` (``{tensor: site name}``) guard, by the one rule."""
    return guarded(with_sites(flow.ops, at))
