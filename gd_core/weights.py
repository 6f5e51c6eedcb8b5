"""Which weights a model holds: a digest of their values, so a cached profile names its checkpoint.

A model's :class:`~gd_core.fingerprint.Fingerprint` says which parameters it has (names and
shapes); two fine-tunes of one architecture share it. :func:`digest` adds the values: every
tensor's name, shape and dtype, and its values (all of them for a tensor of at most
:data:`SAMPLE` values, else a fixed strided sample of about :data:`SAMPLE` values that starts at
the first one). Hashing then reads at most ``SAMPLE`` values a tensor, so it costs a small
fraction of computing a profile however large the model is (``bench/weights_digest.py``).

Adapters supply the samples (:func:`stride` says which values) since only they read tensors.

Example:
    >>> import numpy as np
    >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> a = digest([("w", w.shape, str(w.dtype), w.reshape(-1)[:: stride(w.size)])])
    >>> b = digest([("w", w.shape, str(w.dtype), (w + 1).reshape(-1)[:: stride(w.size)])])
    >>> len(a), a == b
    (64, False)
    >>> stride(10), stride(SAMPLE), stride(SAMPLE + 1), stride(10 * SAMPLE)
    (1, 1, 2, 10)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: at most about this many values of each tensor are hashed
SAMPLE = 1 << 16
#: the metadata keys a cached profile keeps them under
DIGEST_KEY = "weights_digest"
CHECKPOINT_KEY = "checkpoint"


def stride(numel: int) -> int:
    """The step of the strided sample of a tensor of ``numel`` values (1: every value)."""
    return max(1, -(-int(numel) // SAMPLE))


def digest(tensors: Iterable[tuple[str, Sequence[int], str, Any]]) -> str:
    """SHA-256 of ``(name, shape, dtype, sample)`` tuples, sorted by name; ``sample`` is the
    flattened tensor taken every :func:`stride` values (a NumPy array or anything it converts)."""
    h = hashlib.sha256()
    for name, shape, dtype, sample in sorted(tensors, key=lambda t: str(t[0])):
        head = json.dumps([str(name), [int(d) for d in shape], str(dtype)], separators=(",", ":"))
        h.update(head.encode())
        values = np.ascontiguousarray(np.asarray(sample))
        h.update(str(values.dtype).encode())
        h.update(values.tobytes())
    return h.hexdigest()


def resolve(labels: Sequence[str], model_names: Sequence[str]) -> dict[str, str | None]:
    """Each label (a parameter name as a profile calls it) -> the model's parameter of that name
    under the prefix renaming that places the most labels (None where none is placed): an
    encoder's profile names its tensors without the task model's prefix.

    Example:
        >>> resolve(["enc.w", "gone"], ["bert.enc.w", "head.w"])
        {'enc.w': 'bert.enc.w', 'gone': None}
    """
    from .align import find_renaming

    rename = find_renaming(list(labels), list(model_names))
    known = set(model_names)
    return {str(n): (rename(n) if rename(n) in known else None) for n in labels}


@dataclass(frozen=True)
class WeightsId:
    """A model's weights digest and the checkpoint it was loaded from (a path or hub name)."""

    digest: str
    checkpoint: str | None = None

    def describe(self) -> str:
        """``checkpoint X (weights 1a2b3c4d5e6f)``, the form notes use.

        Example:
            >>> WeightsId("1a2b3c4d5e6f7788", "bert-tiny").describe()
            'checkpoint bert-tiny (weights 1a2b3c4d5e6f)'
        """
        where = self.checkpoint or "unnamed"
        return f"checkpoint {where} (weights {self.digest[:12]})"

    def metadata(self) -> dict[str, Any]:
        """What a profile's metadata records about the weights it was computed on."""
        return {DIGEST_KEY: self.digest, CHECKPOINT_KEY: self.checkpoint}

    @classmethod
    def of_metadata(cls, metadata: Any) -> WeightsId | None:
        """The weights a profile records (None when it records no digest).

        Example:
            >>> WeightsId.of_metadata({"weights_digest": "ab", "checkpoint": "m"})
            WeightsId(digest='ab', checkpoint='m')
            >>> WeightsId.of_metadata({}) is None
            True
        """
        if not isinstance(metadata, Mapping) or not isinstance(metadata.get(DIGEST_KEY), str):
            return None
        name = metadata.get(CHECKPOINT_KEY)
        return cls(metadata[DIGEST_KEY], str(name) if name else None)
