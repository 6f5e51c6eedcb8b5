"""Where a ``gd`` process stands in a (possibly) ``torchrun``-launched run, and its device.

Example:
    >>> Dist().main
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from adapters import require
from gd_core import ArgumentError


@dataclass
class Dist:
    """Where this process stands in a (possibly) distributed run."""

    rank: int = 0
    world: int = 1
    device: Any = "cpu"
    owned: bool = False  # this process initialised the process group

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", *, distributed: bool = True) -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) and pick the device.

    gloo on CPU, nccl on CUDA (one GPU per local rank). Without ``WORLD_SIZE`` (or with
    ``distributed=False``) this is a single process on ``device``.

    Example:
        >>> init_distributed("cpu").world  # doctest: +SKIP
        1
    """
    torch = require("torch", "gd profile")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if distributed else 1
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ArgumentError(
            f"--device: expected a device this machine has, received {device!r} without a CUDA "
            "GPU; fix: pass --device cpu"
        )
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ArgumentError(
            f"--device: expected auto, cpu, cuda or cuda:N, received {device!r}; fix: pass "
            "--device cpu"
        ) from exc
    if world <= 1:
        return Dist(0, 1, dev, False)
    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owned = True
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owned)


def finish_distributed(d: Dist) -> None:
    """Leave the process group if this process created it."""
    if d.owned:
        import torch

        torch.distributed.destroy_process_group()


def say(d: Dist | None, *lines: str) -> None:
    """Print on the main process only."""
    if d is None or d.main:
        for line in lines:
            print(line, flush=True)
