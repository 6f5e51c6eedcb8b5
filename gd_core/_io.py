"""Atomic ``.npz`` files holding a JSON header and named arrays; never pickles."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import ProfileError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_META_KEY = "__meta_json__"


_TEMP_NAME = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkstemp puts between prefix and suffix
_UNLOCKED_AGE_S = 600.0  # without flock, a temp file this old is taken to be a dead writer's


def _lock(fh: Any) -> bool:
    """Take an exclusive lock on an open file without waiting; False if someone holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temp files a killed :func:`atomic_write_bytes` of ``target`` left.

    Only files named like this library's temp files of the same target
    (``.NAME.<8 random characters>.tmp``) are candidates, and only when no live writer holds
    them: a writer keeps an exclusive ``flock`` on its temp file until the rename, which the
    system releases when the writer dies (where ``flock`` does not exist, files older than ten
    minutes are removed). Returns the removed paths.
    """
    target = Path(target)
    prefix = f".{target.name}."
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        if not _TEMP_NAME.fullmatch(name[len(prefix) : -len(".tmp")]):
            continue
        path = Path(entry.path)
        try:
            if fcntl is None and time.time() - path.stat().st_mtime < _UNLOCKED_AGE_S:
                continue
            with open(path, "rb") as fh:
                if not _lock(fh):
                    continue  # a writer is alive
                if time.time() - os.fstat(fh.fileno()).st_mtime < 1.0:
                    continue  # created this instant: its writer may not have locked it yet
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename.

    The temp file is locked while it is written (see :func:`remove_stale_temps`, which every
    write of the same target runs first, so a kill mid-write leaves nothing behind for long).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            _lock(fh)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a profile is meant to be shared
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            if fcntl is not None:  # POSIX renames an open file; the lock is held until then
                os.replace(tmp, target)
        if fcntl is None:
            os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_npz(path: str | os.PathLike[str], meta_json: str, arrays: dict[str, Any]) -> Path:
    """Store a JSON header and arrays in one ``.npz``, atomically."""
    buf = io.BytesIO()
    payload = {_META_KEY: np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)}
    payload.update({k: np.asarray(v) for k, v in arrays.items()})
    np.savez(buf, **payload)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buf.getvalue())


def read_npz(
    path: str | os.PathLike[str],
    what: str,
    *,
    kind: tuple[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load a file written by :func:`atomic_write_npz` with ``allow_pickle=False``.

    ``kind=(format, version)``: the header's ``format`` and ``version`` must be these (the one
    wording of "not such a file" and "another format version" for every file this library reads).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.npz"
        >>> _ = atomic_write_npz(path, '{"format": "f", "version": 2}', {})
        >>> read_npz(path, "thing", kind=("f", 1))
        Traceback (most recent call last):
        ...
        gd_core.errors.ProfileError: thing file '...x.npz' has format version 2; this library (guided-dropout ...) reads version 1; fix: upgrade guided-dropout or recompute the thing
    """
    p = Path(path)
    if not p.exists():
        raise ProfileError(f"{what} file {str(p)!r} does not exist; fix: check the path")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] != b"PK":
        raise ProfileError(
            f"{what} file {str(p)!r} is not an .npz archive (it does not start like a zip file); "
            "fix: pass a file this library wrote"
        )
    try:
        # read every member in full first: the zip's CRC-32 of each member then proves that the
        # bytes numpy parses below are the bytes that were written (a damaged array header could
        # otherwise make numpy stop early, before the checksum is reached)
        with zipfile.ZipFile(p) as zf:
            broken = zf.testzip()
            if broken is not None:
                raise zipfile.BadZipFile(f"bad CRC-32 of member {broken!r}")
            names = zf.namelist()
            if len(set(names)) != len(names):
                raise zipfile.BadZipFile("duplicate member names")
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile and numpy raise many kinds on damaged
        # bytes (BadZipFile, NotImplementedError for an unknown compression method or flag,
        # zlib.error, EOFError, OSError, ValueError, KeyError, struct.error, ...): all are
        # "this file is damaged", and a reader says so in one line
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ProfileError(
            f"{what} file {str(p)!r} is truncated or corrupt ({type(exc).__name__}: {detail}); "
            "fix: recompute it or copy it again"
        ) from exc
    if any(a.dtype.hasobject for a in arrays.values()):
        raise ProfileError(f"{what} file {str(p)!r} is corrupt (an object array)")
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise ProfileError(
            f"{what} file {str(p)!r} has no guided-dropout header; it is not a file this library wrote"
        )
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"header array of dtype {raw.dtype} and shape {raw.shape}")
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProfileError(
            f"{what} file {str(p)!r} has a corrupt header ({exc}); fix: recompute it"
        ) from exc
    if not isinstance(meta, dict):
        raise ProfileError(f"{what} file {str(p)!r} has a corrupt header (not a JSON object)")
    if kind is not None:
        _check_kind(meta, str(p), what, *kind)
    return meta, arrays


def _check_kind(meta: dict[str, Any], path: str, what: str, fmt: str, version: int) -> None:
    if meta.get("format") != fmt:
        raise ProfileError(
            f"{what} file {path!r} is not a guided-dropout {what} (format="
            f"{meta.get('format')!r}); fix: pass a {what} file this library wrote"
        )
    if meta.get("version") != version:
        raise ProfileError(
            f"{what} file {path!r} has format version {meta.get('version')!r}; this library "
            f"(guided-dropout {__version__}) reads version {version}; fix: upgrade "
            f"guided-dropout or recompute the {what}"
        )
