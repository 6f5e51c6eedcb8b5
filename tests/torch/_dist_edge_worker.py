"""The issue-14 distributed edge cases, run inside the shared two-process gloo spawn
(tests/torch/_torch_norms_dist_worker.run; not collected)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import torch


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


def unequal_in_group(rank: int, world: int, out_dir: str, output: str) -> None:
    """In an initialised group: rank 0 gets 2 batches, rank 1 gets 5; checkpoint after every
    batch; each rank writes ``rank{r}.json`` (its Fisher and count, or the error it raised)."""
    import adapters.torch as gdt

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


def masked_in_group(rank: int, world: int, out_dir: str) -> None:
    """In an initialised group: MaskedLMLoss under 2 processes, each rank its strided shard;
    rank 0 writes ``masked.npz``."""
    import adapters.torch as gdt

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


def run_all(rank: int, world: int, out_dir: str) -> None:
    """The edge cases of tests/torch/test_integrity.py in the shared gloo run
    (tests/torch/_torch_norms_dist_worker.run): unequal batch counts on the diagonal and the norms
    path, then MaskedLMLoss; each in its own subfolder of ``out_dir``."""
    for output in ("diagonal", "norms"):
        sub = Path(out_dir) / f"unequal-{output}"
        sub.mkdir(exist_ok=True)
        unequal_in_group(rank, world, str(sub), output)
        torch.distributed.barrier()
    sub = Path(out_dir) / "masked"
    sub.mkdir(exist_ok=True)
    masked_in_group(rank, world, str(sub))
