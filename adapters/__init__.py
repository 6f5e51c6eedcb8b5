"""Framework adapters for guided dropout: thin translators over :mod:`gd_core`.

Each adapter is imported on its own and imports only its framework::

    import adapters.torch   # needs the `torch` extra
    import adapters.keras   # needs the `keras` extra
    import adapters.onnx    # needs the `onnx` extra
"""

from ._lazy import require

__all__ = ["require"]
