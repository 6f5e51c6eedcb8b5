"""Workers of the issue-14 distributed edge-case tests (spawned, not collected)."""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import numpy as np
import torch

TIMEOUT_S = 30


def tiny_mlm() -> torch.nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg)


def mlm_batches(n_batches: int = 6, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {"input_ids": torch.randint(5, 60, (batch_size, 12), generator=g)} for _ in range(n_batches)
    ]


def _init(rank: int, world: int, init_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )


def unequal(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 0 gets 2 batches, rank 1 gets 5; checkpoint after every batch."""
    _unequal(rank, world, init_file, out_dir, "diagonal")


def unequal_norms(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """:func:`unequal` on the norms path (``output="norms"``, what ``profile`` uses)."""
    _unequal(rank, world, init_file, out_dir, "norms")


def _unequal(rank: int, world: int, init_file: str, out_dir: str, output: str) -> None:
    import adapters.torch as gdt

    _init(rank, world, init_file)
    out: dict[str, object] = {}
    try:
        from _torch_dist_worker import loss, make_batches, make_model

        shard = make_batches(7)[:2] if rank == 0 else make_batches(7)[2:]
        result = gdt.estimate_fisher(
            make_model(),
            shard,
            loss=loss,
            progress=False,
            checkpoint=Path(out_dir) / "ckpt.npz",
            checkpoint_every=1,
            output=output,
        )
        fisher = {k: np.asarray(v).tolist() for k, v in result.items()}
        out = {"count": result.count, "fisher": fisher}
        torch.distributed.barrier()  # a following collective must not hang
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
        torch.distributed.destroy_process_group()
    _exit_cleanly()


def masked(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """MaskedLMLoss under 2 processes: each rank its strided shard."""
    import adapters.torch as gdt

    _init(rank, world, init_file)
    try:
        result = gdt.estimate_fisher(
            tiny_mlm(),
            mlm_batches()[rank::world],
            loss=gdt.MaskedLMLoss(mask_token_id=4, seed=0),
            progress=False,
        )
        if rank == 0:
            arrays = {k.replace(".", "_"): v for k, v in result.items()}
            arrays["count"] = np.array(result.count)
            np.savez(Path(out_dir) / "masked.npz", **arrays)
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Reached only on success (an exception reaches torch.multiprocessing.spawn as a failure).
    As in ``_torch_dist_worker``: under pytest (and more often with parallel test workers) a
    gloo worker sometimes aborted at interpreter exit after all its work had finished
    ("terminate called without an active exception"); skipping the interpreter's teardown keeps
    these tests about the results they check."""
    os._exit(0)
