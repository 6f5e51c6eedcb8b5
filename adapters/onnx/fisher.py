"""Fisher estimation and profiles for ONNX models through ONNX Runtime Training.

The per-sample gradients come from ``onnxruntime.training.api``: one train step per batch whose
training graph also outputs what the closed-form rules of :mod:`adapters.onnx.persample` need,
and the exact loop (a train step on a batch of one per sample) for the parameters they do not
cover; the loop (``max_samples``, non-finite samples, progress, checkpoints) is
:func:`gd_core.fisher_loop.estimate`'s.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np  # noqa: F401  (the examples use it)

from gd_core import cache as _cache
from gd_core import fisher_loop as loop
from gd_core.errors import bad_argument
from gd_core.fisher import FisherResult
from gd_core.profile import SensitivityProfile
from gd_core.validate import check_choice, check_int

from . import graph as _g
from .discovery import ModelLike, _discover, _load, _onnx_names, fingerprint, prepare_for_training
from .graph import Param, onnx
from .persample import Engine, reported
from .train import (
    Artifacts,
    _drop_unused_inputs,
    _dropout_off,
    _ratio_inputs,
    make_artifacts,
    training_dropout,
)

#: internal switch: False makes every parameter take the exact loop (one train step per sample),
#: as before the batched rules (tests compare the two)
_PER_SAMPLE = True
_REPORTED = ("fisher_engine", "fisher_fallback")  # carried into a profile's metadata


def estimate_fisher(
    model: ModelLike | Artifacts,
    batches: Iterable[Any],
    loss: Any = "cross_entropy",
    max_samples: int | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    *,
    params: Sequence[str] | None = None,
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
    float64 sums of their squares go to a :class:`gd_core.FisherAccumulator`. ORT Training
    computes one sample per step, so ``chunk_size`` may only be None or 1. ``max_samples``,
    ``progress``, ``on_nonfinite``, ``checkpoint``, ``checkpoint_every`` and ``resume`` are
    :func:`gd_core.fisher_loop.estimate`'s, as in every adapter.

    ``batches`` yields dicts ``{input name: array}`` with the loss target as ``labels`` (or
    ``target``), or tuples in the training graph's input order; the batch axis of the model's
    inputs must be dynamic (or 1). ``params`` restricts the parameters (ONNX or canonical
    names). Keys of the result are canonical names, arrays in torch layout.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> x = np.ones((3, 4), np.float32); y = np.zeros((3, 2), np.float32)
        >>> f = estimate_fisher(example_model(), [{"x": x, "target": y}], loss="mse",
        ...                     progress=False)
        >>> f.count, f["dense.weight"].shape
        (3, (4, 4))
    """
    check_int(max_samples, "max_samples", 1, 1000, optional=True)
    check_int(chunk_size, "chunk_size", 1, 1, optional=True)
    if chunk_size is not None and chunk_size != 1:
        raise bad_argument(
            "chunk_size",
            "None or 1 (ONNX Runtime Training computes one sample per step)",
            chunk_size,
            "omit chunk_size",
        )
    run = dict(
        max_samples=max_samples,
        progress=progress,
        on_nonfinite=on_nonfinite,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    check_choice(on_nonfinite, "on_nonfinite", loop.NONFINITE_POLICIES)  # before any work
    if isinstance(model, Artifacts) or (
        isinstance(model, (str, os.PathLike)) and Path(model).is_dir()
    ):
        art = model if isinstance(model, Artifacts) else Artifacts.load(model)
        return _fisher_from_artifacts(art, batches, params, device, run)
    proto = _load(model, "model")
    _g.check_ort_compatible(proto, "model")
    fixed, _ = prepare_for_training(_dropout_off(proto))  # the repair zeroes inert ratios
    _drop_unused_inputs(fixed, _ratio_inputs(proto).values())
    with tempfile.TemporaryDirectory(prefix="gd-ort-fisher-") as tmp:
        art = make_artifacts(fixed, tmp, loss, params, optimizer=None, output=output, repair=False)
        return _fisher_from_artifacts(art, batches, None, device, run)


def _fisher_from_artifacts(
    art: Artifacts,
    batches: Iterable[Any],
    params: Sequence[str] | None,
    device: str,
    run: Mapping[str, Any],
) -> FisherResult:
    if art.dropout == "constant" or (
        art.dropout == "unknown" and training_dropout(art.training_model, art.ratio_inputs.values())
    ):
        raise bad_argument(
            "model",
            "a model, or artifacts whose dropout can be switched off (ratios as inputs)",
            f"artifacts in {str(art.directory)!r} whose training graph applies dropout with "
            "fixed ratios",
            "pass the ONNX model itself (a dropout-free copy is trained), or build the "
            "artifacts from apply(..., ratios_as_inputs=True)",
        )
    vectors = _vector_ratio_inputs(art)
    if vectors:
        raise bad_argument(
            "model",
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
    engine = Engine(art, table, device, per_sample=_PER_SAMPLE)
    result = loop.estimate(
        batches,
        engine,
        run={"loss": art.loss},
        result=lambda acc: reported(acc, engine),
        **run,
    )
    result.accumulator.metadata["framework"] = "onnxruntime-training"
    return result


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
    model: ModelLike,
    batches: Iterable[Any],
    loss: Any = "cross_entropy",
    max_samples: int | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    *,
    sites: Any = None,
    aggregation: str = "tensor_mean",
    mapping: str | Mapping[str, Any] | None = None,
    cache: bool = False,
    metadata: Mapping[str, Any] | None = None,
    output: str | None = None,
    device: str = "cpu",
) -> SensitivityProfile:
    """Estimate the Fisher diagonal of the guarded parameters and build a sensitivity profile.

    Takes :func:`estimate_fisher`'s arguments, plus ``sites`` (None, a site mapping as
    :func:`sites` takes, or a list of :class:`gd_core.Site` over canonical parameter names),
    ``aggregation`` and ``mapping`` (the score-to-probability mapping stored in the profile),
    ``cache`` (store it in the per-user cache, where :func:`apply` with ``profile=None`` finds
    it) and ``metadata`` (merged into the profile's). Its fingerprint is :func:`fingerprint`
    (canonical names, torch shapes), so it can be applied to this graph and, name for name, to
    the torch model it was exported from.

    Example:
        >>> from adapters.onnx.graph import example_model
        >>> x = np.ones((3, 4), np.float32); y = np.zeros((3, 2), np.float32)
        >>> prof = profile(example_model(), [{"x": x, "target": y}], loss="mse", progress=False)
        >>> prof.site_names, prof.metadata["samples"]
        (['dropout', 'head_drop'], 3)
    """
    proto = _load(model, "model")
    if isinstance(sites, Sequence) and not isinstance(sites, str):
        found = list(sites)
        _onnx_names([p for s in found for p in s.params], _g.param_table(proto), "sites")
    else:
        found = [i.site for i in _discover(proto, "model", mapping=sites)[0]]
    guarded = list(dict.fromkeys(p for s in found for p in s.params))
    if not guarded:
        raise bad_argument(
            "model",
            "Dropout sites that guard trainable initializers",
            "sites guarding none",
            "check that the weights are initializers (not Constant nodes) in the export",
        )
    fisher = estimate_fisher(
        proto,
        batches,
        loss,
        max_samples,
        progress,
        chunk_size,
        on_nonfinite,
        checkpoint,
        checkpoint_every,
        resume,
        params=guarded,
        output=output,
        device=device,
    )
    meta = {
        "framework": "onnxruntime-training",
        "samples": fisher.count,
        "skipped": fisher.skipped,
        "loss": loss if isinstance(loss, str) else type(loss).__name__,
        "model": proto.graph.name,
        **{
            k: fisher.accumulator.metadata[k] for k in _REPORTED if k in fisher.accumulator.metadata
        },
        **dict(metadata or {}),
    }
    prof = SensitivityProfile.from_fisher(
        fisher,
        found,
        aggregation=aggregation,
        mapping=mapping,
        fingerprint=fingerprint(proto),
        metadata=meta,
    )
    if cache:
        _cache.store(prof)
    return prof
