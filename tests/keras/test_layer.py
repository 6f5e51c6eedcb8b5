"""The GuidedDropout layer: statistics, validation, masking, seeds, schedule, serialisation."""

from __future__ import annotations

import numpy as np
import pytest
from keras_helpers import BACKEND

import gd_core
from gd_core.errors import ArgumentError

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
GuidedDropout = gdk.GuidedDropout
_read = pytest.importorskip("adapters.keras.layer")._read

N = 20_000


def run(layer, x, training=True):
    return np.asarray(keras.ops.convert_to_numpy(layer(x, training=training)))


def test_per_unit_drop_rates_and_mean_within_statistical_bounds():
    rates = [0.0, 0.05, 0.1, 0.3, 0.5]
    layer = GuidedDropout(rates=rates, seed=0)
    assert layer.rate == pytest.approx(np.mean(rates))
    out = run(layer, np.ones((N, len(rates)), "float32"))
    for j, p in enumerate(rates):
        col = out[:, j]
        dropped = np.mean(col == 0.0)
        assert abs(dropped - p) <= gd_core.binomial_halfwidth(N, p), (j, dropped, p)
        kept = col[col != 0.0]
        np.testing.assert_allclose(kept, 1.0 / (1.0 - p), rtol=1e-6)  # inverted scaling
        assert abs(col.mean() - 1.0) <= gd_core.mean_halfwidth(N, p), (j, col.mean())
    if rates[0] == 0.0:
        assert np.all(out[:, 0] == 1.0)


def test_scalar_rate_statistics_match_keras_dropout_semantics():
    p = 0.2
    out = run(GuidedDropout(p, seed=1), np.ones((N // 10, 10), "float32"))
    assert abs(np.mean(out == 0.0) - p) <= gd_core.binomial_halfwidth(out.size, p)
    assert abs(out.mean() - 1.0) <= gd_core.mean_halfwidth(out.size, p)
    assert set(np.unique(out).round(5)) == {0.0, 1.25}


def test_identity_when_not_training_and_for_zero_rate():
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    layer = GuidedDropout(rates=[0.5, 0.5, 0.5, 0.5], seed=0)
    np.testing.assert_array_equal(run(layer, x, training=False), x)
    np.testing.assert_array_equal(np.asarray(keras.ops.convert_to_numpy(layer(x))), x)
    np.testing.assert_array_equal(run(GuidedDropout(0.0), x), x)


def test_seeded_layers_are_deterministic_and_calls_differ():
    x = np.ones((64, 8), "float32")
    a1, a2 = GuidedDropout(0.5, seed=7), GuidedDropout(0.5, seed=7)
    first = run(a1, x)
    np.testing.assert_array_equal(first, run(a2, x))
    assert not np.array_equal(first, run(a1, x))  # the seed generator advances
    assert not np.array_equal(first, run(GuidedDropout(0.5, seed=8), x))


def test_noise_shape_shares_the_mask_along_axis_with_per_unit_rates():
    layer = GuidedDropout(rates=[0.0, 0.5, 0.5], noise_shape=(None, 1, None), seed=3)
    out = run(layer, np.ones((200, 5, 3), "float32"))
    assert np.all(out == out[:, :1, :])  # one mask per (sample, unit), shared across axis 1
    assert np.all(out[:, :, 0] == 1.0)
    assert 0 < np.mean(out[:, 0, 1] == 0) < 1


def test_mask_passes_through():
    layer = GuidedDropout(0.3, seed=0)
    assert layer.supports_masking
    mask = np.array([[True, False, True]])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.compute_mask(np.ones((1, 3, 2)), mask)), mask
    )
    inp = keras.Input((3, 2))
    masked = keras.layers.Masking(0.0)(inp)
    pooled = keras.layers.GlobalAveragePooling1D()(GuidedDropout(0.3)(masked))
    model = keras.Model(inp, pooled)
    x = np.array([[[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]], "float32")
    # the padded step is ignored by the pooling only if the mask went through the dropout
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), [[2.0, 3.0]])


@pytest.mark.single_backend
@pytest.mark.parametrize(
    ("kwargs", "argument", "fragment"),
    [
        ({"rate": 1.0}, "rate", "[0, 1)"),
        ({"rate": -0.1}, "rate", "Received: rate=-0.1"),
        ({"rate": float("nan")}, "rate", "[0, 1)"),
        ({"rate": "0.1"}, "rate", "type str"),
        ({}, "rate", "rate=None"),
        ({"rates": [0.1, 1.0]}, "rates", "rates[1]=1.0"),
        ({"rates": [[0.1, 0.2]]}, "rates", "1-D"),
        ({"rates": []}, "rates", "non-empty"),
        ({"rate": 0.3, "rates": [0.1, 0.2]}, "rate", "mean of `rates`"),
        ({"rate": 0.1, "noise_shape": "ab"}, "noise_shape", "tuple or list"),
        ({"rate": 0.1, "noise_shape": (None, 0)}, "noise_shape", "index 1: 0"),
        ({"rate": 0.1, "noise_shape": (None, 1.5)}, "noise_shape", "type: float"),
        ({"rates": [0.1, 0.2], "noise_shape": (None, 3)}, "noise_shape", "None or 2"),
        ({"rate": 0.1, "site": ""}, "site", "non-empty"),
        ({"rate": 0.1, "schedule": {"kind": "sometimes"}}, "kind", "sometimes"),
    ],
)
def test_bad_arguments_are_rejected_with_keras_style_messages(kwargs, argument, fragment):
    with pytest.raises(ValueError) as info:
        GuidedDropout(**kwargs)
    text = str(info.value)
    assert argument in text and fragment in text
    assert "fix" in text.lower()


@pytest.mark.single_backend
def test_rate_equal_to_mean_of_rates_is_accepted():
    layer = GuidedDropout(0.15, rates=[0.1, 0.2])
    assert layer.rates == (0.1, 0.2) and layer.rate == pytest.approx(0.15)


def test_rates_of_the_wrong_length_fail_at_construction_and_call():
    inp = keras.Input((6,))
    with pytest.raises(ValueError, match=r"one probability per feature .*\(6\).*2 rates"):
        keras.Model(inp, GuidedDropout(rates=[0.1, 0.2])(inp))
    with pytest.raises(ValueError, match="2 rates"):
        GuidedDropout(rates=[0.1, 0.2])(np.ones((2, 6), "float32"), training=True)


def test_schedule_step_and_multiplier():
    layer = GuidedDropout(0.5, seed=0, schedule=gd_core.Schedule("early", steps=2))
    x = np.ones((4000, 4), "float32")
    assert np.mean(run(layer, x) == 0) > 0.4
    assert [layer.step(), layer.step()] == [1.0, 0.0]
    assert layer.current_step == 2
    np.testing.assert_array_equal(run(layer, x), x)  # multiplier 0: dropout switched off
    layer.set_multiplier(0.5)  # effective p = 0.25
    out = run(layer, x)
    assert abs(np.mean(out == 0) - 0.25) <= gd_core.binomial_halfwidth(out.size, 0.25)
    with pytest.raises(ArgumentError, match="multiplier"):
        layer.set_multiplier(1.5)
    warm = GuidedDropout(0.1, schedule={"kind": "linear_warmup", "steps": 4})
    assert float(_read(warm.multiplier)) == 0.0
    assert warm.step(2) == pytest.approx(0.5)


def test_scheduler_callback_steps_every_batch(toy):
    x, y = toy
    inp = keras.Input((6,))
    h = GuidedDropout(0.1, schedule={"kind": "early", "steps": 5}, name="sched_drop")(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[gdk.GuidedDropoutScheduler()])
    layer = model.get_layer("sched_drop")
    assert layer.current_step == 2 * int(np.ceil(len(x) / 32))
    assert float(_read(layer.multiplier)) == 0.0


def test_config_round_trip():
    layer = GuidedDropout(
        rates=[0.0, 0.2],
        noise_shape=(None, None),
        seed=5,
        site="encoder.dropout",
        schedule={"kind": "cosine", "steps": 10},
        name="drop",
    )
    clone = GuidedDropout.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.site == "encoder.dropout" and clone.schedule == gd_core.Schedule("cosine", 10)
    x = np.ones((32, 2), "float32")
    np.testing.assert_array_equal(run(clone, x), run(layer, x))  # same seed, same masks


def test_keras_file_round_trip_without_custom_objects(tmp_path, toy):
    x, _ = toy
    inp = keras.Input((6,))
    h = keras.layers.Dense(4, name="dense")(inp)
    h = GuidedDropout(
        rates=[0.1, 0.2, 0.3, 0.0],
        seed=2,
        site="enc.dropout",
        schedule={"kind": "early", "steps": 9},
    )(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    model.layers[2].step(3)
    path = tmp_path / "guided.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: the layer is registered
    layer = loaded.layers[2]
    assert isinstance(layer, GuidedDropout)
    assert layer.rates == (0.1, 0.2, 0.3, 0.0) and layer.site == "enc.dropout"
    assert layer.current_step == 3 and layer.schedule == gd_core.Schedule("early", 9)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(_read(a), _read(b))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )
    assert BACKEND in ("tensorflow", "torch")
