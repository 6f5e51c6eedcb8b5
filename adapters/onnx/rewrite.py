"""Editing ONNX graphs: per-unit dropout subgraphs, the training-mode signal, repairs for ORT
training (declared optional outputs), seeds, pruning, and the per-unit rewrite of ``apply``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gd_core.errors import bad_argument
from gd_core.report import ReportRow
from gd_core.validate import check_rates

from . import graph as _g
from .graph import (
    DEFAULT_DOMAINS,
    INERT_RATIO_NAME,
    MODE_MARK,
    MODE_PREFIX,
    MODE_SIGNAL_NAME,
    MODE_SIGNAL_SIZE,
    UNIT_INFIX,
    UNIT_MARK,
    GraphIndex,
    SiteHandle,
    _attr,
    dropout_state,
    gd_role,
    numpy_helper,
    onnx,
    unique_name,
)


def _const(name: str, value: np.ndarray, doc: str, node_name: str) -> Any:
    node = onnx.helper.make_node(
        "Constant", [], [name], name=node_name, value=numpy_helper.from_array(value, name)
    )
    node.doc_string = doc
    return node


def mode_signal_nodes(taken: set[str]) -> tuple[list[Any], str]:
    """Nodes computing a scalar bool that is True in training graphs and False in eval graphs.

    ``generate_artifacts`` derives the eval graph by removing every Dropout's ``training_mode``
    input and nothing else, so the signal is read off a Dropout: ``MODE_SIGNAL_SIZE`` ones
    dropped with ratio 0.5 contain a 2 (a kept, rescaled one) unless every element was dropped
    (probability ``2**-128``); without ``training_mode`` (eval) they stay ones. Returns the
    nodes and the signal's name.
    """
    doc = f"{MODE_MARK}: True in training graphs, False once training_mode is removed"
    names = {
        k: unique_name(f"{MODE_SIGNAL_NAME}.{k}", taken)
        for k in ("ones", "ratio", "on", "dropped", "max", "threshold")
    }
    out = unique_name(MODE_SIGNAL_NAME, taken)
    prefix = MODE_PREFIX

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
        n = onnx.helper.make_node(op, inputs, outputs, name=prefix + op, **attrs)
        n.doc_string = doc
        return n

    nodes = [
        _const(names["ones"], np.ones(MODE_SIGNAL_SIZE, np.float32), doc, prefix + "Ones"),
        _const(names["ratio"], np.array(0.5, np.float32), doc, prefix + "Ratio"),
        _const(names["on"], np.array(True), doc, prefix + "On"),
        node("Dropout", [names["ones"], names["ratio"], names["on"]], [names["dropped"]]),
        node("ReduceMax", [names["dropped"]], [names["max"]], keepdims=0),
        _const(names["threshold"], np.array(1.5, np.float32), doc, prefix + "Threshold"),
        node("Greater", [names["max"], names["threshold"]], [out]),
    ]
    return nodes, out


class SiteRates(NamedTuple):
    """A site's per-unit rate tensor, its ``1 - rates`` tensor and their element type."""

    site: str
    rates: str
    keep_scale: str
    dtype: int


def unit_dropout_nodes(
    dropout: Any, unit: SiteRates, cond: str, mask: bool, taken: set[str]
) -> list[Any]:
    """Inverted per-unit dropout replacing node ``dropout`` (same data input and outputs).

    ``y = Where(cond, x * Cast(RandomUniformLike(x) >= rates) / keep_scale, x)`` with
    ``keep_scale = 1 - rates`` (computed once per site by :func:`rate_scale_nodes`), and the
    mask ``Or(keep, Not(cond))`` when ``mask``. The RandomUniformLike keeps the Dropout's seed.
    Gradients reach ``x`` through Mul and Where only.
    """
    site, rates, keep_scale, dtype = unit
    x, y = dropout.input[0], dropout.output[0]
    base = (dropout.name or y).rstrip("/") + UNIT_INFIX
    doc = f"{UNIT_MARK} site={site}"
    seed = _attr(dropout, "seed")
    names = {k: unique_name(f"{y}.gd_{k}", taken) for k in ("u", "keep", "keepf", "w", "xd")}

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
        n = onnx.helper.make_node(op, inputs, outputs, name=unique_name(base + op, taken), **attrs)
        n.doc_string = doc
        return n

    extra = {} if seed is None else {"seed": float(seed)}
    nodes = [
        node("RandomUniformLike", [x], [names["u"]], **extra),
        node("GreaterOrEqual", [names["u"], rates], [names["keep"]]),
        node("Cast", [names["keep"]], [names["keepf"]], to=int(dtype)),
        node("Div", [names["keepf"], keep_scale], [names["w"]]),
        node("Mul", [x, names["w"]], [names["xd"]]),
        node("Where", [cond, names["xd"], x], [y]),
    ]
    if mask:
        off = unique_name(f"{y}.gd_not_training", taken)
        nodes.append(node("Not", [cond], [off]))
        nodes.append(node("Or", [names["keep"], off], [dropout.output[1]]))
    return nodes


def rate_scale_nodes(
    site: str, rates: str, dtype: int, taken: set[str]
) -> tuple[list[Any], SiteRates]:
    """``1 - rates`` (the keep probabilities), once per site; returns the nodes and the site's
    rate tensors."""
    doc = f"{UNIT_MARK} site={site}"
    one = unique_name(f"{rates}.one", taken)
    out = unique_name(f"{rates}.keep", taken)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    base = f"/{site}{UNIT_INFIX}"
    sub = onnx.helper.make_node("Sub", [one, rates], [out], name=unique_name(base + "Sub", taken))
    sub.doc_string = doc
    nodes = [_const(one, np.array(1.0, np_type), doc, unique_name(base + "One", taken)), sub]
    return nodes, SiteRates(site, rates, out, dtype)


@dataclass
class UnitDropout:
    """One Dropout node replaced by per-unit dropout: its site, data in/out and rate tensor."""

    site: str
    x: str
    y: str
    rates: str
    cond: str
    mask: str = ""


def unit_dropouts(model: Any) -> list[UnitDropout]:
    """The per-unit dropouts ``apply(granularity="unit")`` put in the main graph, in order."""
    index = GraphIndex(model.graph)
    out = []
    for node in index.nodes:
        if node.op_type != "Where" or gd_role(node) != "unit":
            continue
        site = node.doc_string.partition("site=")[2] or node.name.partition(UNIT_INFIX)[0]
        rates = mask = ""
        xd = index.producer.get(node.input[1])
        w = index.producer.get(index.nodes[xd].input[1]) if xd is not None else None
        cast = index.producer.get(index.nodes[w].input[0]) if w is not None else None
        ge = index.producer.get(index.nodes[cast].input[0]) if cast is not None else None
        if ge is not None and index.nodes[ge].op_type == "GreaterOrEqual":
            rates = index.nodes[ge].input[1]
            for i, _ in index.consumers.get(index.nodes[ge].output[0], []):
                if index.nodes[i].op_type == "Or":
                    mask = index.nodes[i].output[0]
        out.append(UnitDropout(site, node.input[2], node.output[0], rates, node.input[0], mask))
    return out


def remove_unit_dropout(model: Any) -> list[str]:
    """Replace every per-unit dropout by the identity (in place); returns the rate tensors.

    Consumers of a unit dropout's output read its input instead; a consumed mask output becomes
    all True (what an inactive Dropout returns). The training-mode signal goes too, and the rate
    and constant tensors left unused are removed (rate graph inputs are not).
    """
    units = {u.y: u for u in unit_dropouts(model)}
    if not units and not any(gd_role(n) for n in model.graph.node):
        return []
    index = GraphIndex(model.graph)
    taken = index.names()
    nodes: list[Any] = []
    for node in model.graph.node:
        if gd_role(node) is None:
            nodes.append(node)
            for j, name in enumerate(node.input):
                if name in units:
                    node.input[j] = units[name].x
            continue
        u = units.get(node.output[0]) if node.op_type == "Where" else None
        if u is None:
            continue
        # what replaces this unit dropout goes where its output was produced (graph order)
        if u.mask and (u.mask in index.consumers or u.mask in index.outputs):
            shape = unique_name(f"{u.mask}.shape", taken)
            nodes.append(onnx.helper.make_node("Shape", [u.x], [shape]))
            true = numpy_helper.from_array(np.array([True]))
            nodes.append(onnx.helper.make_node("ConstantOfShape", [shape], [u.mask], value=true))
        if u.y in index.outputs:
            nodes.append(onnx.helper.make_node("Identity", [u.x], [u.y]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    rates = [u.rates for u in units.values() if u.rates]
    prune_unused(model, rates)
    return rates


# ---------------------------------------------------------------------------------------------
# repairs
# ---------------------------------------------------------------------------------------------
def repair_in_place(model: Any) -> list[str]:
    """Make the graph one ORT 1.19's gradient builder handles correctly; return what changed.

    - ``LayerNormalization`` (opset >= 17 exports): declare the ``Mean`` and ``InvStdDev``
      outputs its gradient reads.
    - ``Dropout`` with only its data output (torch's SDPA export): declare the ``mask`` output.
    - ``Dropout`` that is inert (no ``training_mode`` input, or a constant False): its ratio is
      set to 0. The forward pass is the identity either way, but ORT 1.19 scales the gradient
      of such a node by ``1 / (1 - ratio)``, which would make every gradient upstream wrong.
    """
    index = GraphIndex(model.graph)
    taken = index.names()
    changes: list[str] = []
    zero: str | None = None
    replaced: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Dropout" or node.domain not in DEFAULT_DOMAINS or not node.input:
            continue
        if gd_role(node):
            continue
        ratio, active = dropout_state(index, node)
        if active is False and ratio != 0.0:
            if zero is None:
                zero = unique_name(INERT_RATIO_NAME, taken)
                model.graph.initializer.append(
                    numpy_helper.from_array(np.array(0.0, np.float32), zero)
                )
            while len(node.input) < 2:
                node.input.append("")
            replaced.append(node.input[1])
            node.input[1] = zero
            changes.append(
                f"Dropout {node.name or node.output[0]!r}: inert (no training_mode), ratio set "
                "to 0 (ORT 1.19 scales an inert Dropout's gradient by 1/(1-ratio))"
            )
    prune_unused(model, replaced)
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or not node.output:
            continue
        if node.op_type == "LayerNormalization":
            wanted = ("mean", "inv_std_dev")
            missing = [w for k, w in enumerate(wanted, start=1) if not _has_output(node, k)]
            if missing:
                for k, what in enumerate(wanted, start=1):
                    _declare_output(node, k, f"{node.output[0]}.gd_{what}", taken)
                changes.append(
                    f"LayerNormalization {node.name or node.output[0]!r}: declared its optional "
                    "Mean and InvStdDev outputs (ORT's LayerNormalization gradient reads them)"
                )
        elif node.op_type == "Dropout" and not _has_output(node, 1) and not gd_role(node):
            _declare_output(node, 1, f"{node.output[0]}.gd_mask", taken)
            changes.append(
                f"Dropout {node.name or node.output[0]!r}: declared its optional mask output "
                "(ORT's Dropout gradient reads it)"
            )
    return changes


def _has_output(node: Any, k: int) -> bool:
    return len(node.output) > k and bool(node.output[k])


def _declare_output(node: Any, k: int, base: str, taken: set[str]) -> None:
    if _has_output(node, k):
        return
    name = unique_name(base, taken)
    while len(node.output) <= k:
        node.output.append("")
    node.output[k] = name


def set_seeds(model: Any, seed: int) -> None:
    """Give the k-th dropout node of the main graph the ``seed`` attribute ``seed + k``.

    Dropout nodes and the RandomUniformLike nodes of per-unit dropout count, in graph order
    (a RandomUniformLike's seed is a float); the training-mode signal does not.
    """
    k = 0
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            continue
        role = gd_role(node)
        if node.op_type == "Dropout" and role is None:
            value: Any = int(seed + k)
        elif node.op_type == "RandomUniformLike" and role == "unit":
            value = float(seed + k)
        else:
            continue
        keep = [a for a in node.attribute if a.name != "seed"]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("seed", value))
        k += 1


def prune_unused(model: Any, candidates: Iterable[str]) -> list[str]:
    """Remove Constant nodes / initializers among ``candidates`` that nothing consumes anymore."""
    index = GraphIndex(model.graph)
    removed = []
    dead_nodes = set()
    for name in candidates:
        if not name or name in index.consumers or name in index.outputs:
            continue
        i = index.producer.get(name)
        if i is not None and index.nodes[i].op_type == "Constant":
            dead_nodes.add(i)
            removed.append(name)
        elif name in index.inits and name not in index.inputs:
            removed.append(name)
    keep_inits = [t for t in model.graph.initializer if t.name not in set(removed)]
    if len(keep_inits) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep_inits)
    if dead_nodes:
        keep = [n for i, n in enumerate(model.graph.node) if i not in dead_nodes]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return removed


def _f32(x: float) -> float:
    """A float32 value as the shortest decimal that rounds to it (0.1, not 0.10000000149)."""
    return float(str(np.float32(x)))


def _owned_by(index: GraphIndex, name: str, nodes: Sequence[int]) -> bool:
    """True when ``name`` is consumed only as the ratio of ``nodes`` (a previous ``apply``)."""
    uses = index.consumers.get(name, [])
    return bool(uses) and all(i in nodes and j == 1 for i, j in uses)


def _refuse_unit_rewritten(model: Any) -> None:
    found = unit_dropouts(model)
    if found:
        raise bad_argument(
            "model_proto",
            "an ONNX graph with Dropout nodes (an export, or the result of a site-level apply)",
            f"a graph apply(granularity='unit') already rewrote ({len(found)} per-unit dropout(s), "
            f"e.g. site {found[0].site!r})",
            "apply the profile to the original export",
        )


def _unit_width(
    info: SiteHandle,
    index: GraphIndex,
    types: Mapping[str, tuple[int, int | None]],
    scores: np.ndarray | None,
) -> tuple[int | None, int, str]:
    """(units, element type, "") when a site can take per-unit rates, else (None, 0, why)."""
    widths: set[int | None] = set()
    dtypes: set[int] = set()
    for i in info.nodes:
        x = index.nodes[i].input[0]
        if _g.from_softmax(index, x):
            return None, 0, "attention probabilities (the last axis is the key sequence, not units)"
        dtype, width = types.get(x, (0, None))
        widths.add(width)
        dtypes.add(dtype)
    if None in widths:
        return None, 0, "no known unit count (the last axis has no static size)"
    if len(widths) > 1:
        known = sorted(w for w in widths if w is not None)
        return None, 0, f"its Dropout nodes drop tensors of different widths {known}"
    (dtype,) = dtypes if len(dtypes) == 1 else (0,)
    if dtype not in _g.UNIT_TYPES:
        name = onnx.TensorProto.DataType.Name(dtype) if dtype else "unknown"
        return None, 0, f"element type {name} (per-unit dropout needs float, float16 or double)"
    (width,) = widths
    if scores is not None and len(scores) != width:
        return None, 0, f"the profile has {len(scores)} unit scores, the last axis {width} units"
    return width, dtype, ""


class _UnitRewrite:
    """Collects the per-unit dropout subgraphs of one ``apply`` call, then splices them in."""

    def __init__(self, index: GraphIndex, taken: set[str]) -> None:
        self.index = index
        self.taken = taken
        self.signal: str | None = None
        self.signal_nodes: list[Any] = []
        self.replacements: dict[int, list[Any]] = {}
        self.replaced: list[str] = []
        self.drop_names: set[str] = set()
        self.new_inits: list[Any] = []
        self.new_inputs: list[Any] = []

    def _signal(self) -> str:
        if self.signal is None:
            self.signal_nodes, self.signal = mode_signal_nodes(self.taken)
        return self.signal

    def rewrite(
        self,
        info: SiteHandle,
        p: float,
        source: str,
        old: float,
        width: int,
        dtype: int,
        rates: np.ndarray | None,
        *,
        ratios_as_inputs: bool,
        activate: bool,
        report: Any,  # the OnnxApplyReport being built
    ) -> ReportRow:
        site = info.site.name
        values = check_rates(
            np.full(width, p) if rates is None else rates,
            f"rates of site {site!r}",
            "lower p_upper",
        )
        values = values.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        rname = _g.unique_name(f"{site}.rates", self.taken)
        if ratios_as_inputs:
            self.new_inputs.append(onnx.helper.make_tensor_value_info(rname, dtype, [width]))
            report.ratio_inputs[site] = rname
        else:
            self.new_inits.append(onnx.numpy_helper.from_array(values, rname))
        report.ratio_names[site] = rname
        report.unit_rates[site] = values
        scale_nodes, unit = rate_scale_nodes(site, rname, dtype, self.taken)
        notes = [] if rates is not None else ["no unit scores in the profile: the site p per unit"]
        first = True
        for i in info.nodes:
            node = self.index.nodes[i]
            _, active = _g.dropout_state(self.index, node)
            mode = node.input[2] if len(node.input) > 2 else ""
            extra: list[Any] = []
            if active is True or (active is False and activate):
                cond = self._signal()
                if active is False:
                    if site not in report.activated:
                        report.activated.append(site)
                    notes.append("was inert (no training_mode); activated")
            elif active is None:  # a training_mode computed in the graph or fed: respect it
                cond = _g.unique_name(f"{node.output[0]}.gd_training", self.taken)
                extra.append(
                    onnx.helper.make_node(
                        "And",
                        [mode, self._signal()],
                        [cond],
                        name=_g.unique_name(f"{node.name or site}{_g.UNIT_INFIX}And", self.taken),
                        doc_string=f"{_g.UNIT_MARK} site={site}",
                    )
                )
            else:  # inert and not to be activated: left as it is
                continue
            ratio = node.input[1] if len(node.input) > 1 else ""
            if ratio and ratio in self.index.inputs and _owned_by(self.index, ratio, info.nodes):
                self.drop_names.add(ratio)  # the ratio input of an earlier site-level apply
            self.replaced.extend(n for n in (ratio, mode) if n)
            used = _has_output(node, 1) and (
                node.output[1] in self.index.consumers or node.output[1] in self.index.outputs
            )
            extra += unit_dropout_nodes(node, unit, cond, used, self.taken)
            self.replacements[i] = (scale_nodes if first else []) + extra
            first = False
        note = "; ".join(dict.fromkeys(notes))
        return ReportRow(site, old, _f32(float(values.mean(dtype=np.float64))), source, width, note)

    def splice(self, model: Any) -> None:
        """Put the subgraphs in place of their Dropout nodes, the mode signal first."""
        if not self.replacements:
            return
        nodes = list(self.signal_nodes)
        for i, node in enumerate(model.graph.node):
            nodes.extend(self.replacements.get(i, [node]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
