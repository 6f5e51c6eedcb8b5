"""The one-forward-one-backward Keras engine equals the jacobian path (rtol 1e-5)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the per-sample engine targets the TensorFlow backend", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from refmodels import build_keras, encoder_spec, mlp_spec  # noqa: E402

from adapters.keras.discovery import ModelIndex  # noqa: E402
from adapters.keras.fisher import _from_pair_loss, _TFBatchFn  # noqa: E402
from adapters.keras.persample import TFPerSampleBatchFn  # noqa: E402


def _both(model, batch, loss, skip=False, limit=2**31 - 1):
    variables = list(ModelIndex.build(model).trainable().values())
    ref = _TFBatchFn(model, variables, loss, skip)(batch, limit)
    new_fn = TFPerSampleBatchFn(model, variables, loss, skip)
    return ref, new_fn(batch, limit), new_fn


def _close(ref, new):
    for a, b in zip(ref[0], new[0], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-12 * max(1.0, float(np.abs(a).max())))
    np.testing.assert_array_equal(ref[1], new[1])
    np.testing.assert_array_equal(ref[2], new[2])


def _xent(model, batch):
    x, y = batch
    return keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)


@pytest.mark.parametrize("make", [mlp_spec, encoder_spec])
def test_conformance_fixtures_match_jacobian(make):
    spec = make()
    model = build_keras(
        spec, dropout_cls=lambda rate, name, dtype: keras.layers.Identity(name=name)
    )
    x = spec.inputs.astype("float64" if spec.name == "mlp" else "int32")
    ref, new, fn = _both(model, (x, spec.labels), _xent)
    assert fn.rest == []  # every weight in closed form
    _close(ref, new)
    ref, new, _ = _both(model, (x, spec.labels), _xent, limit=3)
    _close(ref, new)


def test_einsum_activation_shared_and_fallback():
    inp = keras.Input((5, 4))
    shared = keras.layers.Dense(6, activation="gelu", name="shared")
    h = shared(inp)
    h = keras.layers.EinsumDense("abc,cd->abd", (5, 6), bias_axes="d", activation="tanh")(h)
    h = keras.layers.LayerNormalization()(h)
    h = shared(keras.layers.Dense(4)(h))
    mha = keras.layers.MultiHeadAttention(2, 3, name="mha")
    h = mha(h, h)
    h = keras.layers.BatchNormalization()(h)  # not in closed form: the jacobian fallback
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5, 4)).astype("float32")
    y = rng.integers(0, 3, size=(7,))
    loss = _from_pair_loss(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    )
    ref, new, fn = _both(model, (x, y), loss)
    assert len(fn.rest) == 2  # gamma, beta of BatchNormalization
    scale = max(float(np.abs(a).max()) for a in ref[0])  # float32: noise-level entries need atol
    for a, b in zip(ref[0], new[0], strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6 * scale)


def _isolated(fn, batch):
    """The batch-of-one retry: ``fn`` on each sample alone, sums added, flags stacked."""
    n = len(keras.tree.flatten(batch)[0])
    total, finite, loss_ok = None, [], []
    for i in range(n):
        sums, ok, lok = fn(keras.tree.map_structure(lambda t, i=i: t[i : i + 1], batch), 1)
        finite.append(bool(ok[0]))
        loss_ok.append(bool(lok[0]))
        total = sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
    return total, np.array(finite), np.array(loss_ok)


def test_nonfinite_flags_are_per_sample():
    """The jacobian path's pfor marks every sample of a NaN batch non-finite (hence its per-sample
    retry); this engine flags only the NaN sample, equal to the batch-of-one retry."""
    spec = mlp_spec()
    model = build_keras(
        spec, dropout_cls=lambda rate, name, dtype: keras.layers.Identity(name=name)
    )
    x = spec.inputs.astype("float64").copy()
    x[2] = np.nan
    variables = list(ModelIndex.build(model).trainable().values())
    for skip in (False, True):
        batch = (x, spec.labels)
        ref = _isolated(_TFBatchFn(model, variables, _xent, skip), batch)
        new = TFPerSampleBatchFn(model, variables, _xent, skip)(batch, 2**31 - 1)
        np.testing.assert_array_equal(new[1], ref[1])
        np.testing.assert_array_equal(new[2], ref[2])
        if skip:
            _close(ref, new)
