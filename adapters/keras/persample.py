"""Per-sample squared-gradient sums of Keras 3 models from ONE forward and ONE backward (private).

TensorFlow backend. While a batch runs, every supported layer's ``call`` is swapped for a
replica that records the layer's input and adds a zero-valued *probe* tensor (watched by the tape)
to its pre-activation output. One ``tape.gradient`` of the summed per-sample losses then yields,
per probe, the output gradient of every sample (row b of d(sum_i loss_i)/d(out) is d loss_b /
d out_b, since samples do not interact in inference mode), and the per-sample weight gradients
follow in closed form:

* ``Dense``              kernel: x_b^T g_b (batched matmul over the flattened token axes), bias:
                         sum of g_b over tokens;
* ``EinsumDense``        kernel: einsum("<in>,<out>-><batch><kernel>"), bias: g_b summed over the
                         non-bias output axes (this covers the projections of
                         ``MultiHeadAttention``, which are EinsumDense layers);
* ``LayerNormalization`` (last axis) gamma: sum of g_b * xhat_b, beta: sum of g_b;
* ``Embedding``          the rows of one sample are summed per (sample, id) with a segment sum
                         over the unique (sample, id) keys, squared, then summed per id, so no
                         (batch x vocabulary x width) tensor is built.

Squares are summed over the samples in the layer's compute dtype, float32 at least (float32 sums
of 16-ish samples, as the torch engine does; float16/bfloat16 output gradients are cast to float32
first, since a half-precision square overflows above 256), then cast to float64, in the framework: the same output
contract as ``adapters.keras.batchfn._BatchFn`` (sums in variable order, per-sample finite flags, per-sample
loss-finite flags). Variables of other layers (custom weights, LoRA or quantized layers, layers
called with a different leading dimension) fall back to the exact ``GradientTape.jacobian`` path,
restricted to those variables; so do variables that fail a one-time check on the first fully
finite batch (per-sample gradients summed over the batch against the batch gradient: a weight
also read outside its layer's ``call``, such as a tied embedding, fails it). ``fallback`` names
them with the reason. Assumes samples do not interact (no batch statistics in
``training=False`` mode), as the torch engine does.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gd_core.errors import GuidedDropoutError

from .batchfn import _BatchFn, _check_losses, _TFBatchFn
from .layer import keras

SUPPORTED = ("Dense", "EinsumDense", "LayerNormalization", "Embedding")
UNSUPPORTED = (
    "not a variable of a layer the per-sample engine handles in closed form (Dense, "
    "EinsumDense, LayerNormalization over the last axis, Embedding, the projections of "
    "MultiHeadAttention)"
)
SHARED = "another variable of its layer is computed by the jacobian path"
_RTOL = {"float64": 1e-6, "float32": 1e-3}  # Keras' own LayerNormalization rounds ~1e-8


def _plain(layer: Any) -> bool:
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return False
    return type(layer).__name__ in SUPPORTED and type(layer).__module__.startswith("keras")


def _einsum_ok(layer: Any) -> bool:
    eq = layer.equation
    if "..." in eq:
        return False
    lhs, out = eq.split("->")
    inp, ker = lhs.split(",")
    return inp[0] == out[0] and inp[0] not in ker


def _layer_vars(layer: Any) -> dict[str, Any]:
    """Role -> variable of a supported layer, or {} when the layer is not handled in closed form."""
    kind = type(layer).__name__
    if not _plain(layer):
        return {}
    if kind == "Dense":
        roles = {"kernel": layer.kernel, "bias": layer.bias}
    elif kind == "EinsumDense":
        if not _einsum_ok(layer):
            return {}
        roles = {"kernel": layer.kernel, "bias": layer.bias}
    elif kind == "LayerNormalization":
        axis = layer.axis
        if getattr(layer, "rms_scaling", False) or not (
            axis == -1 or (isinstance(axis, (list, tuple)) and list(axis) == [-1])
        ):
            return {}
        roles = {"gamma": layer.gamma, "beta": layer.beta}
    else:  # Embedding
        roles = {"embeddings": layer.embeddings}
    own = {id(v) for v in layer.trainable_weights}
    roles = {k: v for k, v in roles.items() if v is not None}
    if {id(v) for v in roles.values()} != own:  # extra weights: not ours to reason about
        return {}
    return roles


class _Capture:
    """Swaps the ``call`` of supported layers for recording replicas while a batch is traced."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.tape: Any = None
        self.records: dict[int, list[tuple[Any, Any]]] = {}

    def _make(self, layer: Any) -> Any:
        import tensorflow as tf

        kind = type(layer).__name__
        ops = keras.ops
        original = type(layer).call.__get__(layer)

        def probe(y: Any) -> Any:
            z = tf.zeros_like(y)
            self.tape.watch(z)
            return y + z, z

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if self.tape is None:
                return original(inputs, *args, **kwargs)
            if kind == "Dense":
                y = ops.matmul(inputs, layer.kernel)
                if layer.bias is not None:
                    y = ops.add(y, layer.bias)
                y, z = probe(y)
                out = layer.activation(y) if layer.activation is not None else y
            elif kind == "EinsumDense":
                y = ops.einsum(layer.equation, inputs, layer.kernel)
                if layer.bias is not None:
                    y = ops.add(y, layer.bias)
                y, z = probe(y)
                out = layer.activation(y) if layer.activation is not None else y
            else:  # LayerNormalization, Embedding: the layer's own output, probed
                out, z = probe(original(inputs, *args, **kwargs))
            # a Keras variable passed as input (CLIP's position ids) has a str dtype: a tensor
            self.records.setdefault(id(layer), []).append((tf.convert_to_tensor(inputs), z))
            return out

        return call

    def __enter__(self) -> _Capture:
        self._saved = []
        for layer in self.layers:
            self._saved.append((layer, layer.__dict__.get("call", None), "call" in layer.__dict__))
            object.__setattr__(layer, "call", self._make(layer))
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, old, had in self._saved:
            if had:
                object.__setattr__(layer, "call", old)
            else:
                object.__delattr__(layer, "call")


def _flat_tokens(t: Any, n: Any) -> Any:
    import tensorflow as tf

    return tf.reshape(t, (n, -1, tf.shape(t)[-1]))


def _per_sample(layer: Any, role: str, x: Any, g: Any, n: Any) -> Any:
    """(n, *variable.shape) per-sample gradient of one call (not Embedding)."""
    import tensorflow as tf

    kind = type(layer).__name__
    var = getattr(layer, role)
    if kind == "Dense":
        if role == "kernel":
            xs = _flat_tokens(tf.cast(x, g.dtype), n)
            return tf.matmul(xs, _flat_tokens(g, n), transpose_a=True)
        return tf.reduce_sum(_flat_tokens(g, n), axis=1)
    if kind == "EinsumDense":
        lhs, out = layer.equation.split("->")
        inp, ker = lhs.split(",")
        if role == "kernel":
            return tf.einsum(f"{inp},{out}->{inp[0]}{ker}", tf.cast(x, g.dtype), g)
        letters = "".join(c for c in out if c in layer.bias_axes)
        r = tf.einsum(f"{out}->{out[0]}{letters}", g)
        return tf.reshape(r, [n] + list(var.shape))
    # LayerNormalization over the last axis
    if role == "beta":
        return tf.reduce_sum(_flat_tokens(g, n), axis=1)
    xf = tf.cast(x, tf.float32) if x.dtype == tf.float16 or x.dtype == tf.bfloat16 else x
    mean, var_ = tf.nn.moments(xf, axes=[-1], keepdims=True)
    xhat = (xf - mean) * tf.math.rsqrt(var_ + layer.epsilon)
    return tf.reduce_sum(_flat_tokens(tf.cast(xhat, g.dtype) * g, n), axis=1)


def _sample_finite(t: Any, n: Any) -> Any:
    import tensorflow as tf

    return tf.reduce_all(tf.math.is_finite(tf.reshape(t, (n, -1))), axis=1)


class TFPerSampleBatchFn(_BatchFn):
    """(batch, limit) -> (float64 sums of squared per-sample gradients, finite, loss finite).

    ``fallback`` maps the index (in ``variables``) of every variable the exact jacobian path
    computes to the reason. The first batch whose samples are all finite is also checked: the
    per-sample gradients of each closed-form variable, summed over the batch, must equal the
    batch gradient (a variable also used outside its layer's ``call``, e.g. a tied embedding
    read by a custom head, fails and is moved to the jacobian path). If the engine cannot run
    the model at all, the whole model falls back to ``adapters.keras.batchfn._TFBatchFn``.
    """

    def __init__(self, model: Any, variables: list[Any], loss: Any, skip: bool) -> None:
        super().__init__(model, variables, loss, skip)
        self.fallback: dict[int, str] = {}
        self._whole: _BatchFn | None = None  # the jacobian path for the whole model
        self._verified = False
        self._plan(set())

    def _plan(self, moved: set[int]) -> None:
        """Assign each variable to a closed-form rule or, failing that (or if in ``moved``), to
        the jacobian path; (re)build the traced functions."""
        want = {id(v): i for i, v in enumerate(self.variables) if i not in moved}
        self.plan: list[tuple[Any, str, int]] = []  # (layer, role, variable index)
        layers = []
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            roles = _layer_vars(layer)
            if not roles or not all(id(v) in want for v in roles.values()):
                for v in roles.values():  # a layer mate was moved: the whole layer goes
                    if id(v) in want:
                        self.fallback.setdefault(want[id(v)], SHARED)
                continue
            layers.append(layer)
            for role, v in roles.items():
                self.plan.append((layer, role, want.pop(id(v))))
        for i in want.values():
            self.fallback.setdefault(i, UNSUPPORTED)
        self.layers = layers
        self.rest = sorted(set(want.values()) | moved)  # left to the exact jacobian path
        self.capture = _Capture(layers)
        self._fn = self._make()
        self._check = self._make(verify=True)

    def _make(self, verify: bool = False) -> Any:
        import tensorflow as tf

        model, variables, loss, skip = self.model, self.variables, self.loss, self.skip
        cap, plan, rest = self.capture, self.plan, self.rest

        @tf.function(reduce_retracing=True, autograph=False)
        def run(batch: Any, limit: Any) -> Any:
            cap.records = {}
            with tf.GradientTape(persistent=bool(rest)) as tape:
                cap.tape = tape
                try:
                    losses = loss(model, batch)
                finally:
                    cap.tape = None
                total = tf.reduce_sum(losses)
            _check_losses(losses)
            n = tf.shape(losses)[0]
            records = cap.records
            probes = [z for layer in cap.layers for _, z in records.get(id(layer), [])]
            checked = sorted({vi for _, _, vi in plan}) if verify else []
            grads = tape.gradient(
                total,
                probes + [variables[i] for i in checked],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            true = dict(zip(checked, grads[len(probes) :], strict=True))
            grads = grads[: len(probes)]
            gz = {id(z): g for z, g in zip(probes, grads, strict=True)}
            loss_ok = tf.math.is_finite(tf.cast(losses, tf.float64))
            # finiteness from the small tensors (inputs, output gradients), not the per-sample
            # blocks; an overflow inside a block is caught on the sums below
            finite = loss_ok
            for layer, _, _ in plan:
                for x, z in records.get(id(layer), []):
                    finite = tf.logical_and(finite, _sample_finite(gz[id(z)], n))
                    if x.dtype.is_floating:
                        finite = tf.logical_and(finite, _sample_finite(x, n))
            use = tf.range(n) < limit
            mask = tf.logical_and(use, finite) if skip else use
            per: dict[int, Any] = {}  # variable index -> (n, ...) per-sample gradient
            emb: dict[int, list[tuple[Any, Any]]] = {}
            for layer, role, vi in plan:
                for x, z in records.get(id(layer), []):
                    g = _masked(gz[id(z)], mask)  # masked samples contribute exact zeros
                    if g.dtype in (tf.float16, tf.bfloat16):  # mixed precision: float32 blocks
                        g = tf.cast(g, tf.float32)  # (squares of half floats overflow early)
                    xm = _masked(x, mask) if x.dtype.is_floating else x
                    if type(layer).__name__ == "Embedding":
                        emb.setdefault(vi, []).append((x, g))
                        continue
                    p = _per_sample(layer, role, xm, g, n)
                    per[vi] = p if vi not in per else per[vi] + p
            sums = []
            if rest:
                jac = tape.jacobian(
                    losses,
                    [variables[i] for i in rest],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                jac64 = [tf.cast(j, tf.float64) for j in jac]
                for j in jac64:
                    finite = tf.logical_and(finite, _sample_finite(j, n))
                mask = tf.logical_and(use, finite) if skip else use
                for i, j in zip(rest, jac64, strict=True):
                    per[i] = _masked(j, mask)
            for i, v in enumerate(variables):
                if i in emb:
                    sums.append(_embedding_sums(emb[i], v, n))
                elif i in per:
                    # squares summed over the batch in float32 or float64 (as the torch engine),
                    # then float64 for the accumulator
                    sums.append(tf.cast(tf.reduce_sum(tf.square(per[i]), axis=0), tf.float64))
                else:  # never used by this batch (e.g. a layer not called)
                    sums.append(tf.zeros(v.shape, tf.float64))
            ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(s)) for s in sums])
            # overflow inside a block: flag every sample, as the jacobian path does
            clean = tf.reduce_all(tf.logical_or(finite, tf.logical_not(mask)))
            overflow = tf.logical_and(tf.logical_not(ok), clean)
            finite = tf.cond(overflow, lambda: tf.zeros_like(finite), lambda: finite)
            if not verify:
                return sums, finite, loss_ok
            # per variable: |sum_b g_b - batch gradient| and its tolerance scale
            errs = []
            for i in checked:
                if i in emb:
                    width = int(variables[i].shape[1])
                    ps = tf.math.unsorted_segment_sum(
                        tf.concat([tf.reshape(g, (-1, width)) for _, g in emb[i]], 0),
                        tf.concat([tf.reshape(tf.cast(x, tf.int64), (-1,)) for x, _ in emb[i]], 0),
                        int(variables[i].shape[0]),
                    )
                elif i in per:
                    ps = tf.reduce_sum(per[i], axis=0)
                else:
                    ps = tf.zeros(variables[i].shape, tf.float64)
                t = true[i]
                if isinstance(t, tf.IndexedSlices):  # an embedding's batch gradient
                    t = tf.math.unsorted_segment_sum(
                        t.values, t.indices, int(variables[i].shape[0])
                    )
                diff = tf.cast(ps, tf.float64) - tf.cast(t, tf.float64)
                bound = tf.sqrt(tf.reduce_sum(sums[i]) * tf.cast(n, tf.float64))
                errs.append(tf.stack([tf.norm(tf.reshape(diff, (-1,))), bound]))
            full = tf.reduce_all(mask) & tf.reduce_all(finite)
            return sums, finite, loss_ok, errs, full

        return run

    def _verify(self, batch: Any, lim: Any) -> Any:
        """The first fully finite batch: run the checking function; move variables whose
        per-sample gradients do not add up to the batch gradient to the jacobian path."""
        sums, finite, loss_ok, errs, full = self._check(batch, lim)
        if not bool(full.numpy()):
            return sums, finite, loss_ok  # not checkable (non-finite or limited): next batch
        self._verified = True
        checked = sorted({vi for _, _, vi in self.plan})
        moved = set()
        pairs = [tuple(float(a) for a in e.numpy()) for e in errs]
        floor = 1e-2 * max([b for _, b in pairs] + [0.0])  # noise-level gradients (key biases)
        dtypes = {vi: str(layer.compute_dtype) for layer, _, vi in self.plan}
        for i, (err, bound) in zip(checked, pairs, strict=True):
            rtol = _RTOL.get(dtypes[i], 3e-2)  # the dtype the per-sample blocks are formed in
            if not err <= 1.5 * rtol * max(bound, floor) + 1e-30:
                moved.add(i)
                self.fallback[i] = (
                    "per-sample gradients do not add up to the batch gradient (the variable is "
                    f"also used outside its layer's call; error {err:.3g})"
                )
        if not moved:
            return sums, finite, loss_ok
        self._plan(moved | set(self.rest))
        return None  # rerun under the new plan's capture

    def __call__(
        self, batch: Any, limit: int, tensors: bool = False
    ) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """``tensors``: the sums are returned as float64 TensorFlow tensors (not copied to the
        host; the jacobian path's NumPy arrays where the whole model fell back)."""
        import tensorflow as tf

        if self._whole is not None:
            return self._whole(batch, limit)
        lim = tf.constant(limit, tf.int32)
        try:
            out = None
            if not self._verified and self.plan:
                with self.capture:
                    out = self._verify(batch, lim)
            if out is None:
                with self.capture:
                    out = self._fn(batch, lim)
            sums, finite, loss_ok = out
        except GuidedDropoutError:
            raise
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError) as exc:
            warnings.warn(
                f"estimate_fisher: the one-backward per-sample engine could not run the model "
                f"({exc!s:.200}); every weight falls back to the GradientTape.jacobian path",
                RuntimeWarning,
                stacklevel=3,
            )
            self.fallback = {i: f"engine failed: {exc!s:.120}" for i in range(len(self.variables))}
            self._whole = _TFBatchFn(self.model, self.variables, self.loss, self.skip)
            return self._whole(batch, limit)
        return (
            (list(sums) if tensors else [s.numpy() for s in sums]),
            finite.numpy(),
            loss_ok.numpy(),
        )


def _masked(t: Any, mask: Any) -> Any:
    import tensorflow as tf

    m = tf.reshape(mask, [-1] + [1] * (len(t.shape) - 1))
    return tf.where(m, t, tf.zeros_like(t))


def _embedding_sums(calls: list[tuple[Any, Any]], var: Any, n: Any) -> Any:
    """Sum over samples of the squared per-sample embedding gradient, via unique (sample, id)."""
    import tensorflow as tf

    vocab = int(var.shape[0])
    keys, rows = [], []
    for ids, g in calls:
        ids = tf.reshape(tf.cast(ids, tf.int64), (n, -1))
        length = tf.shape(ids, out_type=tf.int64)[1]
        sample = tf.repeat(tf.range(tf.cast(n, tf.int64)), length)
        keys.append(sample * vocab + tf.reshape(ids, (-1,)))
        rows.append(tf.reshape(g, (-1, int(var.shape[1]))))
    key = tf.concat(keys, 0)
    row = tf.concat(rows, 0)
    uniq, idx = tf.unique(key)
    seg = tf.math.unsorted_segment_sum(row, idx, tf.shape(uniq)[0])
    return tf.cast(tf.math.unsorted_segment_sum(tf.square(seg), uniq % vocab, vocab), tf.float64)


__all__ = ["TFPerSampleBatchFn", "_TFBatchFn"]
