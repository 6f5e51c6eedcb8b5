"""A per-user cache of profiles, keyed by model fingerprint.

``$GD_CACHE_DIR`` overrides the default folder ``~/.cache/guided-dropout``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .fingerprint import Fingerprint
from .profile import SensitivityProfile


def cache_dir() -> Path:
    """The cache folder (not created until something is stored)."""
    env = os.environ.get("GD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "guided-dropout"


def cache_path(fingerprint: Fingerprint) -> Path:
    """Where the profile of a model with this fingerprint is cached."""
    return cache_dir() / f"{fingerprint.digest[:24]}.profile.npz"


def store(profile: SensitivityProfile) -> Path:
    """Cache a profile under its fingerprint (atomically)."""
    if profile.fingerprint is None:
        raise ValueError(
            "profile: expected a profile with a model fingerprint, received one without; "
            "fix: compute it with an adapter's profile() so the model is fingerprinted"
        )
    return profile.save(cache_path(profile.fingerprint))


def lookup(fingerprint: Fingerprint) -> SensitivityProfile | None:
    """The cached profile for this fingerprint, or None."""
    path = cache_path(fingerprint)
    return SensitivityProfile.load(path) if path.exists() else None
