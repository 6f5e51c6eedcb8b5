"""Batches, per-sample losses and the exact per-sample loop, for the per-sample engine
(:mod:`adapters.torch.persample`): which parameters, how many samples a batch holds, the check of
a loss's output, the walk of the autograd graph that sends parameters to the exact loop, the loop
itself (one ``torch.autograd.grad`` per sample), and the slow reference the engine is tested
against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def _analyse_graph(root: Any, targets: set[Any]) -> tuple[dict[Any, bool], dict[int, int]]:
    """Walk the autograd graph below ``root``.

    Returns ``below`` (for every reachable node: is some node of ``targets`` strictly below it)
    and the number of graph edges into each leaf tensor's AccumulateGrad node (by ``id``).
    """
    below: dict[Any, bool] = {}
    uses: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            hit = False
            for child, _ in node.next_functions:
                if child is not None and (child in targets or below.get(child, False)):
                    hit = True
                    break
            below[node] = hit
            continue
        if node in below:
            continue
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is None:
                continue
            var = getattr(child, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            if child not in below:
                stack.append((child, False))
    return below, uses


def loop_sq_grads(
    losses: torch.Tensor, plist: list[torch.Tensor], accs: list[torch.Tensor]
) -> None:
    """Add, for every sample ``i``, ``grad(losses[i], plist[k]) ** 2`` to ``accs[k]`` (in its
    dtype): the exact per-sample loop over a retained graph.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> acc = torch.zeros(2, dtype=torch.float64)
        >>> loop_sq_grads(w * torch.tensor([3.0, 4.0]), [w], [acc])
        >>> acc.tolist()
        [9.0, 16.0]
    """
    for i in range(int(losses.shape[0])):
        gs = torch.autograd.grad(losses[i], plist, retain_graph=True, allow_unused=True)
        for acc, g in zip(accs, gs, strict=True):
            if g is not None:
                g = g.to_dense() if g.is_sparse else g
                acc.add_(g.to(acc.dtype).square())


def misattributed(hooked: Sequence[Any], losses: torch.Tensor, r: torch.Tensor) -> list[Any]:
    """The engine's ``verify=True`` check: the hooked parameters (``_Param``) whose
    ``sum_i r_i g_i`` (``.wsum``, built by the hooks) is not autograd's gradient of
    ``sum_i r_i loss_i``, i.e. whose gradients went to the wrong samples; each gets a
    ``.fallback`` reason and loses its ``.sq`` (the exact loop recomputes it)."""
    checked = [st for st in hooked if st.wsum is not None]
    if not checked:
        return []
    true = torch.autograd.grad(
        losses,
        [st.param for st in checked],
        grad_outputs=r.to(losses.dtype),
        retain_graph=True,
        allow_unused=True,
    )
    n = int(losses.shape[0])
    failed = []
    for st, t in zip(checked, true, strict=True):
        assert st.wsum is not None and st.sq is not None
        t64 = torch.zeros_like(st.wsum) if t is None else t.to(st.wsum.dtype)
        err = float((st.wsum - t64).norm())
        scale = 1.5 * float(st.sq.sum().clamp_min(0).sqrt()) * (n**0.5)
        rtol = 1e-9 if st.dtype == torch.float64 else 1e-3
        if err > rtol * scale + 1e-30:
            st.fallback = f"verify: per-sample attribution mismatch (error {err:.3g})"
            st.sq = None
            failed.append(st)
    return failed


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
        loop_sq_grads(losses, plist, [accs[id(p)] for p in plist])
    return {name: accs[id(p)].clone() for name, p in targets}, n
