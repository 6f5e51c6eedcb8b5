"""Issue 28: one `gd profile` run per --out: a lock beside it (and its checkpoint)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gd_core import SensitivityProfile  # noqa: E402


def _args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "profile", "--model", str(model), "--corpus", str(corpus), "--samples", "8",
        "--seq-len", "16", "--batch-size", "4", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def _lock(out: Path, pid: int, host: str | None = None) -> Path:
    lock = Path(f"{out}.lock")
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return lock


def test_a_second_run_on_one_out_is_refused_with_the_first_runs_pid(
    gd, tiny_model, corpus_file, tmp_path
):
    out = tmp_path / "p.npz"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(out, other.pid)  # a run in progress holds the lock
        rc, _, err = gd(*_args(tiny_model, corpus_file, out))
    finally:
        other.kill()
        other.wait()
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"process {other.pid}, still running" in err and "fix:" in err
    assert not out.exists() and not Path(f"{out}.partial.npz").exists()  # nothing touched


def test_a_stale_lock_of_a_dead_process_is_taken_over(gd, tiny_model, corpus_file, tmp_path):
    out = tmp_path / "p.npz"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = _lock(out, dead.pid)
    rc, stdout, err = gd(*_args(tiny_model, corpus_file, out))
    assert rc == 0, err
    assert f"took over the lock {lock} of process {dead.pid}, which is not running" in stdout + err
    assert SensitivityProfile.load(out).metadata["samples"] == 8
    assert not lock.exists()  # released when the run ends


def test_a_lock_from_another_host_is_refused_with_the_way_out(
    gd, tiny_model, corpus_file, tmp_path
):
    out = tmp_path / "p.npz"
    _lock(out, os.getpid(), host="elsewhere.invalid")
    rc, _, err = gd(*_args(tiny_model, corpus_file, out))
    assert rc == 2 and "host elsewhere.invalid" in err and "delete" in err


@pytest.mark.slow
def test_torchrun_refused_on_every_rank_without_hanging(
    tiny_model, corpus_file, tmp_path, warm_python
):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "p.npz"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(out, other.pid)
        res = subprocess.run(  # what the torchrun script runs, warm (tests/_warm.py)
            [warm_python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gd_cli",
             *_args(tiny_model, corpus_file, out), "--device", "cpu"],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=240,
        )  # fmt: skip
    finally:
        other.kill()
        other.wait()
    assert res.returncode != 0
    assert res.stderr.count(f"process {other.pid}, still running") == 2, res.stderr[-2000:]
