"""Fixtures of the benchmark-script tests."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_path() -> Any:
    """``bench/`` on ``sys.path`` for the module's tests (its scripts import by bare name)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield BENCH
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def bench_main(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, warm_python: str
) -> Callable[..., tuple[int, str, str]]:
    """``bench_main("glue", *args) -> (exit status, stdout, stderr)``: ``bench/glue.py ARGS`` run
    in this process through the script's ``main(argv)`` (what ``python bench/glue.py ARGS`` runs),
    from the repository root; no interpreter start-up nor second import of torch per call.

    The output is captured at the file descriptors, so worker processes a script starts (glue's
    ``--jobs``, ``spawn_worker``) are in it too; environment variables a script sets (a cache
    folder, a backend) are restored afterwards. Tests whose point is the script's own process
    (a shell recipe, a fresh interpreter) run it as a subprocess instead.

    The worker processes a script starts with ``sys.executable`` are forked warm
    (tests/_warm.py): they still import the library and run the script's worker code themselves.
    """
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "executable", warm_python)
    monkeypatch.syspath_prepend(str(BENCH))

    def run(script: str, *args: str) -> tuple[int, str, str]:
        saved = dict(os.environ)
        capfd.readouterr()
        try:
            try:
                rc = importlib.import_module(script).main([str(a) for a in args])
            except SystemExit as exc:  # argparse: bad arguments
                rc = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out, err = capfd.readouterr()
        return int(rc or 0), out, err

    return run


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
    bench_main: Callable[..., tuple[int, str, str]],
) -> Callable[[list[str]], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``fisher_smoke(methods) -> (run, records of those methods)``: ``bench/fisher.py --smoke
    --pairs 2`` over every cell of FISHER_SMOKE whose modules are installed, run once per test
    run (in the first worker that asks; --smoke runs its cells in-process); ``run`` holds its exit
    status, stderr tail and the methods it was asked for."""

    def produce() -> dict[str, Any]:
        methods = [m for m, mods in FISHER_SMOKE.items() if all(map(_found, mods))]
        out = tmp_path_factory.mktemp("fisher-smoke") / "fisher.jsonl"
        rc, _, err = bench_main(
            "fisher", "--smoke", "--methods", ",".join(methods), "--pairs", "2", "--out", str(out)
        )
        recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        return {"methods": methods, "returncode": rc, "stderr": err[-3000:], "records": recs}

    def get(wanted: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        run = once("fisher-smoke", produce)
        assert run["returncode"] == 0, run["stderr"]
        # every cell asked for recorded exactly once, none other
        assert sorted(r["method"] for r in run["records"]) == sorted(run["methods"])
        assert set(wanted) <= set(run["methods"]), (wanted, run["methods"])
        return run, [r for r in run["records"] if r["method"] in wanted]

    return get
