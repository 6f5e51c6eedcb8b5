"""estimate_fisher pays its fixed cost (tracing, the first-batch check) once per model (issue 27)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from keras_helpers import BACKEND, batches, build_mlp, sce

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="the engines are traced on TF")


def _xent(model, batch):
    x, y = batch
    logits = model(x, training=False)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _counting(monkeypatch):
    import adapters.keras.fisher as kf

    made = []
    real = kf.batch_fn

    def counted(model, variables, loss, skip):
        made.append(real(model, variables, loss, skip))
        return made[-1]

    monkeypatch.setattr(kf, "batch_fn", counted)
    return made


def test_a_second_call_reuses_the_traced_and_checked_engine(monkeypatch, toy):
    made = _counting(monkeypatch)
    model = build_mlp(seed=5)
    x, y = toy
    data = batches(x[:32], y[:32], 16)
    first = gdk.estimate_fisher(model, data, _xent, progress=False)
    assert len(made) == 1
    fn = made[0]
    traces = fn._fn.experimental_get_tracing_count()
    checks = fn._check.experimental_get_tracing_count()
    calls = []
    monkeypatch.setattr(fn, "_verify", lambda *a: calls.append(a))  # must not run again
    second = gdk.estimate_fisher(model, data, _xent, progress=False)
    assert len(made) == 1 and calls == []
    assert fn._fn.experimental_get_tracing_count() == traces
    assert fn._check.experimental_get_tracing_count() == checks
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert second.accumulator.metadata["fisher_fallback"] == {}
    # a loss name is keyed by value; another loss gets its own engine
    gdk.estimate_fisher(
        model, data, "sparse_categorical_crossentropy", params=["classifier.weight"], progress=False
    )
    gdk.estimate_fisher(
        model, data, "sparse_categorical_crossentropy", params=["classifier.weight"], progress=False
    )
    assert len(made) == 2


def test_a_replaced_layer_of_the_same_name_and_shape_gets_a_new_engine(monkeypatch, toy):
    made = _counting(monkeypatch)
    x, y = toy
    data = batches(x[:16], y[:16], 8)

    def head(seed):
        keras.utils.set_random_seed(seed)
        return keras.layers.Dense(3, name="head")

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc"), head(0)])
    gdk.estimate_fisher(model, data, sce(), progress=False)
    model.pop()
    model.add(head(1))  # same canonical names and shapes, other variables
    got = gdk.estimate_fisher(model, data, sce(), progress=False)
    assert len(made) == 2
    fresh = keras.Sequential([keras.Input((6,)), model.layers[0], model.layers[1]])
    want = gdk.estimate_fisher(fresh, data, sce(), progress=False)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_the_cache_does_not_keep_a_model_alive_nor_change_its_saved_file(toy, tmp_path):
    x, y = toy
    model = build_mlp(seed=6)
    gdk.estimate_fisher(model, batches(x[:16], y[:16], 8), _xent, progress=False)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not hasattr(loaded, "__gd_fisher_engines__")
    np.testing.assert_allclose(loaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
