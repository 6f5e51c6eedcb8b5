"""Import a framework on demand with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {
    "torch": "torch",
    "transformers": "torch",
    "keras": "keras",
    "tensorflow": "keras",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxruntime.training": "onnx",
    "matplotlib": "dev",
    "tqdm": "dev",
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
        what = feature or f"adapters.{extra}"
        raise ImportError(
            f"{what} needs the Python package {module!r}, which is not installed ({exc}); "
            f"fix: pip install 'guided-dropout[{extra}]'"
        ) from exc
