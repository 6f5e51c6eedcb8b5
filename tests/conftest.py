"""Shared test configuration: paths to the shared data, skipping cleanly when it is absent."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `make test` runs one worker per core: one intra-op thread each, so the workers do not
# oversubscribe the cores (set before torch or TensorFlow is imported; in xdist's controller too,
# whose environment the workers and their warm interpreter start with)
WORKER_THREADS = {
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _key, _value in WORKER_THREADS.items():
        os.environ.setdefault(_key, _value)

# the environment the session started with (tests change theirs): the warm interpreter's
_ENV_AT_START = dict(os.environ)

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


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's base folder, shared by every xdist worker (the parent of each worker's
    own base folder)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[], Any]], Any]:
    """``once(name, produce)``: ``produce()`` (JSON-able result) runs once per test run, in
    whichever worker asks first; every other test, in any worker, reads the stored result.

    For expensive subprocesses several tests check (a benchmark run, a nested pytest): each test
    keeps its own assertions, the interpreter starts once. Under xdist the workers share the
    run's base folder (the parent of each worker's own); a lock makes the others wait for the
    first. When ``produce`` raises, nothing is stored and the next test tries again.
    """
    root = run_root(tmp_path_factory)
    import fcntl

    def get(name: str, produce: Callable[[], Any]) -> Any:
        result = root / f"once-{name}.json"
        with open(root / f"once-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if result.exists():
                return json.loads(result.read_text(encoding="utf-8"))
            value = produce()
            tmp = result.with_suffix(".tmp")
            tmp.write_text(json.dumps(value), encoding="utf-8")
            os.replace(tmp, result)
            return value

    return get


# Keras fixes its backend at import, so the backend-dependent Keras tests run again under the
# other backend in a nested pytest. The two callers (tests/keras/test_other_backend.py, and
# tests/conformance/test_conformance.py for the Keras harness on torch) share ONE nested run per
# backend: one interpreter start, one import of torch and Keras, one collection.
OTHER_BACKEND_FILES = {
    "keras": [f"tests/keras/{f}" for f in ("test_layer.py", "test_apply.py", "test_fisher.py")]
    + ["tests/keras/test_layout.py"],
    "conformance": ["tests/conformance/test_conformance.py"],  # the Keras harness only
}


@pytest.fixture
def keras_backend_run(
    once: Callable[[str, Callable[[], Any]], Any], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], list[list[str]]]:
    """``keras_backend_run(backend, group) -> [[test id, outcome], ...]`` for one group of
    OTHER_BACKEND_FILES, from the nested pytest under ``KERAS_BACKEND=backend`` (the conformance
    group runs only under torch); fails with the run's output tail when the run itself broke."""
    import subprocess
    import xml.etree.ElementTree as ET

    def produce(backend: str) -> dict[str, Any]:
        groups = ["keras"] + (["conformance"] if backend == "torch" else [])
        xml = tmp_path_factory.mktemp(f"keras-{backend}") / "junit.xml"
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "GD_KERAS_OTHER_BACKEND_RUN": "1",  # test_other_backend.py: no nested run in there
            "GD_CONFORMANCE_ONLY": "keras",  # harness.py: the Keras harness only
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        env.pop("GD_TEST_DURATIONS_OUT", None)  # the nested run's tests are not this run's
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["-m", "not single_backend", "-k", "not keras_torch_backend"]
        cmd += ["-W", "ignore::DeprecationWarning", f"--junitxml={xml}"]
        cmd += [f for g in groups for f in OTHER_BACKEND_FILES[g]]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        cases = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
                kinds = {child.tag for child in case}
                outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
                cases.append([test_id, outcome])
        return {
            "returncode": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-4000:],
            "cases": cases,
        }

    def get(backend: str, group: str) -> list[list[str]]:
        run = once(f"keras-{backend}-run", lambda: produce(backend))
        prefix = "tests." + OTHER_BACKEND_FILES[group][0].split("/")[1] + "."
        mine = [c for c in run["cases"] if c[0].startswith(prefix) or f"::{prefix}" in c[0]]
        bad = [c for c in mine if c[1] in ("failure", "error")]
        assert not bad, f"{backend} backend run failed: {bad}\n{run['tail']}"
        assert any(c[1] == "passed" for c in mine), f"no {group} test passed:\n{run['tail']}"
        # exit 1 is a failure in the other group (its own test reports it); anything else
        # (interrupted, internal or usage error) is a broken run
        assert run["returncode"] in (0, 1), run["tail"]
        return mine

    return get


MINILM_SAMPLES = 48  # the shared MiniLM automatic profile's sample count (minilm_auto_profile)


@pytest.fixture
def minilm_auto_profile(
    once: Callable[[str, Callable[[], Any]], Any], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Path], dict[str, Any]]:
    """``minilm_auto_profile(cache_dir) -> facts``: the bundled MiniLM's automatic profile
    (``adapters.torch.apply(AutoModel)`` with the default settings but MINILM_SAMPLES, the
    expensive part of the README's first block) computed ONCE per test run, in whichever worker
    asks first, into a cache folder of the run's own; each caller gets a copy of that cache in
    ``cache_dir`` and the facts of the one cold computation (its notes, row sources, site
    count). The README test runs its block on the copy (a task model on the same checkpoint
    finds the encoder's profile); tests/torch/test_auto_profile.py checks the computation's
    facts."""
    import shutil

    shared = run_root(tmp_path_factory) / "minilm-auto-profile-cache"

    def produce() -> dict[str, Any]:
        transformers = pytest.importorskip("transformers")
        import adapters.torch as gdt
        from gd_cli.models import minilm_path

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GD_CACHE_DIR", str(shared))
            model = transformers.AutoModel.from_pretrained(minilm_path())
            # every default but the sample count: the Fisher loop is the same at 48 samples as
            # at DEFAULT_SAMPLES (192), a quarter of the cost; the default corpus's size is
            # checked by tests/cli/test_corpus.py, the default count by test_auto_profile.py
            report = gdt.apply(model, auto_profile={"progress": False, "samples": MINILM_SAMPLES})
        return {
            "notes": list(report.notes),
            "sources": sorted({r.source for r in report}),
            "rows": len(report.rows),
            "sites": len(gdt.sites(model)),
            "cached": sorted(p.name for p in shared.glob("*.profile.npz")),
        }

    def get(cache_dir: Path) -> dict[str, Any]:
        facts = once("minilm-auto-profile", produce)
        assert facts["cached"], f"the automatic profile was not cached in {shared}"
        shutil.copytree(shared, cache_dir, dirs_exist_ok=True)

        return facts

    return get


def _warm_module() -> Any:
    """tests/_warm.py (a script the server runs, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_warm", REPO / "tests" / "_warm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warm_server(root: Path, wait: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the run's warm interpreter server (tests/_warm.py) unless xdist's controller or a
    worker already did, with ``env`` (default: this session's starting environment); with
    ``wait``, wait until it listens. Returns ``{"pid", "sock", "client"}`` (the client's path,
    written by the caller)."""
    import fcntl
    import socket
    import subprocess
    import tempfile

    folder = root / "warm"
    folder.mkdir(exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "started.json").exists():
            sock = str(folder / "s.sock")
            if len(sock) > 100:  # AF_UNIX paths are short
                sock = tempfile.mkdtemp(prefix="gd-warm-") + "/s.sock"
            # the run's controller (xdist's parent process, or this pytest): the server ends
            # with it
            watch = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
            env = {k: v for k, v in (env or _ENV_AT_START).items() if not k.startswith("PYTEST_")}
            with open(folder / "server.log", "w") as log:
                server = subprocess.Popen(
                    [sys.executable, str(REPO / "tests" / "_warm.py"), "serve", sock, str(watch)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd=REPO,
                )
            started = {"pid": server.pid, "sock": sock, "client": str(folder / "python")}
            (folder / "started.json").write_text(json.dumps(started), encoding="utf-8")
        started = json.loads((folder / "started.json").read_text(encoding="utf-8"))
    if not wait:
        return started
    deadline = time.monotonic() + 300
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(started["sock"])  # it listens once its imports are done
            break
        except OSError:
            alive = os.path.exists(f"/proc/{started['pid']}")
            if not alive or time.monotonic() > deadline:
                tail = (folder / "server.log").read_text(encoding="utf-8")[-3000:]
                pytest.fail(f"the warm interpreter did not start:\n{tail}")
            time.sleep(0.2)
    return started


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        for key, value in WORKER_THREADS.items():  # xdist's controller: for its workers
            os.environ.setdefault(key, value)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: list[Any]) -> None:
    """xdist's controller, before it starts the workers: the workers themselves are forks of
    the warm interpreter (tests/_warm.py), so each collects the tests without importing torch,
    transformers and TensorFlow again (about 12 of its 18 CPU s); ``sys.executable`` stays the
    real interpreter there (cold subprocesses stay cold). ``GD_TEST_COLD_WORKERS=1``: cold
    workers (to compare)."""
    if os.environ.get("GD_TEST_COLD") or os.environ.get("GD_TEST_COLD_WORKERS"):
        return

    root = run_root(config._tmp_path_factory)  # type: ignore[attr-defined]
    try:
        started = _warm_server(root, wait=True, env=dict(os.environ))
    except pytest.fail.Exception as exc:  # the tests still run, in cold workers: say so
        sys.stderr.write(f"the workers start cold: {exc}\n")
        return
    worker = _warm_module().write_client(
        str(root / "warm" / "python-worker"), started["sock"], sys.executable, as_real=True
    )
    for spec in specs:
        if spec.popen and not spec.python:
            spec.python = worker


def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    _long_tests_first(items)
    # a run with tests that use the warm interpreter starts it now, in the background: its
    # imports run while the first tests do
    if not os.environ.get("GD_TEST_COLD") and any(
        "warm_python" in getattr(item, "fixturenames", ()) for item in items
    ):
        _warm_server(run_root(session.config._tmp_path_factory), wait=False)  # type: ignore[attr-defined]


def _long_tests_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` (in place) so that each xdist worker's share starts with its part of
    the long tests of tests/durations.json, longest first (tests/durations.py says why and how
    to refresh the list). xdist's worksteal gives worker k the k-th contiguous chunk of the
    collection (``len(left) // workers left``) and steals from the end of a queue. Every worker
    computes the same order from the same collection. Only the time depends on it."""
    listed = REPO / "tests" / "durations.json"
    known = json.loads(listed.read_text(encoding="utf-8")) if listed.exists() else {}
    long = sorted((i for i in items if i.nodeid in known), key=lambda i: -known[i.nodeid])
    if not long:
        return
    taken = {id(i) for i in long}
    short = [i for i in items if id(i) not in taken]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    order: list[pytest.Item] = []
    left = len(items)
    for k in range(workers):
        mine = long[k::workers]
        size = left // (workers - k)
        fill = max(0, size - len(mine))
        order += mine + short[:fill]
        short = short[fill:]
        left -= len(mine) + fill
    items[:] = order + short


def pytest_collection_finish(session: pytest.Session) -> None:
    # what the imports and the collection made lives for the whole session: out of the
    # collector's sight, so the session's many full collections do not walk it again and again
    # (the frameworks' modules are most of a test process's objects)
    import gc

    gc.collect()
    gc.freeze()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # GD_TEST_DURATIONS_OUT=FILE: each phase's duration, for tests/durations.py
    out = os.environ.get("GD_TEST_DURATIONS_OUT")
    # once per phase: in the worker that ran it (xdist's controller gets each report again)
    if out and getattr(report, "node", None) is None:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps([report.nodeid, report.when, round(report.duration, 3)]) + "\n")


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of a ``python`` that runs each command in a fork of ONE interpreter per test run
    that has already imported torch, transformers and TensorFlow (tests/_warm.py: never this
    repository's modules; a command whose import-time environment differs, or whose options it
    does not handle, runs cold). For subprocesses whose point is a process of their own (a saved
    model loading elsewhere, a shell recipe, torchrun, benchmark workers), not a cold import:
    tests of what a bare interpreter imports keep ``sys.executable``. ``GD_TEST_COLD=1`` makes
    it ``sys.executable`` (to compare)."""

    if os.environ.get("GD_TEST_COLD"):
        return sys.executable
    started = _warm_server(run_root(tmp_path_factory), wait=True)
    return _warm_module().write_client(started["client"], started["sock"], sys.executable)
