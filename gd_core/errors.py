"""Exceptions raised by guided-dropout, and the one helper that words bad-argument messages.

Every error names the argument, what was expected, what was received and how to fix it, so that a
user reading one line knows what to change.
"""

from __future__ import annotations

from typing import Any


class GuidedDropoutError(Exception):
    """Base class of every error this library raises on purpose."""


class ArgumentError(GuidedDropoutError, ValueError):
    """An argument has the wrong value or type."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has the wrong type (also a ``TypeError``, as the frameworks raise)."""


class NoSitesError(GuidedDropoutError, ValueError):
    """A model (or graph) has no dropout site to work on."""


class NonFiniteGradientError(GuidedDropoutError, FloatingPointError):
    """A per-sample gradient (or loss) contains NaN or Inf."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class ProfileError(GuidedDropoutError, ValueError):
    """A sensitivity profile file is missing, truncated, corrupt or of an unknown format version."""


class ProfileMismatchError(GuidedDropoutError, ValueError):
    """A sensitivity profile was computed on a model with different parameters or sites."""


class ProfileNotFoundError(GuidedDropoutError, FileNotFoundError):
    """No profile was given and none is cached for this model."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def bad_argument(
    name: str, expected: str, received: Any, fix: str, cls: type[Exception] = ArgumentError
) -> Exception:
    """Build (not raise) an error with the library's standard wording.

    Example:
        >>> err = bad_argument("p_upper", "a float in [p_lower, 1)", 1.5, "pass e.g. p_upper=0.1")
        >>> str(err)
        'p_upper: expected a float in [p_lower, 1), received 1.5; fix: pass e.g. p_upper=0.1'
    """
    return cls(f"{name}: expected {expected}, received {_show(received)}; fix: {fix}")


def no_sites(fix: str, arg: str = "model", detail: str = "") -> NoSitesError:
    """The one "no dropout site" error every adapter raises; only the fix is framework-specific.

    Example:
        >>> str(no_sites("add Dropout layers"))
        'model: expected at least one dropout site, received a model with none; fix: add Dropout layers'
    """
    extra = f" ({detail})" if detail else ""
    return NoSitesError(
        f"{arg}: expected at least one dropout site, received a model with none{extra}; fix: {fix}"
    )
