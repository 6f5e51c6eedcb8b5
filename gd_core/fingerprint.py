"""Model fingerprints: which parameters (names and shapes) a model has."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fingerprint:
    """Ordered (name, shape) pairs of a model's parameters and their SHA-256 digest.

    Example:
        >>> fp = Fingerprint.from_shapes({"w": (2, 3), "b": (2,)})
        >>> fp.digest[:8] == Fingerprint.from_shapes([("b", (2,)), ("w", (2, 3))]).digest[:8]
        True
    """

    params: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]
    ) -> Fingerprint:
        items = shapes.items() if isinstance(shapes, Mapping) else shapes
        return cls(tuple(sorted((str(n), tuple(int(d) for d in s)) for n, s in items)))

    @property
    def digest(self) -> str:
        text = json.dumps([[n, list(s)] for n, s in self.params], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other: Fingerprint, limit: int = 5) -> list[str]:
        """Human-readable differences (empty when the fingerprints match)."""
        mine, theirs = dict(self.params), dict(other.params)
        out = [f"missing {n}" for n in mine if n not in theirs]
        out += [f"extra {n}" for n in theirs if n not in mine]
        out += [
            f"{n}: shape {mine[n]} vs {theirs[n]}"
            for n in mine
            if n in theirs and mine[n] != theirs[n]
        ]
        return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])

    def to_list(self) -> list[Any]:
        return [[n, list(s)] for n, s in self.params]

    @classmethod
    def from_list(cls, data: Iterable[Any]) -> Fingerprint:
        return cls.from_shapes([(str(n), tuple(s)) for n, s in data])

    def __len__(self) -> int:
        return len(self.params)
