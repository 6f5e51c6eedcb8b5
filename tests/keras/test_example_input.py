"""``example_input=`` for the Keras ``sites``, ``profile`` and ``apply`` (issue 23, item 4): the
forward that finds which dropout layers are called (and in which order) runs on it where no
input can be guessed (a subclassed model) or the guess does not fit (a model that needs its
full sequence length, as keras_hub's SigLIP text encoder does)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
from gd_core.errors import ArgumentError  # noqa: E402


class DeadDropNet(keras.Model):
    """A subclassed model holding a dropout layer it never calls (Gemma's feedforward_dropout)."""

    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(4, name="fc")
        self.drop = keras.layers.Dropout(0.1, name="drop")
        self.unused = keras.layers.Dropout(0.1, name="unused")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x, training=None):
        return self.head(self.drop(self.fc(x), training=training))


def test_example_input_finds_the_dead_sites_of_a_subclassed_model():
    model = DeadDropNet()
    x = np.ones((2, 3), "float32")
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guessed = [s.name for s in gdk.sites(model)]  # no input known: not checked
    assert guessed == ["drop", "unused"]
    with pytest.warns(UserWarning, match="never called"):
        given = gdk.sites(model, example_input=x)
    assert [s.name for s in given] == ["drop"]
    assert set(given[0].params) == {"fc.weight", "fc.bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gdk.apply(model, {"drop": 0.04}, example_input=x)
        prof = gdk.profile(
            model,
            [x],
            lambda m, b: keras.ops.mean(keras.ops.square(m(b)), axis=-1),
            progress=False,
            example_input=x,
        )
    assert [r.site for r in report.rows] == ["drop"]
    assert prof.site_names == ["drop"]


class FullLength(keras.layers.Layer):
    """Adds a position embedding of a fixed length: the input must have exactly that length."""

    def build(self, shape):
        self.pos = self.add_weight(shape=(6, int(shape[-1])), name="pos")

    def call(self, x):
        return x + self.pos

    def compute_output_shape(self, shape):
        return shape


def _full_length_model():
    inp = keras.Input((None, 3))
    h = keras.layers.Dropout(0.1, name="drop")(FullLength(name="pos")(inp))
    unused = keras.layers.Dropout(0.1, name="unused")  # held, never in the graph's path
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    model.unused = unused
    return model


def test_example_input_where_the_guessed_input_does_not_fit():
    model = _full_length_model()
    with pytest.warns(UserWarning, match="never called"):
        found = gdk.sites(model, example_input=np.ones((2, 6, 3), "float32"))
    assert [s.name for s in found] == ["drop"]


def test_an_example_input_the_model_cannot_run_is_a_clear_error():
    model = _full_length_model()
    with pytest.raises(ArgumentError, match="example_input.*InvalidArgument|example_input"):
        gdk.sites(model, example_input=np.ones((2, 4, 3), "float32"))
