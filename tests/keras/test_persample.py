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

from adapters.keras.batchfn import _TFBatchFn  # noqa: E402
from adapters.keras.discovery import ModelIndex  # noqa: E402
from adapters.keras.fisher import _from_pair_loss  # noqa: E402
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


# -- estimate_fisher uses the engine ---------------------------------------------------------
def _jacobian_only(monkeypatch):
    """estimate_fisher on the jacobian path alone (the reference)."""
    import adapters.keras.fisher as kf

    monkeypatch.setattr(kf, "batch_fn", lambda m, v, lf, skip: _TFBatchFn(m, v, lf, skip))


def _estimate_both(monkeypatch, model, data, loss, **kw):
    from adapters.keras import estimate_fisher

    new = estimate_fisher(model, data, loss, progress=False, **kw)
    with monkeypatch.context() as m:
        _jacobian_only(m)
        ref = estimate_fisher(model, data, loss, progress=False, **kw)
    assert sorted(new) == sorted(ref) and (new.count, new.skipped) == (ref.count, ref.skipped)
    return new, ref


@pytest.mark.parametrize("make", [mlp_spec, encoder_spec])
def test_estimate_fisher_equals_the_jacobian_path(monkeypatch, make):
    spec = make()
    model = build_keras(
        spec, dropout_cls=lambda rate, name, dtype: keras.layers.Identity(name=name)
    )
    x = spec.inputs.astype("float64" if spec.name == "mlp" else "int32")
    data = [(x[:4], spec.labels[:4]), (x[4:], spec.labels[4:])]
    new, ref = _estimate_both(monkeypatch, model, data, _xent, max_samples=len(x) - 1)
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert new.accumulator.metadata["fisher_fallback"] == {}
    for name in ref:
        np.testing.assert_allclose(new[name], ref[name], rtol=1e-5, atol=1e-12, err_msg=name)


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def test_uncovered_layers_fall_back_and_are_reported(monkeypatch, caplog):
    keras.utils.set_random_seed(1)
    inp = keras.Input((5, 4), dtype="float64")
    h = keras.layers.Dense(6, activation="tanh", name="fc", dtype="float64")(inp)
    h = keras.layers.BatchNormalization(name="bn", dtype="float64")(h)
    out = keras.layers.Dense(3, name="head", dtype="float64")(
        keras.layers.GlobalAveragePooling1D(dtype="float64")(h)
    )
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(6, 5, 4)), rng.integers(0, 3, size=(6,))) for _ in range(2)]
    with caplog.at_level("INFO", logger="adapters.keras.fisher"):
        new, ref = _estimate_both(monkeypatch, model, data, _sce())
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert sorted(fallback) == ["bn.bias", "bn.weight"], fallback
    assert all("closed form" in why for why in fallback.values())
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert "jacobian fallback for 2 tensor(s): bn.weight (not a variable" in caplog.text
    for name in ref:
        np.testing.assert_allclose(new[name], ref[name], rtol=1e-5, atol=1e-14, err_msg=name)


class _TiedHead(keras.layers.Layer):
    """Logits from the transposed embedding matrix of another layer (a tied output head)."""

    def __init__(self, embedding, **kw):
        super().__init__(**kw)
        self._emb = [embedding]  # a list: not tracked as a sublayer, its weight not ours

    def call(self, h):
        return keras.ops.matmul(
            keras.ops.mean(h, axis=1), keras.ops.transpose(self._emb[0].embeddings)
        )


def test_a_weight_used_outside_its_layer_falls_back(monkeypatch):
    keras.utils.set_random_seed(2)
    inp = keras.Input((4,), dtype="int32")
    emb = keras.layers.Embedding(7, 5, name="emb", dtype="float64")
    h = keras.layers.Dense(5, activation="tanh", name="fc", dtype="float64")(emb(inp))
    model = keras.Model(inp, _TiedHead(emb, name="tied", dtype="float64")(h))
    variables = list(ModelIndex.build(model).trainable().values())
    assert sum(v is emb.embeddings for v in variables) == 1
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 7, size=(5, 4)).astype("int32"), rng.integers(0, 7, size=(5,)))]
    new, ref = _estimate_both(monkeypatch, model, data * 2, _sce())
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert list(fallback) == ["emb.weight"], fallback
    assert "do not add up to the batch gradient" in fallback["emb.weight"]
    for name in ref:
        np.testing.assert_allclose(new[name], ref[name], rtol=1e-5, atol=1e-14, err_msg=name)


def test_engine_failure_falls_back_for_the_whole_model(monkeypatch):
    spec = mlp_spec()
    model = build_keras(
        spec, dropout_cls=lambda rate, name, dtype: keras.layers.Identity(name=name)
    )

    def broken(self, batch, lim):
        raise NotImplementedError("no closed form today")

    monkeypatch.setattr(TFPerSampleBatchFn, "_verify", broken)
    data = [(spec.inputs.astype("float64"), spec.labels)]
    with pytest.warns(RuntimeWarning, match="no closed form today"):
        new, ref = _estimate_both(monkeypatch, model, data, _xent)
    assert new.accumulator.metadata["fisher_engine"] == "jacobian"
    assert len(new.accumulator.metadata["fisher_fallback"]) == len(new)
    for name in ref:
        np.testing.assert_allclose(new[name], ref[name], rtol=1e-12, err_msg=name)


def test_mixed_precision_blocks_are_float32():
    """float16 compute: per-sample blocks and their squares in float32 (a float16 square
    overflows above 256), no spurious fallback from the first-batch check."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 4))
    h = keras.layers.Dense(16, activation="gelu", dtype="mixed_float16")(inp)
    h = keras.layers.LayerNormalization(dtype="mixed_float16")(h)
    h = keras.layers.MultiHeadAttention(2, 8, dtype="mixed_float16")(h, h)
    out = keras.layers.Dense(3, dtype="float32")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    y = rng.integers(0, 3, size=(8,))

    def loss(model, batch):  # scaled: per-sample gradients above 256
        return 1000.0 * _xent(model, batch)

    ref, new, fn = _both(model, (x, y), loss)
    assert fn.fallback == {}
    assert new[1].all() and all(np.isfinite(s).all() for s in new[0])
    scale = max(float(np.abs(a).max()) for a in ref[0])
    for a, b in zip(ref[0], new[0], strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=1e-4 * scale)


class _PositionAdd(keras.layers.Layer):
    """CLIP's vision embedding: an Embedding called on a non-trainable integer variable (its
    position ids), not on a tensor."""

    def build(self, input_shape):
        self.ids = self.add_weight(
            shape=(input_shape[1],), initializer="zeros", dtype="int32", trainable=False
        )
        self.ids.assign(np.arange(input_shape[1], dtype="int32"))
        self.pos = keras.layers.Embedding(input_shape[1], input_shape[-1], name="pos")
        self.pos.build((input_shape[1],))

    def call(self, x):
        return x + self.pos(self.ids)


def test_an_embedding_called_on_a_variable_is_profiled():
    """The per-sample engine recorded the variable itself as the embedding's input and read its
    dtype as a TensorFlow dtype (a Keras variable's is a string): profile raised AttributeError
    on keras_hub's CLIP and SigLIP vision encoders."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the per-sample engine of the TensorFlow backend")
    inp = keras.Input((3, 4))
    h = keras.layers.Dense(4, name="fc")(_PositionAdd(name="embed")(inp))
    h = keras.layers.Dropout(0.1, name="drop")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    x = np.random.default_rng(0).normal(size=(4, 3, 4)).astype("float32")

    def loss(m, batch):
        return keras.ops.mean(keras.ops.square(m(batch, training=False)), axis=(1, 2))

    from adapters.keras import estimate_fisher

    # the one-backward engine cannot run this graph (its gather of a variable): the fallback
    # says so, and the values come from the jacobian path
    with pytest.warns(RuntimeWarning, match="falls back to the GradientTape.jacobian path"):
        fisher = estimate_fisher(model, [x], loss, progress=False)
    assert np.all(fisher["pos.weight"] >= 0) and fisher["pos.weight"].any()
