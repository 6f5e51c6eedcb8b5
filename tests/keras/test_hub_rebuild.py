"""The Keras Hub failures of issue 23, as tiny models of their own patterns: a graph model
``keras.models.clone_model`` cannot rebuild (DeiT, Llama, Qwen3: a layer whose ``get_config``
fails), a clone whose layers made without a name are named anew (Mixtral, T5: the weights kept
their shapes but lost their canonical names), and one dropout layer a block calls three times
(ESM: its site guarded nothing, so the profile's scores were NaN). A dropout-free backbone
(Gemma at dropout 0) gets inserted sites: tests/keras/test_inserted.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
from adapters.keras.calls import called_layers  # noqa: E402
from adapters.keras.discovery import ModelIndex  # noqa: E402
from gd_core.errors import ArgumentError  # noqa: E402


class NoConfigBlock(keras.layers.Layer):
    """A layer that makes its own dropout and cannot give its config (LlamaTransformerDecoder
    reads an attribute it never sets)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, name="inner")
        self.drop = keras.layers.Dropout(0.1, name="block_drop")

    def call(self, x, training=None):
        return self.drop(self.dense(x), training=training)

    def get_config(self):
        raise AttributeError("'NoConfigBlock' object has no attribute 'rope_scaling_factor'")


@keras.saving.register_keras_serializable(package="gd_test_rebuild")
class NoConfigNet(keras.Model):
    """A functional model built by its own class from its config (a keras_hub backbone)."""

    def __init__(self, units=4, **kwargs):
        inp = keras.Input((3,), name="x")
        h = NoConfigBlock(units, name="block")(inp)
        self_drop = keras.layers.Dropout(0.1, name="top_drop")  # a node of the graph only
        out = keras.layers.Dense(2, name="head")(self_drop(h))
        super().__init__(inp, out, **kwargs)
        self.units = units

    def get_config(self):
        return {"units": self.units, "name": self.name}


def _rates(model):
    idx = ModelIndex.build(model)
    called = called_layers(model, idx.site_layers)
    assert called is not None
    return {idx.site_name(x): float(x.rate) for x in idx.site_layers if id(x) in called}


def test_apply_rebuilds_a_model_clone_model_cannot():
    keras.utils.set_random_seed(0)
    model = NoConfigNet()
    x = np.ones((2, 3), "float32")
    before = keras.ops.convert_to_numpy(model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner, top = (s.name for s in gdk.sites(model))  # block.drop (TF), block_drop (torch)
        report = gdk.apply(model, {inner: 0.03, top: 0.07})
    new = report.model
    assert new is not model and top == "top_drop"
    assert _rates(new) == {inner: 0.03, top: 0.07}  # what one forward calls
    assert _rates(model) == {inner: 0.1, top: 0.1}  # the input is unchanged
    np.testing.assert_allclose(keras.ops.convert_to_numpy(new(x)), before, rtol=1e-6)
    assert gdk.fingerprint(new) == gdk.fingerprint(model)


def test_a_rebuilt_model_saved_by_its_hyperparameters_refuses_to_save(tmp_path):
    # its .keras file would hold the hyperparameters only and load plain dropout layers at the
    # config's rates: keras_hub's LlamaBackbone loaded at 0.1 everywhere, silently
    keras.utils.set_random_seed(0)
    model = NoConfigNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner, top = (s.name for s in gdk.sites(model))
        report = gdk.apply(model, {inner: 0.03, top: 0.07})
    assert any("saved by its own config" in n and "save_weights" in n for n in report.notes)
    with pytest.raises(ArgumentError, match="save the weights"):
        report.model.save(tmp_path / "guided.keras")
    assert not (tmp_path / "guided.keras").exists()
    report.model.save_weights(tmp_path / "guided.weights.h5")  # the way the note gives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = gdk.apply(report.model, {inner: 0.05, top: 0.02})  # apply again still works
    assert _rates(again.model) == {inner: 0.05, top: 0.02}


class AutoNamedBlock(keras.layers.Layer):
    """A layer whose sublayers have no names: Keras counts them per process."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)
        self.drop = keras.layers.Dropout(0.1)

    def call(self, x, training=None):
        return self.drop(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_a_clone_keeps_the_canonical_names_of_auto_named_layers():
    inp = keras.Input((3,))
    out = keras.layers.Dense(2, name="head")(AutoNamedBlock(4, name="block")(inp))
    model = keras.Model(inp, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        site = gdk.sites(model)[0].name
        new = gdk.apply(model, {site: 0.05}).model
    assert gdk.fingerprint(new) == gdk.fingerprint(model)
    assert _rates(new) == {site: 0.05}


class ThriceBlock(keras.layers.Layer):
    """ESM's encoder block: one dropout layer before attention, after it and after the MLP."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.attn = keras.layers.Dense(4, name="attn")
        self.up = keras.layers.Dense(8, name="up")
        self.down = keras.layers.Dense(4, name="down")
        self.drop = keras.layers.Dropout(0.1, name="drop")

    def call(self, x, training=None):
        h = x + self.attn(self.norm(self.drop(x, training=training)))
        return h + self.drop(self.down(self.up(self.drop(h, training=training))), training=training)


def test_a_dropout_called_three_times_guards_the_union_over_its_calls():
    inp = keras.Input((4,))
    out = keras.layers.Dense(2, name="head")(ThriceBlock(name="block")(inp))
    model = keras.Model(inp, out)
    (site,) = gdk.sites(model)
    layers = {p.rsplit(".", 1)[0].split(".")[-1] for p in site.params}
    assert layers == {"norm", "attn", "up", "down"}
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")

    def loss(m, batch):
        return keras.ops.mean(keras.ops.square(m(batch, training=False)), axis=-1)

    prof = gdk.profile(model, [x], loss, progress=False)
    assert np.all(np.isfinite(prof.scores))
