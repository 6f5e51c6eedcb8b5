"""The canonical (torch) layout of Keras weights: which axes take a Keras kernel to the layout
of the torch module it mirrors (:class:`adapters.keras.discovery.ModelIndex` uses it)."""

from __future__ import annotations

from typing import Any

#: Keras layers whose ``kernel`` is stored in another layout than the torch module it mirrors
_DENSE = frozenset({"Dense"})
_CONV = frozenset(f"Conv{d}D{t}" for d in (1, 2, 3) for t in ("", "Transpose"))


def _canonical_axes(layer: Any, leaf: str, ndim: int) -> tuple[int, ...] | None:
    """Axes taking a Keras weight to torch layout, or None where the layouts agree.

    A ``Dense`` kernel ``(in, out)`` is a torch ``Linear`` weight ``(out, in)``; a ``ConvND``
    kernel ``(*k, in, out)`` is a torch ``ConvNd`` weight ``(out, in, *k)`` (``ConvNDTranspose``:
    ``(*k, out, in)`` -> ``(in, out, *k)``). Embedding, normalization and bias weights already
    agree; other kernels (``EinsumDense``, custom layers) have no torch counterpart and keep their
    Keras layout. Subclasses of these layers count as them.
    """
    if leaf != "kernel" or ndim < 2:
        return None
    kinds = {c.__name__ for c in type(layer).__mro__ if c.__module__.startswith("keras")}
    if kinds & _DENSE and ndim == 2:
        return (1, 0)
    if kinds & _CONV and ndim >= 3:
        return (ndim - 1, ndim - 2, *range(ndim - 2))
    return None
