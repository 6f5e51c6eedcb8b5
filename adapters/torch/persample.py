"""Exact per-sample squared-gradient sums for PyTorch models (the empirical Fisher diagonal).

Guided dropout needs, for every parameter ``w``, the sum over samples ``i`` of the squared
*per-sample* gradient ``(d loss_i / d w) ** 2``. :func:`per_sample_sq_grad_sums` computes it
exactly with one forward pass and one backward pass over the whole batch:

* A forward hook on every supported module (``nn.Linear``, the ``Conv1D`` of Hugging Face GPT-2,
  ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Embedding``) keeps the module's input and puts a
  gradient hook on its output. When the backward pass reaches that output, the per-sample
  gradients of the module's parameters are rebuilt from (input, output gradient), a chunk of
  samples at a time, squared and summed. Memory stays ``O(parameter size x chunk)``.
* The backward pass only asks autograd for what the hooks need (gradients of module outputs),
  so autograd skips the batched weight gradients that an ordinary training step computes and
  the per-sample work replaces it: the cost stays close to one training step.
* A parameter used by several calls (weight tying, a module called twice, two views of a
  sample) gets its per-sample gradient summed over the calls *before* squaring.
* Everything else is handled by an exact fallback, a per-sample ``torch.autograd.grad`` loop over
  the retained graph restricted to the parameters concerned: parameters of unsupported modules,
  parameters used outside a supported module's ``forward`` (detected by counting their uses in
  the autograd graph), and modules whose input does not carry the samples along dimension 0.
  Pass ``report={}`` to see which parameters took that path and why.

Assumption: samples are independent (eval mode, no batch-coupling layers) and every supported
module input whose leading dimension equals the number of samples ``n`` is indexed by sample
along that dimension. A module whose leading dimension is ``n`` by coincidence (for instance
T5's relative-position bias when sequence length equals batch size) would be misattributed;
``verify=True`` detects that with one extra backward pass and recomputes those parameters
exactly. Inputs with leading dimension 1 to an ``nn.Embedding`` (broadcast position ids) are
expanded to ``n`` rows so that each sample's share of the gradient stays separable.

The three built-in per-sample losses live in :mod:`adapters.torch.losses`.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x = torch.randn(5, 3)
    >>> loss = lambda model, batch: model(batch).squeeze(1) ** 2
    >>> sums, n, losses = per_sample_sq_grad_sums(net, loss, x)
    >>> n, sorted(sums)[:2], sums["0.weight"].shape
    (5, ['0.bias', '0.weight'], torch.Size([4, 3]))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .samples import (
    PerSampleLoss,
    _check_losses,
    _infer_batch_size,
    _resolve_params,
    reference_sq_grad_sums,
)

__all__ = ["per_sample_sq_grad_sums", "reference_sq_grad_sums"]

_LOG = logging.getLogger(__name__)

#: Largest number of elements of one block of materialised per-sample gradients
#: (chunk x parameter size) when ``chunk_size`` is not given: 16 Mi elements, 64 MiB in float32.
_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _hf_conv1d_forward() -> Any:
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return getattr(cls, "forward", None)


def _module_kind(m: nn.Module) -> str | None:
    """Which exact per-sample rule applies to ``m`` (None: unsupported, use the fallback)."""
    if "forward" in m.__dict__:  # forward patched on the instance
        return None
    fwd = type(m).forward
    if isinstance(m, nn.Linear) and fwd is nn.Linear.forward:
        return "linear"
    if isinstance(m, nn.LayerNorm) and fwd is nn.LayerNorm.forward:
        return "layernorm"
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(m, rms) and fwd is rms.forward:
        return "rmsnorm"
    if isinstance(m, nn.Embedding) and fwd is nn.Embedding.forward:
        if m.scale_grad_by_freq or m.sparse:
            return None  # batch-frequency scaling couples samples; sparse grads: fallback
        return "embedding"
    conv = _hf_conv1d_forward()
    if conv is not None and fwd is conv:
        return "conv1d"
    return None


_ROLES = {
    "linear": ("weight", "bias"),
    "conv1d": ("weight", "bias"),
    "layernorm": ("weight", "bias"),
    "rmsnorm": ("weight",),
    "embedding": ("weight",),
}


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Param:
    names: list[str]
    param: torch.Tensor
    dtype: torch.dtype
    sq: torch.Tensor | None = None
    wsum: torch.Tensor | None = None  # sum_i r_i g_i, only with verify=True
    expected: int = 0  # hooked calls of this parameter in the loss graph
    pending: list[tuple[_Call, str]] = field(default_factory=list)
    fallback: str | None = None  # reason, when the fallback computes this parameter
    graph_uses: int = 0  # edges into this parameter's AccumulateGrad node


@dataclass(eq=False)
class _Call:
    kind: str
    module: nn.Module
    act: torch.Tensor | None
    edge: GradientEdge
    out_shape: tuple[int, ...]
    roles: dict[str, _Param]
    grad: torch.Tensor | None = None
    done: bool = False
    refs: int = 0
    cache: dict[Any, torch.Tensor] = field(default_factory=dict)

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0:
            self.act = None
            self.grad = None
            self.cache.clear()


class _Session:
    def __init__(self, n_hint: int | None, chunk_size: int | None) -> None:
        self.n_hint = n_hint
        self.n = 0
        self.chunk_size = chunk_size
        self.calls: list[_Call] = []
        self.tensor_hooks: list[Any] = []
        self.r: torch.Tensor | None = None  # verification weights
        self.recording = True
        self.scratch: dict[Any, torch.Tensor] = {}

    # ---- forward -----------------------------------------------------------------------

    def forward_hook(
        self,
        kind: str,
        roles: dict[str, _Param],
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> Any:
        if not self.recording or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None  # left unrecorded: the graph-use count sends its params to the fallback
        if kind == "embedding" and x.ndim == 1:
            # 1-D ids (e.g. ``arange(T)`` for positions) may or may not index samples; a length
            # that happens to equal the batch size would be misattributed, so take the exact path
            return None
        replaced = None
        nh = self.n_hint
        if (
            kind == "embedding"
            and nh is not None
            and nh > 1
            and x.ndim >= 1
            and x.shape[0] == 1
            and output.shape[0] == 1
        ):
            # broadcast position ids: give every sample its own rows so its share is separable
            x = x.expand(nh, *x.shape[1:])
            output = replaced = output.expand(nh, *output.shape[1:])
        call = _Call(
            kind, module, x.detach(), get_gradient_edge(output), tuple(output.shape), roles
        )
        self.calls.append(call)
        self.tensor_hooks.append(output.register_hook(partial(self.on_grad, call)))
        return replaced

    # ---- backward ----------------------------------------------------------------------

    def on_grad(self, call: _Call, grad: torch.Tensor) -> None:
        if call.done or not call.roles:
            return None
        call.done = True
        call.grad = grad.detach()
        with torch.no_grad():
            for role, st in call.roles.items():
                if st.expected <= 1:
                    self._process_single(st, call, role)
                    call.release()
                else:
                    st.pending.append((call, role))
                    if len(st.pending) == st.expected:
                        self._process_multi(st)
        return None

    def finish_pending(self) -> None:
        with torch.no_grad():
            for call in self.calls:
                for st in call.roles.values():
                    if st.pending:
                        self._process_multi(st)

    # ---- accumulation ------------------------------------------------------------------

    def _chunk(self, numel: int) -> int:
        c = self.chunk_size if self.chunk_size else max(1, _BLOCK_ELEMENTS // max(1, numel))
        return max(1, min(int(c), self.n))

    def _acc(self, st: _Param) -> torch.Tensor:
        if st.sq is None:
            st.sq = torch.zeros(st.param.shape, dtype=st.dtype, device=st.param.device)
            if self.r is not None:
                st.wsum = torch.zeros_like(st.sq)
        return st.sq

    def _add_block(self, st: _Param, block: torch.Tensor, lo: int, hi: int) -> None:
        """Add the per-sample gradients ``block`` (samples lo..hi; consumed) to ``st``."""
        acc = self._acc(st)
        if self.r is not None and st.wsum is not None:
            r = self.r[lo:hi].to(block.dtype)
            st.wsum.add_(torch.tensordot(r, block, dims=1))
        block.square_()
        acc.add_(block.sum(0))

    def _factors(self, call: _Call, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output gradient) of a linear-type call as (n, T, features) tensors."""
        key = ("lin", dtype)
        if key not in call.cache:
            assert call.act is not None and call.grad is not None
            n = self.n
            a = call.act.reshape(n, -1, call.act.shape[-1]).to(dtype)
            g = call.grad.reshape(n, -1, call.grad.shape[-1]).to(dtype)
            call.cache[key] = a
            call.cache[("grad",) + key] = g
        return call.cache[key], call.cache[("grad",) + key]

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
        """A reusable block (allocating and first-touching a fresh one per chunk is slow)."""
        numel = 1
        for d in shape:
            numel *= int(d)
        key = (dtype, device)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.scratch[key] = buf
        return buf[:numel].view(shape)

    def _dense(
        self,
        call: _Call,
        role: str,
        st: _Param,
        lo: int,
        hi: int,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample gradients of ``role`` from ``call`` for samples lo..hi, shape
        (hi - lo, *param.shape): added to ``into`` if given, else in a new block."""
        dtype = st.dtype
        kind = call.kind
        c = hi - lo
        assert call.act is not None and call.grad is not None
        if kind in ("linear", "conv1d") and role == "weight":
            a, g = self._factors(call, dtype)
            x, y = (g[lo:hi], a[lo:hi]) if kind == "linear" else (a[lo:hi], g[lo:hi])
            if into is not None:
                return into.baddbmm_(x.transpose(1, 2), y)
            block = self._scratch((c, *st.param.shape), dtype, st.param.device)
            return torch.bmm(x.transpose(1, 2), y, out=block)
        if kind == "embedding":
            num, dim = st.param.shape
            ids = call.act[lo:hi].reshape(c, -1).long()
            g = call.grad[lo:hi].reshape(c, -1, dim).to(dtype)
            keys = torch.arange(c, device=ids.device).unsqueeze(1) * num + ids
            pad = call.module.padding_idx  # type: ignore[union-attr]
            if pad is not None:
                keep = ids != pad
                keys, rows = keys[keep], g[keep]
            else:
                keys, rows = keys.reshape(-1), g.reshape(-1, dim)
            if into is None:
                into = torch.zeros(c, num, dim, dtype=dtype, device=g.device)
            into.view(c * num, dim).index_add_(0, keys, rows)
            return into
        if kind in ("linear", "conv1d"):  # bias
            _, g = self._factors(call, dtype)
            d = g[lo:hi].sum(1)
        elif kind in ("layernorm", "rmsnorm"):
            m = call.module
            shape = tuple(m.normalized_shape)  # type: ignore[arg-type]
            g = call.grad[lo:hi].to(dtype)
            if role == "bias":
                d = g.reshape(c, -1, *shape).sum(1)
            else:
                x = call.act[lo:hi].to(dtype)
                if kind == "layernorm":  # the forward's own kernel: fast and bit-identical
                    xhat = F.layer_norm(x, shape, eps=m.eps)  # type: ignore[arg-type]
                else:
                    xhat = F.rms_norm(x, shape, eps=m.eps)  # type: ignore[arg-type]
                d = (g * xhat).reshape(c, -1, *shape).sum(1)
        else:
            raise AssertionError(kind)
        return d if into is None else into.add_(d)

    def _process_single(self, st: _Param, call: _Call, role: str) -> None:
        n = self.n
        dtype = st.dtype
        kind = call.kind
        assert call.act is not None and call.grad is not None
        if kind in ("linear", "conv1d") and role == "weight":
            a, g = self._factors(call, dtype)
            if a.shape[1] == 1:  # one row per sample: sum_i (g_i a_i^T)^2 = (g^2)^T a^2
                a2, g2 = a[:, 0], g[:, 0]
                acc = self._acc(st)
                if kind == "linear":
                    acc.addmm_(g2.square().T, a2.square())
                else:
                    acc.addmm_(a2.square().T, g2.square())
                if self.r is not None and st.wsum is not None:
                    gr = g2 * self.r.to(dtype).unsqueeze(1)
                    st.wsum.addmm_(*((gr.T, a2) if kind == "linear" else (a2.T, gr)))
                return
        elif kind == "embedding":
            self._embedding_single(st, call)
            return
        step = self._chunk(st.param.numel())
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            self._add_block(st, self._dense(call, role, st, lo, hi), lo, hi)

    def _embedding_single(self, st: _Param, call: _Call) -> None:
        """Sparse path: each sample's gradient lives on the rows of the tokens it uses."""
        assert call.act is not None and call.grad is not None
        n = self.n
        dtype = st.dtype
        num, dim = st.param.shape
        ids = call.act.reshape(n, -1).long()
        g = call.grad.reshape(n, -1, dim).to(dtype)
        keys = torch.arange(n, device=ids.device).unsqueeze(1) * num + ids
        pad = call.module.padding_idx  # type: ignore[union-attr]
        if pad is not None:
            keep = ids != pad
            keys, rows = keys[keep], g[keep]
        else:
            keys, rows = keys.reshape(-1), g.reshape(-1, dim)
        uniq, inv = torch.unique(keys, return_inverse=True)
        buf = torch.zeros(uniq.numel(), dim, dtype=dtype, device=g.device)
        buf.index_add_(0, inv, rows)  # repeated tokens accumulate before squaring
        token = uniq % num
        acc = self._acc(st)
        if self.r is not None and st.wsum is not None:
            r = self.r.to(dtype)[uniq // num].unsqueeze(1)
            st.wsum.index_add_(0, token, buf * r)
        acc.index_add_(0, token, buf.square_())

    def _process_multi(self, st: _Param) -> None:
        pending, st.pending = st.pending, []
        n = self.n
        step = self._chunk(st.param.numel())
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            block = None
            for call, role in pending:
                block = self._dense(call, role, st, lo, hi, into=block)
            assert block is not None
            self._add_block(st, block, lo, hi)
        for call, _ in pending:
            call.release()


# --------------------------------------------------------------------------------------------
# autograd-graph analysis
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def per_sample_sq_grad_sums(
    model: nn.Module,
    per_sample_loss: PerSampleLoss,
    batch: Any,
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    chunk_size: int | None = None,
    verify: bool = False,
    report: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """Sum over samples of the squared per-sample gradient, exactly, in one forward/backward.

    Runs ``losses = per_sample_loss(model, batch)`` (a 1-D tensor, one loss per sample) with
    hooks installed, then one backward pass, and returns ``(sums, n, losses)``:
    ``sums[name] = sum_i (d losses[i] / d params[name]) ** 2`` (same shape and device as the
    parameter; float64 for float64 parameters, else float32), ``n = len(losses)`` and the
    detached ``losses``.

    Args:
        model: the model; samples must not interact (eval mode, no batch norm in train mode).
        per_sample_loss: ``(model, batch) -> 1-D tensor`` of per-sample losses.
        batch: anything ``per_sample_loss`` accepts (a tensor, a dict of tensors, ...).
        params: name -> parameter to report; defaults to all ``named_parameters`` that require
            grad. Parameters with ``requires_grad=False`` are skipped (absent from ``sums``).
        chunk_size: samples per block of materialised per-sample gradients (default: as many
            as fit in 16 Mi elements per parameter).
        verify: also check, with one extra backward pass weighted by random per-sample factors,
            that every hooked parameter's gradients were attributed to the right samples;
            parameters failing the check are recomputed by the exact fallback.
        report: if a dict is given, it is filled with ``"hooked"`` (names computed by the
            hooks), ``"fallback"`` (name -> reason, computed by the per-sample loop),
            ``"unused"`` (names the losses do not depend on) and ``"verify_failed"``.

    The backward pass differentiates ``losses.sum()``; ``.grad`` attributes are left as they
    were and no hook stays installed.

    Raises:
        ValueError: if ``per_sample_loss`` does not return a 1-D floating tensor whose length
            matches the batch, or returns one that does not depend on any parameter.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> sums, n, _ = per_sample_sq_grad_sums(net, lambda m, b: m(b).squeeze(1), x)
        >>> sums["weight"].tolist(), sums["bias"].tolist(), n
        ([[1.0, 4.0]], [2.0], 2)
    """
    targets = _resolve_params(model, params)
    by_id: dict[int, _Param] = {}
    for name, p in targets:
        st = by_id.get(id(p))
        if st is None:
            by_id[id(p)] = _Param([name], p, _compute_dtype(p))
        else:
            st.names.append(name)

    # modules whose own parameters we can handle
    plan: list[tuple[nn.Module, str, dict[str, _Param]]] = []
    hooked_ids: set[int] = set()
    for mod in model.modules():
        kind = _module_kind(mod)
        if kind is None:
            continue
        roles = {}
        for role in _ROLES[kind]:
            p = mod._parameters.get(role)
            if p is not None and id(p) in by_id:
                roles[role] = by_id[id(p)]
                hooked_ids.add(id(p))
        if roles:
            plan.append((mod, kind, roles))
    for pid, st in by_id.items():
        if pid not in hooked_ids:
            st.fallback = "not a parameter of a supported module (Linear, LayerNorm, Embedding...)"

    session = _Session(_infer_batch_size(batch), chunk_size)
    saved_grads = [(p, p.grad) for _, p in targets]
    handles = []
    try:
        for mod, kind, roles in plan:
            handles.append(
                mod.register_forward_hook(
                    partial(session.forward_hook, kind, roles), with_kwargs=True, prepend=True
                )
            )
        losses = per_sample_loss(model, batch)
        session.recording = False
        for h in handles:
            h.remove()
        handles.clear()
        n = _check_losses(losses, batch)
        session.n = n
        if not by_id:
            return {}, n, losses.detach()
        if losses.grad_fn is None:
            raise ValueError(
                "per_sample_loss returned losses that do not depend on any parameter "
                "(computed under torch.no_grad() or inference_mode?)"
            )
        sums, verify_failed = _run_backward(session, by_id, losses, verify)
    finally:
        for h in handles:
            h.remove()
        for h in session.tensor_hooks:
            h.remove()
        session.tensor_hooks.clear()
        session.calls.clear()
        for p, g in saved_grads:
            p.grad = g

    if report is not None:
        live = [st for st in by_id.values() if st.graph_uses > 0]
        report["hooked"] = [nm for st in live if st.fallback is None for nm in st.names]
        report["fallback"] = {
            nm: st.fallback for st in live if st.fallback is not None for nm in st.names
        }
        report["unused"] = [nm for st in by_id.values() if st.graph_uses == 0 for nm in st.names]
        report["verify_failed"] = verify_failed
    out = {name: sums[name] for name, _ in targets}
    return out, n, losses.detach()


def _run_backward(
    session: _Session, by_id: dict[int, _Param], losses: torch.Tensor, verify: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    n = session.n
    calls = session.calls
    nodes = {c.edge.node for c in calls}
    below, uses = _analyse_graph(losses.grad_fn, nodes)
    for st in by_id.values():
        st.graph_uses = uses.get(id(st.param), 0)

    # keep the calls that reach the losses and whose inputs carry the samples along dim 0
    live: list[_Call] = []
    for c in calls:
        if c.edge.node not in below:
            continue
        assert c.act is not None
        ok = c.act.ndim >= (1 if c.kind == "embedding" else 2) and len(c.out_shape) >= 1
        ok = ok and c.act.shape[0] == n and c.out_shape[0] == n
        if not ok:
            for st in c.roles.values():
                if st.fallback is None:
                    st.fallback = (
                        f"{type(c.module).__name__} input of shape {tuple(c.act.shape)} does not "
                        f"have the {n} samples along dimension 0"
                    )
        live.append(c)
    for c in live:
        for st in c.roles.values():
            st.expected += 1
    for st in by_id.values():
        if st.fallback is None and st.graph_uses > st.expected:
            st.fallback = (
                f"used {st.graph_uses} times in the autograd graph but only {st.expected} "
                f"times through supported modules (used directly in some forward?)"
            )
    for c in calls:
        c.roles = {r: st for r, st in c.roles.items() if st.fallback is None}
    active = [c for c in live if c.roles]
    active_ids = {id(c) for c in active}
    for c in calls:
        if id(c) in active_ids:
            c.refs = len(c.roles)
        else:
            c.act = None  # not needed any more
    session.calls = active

    hooked = [st for st in by_id.values() if st.fallback is None and st.expected > 0]
    fallback = [st for st in by_id.values() if st.fallback is not None and st.graph_uses > 0]
    if verify and hooked:
        gen = torch.Generator().manual_seed(0x5EED)
        session.r = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(losses.device)
    retain = bool(fallback) or session.r is not None

    # ask autograd only for the outputs of the first hooked calls: every other hooked call lies
    # on a path to one of them, and no batched parameter gradient gets computed
    active_nodes = {c.edge.node for c in active}
    below_active, _ = _analyse_graph(losses.grad_fn, active_nodes) if active else ({}, {})
    cover = [c for c in active if not below_active[c.edge.node]]
    if cover:
        grads = torch.autograd.grad(
            losses,
            [c.edge for c in cover],
            grad_outputs=torch.ones_like(losses),
            retain_graph=retain,
            allow_unused=True,
        )
        for c, g in zip(cover, grads, strict=True):
            if not c.done and g is not None:
                session.on_grad(c, g)
        del grads
    session.finish_pending()
    for h in session.tensor_hooks:
        h.remove()
    session.tensor_hooks.clear()

    verify_failed: list[str] = []
    if session.r is not None:
        r = session.r
        checked = [st for st in hooked if st.wsum is not None]
        if checked:
            true = torch.autograd.grad(
                losses,
                [st.param for st in checked],
                grad_outputs=r.to(losses.dtype),
                retain_graph=True,
                allow_unused=True,
            )
            for st, t in zip(checked, true, strict=True):
                assert st.wsum is not None and st.sq is not None
                t64 = torch.zeros_like(st.wsum) if t is None else t.to(st.wsum.dtype)
                err = float((st.wsum - t64).norm())
                scale = 1.5 * float(st.sq.sum().clamp_min(0).sqrt()) * (n**0.5)
                rtol = 1e-9 if st.dtype == torch.float64 else 1e-3
                if err > rtol * scale + 1e-30:
                    st.fallback = f"verify: per-sample attribution mismatch (error {err:.3g})"
                    st.sq = None
                    fallback.append(st)
                    verify_failed.extend(st.names)

    if fallback:
        _LOG.info(
            "per-sample fallback loop for %d parameter(s): %s",
            len(fallback),
            ", ".join(f"{st.names[0]} ({st.fallback})" for st in fallback),
        )
        plist = [st.param for st in fallback]
        accs = [
            torch.zeros(st.param.shape, dtype=st.dtype, device=st.param.device) for st in fallback
        ]
        for i in range(n):
            gs = torch.autograd.grad(losses[i], plist, retain_graph=True, allow_unused=True)
            for acc, g in zip(accs, gs, strict=True):
                if g is not None:
                    g = g.to_dense() if g.is_sparse else g
                    acc.add_(g.to(acc.dtype).square())
        for st, acc in zip(fallback, accs, strict=True):
            st.sq = acc

    out: dict[str, torch.Tensor] = {}
    for st in by_id.values():
        res = st.sq
        if res is None:
            res = torch.zeros(st.param.shape, dtype=st.dtype, device=st.param.device)
        for i, nm in enumerate(st.names):
            out[nm] = res if i == 0 else res.clone()
    return out, verify_failed
