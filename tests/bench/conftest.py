"""Fixtures of the benchmark-script tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# bench/fisher.py --smoke cells the tests check, and the modules each needs: one run (one
# interpreter, one TensorFlow and one ONNX Runtime import) serves test_bench.py's Keras and ORT
# cells and test_gpu_perf.py's public-call cells
FISHER_SMOKE = {
    "keras_gd": ("tensorflow",),
    "keras_train_step": ("tensorflow",),
    "ort_gd": ("onnxruntime.training", "transformers"),
    "ort_loop": ("onnxruntime.training", "transformers"),
    "ort_train_step": ("onnxruntime.training", "transformers"),
    "keras_public": ("tensorflow", "onnxruntime.training"),
    "ort_public": ("tensorflow", "onnxruntime.training"),
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


@pytest.fixture
def fisher_smoke(
    once: Callable[[str, Callable[[], Any]], Any],
    shared_data: Path,  # the smoke runs read the corpus
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[list[str]], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``fisher_smoke(methods) -> (run, records of those methods)``: ``bench/fisher.py --smoke
    --pairs 2`` over every cell of FISHER_SMOKE whose modules are installed, run once per test
    run; ``run`` holds its exit status, stderr tail and the methods it was asked for."""

    def produce() -> dict[str, Any]:
        methods = [m for m, mods in FISHER_SMOKE.items() if all(map(_found, mods))]
        out = tmp_path_factory.mktemp("fisher-smoke") / "fisher.jsonl"
        done = subprocess.run(
            [sys.executable, "bench/fisher.py", "--smoke", "--methods", ",".join(methods)]
            + ["--pairs", "2", "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        return {
            "methods": methods,
            "returncode": done.returncode,
            "stderr": done.stderr[-3000:],
            "records": recs,
        }

    def get(wanted: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        run = once("fisher-smoke", produce)
        assert run["returncode"] == 0, run["stderr"]
        # every cell asked for recorded exactly once, none other
        assert sorted(r["method"] for r in run["records"]) == sorted(run["methods"])
        assert set(wanted) <= set(run["methods"]), (wanted, run["methods"])
        return run, [r for r in run["records"] if r["method"] in wanted]

    return get
