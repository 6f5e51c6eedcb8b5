"""Canonical names, dropout sites and guarded weights of Keras 3 models: :func:`sites`,
:func:`fingerprint`, and :func:`load_state_dict` (canonical, torch-layout weights in).

The index walks a model's layer tree once and records, in graph order, every layer, the canonical
name of every weight (``<layer name>.<weight|bias|...>``) and the dropout sites. Guarded weights of
a site are found by walking the functional graph backwards from the dropout's input until another
dropout site or the model inputs; for subclassed models (no graph) the weight-carrying layers
between the previous site and this one in layer order stand in for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gd_core.errors import bad_argument, no_sites
from gd_core.fingerprint import Fingerprint
from gd_core.names import LEAF_ALIASES, from_keras_layer
from gd_core.sites import Site, site_mapping
from gd_core.validate import check_type

from .layer import GuidedDropout, _children, keras
from .layout import _canonical_axes

SITE_KIND = "layer"


def site_classes() -> tuple[type, ...]:
    """Bernoulli dropout layer classes that are dropout sites (not GaussianDropout/Noise)."""
    classes: list[type] = [keras.layers.Dropout, GuidedDropout]  # Dropout covers SpatialDropoutND
    alpha = getattr(keras.layers, "AlphaDropout", None)
    if alpha is not None:
        classes.append(alpha)
    return tuple(classes)


def is_site(layer: Any) -> bool:
    return isinstance(layer, site_classes())


def layer_rate(layer: Any) -> float:
    return float(getattr(layer, "rate", 0.0))


def _is_graph_model(layer: Any) -> bool:
    return isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth")


@dataclass
class ModelIndex:
    """Everything adapters.keras needs to know about a model's layers and weights."""

    model: Any
    layers: list[Any] = field(default_factory=list)  # depth first, graph order, each once
    parent: dict[int, Any] = field(default_factory=dict)
    layer_names: dict[int, str] = field(default_factory=dict)
    var_names: dict[int, str] = field(default_factory=dict)  # id(variable) -> canonical name
    variables: dict[str, Any] = field(default_factory=dict)  # canonical name -> variable
    owner: dict[str, Any] = field(default_factory=dict)  # canonical name -> owning layer
    #: canonical name -> axes that bring the Keras array into canonical (torch) layout
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    site_layers: list[Any] = field(default_factory=list)
    holders: set[int] = field(default_factory=set)  # ids of sites and layers containing one
    #: site layers the forward never calls (dead sites), once :meth:`check_calls` has run
    dead: list[Any] | None = None
    #: ids of site layers whose input is attention probabilities (a softmax output), likewise
    attention: set[int] = field(default_factory=set)
    #: layers in the order that forward first called them (empty: not known)
    call_order: list[Any] = field(default_factory=list)
    #: every layer call of that forward in order, repeats included (empty: not known)
    calls: list[Any] = field(default_factory=list)
    #: the input the forward of :meth:`check_calls` runs on (None: one guessed from the specs)
    example: Any = None
    #: sites to insert into a dropout-free model, by name (``adapters.keras.inserted.Point``)
    inserted: dict[str, Any] = field(default_factory=dict)
    #: what the sites found need the user to know (said by ``sites`` and the apply report)
    notes: list[str] = field(default_factory=list)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, model: Any, example_input: Any = None) -> ModelIndex:
        if not isinstance(model, keras.layers.Layer):
            raise bad_argument(
                "model",
                "a Keras 3 model or layer",
                type(model).__name__,
                "pass a keras.Model (Sequential, functional or subclassed)",
            )
        idx = cls(model, example=example_input)
        paths: dict[int, tuple[str, ...]] = {}

        def visit(layer: Any, path: tuple[str, ...]) -> None:
            if id(layer) in paths:
                return
            paths[id(layer)] = path
            idx.layers.append(layer)
            if layer is not model and is_site(layer):
                idx.site_layers.append(layer)
                return  # a site's own variables (seed, step) are not model weights
            for child in _children(layer):
                if id(child) not in paths:
                    idx.parent[id(child)] = layer
                visit(child, (*path, child.name))

        visit(model, ())
        for site in idx.site_layers:
            cur: Any = site
            while cur is not None:
                idx.holders.add(id(cur))
                cur = idx.parent.get(id(cur))
        counts: dict[str, int] = {}
        for layer in idx.layers[1:]:
            counts[layer.name] = counts.get(layer.name, 0) + 1
        for layer in idx.layers[1:]:
            parts = _name_parts(paths[id(layer)], counts)
            idx.layer_names[id(layer)] = ".".join(from_keras_layer(p) for p in parts)
        idx.layer_names[id(model)] = ""
        for site in idx.site_layers:  # a dropout held by a layer (MultiHeadAttention): by path
            holder = idx.parent.get(id(site))
            attr = _attribute_of(holder, site)
            if holder is not None and holder is not model and attr is not None:
                idx.layer_names[id(site)] = f"{idx.layer_names[id(holder)]}.{attr}"
        for layer in idx.layers:
            if layer is not model and is_site(layer):
                continue
            for var in own_weights(layer):
                if id(var) in idx.var_names:
                    continue  # shared (tied) weights keep their first name
                raw = str(var.name).split("/")[-1].split(":")[0]
                leaf = LEAF_ALIASES.get(raw, raw)
                prefix = idx.layer_names[id(layer)]
                name = f"{prefix}.{leaf}" if prefix else leaf
                base, k = name, 1
                while name in idx.variables:
                    name, k = f"{base}_{k}", k + 1
                idx.var_names[id(var)] = name
                idx.variables[name] = var
                idx.owner[name] = layer
                perm = _canonical_axes(layer, raw, len(var.shape))
                if perm is not None:
                    idx.layouts[name] = perm
        return idx

    # -- canonical (torch) layout ------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """The canonical (torch-layout) shape of a weight."""
        shape = tuple(int(d) for d in self.variables[name].shape)
        perm = self.layouts.get(name)
        return shape if perm is None else tuple(shape[a] for a in perm)

    def to_canonical(self, name: str, array: Any) -> np.ndarray:
        """A Keras-layout array of weight ``name`` in canonical (torch) layout."""
        perm = self.layouts.get(name)
        arr = np.asarray(array)
        return arr if perm is None else np.transpose(arr, perm)

    def from_canonical(self, name: str, array: Any) -> np.ndarray:
        """A canonical (torch-layout) array of weight ``name`` in Keras layout."""
        perm = self.layouts.get(name)
        arr = np.asarray(array)
        return arr if perm is None else np.transpose(arr, np.argsort(perm))

    # -- views --------------------------------------------------------------------------------
    def site_name(self, layer: Any) -> str:
        if isinstance(layer, GuidedDropout) and layer._site:
            return layer._site
        return self.layer_names[id(layer)]

    def trainable(self) -> dict[str, Any]:
        return {n: v for n, v in self.variables.items() if bool(getattr(v, "trainable", True))}

    def subtree_weights(self, layer: Any) -> list[str]:
        """Canonical names of the trainable weights held by ``layer`` and its sublayers."""
        ids = {id(v) for v in layer.weights}
        return [n for n, v in self.trainable().items() if id(v) in ids]

    def contains_site(self, layer: Any) -> bool:
        return id(layer) in self.holders or is_site(layer)

    def check_calls(self) -> list[Any]:
        """The dead sites: site layers one training forward never calls (see
        :mod:`adapters.keras.calls`); empty where no input can be guessed."""
        if self.dead is None:
            from .calls import called_layers

            watched = [x for x in self.layers[1:] if not is_site(x)]
            called = called_layers(
                self.model,
                self.site_layers,
                self.attention,
                (watched, self.call_order),
                self.calls,
                self.example,
            )
            if called is None:
                self.call_order.clear()
                self.unchecked = bool(self.site_layers)  # said in dead_note, never silent
            self.dead = (
                [] if called is None else [x for x in self.site_layers if id(x) not in called]
            )
        return self.dead

    def live_layers(self) -> list[Any]:
        """The site layers the forward calls, in order."""
        dead = {id(x) for x in self.check_calls()}
        return [x for x in self.site_layers if id(x) not in dead]

    def unchecked_note(self) -> str | None:
        """The report note saying dead sites could not be looked for (None: they were)."""
        self.check_calls()
        if not getattr(self, "unchecked", False):
            return None
        return (
            "no training forward ran on an input guessed from the model's input specs, so "
            "whether every dropout layer is called was not checked (a dropout layer the forward "
            "never calls would be profiled and installed like the others); pass "
            "example_input=<one small batch> to check it"
        )

    def dead_note(self) -> str | None:
        """The report note naming the dead sites (None: there are none)."""
        dead = [self.site_name(x) for x in self.check_calls()]
        if not dead:
            return None
        return (
            f"{len(dead)} dropout layer(s) are never called in a training forward (dead sites, "
            f"not profiled, left as they are): {dead[:6]}" + (" ..." if len(dead) > 6 else "")
        )


def _name_parts(path: tuple[str, ...], counts: Mapping[str, int]) -> tuple[str, ...]:
    """A layer's name parts: its own name where no other layer has it, else its path from the
    nearest ancestor whose name is unique. So a layer is named alike in a backbone and in the
    task model wrapping it (``transformer_layer_0.self_attention_layer``, not with the
    backbone's name in front in one of them only): the backbone's own name is left out, as it
    is for the layers whose names are unique."""
    for i in range(len(path) - 1, -1, -1):
        if counts.get(path[i], 0) == 1:
            return path[i:]
    return path


def _attribute_of(holder: Any, layer: Any) -> str | None:
    """The attribute name under which a non-model layer holds ``layer`` (``_dropout_layer`` ->
    ``dropout``): stable, unlike Keras' auto-generated names (``dropout_3``)."""
    if holder is None or isinstance(holder, keras.Model):
        return None
    for attr, value in vars(holder).items():
        if value is layer:
            name = attr.lstrip("_")
            return name[: -len("_layer")] if name.endswith("_layer") else name
    return None


def own_weights(layer: Any) -> list[Any]:
    """The weights a layer holds itself (not through its sublayers)."""
    try:
        mine = list(layer.weights)
    except Exception:  # noqa: BLE001 - unbuilt layers may raise
        return []
    sub: set[int] = set()
    for child in _children(layer):
        try:
            sub.update(id(v) for v in child.weights)
        except Exception:  # noqa: BLE001
            continue
    return [v for v in mine if id(v) not in sub]


def _site_units(layer: Any) -> int | None:
    if isinstance(layer, GuidedDropout) and layer.rates is not None:
        return len(layer.rates)
    try:
        shape = layer.input.shape
    except Exception:  # noqa: BLE001 - never called symbolically (subclassed models)
        return None
    if not shape:
        return None
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return None  # the unit (channel) axis is not the last one
    last = shape[-1]
    return None if last is None else int(last)


# -- guarded weights -------------------------------------------------------------------------
def _graph_nodes(graph_model: Any, layer: Any) -> list[Any]:
    keys = getattr(graph_model, "_nodes", None)
    nodes = list(getattr(layer, "_inbound_nodes", []))
    if keys is None:
        return nodes
    out = []
    for i, node in enumerate(nodes):
        if f"{id(layer)}_ib-{i}" in keys:
            out.append(node)
    return out


def _nearest_graph(idx: ModelIndex, layer: Any) -> Any | None:
    """The functional model whose graph calls ``layer`` directly (None inside custom layers)."""
    parent = idx.parent.get(id(layer))
    return parent if parent is not None and _is_graph_model(parent) else None


def _walk_back(idx: ModelIndex, graph_model: Any, site: Any) -> list[Any] | None:
    """Weight-carrying layers feeding ``site`` up to the previous site or the model inputs."""
    start = _graph_nodes(graph_model, site)
    if not start:
        return None
    stack = [p for node in start for p in node.parent_nodes]
    seen: set[int] = set()
    found: dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        op = node.operation
        if isinstance(op, keras.layers.InputLayer):
            continue
        if idx.contains_site(op):
            # another dropout site ends this branch; a block holding one contributes the
            # weight layers after its last inner site (e.g. an attention block's output dense)
            for layer in _trailing(idx, op):
                found[id(layer)] = layer
            continue
        if isinstance(op, keras.layers.Layer) and op.weights:
            found[id(op)] = op
        stack.extend(node.parent_nodes)
    return list(found.values())


def _trailing(idx: ModelIndex, holder: Any) -> list[Any]:
    """Weight-carrying layers inside ``holder`` after its last dropout site (call order where
    the forward was seen, else layer order)."""
    if is_site(holder):
        return []
    order = idx.calls or idx.layers  # every call: a dropout layer called again late counts
    inside = [layer for layer in order if _is_under(idx, layer, holder)]
    last = max((i for i, layer in enumerate(inside) if is_site(layer)), default=-1)
    out: dict[int, Any] = {}
    for layer in inside[last + 1 :]:
        if own_weights(layer) and not idx.contains_site(layer):
            out.setdefault(id(layer), layer)
    return list(out.values())


def _is_under(idx: ModelIndex, layer: Any, ancestor: Any) -> bool:
    cur = idx.parent.get(id(layer))
    while cur is not None:
        if cur is ancestor:
            return True
        cur = idx.parent.get(id(cur))
    return False


def _graph_level(idx: ModelIndex, layer: Any) -> Any | None:
    """The ancestor of ``layer`` a functional graph calls (None: no graph above it)."""
    cur = layer
    while cur is not None:
        parent = idx.parent.get(id(cur))
        if parent is not None and _is_graph_model(parent):
            return cur
        cur = parent
    return None


def _walk_order(idx: ModelIndex, site: Any) -> list[Any]:
    """Weight-carrying layers between the previous site and ``site`` in layer order, within the
    layer a functional graph calls (a transformer block's first inner site does not reach back
    into the layers before the block: the graph decides those). Where the forward was seen,
    its calls decide: a dropout layer called more than once (ESM's block calls one before
    attention, after it and after the feed-forward) guards the union over its calls."""
    order = idx.layers
    if idx.calls and any(x is site for x in idx.calls):
        order = idx.calls  # the forward's calls, where they were seen
    dead = {id(x) for x in idx.dead or ()}
    top = _graph_level(idx, site)
    out: dict[int, Any] = {}
    for pos in [i for i, layer in enumerate(order) if layer is site]:
        for layer in reversed(order[:pos]):
            if top is not None and top is not site and not _is_under(idx, layer, top):
                break
            if is_site(layer) and id(layer) not in dead:
                break
            if own_weights(layer) and not idx.contains_site(layer):
                out.setdefault(id(layer), layer)
    return list(out.values())


def default_params(idx: ModelIndex, site: Any) -> list[str]:
    graph = _nearest_graph(idx, site)
    layers = _walk_back(idx, graph, site) if graph is not None else None
    if layers is None:
        layers = _walk_order(idx, site)
    chosen = {id(layer) for layer in layers}
    ordered = [layer for layer in idx.layers if id(layer) in chosen]
    names: list[str] = []
    for layer in ordered:
        for n in idx.subtree_weights(layer):
            if n not in names:
                names.append(n)
    return names


def _unit_axes(idx: ModelIndex, params: Sequence[str], units: int | None) -> dict[str, int]:
    """The output-unit axis, in canonical layout, of each weight with ``units`` output features
    (Keras keeps them last; the canonical layout puts them where torch does)."""
    shapes = {p: tuple(idx.variables[p].shape) for p in params}
    last = {p: len(shape) - 1 for p, shape in shapes.items() if shape and shape[-1] == units}
    return {
        p: a if idx.layouts.get(p) is None else idx.layouts[p].index(a) for p, a in last.items()
    }


def discover(model: Any, mapping: Mapping[str, Sequence[str]] | None = None) -> list[Site]:
    """The model's dropout sites as gd_core Sites, in graph order."""
    idx = ModelIndex.build(model)
    return sites_of(idx, mapping)


def sites_of(idx: ModelIndex, mapping: Mapping[str, Sequence[str]] | None = None) -> list[Site]:
    names = [idx.site_name(layer) for layer in idx.site_layers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise bad_argument(
            "model",
            "dropout layers with unique names",
            f"duplicate site names {dup[:3]}",
            "give every dropout layer (and GuidedDropout site) its own name",
        )
    live = {id(x) for x in idx.live_layers()}
    if not live:  # a dropout-free model: sites inserted as in torch (adapters.keras.inserted)
        return _inserted_sites(idx, mapping, names)
    if mapping is not None:
        live_names = [n for x, n in zip(idx.site_layers, names, strict=True) if id(x) in live]
        mapping = _check_mapping(idx, live_names, mapping)
    flow = _dataflow_groups(idx, names)
    hooks = _hook_groups(idx)
    traced: dict[str, list[str]] | None = None
    out = []
    for layer, name in zip(idx.site_layers, names, strict=True):
        if id(layer) not in live:
            continue
        units = _site_units(layer)
        if mapping is not None and name in mapping:
            params = list(mapping[name])
        elif id(layer) in hooks:
            params, units = hooks[id(layer)][0], units or hooks[id(layer)][1]
        elif flow is not None and name in flow:
            params = flow[name]
        else:
            params = default_params(idx, layer)
        if not params and mapping is None:  # e.g. a dropout first in a layer (ViT's encoder)
            traced = traced if traced is not None else _traced_groups(idx, live)
            params = traced.get(name, [])
        kind = "hook" if id(layer) in hooks else SITE_KIND  # inserted (adapters.keras.inserted)
        out.append(Site(name, tuple(params), units, _unit_axes(idx, params, units), kind))
    return out


def _inserted_sites(idx: ModelIndex, mapping: Any, names: list[str]) -> list[Site]:
    """Sites inserted into a model whose forward calls no dropout layer, where
    ``gd_core.dataflow.insertion_points`` puts them (:mod:`adapters.keras.inserted`)."""
    from .inserted import KIND, groups, points, trace

    dead = f" (its dropout layers {names[:4]} are never called, e.g. skipped at rate 0)"
    what = f"{type(idx.model).__name__} {idx.model.name!r}"
    try:
        flow = trace(
            idx.model, [x for x in idx.layers[1:] if not is_site(x)], idx.trainable(), idx.example
        )
    except RuntimeError as exc:
        raise no_sites(
            f"the model calls no dropout layer{dead if names else ''}, and adapters.keras "
            f"inserts sites (on the embedding output and the residual branches, as "
            f"adapters.torch does) only from a traced forward, which could not be made: {exc}; "
            "pass example_input=<one small batch> on the TensorFlow backend, or build the model "
            "with dropout > 0 (keras_hub: Backbone.from_preset(preset, dropout=0.1))",
            detail=what,
        ) from exc
    pts, notes = points(flow, lambda layer: idx.layer_names[id(layer)])
    if not pts:
        raise no_sites(
            f"the model calls no dropout layer{dead if names else ''}, and its traced forward "
            "has no residual branch or embedding output returned by a layer to insert sites on"
            + (f" ({notes[0]})" if notes else "")
            + "; add keras.layers.Dropout layers where dropout belongs",
            detail=what,
        )
    idx.inserted = {p.name: p for p in pts}
    idx.notes += [
        f"the model calls no dropout layer: {len(pts)} site(s) inserted on the embedding output "
        "and the residual branches (as adapters.torch does)",
        *notes,
    ]
    found = groups(flow, {p.tensor: p.name for p in pts})
    if mapping is not None:
        mapping = _check_mapping(idx, list(idx.inserted), mapping)
    order = {n: i for i, n in enumerate(idx.variables)}
    out = []
    for p in pts:
        params = list(mapping[p.name]) if mapping and p.name in mapping else found.get(p.name, [])
        params = sorted(params, key=lambda n: order.get(n, len(order)))
        out.append(Site(p.name, tuple(params), p.units, _unit_axes(idx, params, p.units), KIND))
    return out


def _traced_groups(idx: ModelIndex, live: set[int]) -> dict[str, list[str]]:
    """What each live site guards by the one rule on a traced forward (TensorFlow backend), for
    a site the graph or layer-order rule gives nothing: a dropout called first inside a layer
    (ViT's encoder drops its input, the embeddings another layer computed). Empty where no
    trace can be made."""
    from .inserted import groups, trace

    sites = {id(x): idx.site_name(x) for x in idx.site_layers if id(x) in live}
    layers = [x for x in idx.layers[1:] if not is_site(x) or id(x) in sites]
    try:
        flow = trace(idx.model, layers, idx.trainable(), idx.example, sites)
    except RuntimeError:
        return {}
    order = {n: i for i, n in enumerate(idx.variables)}
    return {
        k: sorted(v, key=lambda n: order.get(n, len(order))) for k, v in groups(flow, {}).items()
    }


def _hook_groups(idx: ModelIndex) -> dict[int, tuple[list[str], int | None]]:
    """``{id(site layer): (guarded weights, units)}`` of the sites inserted by ``apply``
    (:mod:`adapters.keras.inserted`), from a traced forward, as when they were inserted."""
    from .inserted import groups, hooked, trace

    hooks = [x for x in idx.site_layers if hooked(idx.parent.get(id(x), x)) is x]
    if not hooks:
        return {}
    try:
        flow = trace(
            idx.model, [x for x in idx.layers[1:] if not is_site(x)], idx.trainable(), idx.example
        )
    except RuntimeError:
        return {}  # the layer-order rule stands in (as for a subclassed model)
    at = {t: idx.site_name(x) for t, x in flow.hooks.items()}
    found = groups(flow, at)
    order = {n: i for i, n in enumerate(idx.variables)}
    out = {}
    for t, x in flow.hooks.items():
        params = sorted(found.get(at[t], []), key=lambda n: order.get(n, len(order)))
        out[id(x)] = (params, flow.units.get(t))
    return out


def _dataflow_groups(idx: ModelIndex, names: list[str]) -> dict[str, list[str]] | None:
    """What each site guards by the one rule of :mod:`gd_core.dataflow`, for a functional or
    Sequential model (``None`` otherwise: the layer-order rule is used)."""
    from gd_core.dataflow import guarded

    from .dataflow import ops_of

    if not _is_graph_model(idx.model):
        return None
    by_layer = dict(zip((id(x) for x in idx.site_layers), names, strict=True))
    order = {n: i for i, n in enumerate(idx.variables)}

    def trailing(layer: Any) -> list[str] | None:
        if is_site(layer) or not idx.contains_site(layer):
            return None
        out: list[str] = []
        for inner in _trailing(idx, layer):
            out += [n for n in idx.subtree_weights(inner) if n not in out]
        return out

    try:
        ops = ops_of(
            idx.model, idx.subtree_weights, lambda layer: by_layer.get(id(layer)), trailing
        )
        groups = guarded(ops)
    except Exception:  # noqa: BLE001 - graphs the rule cannot read keep the layer-order rule
        return None
    return {
        k: sorted(v, key=lambda n: order.get(n, len(order)))
        for k, v in groups.items()
        if k in by_layer.values()  # not the boundaries standing for layers holding sites
    }


def _check_mapping(idx: ModelIndex, names: list[str], mapping: Any) -> dict[str, list[str]]:
    return site_mapping(mapping, names, idx.variables, sites_hint="adapters.keras.sites(model)")


def sites(
    model: Any, mapping: Mapping[str, Sequence[str]] | None = None, *, example_input: Any = None
) -> list[Any]:
    """The model's dropout sites (``gd_core.Site``) in graph order, with canonical names.

    Sites are ``Dropout``, ``SpatialDropout1D/2D/3D``, ``AlphaDropout`` and ``GuidedDropout``
    layers (not ``GaussianDropout``/``GaussianNoise``). A site guards, by default, the trainable
    weights of the layers between the previous site and itself in the functional graph (for
    subclassed models: in layer order); ``mapping`` ``{site: [weight names]}`` overrides that.
    Unit axes are those of every guarded weight whose Keras last dimension equals the site's
    units, in canonical torch layout (Dense kernel ``(in, out)`` = weight ``(out, in)`` -> 0,
    bias/LayerNormalization -> 0, Embedding -> 1).

    One training forward (on ``example_input``, else on an input guessed from a functional
    model's input specs; a subclassed model is checked only with ``example_input``) tells which
    dropout layers are called (the others are dead sites: a warning names them) and in which
    order; a dropout layer called more than once guards the union over its calls. A given
    ``example_input`` the model cannot run on raises ArgumentError. A model whose forward calls
    no dropout layer gets sites inserted on the embedding output and the residual branches, as
    in torch (``<layer>.gd_dropout``, kind ``"hook"``; :mod:`adapters.keras.inserted`).

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="fc"),
        ...                       keras.layers.Dropout(0.1, name="drop")])
        >>> s = sites(m)[0]
        >>> s.name, s.params, s.units, s.unit_axes
        ('drop', ('fc.weight', 'fc.bias'), 4, {'fc.weight': 0, 'fc.bias': 0})
    """
    idx = ModelIndex.build(model, example_input)
    found = sites_of(idx, mapping)
    for note in [idx.dead_note(), *idx.notes]:
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
    return found


def _fingerprint(idx: ModelIndex) -> Fingerprint:
    return Fingerprint.from_shapes([(n, idx.shape(n)) for n in idx.variables])


def fingerprint(model: Any) -> Fingerprint:
    """The model's weights (canonical names, canonical torch-layout shapes), excluding dropout
    layers' state.

    Shapes are the torch layout every adapter uses (a Dense kernel ``(in, out)`` is listed as the
    ``Linear`` weight ``(out, in)``), so a profile computed on the torch version of the model
    matches a Keras replica with ``strict=True``.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="fc")])
        >>> fingerprint(m).params
        (('fc.bias', (4,)), ('fc.weight', (4, 3)))
    """
    return _fingerprint(ModelIndex.build(model))


def resolve_sites(idx: ModelIndex, given: Any) -> list[tuple[Site, Any]]:
    """(Site, layer) pairs: discovered (optionally with a site mapping) or the given Sites."""
    if given is None or isinstance(given, Mapping):
        found = sites_of(idx, given)
        return list(zip(found, _layers_of(idx, found), strict=True))
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        given = [given]
    found = sites_of(idx)
    layer_of = {s.name: x for s, x in zip(found, _layers_of(idx, found), strict=True)}
    out = []
    for site in given:
        check_type(
            site,
            "sites",
            Site,
            "None, a list of gd_core.Site, or a site mapping {site: [weight names]}",
            "pass sites=adapters.keras.sites(model) or a dict",
        )
        if site.name not in layer_of:
            raise bad_argument(
                "sites",
                "sites of this model",
                site.name,
                f"use names from adapters.keras.sites(model), e.g. {list(layer_of)[:3]}",
            )
        out.append((site, layer_of[site.name]))
    return out


def _layers_of(idx: ModelIndex, found: list[Site]) -> list[Any]:
    """The site layer of each site found (None for a site to insert)."""
    return [None] * len(found) if idx.inserted else idx.live_layers()
