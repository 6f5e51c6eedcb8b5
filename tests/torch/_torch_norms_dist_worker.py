"""Worker of the 2-process gloo test of ``estimate_fisher(output="norms")`` (spawned, not collected)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable by name when spawned
from _torch_dist_worker import loss, make_batches, make_model  # noqa: E402


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import adapters.torch as gdt

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        shard = make_batches()[rank::world]
        result = gdt.estimate_fisher(make_model(), shard, loss=loss, progress=False, output="norms")
        if rank == 0:
            arrays = {"count": np.array(result.count)}
            for name, total in result.items():
                arrays[name.replace(".", "_") + "__sum"] = np.array(total)
                for axis, m in result.marginals[name].items():
                    arrays[name.replace(".", "_") + f"__axis{axis}"] = m
            np.savez(Path(out_dir) / "rank0.npz", **arrays)
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)  # reached only on success; see _torch_dist_worker (an exit-time abort)
