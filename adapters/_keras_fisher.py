"""Per-sample squared gradients of Keras 3 models on the TensorFlow and torch backends (private).

Each batch yields, in the framework, float64 sums over its samples of squared per-sample gradients
(plus per-sample finiteness flags); :func:`estimate` hands the sums to
:class:`gd_core.FisherAccumulator`, which owns the NaN policy and the averaging.

TensorFlow: ``tf.GradientTape.jacobian`` of the per-sample losses (vectorised with pfor, falling
back to a while loop if pfor cannot convert an op), inside a ``tf.function``.
torch: ``torch.func.vmap(torch.func.grad(...))`` with the model's weights substituted through
``keras.StatelessScope``; if vmap cannot run the model, a per-sample autograd loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from gd_core.errors import GuidedDropoutError, NonFiniteGradientError, bad_argument
from gd_core.fisher import FisherAccumulator, FisherResult

from ._keras_layer import keras

ops = keras.ops
LossFn = Callable[[Any, Any], Any]


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
                "dataset",
                "(x, y) batches when loss is a keras loss",
                f"a batch of type {type(batch).__name__}",
                "yield (inputs, targets) pairs, or pass a callable loss(model, batch)",
            )
        x, y = batch
        return fn(y, model(x, training=False))

    return loss


def _check_losses(losses: Any) -> None:
    shape = tuple(losses.shape)
    if len(shape) != 1:
        raise bad_argument(
            "loss",
            "a 1-D tensor of per-sample losses (one per sample of the batch)",
            f"a tensor of shape {shape}",
            "reduce each sample to one number (e.g. mean over its tokens), not the whole batch",
        )


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
            "dataset",
            "an iterable of batches (tf.data.Dataset, keras PyDataset, list, DataLoader)",
            type(dataset).__name__,
            "wrap your arrays, e.g. [(x_batch, y_batch), ...]",
        )
    for batch in dataset:
        yield _to_backend(batch)


# -- per-batch squared-gradient sums ---------------------------------------------------------
class _BatchFn:
    """Maps (batch, limit) to (float64 sums of squared per-sample gradients, per-sample flags)."""

    def __init__(self, model: Any, variables: list[Any], loss: LossFn, skip: bool) -> None:
        self.model, self.variables, self.loss, self.skip = model, variables, loss, skip

    def __call__(self, batch: Any, limit: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Returns (sums, finite flags of samples < limit, loss-finite flags of those samples)."""
        raise NotImplementedError

    def isolated(self, batch: Any, limit: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The same, one sample at a time: a vectorised backward pass multiplies every sample's
        activations by the other samples' zero cotangents, so one NaN sample makes every row of
        the batch's jacobian NaN; per-sample calls keep the finite samples (skip policy)."""
        n = min(len(keras.tree.flatten(batch)[0]), limit)
        total: list[np.ndarray] | None = None
        finite, loss_ok = [], []
        for i in range(n):
            single = keras.tree.map_structure(lambda t, i=i: t[i : i + 1], batch)
            sums, ok, lok = self(single, 1)
            finite.append(bool(ok[0]))
            loss_ok.append(bool(lok[0]))
            total = sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
        assert total is not None
        return total, np.array(finite), np.array(loss_ok)


def _masked_sums(grads: list[Any], loss_ok: Any, limit: Any, skip: bool) -> tuple[list[Any], Any]:
    """Shared TF/torch logic written with keras.ops: squares in float64, summed over samples."""
    n = ops.shape(loss_ok)[0]
    use = ops.arange(n) < limit
    finite = loss_ok
    squared = []
    for g in grads:
        g64 = ops.cast(g, "float64")
        sq = g64 * g64
        flat = ops.reshape(g64, (n, -1)) if len(g.shape) > 1 else ops.reshape(g64, (n, 1))
        finite = ops.logical_and(finite, ops.all(ops.isfinite(flat), axis=1))
        squared.append(sq)
    mask = ops.logical_and(use, finite) if skip else use
    sums = []
    for sq in squared:
        shape = [-1] + [1] * (len(sq.shape) - 1)
        m = ops.reshape(mask, shape)
        sums.append(ops.sum(ops.where(m, sq, ops.zeros_like(sq)), axis=0))
    return sums, finite


class _TFBatchFn(_BatchFn):
    def __init__(self, model: Any, variables: list[Any], loss: LossFn, skip: bool) -> None:
        super().__init__(model, variables, loss, skip)
        self._fn = self._make(use_pfor=True)
        self._pfor = True

    def _make(self, use_pfor: bool) -> Any:
        import tensorflow as tf

        model, variables, loss, skip = self.model, self.variables, self.loss, self.skip

        @tf.function(reduce_retracing=True, autograph=False)
        def run(batch: Any, limit: Any) -> Any:
            with tf.GradientTape() as tape:
                losses = loss(model, batch)
            _check_losses(losses)
            jac = tape.jacobian(
                losses,
                variables,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
                experimental_use_pfor=use_pfor,
            )
            loss_ok = tf.math.is_finite(tf.cast(losses, tf.float64))
            sums, finite = _masked_sums(jac, loss_ok, limit, skip)
            return sums, finite, loss_ok

        return run

    def __call__(self, batch: Any, limit: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        import tensorflow as tf

        lim = tf.constant(limit, tf.int32)
        try:
            sums, finite, loss_ok = self._fn(batch, lim)
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError) as exc:
            if not self._pfor or isinstance(exc, GuidedDropoutError):
                raise
            warnings.warn(
                f"estimate_fisher: vectorised per-sample gradients (pfor) failed ({exc!s:.200}); "
                "falling back to a slower while-loop jacobian",
                RuntimeWarning,
                stacklevel=3,
            )
            self._pfor = False
            self._fn = self._make(use_pfor=False)
            sums, finite, loss_ok = self._fn(batch, lim)
        return [s.numpy() for s in sums], finite.numpy(), loss_ok.numpy()


class _TorchBatchFn(_BatchFn):
    def __init__(self, model: Any, variables: list[Any], loss: LossFn, skip: bool) -> None:
        super().__init__(model, variables, loss, skip)
        self._vmap = True

    def _grads_vmap(self, batch: Any) -> tuple[list[Any], Any]:
        import torch

        variables, model, loss = self.variables, self.model, self.loss
        values = [v.value.detach() for v in variables]

        def one(params: list[Any], sample: Any) -> Any:
            with keras.StatelessScope(state_mapping=list(zip(variables, params, strict=True))):
                single = keras.tree.map_structure(lambda t: t.unsqueeze(0), sample)
                out = loss(model, single)
                _check_losses(out)
                return out[0], out[0]

        grads, losses = torch.func.vmap(
            torch.func.grad(one, has_aux=True), in_dims=(None, 0), randomness="different"
        )(values, batch)
        return list(grads), losses

    def _grads_loop(self, batch: Any) -> tuple[list[Any], Any]:
        import torch

        params = [v.value for v in self.variables]
        n = len(keras.tree.flatten(batch)[0])
        per_var: list[list[Any]] = [[] for _ in params]
        losses = []
        for i in range(n):
            single = keras.tree.map_structure(lambda t, i=i: t[i : i + 1], batch)
            out = self.loss(self.model, single)
            _check_losses(out)
            gs = torch.autograd.grad(out.sum(), params, allow_unused=True)
            for j, (g, p) in enumerate(zip(gs, params, strict=True)):
                per_var[j].append(torch.zeros_like(p) if g is None else g.detach())
            losses.append(out.detach()[0])
        return [torch.stack(g) for g in per_var], torch.stack(losses)

    def __call__(self, batch: Any, limit: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        import torch

        if self._vmap:
            try:
                grads, losses = self._grads_vmap(batch)
            except GuidedDropoutError:
                raise
            except Exception as exc:  # noqa: BLE001 - any vmap limitation falls back to a loop
                warnings.warn(
                    f"estimate_fisher: torch.func.vmap could not run the model ({exc!s:.200}); "
                    "falling back to a per-sample autograd loop",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._vmap = False
        if not self._vmap:
            grads, losses = self._grads_loop(batch)
        with torch.no_grad():
            loss_ok = torch.isfinite(losses.double())
            sums, finite = _masked_sums(grads, loss_ok, limit, self.skip)
            return (
                [s.cpu().numpy() for s in sums],
                finite.cpu().numpy(),
                loss_ok.cpu().numpy(),
            )


def batch_fn(model: Any, variables: list[Any], loss: LossFn, skip: bool) -> _BatchFn:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _TFBatchFn(model, variables, loss, skip)
    if backend == "torch":
        return _TorchBatchFn(model, variables, loss, skip)
    raise bad_argument(
        "KERAS_BACKEND",
        "'tensorflow' or 'torch' (the backends estimate_fisher supports)",
        backend,
        "set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch before importing keras",
    )


def _chunks(batches: Iterator[Any], size: int | None) -> Iterator[Any]:
    """Split every batch into pieces of at most ``size`` samples (bounds jacobian memory)."""
    for batch in batches:
        if size is None:
            yield batch
            continue
        n = len(keras.tree.flatten(batch)[0])
        for start in range(0, n, size):
            yield keras.tree.map_structure(lambda t, a=start: t[a : a + size], batch)


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="sample", desc="Fisher", leave=False)


def estimate(
    model: Any,
    names: list[str],
    variables: list[Any],
    dataset: Any,
    loss: Any,
    *,
    max_samples: int | None,
    progress: bool,
    on_nonfinite: str,
    chunk_size: int | None = None,
) -> FisherResult:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise bad_argument("chunk_size", "None or an int >= 1", chunk_size, "pass e.g. 8")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise bad_argument("max_samples", "None or an int >= 1", max_samples, "pass e.g. 512")
    acc = FisherAccumulator(on_nonfinite)  # validates on_nonfinite
    loss_fn, loss_name = make_loss(loss)
    if not variables:
        raise bad_argument(
            "model",
            "a model with trainable weights",
            "none",
            "unfreeze the pretrained layers (layer.trainable = True) before estimating Fisher",
        )
    fn = batch_fn(model, variables, loss_fn, skip=on_nonfinite == "skip")
    bar = _progress(max_samples, progress)
    seen = 0
    try:
        for batch in _chunks(iterate(dataset), chunk_size):
            if max_samples is not None and seen >= max_samples:
                break
            limit = max_samples - seen if max_samples is not None else 2**31 - 1
            sums, finite, loss_ok = fn(batch, limit)
            n = min(len(finite), limit)
            if on_nonfinite == "skip" and not bool(np.all(finite[:n])):
                sums, finite, loss_ok = fn.isolated(batch, limit)
            if on_nonfinite == "raise" and not bool(np.all(loss_ok[:n])):
                bad = int(np.flatnonzero(~loss_ok[:n])[0])
                raise NonFiniteGradientError(
                    f"loss of sample {seen + bad} is NaN or Inf; fix: check that sample's inputs "
                    "and labels, or pass on_nonfinite='skip' to skip and count such samples"
                )
            if on_nonfinite == "skip":
                bad = int(np.sum(~finite[:n]))
                acc.add(dict(zip(names, sums, strict=True)), n - bad, skipped=bad)
            else:
                acc.add(dict(zip(names, sums, strict=True)), n)
            seen += n
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if seen == 0:
        raise bad_argument(
            "dataset", "at least one batch", "an empty dataset", "pass some samples to profile on"
        )
    acc.metadata.update({"loss": loss_name, "backend": keras.backend.backend()})
    if acc.count == 0:
        raise NonFiniteGradientError(
            f"every one of the {acc.skipped} samples had a non-finite gradient or loss; fix: "
            "check the model and loss (e.g. a learning rate that diverged, or log(0) in the loss)"
        )
    return FisherResult.from_accumulator(acc)
