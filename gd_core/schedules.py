"""Step schedules: a multiplier in [0, 1] applied to every site's probability at a training step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import bad_argument

SCHEDULES: tuple[str, ...] = ("constant", "linear_warmup", "early", "cosine")


def _check_steps(name: str, value: Any, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        lo = "0" if allow_zero else "1"
        raise bad_argument(name, f"an int >= {lo}", value, f"pass e.g. {name}=1000")
    return value


@dataclass(frozen=True)
class Schedule:
    """A dropout schedule. ``multiplier(step)`` scales each site's probability.

    kinds:
      - ``constant``: always 1.
      - ``linear_warmup``: rises linearly from 0 at step 0 to 1 at ``steps``, then stays 1.
      - ``early``: 1 for the first ``steps`` steps, then 0 (early dropout, Liu et al. 2023).
      - ``cosine``: falls from 1 at step 0 to 0 at ``steps`` along a half cosine, then stays 0.

    Example:
        >>> Schedule("linear_warmup", steps=10).multiplier(5)
        0.5
        >>> Schedule("early", steps=3).multiplier(3)
        0.0
    """

    kind: str = "constant"
    steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise bad_argument("kind", f"one of {SCHEDULES}", self.kind, "use kind='constant'")
        if self.kind != "constant":
            _check_steps("steps", self.steps)

    def multiplier(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad_argument("step", "an int >= 0", step, "count optimiser steps from 0")
        if self.kind == "constant":
            return 1.0
        frac = min(step / self.steps, 1.0)
        if self.kind == "linear_warmup":
            return frac
        if self.kind == "early":
            return 1.0 if step < self.steps else 0.0
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    def get_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Schedule:
        if config is None:
            return cls()
        if isinstance(config, Schedule):
            return config
        if not isinstance(config, Mapping):
            raise bad_argument(
                "schedule",
                "a Schedule or a dict like {'kind': 'early', 'steps': 100}",
                config,
                "build one with Schedule(kind, steps)",
            )
        return cls(str(config.get("kind", "constant")), int(config.get("steps", 0)))
