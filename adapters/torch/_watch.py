"""Run a function on a module right after it is first imported (an import hook), or now if it
already is: how the adapter patches ``from_pretrained`` of transformers and PEFT without
importing either itself, whatever the import order."""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from typing import Any


class WatchImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` right after the module ``fullname`` is executed, then leaves
    ``sys.meta_path``."""

    def __init__(self, fullname: str, patch: Callable[[Any], None]) -> None:
        self.fullname = fullname
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.fullname:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        run = getattr(getattr(spec, "loader", None), "exec_module", None)
        if spec is None or run is None:
            return spec

        def exec_module(module: Any) -> None:
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.patch(module)

        spec.loader.exec_module = exec_module  # this module's own loader instance
        return spec


def when_imported(fullname: str, patch: Callable[[Any], None]) -> None:
    """``patch(module)`` now if ``fullname`` is imported, else right after it is (once).

    Example:
        >>> seen = []
        >>> when_imported("json", lambda m: seen.append(m.__name__))
        >>> seen
        ['json']
    """
    module = sys.modules.get(fullname)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, WatchImport) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, WatchImport(fullname, patch))


def warn_at_first_training_forward(model: Any, key: str, message: str) -> None:
    """Warn ``message`` once, at ``model``'s first training-mode forward, unless
    :func:`disarm` (same ``key``) runs first; arming twice keeps the first."""
    if key in model.__dict__:
        return

    def warn_once(module: Any, args: Any) -> None:
        if not module.training:
            return
        disarm(module, key)
        warnings.warn(f"{type(module).__name__}: {message}", UserWarning, stacklevel=2)

    model.__dict__[key] = model.register_forward_pre_hook(warn_once)


def disarm(model: Any, key: str) -> None:
    """Remove the warning :func:`warn_at_first_training_forward` armed under ``key``."""
    handle = model.__dict__.pop(key, None)
    if handle is not None:
        handle.remove()
