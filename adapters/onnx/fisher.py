"""Fisher estimation and profiles for ONNX models through ONNX Runtime Training.

The per-sample gradients come from ``onnxruntime.training.api``: one train step per batch whose
training graph also outputs what the closed-form rules of :mod:`adapters.onnx.persample` need,
and the exact loop (a train step on a batch of one per sample) for the parameters they do not
cover; the loop (``max_samples``, non-finite samples, progress, checkpoints) is
:func:`gd_core.fisher_loop.estimate`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np  # noqa: F401  (the examples use it)

from gd_core import fisher_loop as loop
from gd_core.cache import cache_dir
from gd_core.errors import ArgumentError, bad_argument
from gd_core.face import FisherOptions, FisherSettings, ProfileOptions, ProfileSettings
from gd_core.fisher import FisherResult
from gd_core.profile import SensitivityProfile
from gd_core.validate import check_choice, check_int

from . import graph as _g
from .discovery import ModelLike, _discover, _load, _onnx_names, fingerprint, prepare_for_training
from .graph import Param, onnx
from .persample import Engine, reported
from .train import (
    META_FORMAT,
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


def estimate_fisher(
    model: ModelLike | Artifacts,
    batches: Iterable[Any],
    loss: Any = "cross_entropy",
    *,
    params: Sequence[str] | None = None,
    output: str | None = None,
    device: str = "cpu",
    **options: Unpack[FisherOptions],
) -> FisherResult:
    """The empirical Fisher diagonal from per-sample gradients through ORT Training.

    Given a model (ModelProto or ``.onnx`` path), dropout-free training artifacts are built once
    per graph into ``cache_dir()/ort-artifacts/<sha256>`` and reused by later calls (the opened,
    checked engine too, within the process; a loss block other than a name: a temporary folder,
    per call): every Dropout loses its ``training_mode`` input, which makes it the
    identity (eval semantics), and ``loss`` (see :func:`make_artifacts`) is added. Given an
    artifact folder (or :class:`Artifacts`), its ratio inputs are fed 0; artifacts whose dropout
    is fixed in the graph are refused. One train step per batch (or per piece of at most
    ``chunk_size`` samples): the training graph also outputs the inputs and output gradients of
    the nodes that use each trained weight (MatMul, Gemm, Add/Sub/Mul by a weight, LayerNorm,
    Gather), from which closed-form rules give every sample's gradient; their squares are summed
    (float64 across batches) into a :class:`gd_core.FisherAccumulator`. A parameter no rule
    covers, or whose rule disagrees with the exact loop (a train step on a batch of one per
    sample, ``state.parameters[name].grad``) on the first batch, takes that loop; the result's
    ``accumulator.metadata`` says so (``fisher_engine``, ``fisher_fallback``: {name: reason};
    logged at INFO; docs/onnx.md). ``options`` are the Fisher loop's, the same in every adapter
    (:class:`gd_core.face.FisherOptions`).

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
    opts = FisherSettings.of(options, "estimate_fisher")
    check_int(opts.max_samples, "max_samples", 1, 1000, optional=True)
    check_int(opts.chunk_size, "chunk_size", 1, 8, optional=True)
    run = opts.loop()
    check_choice(opts.on_nonfinite, "on_nonfinite", loop.NONFINITE_POLICIES)  # before any work
    if isinstance(model, Artifacts) or (
        isinstance(model, (str, os.PathLike)) and Path(model).is_dir()
    ):
        art = model if isinstance(model, Artifacts) else Artifacts.load(model)
        return _fisher_from_artifacts(art, batches, params, device, run, opts.chunk_size)
    quick = _quick_key(model, loss, params, output, device)
    known = _KNOWN.get(quick) if quick is not None else None
    if known is not None and known in _ENGINES:  # the same file or graph as an earlier call
        _ENGINES.move_to_end(known)
        return _estimate(_ENGINES[known], batches, run, opts.chunk_size)
    proto = _load(model, "model")
    _g.check_ort_compatible(proto, "model")
    fixed, _ = prepare_for_training(_dropout_off(proto))  # the repair zeroes inert ratios
    _drop_unused_inputs(fixed, _ratio_inputs(proto).values())
    if not isinstance(loss, str):  # an ORT loss block: no stable key, built for this call only
        with tempfile.TemporaryDirectory(prefix="gd-ort-fisher-") as tmp:
            art = make_artifacts(
                fixed, tmp, loss, params, optimizer=None, output=output, repair=False
            )
            return _fisher_from_artifacts(art, batches, None, device, run, opts.chunk_size)
    digest = _graph_digest(fixed, loss, params, output)
    key = ("graph", digest, device, _PER_SAMPLE)
    if quick is not None:
        _KNOWN[quick] = key
        while len(_KNOWN) > 4 * KEEP_ENGINES:
            _KNOWN.popitem(last=False)
    engine = _ENGINES.get(key)
    if engine is not None:  # built, checked and opened by an earlier call in this process
        _ENGINES.move_to_end(key)
        return _estimate(engine, batches, run, opts.chunk_size)
    art = _cached_artifacts(fixed, digest, loss, params, output)
    return _fisher_from_artifacts(art, batches, None, device, run, opts.chunk_size, key=key)


def _quick_key(
    model: Any, loss: Any, params: Sequence[str] | None, output: str | None, device: str
) -> Any:
    """What identifies the model as given without preparing its graph: a file by path, size and
    modification time (ns), a ModelProto by the SHA-256 of its bytes; None for a loss block."""
    if not isinstance(loss, str):
        return None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            return None
        st = path.stat()
        source: Any = ("file", str(path.resolve()), st.st_size, st.st_mtime_ns)
    elif isinstance(model, onnx.ModelProto):
        source = ("proto", hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest())
    else:
        return None
    return (source, loss, tuple(params or ()), output, device, _PER_SAMPLE)


#: artifact folders kept in ``cache_dir()/ort-artifacts`` (the least recently used goes first)
KEEP_FOLDERS = 4
#: opened engines kept in this process (each holds an ORT Module with the model's weights)
KEEP_ENGINES = 2
_ENGINES: OrderedDict[Any, Engine] = OrderedDict()
#: the model as given (:func:`_quick_key`) -> its key in ``_ENGINES``
_KNOWN: OrderedDict[Any, Any] = OrderedDict()


def _graph_digest(fixed: Any, loss: str, params: Sequence[str] | None, output: str | None) -> str:
    """The content address of the artifacts of a prepared graph: the graph (weights included),
    the loss, the trained parameters, the loss's output and the library's artifact format."""
    h = hashlib.sha256(fixed.SerializeToString(deterministic=True))
    h.update(json.dumps([loss, list(params or []), output, META_FORMAT, 1]).encode())
    return h.hexdigest()


def _cached_artifacts(
    fixed: Any, digest: str, loss: str, params: Sequence[str] | None, output: str | None
) -> Artifacts:
    """Dropout-free artifacts of ``fixed``, built once into ``cache_dir()/ort-artifacts/<digest>``
    (one rename, see :func:`adapters.onnx.train.generate`) and reused by later calls, in this
    process or another. A cached folder whose files do not match its recorded digests (tampered,
    truncated) is rebuilt, with a warning saying why."""
    root = cache_dir() / "ort-artifacts"
    folder = root / digest[:32]
    if folder.is_dir():
        try:
            art = Artifacts.load(folder)
            os.utime(folder)  # most recently used
            return art
        except ArgumentError as exc:
            warnings.warn(
                f"estimate_fisher: the cached ONNX Runtime artifacts are rebuilt ({exc})",
                RuntimeWarning,
                stacklevel=3,
            )
    try:
        art = make_artifacts(
            fixed, folder, loss, params, optimizer=None, output=output, repair=False
        )
    except OSError:  # another process put the same artifacts in place meanwhile
        if not (folder / "training_model.onnx").is_file():
            raise
        art = Artifacts.load(folder)
    _prune(root, keep=folder)
    return art


def _prune(root: Path, keep: Path) -> None:
    """Remove all but the :data:`KEEP_FOLDERS` most recently used artifact folders."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders.sort(key=lambda p: (p == keep, p.stat().st_mtime))
    for old in folders[: max(0, len(folders) - KEEP_FOLDERS)]:
        shutil.rmtree(old, ignore_errors=True)


def _estimate(
    engine: Engine, batches: Iterable[Any], run: Mapping[str, Any], chunk_size: int | None
) -> FisherResult:
    engine.chunk_size = chunk_size
    engine.pending = {}
    result = loop.estimate(
        batches,
        engine,
        run={"loss": engine.loss},
        result=lambda acc: reported(acc, engine),
        **run,
    )
    result.accumulator.metadata["framework"] = "onnxruntime-training"
    return result


def _fisher_from_artifacts(
    art: Artifacts,
    batches: Iterable[Any],
    params: Sequence[str] | None,
    device: str,
    run: Mapping[str, Any],
    chunk_size: int | None = None,
    key: Any = None,
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
            f"artifacts with per-unit rate inputs {vectors[:3]} (in {str(art.directory)!r})",
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
    engine = Engine(art, table, device, per_sample=_PER_SAMPLE, chunk_size=chunk_size)
    if key is not None:
        _ENGINES[key] = engine
        while len(_ENGINES) > KEEP_ENGINES:
            _ENGINES.popitem(last=False)
    return _estimate(engine, batches, run, chunk_size)


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
    *,
    sites: Any = None,
    output: str | None = None,
    device: str = "cpu",
    **options: Unpack[ProfileOptions],
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
    opts = ProfileSettings.of(options, "profile")
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
        params=guarded,
        output=output,
        device=device,
        **opts.fisher(),
    )
    meta = {
        "framework": "onnxruntime-training",
        "samples": fisher.count,
        "skipped": fisher.skipped,
        "loss": loss if isinstance(loss, str) else type(loss).__name__,
        "model": proto.graph.name,
        **loop.engine_metadata(fisher),
    }
    return opts.finish(SensitivityProfile.from_fisher, fisher, found, fingerprint(proto), meta)
