"""Per-sample squared gradients of Keras 3 models on the TensorFlow and torch backends (private).

Each batch yields, in the framework, float64 sums over its samples of squared per-sample gradients
(plus per-sample loss finiteness); the loop (``max_samples``, non-finite samples, progress,
checkpoints) is :func:`gd_core.fisher_loop.estimate`'s.

TensorFlow: one forward and one backward per batch (:mod:`adapters.keras.persample`: each
supported layer's input and output gradient give its weights' per-sample gradients in closed
form); the weights it does not cover take ``tf.GradientTape.jacobian`` of the per-sample losses
(vectorised with pfor, falling back to a while loop if pfor cannot convert an op), inside a
``tf.function``.
torch: ``torch.func.vmap(torch.func.grad(...))`` with the model's weights substituted through
``keras.StatelessScope``; if vmap cannot run the model, a per-sample autograd loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Unpack

import numpy as np

from gd_core import fisher_loop as loop
from gd_core.errors import bad_argument
from gd_core.face import FisherOptions, FisherSettings, ProfileOptions, ProfileSettings
from gd_core.fisher import FisherResult
from gd_core.fisher_loop import BatchSums, NumpyEngine
from gd_core.profile import SensitivityProfile
from gd_core.sites import Site
from gd_core.validate import check_int, check_known

from .batchfn import LossFn, _BatchFn, _TorchBatchFn
from .discovery import ModelIndex, _fingerprint, resolve_sites
from .layer import keras
from .persample import TFPerSampleBatchFn

ops = keras.ops
_LOG = logging.getLogger(__name__)


# -- the loss ------------------------------------------------------------------------------------
def make_loss(loss: Any) -> tuple[LossFn, str]:
    """A ``loss(model, batch) -> per-sample losses`` function and a name for the metadata."""
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except (ValueError, TypeError) as exc:
            raise bad_argument(
                "loss",
                "a callable loss(model, batch), a keras loss object with reduction=None, or a "
                "keras loss name",
                loss,
                "pass e.g. loss='sparse_categorical_crossentropy'",
            ) from exc
        return _from_pair_loss(fn), loss
    if isinstance(loss, keras.losses.Loss):
        if loss.reduction not in (None, "none"):
            raise bad_argument(
                "loss",
                "a keras loss object with reduction=None (one loss per sample)",
                f"{type(loss).__name__}(reduction={loss.reduction!r})",
                f"pass keras.losses.{type(loss).__name__}(reduction=None)",
            )
        return _from_pair_loss(loss), type(loss).__name__
    if callable(loss):
        return loss, getattr(loss, "__name__", type(loss).__name__)
    raise bad_argument(
        "loss",
        "a callable loss(model, batch) returning per-sample losses, or a keras loss object with "
        "reduction=None",
        loss,
        "pass e.g. loss=lambda model, batch: per_sample_losses",
    )


def _from_pair_loss(fn: Callable[[Any, Any], Any]) -> LossFn:
    def loss(model: Any, batch: Any) -> Any:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise bad_argument(
                "batches",
                "(x, y) batches when loss is a keras loss",
                f"a batch of type {type(batch).__name__}",
                "yield (inputs, targets) pairs, or pass a callable loss(model, batch)",
            )
        x, y = batch
        return fn(y, model(x, training=False))

    return loss


# -- data ----------------------------------------------------------------------------------------
def _to_backend(batch: Any) -> Any:
    """Arrays of any framework (numpy, TF, torch) become tensors of the Keras backend."""
    backend = keras.backend.backend()

    def convert(x: Any) -> Any:
        module = type(x).__module__
        if module.startswith("torch") and backend != "torch" and hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        elif module.startswith("tensorflow") and backend != "tensorflow":
            x = np.asarray(x)
        elif not isinstance(x, (np.ndarray, np.generic)) and not module.startswith(
            ("torch", "tensorflow")
        ):
            return x  # strings, None, Python scalars: left to the loss function
        return ops.convert_to_tensor(x)

    return keras.tree.map_structure(convert, batch)


def iterate(dataset: Any) -> Iterator[Any]:
    if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Iterable):
        raise bad_argument(
            "batches",
            "an iterable of batches (tf.data.Dataset, keras PyDataset, list, DataLoader)",
            type(dataset).__name__,
            "wrap your arrays, e.g. [(x_batch, y_batch), ...]",
        )
    for batch in dataset:
        yield _to_backend(batch)


# -- per-batch squared-gradient sums ---------------------------------------------------------


def batch_fn(model: Any, variables: list[Any], loss: LossFn, skip: bool) -> _BatchFn:
    """The per-batch engine: on TensorFlow the one-forward-one-backward engine of
    :mod:`adapters.keras.persample` (the jacobian path for the variables it does not cover),
    on torch ``torch.func.vmap``."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return TFPerSampleBatchFn(model, variables, loss, skip)
    if backend == "torch":
        return _TorchBatchFn(model, variables, loss, skip)
    raise bad_argument(
        "KERAS_BACKEND",
        "'tensorflow' or 'torch' (the backends estimate_fisher supports)",
        backend,
        "set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch before importing keras",
    )


#: the model attribute holding its per-batch engines across calls (a dunder name: Keras' saving
#: skips it, and ``Layer.__setattr__``'s tracking is bypassed)
_ENGINES = "__gd_fisher_engines__"
#: engines kept per model (the least recently used goes first): a fresh loss callable per call
#: would otherwise keep every traced function alive
_KEEP = 4


def _structure(model: Any) -> tuple[Any, ...]:
    """What an engine's traced functions depend on: the model's layers and variables (identity,
    shape, dtype, trainable). Adding or replacing a layer, enabling LoRA or quantizing changes it."""
    layers = tuple(id(la) for la in model._flatten_layers(include_self=True, recursive=True))
    variables = tuple(
        (id(v), tuple(v.shape), str(v.dtype), bool(getattr(v, "trainable", True)))
        for v in model.variables
    )
    return layers, variables


def _loss_key(loss: Any) -> tuple[Any, ...]:
    """A key for the loss argument: a loss name by value, a loss object or callable by identity
    (the cache entry keeps the object alive, so the identity is not reused)."""
    return ("name", loss) if isinstance(loss, str) else ("object", id(loss))


def cached_batch_fn(model: Any, names: list[str], variables: list[Any], loss: Any) -> _BatchFn:
    """The per-batch engine of ``model`` for these weights and loss, built (and, on TensorFlow,
    traced and checked on a first batch) once and reused by later calls.

    The engines live on the model itself (``model.__gd_fisher_engines__``), so the cache never
    keeps a model alive (the model and its engines are one collectable cycle) and dies with the
    model; they are dropped when the model's structure changes (:func:`_structure`). Within an
    engine, ``tf.function`` keeps one trace per input signature (shapes, dtypes). torch backend:
    not cached (nothing is traced).
    """
    fn_loss, _ = make_loss(loss)
    if keras.backend.backend() != "tensorflow":
        return batch_fn(model, variables, fn_loss, skip=False)
    structure = _structure(model)
    held = model.__dict__.get(_ENGINES)
    if held is None or held[0] != structure:
        held = (structure, {})
        object.__setattr__(model, _ENGINES, held)
    engines: dict[Any, Any] = held[1]
    key = (tuple(names), _loss_key(loss), batch_fn)  # batch_fn: tests swap the engine
    entry = engines.pop(key, None)
    if entry is None:
        entry = (batch_fn(model, variables, fn_loss, skip=False), loss)
    engines[key] = entry  # most recently used last
    while len(engines) > _KEEP:
        engines.pop(next(iter(engines)))
    return entry[0]


class _Engine(NumpyEngine):
    """Per-sample squared-gradient sums of a Keras model, a chunk of samples at a time."""

    def __init__(self, idx: ModelIndex, names: list[str], loss: Any, chunk: int | None) -> None:
        super().__init__()
        self.idx = idx
        self.names = names
        model, variables = idx.model, [idx.variables[n] for n in names]
        self.fn = cached_batch_fn(model, names, variables, loss)
        self.chunk = chunk
        #: the TensorFlow one-backward engine: sums kept as tensors until flushed
        self.on_device = isinstance(self.fn, TFPerSampleBatchFn)

    def report(self) -> dict[str, Any]:
        """``engine`` (how the sums were computed) and ``fallback`` ({weight: reason} for the
        weights the exact jacobian path computed on the TensorFlow backend)."""
        fallback = getattr(self.fn, "fallback", None)
        if fallback is None:  # torch backend
            return {"engine": "vmap" if getattr(self.fn, "_vmap", False) else "autograd_loop"}
        out = {self.names[i]: why for i, why in sorted(fallback.items())}
        engine = "per_sample" if len(out) < len(self.names) else "jacobian"
        return {"engine": engine, "fallback": out}

    def size(self, batch: Any) -> int:
        return len(keras.tree.flatten(batch)[0])

    def take(self, batch: Any, index: Any) -> Any:
        if isinstance(index, slice):
            return keras.tree.map_structure(lambda t: t[index], batch)
        idx = np.asarray(list(index), dtype="int32")
        return keras.tree.map_structure(lambda t: ops.take(t, idx, axis=0), batch)

    def sq_grad_sums(self, batch: Any) -> BatchSums:
        """On TensorFlow the sums stay float64 tensors in Keras layout until :meth:`flush` (no
        per-batch copy of every weight's sums to the host); otherwise NumPy, canonical layout."""
        n = self.size(batch)
        step = self.chunk or n
        total: list[Any] | None = None
        ok: list[np.ndarray] = []
        for start in range(0, n, step):
            part = batch if step >= n else self.take(batch, slice(start, start + step))
            if self.on_device:
                sums, _, loss_ok = self.fn(part, 2**31 - 1, tensors=True)
            else:
                sums, _, loss_ok = self.fn(part, 2**31 - 1)
            total = sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
            ok.append(np.asarray(loss_ok))
        assert total is not None
        flags = np.concatenate(ok) if ok else np.ones(0, bool)
        if self.on_device:
            named = dict(zip(self.names, total, strict=True))
        else:
            named = {n: self.idx.to_canonical(n, t) for n, t in zip(self.names, total, strict=True)}
        return BatchSums(named, n, losses=np.where(flags, 0.0, np.nan))

    def nonfinite(self, sums: Mapping[str, Any]) -> list[str]:
        if not self.on_device:
            return super().nonfinite(sums)
        import tensorflow as tf

        return [n for n, s in sums.items() if not bool(tf.reduce_all(tf.math.is_finite(s)).numpy())]

    def add(self, sums: Mapping[str, Any], n: int) -> None:
        if not self.on_device:
            return super().add(sums, n)
        for name, s in sums.items():  # float64 tensors: summed by TensorFlow
            self.pending[name] = s if name not in self.pending else self.pending[name] + s
        return None

    def flush(
        self, counted: int, skipped: int, local: int
    ) -> tuple[dict[str, np.ndarray], int, int, list[int]]:
        if not self.on_device:
            return super().flush(counted, skipped, local)
        pending, self.pending = self.pending, {}
        out = {
            n: self.idx.to_canonical(n, np.asarray(t, dtype=np.float64)) for n, t in pending.items()
        }
        return out, counted, skipped, [local]


def estimate_fisher(
    model: Any,
    batches: Any,
    loss: Callable[[Any, Any], Any] | Any,
    *,
    params: Sequence[str] | None = None,
    **options: Unpack[FisherOptions],
) -> FisherResult:
    """Empirical Fisher diagonal of every trainable weight: mean of squared per-sample gradients,
    keyed by canonical name, in canonical (torch) layout like every adapter's.

    Args:
        model: a built Keras 3 model.
        batches: an iterable of batches (``tf.data.Dataset``, list of tuples, ``PyDataset``,
            torch ``DataLoader``); numpy/TF/torch arrays are converted to backend tensors.
        loss: ``loss(model, batch) -> 1-D per-sample losses`` (call the model with
            ``training=False``), or a ``keras.losses.Loss`` with ``reduction=None`` (or a Keras
            loss name) used on ``(x, y)`` batches as ``loss(y, model(x, training=False))``.
        params: canonical names of the weights to estimate (default: every trainable weight).
        options: the Fisher loop's, the same in every adapter
            (:class:`gd_core.face.FisherOptions`): ``max_samples``, ``progress``,
            ``chunk_size`` (the per-sample gradients of one piece of a batch are held in memory
            at once), ``on_nonfinite`` (``"raise"`` or ``"skip"``, counted in
            ``result.skipped``), ``checkpoint``, ``checkpoint_every``, ``resume``.

    TensorFlow backend: one forward and one backward per batch. The weights of ``Dense``,
    ``EinsumDense`` (so the projections of ``MultiHeadAttention``), ``LayerNormalization`` (last
    axis) and ``Embedding`` layers get their per-sample gradients in closed form from each
    layer's input and output gradient; every other weight (custom or LoRA/quantized layers,
    ``BatchNormalization``, a weight also used outside its layer's ``call``, found by checking
    the first batch's per-sample gradients against the batch gradient) takes the exact
    ``GradientTape.jacobian`` path. ``result.accumulator.metadata["fisher_fallback"]`` maps
    those weights to the reason (also logged at INFO), ``["fisher_engine"]`` is
    ``"per_sample"`` (``"jacobian"`` when every weight fell back). The engine (traced functions,
    the check's outcome) is built once per model, weight set and loss, and reused by later calls
    (:func:`cached_batch_fn`). torch backend:
    ``torch.func.vmap``. Squares are summed over each batch in the framework and handed to
    ``gd_core.FisherAccumulator`` in float64. Memory grows with batch (or chunk) size x the
    largest per-sample block (jacobian weights: x all of them).

    Example:
        >>> import numpy as np, keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
        >>> data = [(np.ones((4, 3), "float32"), np.zeros((4,), "int32"))]
        >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        >>> f = estimate_fisher(m, data, loss, progress=False)
        >>> f.count, sorted(f), f["fc.weight"].shape  # canonical (torch) layout
        (4, ['fc.bias', 'fc.weight'], (2, 3))
        >>> f.accumulator.metadata.get("fisher_fallback", {})  # every weight in closed form
        {}
    """
    opts = FisherSettings.of(options, "estimate_fisher")
    idx = ModelIndex.build(model)
    trainable = idx.trainable()
    if params is not None:
        wanted = check_known(
            params, "params", list(trainable), "canonical names of this model's trainable weights"
        )
        trainable = {n: trainable[n] for n in wanted}
    if not trainable:
        raise bad_argument(
            "model",
            "a model with trainable weights",
            "none",
            "unfreeze the pretrained layers (layer.trainable = True) before estimating Fisher",
        )
    chunk_size = check_int(opts.chunk_size, "chunk_size", 1, 8, optional=True)
    _, loss_name = make_loss(loss)
    engine = _Engine(idx, list(trainable), loss, chunk_size)
    result = loop.estimate(
        iterate(batches),
        engine,
        run={"loss": loss_name, "backend": keras.backend.backend()},
        result=lambda acc: _reported(acc, engine),
        **opts.loop(),
    )
    return result


def _reported(acc: Any, engine: _Engine) -> FisherResult:
    """The result, its metadata saying how the sums were computed (logged too)."""
    return loop.reported(acc, engine.report(), "GradientTape.jacobian fallback", _LOG)


def profile(
    model: Any,
    batches: Any,
    loss: Callable[[Any, Any], Any] | Any,
    *,
    sites: Mapping[str, Sequence[str]] | Sequence[Site] | None = None,
    with_units: bool = True,
    example_input: Any = None,
    **options: Unpack[ProfileOptions],
) -> SensitivityProfile:
    """Estimate Fisher and aggregate it into a ``gd_core.SensitivityProfile`` for this model.

    Takes :func:`estimate_fisher`'s arguments, plus ``sites`` (None, a list of ``gd_core.Site``
    of this model, or a site mapping ``{site: [weight names]}`` as in :func:`sites`),
    ``aggregation`` and ``mapping`` (the score-to-probability mapping stored in the profile,
    default ``linear_rank`` over ``[0.0, 0.1]``), ``cache`` (store the profile in the per-user
    cache, where :func:`apply` with ``profile=None`` finds it) and ``metadata`` (merged into the
    profile's), ``example_input`` (the input of the forward that finds the sites, as in
    :func:`sites`; default one guessed from the input specs). The profile carries the model's fingerprint and metadata ``framework="keras"``,
    ``backend``, ``samples``, ``skipped``, ``loss``, ``fisher_engine`` and (TensorFlow)
    ``fisher_fallback`` (:func:`estimate_fisher`'s report of the weights the jacobian path
    computed).

    Example:
        >>> import numpy as np, keras
        >>> inp = keras.Input((3,))
        >>> h = keras.layers.Dropout(0.1, name="drop_in")(keras.layers.Dense(4, name="a")(inp))
        >>> h = keras.layers.Dropout(0.1, name="drop_mid")(keras.layers.Dense(4, name="b")(h))
        >>> m = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
        >>> data = [(np.ones((4, 3), "float32"), np.zeros((4,), "int32"))]
        >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        >>> prof = profile(m, data, loss, progress=False)
        >>> prof.site_names, prof.metadata["framework"]
        (['drop_in', 'drop_mid'], 'keras')
    """
    opts = ProfileSettings.of(options, "profile")
    idx = ModelIndex.build(model, example_input)
    model_sites = [site for site, _ in resolve_sites(idx, sites)]
    trainable = idx.trainable()
    guarded = [n for n in trainable if any(n in s.params for s in model_sites)]
    fisher = estimate_fisher(
        model,
        batches,
        loss,
        params=guarded or None,
        **opts.fisher(),
    )
    meta = {
        "framework": "keras",
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "model": str(model.name),
        "samples": fisher.count,
        "skipped": fisher.skipped,
        "loss": fisher.accumulator.metadata.get("loss"),
        **loop.engine_metadata(fisher),
    }
    if idx.dead:
        meta["dead_sites"] = [idx.site_name(x) for x in idx.dead]
    build = SensitivityProfile.from_fisher
    return opts.finish(build, fisher, model_sites, _fingerprint(idx), meta, with_units=with_units)
