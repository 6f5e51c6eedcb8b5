"""Dataflow facts of a torch model for :mod:`gd_core.dataflow`, from one traced forward.

One forward pass in training mode under a ``TorchFunctionMode`` and module hooks records every
leaf module call (one op, owning the module's parameters) and every torch function called outside
leaf modules (``+``, ``matmul``, reshapes, ``F.linear`` inside ``nn.MultiheadAttention``...), with
the tensors each reads and writes. Functional dropout and ``scaled_dot_product_attention`` inside a
module that owns an attention-rate site become that site (attention is split into
``scores -> site -> join with V``). The core then decides what every site guards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as _F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gd_core.dataflow import Op

_SDPA = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
_DROPOUTS = {
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
}


_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


class _Recorder(TorchFunctionMode):
    def __init__(
        self,
        pname: Mapping[int, str],
        functional_site: Callable[[str], str | None],
        is_site: Callable[[str, Any], bool],
        is_norm: Callable[[Any], bool],
    ) -> None:
        super().__init__()
        self.pname = pname
        self.functional_site = functional_site
        self.is_site = is_site
        self.is_norm = is_norm
        self.ops: list[Op] = []
        self.version: dict[int, int] = {}
        self.keep: list[Any] = []  # tensors stay alive so their ids are not reused
        self.stack: list[str] = []  # module paths being executed
        self.leaf_depth = 0
        self.counter = 0
        self.seen_sites: set[str] = set()
        self.module_out: dict[str, str] = {}  # tensor id -> path of the module that returned it
        self.path_out: dict[str, str] = {}  # module path -> id of the tensor it returned first

    # -- tensor ids --------------------------------------------------------------------------
    def tid(self, t: Any) -> str:
        return f"{id(t)}:{self.version.get(id(t), 0)}"

    def new(self, t: Any) -> str:
        self.keep.append(t)
        key = id(t)
        self.version[key] = self.version.get(key, -1) + 1
        return f"{key}:{self.version[key]}"

    def split(self, args: Any) -> tuple[list[str], list[str]]:
        data, params = [], []
        for a in tree_flatten(args)[0]:
            if not torch.is_tensor(a):
                continue
            name = self.pname.get(id(a))
            if name is not None:
                params.append(name)
            else:
                data.append(self.tid(a))
        return data, params

    def outs(self, out: Any) -> list[str]:
        return [self.new(t) for t in tree_flatten(out)[0] if torch.is_tensor(t)]

    def here(self, what: str) -> str:
        self.counter += 1
        base = self.stack[-1] if self.stack else ""
        return f"{base}.{what}#{self.counter}" if base else f"{what}#{self.counter}"

    # -- functions ---------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.leaf_depth:
            return func(*args, **kwargs)
        if func is _F.multi_head_attention_forward:
            return self._inside(func, args, kwargs)
        out = func(*args, **kwargs)  # the mode is off inside its handler: nested calls unseen
        data, params = self.split((args, kwargs))
        site = self.functional_site(self.stack[-1] if self.stack else "")
        outs = self.outs(out)
        if not outs:
            return out
        if site is not None and func in _DROPOUTS and site not in self.seen_sites:
            self.seen_sites.add(site)
            self.ops.append(Op(site, data[:1], outs, site=True))
        elif site is not None and func is _SDPA and len(data) >= 3 and site not in self.seen_sites:
            self.seen_sites.add(site)
            q, k, v = data[:3]
            s, sd = f"{site}#scores", f"{site}#dropped"
            self.ops.append(Op(self.here("scores"), (q, k, *data[3:]), (s,)))
            self.ops.append(Op(site, (s,), (sd,), site=True))
            self.ops.append(Op(self.here("context"), (sd, v), tuple(outs)))
        else:
            name = getattr(func, "__name__", "op")
            self.ops.append(Op(self.here(name), data, outs, params, add=name in _ADDS))
        return out

    def _inside(self, func: Any, args: Any, kwargs: Any) -> Any:
        """Run a Python-level composite (``F.multi_head_attention_forward``) with its parts
        recorded: its own ``has_torch_function`` check is switched off so it does not dispatch
        back here, while the functions it calls still do."""
        orig = _F.has_torch_function
        _F.has_torch_function = lambda *a: False  # type: ignore[assignment]
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            _F.has_torch_function = orig  # type: ignore[assignment]

    # -- modules -----------------------------------------------------------------------------
    def pre(self, path: str, leaf: bool) -> None:
        self.stack.append(path)
        if leaf:
            self.leaf_depth += 1

    def _first_out(self, path: str, out: Any) -> None:
        first = next((t for t in tree_flatten(out)[0] if torch.is_tensor(t)), None)
        if first is not None and path:
            self.module_out[self.tid(first)] = path  # the outermost module wins (hooks run last)
            self.path_out.setdefault(path, self.tid(first))

    def post(self, path: str, mod: Any, leaf: bool, args: Any, kwargs: Any, out: Any) -> None:
        self.stack.pop()
        if not leaf:
            self._first_out(path, out)
            return
        self.leaf_depth -= 1
        if self.leaf_depth:
            return
        data, _ = self.split((args, kwargs))
        params = [self.pname[id(p)] for p in mod.parameters() if id(p) in self.pname]
        site = self.is_site(path, mod)
        outs = self.outs(out)
        if site:
            self.seen_sites.add(path)
        self.ops.append(
            Op(path, data, outs, () if site else params, site=site, norm=self.is_norm(mod))
        )
        self._first_out(path, out)


def trace(
    root: nn.Module,
    example: Any,
    *,
    is_site: Callable[[str, Any], bool],
    functional_site: Callable[[str], str | None],
    is_norm: Callable[[Any], bool],
    entry: nn.Module | None = None,
) -> tuple[list[Op], set[str], dict[str, str], dict[str, str]]:
    """Ops of one forward of ``root`` on ``example`` (a dict of keyword inputs, a tuple of
    positional inputs or one tensor), the site names the forward reached, and for tensors that a
    module returned, that module's path (the outermost one), and the reverse.

    ``is_site(path, module)``: whether a leaf module call is a dropout site;
    ``functional_site(module path)``: the site a functional dropout or an attention with dropout
    inside that module stands for (``None``: not a site); ``entry``: the module of ``root`` whose
    forward is called (a wrapper's transformers model, see :func:`wrapped_model`), paths stay
    ``root``'s.
    """
    call = root if entry is None else entry
    pname = {id(p): n for n, p in root.named_parameters()}
    rec = _Recorder(pname, functional_site, is_site, is_norm)
    handles = []
    for path, mod in root.named_modules():
        leaf = next(iter(mod.children()), None) is None and bool(path)
        handles.append(mod.register_forward_pre_hook(lambda m, a, p=path, lf=leaf: rec.pre(p, lf)))
        handles.append(
            mod.register_forward_hook(
                lambda m, a, k, o, p=path, lf=leaf: rec.post(p, m, lf, a, k, o), with_kwargs=True
            )
        )
    was = root.training
    # the forward leaves no trace in the model or the program: buffers (BatchNorm statistics,
    # counters) are restored and the random streams (dropout draws) are forked
    saved = [(b, b.detach().clone()) for b in root.buffers()]
    cuda = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    root.train()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), rec:
            if isinstance(example, Mapping):
                call(**example)
            elif isinstance(example, Sequence) and not torch.is_tensor(example):
                call(*example)
            else:
                call(example)
    finally:
        for h in handles:
            h.remove()
        root.train(was)
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    return rec.ops, rec.seen_sites, rec.module_out, rec.path_out


def example_input(root: nn.Module) -> Any:
    """A small input for one forward when the caller gave none: ``input_ids`` for models with a
    first ``nn.Embedding``, a float batch (of the layer's dtype) for a first ``nn.Linear``; ``None``
    when unknown."""
    first = next((m for m in root.modules() if isinstance(m, (nn.Embedding, nn.Linear))), None)
    gen = torch.Generator().manual_seed(0)  # the same input every time; the global stream untouched
    if isinstance(first, nn.Embedding):
        ids = torch.randint(0, min(first.num_embeddings, 8), (2, 6), generator=gen)
        config = getattr(root, "config", None)
        if config is not None and hasattr(root, "get_input_embeddings"):
            return {"input_ids": ids}
        return (ids,)
    if isinstance(first, nn.Linear):
        x = torch.randn(2, first.in_features, generator=gen)
        return (x.to(first.weight.dtype if first.weight.is_floating_point() else x.dtype),)
    return None


def is_transformers_model(mod: Any) -> bool:
    """Whether ``mod`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(mod).__mro__)


def wrapped_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers models inside ``root`` (a wrapper: a SentenceTransformer, a
    LightningModule, any module holding one), as ``(path, module)``; ``[]`` when ``root`` is a
    transformers model itself or holds none.

    Example:
        >>> wrapped_models(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    if is_transformers_model(root):
        return []
    out: list[tuple[str, nn.Module]] = []
    for path, mod in root.named_modules():
        if (
            path
            and is_transformers_model(mod)
            and not any(path.startswith(p + ".") for p, _ in out)
        ):
            out.append((path, mod))
    return out
