"""Which tensors of an ORT training graph give per-sample gradients in closed form (private).

ORT's gradient builder names the gradient of a forward tensor ``Y`` ``Y_grad``. For each forward
use of a trained parameter that a closed-form rule covers (MatMul, Gemm, Add/Sub, Mul, Gather,
LayerNormalization; see :class:`Use`) the use's output gradient and, where the rule needs it, its
other input are made extra graph outputs (:func:`add_taps`, through ``Identity`` nodes whose
names hold no ``_grad``: ORT's Module takes outputs named ``*_grad*`` for gradient buffers).
Every other use makes its parameter fall back, with the reason (:func:`plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .graph import DEFAULT_DOMAINS, PARAM_TRANSFORMS, SHAPE_OPS, GraphIndex, _attr, onnx, opset_of

TAP_PREFIX = "gd.tap."
#: ops between an initializer and its use that the rules map gradients back through
_CHAIN_OPS = PARAM_TRANSFORMS | {"Slice"}
GRAD_SUFFIX = "_grad"


@dataclass
class Use:
    """One forward use of a trained parameter, with the rule that gives its per-sample gradient.

    ``kind``: ``matmul`` (``x @ W``), ``gemm`` (``alpha * x @ op(W)``, ``trans``: transB),
    ``bias`` (``W`` added, or subtracted with ``scale`` -1; Gemm's C with ``scale`` beta;
    LayerNormalization's bias), ``mul`` (``x * W``), ``gather`` (rows ``x`` of ``W``),
    ``ln_scale`` (LayerNormalization's scale; ``axis``, ``eps``). ``y``: the tensor whose gradient
    the rule reads; ``x``: the forward tensor it reads. ``chain``: the ``(op, attribute, shape
    before)`` steps (Transpose, Reshape, Slice, Cast...) from the initializer to the node, whose last
    shape is ``shape``. ``alt_y``: for a Gather whose indices carry no batch axis (position
    embeddings), the Add that broadcasts its output over the batch. ``sq``: the graph output
    that holds the sums over the batch of the squared per-sample gradients, computed in the
    graph (a weight whose one use is a MatMul: ORT's MatMul is much faster than NumPy's
    per-sample products, and neither ``x`` nor the gradient leave the graph).
    """

    param: str
    kind: str
    node: str
    y: str
    x: str = ""
    shape: tuple[int, ...] = ()
    chain: list[tuple[str, Any, tuple[int, ...]]] = field(default_factory=list)
    scale: float = 1.0
    trans: bool = False
    axis: int = -1
    eps: float = 1e-5
    alt_y: str = ""
    batch_free: bool | None = None
    sq: str = ""  # in-graph squared per-sample sums (the graph output's name), see add_taps


@dataclass
class Plan:
    """Uses per covered parameter, reasons per parameter that falls back, and the taps."""

    uses: dict[str, list[Use]]
    fallback: dict[str, str]
    forward: list[str]  # forward tensors to tap
    grads: list[str]  # forward tensors whose gradient (``<name>_grad``) to tap
    mean: bool = True  # the loss averages over the batch


def forward_nodes(index: GraphIndex, loss: str) -> set[int]:
    """Positions of the nodes the loss depends on (the gradient nodes are not among them)."""
    out: set[int] = set()
    todo = [loss]
    while todo:
        i = index.producer.get(todo.pop())
        if i is None or i in out:
            continue
        out.add(i)
        todo.extend(n for n in index.nodes[i].input if n)
    return out


def loss_is_mean(index: GraphIndex, loss: str) -> bool:
    """Whether the loss averages over the batch (``mean`` reduction): per-sample gradients of the
    output are then the batch gradient's times the batch size. Unknown reductions read as mean;
    the engine's first-batch check against the exact loop catches a wrong guess."""
    i = index.producer.get(loss)
    seen = 0
    while i is not None and seen < 4:
        node = index.nodes[i]
        if node.op_type == "ReduceSum":
            return False
        reduction = _attr(node, "reduction")
        if reduction is not None:
            return (reduction.decode() if isinstance(reduction, bytes) else reduction) != "sum"
        if node.op_type == "ReduceMean":
            return True
        if node.op_type not in ("Identity", "Cast", "Mul", "Div"):
            return True
        i = index.producer.get(node.input[0])
        seen += 1
    return True


def _view(shape: Sequence[int]) -> np.ndarray:
    """A zero-stride array of ``shape`` (no memory): NumPy works out reshapes and transposes."""
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


def _axes(index: GraphIndex, node: Any) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _slices(index: GraphIndex, node: Any, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The NumPy index of a Slice (opset >= 10: bounds as inputs) with constant bounds."""
    bounds = [index.constant(n) if n else None for n in list(node.input[1:5])]
    if len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    if any(b is None for k, b in enumerate(bounds) if node.input[1 + k]):
        return None
    starts, ends = (np.reshape(b, -1).tolist() for b in bounds[:2])
    axes = np.reshape(bounds[2], -1).tolist() if len(bounds) > 2 and bounds[2] is not None else None
    steps = (
        np.reshape(bounds[3], -1).tolist() if len(bounds) > 3 and bounds[3] is not None else None
    )
    out = [slice(None)] * len(shape)
    for k, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        axis = int(axes[k]) % len(shape) if axes is not None else k
        step = int(steps[k]) if steps is not None else 1
        out[axis] = slice(int(lo), int(hi), step)  # NumPy clamps out-of-range bounds as ONNX does
    return tuple(out)


def _step(index: GraphIndex, node: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """``(attribute, shape after)`` of one Transpose/Reshape/... step; a str: why it can't."""
    op, view = node.op_type, _view(shape)
    if op in ("Cast", "Identity"):
        return None, shape
    if op == "Transpose":
        perm = _attr(node, "perm") or list(range(len(shape)))[::-1]
        return [int(p) for p in perm], tuple(np.transpose(view, perm).shape)
    if op == "Reshape":
        target = index.constant(node.input[1]) if len(node.input) > 1 else None
        if target is None or _attr(node, "allowzero", 0):
            return f"its {op} {node.name!r} takes a computed shape", shape
        dims = [shape[k] if int(d) == 0 else int(d) for k, d in enumerate(np.reshape(target, -1))]
        return None, tuple(view.reshape(dims).shape)
    if op == "Slice":
        got = _slices(index, node, shape)
        if got is None:
            return f"its {op} {node.name!r} takes computed bounds", shape
        return got, tuple(view[got].shape)
    axes = _axes(index, node)
    if op == "Unsqueeze" and axes is not None:
        return None, tuple(np.expand_dims(view, tuple(axes)).shape)
    if op == "Squeeze":
        squeezed = np.squeeze(view) if axes is None else np.squeeze(view, tuple(axes))
        return None, tuple(squeezed.shape)
    return f"its {op} {node.name!r} takes computed axes", shape


def _classify(index: GraphIndex, node: Any, j: int, use: Use, fwd: set[int]) -> Use | str:
    op, y = node.op_type, node.output[0]
    label = f"{op} node {node.name or y!r}"
    if node.domain not in DEFAULT_DOMAINS:
        return f"used by {label} of domain {node.domain!r}, which no per-sample rule covers"
    use.y, use.node = y, label
    if op == "MatMul" and j == 1 and len(use.shape) == 2:
        use.kind, use.x = "matmul", node.input[0]
    elif op == "Gemm" and j == 1 and not _attr(node, "transA", 0):
        use.kind, use.x = "gemm", node.input[0]
        use.scale, use.trans = float(_attr(node, "alpha", 1.0)), bool(_attr(node, "transB", 0))
    elif op == "Gemm" and j == 2:
        use.kind, use.scale = "bias", float(_attr(node, "beta", 1.0))
    elif op in ("Add", "Sub") and j in (0, 1):
        use.kind, use.scale = "bias", -1.0 if (op == "Sub" and j == 1) else 1.0
    elif op == "Mul" and j in (0, 1) and node.input[0] != node.input[1]:
        use.kind, use.x = "mul", node.input[1 - j]
    elif op == "Gather" and j == 0 and int(_attr(node, "axis", 0)) == 0:
        use.kind, use.x = "gather", node.input[1]
        users = [index.nodes[i] for i, _ in index.consumers.get(y, []) if i in fwd]
        if len(users) == 1 and users[0].op_type == "Add":
            use.alt_y = users[0].output[0]
    elif op == "LayerNormalization" and j in (1, 2):
        if j == 2:
            use.kind = "bias"
        else:
            use.kind, use.x = "ln_scale", node.input[0]
            use.axis, use.eps = int(_attr(node, "axis", -1)), float(_attr(node, "epsilon", 1e-5))
    else:
        return f"used by {label} as input {j}, which no per-sample rule covers"
    return use


def _uses(index: GraphIndex, name: str, shape: tuple[int, ...], fwd: set[int]) -> list[Use] | str:
    out: list[Use] = []
    todo: list[tuple[str, tuple[int, ...], list[Any]]] = [(name, shape, [])]
    while todo:
        tensor, shp, chain = todo.pop()
        for i, j in index.consumers.get(tensor, []):
            node = index.nodes[i]
            if i not in fwd or node.op_type in SHAPE_OPS:
                continue  # a gradient node, or no gradient flows
            if node.op_type in _CHAIN_OPS and j == 0 and node.domain in DEFAULT_DOMAINS:
                attr, after = _step(index, node, shp)
                if isinstance(attr, str):
                    return f"reaches its use through a step the rules cannot map back: {attr}"
                todo.append((node.output[0], after, [*chain, (node.op_type, attr, shp)]))
                continue
            got = _classify(index, node, j, Use(name, "", "", "", shape=shp, chain=chain), fwd)
            if isinstance(got, str):
                return got
            out.append(got)
    return out  # empty: the loss does not reach it (zero gradient)


def _unequal_weights(index: GraphIndex, fwd: set[int]) -> str:
    """Why samples may weigh differently in the loss's batch mean ("" when they do not): a
    cross-entropy with ``ignore_index`` or class weights averages over the targets it keeps,
    so a sample's share is not 1 / batch size."""
    for i in sorted(fwd):
        node = index.nodes[i]
        if node.op_type not in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"):
            continue
        reduction = _attr(node, "reduction")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction in (None, "mean") and (
            _attr(node, "ignore_index") is not None or (len(node.input) > 2 and node.input[2])
        ):
            return (
                f"the loss ({node.op_type}) averages over the targets it keeps (ignore_index or "
                "class weights), so per-sample shares of the batch mean are unequal"
            )
    return ""


def plan(model: Any, trained: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """The uses of every trained parameter of the training graph ``model``, or why it falls back.

    Example:
        >>> from onnx import TensorProto, helper
        >>> nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
        ...          helper.make_node("ReduceMean", ["y"], ["loss"]),
        ...          helper.make_node("Identity", ["seed"], ["y_grad"])]  # ORT's gradient name
        >>> out = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])]
        >>> m = helper.make_model(helper.make_graph(nodes, "g", [], out))
        >>> p = plan(m, ["W"], {"W": (4, 2)})
        >>> [(u.kind, u.x, u.y) for u in p.uses["W"]], p.fallback, p.mean
        ([('matmul', 'x', 'y')], {}, True)
        >>> list(add_taps(m, p)), m.graph.output[-1].name  # its squares summed in the graph
        (['gd.tap.sq.0'], 'gd.tap.sq.0')
    """
    index = GraphIndex(model.graph)
    loss = model.graph.output[0].name
    fwd = forward_nodes(index, loss)
    produced = set(index.producer)
    uses: dict[str, list[Use]] = {}
    fallback: dict[str, str] = {}
    weighted = _unequal_weights(index, fwd)
    if weighted:  # a batch mean over unequal counts: scaling by the batch size is not exact
        return Plan({}, dict.fromkeys(trained, weighted), [], [], loss_is_mean(index, loss))
    for name in trained:
        got = _uses(index, name, tuple(shapes[name]), fwd)
        if isinstance(got, str):
            fallback[name] = got
            continue
        lacking = [
            u.y
            for u in got
            if u.y + GRAD_SUFFIX not in produced
            and not (u.alt_y and u.alt_y + GRAD_SUFFIX in produced)
        ]
        if lacking:
            fallback[name] = f"the training graph holds no gradient tensor of {lacking[0]!r}"
            continue
        uses[name] = got
    for group in uses.values():
        if len(group) == 1 and group[0].kind == "matmul":
            group[0].sq = "pending"
    forward, grads = [], []
    for group in uses.values():
        for u in group:
            if u.sq:
                continue
            if u.x:
                forward.append(u.x)
            for t in (u.y, u.alt_y):
                if t and t + GRAD_SUFFIX in produced:
                    grads.append(t)
    return Plan(
        uses,
        fallback,
        list(dict.fromkeys(forward)),
        list(dict.fromkeys(grads)),
        loss_is_mean(index, loss),
    )


#: ``Use.sq`` of a weight whose squared per-sample sums replace its batch gradient in ORT's
#: gradient buffer (read from ``state.parameters[name].grad``; see :func:`add_taps`)
IN_BUFFER = "@gradient-buffer"
_BUFFER_SUFFIX = "_grad.accumulation.buffer"
_MAPPABLE = frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity"})


def add_taps(model: Any, p: Plan, into_buffers: bool = True) -> dict[str, str]:
    """Make the planned tensors extra outputs of ``model`` (in place); returns ``{output name:
    tensor}`` (a gradient as ``<tensor>_grad``; in-graph squared sums as their own name).

    A single-use MatMul weight gets, in the graph: ``x`` and ``dY`` reshaped to ``[B, -1, in]``
    and ``[B, -1, out]``, ``x^T @ dY`` per sample (float32, as ORT's own gradient), its squares
    summed over the batch (``ReduceSumSquare``, float32: a relative rounding of at most
    ``B * 2**-24``; float64 would triple the memory traffic of the step). With ``into_buffers``
    (and a chain of Transpose/Reshape/Squeeze/Unsqueeze/Identity back to the initializer) these
    sums, mapped back to the initializer's layout, are fed to the weight's gradient accumulator
    in place of its batch gradient, whose nodes (``x^T @ dY`` over the whole batch) are removed:
    the step computes the per-sample products *instead of* the batch product, and the sums are
    read from ``state.parameters[name].grad`` (``Use.sq`` is :data:`IN_BUFFER`; such a module's
    gradients are no longer the loss's, so the exact loop must run on an untapped module).
    Otherwise the sums are the graph output ``gd.tap.sq.<k>`` of shape ``[in, out]``.
    """
    helper = onnx.helper
    taps: dict[str, str] = {}
    nodes, outputs = [], []
    taken = {o.name for o in model.graph.output} | {
        n for node in model.graph.node for n in node.output
    }

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    for k, tensor in enumerate([*p.forward, *(t + GRAD_SUFFIX for t in p.grads)]):
        name = fresh(f"{TAP_PREFIX}{k}")
        taps[name] = tensor
        nodes.append(helper.make_node("Identity", [tensor], [name], name=f"/gd_tap/{k}"))
        outputs.append(onnx.ValueInfoProto(name=name))
    opset = opset_of(model)
    in_graph = [u for group in p.uses.values() for u in group if u.sq]
    accumulators = {
        node.input[0][: -len(_BUFFER_SUFFIX)]: node
        for node in model.graph.node
        if node.op_type == "InPlaceAccumulatorV2"
        and len(node.input) > 1
        and node.input[0].endswith(_BUFFER_SUFFIX)
    }
    replaced: list[str] = []

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = fresh(f"{TAP_PREFIX}sq.{op}.{len(nodes)}")
        nodes.append(helper.make_node(op, inputs, [out], name=f"/gd_tap/{op}{len(nodes)}", **attrs))
        return out

    def const(values: Sequence[int]) -> str:
        return node(
            "Constant", [], value=onnx.numpy_helper.from_array(np.asarray(values, np.int64))
        )

    for k, u in enumerate(in_graph):
        xs = node("Reshape", [u.x, const([0, -1, u.shape[0]])])
        ds = node("Reshape", [u.y + GRAD_SUFFIX, const([0, -1, u.shape[1]])])
        g = node("MatMul", [node("Transpose", [xs], perm=[0, 2, 1]), ds])
        if opset >= 18:
            total = node("ReduceSumSquare", [g, const([0])], keepdims=0)
        else:
            total = node("ReduceSumSquare", [g], axes=[0], keepdims=0)
        acc = accumulators.get(u.param)
        if into_buffers and acc is not None and all(op in _MAPPABLE for op, _, _ in u.chain):
            for op, attr, before in reversed(u.chain):
                if op == "Transpose":
                    total = node("Transpose", [total], perm=[int(a) for a in np.argsort(attr)])
                elif op != "Identity":
                    total = node("Reshape", [total, const(list(before))])
            replaced.append(acc.input[1])
            acc.input[1] = total
            u.sq = IN_BUFFER
            continue
        name = fresh(f"{TAP_PREFIX}sq.{k}")
        nodes.append(helper.make_node("Identity", [total], [name], name=f"/gd_tap/sq{k}"))
        outputs.append(onnx.ValueInfoProto(name=name))
        u.sq = taps[name] = name
    model.graph.node.extend(nodes)
    model.graph.output.extend(outputs)
    _drop_dead(model.graph, replaced)
    return taps


def _drop_dead(graph: Any, names: Iterable[str]) -> None:
    """Remove the nodes that computed ``names`` and, recursively, their inputs' producers, as far
    as nothing else (a node, a graph output) reads them (the batch gradients replaced above)."""
    index = GraphIndex(graph)
    readers = {k: len(v) for k, v in index.consumers.items()}
    dead: set[int] = set()
    todo = list(names)
    while todo:
        tensor = todo.pop()
        i = index.producer.get(tensor)
        if i is None or i in dead or tensor in index.outputs:
            continue
        node = index.nodes[i]
        if any(readers.get(o, 0) or o in index.outputs for o in node.output if o):
            continue
        dead.add(i)
        for name in node.input:
            if name:
                readers[name] -= 1
                todo.append(name)
    if dead:
        keep = [n for i, n in enumerate(index.nodes) if i not in dead]
        del graph.node[:]
        graph.node.extend(keep)
