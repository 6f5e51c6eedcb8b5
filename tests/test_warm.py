"""The warm interpreter the tests' subprocesses run in (tests/_warm.py) behaves as a fresh
``python`` for what those tests rely on: status, output, signals, environment, sys.path, no module
of this repository, ``sys.executable`` and multiprocessing's spawn, cold fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("GD_TEST_COLD")), reason="GD_TEST_COLD=1: no warm interpreter"
)


def _run(warm_python: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([warm_python, *args], capture_output=True, text=True, timeout=120, **kw)


def test_status_output_argv_and_a_clean_module_table(warm_python, tmp_path):
    code = (
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv, 'exe': sys.executable, 'cwd': os.getcwd(),"
        " 'path0': sys.path[0], 'own': sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('gd_core', 'adapters', 'gd_cli', 'bench', 'tests', '_warm')),"
        " 'torch': 'torch' in sys.modules, 'pid': os.getpid(), 'v': os.environ.get('GD_X')}))\n"
        "sys.stderr.write('to stderr')\n"
        "sys.exit(3)"
    )
    done = _run(warm_python, "-c", code, "a", "b", cwd=tmp_path, env={**os.environ, "GD_X": "1"})
    assert done.returncode == 3 and done.stderr == "to stderr", done.stderr
    got = json.loads(done.stdout)
    assert got["argv"] == ["-c", "a", "b"] and got["path0"] == ""
    assert got["exe"] == warm_python and got["cwd"] == str(tmp_path) and got["v"] == "1"
    assert got["own"] == [] and got["torch"]  # warm: torch is there, nothing of this repository
    assert got["pid"] != os.getpid()


def test_scripts_modules_and_uncaught_exceptions(warm_python, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(sys.argv, sys.path[0], __name__)\n")
    done = _run(warm_python, str(script), "x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[{str(script)!r}, 'x'] {tmp_path} __main__"
    done = _run(warm_python, "-m", "json.tool", "--compact", input='{"a": [1, 2]}')
    assert done.returncode == 0 and done.stdout.strip() == '{"a":[1,2]}', done.stderr
    done = _run(warm_python, "-c", "raise ValueError('boom')")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "ValueError: boom"
    assert "_warm.py" not in done.stderr  # the traceback starts at the command, as Python's does


def test_a_signal_reaches_the_command_and_a_killed_client_kills_it(warm_python, tmp_path):
    mark = tmp_path / "alive"
    code = f"import time, pathlib\npathlib.Path({str(mark)!r}).write_text('x')\ntime.sleep(60)"
    proc = subprocess.Popen([warm_python, "-c", code])
    _wait_for(mark)
    proc.terminate()
    assert proc.wait(timeout=30) == -signal.SIGTERM
    mark.unlink()
    pidfile = tmp_path / "pid"
    code = (
        f"import os, time, pathlib\npathlib.Path({str(pidfile)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)"
    )
    client = subprocess.Popen([warm_python, "-c", code])
    pid = int(_wait_for(pidfile))
    client.kill()  # what subprocess.run does to it on a timeout
    client.wait(timeout=30)
    end = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _alive(pid), "the command outlived its killed client"


def test_processes_it_starts_are_warm_too(warm_python, tmp_path):
    script = tmp_path / "spawner.py"
    script.write_text(
        "import multiprocessing as mp, subprocess, sys\n"
        "def exe(_):\n    return sys.executable\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(1) as pool:\n"
        "        print(pool.map(exe, [0])[0])\n"
        "    print(subprocess.run([sys.executable, '-c', 'import sys; print(sys.executable)'],"
        " capture_output=True, text=True).stdout.strip())\n"
    )
    done = _run(warm_python, str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [warm_python, warm_python]


def test_a_different_import_time_environment_runs_cold(warm_python):
    code = "import sys; print('torch' in sys.modules, sys.executable)"
    warm = _run(warm_python, "-c", code)
    cold = _run(warm_python, "-c", code, env={**os.environ, "HF_HUB_CACHE": "/nonexistent"})
    assert warm.stdout.split() == ["True", warm_python], warm.stderr
    assert cold.stdout.split() == ["False", sys.executable], cold.stderr  # a real interpreter
    assert _run(warm_python, "-I", "-c", code).stdout.split()[0] == "False"  # an option not served


def _wait_for(path: Path) -> str:
    end = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())
