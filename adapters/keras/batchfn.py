"""The per-batch paths of Keras Fisher estimation that differentiate per sample by the framework's
own vectorisation: ``GradientTape.jacobian`` with pfor (TensorFlow; the exact fallback of
:mod:`adapters.keras.persample`) and ``torch.func.vmap`` (the torch backend). Each maps
``(batch, limit)`` to float64 sums of squared per-sample gradients and per-sample flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from gd_core.errors import GuidedDropoutError, bad_argument

from .layer import keras

ops = keras.ops
LossFn = Callable[[Any, Any], Any]


def _check_losses(losses: Any) -> None:
    shape = tuple(losses.shape)
    if len(shape) != 1:
        raise bad_argument(
            "loss",
            "a 1-D tensor of per-sample losses (one per sample of the batch)",
            f"a tensor of shape {shape}",
            "reduce each sample to one number (e.g. mean over its tokens), not the whole batch",
        )


class _BatchFn:
    """Maps (batch, limit) to (float64 sums of squared per-sample gradients, per-sample flags)."""

    def __init__(self, model: Any, variables: list[Any], loss: LossFn, skip: bool) -> None:
        self.model, self.variables, self.loss, self.skip = model, variables, loss, skip

    def __call__(self, batch: Any, limit: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Returns (sums, finite flags of samples < limit, loss-finite flags of those samples)."""
        raise NotImplementedError


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
