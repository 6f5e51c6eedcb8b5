"""A per-user cache of profiles, keyed by model fingerprint and, where the profile records one,
the digest of the weights it was computed on (:mod:`gd_core.weights`), so two checkpoints of
one architecture have two entries.

``$GD_CACHE_DIR`` overrides the default folder ``~/.cache/guided-dropout``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .align import align
from .fingerprint import Fingerprint
from .profile import SensitivityProfile
from .weights import WeightsId


def cache_dir() -> Path:
    """The cache folder (not created until something is stored)."""
    env = os.environ.get("GD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "guided-dropout"


def cache_path(fingerprint: Fingerprint, weights_digest: str | None = None) -> Path:
    """Where the profile of a model with this fingerprint (and these weights) is cached."""
    key = fingerprint.digest
    if weights_digest:
        key = hashlib.sha256(f"{key}:{weights_digest}".encode()).hexdigest()
    return cache_dir() / f"{key[:24]}.profile.npz"


def store(profile: SensitivityProfile) -> Path:
    """Cache a profile under its fingerprint and recorded weights digest (atomically)."""
    if profile.fingerprint is None:
        raise ValueError(
            "profile: expected a profile with a model fingerprint, received one without; "
            "fix: compute it with an adapter's profile() so the model is fingerprinted"
        )
    weights = WeightsId.of_metadata(profile.metadata)
    return profile.save(cache_path(profile.fingerprint, weights.digest if weights else None))


def lookup(
    fingerprint: Fingerprint, weights_digest: str | None = None
) -> SensitivityProfile | None:
    """The cached profile for this fingerprint (and weights digest), or None."""
    path = cache_path(fingerprint, weights_digest)
    return SensitivityProfile.load(path) if path.exists() else None


def find_cached(
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint,
    loader: Callable[[Fingerprint], SensitivityProfile | None] | None = None,
) -> SensitivityProfile | None:
    """A cached profile compatible with the model (exact fingerprint first, then any that aligns)."""
    exact = (loader or lookup)(model_fingerprint)
    if exact is not None:
        return exact
    folder = cache_dir()
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.profile.npz")):
        try:
            prof = SensitivityProfile.load(path)
            return align(prof, model_sites, model_fingerprint, strict=True)
        except Exception:  # noqa: BLE001 - an incompatible or unreadable cache entry is skipped
            continue
    return None
