"""Shared test configuration: paths to the shared data, skipping cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one intra-op thread each, so the workers do not
    # oversubscribe the cores (set before torch or TensorFlow is imported)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set GD_SHARED_DATA to use it)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _private_profile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session (each parallel worker has its own) writes automatic profiles to a cache
    of its own, never to the user's ~/.cache/guided-dropout nor a folder another worker uses;
    a test that needs a particular cache still sets GD_CACHE_DIR itself."""
    if "GD_CACHE_DIR" not in os.environ:
        os.environ["GD_CACHE_DIR"] = str(tmp_path_factory.mktemp("gd-cache"))
