"""Batches and per-sample losses for the per-sample engine: which parameters, how many samples
a batch holds, the check of a loss's output, and the slow reference the engine is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

PerSampleLoss = Callable[[nn.Module, Any], torch.Tensor]


def _resolve_params(
    model: nn.Module, params: Mapping[str, nn.Parameter] | None
) -> list[tuple[str, nn.Parameter]]:
    if params is None:
        return [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    out = []
    for k, p in params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{k!r}] is a {type(p).__name__}, not a tensor")
        if p.requires_grad:  # frozen parameters are skipped
            out.append((k, p))
    return out


def _infer_batch_size(batch: Any) -> int | None:
    """Number of samples in ``batch`` when it can be read off the data, else None."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        first = batch.get("input_ids")
        if isinstance(first, torch.Tensor) and first.ndim:
            return int(first.shape[0])
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        return None
    if isinstance(batch, (list, tuple)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        if batch and all(isinstance(v, str) for v in batch):
            return len(batch)
    return None


def _check_losses(losses: Any, batch: Any) -> int:
    if not isinstance(losses, torch.Tensor):
        raise ValueError(
            f"per_sample_loss must return a 1-D torch.Tensor of per-sample losses, "
            f"got {type(losses).__name__}"
        )
    if losses.ndim != 1:
        hint = (
            " (a scalar: use reduction='none' and return one loss per sample)"
            if (losses.ndim == 0)
            else ""
        )
        raise ValueError(
            f"per_sample_loss must return a 1-D tensor of length n (one loss per sample), "
            f"got shape {tuple(losses.shape)}{hint}"
        )
    if not losses.is_floating_point():
        raise ValueError(f"per_sample_loss returned dtype {losses.dtype}; expected floating point")
    n = int(losses.shape[0])
    expected = _infer_batch_size(batch)
    if expected is not None and expected != n:
        raise ValueError(
            f"per_sample_loss returned {n} losses but the batch holds {expected} samples: "
            f"return one loss per sample (a 1-D tensor of length {expected})"
        )
    if n == 0:
        raise ValueError("per_sample_loss returned an empty tensor: the batch has no samples")
    return n


def reference_sq_grad_sums(
    model: nn.Module,
    per_sample_loss: PerSampleLoss,
    batch: Any,
    *,
    params: Mapping[str, nn.Parameter] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Slow, obviously correct reference for :func:`per_sample_sq_grad_sums` (float64 sums).

    For each sample ``i``: ``torch.autograd.grad(losses[i], params, retain_graph=True)``,
    squared and accumulated in float64.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> sums, n = reference_sq_grad_sums(net, lambda m, b: m(b).squeeze(1), x)
        >>> sums["weight"].tolist(), n
        ([[1.0, 4.0]], 2)
    """
    targets = _resolve_params(model, params)
    losses = per_sample_loss(model, batch)
    n = _check_losses(losses, batch)
    uniq: dict[int, torch.Tensor] = {}
    for _, p in targets:
        uniq.setdefault(id(p), p)
    plist = list(uniq.values())
    accs = {
        pid: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for pid, p in uniq.items()
    }
    if plist and losses.requires_grad:
        for i in range(n):
            gs = torch.autograd.grad(losses[i], plist, retain_graph=True, allow_unused=True)
            for p, g in zip(plist, gs, strict=True):
                if g is not None:
                    g = g.to_dense() if g.is_sparse else g
                    accs[id(p)].add_(g.double().square())
    return {name: accs[id(p)].clone() for name, p in targets}, n
