"""Framework adapters for guided dropout: thin translators over :mod:`gd_core`.

Each adapter is imported on its own and imports only its framework::

    import adapters.torch   # needs the `torch` extra
    import adapters.keras   # needs the `keras` extra
    import adapters.onnx    # needs the `onnx` extra

The import name ``adapters`` is also AdapterHub's (PyPI ``adapters``): each adapter checks at
import that ``adapters`` is this package, and importing it warns when AdapterHub's is installed
beside it (README: Installing).
"""

import warnings

from ._lazy import foreign_distribution, require

GUIDED_DROPOUT = True  # marks this package as guided-dropout's (see _lazy.check_own_package)

__all__ = ["require"]

_foreign = foreign_distribution()
if _foreign is not None:
    warnings.warn(_foreign, RuntimeWarning, stacklevel=2)
