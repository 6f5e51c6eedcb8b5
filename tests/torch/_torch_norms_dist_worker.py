"""Worker of the 2-process gloo tests of ``estimate_fisher`` (spawned, not collected): the norms
path, the diagonal path and the distributed edge cases in one spawn, shared by
tests/torch/test_norms.py, test_adapter.py and test_integrity.py through
tests/torch/conftest.py::gloo_two_process_run."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable by name when spawned
from _torch_dist_worker import diagonal_and_ddp, loss, make_batches, make_model  # noqa: E402


def norms(rank: int, world: int, out_dir: str) -> None:
    """In an initialised group: the norms-path Fisher of this rank's shard; rank 0 writes
    ``rank0-norms.npz``."""
    import adapters.torch as gdt

    shard = make_batches()[rank::world]
    result = gdt.estimate_fisher(make_model(), shard, loss=loss, progress=False, output="norms")
    if rank == 0:
        arrays = {"count": np.array(result.count)}
        for name, total in result.items():
            arrays[name.replace(".", "_") + "__sum"] = np.array(total)
            for axis, m in result.marginals[name].items():
                arrays[name.replace(".", "_") + f"__axis{axis}"] = m
        np.savez(Path(out_dir) / "rank0-norms.npz", **arrays)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every two-process check in one spawn (two interpreter start-ups instead of ten): the
    norms path, then the diagonal path with apply and a DDP step (``_torch_dist_worker``), then
    the edge cases of test_integrity.py (``_dist_edge_worker.run_all``)."""
    import _dist_edge_worker as edge

    # a collective one rank never reaches fails after 30 s instead of gloo's default 30 min
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        norms(rank, world, out_dir)
        torch.distributed.barrier()
        diagonal_and_ddp(rank, world, out_dir)
        torch.distributed.barrier()
        edge.run_all(rank, world, out_dir)
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)  # reached only on success; see _torch_dist_worker (an exit-time abort)
