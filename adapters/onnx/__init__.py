"""Guided dropout for ONNX models trained with ONNX Runtime Training (onnxruntime-training 1.19).

A thin translator over :mod:`gd_core`, in modules that show its parts:

- :mod:`~adapters.onnx.graph` — reading graphs (indexes, canonical parameter names in torch
  layout, Dropout sites); :mod:`~adapters.onnx.rewrite` — editing them (per-unit dropout,
  repairs, seeds); :mod:`~adapters.onnx.scopes` — module scopes of torch's default (dynamo)
  exporter, read from node metadata; :mod:`~adapters.onnx.insert` — sites for graphs without
  dropout;
- :mod:`~adapters.onnx.discovery` — :func:`sites` (each ``Dropout`` node, named like the PyTorch
  module it came from, so a profile computed in torch applies to the export), :func:`fingerprint`,
  :func:`parameters`, :func:`site_nodes`, :func:`prepare_for_training`;
- :mod:`~adapters.onnx.install` — :func:`apply` (a profile's sites placed on the graph sites
  guarding the same parameters, :mod:`gd_core.identity`; each site its own ratio ``<site>.ratio``, an
  initializer or with ``ratios_as_inputs=True`` a graph input; per-unit rates with
  ``granularity="unit"``; the plan is :mod:`gd_core.plan`'s) and :func:`ratio_feeds`;
- :mod:`~adapters.onnx.train` — :func:`make_artifacts` for ``onnxruntime.training.api``;
- :mod:`~adapters.onnx.fisher` — :func:`estimate_fisher`, :func:`profile` from per-sample
  gradients through ORT Training with dropout switched off (the loop is
  :mod:`gd_core.fisher_loop`'s): :mod:`~adapters.onnx.taps` picks the tensors of the training
  graph that give per-sample gradients in closed form, :mod:`~adapters.onnx.persample` forms
  them from one train step per batch (the exact batch-of-one loop as per-parameter fallback).

``onnxruntime.training`` is imported only by the training functions (its package imports torch
when torch is installed); importing this package imports neither torch nor tensorflow. See
``docs/onnx.md``.

Example:
    >>> import adapters.onnx as gdo
    >>> from adapters.onnx.graph import example_model
    >>> [s.name for s in gdo.sites(example_model())]
    ['dropout', 'head_drop']
    >>> report = gdo.apply(example_model(), {"dropout": 0.05})
    >>> report.probabilities(), type(report.model).__name__
    ({'dropout': 0.05, 'head_drop': 0.1}, 'ModelProto')
"""

from __future__ import annotations

from gd_core.fisher import FisherResult
from gd_core.report import ApplyReport

from .. import _own  # noqa: F401 - raises if `adapters` is AdapterHub's (README)
from .discovery import (
    check_ort_compatible,
    fingerprint,
    parameters,
    prepare_for_training,
    site_nodes,
    sites,
)
from .fisher import estimate_fisher, profile
from .graph import MAX_IR_VERSION, Param
from .install import OnnxApplyReport, apply, module_inputs, ratio_feeds
from .train import Artifacts, make_artifacts

__all__ = [
    "MAX_IR_VERSION",
    "ApplyReport",
    "Artifacts",
    "FisherResult",
    "OnnxApplyReport",
    "Param",
    "apply",
    "check_ort_compatible",
    "estimate_fisher",
    "fingerprint",
    "make_artifacts",
    "module_inputs",
    "parameters",
    "prepare_for_training",
    "profile",
    "ratio_feeds",
    "site_nodes",
    "sites",
]
