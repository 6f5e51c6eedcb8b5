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

The same forward tells which sites drop attention probabilities: a site whose input is a
distribution along its last axis (non-negative rows summing to one, a softmax output) acts on
key positions, not features, whatever the layers are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gd_core.errors import bad_argument

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


def _is_distribution(x: Any) -> bool:
    """Whether ``x`` is a probability distribution along its last axis (a softmax output):
    non-negative, each row summing to one."""
    try:
        arr = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)
    except Exception:  # noqa: BLE001 - not a tensor
        return False
    if arr.ndim < 2 or arr.shape[-1] < 2 or arr.size == 0:
        return False
    return bool(np.all(arr >= 0) and np.allclose(arr.sum(axis=-1), 1.0, atol=1e-4))


def called_layers(
    model: Any,
    layers: Sequence[Any],
    distributions: set[int] | None = None,
    order: tuple[Sequence[Any], list[Any]] | None = None,
    every: list[Any] | None = None,
    example: Any = None,
) -> set[int] | None:
    """Ids of ``layers`` that one training forward of ``model`` on a guessed input calls
    (``None``: no input could be guessed, or the forward failed on it). Ids of those whose
    input is a distribution along its last axis (attention probabilities: the dropout acts on
    a softmax output, whose last axis is key positions, not features) are added to
    ``distributions``. With ``order=(watched, out)``, the layers of ``watched`` are appended
    to ``out`` in the order the forward first calls them (call order, which inside a custom
    layer can differ from the order its sublayers were made in); with ``every``, each call of
    those and of ``layers`` is appended to it, repeats included (a layer called more than once,
    such as one dropout layer a block calls after attention and after its feed-forward, is in
    it once per call). ``example``: the input to use (a model whose guessed input does not
    fit, or a subclassed model, whose input is not known); a forward that fails on a given
    example raises ArgumentError naming ``example_input`` and the cause."""
    x = guessed_input(model) if example is None else example
    if x is None or not layers:
        return None
    called: set[int] = set()
    probs = set() if distributions is None else distributions
    patched = []
    state = [(v, keras.ops.convert_to_numpy(v.value)) for v in model.non_trainable_variables]
    wanted = {id(x) for x in layers}
    watched = list(order[0]) if order is not None else []
    seen: set[int] = set()
    for layer in [*layers, *watched]:
        if "call" in vars(layer):
            continue  # already wrapped (a layer listed twice)
        original = layer.call

        def counting(*args: Any, _call: Any = original, _layer: Any = layer, **kw: Any) -> Any:
            _id = id(_layer)
            if every is not None:
                every.append(_layer)
            if order is not None and _id not in seen:
                seen.add(_id)
                order[1].append(_layer)
            if _id in wanted:
                if _id not in called and args and _is_distribution(args[0]):
                    probs.add(_id)
                called.add(_id)
            return _call(*args, **kw)

        object.__setattr__(layer, "call", counting)
        patched.append(layer)
    try:
        model(x, training=True)
    except Exception as exc:  # noqa: BLE001 - the guess does not fit this model: nothing known
        if every is not None:
            every.clear()
        if example is not None:
            raise bad_argument(
                "example_input",
                f"an input {type(model).__name__} {model.name!r} can be called with",
                f"one whose training forward fails ({type(exc).__name__}: {exc!s:.200})",
                "pass one small batch in the form model(x) takes (a dict of arrays for a "
                "keras_hub backbone), or leave example_input out to use a guessed input",
            ) from exc
        return None
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
        for var, value in state:
            var.assign(value)
    return called
