"""Run the backend-dependent Keras tests again under the other backend, in a subprocess.

Keras fixes its backend when it is first imported, so the TensorFlow run (the default) starts a
second pytest with ``KERAS_BACKEND=torch`` (and a torch run starts one with TensorFlow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from keras_helpers import BACKEND

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
NESTED = "GD_KERAS_OTHER_BACKEND_RUN"
OTHER = {"tensorflow": "torch", "torch": "tensorflow"}.get(BACKEND)


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"KERAS_BACKEND": backend, NESTED: "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.skipif(NESTED in os.environ, reason="already the other-backend run")
@pytest.mark.skipif(OTHER is None, reason=f"no other backend to compare with {BACKEND}")
def test_backend_dependent_tests_pass_under_the_other_backend(keras_backend_run):
    """test_layer, test_apply, test_fisher and test_layout (tests/conftest.py's
    OTHER_BACKEND_FILES) pass under the other backend, in one nested pytest shared with the
    conformance suite's Keras harness."""
    pytest.importorskip("torch" if OTHER == "torch" else "tensorflow")
    keras_backend_run(OTHER, "keras")


@pytest.mark.skipif(NESTED in os.environ, reason="checked once, by the main run")
def test_importing_the_keras_adapter_imports_no_torch_under_tensorflow():
    pytest.importorskip("tensorflow")
    code = (
        "import sys, adapters.keras as k; "
        "assert k.keras.backend.backend() == 'tensorflow'; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env("tensorflow"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
