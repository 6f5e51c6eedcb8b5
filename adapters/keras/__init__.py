"""Guided dropout for Keras 3 (TensorFlow or torch backend).

A thin translator over :mod:`gd_core`, in modules that show its parts:

- :mod:`~adapters.keras.layer` — :class:`GuidedDropout` (``keras.layers.Dropout`` with per-unit
  rates and a schedule) and :class:`GuidedDropoutScheduler`;
- :mod:`~adapters.keras.discovery` — :func:`sites` and :func:`fingerprint` (canonical names,
  torch layout); :mod:`~adapters.keras.statedict` — :func:`load_state_dict` (canonical, e.g.
  torch, weights into a Keras replica);
- :mod:`~adapters.keras.inserted` — sites inserted into a dropout-free model (the embedding
  output and the residual branches, from a traced forward), as :mod:`adapters.torch` does;
- :mod:`~adapters.keras.fisher` — :func:`estimate_fisher`, :func:`profile` (per-sample gradients
  natively; the loop is :mod:`gd_core.fisher_loop`'s);
- :mod:`~adapters.keras.install` — :func:`apply` (the plan is :mod:`gd_core.plan`'s);
- :mod:`~adapters.keras.holders` — replacing the dropout layers a layer holds, and keeping them in
  ``.keras`` files when the layer makes its own (``Guided<Name>``, e.g. keras_hub's transformer
  layers).

Example:
    >>> import numpy as np, keras
    >>> import adapters.keras as gdk
    >>> inp = keras.Input((4,))
    >>> h = keras.layers.Dense(8, name="dense")(inp)
    >>> h = keras.layers.Dropout(0.1, name="dropout")(h)
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    >>> [s.name for s in gdk.sites(model)]
    ['dropout']
    >>> report = gdk.apply(model, {"dropout": 0.05})
    >>> report.model.get_layer("dropout").rate
    0.05

Layer names are the canonical names (Keras allows dots, so ``encoder.layer.0.output.dropout`` mirrors
a torch module tree); weights are ``<layer name>.weight|bias`` (``kernel``, ``gamma``,
``embeddings`` -> ``weight``, ``beta`` -> ``bias``), and everything this binding hands out or takes
(fingerprints, Fisher, unit axes, :func:`load_state_dict`) is in the canonical torch layout: Dense
and convolution kernels are transposed at the boundary (as the ONNX binding does for folded MatMul
weights), so a profile computed with :mod:`adapters.torch` applies to a Keras replica of the same
model with ``strict=True``.

Loading a saved ``.keras`` model that contains ``GuidedDropout`` needs only ``import
adapters.keras`` first (the layer is registered as ``guided_dropout>GuidedDropout``, and every
``Guided<Name>`` layer as ``guided_dropout>GuidedSites``).
"""

from __future__ import annotations

from gd_core.fisher import FisherResult
from gd_core.report import ApplyReport

from .. import _own  # noqa: F401 - raises if `adapters` is AdapterHub's (README)
from .discovery import fingerprint, sites
from .fisher import estimate_fisher, profile
from .install import apply
from .layer import GuidedDropout, GuidedDropoutScheduler, keras  # noqa: F401 - the backend in use
from .statedict import LoadedKeys, load_state_dict

__all__ = [
    "ApplyReport",
    "FisherResult",
    "GuidedDropout",
    "GuidedDropoutScheduler",
    "LoadedKeys",
    "apply",
    "estimate_fisher",
    "fingerprint",
    "load_state_dict",
    "profile",
    "sites",
]
