"""Atomic ``.npz`` files holding a JSON header and named arrays; never pickles."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProfileError

_META_KEY = "__meta_json__"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a profile is meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
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
    path: str | os.PathLike[str], what: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load a file written by :func:`atomic_write_npz` with ``allow_pickle=False``."""
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
    return meta, arrays
