"""Shared fixtures of the Keras adapter tests.

The Keras backend is fixed per process (``KERAS_BACKEND``, default from ``~/.keras/keras.json``);
``test_other_backend.py`` reruns the backend-dependent tests under the other backend in a
subprocess. Layer names avoid dots except in tests marked ``single_backend`` because the torch
backend of Keras rejects dots in variable paths.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for keras_helpers (importlib mode)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from keras_helpers import BACKEND, build_mlp  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "single_backend: backend-independent logic, run under one backend only"
    )


@pytest.fixture(scope="session")
def backend() -> str:
    return BACKEND


@pytest.fixture
def mlp() -> keras.Model:
    return build_mlp()


@pytest.fixture(scope="session")
def toy() -> tuple[np.ndarray, np.ndarray]:
    """A separable 3-class problem: the class is the argmax of three fixed projections."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    w = rng.normal(size=(6, 3)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y
