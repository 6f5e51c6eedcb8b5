"""Per-sample squared-gradient sums through ONNX Runtime Training, one train step per batch.

The training graph gets extra outputs (:mod:`adapters.onnx.taps`): for every forward use of a
trained parameter that a closed-form rule covers, the gradient of the use's output (ORT's
``<tensor>_grad``) and the use's other input. One train step on the whole batch then gives every
sample's gradient in NumPy: MatMul ``x @ W`` -> ``x_b^T dY_b`` (summed over the non-batch leading
axes), Gemm likewise, a broadcast Add/Sub -> ``dY_b`` summed over the broadcast axes, Mul by a
weight -> ``x_b * dY_b`` summed likewise, LayerNormalization -> ``xhat_b * dY_b`` and ``dY_b``,
Gather -> ``dY_b`` rows added into the rows ``x_b`` picks (only the touched rows are held). The
uses of a parameter (tied weights, Transpose/Reshape on the way, mapped back to the initializer's
layout) are summed per sample before squaring. A batch-mean loss's output gradients are scaled
by the batch size, so that each sample's gradient is that of its own loss. A weight whose one
use is a MatMul is squared and summed in the graph, into its gradient buffer in place of the
batch gradient (:func:`adapters.onnx.taps.add_taps`); an embedding table's sums travel as its
touched rows.

The first batch of two or more samples is checked: its first :data:`CHECK_SAMPLES` samples are
computed both ways, and a parameter whose sums differ from the exact loop's falls back. Fallback
parameters (no rule, no gradient tensor, the check) take the exact loop: one train step on a
batch of one per sample, the gradient read from ``state.parameters[name].grad`` of a module whose
gradients are the loss's (the untapped training graph, when some buffers hold in-graph sums); a
batch with a non-finite loss or sum is redone entirely by the loop, so ``on_nonfinite='skip'``
skips exactly the offending samples. Batches of one sample before the check take the loop.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import fisher_loop as loop
from gd_core.fisher import FisherResult
from gd_core.fisher_loop import BatchSums, NumpyEngine

from . import taps as _t
from .graph import Param, onnx
from .train import Artifacts, _label_aliases, _ort_training, module_inputs, split_batch

_LOG = logging.getLogger("adapters.onnx.fisher")
#: samples of the first batch computed both ways (the batched rules and the exact loop)
CHECK_SAMPLES = 3
#: per-sample gradients held at once (elements): a parameter's samples are taken in chunks
CHUNK_ELEMENTS = 1 << 24
_CHECK_RTOL = 1e-3
_CHECK_FLOOR = 1e-8


class _Unsupported(Exception):
    """A use whose tensors don't fit its rule on this batch (e.g. no batch axis)."""


class Engine(NumpyEngine):
    """Squared per-sample gradients through ORT Training: the batched rules, or the exact loop
    (``per_sample=False``, or per parameter where the rules do not apply).

    Example:
        >>> import tempfile
        >>> from adapters.onnx.graph import example_model, param_table
        >>> from adapters.onnx.train import make_artifacts
        >>> art = make_artifacts(example_model(0.0), tempfile.mkdtemp(), "mse", optimizer=None)
        >>> engine = Engine(art, param_table(example_model()), "cpu")
        >>> x, y = np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)
        >>> got = engine.sq_grad_sums({"x": x, "target": y})
        >>> got.n, got.sums["dense.weight"].shape, engine.report()
        (3, (4, 4), {'engine': 'per_sample', 'fallback': {}})
    """

    def __init__(
        self,
        art: Artifacts,
        params: Mapping[str, Param],
        device: str,
        per_sample: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.loss = art.loss
        self.params = params
        self.trained = [n for n in art.requires_grad if n in params]
        self.fallback: dict[str, str] = {}
        self.taps: dict[str, str] = {}
        self.plan: _t.Plan | None = None
        self.checked = False
        self._art, self._device = art, device
        self._exact: tuple[Any, Any] | None = None  # (module, state) of the exact loop
        opened = None
        if per_sample and self.trained:
            try:
                opened = self._open_tapped(art, device)
            except Exception as exc:  # noqa: BLE001 - reported: every parameter takes the loop
                why = f"the training graph with extra outputs could not be run ({exc})"[:400]
                self.plan, self.taps = None, {}
                self.fallback = dict.fromkeys(self.trained, why)
        if opened is not None:
            self.module, self.state = opened
        else:
            self.module, _, self.state = art.open(device, optimizer=False)
        self.module.train()
        self.names = list(self.module.input_names())
        self.outputs = list(self.module.output_names())
        zero = np.zeros((), dtype=np.float32)
        self.fixed = {n: zero for n in art.ratio_inputs.values() if n in self.names}
        self.user = [n for n in self.names if n not in self.fixed]
        self.aliases = _label_aliases(self.user)
        self.fast = [n for n in self.trained if self.plan is not None and n in self.plan.uses]
        self.shapes = {n: tuple(self.state.parameters[n].data.shape) for n in self.trained}
        buffered = self.plan is not None and any(
            u.sq == _t.IN_BUFFER for group in self.plan.uses.values() for u in group
        )
        if not buffered:  # the tapped module's gradients are the loss's: it runs the loop too
            self._exact = (self.module, self.state)

    def _open_tapped(self, art: Artifacts, device: str) -> tuple[Any, Any]:
        _, api = _ort_training()
        state = api.CheckpointState.load_checkpoint(str(art.checkpoint))
        model = onnx.load(str(art.training_model))
        shapes = {n: tuple(state.parameters[n].data.shape) for n in self.trained}
        self.plan = _t.plan(model, self.trained, shapes)
        self.fallback = dict(self.plan.fallback)
        if not self.plan.uses:
            return api.Module(str(art.training_model), state, None, device=device), state
        self.taps = _t.add_taps(model, self.plan)
        tmp = tempfile.mkdtemp(prefix="gd-ort-taps-")
        try:  # the Module reads the graph when it is made
            path = Path(tmp) / "training_model.onnx"
            onnx.save(model, str(path))
            return api.Module(str(path), state, None, device=device), state
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- batches ---------------------------------------------------------------------------------
    def _arrays(self, batch: Any) -> tuple[dict[str, np.ndarray], int]:
        return split_batch(batch, self.user, self.aliases)

    def size(self, batch: Any) -> int:
        return self._arrays(batch)[1]

    def take(self, batch: Any, index: Any) -> Any:
        arrays, _ = self._arrays(batch)
        idx = index if isinstance(index, slice) else np.asarray(list(index), dtype=np.int64)
        return {n: arrays[n][idx] for n in self.user}

    def add(self, sums: Mapping[str, Any], n: int) -> None:
        """Add in place: every array handed here is this engine's own, fresh one."""
        for name, s in sums.items():
            if isinstance(s, _Rows) and name in self.pending:
                self.pending[name][s.rows] += s.values  # rows are distinct
                continue
            arr = np.asarray(_dense(s), dtype=np.float64)
            if name in self.pending:
                self.pending[name] += arr
            else:
                self.pending[name] = arr

    def report(self) -> dict[str, Any]:
        """``engine`` (``per_sample``, or ``loop`` when every parameter took the loop) and
        ``fallback`` ({canonical name: reason} for the parameters the loop computed)."""
        why = dict(self.fallback)
        if not self.checked:  # no batch of two or more finite samples came: all took the loop
            for n in self.fast:
                why[n] = "no batch of two or more finite samples to check the rules on came"
        fallback = {self.params[n].name: why[n] for n in self.trained if n in why}
        per_sample = self.fast and self.checked
        return {"engine": "per_sample" if per_sample else "loop", "fallback": fallback}

    def sq_grad_sums(self, batch: Any) -> BatchSums:
        arrays, size = self._arrays(batch)
        step = self.chunk_size or size
        if size > step:  # one train step per piece of at most chunk_size samples
            parts = [
                self._piece({n: a[i : i + step] for n, a in arrays.items()}, min(step, size - i))
                for i in range(0, size, step)
            ]
            sums = {k: sum(_dense(p.sums[k]) for p in parts) for k in parts[0].sums}
            bad = next((p.bad for p in parts if p.bad is not None), None)
            return BatchSums(sums, sum(p.n for p in parts), exact=True, bad=bad)
        return self._piece(arrays, size)

    def _piece(self, arrays: Mapping[str, np.ndarray], size: int) -> BatchSums:
        if not self.fast or (not self.checked and (size < 2 or not self._check(arrays, size))):
            return self._loop(arrays, size)
        return self._batched(arrays, size)

    # -- the exact loop ----------------------------------------------------------------------------
    def _exact_module(self) -> tuple[Any, Any]:
        """``(module, state)`` whose gradients are the loss's: the tapped module, or (when some
        gradient buffers hold in-graph squared sums, :data:`adapters.onnx.taps.IN_BUFFER`) the
        untapped training graph, opened at the first loop step (the check, a fallback)."""
        if self._exact is None:
            module, _, state = self._art.open(self._device, optimizer=False)
            module.train()
            self._exact = (module, state)
        return self._exact

    def _loop_raw(
        self, arrays: Mapping[str, np.ndarray], size: int, names: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], int, str | None, list[int]]:
        """One train step per sample: ``(sums, samples counted, first bad name, kept rows)``."""
        sums = {n: np.zeros(self.shapes[n], dtype=np.float64) for n in names}
        bad, kept = None, []
        module, state = self._exact_module()
        for i in range(size):
            feeds = {n: np.ascontiguousarray(arrays[n][i : i + 1]) for n in self.user}
            feeds.update(self.fixed)
            module.lazy_reset_grad()
            out = module(*module_inputs(self.names, feeds, "batches"))
            loss = np.asarray(out[0] if isinstance(out, (tuple, list)) else out)
            grads = {n: state.parameters[n].grad for n in names}
            where = _first_nonfinite(loss, grads)
            if where is not None:
                bad = where if bad is None else bad
                continue
            for n in names:
                if grads[n] is not None:  # None: the loss does not reach this parameter
                    sums[n] += np.square(np.asarray(grads[n]), dtype=np.float64)  # one pass
            kept.append(i)
        return sums, len(kept), bad, kept

    def _loop(self, arrays: Mapping[str, np.ndarray], size: int) -> BatchSums:
        sums, count, bad, _ = self._loop_raw(arrays, size, self.trained)
        return self._result(sums, count, bad)

    def _result(self, sums: Mapping[str, np.ndarray], count: int, bad: str | None) -> BatchSums:
        canonical = {}
        for n in self.trained:
            p = self.params[n]
            canonical[p.name] = _dense(sums[n]).T if p.transposed else sums[n]
        named = None if bad is None else (loop.LOSS if bad == "" else self.params[bad].name)
        return BatchSums(canonical, count, exact=True, bad=named)

    # -- the batched rules ---------------------------------------------------------------------
    def _run(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {n: np.ascontiguousarray(arrays[n]) for n in self.user}
        feeds.update(self.fixed)
        self.module.lazy_reset_grad()
        out = self.module(*module_inputs(self.names, feeds, "batches"))
        out = out if isinstance(out, (tuple, list)) else (out,)
        values = {
            self.taps[k]: np.asarray(v)
            for k, v in zip(self.outputs, out, strict=True)
            if k in self.taps
        }
        return np.asarray(out[0]), values

    def _demote(self, name: str, why: str) -> None:
        if name in self.fast:
            self.fast.remove(name)
            self.fallback[name] = why

    def _check(self, arrays: Mapping[str, np.ndarray], size: int) -> bool:
        """The first batch's first samples both ways; False: deferred (a non-finite sample)."""
        k = min(size, CHECK_SAMPLES)
        sub = {n: arrays[n][:k] for n in self.user}
        ref, count, _, _ = self._loop_raw(sub, k, self.fast)
        if count < k:
            return False
        _, values = self._run(sub)
        assert self.plan is not None
        for name in list(self.fast):
            for u in self.plan.uses[name]:
                if u.kind == "gather":
                    idx = values[u.x]
                    u.batch_free = idx.ndim == 0 or idx.shape[0] != k
                    if u.batch_free and not u.alt_y:
                        self._demote(name, f"the indices of its {u.node} carry no batch axis")
        sums, failed = self._fast_sums(values, k, self.fast)
        for name, why in failed.items():
            self._demote(name, why)
        # a floor relative to the largest sum of any parameter: a gradient that is float noise
        # (a key bias, which softmax cancels) matches nothing, and is as good as zero
        floor = _CHECK_FLOOR * max((float(np.max(r)) for r in ref.values() if r.size), default=0)
        for name, got in sums.items():
            want = ref[name]
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            got = _dense(got)
            if not np.allclose(got, want, rtol=_CHECK_RTOL, atol=1e-5 * scale + floor + 1e-30):
                diff = float(np.max(np.abs(got - want))) / (scale or 1.0)
                self._demote(
                    name,
                    "the first batch's check: the closed-form per-sample sums differ from the "
                    f"exact loop's (max difference {diff:.2g} of the largest)",
                )
        self.checked = True
        return True

    def _batched(self, arrays: Mapping[str, np.ndarray], size: int) -> BatchSums:
        loss, values = self._run(arrays)
        sums, failed = self._fast_sums(values, size, self.fast)
        for name, why in failed.items():
            self._demote(name, why)
        if not np.all(np.isfinite(loss)) or any(not _finite(s) for s in sums.values()):
            return self._loop(arrays, size)  # exact: finds and skips the offending samples
        slow = [n for n in self.trained if n not in sums]
        if not slow:
            return self._result(sums, size, None)
        slow_sums, count, bad, kept = self._loop_raw(arrays, size, slow)
        if count < size:  # the loop skipped samples: leave them out of the batched sums too
            if not kept:
                return self._result(
                    {**slow_sums, **{n: 0 * _dense(s) for n, s in sums.items()}}, 0, bad
                )
            loss, values = self._run({n: arrays[n][kept] for n in self.user})
            sums, failed = self._fast_sums(values, count, list(sums))
            if failed or any(not _finite(s) for s in sums.values()):
                return self._loop(arrays, size)
        return self._result({**sums, **slow_sums}, count, bad)

    def _fast_sums(
        self, values: Mapping[str, np.ndarray], n: int, names: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        assert self.plan is not None
        scale = float(n) if self.plan.mean else 1.0
        sums, failed = {}, {}
        for name in names:
            try:
                got = self._param_sums(name, values, n)  # a fresh array: scaled in place
                got *= scale * scale
                sums[name] = got
            except _Unsupported as exc:
                failed[name] = str(exc)
        return sums, failed

    def _param_sums(self, name: str, values: Mapping[str, np.ndarray], n: int) -> Any:
        assert self.plan is not None
        uses, shape = self.plan.uses[name], self.shapes[name]
        if not uses:  # the loss does not reach it: no gradient, as the loop finds
            return np.zeros(shape, np.float64)
        if len(uses) == 1 and uses[0].sq == _t.IN_BUFFER:  # in the gradient buffer
            buf = self.state.parameters[name].grad
            if buf is None or tuple(np.shape(buf)) != shape:
                raise _Unsupported("its gradient buffer holds no in-graph sums of its shape")
            return np.array(buf, dtype=np.float64)
        if len(uses) == 1 and uses[0].sq:  # squared and summed in the graph
            got = values.get(uses[0].sq)
            if got is None or got.shape != tuple(uses[0].shape):
                raise _Unsupported(f"its {uses[0].node}'s in-graph sums are missing or misshapen")
            return _back(uses[0], np.asarray(got, np.float64)[None], 1)[0].reshape(shape)
        if len(uses) == 1 and uses[0].kind == "gather" and not uses[0].chain:
            return _gather_sparse(uses[0], values, n, shape)
        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape))))
        total = np.zeros(shape, np.float64)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            g: np.ndarray | None = None
            for u in uses:
                part = _back(u, _use_grad(u, values, n, lo, hi), hi - lo)
                if part.shape[1:] != shape:
                    raise _Unsupported(f"its {u.node} gives gradients of shape {part.shape[1:]}")
                g = part if g is None else g + part
            assert g is not None
            g64 = g.astype(np.float64, copy=False)
            total += np.einsum("b...,b...->...", g64, g64)
        return total


def _first_nonfinite(loss: np.ndarray, grads: Mapping[str, Any]) -> str | None:
    if not np.all(np.isfinite(loss)):
        return ""
    for n, g in grads.items():
        if g is not None and not np.all(np.isfinite(g)):
            return n
    return None


# -- the rules (per sample, in the node's layout; the batch-mean scale is applied by the caller) --
def _batched_value(values: Mapping[str, np.ndarray], name: str, n: int, what: str) -> np.ndarray:
    arr = values.get(name)
    if arr is None:
        raise _Unsupported(f"no {what} {name!r} in the training graph's outputs")
    if arr.ndim == 0 or arr.shape[0] != n:
        raise _Unsupported(f"its {what} {name!r} (shape {list(arr.shape)}) has no batch axis")
    return arr


def _dy(u: _t.Use, values: Mapping[str, np.ndarray], n: int, alt: bool = False) -> np.ndarray:
    name = u.alt_y if alt else u.y
    return _batched_value(values, name + _t.GRAD_SUFFIX, n, "output gradient")


def _reduce_to(d: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Per-sample ``d`` ``[m, *z]`` summed over the axes a broadcast weight of ``shape`` spans."""
    m, ws = d.shape[0], tuple(shape)
    lead = len(ws) == d.ndim
    if lead and ws[0] != 1:
        raise _Unsupported(f"a weight of shape {list(ws)} broadcast along the batch axis")
    inner = ws[1:] if lead else ws
    extra = d.ndim - 1 - len(inner)
    if extra < 0:
        raise _Unsupported(f"a weight of shape {list(ws)} of higher rank than its use's output")
    axes = list(range(1, 1 + extra))
    for k, dim in enumerate(inner):
        have = d.shape[1 + extra + k]
        if dim == 1 and have != 1:
            axes.append(1 + extra + k)
        elif dim != have and dim != 1:
            raise _Unsupported(f"a weight of shape {list(ws)} against output {list(d.shape[1:])}")
    out = d.sum(axis=tuple(axes)) if axes else d
    return out.reshape((m, *ws))


def _use_grad(u: _t.Use, values: Mapping[str, np.ndarray], n: int, lo: int, hi: int) -> np.ndarray:
    """Per-sample gradients ``[hi - lo, *u.shape]`` of one use, samples ``lo:hi``."""
    m = hi - lo
    if u.kind == "gather":
        rows, d = _gather_rows(u, values, n, lo, hi)
        out = np.zeros((m, u.shape[0], d.shape[-1]), np.float32)
        np.add.at(out, (np.arange(m)[:, None], rows), d)
        return out.reshape((m, *u.shape))
    dy = _dy(u, values, n)[lo:hi]
    if u.kind == "bias":
        return _reduce_to(dy, u.shape) * np.float32(u.scale)
    x = _batched_value(values, u.x, n, "input")[lo:hi]
    if u.kind == "matmul":
        if x.ndim < 2:
            raise _Unsupported(f"its {u.node} reads a vector")
        xs, ds = x.reshape(m, -1, x.shape[-1]), dy.reshape(m, -1, dy.shape[-1])
        return np.einsum("bti,bto->bio", xs, ds, optimize=True)
    if u.kind == "gemm":
        if x.ndim != 2 or dy.ndim != 2:
            raise _Unsupported(f"its {u.node} reads an input of rank {x.ndim}")
        g = np.float32(u.scale) * x[:, :, None] * dy[:, None, :]
        return g.transpose(0, 2, 1) if u.trans else g
    if u.kind == "mul":
        return _reduce_to(x * dy, u.shape)
    if u.kind == "ln_scale":
        a = u.axis % x.ndim
        if a < 1:
            raise _Unsupported(f"its {u.node} normalises over the batch axis")
        red = tuple(range(a, x.ndim))  # float32 as ORT's own LayerNorm, in place
        prod = x - x.mean(axis=red, keepdims=True)
        var = np.mean(np.square(prod), axis=red, keepdims=True)
        prod *= 1.0 / np.sqrt(var + np.float32(u.eps))
        prod *= dy
        out = prod.sum(axis=tuple(range(1, a))) if a > 1 else prod
        return out.reshape((m, *u.shape))
    raise _Unsupported(f"no rule for {u.kind}")


def _gather_rows(
    u: _t.Use, values: Mapping[str, np.ndarray], n: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [m, k], output gradient rows [m, k, width])`` of a Gather, samples ``lo:hi``."""
    m, vocab = hi - lo, u.shape[0]
    idx = values.get(u.x)
    if idx is None:
        raise _Unsupported(f"no indices {u.x!r} in the training graph's outputs")
    if u.batch_free is None:
        u.batch_free = idx.ndim == 0 or idx.shape[0] != n
    if u.batch_free:
        if not u.alt_y:
            raise _Unsupported(f"the indices of its {u.node} carry no batch axis")
        out_shape = (*idx.shape, *u.shape[1:])
        d = _reduce_to(_dy(u, values, n, alt=True)[lo:hi], out_shape)
        rows = np.broadcast_to(idx.reshape(1, -1), (m, idx.size))
    else:
        rows = _batched_value(values, u.x, n, "indices")[lo:hi].reshape(m, -1)
        d = _dy(u, values, n)[lo:hi]
    rows = rows.astype(np.int64)
    rows = np.where(rows < 0, rows + vocab, rows)
    return rows, d.reshape(m, rows.shape[1], -1)


def _segment_sum(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(rows[order], starts, axis=0)


def _gather_sparse(
    u: _t.Use, values: Mapping[str, np.ndarray], n: int, shape: tuple[int, ...]
) -> _Rows:
    """Squared per-sample gradient sums of a table used by one Gather, as its touched rows."""
    rows, d = _gather_rows(u, values, n, 0, n)
    vocab, width = u.shape[0], d.shape[-1]
    if (vocab, width) != tuple(shape):
        raise _Unsupported(f"its {u.node} reads rows of width {width} of a {list(shape)} table")
    keys = (np.arange(n, dtype=np.int64)[:, None] * vocab + rows).reshape(-1)
    sample_rows, acc = _segment_sum(keys, d.reshape(-1, width).astype(np.float64))
    touched, sq = _segment_sum(sample_rows % vocab, acc * acc)
    return _Rows(tuple(shape), touched, sq)


class _Rows:
    """Sums of a table that are zero outside ``rows`` (distinct): a batch touches few rows of an
    embedding table, so neither the scaling nor the accumulation reads the whole table."""

    def __init__(self, shape: tuple[int, ...], rows: np.ndarray, values: np.ndarray) -> None:
        self.shape, self.rows, self.values = shape, rows, values

    def __imul__(self, k: float) -> _Rows:
        self.values *= k
        return self

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float64)
        out[self.rows] = self.values
        return out


def _dense(s: Any) -> Any:
    return s.dense() if isinstance(s, _Rows) else s


def _finite(s: Any) -> bool:
    return bool(np.all(np.isfinite(s.values if isinstance(s, _Rows) else s)))


def _back(u: _t.Use, g: np.ndarray, m: int) -> np.ndarray:
    """Per-sample gradients in the node's layout mapped back through the chain to the initializer."""
    for op, attr, before in reversed(u.chain):
        if op == "Transpose":
            g = g.transpose([0, *(int(p) + 1 for p in np.argsort(attr))])
        elif op in ("Reshape", "Unsqueeze", "Squeeze"):
            g = g.reshape((m, *before))
        elif op == "Slice":
            full = np.zeros((m, *before), g.dtype)
            full[(slice(None), *attr)] = g
            g = full
    return g


def reported(acc: Any, engine: Engine) -> FisherResult:
    """The result, its accumulator's metadata carrying how the sums were computed
    (``fisher_engine``, ``fisher_fallback``; the fallback is logged at INFO too).

    Example:
        >>> from gd_core.fisher import FisherAccumulator
        >>> class Done:
        ...     def report(self):
        ...         return {"engine": "per_sample", "fallback": {}}
        >>> acc = FisherAccumulator()
        >>> _ = acc.add({"w": np.ones(2)}, 2)
        >>> reported(acc, Done()).accumulator.metadata["fisher_engine"]
        'per_sample'
    """
    return loop.reported(acc, engine.report(), "the exact per-sample loop", _LOG)
