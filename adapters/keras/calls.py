"""Which dropout layers a model's forward calls: one training forward on a guessed input.

A layer can hold a ``Dropout`` it never calls (keras_hub's ``GemmaDecoderBlock`` builds
``feedforward_dropout`` and never uses it; with ``dropout=0`` its attention's ``dropout_layer``
is skipped by an ``if``). Such a layer is a *dead site*: nothing it would guard is perturbed by
it, so it is reported, not profiled, and not replaced by ``apply``.

The input is guessed from a functional model's input specs (``None`` dimensions: batch 2,
others 4; integer inputs are ones, a valid token id and a full padding mask; float inputs
small normal values), so subclassed models, whose inputs are unknown, are not checked (every
site counts as called). The model's non-trainable state (normalisation statistics, seed
generators) is restored after the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .layer import keras


def guessed_input(model: Any) -> Any | None:
    """A tiny input for a functional model, built from its input specs (None: not one)."""
    if not (isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth")):
        return None
    rng = np.random.default_rng(0)

    def make(spec: Any) -> Any:
        shape = tuple(
            (2 if i == 0 else 4) if d is None else int(d) for i, d in enumerate(spec.shape)
        )
        dtype = str(spec.dtype)
        if "int" in dtype or "bool" in dtype:
            return np.ones(shape, dtype)
        return (0.1 * rng.standard_normal(shape)).astype(dtype)

    try:
        return keras.tree.map_structure(make, model.input)
    except Exception:  # noqa: BLE001 - unusual input structures: not guessed
        return None


def called_layers(model: Any, layers: Sequence[Any]) -> set[int] | None:
    """Ids of ``layers`` that one training forward of ``model`` on a guessed input calls
    (``None``: no input could be guessed, or the forward failed on it)."""
    x = guessed_input(model)
    if x is None or not layers:
        return None
    called: set[int] = set()
    patched = []
    state = [(v, keras.ops.convert_to_numpy(v.value)) for v in model.non_trainable_variables]
    for layer in layers:
        if "call" in vars(layer):
            continue  # already wrapped (a layer listed twice)
        original = layer.call

        def counting(*args: Any, _call: Any = original, _id: int = id(layer), **kw: Any) -> Any:
            called.add(_id)
            return _call(*args, **kw)

        object.__setattr__(layer, "call", counting)
        patched.append(layer)
    try:
        model(x, training=True)
    except Exception:  # noqa: BLE001 - the guess does not fit this model: nothing is known
        return None
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
        for var, value in state:
            var.assign(value)
    return called
