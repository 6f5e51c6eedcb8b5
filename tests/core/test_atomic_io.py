"""Issue 14.6: a kill during an atomic save leaves a hidden temp file; the next write of the same
target removes it (and nothing else)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gd_core import SensitivityProfile, Site

ROOT = Path(__file__).resolve().parents[2]


def _profile() -> SensitivityProfile:
    sites = [Site(f"l{i}.dropout", (f"l{i}.weight",)) for i in range(3)]
    fisher = {f"l{i}.weight": np.full(2, 10.0**-i) for i in range(3)}
    return SensitivityProfile.from_fisher(fisher, sites)


def _killed_save(target: Path) -> None:
    """Save in a child process that SIGKILLs itself after writing the temp file."""
    code = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from gd_core import SensitivityProfile, Site
        sites = [Site("a.dropout", ("a.weight",))]
        prof = SensitivityProfile.from_fisher({{"a.weight": np.ones(2)}}, sites)
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        prof.save({str(target)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode
    assert rc == -9


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    target = tmp_path / "m.profile.npz"
    _killed_save(target)
    stale = sorted(tmp_path.glob(".m.profile.npz.*.tmp"))
    assert len(stale) == 1 and not target.exists()
    past = time.time() - 3600
    os.utime(stale[0], (past, past))
    other = tmp_path / ".other.profile.npz.abcd1234.tmp"  # another target's temp file stays
    other.write_bytes(b"x")
    lookalike = tmp_path / ".m.profile.npz.notmine.tmp"  # not a name this library makes
    lookalike.write_bytes(b"x")
    _profile().save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, other.name, lookalike.name]
    )
    SensitivityProfile.load(target)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_temp_file_being_written_is_not_removed(tmp_path):
    """A temp file whose writer is alive (it holds a lock on it) is left alone."""
    import fcntl

    target = tmp_path / "m.profile.npz"
    live = tmp_path / ".m.profile.npz.live_123.tmp"
    with open(live, "wb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        past = time.time() - 3600
        os.utime(live, (past, past))
        _profile().save(target)
        assert live.exists()
    _profile().save(target)
    assert not live.exists()
