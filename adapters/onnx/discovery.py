"""Discovery in ONNX graphs: :func:`sites`, :func:`fingerprint`, :func:`parameters`,
:func:`site_nodes`, and :func:`prepare_for_training` (repairs ORT training needs).

Parameter names are canonical (torch-style) and shapes in torch layout: ``torch.onnx`` keeps
``<module>.weight`` names when constants are not folded; with folding a ``Linear`` weight becomes
a transposed ``onnx::MatMul_N`` initializer, mapped back to ``<module>.weight`` from the MatMul
node's scope.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gd_core.errors import ArgumentError, bad_argument, no_sites
from gd_core.fingerprint import Fingerprint
from gd_core.sites import Site, site_mapping

from . import graph as _g
from . import rewrite as _r
from .graph import Param, SiteHandle, onnx
from .scopes import with_scopes

ModelLike = Any  # onnx.ModelProto, or a path to a .onnx file


def _load(model: ModelLike, arg: str = "model_proto") -> Any:
    """The ModelProto (loaded from a path); a graph of torch's default (dynamo) exporter comes
    back as a copy with scoped node names read from its metadata (:mod:`adapters.onnx.scopes`)."""
    return with_scopes(_load_proto(model, arg))[0]


def _load_proto(model: ModelLike, arg: str) -> Any:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise bad_argument(
                arg, "an onnx.ModelProto or a path to a .onnx file", str(path), "check the path"
            )
        if path.stat().st_size == 0:  # onnx.load would return an empty model without a word
            raise ArgumentError(
                f"{arg}: expected a .onnx file holding a model, received {str(path)!r}, an empty "
                "file (0 bytes); fix: export the model again (an interrupted export or copy "
                "leaves an empty file)"
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
    model: Any,
    arg: str = "model_proto",
    exclusive: bool = True,
    mapping: Any = None,
) -> tuple[list[SiteHandle], dict[str, Param]]:
    """Sites and parameters. A graph without Dropout nodes gets sites inserted
    (:mod:`adapters.onnx.insert`) into a copy (the handles then point at the copy's nodes)."""
    infos, params = _g.discover(model, exclusive)
    from .insert import insert_sites, wanted

    if wanted(model):  # no Dropout node, or only p = 0 ones: sites as torch adds them
        target = _copy(model)
        if insert_sites(target)[0]:
            infos, params = _g.discover(target, exclusive)
    if not infos:
        raise no_sites(
            "export in training mode so dropout is kept: torch.onnx.export(..., "
            "training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)",
            arg=arg,
            detail=f"an ONNX graph of {len(model.graph.node)} nodes without Dropout and without "
            "a residual stream to insert sites on",
        )
    if mapping is not None:
        _override_params(infos, params, mapping)
    return infos, params


def _override_params(infos: list[SiteHandle], table: Mapping[str, Param], mapping: Any) -> None:
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


def sites(model: ModelLike, mapping: Any = None, *, exclusive: bool = True) -> list[Site]:
    """Every Dropout site of the graph, in graph order, with the parameters it guards.

    A site is named like the PyTorch module it was exported from
    (``/bert/encoder/layer.0/output/dropout/Dropout`` -> ``bert.encoder.layer.0.output.dropout``;
    the functional attention-probability dropout ``/.../attention/self/Dropout`` ->
    ``...attention.self.dropout``). Dropout nodes with the same name (a module called twice) form
    one site. What a site guards is :mod:`gd_core.dataflow`'s rule on the graph (the same as the
    torch adapter's on the exported model): the trainable initializers of the computation whose
    output it drops, back to the previous Dropout or residual branch point. A graph the rule
    cannot read gets the upstream walk: the initializers MatMul/Gemm/Add/Mul/Gather/
    LayerNormalization nodes consume upstream of the Dropout, back to the previous Dropout, each
    going to the first site reaching it; ``exclusive=False`` asks for that walk with every site
    keeping all it reaches (a residual stream carries each norm's output to every later site).
    ``mapping`` ({site: [parameter names]} or a function site -> names or None; canonical or
    ONNX names) overrides the guarded parameters of the sites it names.

    A graph without Dropout nodes (an eval-mode export) gets the sites the torch adapter adds to
    a dropout-free model (:mod:`adapters.onnx.insert`): ``<module>.gd_dropout`` on the embedding
    output and on every residual branch, which :func:`apply` inserts as Dropout nodes.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> [(s.name, s.params) for s in sites(example_model())]
        [('dropout', ('dense.weight', 'dense.bias')), ('head_drop', ('head.weight', 'head.bias'))]
    """
    proto = _load(model, "model")
    return [i.site for i in _discover(proto, "model", exclusive, mapping)[0]]


def site_nodes(model_proto: ModelLike) -> dict[str, list[str]]:
    """``{site: names of the Dropout nodes realising it}``.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> site_nodes(example_model())
        {'dropout': ['/dropout/Dropout'], 'head_drop': ['/head_drop/Dropout']}
    """
    return {i.site.name: list(i.node_names) for i in _discover(_load(model_proto))[0]}


def parameters(model_proto: ModelLike) -> list[Param]:
    """The trainable initializers (float, at least one axis) with their canonical names.

    ``transposed`` marks an initializer holding the transpose of the torch tensor (a folded
    ``onnx::MatMul_N``); ``shape`` is the torch shape.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> p = parameters(example_model())[0]
        >>> p.onnx_name, p.name, p.transposed
        ('onnx::MatMul_7', 'dense.weight', True)
    """
    return list(_g.param_table(_load(model_proto)).values())


def fingerprint(model: ModelLike) -> Fingerprint:
    """Canonical names and torch-layout shapes of the model's trainable initializers.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> dict(fingerprint(example_model()).params)["head.weight"]
        (2, 4)
    """
    table = _g.param_table(_load(model, "model"))
    return Fingerprint.from_shapes((p.name, p.shape) for p in table.values())


def check_ort_compatible(model_proto: ModelLike) -> None:
    """Raise an error naming the fix if onnxruntime-training 1.19 cannot load the model.

    It loads IR versions up to 10 (what onnx 1.17 writes) and opsets up to 21.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> m = example_model(); m.ir_version = 11
        >>> check_ort_compatible(m)
        Traceback (most recent call last):
        ...
        gd_core.errors.ArgumentError: model_proto: expected an ONNX model with IR version <= 10 ...
    """
    _g.check_ort_compatible(_load(model_proto))


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
    changes = _r.repair_in_place(out)
    return out, changes


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
