"""Reading ONNX graphs: indexes, constants, parameter names (canonical, torch layout) and sites.

Only ``onnx`` and NumPy are imported here; graph edits are in :mod:`adapters.onnx.rewrite`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gd_core.errors import bad_argument
from gd_core.names import from_onnx_node
from gd_core.sites import Site

from .._lazy import require

onnx = require("onnx")
numpy_helper = require("onnx.numpy_helper")

#: element types that hold trainable weights
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)
#: nodes whose initializer inputs are the weights a dropout site guards
WEIGHT_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "Gather",
        "LayerNormalization",
        "Conv",
        "ConvTranspose",
        "Einsum",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
    }
)
#: ops an exporter puts between a weight initializer and the node that uses it
PARAM_TRANSFORMS = frozenset({"Transpose", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"})
#: ops whose output depends only on their input's shape: no gradient flows through them
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "EyeLike"})
DEFAULT_DOMAINS = ("", "ai.onnx")
#: newest model IR version onnxruntime(-training) 1.19 loads, and the newest ai.onnx opset it runs
MAX_IR_VERSION = 10
MAX_OPSET = 21
#: Dropout takes ``ratio`` and ``training_mode`` as inputs from this opset on
MIN_DROPOUT_OPSET = 12
TRAINING_MODE_NAME = "gd.training_mode"
INERT_RATIO_NAME = "gd.inert_ratio"
#: doc_string prefix of the Dropout nodes :mod:`adapters.onnx.insert` adds (``<mark>: <site>``)
INSERT_MARK = "guided-dropout inserted site"
#: doc_string prefixes marking the nodes ``apply(granularity="unit")`` adds
UNIT_MARK = "guided-dropout unit dropout"
MODE_MARK = "guided-dropout training-mode signal"
#: node-name infix of those nodes (a second marker, for tools that strip doc strings)
UNIT_INFIX = "/gd_unit_dropout/"
MODE_PREFIX = "/gd_training_signal/"
MODE_SIGNAL_NAME = "gd.training_signal"
#: elements of the mode-signal Dropout: in training mode all of them are dropped (which would
#: read as eval mode) with probability 2**-MODE_SIGNAL_SIZE
MODE_SIGNAL_SIZE = 128
#: element types RandomUniformLike draws (its T2), i.e. the types unit dropout supports
UNIT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def opset_of(model: Any) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return 0


def check_ort_compatible(model: Any, arg: str = "model_proto") -> None:
    """Raise an ArgumentError for a model onnxruntime-training 1.19 cannot load or train."""
    ir = int(model.ir_version)
    if ir > MAX_IR_VERSION:
        raise bad_argument(
            arg,
            f"an ONNX model with IR version <= {MAX_IR_VERSION} (the newest onnxruntime-training "
            "1.19, its last release, loads)",
            f"IR version {ir}",
            "export with onnx==1.17.0 installed (newer onnx packages write newer IR versions) "
            "and opset 14..17, or lower it with onnx.version_converter before saving",
        )
    opset = opset_of(model)
    if opset > MAX_OPSET:
        raise bad_argument(
            arg,
            f"an ai.onnx opset <= {MAX_OPSET} (what onnxruntime 1.19 implements)",
            f"opset {opset}",
            "re-export with opset_version=17 (or 14..16)",
        )


def check_dropout_opset(model: Any, arg: str = "model_proto") -> None:
    """Dropout with a ratio input (and a training-mode input) needs opset >= 12."""
    opset = opset_of(model)
    if 0 < opset < MIN_DROPOUT_OPSET:
        raise bad_argument(
            arg,
            f"an ai.onnx opset >= {MIN_DROPOUT_OPSET} (Dropout takes ratio and training_mode as "
            "inputs from opset 12 on)",
            f"opset {opset}",
            "re-export with opset_version=14..17",
        )


class GraphIndex:
    """Producers, consumers, initializers and Constant outputs of a graph (main graph only)."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for j, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, j))
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}

    def names(self) -> set[str]:
        """Every tensor and node name in the graph (for making new names unique)."""
        out = set(self.inits) | self.inputs | self.outputs
        for node in self.nodes:
            out.update(node.input)
            out.update(node.output)
            out.add(node.name)
        for vi in self.graph.value_info:
            out.add(vi.name)
        return out

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor that is an initializer or a Constant node's output, else None."""
        if not name:
            return None
        if name in self.inits and name not in self.inputs:
            return np.asarray(numpy_helper.to_array(self.inits[name]))
        i = self.producer.get(name)
        if i is None or self.nodes[i].op_type != "Constant":
            return None
        for attr in self.nodes[i].attribute:
            if attr.name == "value":
                return np.asarray(numpy_helper.to_array(attr.t))
            if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.asarray(onnx.helper.get_attribute_value(attr))
        return None


def gd_role(node: Any) -> str | None:
    """``"unit"`` / ``"mode"`` for nodes that unit granularity added, else None."""
    if node.doc_string.startswith(UNIT_MARK) or UNIT_INFIX in node.name:
        return "unit"
    if node.doc_string.startswith(MODE_MARK) or node.name.startswith(MODE_PREFIX):
        return "mode"
    return None


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken`` (which is updated)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A trainable initializer: its ONNX name, canonical (torch-style) name, and layout.

    ``transposed`` is True when the initializer holds the transpose of the canonical tensor
    (``torch.onnx`` with constant folding stores ``Linear.weight`` as a ``[in, out]``
    ``onnx::MatMul_N``); ``shape`` is the canonical (torch) shape.
    """

    onnx_name: str
    name: str
    shape: tuple[int, ...]
    transposed: bool = False
    note: str = ""


# exporter auto-names of folded weights: TorchScript's ``onnx::MatMul_N``, dynamo's ``val_N``
_AUTO_NAME = re.compile(r"^(onnx::[A-Za-z]+_\d+|val_\d+)$")


# torch's dynamo exporter names parameters by their module path (``bert.pooler.dense.weight``)
# and constants it folds by their FX node (``where``, ``embedding_1``, ``val_12``)
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_FX_NAME = re.compile(r"^[a-z_]+(_\d+)?$")


def _scope(node: Any) -> str | None:
    """The module path of a ``torch.onnx`` node (``/a/b/MatMul`` -> ``a.b``), None if unscoped."""
    if not node.name or "/" not in node.name.strip("/"):
        return None
    return from_onnx_node(node.name)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def param_table(model: Any) -> dict[str, Param]:
    """``{onnx name: Param}`` for every float initializer with at least one axis.

    Scalars are left out (exporters store constants such as ``sqrt(d)`` as 0-d initializers) and
    so are initializers used only as a Dropout ratio or as per-unit rates. ``torch.onnx``
    auto-names (``onnx::MatMul_N``) of a MatMul/Gemm weight are mapped back to
    ``<module path>.weight`` (and Gemm's bias to ``.bias``) from the consuming node's scope,
    transposed where the exporter stored ``W^T``.
    """
    index = GraphIndex(model.graph)
    taken = set(index.inits)
    out: dict[str, Param] = {}
    dynamo = any(p.key == _NAME_SCOPES for n in model.graph.node[:8] for p in n.metadata_props)
    for name, init in index.inits.items():
        if init.data_type not in FLOAT_TYPES or len(init.dims) == 0 or name in index.inputs:
            continue
        uses = index.consumers.get(name, [])
        if uses and all(index.nodes[i].op_type == "Dropout" and j > 0 for i, j in uses):
            continue
        if uses and all(gd_role(index.nodes[i]) is not None for i, _ in uses):
            continue  # per-unit dropout rates
        shape = tuple(int(d) for d in init.dims)
        param = Param(name, name, shape)
        if _AUTO_NAME.match(name):
            param = _canonical_auto(index, param, uses, taken)
        elif dynamo and _FX_NAME.match(name):
            continue  # a constant the dynamo exporter folded (an attention mask, a position slice)
        if dynamo and param.name == name and _FX_NAME.match(name):
            continue  # an unmapped ``val_N``: a folded constant, not a parameter
        out[name] = param
    return out


def _canonical_auto(
    index: GraphIndex, param: Param, uses: Sequence[tuple[int, int]], taken: set[str]
) -> Param:
    for i, j in uses:
        node = index.nodes[i]
        scope = _scope(node)
        if scope is None:
            continue
        if node.op_type == "MatMul" and j == 1:
            leaf, transposed = "weight", len(param.shape) == 2
        elif node.op_type == "Gemm" and j == 1:
            leaf, transposed = "weight", not bool(_attr(node, "transB", 0))
        elif node.op_type == "Gemm" and j == 2:
            leaf, transposed = "bias", False
        else:
            continue
        name = f"{scope}.{leaf}"
        if name in taken:
            return param
        taken.add(name)
        shape = param.shape[::-1] if transposed else param.shape
        note = (
            f"{param.onnx_name} holds {name} transposed ({list(param.shape)} = torch "
            f"{list(shape)} transposed); Fisher and shapes are reported in torch layout"
            if transposed
            else f"{param.onnx_name} is {name}"
        )
        return Param(param.onnx_name, name, shape, transposed, note)
    return param


def trace_param(index: GraphIndex, name: str, params: dict[str, Param]) -> str | None:
    """Follow ``name`` up through Transpose/Cast/Reshape... to a parameter initializer."""
    seen = 0
    while name and seen < 8:
        if name in params:
            return name
        i = index.producer.get(name)
        if i is None or index.nodes[i].op_type not in PARAM_TRANSFORMS:
            return None
        name = index.nodes[i].input[0] if index.nodes[i].input else ""
        seen += 1
    return None


# ---------------------------------------------------------------------------------------------
# sites
# ---------------------------------------------------------------------------------------------
@dataclass
class SiteHandle:
    """A dropout site and its ONNX handle (every adapter names this pair ``SiteHandle``): the
    Dropout nodes (indices) realising it, and their state."""

    site: Site
    nodes: list[int] = field(default_factory=list)
    ratio: float | None = None
    active: bool | None = None
    node_names: list[str] = field(default_factory=list)


def site_name(node: Any, k: int) -> str:
    """Canonical site name of a Dropout node (``k``: its position among Dropout nodes).

    A node in the scope of a module whose name says dropout (``/x/dropout/Dropout``) is that
    module (``x.dropout``). A Dropout in the scope of another module (``/x/self/Dropout``, the
    functional dropout transformers applies to attention probabilities with the
    ``self.dropout`` module's rate) is named ``x.self.dropout``, which is how the module holding
    that rate is named in PyTorch.
    """
    if node.doc_string.startswith(INSERT_MARK + ": "):
        return node.doc_string[len(INSERT_MARK) + 2 :]  # a site apply inserted, named there
    if not node.name:
        return f"dropout_{k}"
    parts = [p for p in node.name.strip("/").split("/") if p]
    base = from_onnx_node(node.name)
    functional = re.fullmatch(r"Dropout(_\d+)?", parts[-1]) is not None
    module_itself = "drop" in parts[-2].lower() or parts[-2].isdigit() if len(parts) > 1 else True
    if len(parts) > 1 and functional and not module_itself:
        return f"{base}.dropout"
    return base


def _is_true(value: np.ndarray | None) -> bool | None:
    if value is None or value.size != 1:
        return None
    return bool(value.reshape(()).item())


def dropout_state(index: GraphIndex, node: Any) -> tuple[float | None, bool | None]:
    """(ratio, training mode) of a Dropout node; None where not a constant."""
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        ratio = None if value is None or value.size != 1 else float(value.reshape(()).item())
    else:
        ratio = 0.5  # the ONNX default
    if len(node.input) > 2 and node.input[2]:
        active = _is_true(index.constant(node.input[2]))
    else:
        active = False  # no training_mode input: inference semantics, the node is inert
    return ratio, active


def guarded_params(index: GraphIndex, start: int, params: dict[str, Param]) -> list[str]:
    """ONNX names of the parameters upstream of Dropout node ``start`` back to the previous site.

    Walks producers backwards from the Dropout's data input, collecting parameters that weight
    nodes (MatMul, Gemm, Add, Mul, Gather, LayerNormalization...) consume, and stops at another
    Dropout (or per-unit dropout), a graph input, an initializer or a shape-only op (``Shape``:
    no gradient flows through it). The result is in graph order of the consuming node (then
    input position).
    """
    found: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    stack = [index.nodes[start].input[0]] if index.nodes[start].input else []
    while stack:
        name = stack.pop()
        i = index.producer.get(name)
        if i is None or i in seen:
            continue
        seen.add(i)
        node = index.nodes[i]
        if node.op_type == "Dropout" or node.op_type in SHAPE_OPS or gd_role(node):
            continue
        if node.op_type in WEIGHT_OPS:
            for j, inp in enumerate(node.input):
                p = trace_param(index, inp, params)
                if p is not None:
                    found[p] = min(found.get(p, (i, j)), (i, j))
        stack.extend(x for x in node.input if x)
    return sorted(found, key=lambda p: (found[p], p))


def discover(model: Any, exclusive: bool = True) -> tuple[list[SiteHandle], dict[str, Param]]:
    """Every Dropout node of the main graph grouped into sites (in graph order), plus params.

    Nodes with the same canonical name (one module called twice) form one site. With
    ``exclusive`` what a site guards is :mod:`gd_core.dataflow`'s rule (which never gives a
    parameter to two sites), or for a graph the rule cannot read the upstream walk with each
    parameter going to the first site in graph order; ``exclusive=False`` is the upstream walk
    with every site keeping all it reaches (a residual stream carries the output of every
    earlier normalisation layer to every later site).
    """
    index = GraphIndex(model.graph)
    params = param_table(model)
    shapes = _inferred_last_dims(model)
    infos: dict[str, SiteHandle] = {}
    guarded: dict[str, list[str]] = {}
    drops = [
        (i, node)
        for i, node in enumerate(index.nodes)
        if node.op_type == "Dropout" and node.domain in DEFAULT_DOMAINS and not gd_role(node)
    ]
    named = [site_name(node, k) for k, (_, node) in enumerate(drops)]
    for (i, node), name in zip(drops, _called_again(named), strict=True):
        ratio, active = dropout_state(index, node)
        info = infos.get(name)
        if info is None:
            info = infos[name] = SiteHandle(Site(name, kind="node"), ratio=ratio, active=active)
            guarded[name] = []
        elif info.ratio != ratio:
            info.ratio = None
        info.nodes.append(i)
        info.node_names.append(node.name)
        info.active = bool(info.active) or bool(active)
        for p in guarded_params(index, i, params):
            if p not in guarded[name]:
                guarded[name].append(p)
        units = shapes.get(node.input[0]) if node.input else None
        if info.site.units is None and units is not None:
            info.site = Site(name, kind="node", units=units)
    flow = _dataflow_groups(model, params, infos) if exclusive else None
    out = []
    claimed: set[str] = set()
    for name, info in infos.items():
        if flow is not None:
            info.site = Site(name, tuple(flow.get(name, ())), info.site.units, kind="node")
            out.append(info)
            continue
        mine = [p for p in guarded[name] if not (exclusive and p in claimed)]
        claimed.update(mine)
        canon = tuple(params[p].name for p in mine)
        info.site = Site(name, canon, info.site.units, kind="node")
        out.append(info)
    return out, params


def _called_again(names: list[str]) -> list[str]:
    """Names with the exporter's suffix for a module's second call folded back: the TorchScript
    exporter scopes the second call of ``classifier.dropout`` as ``classifier/dropout_1``; both
    calls are one module, so one site (as in torch), guarding what either call guards."""
    known = set(names)
    out = []
    for name in names:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        out.append(m.group(1) if m and m.group(1) in known else name)
    return out


def _dataflow_groups(
    model: Any, params: dict[str, Param], infos: dict[str, SiteHandle]
) -> dict[str, list[str]] | None:
    """What each site guards by the one rule of :mod:`gd_core.dataflow` (``None`` for a graph
    the rule cannot read, e.g. one with subgraphs; the older upstream walk is used then)."""
    from .dataflow import groups, ops_of

    by_node = {n: name for name, info in infos.items() for n in info.nodes}

    def site_of(i: int, node: Any) -> str | None:
        return by_node.get(i)

    order = {v.name: i for i, v in enumerate(params.values())}  # the exporter keeps torch's order
    try:
        ops, site_ops = ops_of(model, {k: v.name for k, v in params.items()}, site_of)
        found = groups(ops, site_ops)
    except Exception:  # noqa: BLE001 - fall back to the upstream walk
        return None
    return {k: sorted(v, key=lambda n: order.get(n, len(order))) for k, v in found.items()}


def _skeleton(model: Any, small: int = 64) -> Any:
    """``model`` for shape inference only: float initializers of more than ``small`` elements
    become typed graph inputs of the same shape (inference reads their shapes, not their values;
    serialising a model's weights for it took most of ``apply``'s time on large vocabularies).
    Small and integer initializers (reshape targets, indices) stay."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    big = [
        t
        for t in model.graph.initializer
        if t.data_type in floats and int(np.prod(t.dims, dtype=np.int64)) > small
    ]
    if not big:
        return model
    names = {t.name for t in big}
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(v for v in model.graph.input if v.name not in names)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big
    )
    graph.output.extend(model.graph.output)
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.CopyFrom(graph)
    return out


def _inferred_last_dims(model: Any) -> dict[str, int]:
    """Static last-axis sizes of tensors, from shape inference (empty if inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model))
    except Exception:  # noqa: BLE001 - units are optional information
        return {}
    out: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = int(dims[-1].dim_value)
    return out


def inferred_types(model: Any) -> dict[str, tuple[int, int | None]]:
    """``{tensor: (element type, static last-axis size or None)}`` from shape inference.

    Tensors of rank 0 or unknown rank have last-axis size None; empty if inference fails.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the caller falls back to site level
        return {}
    out: dict[str, tuple[int, int | None]] = {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input)
    values += list(inferred.graph.output)
    for vi in values:
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        dims = tt.shape.dim if tt.HasField("shape") else []
        last = int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else None
        out[vi.name] = (int(tt.elem_type), last)
    for init in model.graph.initializer:
        out.setdefault(init.name, (int(init.data_type), int(init.dims[-1]) if init.dims else None))
    return out


def from_softmax(index: GraphIndex, name: str, depth: int = 4) -> bool:
    """Whether ``name`` is a Softmax output, possibly through Cast/Identity/Where/Reshape.

    Such a tensor holds attention probabilities: its last axis is the key sequence, not features.
    """
    stack = [(name, 0)]
    seen: set[str] = set()
    while stack:
        current, d = stack.pop()
        if current in seen or d > depth:
            continue
        seen.add(current)
        i = index.producer.get(current)
        if i is None:
            continue
        node = index.nodes[i]
        if node.op_type in ("Softmax", "LogSoftmax"):
            return True
        if node.op_type in ("Cast", "Identity", "Reshape"):
            stack.append((node.input[0], d + 1))
        elif node.op_type == "Where":
            stack.extend((x, d + 1) for x in node.input[1:3] if x)
    return False


def example_model(ratio: float = 0.1, hidden: int = 4) -> Any:
    """A tiny ``torch.onnx``-style graph for examples: x -> Linear -> Dropout -> Linear -> y.

    The first weight is stored transposed as ``onnx::MatMul_7`` the way ``torch.onnx`` folds it;
    both Dropouts share one ratio constant, as some exporters do.
    """
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(hidden, hidden)).astype(np.float32)  # [in, out] = torch weight.T
    inits = [
        numpy_helper.from_array(w1, "onnx::MatMul_7"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "dense.bias"),
        numpy_helper.from_array(rng.normal(size=(2, hidden)).astype(np.float32), "head.weight"),
        numpy_helper.from_array(np.zeros(2, np.float32), "head.bias"),
        numpy_helper.from_array(np.array(ratio, np.float32), "shared_ratio"),
        numpy_helper.from_array(np.array(True), "train"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["h0"], name="/dense/MatMul"),
        helper.make_node("Add", ["h0", "dense.bias"], ["h1"], name="/dense/Add"),
        helper.make_node(
            "Dropout", ["h1", "shared_ratio", "train"], ["h2", "m1"], name="/dropout/Dropout"
        ),
        helper.make_node(
            "Gemm", ["h2", "head.weight", "head.bias"], ["h3"], transB=1, name="/head/Gemm"
        ),
        helper.make_node(
            "Dropout", ["h3", "shared_ratio", "train"], ["y", "m2"], name="/head_drop/Dropout"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "example",
        [helper.make_tensor_value_info("x", tp.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", tp.FLOAT, ["batch", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)
