"""Worker of the 2-process gloo test of ``adapters.torch.estimate_fisher`` (spawned, not collected).

It lives in its own module so that ``torch.multiprocessing.spawn`` can import it by name in the
child processes whatever pytest's import mode is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.1), nn.LayerNorm(7), nn.Linear(7, 3)
    ).double()


def make_batches(
    n_batches: int = 6, batch_size: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch_size, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (batch_size,), generator=g),
        )
        for _ in range(n_batches)
    ]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def diagonal_and_ddp(rank: int, world: int, out_dir: str) -> None:
    """In an initialised group: the diagonal Fisher of this rank's shard (all-reduced), then
    ``apply`` and one DDP training step; rank 0 writes ``rank0.npz``."""
    import adapters.torch as gdt

    model = make_model()
    shard = make_batches()[rank::world]
    result = gdt.estimate_fisher(model, shard, loss=loss, progress=False)
    # apply then wrap in DDP and take one training step: the profile survives wrapping
    report = gdt.apply(model, {"2": 0.05})
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = shard[0]
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    if rank == 0:
        arrays = {k.replace(".", "_"): v for k, v in result.items()}
        arrays["count"] = np.array(result.count)
        arrays["p"] = np.array(report.probabilities()["2"])
        arrays["p_after"] = np.array(model[2].p)
        np.savez(Path(out_dir) / "rank0.npz", **arrays)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        diagonal_and_ddp(rank, world, out_dir)
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()
    # Reached only on success (an exception above reaches torch.multiprocessing.spawn as a
    # failure). Under pytest, about 1 run in 10 of this worker aborted at interpreter exit,
    # after everything above had finished ("terminate called without an active exception"),
    # once apply's dataflow forward ran here; 24 runs outside pytest were clean. Skipping the
    # interpreter's teardown keeps this test about the results it checks.
    os._exit(0)
