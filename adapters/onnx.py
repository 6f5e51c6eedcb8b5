"""Guided dropout for ONNX models trained with ONNX Runtime Training (onnxruntime-training 1.19).

A thin translator over :mod:`gd_core`:

- :func:`sites` finds every ``Dropout`` node (a :class:`gd_core.Site` named like the PyTorch
  module it came from, so a profile computed in torch applies to the export) and the trainable
  initializers it guards;
- :func:`apply` gives each site its own ratio (an initializer ``<site>.ratio`` or, with
  ``ratios_as_inputs=True``, a graph input of that name so a schedule can change it every step),
  or with ``granularity="unit"`` per-unit rates (``<site>.rates``, one per feature of the last
  axis) realised by a small inverted-dropout subgraph, and by default runs
  :func:`prepare_for_training`, which declares the optional outputs ORT's gradient builders
  need;
- :func:`make_artifacts` wraps ``onnxruntime.training.artifacts.generate_artifacts``;
- :func:`estimate_fisher` / :func:`profile` compute the empirical Fisher diagonal from per-sample
  gradients read through ``onnxruntime.training.api`` with dropout switched off.

Parameter names are canonical (torch-style). ``torch.onnx`` keeps ``<module>.weight`` names when
constants are not folded; with folding a ``Linear`` weight becomes a transposed
``onnx::MatMul_N`` initializer, which is mapped back to ``<module>.weight`` from the MatMul
node's scope and reported (shapes and Fisher) in torch layout. ``onnxruntime.training`` is
imported only by the training functions (its package imports torch when torch is installed);
importing this module imports neither torch nor tensorflow. See ``docs/onnx.md``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gd_core.align import align, resolve, resolve_given
from gd_core.errors import ProfileMismatchError, bad_argument, no_sites
from gd_core.fingerprint import Fingerprint
from gd_core.fisher import FisherAccumulator, FisherResult
from gd_core.profile import SensitivityProfile
from gd_core.report import ApplyReport, ReportRow
from gd_core.schedules import Schedule
from gd_core.sites import Site, site_mapping

from . import _onnx_graph as _g
from . import _onnx_train as _t
from ._onnx_graph import (
    MAX_IR_VERSION,
    TRAINING_MODE_NAME,
    GraphIndex,
    Param,
    SiteInfo,
    onnx,
)
from ._onnx_train import Artifacts

__all__ = [
    "MAX_IR_VERSION",
    "Artifacts",
    "FisherResult",
    "OnnxApplyReport",
    "Param",
    "apply",
    "check_ort_compatible",
    "estimate_fisher",
    "fingerprint",
    "make_artifacts",
    "module_inputs",
    "parameters",
    "prepare_for_training",
    "profile",
    "ratio_feeds",
    "site_nodes",
    "sites",
]

ModelLike = Any  # onnx.ModelProto, or a path to a .onnx file


def _load(model: ModelLike, arg: str = "model_proto") -> Any:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise bad_argument(
                arg, "an onnx.ModelProto or a path to a .onnx file", str(path), "check the path"
            )
        return onnx.load(str(path))
    raise bad_argument(
        arg,
        "an onnx.ModelProto or a path to a .onnx file",
        type(model).__name__,
        "pass onnx.load('model.onnx')",
    )


def _copy(model: Any) -> Any:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _discover(
    model: Any, arg: str = "model_proto", exclusive: bool = True, mapping: Any = None
) -> tuple[list[SiteInfo], dict[str, Param]]:
    infos, params = _g.discover(model, exclusive)
    if not infos:
        raise no_sites(
            "export in training mode so dropout is kept: torch.onnx.export(..., "
            "training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)",
            arg=arg,
            detail=f"an ONNX graph of {len(model.graph.node)} nodes without Dropout",
        )
    if mapping is not None:
        _override_params(infos, params, mapping)
    return infos, params


def _override_params(infos: list[SiteInfo], table: Mapping[str, Param], mapping: Any) -> None:
    """Replace the guarded parameters of the sites ``mapping`` names (in place)."""
    given = site_mapping(
        mapping, [i.site.name for i in infos], sites_hint="adapters.onnx.sites(model)"
    )
    for info in infos:
        if info.site.name not in given:
            continue
        params = given[info.site.name]
        onnx_names = _onnx_names(params, table, f"mapping[{info.site.name!r}]")
        canonical = tuple(table[n].name for n in onnx_names)
        info.site = Site(info.site.name, canonical, info.site.units, kind="node")


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def sites(model_proto: ModelLike, mapping: Any = None, *, exclusive: bool = True) -> list[Site]:
    """Every Dropout site of the graph, in graph order, with the parameters it guards.

    A site is named like the PyTorch module it was exported from
    (``/bert/encoder/layer.0/output/dropout/Dropout`` -> ``bert.encoder.layer.0.output.dropout``;
    the functional attention-probability dropout ``/.../attention/self/Dropout`` ->
    ``...attention.self.dropout``). Dropout nodes with the same name (a module called twice) form
    one site. A site guards the trainable initializers that MatMul/Gemm/Add/Mul/Gather/
    LayerNormalization nodes consume upstream of it, back to the previous Dropout or the graph
    inputs (MatMul weights reached through a Transpose count). A residual stream carries every
    earlier normalisation layer's output to every later site; with ``exclusive`` (default) a
    parameter reached from several sites is guarded only by the first of them in graph order
    (the dropout right after it), with ``exclusive=False`` by all of them. ``mapping``
    ({site: [parameter names]} or a function site -> names or None; canonical or ONNX names)
    overrides the guarded parameters of the sites it names.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> [(s.name, s.params) for s in sites(example_model())]
        [('dropout', ('dense.weight', 'dense.bias')), ('head_drop', ('head.weight', 'head.bias'))]
    """
    model = _load(model_proto)
    return [i.site for i in _discover(model, exclusive=exclusive, mapping=mapping)[0]]


def site_nodes(model_proto: ModelLike) -> dict[str, list[str]]:
    """``{site: names of the Dropout nodes realising it}``.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> site_nodes(example_model())
        {'dropout': ['/dropout/Dropout'], 'head_drop': ['/head_drop/Dropout']}
    """
    return {i.site.name: list(i.node_names) for i in _discover(_load(model_proto))[0]}


def parameters(model_proto: ModelLike) -> list[Param]:
    """The trainable initializers (float, at least one axis) with their canonical names.

    ``transposed`` marks an initializer holding the transpose of the torch tensor (a folded
    ``onnx::MatMul_N``); ``shape`` is the torch shape.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> p = parameters(example_model())[0]
        >>> p.onnx_name, p.name, p.transposed
        ('onnx::MatMul_7', 'dense.weight', True)
    """
    return list(_g.param_table(_load(model_proto)).values())


def fingerprint(model_proto: ModelLike) -> Fingerprint:
    """Canonical names and torch-layout shapes of the model's trainable initializers.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> dict(fingerprint(example_model()).params)["head.weight"]
        (2, 4)
    """
    return Fingerprint.from_shapes((p.name, p.shape) for p in parameters(model_proto))


def check_ort_compatible(model_proto: ModelLike) -> None:
    """Raise an error naming the fix if onnxruntime-training 1.19 cannot load the model.

    It loads IR versions up to 10 (what onnx 1.17 writes) and opsets up to 21.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> m = example_model(); m.ir_version = 11
        >>> check_ort_compatible(m)
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: model_proto: expected an ONNX model with IR version <= 10 ...
    """
    _g.check_ort_compatible(_load(model_proto))


# ---------------------------------------------------------------------------------------------
# repairs
# ---------------------------------------------------------------------------------------------
def prepare_for_training(model_proto: ModelLike) -> tuple[Any, list[str]]:
    """A copy of the model that ORT's gradient builder accepts, and the list of changes made.

    - ``LayerNormalization`` (a torch export at opset >= 17): its optional ``Mean`` and
      ``InvStdDev`` outputs are declared (ORT's LayerNormalization gradient reads them;
      without them ``generate_artifacts`` fails with ``i < node_->OutputDefs().size()``).
    - ``Dropout`` without its optional ``mask`` output (torch's export of
      ``scaled_dot_product_attention``): the mask output is declared, for the same reason.

    Raises an error for an IR version ORT 1.19 cannot load. Idempotent.

    Example:
        >>> from onnx import helper, TensorProto
        >>> ln = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="/ln/LN")
        >>> g = helper.make_graph([ln], "g",
        ...     [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
        ...      for n, s in (("x", [2, 4]), ("g", [4]), ("b", [4]))],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> fixed, changes = prepare_for_training(m)
        >>> list(fixed.graph.node[0].output), len(changes)
        (['y', 'y.gd_mean', 'y.gd_inv_std_dev'], 1)
    """
    model = _load(model_proto)
    _g.check_ort_compatible(model)
    out = _copy(model)
    changes = _g.repair_in_place(out)
    return out, changes


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------
@dataclass
class OnnxApplyReport(ApplyReport):
    """:class:`gd_core.report.ApplyReport` plus what is particular to a rewritten ONNX graph.

    Attributes:
        ratio_inputs: ``{site: graph input name}`` when ``ratios_as_inputs=True``.
        ratio_names: ``{site: ratio tensor name}`` (initializer or input; ``<site>.rates`` for
            per-unit sites).
        unit_rates: ``{site: per-unit rates}`` of the sites given unit granularity (arrays of the
            dropped tensor's element type, one rate per feature of its last axis).
        nodes: ``{site: Dropout node names}``.
        absent: profile sites (after renaming) with no Dropout node in the graph, e.g.
            attention-probability dropout an exporter folded away.
        activated: sites whose nodes were inert (no ``training_mode``) and now train.
        changes: what :func:`prepare_for_training` changed.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> _, report = apply(example_model(), {"dropout": 0.05})
        >>> report.probabilities(), report.counts()
        ({'dropout': 0.05, 'head_drop': 0.1}, {'given': 1, 'keep': 1})
    """

    ratio_inputs: dict[str, str] = field(default_factory=dict)
    ratio_names: dict[str, str] = field(default_factory=dict)
    unit_rates: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


def _as_profile(profile: Any) -> SensitivityProfile | dict[str, float]:
    if isinstance(profile, SensitivityProfile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return SensitivityProfile.load(profile)
    if isinstance(profile, Mapping):
        out = {}
        for k, v in profile.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise bad_argument(f"profile[{k!r}]", "a probability in [0, 1)", v, "pass 0.1")
            if not 0.0 <= float(v) < 1.0:
                raise bad_argument(f"profile[{k!r}]", "a probability in [0, 1)", v, "pass 0.1")
            out[str(k)] = float(v)
        return out
    raise bad_argument(
        "profile",
        "a SensitivityProfile, a path to a saved one, or a dict {site: probability}",
        type(profile).__name__,
        "compute one with adapters.onnx.profile(...) or adapters.torch.profile(...)",
    )


def _check_params(prof: SensitivityProfile, table: Mapping[str, Param]) -> None:
    """Same model = every profiled parameter that is an initializer here has the same shape.

    A task head the profile lacks is fine, and so is a profiled parameter the export dropped (an
    unused pooler, say); but a profile whose parameters overlap none of this graph's is refused.
    """
    mine = {p.name: p.shape for p in table.values()}
    problems: list[str] = []
    overlap = 0
    if prof.fingerprint is not None:
        for name, shape in prof.fingerprint.params:
            if name in mine:
                overlap += 1
                if tuple(shape) != mine[name]:
                    problems.append(f"{name}: shape {tuple(shape)} in profile vs {mine[name]}")
    for name, size in prof.tensor_sizes.items():
        if name in mine:
            overlap += 1
            if int(np.prod(mine[name], dtype=np.int64)) != int(size):
                problems.append(f"{name}: {size} elements in profile vs shape {mine[name]}")
    known = (len(prof.fingerprint) if prof.fingerprint is not None else 0) + len(prof.tensor_sizes)
    if known and not overlap and mine:
        some = [n for n, _ in (prof.fingerprint.params if prof.fingerprint else ())][:2]
        some = some or list(prof.tensor_sizes)[:2]
        problems.append(
            f"none of its parameters (e.g. {some}) is an initializer of this graph (which has "
            f"e.g. {list(mine)[:2]})"
        )
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ProfileMismatchError(
            "profile: expected a profile computed on this model's parameters, received one from "
            f"a different model ({'; '.join(problems[:4])}{more}); fix: compute a profile for "
            "this model (adapters.onnx.profile, or adapters.torch.profile on the model you "
            "exported), or pass strict=False if the difference is intended"
        )


def _f32(x: float) -> float:
    """A float32 value as the shortest decimal that rounds to it (0.1, not 0.10000000149)."""
    return float(str(np.float32(x)))


def _owned_by(index: GraphIndex, name: str, nodes: Sequence[int]) -> bool:
    """True when ``name`` is consumed only as the ratio of ``nodes`` (a previous ``apply``)."""
    uses = index.consumers.get(name, [])
    return bool(uses) and all(i in nodes and j == 1 for i, j in uses)


def _refuse_unit_rewritten(model: Any) -> None:
    found = _g.unit_dropouts(model)
    if found:
        raise bad_argument(
            "model_proto",
            "an ONNX graph with Dropout nodes (an export, or the result of a site-level apply)",
            f"a graph apply(granularity='unit') already rewrote ({len(found)} per-unit dropout(s), "
            f"e.g. site {found[0].site!r})",
            "apply the profile to the original export",
        )


def _unit_width(
    info: SiteInfo,
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
            self.signal_nodes, self.signal = _g.mode_signal_nodes(self.taken)
        return self.signal

    def rewrite(
        self,
        info: SiteInfo,
        p: float,
        source: str,
        old: float,
        width: int,
        dtype: int,
        rates: np.ndarray | None,
        *,
        ratios_as_inputs: bool,
        activate: bool,
        report: OnnxApplyReport,
    ) -> ReportRow:
        site = info.site.name
        values = np.full(width, p) if rates is None else np.asarray(rates, dtype=np.float64)
        if not np.all((values >= 0) & (values < 1)):
            raise bad_argument(
                f"rates of site {site!r}", "probabilities in [0, 1)", values, "lower p_upper"
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
        scale_nodes, keep_scale = _g.rate_scale_nodes(site, rname, dtype, self.taken)
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
            used = _g._has_output(node, 1) and (
                node.output[1] in self.index.consumers or node.output[1] in self.index.outputs
            )
            extra += _g.unit_dropout_nodes(
                node,
                site=site,
                rates=rname,
                keep_scale=keep_scale,
                cond=cond,
                dtype=dtype,
                mask=used,
                taken=self.taken,
            )
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


def apply(
    model_proto: ModelLike,
    profile: Any,
    mapping: str | Mapping[str, Any] | None = None,
    ratios_as_inputs: bool = False,
    missing: str = "keep",
    strict: bool = True,
    *,
    repair: bool = True,
    activate: bool = True,
    check: bool = True,
    seed: int | None = None,
    granularity: str = "site",
    spread: float = 1.0,
) -> tuple[Any, OnnxApplyReport]:
    """Rewrite every Dropout's ratio from a profile; returns ``(new ModelProto, report)``.

    ``profile`` is a :class:`gd_core.SensitivityProfile` (e.g. from ``adapters.torch.profile``
    on the model you exported), a path to a saved one, or ``{site: probability}``. Its names are
    matched to the graph's sites with a prefix renaming (``gd_core.align``). With ``strict``
    (see ``docs/onnx.md``, "same model"): a profile whose sites match none of the graph's, or
    whose parameters that exist here as initializers have other shapes (or that shares no
    parameter with the graph), raises :class:`gd_core.ProfileMismatchError`. ``mapping``
    overrides the profile's score-to-probability mapping; sites the profile lacks follow
    ``missing`` (``keep`` | ``upper`` | ``error``); profile sites with no Dropout node are listed
    in ``report.absent``.

    Each site gets its own float ratio named ``<site>.ratio``: an initializer, or with
    ``ratios_as_inputs=True`` a scalar float graph input (feed it every step, see
    :func:`ratio_feeds`). Shared ratio constants are never modified; ones left unused are
    removed. ``training_mode`` inputs are kept; with ``activate`` a node without one (inert, as
    torch's SDPA export emits for attention probabilities) gets a ``True`` one so the site
    trains. ``repair`` runs :func:`prepare_for_training`. With ``check`` the result must pass
    ``onnx.checker.check_model(full_check=True)`` and strict shape inference. ``seed`` sets the
    Dropout nodes' ``seed`` attributes (``seed``, ``seed + 1``, ... in graph order) so that the
    masks a session draws are reproducible.

    ``granularity="unit"`` gives each site whose dropped tensor has a static feature axis (the
    last) one rate per feature: the profile's per-unit probabilities
    (``profile.unit_probabilities``, mean = the site's p, ``spread`` as there) or, for a site
    without unit scores, its p for every unit. Its Dropout nodes are replaced by
    ``Where(training, x * Cast(RandomUniformLike(x) >= r) / (1 - r), x)`` with ``r`` the float
    initializer (or, with ``ratios_as_inputs``, the graph input) ``<site>.rates`` of shape
    ``[units]``; ``training`` is True in the training graph and False in the eval graph
    ``generate_artifacts`` derives (and False where the node's own ``training_mode`` is). Sites
    without a static feature axis, e.g. attention-probability dropout (last axis = key sequence),
    stay site level; their report rows say why. Rows of unit sites carry ``units``.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> m, report = apply(example_model(), {"dropout": 0.0, "head_drop": 0.2},
        ...                   ratios_as_inputs=True)
        >>> report.ratio_inputs
        {'dropout': 'dropout.ratio', 'head_drop': 'head_drop.ratio'}
        >>> [i.name for i in m.graph.input]
        ['x', 'dropout.ratio', 'head_drop.ratio']
        >>> m, report = apply(example_model(), {"dropout": 0.1}, granularity="unit")
        >>> report["dropout"].units, report["dropout"].new_p, report.ratio_names["dropout"]
        (4, 0.1, 'dropout.rates')
    """
    model = _load(model_proto)
    _g.check_ort_compatible(model)
    _g.check_dropout_opset(model)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise bad_argument("seed", "an int or None", seed, "pass e.g. seed=0")
    if granularity not in ("site", "unit"):
        raise bad_argument("granularity", "'site' or 'unit'", granularity, "use granularity='site'")
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread <= 1:
        raise bad_argument("spread", "a float in [0, 1]", spread, "pass e.g. spread=1.0")
    _refuse_unit_rewritten(model)
    out = _copy(model)
    infos, table = _discover(out)
    names = [i.site.name for i in infos]
    current = {i.site.name: (i.ratio if i.ratio is not None else 0.0) for i in infos}
    prof = _as_profile(profile)
    notes: list[str] = []
    unit_p: dict[str, np.ndarray] = {}
    if isinstance(prof, SensitivityProfile):
        aligned = align(prof, names, None, strict=strict)
        if strict:
            _check_params(aligned, table)
        resolved = resolve(aligned, names, current, mapping=mapping, missing=missing)
        if granularity == "unit":
            from_profile = {s: p for s, (p, src) in resolved.items() if src == "profile"}
            unit_p = aligned.unit_probabilities(from_profile, spread=float(spread))
        absent = [s for s in aligned.site_names if s not in set(names)]
        if aligned.site_names != prof.site_names:
            notes.append(
                f"profile sites renamed to this graph's names (e.g. {prof.site_names[0]!r} -> "
                f"{aligned.site_names[0]!r})"
            )
    else:
        resolved, absent = resolve_given(
            prof,
            names,
            current,
            mapping=mapping,
            missing=missing,
            allow_absent=True,
            strict=strict,
            sites_hint="adapters.onnx.sites(model)",
        )
    if absent:
        notes.append(
            f"{len(absent)} profile site(s) have no Dropout node in this graph (the exporter "
            f"folded them away or the model differs): {absent[:4]}"
        )
    flipped = [p for p in table.values() if p.transposed]
    if flipped:
        notes.append(
            f"{len(flipped)} initializer(s) hold a torch weight transposed (e.g. "
            f"{flipped[0].onnx_name} = {flipped[0].name}); names, shapes and Fisher are given "
            "in torch layout"
        )

    index = GraphIndex(out.graph)
    taken = index.names()
    replaced: list[str] = []
    drop_names: set[str] = set()
    new_inits: list[Any] = []
    new_inputs: list[Any] = []
    rows: list[ReportRow] = []
    report = OnnxApplyReport(framework="onnx", granularity=granularity)
    tm_name: str | None = None
    types = _g.inferred_types(out) if granularity == "unit" else {}
    unit = _UnitRewrite(index, taken)
    for info in infos:
        site = info.site.name
        p, source = resolved[site]
        report.nodes[site] = list(info.node_names)
        old = (_f32(info.ratio) if info.ratio is not None else math.nan) if info.active else 0.0
        if info.ratio is None and source == "keep":
            rows.append(
                ReportRow(site, old, old, source, note="ratio is not a constant; left as is")
            )
            continue
        states = [_g.dropout_state(index, out.graph.node[i])[1] for i in info.nodes]
        if not activate and all(a is False for a in states):
            rows.append(
                ReportRow(
                    site,
                    0.0,
                    0.0,
                    source,
                    note="inert (no training_mode): left as is; pass activate=True to train it",
                )
            )
            continue
        level_note = ""
        if granularity == "unit":
            width, dtype, why = _unit_width(info, index, types, unit_p.get(site))
            if width is not None:
                row = unit.rewrite(
                    info,
                    p,
                    source,
                    old,
                    width,
                    dtype,
                    unit_p.get(site),
                    ratios_as_inputs=ratios_as_inputs,
                    activate=activate,
                    report=report,
                )
                rows.append(row)
                continue
            level_note = f"site level: {why}"
        rname = f"{site}.ratio"
        if rname in taken and _owned_by(index, rname, info.nodes):
            drop_names.add(rname)  # this graph went through apply before: replace our own ratio
        elif rname in taken:
            rname = _g.unique_name(rname, taken)
        else:
            taken.add(rname)
        note = ""
        for i in info.nodes:
            node = out.graph.node[i]
            while len(node.input) < 2:
                node.input.append("")
            if node.input[1] != rname:
                replaced.append(node.input[1])
                node.input[1] = rname
            _, active = _g.dropout_state(index, node)
            if activate and active is False:
                if tm_name is None:
                    tm_name = _g.unique_name(TRAINING_MODE_NAME, taken)
                    new_inits.append(onnx.numpy_helper.from_array(np.array(True), tm_name))
                while len(node.input) < 3:
                    node.input.append("")
                replaced.append(node.input[2])
                node.input[2] = tm_name
                if site not in report.activated:
                    report.activated.append(site)
                note = "was inert (no training_mode); activated"
        value = np.array(p, dtype=np.float32)
        if ratios_as_inputs:
            new_inputs.append(onnx.helper.make_tensor_value_info(rname, onnx.TensorProto.FLOAT, []))
            report.ratio_inputs[site] = rname
        else:
            new_inits.append(onnx.numpy_helper.from_array(value, rname))
        report.ratio_names[site] = rname
        note = "; ".join(n for n in (level_note, note) if n)
        rows.append(ReportRow(site, old, _f32(p), source, note=note))

    replaced.extend(unit.replaced)
    drop_names.update(unit.drop_names)
    new_inits.extend(unit.new_inits)
    new_inputs.extend(unit.new_inputs)
    unit.splice(out)
    if granularity == "unit":
        n_unit = sum(r.units is not None for r in rows)
        notes.append(
            f"unit granularity: {n_unit} site(s) per unit, {len(rows) - n_unit} at site level "
            "(their rows say why)"
        )
    if drop_names:
        keep_inits = [t for t in out.graph.initializer if t.name not in drop_names]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep_inits)
        keep_inputs = [v for v in out.graph.input if v.name not in drop_names]
        del out.graph.input[:]
        out.graph.input.extend(keep_inputs)
    out.graph.initializer.extend(new_inits)
    out.graph.input.extend(new_inputs)
    _g.prune_unused(out, replaced)
    if seed is not None:
        _g.set_seeds(out, int(seed))
    if repair:
        report.changes = _g.repair_in_place(out)
    if check:
        _check_model(out)
    report.rows = rows
    report.absent = absent
    report.notes = notes + _summarise_changes(report.changes)
    return out, report


def _summarise_changes(changes: Sequence[str]) -> list[str]:
    """One note per kind of repair (the full list is ``report.changes``)."""
    kinds = {
        "LayerNormalization": "declared Mean/InvStdDev outputs of {n} LayerNormalization node(s)",
        "mask output": "declared the mask output of {n} Dropout node(s)",
        "ratio set to 0": "set the ratio of {n} inert Dropout node(s) to 0",
    }
    out = []
    for key, text in kinds.items():
        n = sum(key in c for c in changes)
        if n:
            out.append("repair: " + text.format(n=n) + " for ORT training (report.changes)")
    return out


def _check_model(model: Any) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise bad_argument(
            "model_proto",
            "a graph that passes onnx.checker.check_model(full_check=True) after rewriting",
            f"{type(exc).__name__}: {str(exc)[:300]}",
            "check the input model with onnx.checker first (or pass check=False to skip)",
        ) from exc


# ---------------------------------------------------------------------------------------------
# feeds
# ---------------------------------------------------------------------------------------------
def ratio_feeds(
    report: OnnxApplyReport | Mapping[str, float],
    *,
    schedule: Schedule | None = None,
    step: int = 0,
    multiplier: float = 1.0,
) -> dict[str, np.ndarray]:
    """Values for the ratio inputs of a graph rewritten with ``ratios_as_inputs=True``.

    Each site's probability times ``multiplier`` (times ``schedule.multiplier(step)``), as a
    float32 scalar keyed by input name; for a per-unit site (``granularity="unit"``) its rates
    times the same factor, as a vector of the rates' type. ``report`` is :func:`apply`'s report,
    or ``{site: p}`` for inputs named ``<site>.ratio``.

    Example:
        >>> from gd_core import Schedule
        >>> feeds = ratio_feeds({"enc.dropout": 0.1}, schedule=Schedule("linear_warmup", 10),
        ...                     step=5)
        >>> {k: round(float(v), 4) for k, v in feeds.items()}
        {'enc.dropout.ratio': 0.05}
    """
    vectors: Mapping[str, np.ndarray] = {}
    if isinstance(report, OnnxApplyReport):
        probs = report.probabilities()
        names = dict(report.ratio_inputs)
        vectors = report.unit_rates
        if not names:
            raise bad_argument(
                "report",
                "the report of apply(..., ratios_as_inputs=True)",
                "a report of a graph whose ratios are constants",
                "call apply(model, profile, ratios_as_inputs=True)",
            )
    elif isinstance(report, Mapping):
        probs = {str(k): float(v) for k, v in report.items()}
        names = {k: f"{k}.ratio" for k in probs}
    else:
        raise bad_argument(
            "report", "an OnnxApplyReport or {site: p}", type(report).__name__, "pass the report"
        )
    scale = float(multiplier) * (schedule.multiplier(step) if schedule is not None else 1.0)
    out = {}
    for site, name in names.items():
        if site in vectors:
            rates = np.asarray(vectors[site], dtype=np.float64) * scale
            if not np.all((rates >= 0.0) & (rates < 1.0)):
                raise bad_argument(
                    f"rates of {site!r}",
                    "probabilities in [0, 1)",
                    f"max {rates.max():.4g}",
                    "lower multiplier",
                )
            out[name] = rates.astype(vectors[site].dtype)
            continue
        p = probs[site] * scale
        if not 0.0 <= p < 1.0:
            raise bad_argument(
                f"ratio of {site!r}", "a probability in [0, 1)", p, "lower multiplier"
            )
        out[name] = np.array(p, dtype=np.float32)
    return out


def module_inputs(module: Any, feeds: Mapping[str, Any]) -> list[Any]:
    """``feeds`` as the positional arguments ``onnxruntime.training.api.Module`` expects.

    Example:
        >>> class FakeModule:
        ...     training = True
        ...     def input_names(self): return ["x", "drop.ratio", "labels"]
        >>> module_inputs(FakeModule(), {"labels": 2, "x": 0, "drop.ratio": 1})
        [0, 1, 2]
    """
    return _t.module_inputs(list(module.input_names()), feeds)


# ---------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------
def _onnx_names(names: Iterable[str], table: Mapping[str, Param], arg: str) -> list[str]:
    by_canonical = {p.name: p.onnx_name for p in table.values()}
    out, unknown = [], []
    for n in names:
        if n in table:
            out.append(n)
        elif n in by_canonical:
            out.append(by_canonical[n])
        else:
            unknown.append(n)
    if unknown:
        raise bad_argument(
            arg,
            "names of trainable initializers (ONNX or canonical names)",
            unknown[:3],
            f"use names such as {[p.name for p in table.values()][:3]}",
        )
    return list(dict.fromkeys(out))


def _ratio_inputs(model: Any) -> dict[str, str]:
    """``{site: input}`` for graph inputs used as a Dropout ratio or as per-unit rates."""
    index = GraphIndex(model.graph)
    out = {}
    for info in _g.discover(model)[0]:
        for i in info.nodes:
            node = index.nodes[i]
            if len(node.input) > 1 and node.input[1] in index.inputs:
                out[info.site.name] = node.input[1]
    for unit in _g.unit_dropouts(model):
        if unit.rates in index.inputs:
            out[unit.site] = unit.rates
    return out


def _applies_dropout(model: Any, infos: Sequence[SiteInfo]) -> bool:
    """Whether fixed (non-input) ratios or rates make the training graph drop anything."""
    if any(i.active and (i.ratio or 0) > 0 for i in infos):
        return True
    index = GraphIndex(model.graph)
    for unit in _g.unit_dropouts(model):
        rates = index.constant(unit.rates)
        if unit.rates not in index.inputs and (rates is None or np.any(rates > 0)):
            return True
    return False


def make_artifacts(
    model_proto: ModelLike,
    out_dir: str | os.PathLike[str],
    loss: Any = "cross_entropy",
    requires_grad: Sequence[str] | None = None,
    *,
    optimizer: str | None = "adamw",
    output: str | None = None,
    repair: bool = True,
) -> Artifacts:
    """Training, eval and optimizer graphs plus checkpoint for ``onnxruntime.training.api``.

    Wraps ``onnxruntime.training.artifacts.generate_artifacts``: ``loss`` is ``cross_entropy``
    (``labels``: int64 class ids), ``mse`` / ``l1`` (``target``), ``bce`` or an ORT
    ``LossType``/``onnxblock.Block``; ``requires_grad`` (ONNX or canonical names) defaults to
    every trainable initializer, the rest are frozen; ``optimizer`` is ``adamw``, ``sgd`` or None;
    ``output`` picks the graph output the loss reads (default: the first). The files are written
    to a temporary folder and moved into ``out_dir``; ``gd_artifacts.json`` records the
    parameter names and ratio inputs for :func:`estimate_fisher`.

    Example:
        >>> import tempfile
        >>> from adapters._onnx_graph import example_model
        >>> m, _ = apply(example_model(), {"dropout": 0.1})
        >>> art = make_artifacts(m, tempfile.mkdtemp(), loss="mse")
        >>> sorted(art.requires_grad)[:2], art.optimizer_model.exists()
        (['dense.bias', 'head.bias'], True)
    """
    model = _load(model_proto)
    _g.check_ort_compatible(model)
    if repair:
        model, _ = prepare_for_training(model)
    table = _g.param_table(model)
    if not table:
        raise bad_argument(
            "model_proto", "a graph with float initializers to train", "none", "export weights"
        )
    if requires_grad is None:
        trained = list(table)
    else:
        if isinstance(requires_grad, str):
            raise bad_argument("requires_grad", "a list of names", requires_grad, "wrap in [ ]")
        trained = _onnx_names(requires_grad, table, "requires_grad")
    frozen = [n for n in table if n not in set(trained)]
    ratio_inputs = _ratio_inputs(model)
    infos = _g.discover(model)[0]
    if not infos and not _g.unit_dropouts(model):
        dropout = "none"
    elif ratio_inputs:
        dropout = "inputs"
    else:
        dropout = "constant" if _applies_dropout(model, infos) else "off"
    meta = Artifacts(
        Path(out_dir),
        requires_grad=trained,
        params={n: [table[n].name, table[n].transposed] for n in trained},
        ratio_inputs=ratio_inputs,
        loss=loss if isinstance(loss, str) else type(loss).__name__,
        dropout=dropout,
    )
    return _t.generate(
        model,
        out_dir,
        requires_grad=trained,
        frozen=frozen,
        loss=loss,
        optimizer=optimizer,
        output=output,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------
def _dropout_off(model: Any) -> Any:
    """A copy whose Dropout nodes have no training_mode input (inference semantics: identity).

    :func:`prepare_for_training` then sets their ratios to 0, without which ORT 1.19 would scale
    the gradients through them by ``1 / (1 - ratio)``. Per-unit dropouts are removed (their
    consumers read their input).
    """
    out = _copy(model)
    _g.remove_unit_dropout(out)
    dropped = []
    for node in out.graph.node:
        if node.op_type == "Dropout" and node.domain in _g.DEFAULT_DOMAINS and len(node.input) > 2:
            dropped.append(node.input[2])
            del node.input[2:]
    _g.prune_unused(out, dropped)
    return out


def _drop_unused_inputs(model: Any, names: Iterable[str]) -> None:
    """Remove graph inputs among ``names`` that no node consumes anymore."""
    index = GraphIndex(model.graph)
    dead = {n for n in names if n not in index.consumers}
    if dead:
        keep = [v for v in model.graph.input if v.name not in dead]
        del model.graph.input[:]
        model.graph.input.extend(keep)


def _check_positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise bad_argument(name, "an int >= 1 or None", value, f"pass e.g. {name}=1000")
    return int(value)


def estimate_fisher(
    artifacts_dir_or_model: ModelLike | Artifacts,
    batches: Iterable[Any],
    loss: Any = "cross_entropy",
    params: Sequence[str] | None = None,
    max_samples: int | None = None,
    on_nonfinite: str = "raise",
    *,
    output: str | None = None,
    device: str = "cpu",
) -> FisherResult:
    """The empirical Fisher diagonal from per-sample gradients through ORT Training.

    Given a model (ModelProto or ``.onnx`` path), dropout-free training artifacts are built in a
    temporary folder: every Dropout loses its ``training_mode`` input, which makes it the
    identity (eval semantics), and ``loss`` (see :func:`make_artifacts`) is added. Given an
    artifact folder (or :class:`Artifacts`), its ratio inputs are fed 0; artifacts whose dropout
    is fixed in the graph are refused. For each sample: ``module.lazy_reset_grad()``, a
    train step on a batch of one, and the gradients from ``state.parameters[name].grad``;
    float64 sums of their squares go to a :class:`gd_core.FisherAccumulator`.

    ``batches`` yields dicts ``{input name: array}`` with the loss target as ``labels`` (or
    ``target``), or tuples in the training graph's input order; the batch axis of the model's
    inputs must be dynamic (or 1). ``params`` restricts the parameters (ONNX or canonical
    names). Keys of the result are canonical names, arrays in torch layout.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> x = np.ones((3, 4), np.float32); y = np.zeros((3, 2), np.float32)
        >>> f = estimate_fisher(example_model(), [{"x": x, "target": y}], loss="mse")
        >>> f.count, f["dense.weight"].shape
        (3, (4, 4))
    """
    max_samples = _check_positive("max_samples", max_samples)
    FisherAccumulator(on_nonfinite)  # type: ignore[arg-type]  # validate before any work
    if isinstance(artifacts_dir_or_model, Artifacts) or (
        isinstance(artifacts_dir_or_model, (str, os.PathLike))
        and Path(artifacts_dir_or_model).is_dir()
    ):
        art = (
            artifacts_dir_or_model
            if isinstance(artifacts_dir_or_model, Artifacts)
            else Artifacts.load(artifacts_dir_or_model)
        )
        return _fisher_from_artifacts(art, batches, params, max_samples, on_nonfinite, device)
    model = _load(artifacts_dir_or_model, "artifacts_dir_or_model")
    _g.check_ort_compatible(model, "artifacts_dir_or_model")
    fixed, _ = prepare_for_training(_dropout_off(model))  # the repair zeroes inert ratios
    _drop_unused_inputs(fixed, _ratio_inputs(model).values())
    with tempfile.TemporaryDirectory(prefix="gd-ort-fisher-") as tmp:
        art = make_artifacts(fixed, tmp, loss, params, optimizer=None, output=output, repair=False)
        return _fisher_from_artifacts(art, batches, None, max_samples, on_nonfinite, device)


def _fisher_from_artifacts(
    art: Artifacts,
    batches: Iterable[Any],
    params: Sequence[str] | None,
    max_samples: int | None,
    on_nonfinite: str,
    device: str,
) -> FisherResult:
    if art.dropout == "constant" or (
        art.dropout == "unknown"
        and _t.training_dropout(art.training_model, art.ratio_inputs.values())
    ):
        raise bad_argument(
            "artifacts_dir_or_model",
            "a model, or artifacts whose dropout can be switched off (ratios as inputs)",
            f"artifacts in {str(art.directory)!r} whose training graph applies dropout with "
            "fixed ratios",
            "pass the ONNX model itself (a dropout-free copy is trained), or build the "
            "artifacts from apply(..., ratios_as_inputs=True)",
        )
    vectors = _vector_ratio_inputs(art)
    if vectors:
        raise bad_argument(
            "artifacts_dir_or_model",
            "a model, or artifacts whose ratio inputs are scalars",
            f"artifacts in {str(art.directory)!r} with per-unit rate inputs {vectors[:3]}",
            "pass the ONNX model itself (a copy without dropout is trained)",
        )
    if not art.requires_grad:  # artifacts not made by make_artifacts: ask the checkpoint
        _, _, state = art.open(device, optimizer=False)
        art.requires_grad = [n for n, p in state.parameters if p.requires_grad]
    table = {}
    for n in art.requires_grad:
        canonical, transposed = art.params.get(n, [n, False])
        table[n] = Param(n, str(canonical), (), bool(transposed))
    if params is not None:
        wanted = set(_onnx_names(params, table, "params"))
        art.requires_grad = [n for n in art.requires_grad if n in wanted]
    acc = _t.per_sample_fisher(
        art,
        batches,
        params=table,
        max_samples=max_samples,
        on_nonfinite=on_nonfinite,
        device=device,
    )
    if acc.count == 0:
        raise bad_argument(
            "batches",
            "at least one sample with a finite loss",
            f"{acc.skipped} skipped sample(s)" if acc.skipped else "no batches",
            "pass a non-empty iterable of batches (and check the inputs for NaN)",
        )
    acc.metadata.update({"framework": "onnxruntime-training", "loss": art.loss})
    return FisherResult.from_accumulator(acc)


def _vector_ratio_inputs(art: Artifacts) -> list[str]:
    """Ratio inputs of the training graph that are vectors (per-unit rates)."""
    names = set(art.ratio_inputs.values())
    if not names or not art.training_model.is_file():
        return []
    model = onnx.load(str(art.training_model), load_external_data=False)
    return [
        v.name
        for v in model.graph.input
        if v.name in names and len(v.type.tensor_type.shape.dim) > 0
    ]


def profile(
    model_proto: ModelLike,
    batches: Iterable[Any],
    loss: Any = "cross_entropy",
    max_samples: int | None = None,
    on_nonfinite: str = "raise",
    *,
    sites: Any = None,
    aggregation: str = "tensor_mean",
    mapping: str | Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    output: str | None = None,
    device: str = "cpu",
) -> SensitivityProfile:
    """Estimate the Fisher diagonal of the guarded parameters and build a sensitivity profile.

    Sites and their guarded parameters come from :func:`sites` (``sites``: None, a site mapping
    as :func:`sites` takes, or a list of :class:`gd_core.Site` over canonical parameter names);
    ``mapping`` is the score-to-probability mapping stored in the profile. Its fingerprint is
    :func:`fingerprint` (canonical names, torch shapes), so it can be applied to this graph and,
    name for name, to the torch model it was exported from.

    Example:
        >>> from adapters._onnx_graph import example_model
        >>> x = np.ones((3, 4), np.float32); y = np.zeros((3, 2), np.float32)
        >>> prof = profile(example_model(), [{"x": x, "target": y}], loss="mse")
        >>> prof.site_names, prof.metadata["samples"]
        (['dropout', 'head_drop'], 3)
    """
    model = _load(model_proto)
    if isinstance(sites, Sequence) and not isinstance(sites, str):
        found = list(sites)
        _onnx_names([p for s in found for p in s.params], _g.param_table(model), "sites")
    else:
        found = [i.site for i in _discover(model, mapping=sites)[0]]
    guarded = list(dict.fromkeys(p for s in found for p in s.params))
    if not guarded:
        raise bad_argument(
            "model_proto",
            "Dropout sites that guard trainable initializers",
            "sites guarding none",
            "check that the weights are initializers (not Constant nodes) in the export",
        )
    fisher = estimate_fisher(
        model, batches, loss, guarded, max_samples, on_nonfinite, output=output, device=device
    )
    meta = {
        "framework": "onnxruntime-training",
        "samples": fisher.count,
        "skipped": fisher.skipped,
        "loss": loss if isinstance(loss, str) else type(loss).__name__,
        "model": model.graph.name,
        **dict(metadata or {}),
    }
    return SensitivityProfile.from_fisher(
        fisher,
        found,
        aggregation=aggregation,
        mapping=mapping,
        fingerprint=fingerprint(model),
        metadata=meta,
    )
