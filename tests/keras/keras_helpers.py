"""Helpers shared by the Keras adapter tests (a uniquely named module, imported by the tests)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

BACKEND = keras.backend.backend()
LEAF = {"kernel": "weight", "gamma": "weight", "beta": "bias", "embeddings": "weight"}


#: build_mlp()'s weights in torch layout (a Linear weight is (out, in)), canonical names
MLP_TORCH_SHAPES = {
    "enc0_dense.weight": (8, 6),
    "enc0_dense.bias": (8,),
    "enc1_dense.weight": (8, 8),
    "enc1_dense.bias": (8,),
    "enc1_norm.weight": (8,),
    "enc1_norm.bias": (8,),
    "classifier.weight": (3, 8),
    "classifier.bias": (3,),
}


def build_mlp(n_in: int = 6, hidden: int = 8, n_out: int = 3, seed: int = 0) -> keras.Model:
    """A small functional MLP with two dropout sites, a LayerNormalization and a head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((n_in,), name="features")
    h = keras.layers.Dense(hidden, activation="tanh", name="enc0_dense")(inp)
    h = keras.layers.Dropout(0.1, name="enc0_dropout")(h)
    h = keras.layers.Dense(hidden, activation="tanh", name="enc1_dense")(h)
    h = keras.layers.LayerNormalization(name="enc1_norm")(h)
    h = keras.layers.Dropout(0.1, name="enc1_dropout")(h)
    out = keras.layers.Dense(n_out, name="classifier")(h)
    return keras.Model(inp, out, name="mlp")


def batches(x: np.ndarray, y: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def sce() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def canonical(var_owner: keras.layers.Layer, var: object) -> str:
    leaf = str(var.name).split("/")[-1]  # type: ignore[attr-defined]
    return f"{var_owner.name}.{LEAF.get(leaf, leaf)}"


def reference_fisher(model: keras.Model, samples: list[tuple[np.ndarray, np.ndarray]], loss_fn):
    """The slow reference: one gradient per sample, squared, averaged (float64), in the
    canonical torch layout (Dense kernels transposed here, independently of the binding)."""
    owners = [(layer, v) for layer in model.layers for v in layer.trainable_weights]
    sums = {canonical(layer, v): np.zeros(tuple(v.shape)) for layer, v in owners}
    for x, y in samples:
        xb, yb = keras.ops.convert_to_tensor(x[None]), keras.ops.convert_to_tensor(y[None])
        if BACKEND == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                value = keras.ops.sum(loss_fn(model, (xb, yb)))
            grads = tape.gradient(value, [v for _, v in owners])
        else:
            import torch

            value = keras.ops.sum(loss_fn(model, (xb, yb)))
            grads = torch.autograd.grad(value, [v.value for _, v in owners])
        for (layer, v), g in zip(owners, grads, strict=True):
            arr = g.numpy() if BACKEND == "tensorflow" else g.detach().cpu().numpy()
            sums[canonical(layer, v)] += np.asarray(arr, np.float64) ** 2
    # the binding reports torch layout: a Dense kernel (in, out) is the Linear weight (out, in)
    kernels = {
        canonical(layer, v)
        for layer, v in owners
        if isinstance(layer, keras.layers.Dense) and str(v.name).endswith("kernel")
    }
    return {k: (s.T if k in kernels else s) / len(samples) for k, s in sums.items()}
