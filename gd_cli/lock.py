"""One ``gd profile`` run per output: a lock file beside ``--out`` (``OUT.lock``).

Two runs writing one ``--out`` share its checkpoint (``OUT.partial.npz``): the second would replace
it and then continue the first run's sums under its own settings. So a run takes ``OUT.lock``
(created exclusively, holding its process id and host) before it touches the checkpoint, and a
second run is refused naming the first one's process id. A lock whose process is gone (killed,
crashed) is taken over, with a note; one from another host cannot be checked and is refused with
the way out.

Example:
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "m.profile.npz")
    >>> with OutputLock(out) as lock:
    ...     Path(f"{out}.lock").exists(), lock.note
    (True, None)
    >>> Path(f"{out}.lock").exists()
    False
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .args import CLIError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class OutputLock:
    """``with OutputLock(out):`` holds ``out.lock`` for the run (see the module)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.path = Path(f"{out}.lock")
        self.note: str | None = None
        self._held = False

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(mine["host"])
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(mine, fh)
            self._held = True
            return self
        raise CLIError(
            f"--out: expected to take the lock {self.path}, received a lock that other runs "
            f"keep taking; fix: wait for them to finish, or use another --out"
        )

    def _take_over_or_refuse(self, host: str) -> None:
        other = self._read()
        pid, their_host = other.get("pid"), other.get("host")
        if not isinstance(pid, int):
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            if age < 5.0:  # being written by a run that just took it
                time.sleep(0.2)
                return
            self.note = f"took over the unreadable lock {self.path}"
        elif their_host != host:
            raise CLIError(
                f"--out: expected no other run writing it, received the lock {self.path} of "
                f"process {pid} on host {their_host}, which cannot be checked from {host}; fix: "
                f"wait for that run, or delete {self.path} if it is gone, or use another --out"
            )
        elif _alive(pid):
            raise CLIError(
                f"--out: expected no other run writing it, received the lock {self.path} of "
                f"`gd profile` process {pid}, still running; fix: wait for it to finish (its "
                f"checkpoint is shared), or use another --out"
            )
        else:
            self.note = f"took over the lock {self.path} of process {pid}, which is not running"
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._read().get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
