"""Models of the issue-14.8 saving tests, importable in a fresh process (a uniquely named module).

Each builder returns an unbuilt-or-built model with standard ``Dropout`` layers; the subclassed
classes are registered so that ``keras.models.load_model`` finds them after ``import`` of this
module.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402


def sequential() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, activation="tanh", name="enc0_dense"),
            layers.Dropout(0.1, name="enc0_dropout"),
            layers.Dense(8, activation="tanh", name="enc1_dense"),
            layers.Dropout(0.1, name="enc1_dropout"),
            layers.Dense(3, name="head"),
        ],
        name="seq",
    )


def functional() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="features")
    h = layers.Dense(8, activation="tanh", name="enc0_dense")(inp)
    h = layers.Dropout(0.1, name="enc0_dropout")(h)
    h = layers.Dense(8, activation="tanh", name="enc1_dense")(h)
    h = layers.LayerNormalization(name="enc1_norm")(h)
    h = layers.Dropout(0.1, name="enc1_dropout")(h)
    return keras.Model(inp, layers.Dense(3, name="head")(h), name="func")


def attention() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 8), name="tokens")
    att = layers.MultiHeadAttention(2, 4, dropout=0.1, name="attn")(inp, inp)
    h = layers.Dropout(0.1, name="attn_out_dropout")(att)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inp, layers.Dense(2, name="head")(h), name="mha")


@keras.saving.register_keras_serializable(package="gd_test_saving")
class Block(layers.Layer):
    def __init__(self, units: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = layers.Dense(units, name="dense")
        self.dropout = layers.Dropout(0.1, name="dropout")

    def call(self, x, training=False):
        return self.dropout(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="gd_test_saving")
class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.b0 = Block(name="b0")
        self.head_dropout = layers.Dropout(0.2, name="head_dropout")
        self.head = layers.Dense(3, name="head")

    def call(self, x, training=False):
        return self.head(self.head_dropout(self.b0(x, training=training), training=training))


@keras.saving.register_keras_serializable(package="gd_test_saving")
class Encoder(layers.Layer):
    """Makes its Dense and Dropout layers in ``build`` from one ``dropout`` hyperparameter (as
    keras_hub's transformer layers do): its config cannot carry per-layer guided rates."""

    def __init__(self, units: int = 8, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.units, self.dropout = units, dropout

    def build(self, input_shape):
        self.inner = layers.Dense(self.units, activation="tanh", name="inner")
        self.inner.build(input_shape)
        self.inner_dropout = layers.Dropout(self.dropout, name="inner_dropout")
        self.outer = layers.Dense(self.units, name="outer")
        self.outer.build((*input_shape[:-1], self.units))
        self.outer_dropout = layers.Dropout(self.dropout, name="outer_dropout")

    def call(self, x, training=False):
        h = self.inner_dropout(self.inner(x), training=training)
        return self.outer_dropout(self.outer(h), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "dropout": self.dropout}


def custom_layer() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="features")
    h = Encoder(name="enc0")(inp)
    h = Encoder(name="enc1")(h)
    return keras.Model(inp, layers.Dense(3, name="head")(h), name="custom")


def subclassed() -> keras.Model:
    keras.utils.set_random_seed(0)
    net = Net(name="net")
    net(np.zeros((2, 6), dtype="float32"))
    return net


BUILDERS = {"sequential": sequential, "functional": functional, "subclassed": subclassed,
            "attention": attention, "custom_layer": custom_layer}  # fmt: skip


def example_input(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (4, 5, 8) if kind == "attention" else (4, 6)
    return rng.normal(size=shape).astype("float32")
