"""Invariant (c) of the zoo sweep: every parameter of the repeated blocks is guarded by a site or
listed in ``sites(model).unguarded`` with a reason, never both, never neither, and the reason
agrees with facts measured here independently of the library's trace.

The facts come from one training forward (with autograd) of the model *after* ``apply`` (so that
inserted hook sites are real dropout calls too), observed by a ``TorchFunctionMode`` of its own:

- **dropout calls**: ``F.dropout`` and its variants, ``scaled_dot_product_attention`` with a
  ``dropout_p`` above 0 (it drops the probabilities computed from q and k), ``multi_head_attention_forward`` likewise (its projections run inside,
  so it counts for the upstream fact only), and :class:`adapters.torch.GuidedDropout` modules; each call's p names
  the site that set it (``apply`` gave every site a distinct p);
- **read**: parameters with an autograd path to the model's outputs or to a dropout call's input;
- **upstream**: parameters with an autograd path to a dropout call's input;
- **dropped directly**: the parameters of the computation whose output a dropout call receives,
  through one-input, parameter-free functions only (reshapes, casts, activations, scaling).

Repeated blocks: children of a ``ModuleList`` of 2+ same-type blocks, and (ALBERT's shared layer)
modules with children and parameters called 2+ times in the forward.

The checks (each a sound consequence of what the reason says):

- a parameter in no site must have a non-empty reason of a known kind; one in a site must have
  none;
- ``not read`` -> no autograd path to any output or dropout input;
- ``not upstream of any dropout`` -> no autograd path to any dropout call's input;
- ``no dropout acts on its own output`` -> no dropout call drops it directly;
- a parameter a dropout call drops directly is guarded by a site (not necessarily the one whose
  p that call ran at: the norm after a post-norm block's residual add is its own block's site's,
  by the rule of :mod:`gd_core.dataflow`, even when a head's dropout reads that norm's output).
"""

from __future__ import annotations

from typing import Any

REASONS = (
    "not read",
    "not upstream of any dropout",
    "no dropout acts on its own output",
    "upstream of a dropout, but the mapping= given",
    "unknown: no traced forward",
)


def _few(items: Any, n: int = 3) -> str:
    items = list(items)
    more = len(items) - n
    return ", ".join(str(x) for x in items[:n]) + (f" (+{more} more)" if more > 0 else "")


class _Facts:
    """What one training forward with autograd shows (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.pname = {id(p): n for n, p in model.named_parameters()}
        self.drop_inputs: list[Any] = []  # tensors a dropout call received
        self.direct: dict[str, set[float]] = {}  # parameter -> p of the calls dropping it directly
        self.calls: dict[str, int] = {}  # module path -> calls (modules with children and params)
        self._made: dict[int, tuple[Any, ...]] = {}  # tensor id -> (params, data input ids) | ()
        self._param_like: dict[int, list[str]] = {}  # tensors computed from parameters only
        self._keep: list[Any] = []

    # one-input, parameter-free chains back from a dropped tensor
    def producers(self, t: Any) -> list[str]:
        seen = 0
        key = id(t)
        while key in self._made and seen < 64:
            seen += 1
            made = self._made[key]
            if not made:
                return []  # a join of several data tensors: the rule decides, nothing to check
            params, data = made
            if params:
                return list(params)
            if len(data) != 1:
                return []
            key = data[0]
        return []

    def record(self, args: Any, kwargs: Any, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        params: list[str] = []
        data: list[int] = []
        for a in tree_flatten((args, kwargs))[0]:
            if not torch.is_tensor(a):
                continue
            if id(a) in self.pname:
                params.append(self.pname[id(a)])
            elif id(a) in self._param_like:
                params += self._param_like[id(a)]
            else:
                data.append(id(a))
        outs = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
        for t in outs:
            self._keep.append(t)
            if not data and params:
                self._param_like[id(t)] = params
                continue
            if id(t) in data:  # in place
                if len(data) > 1 or params:
                    self._made[id(t)] = ()
                continue
            self._made[id(t)] = (tuple(params), tuple(data)) if len(data) <= 1 else ()

    def dropped(self, t: Any, p: float) -> None:
        self.drop_inputs.append(t)
        for name in self.producers(t):
            self.direct.setdefault(name, set()).add(round(float(p), 6))


def measure(model: Any, batch: Any) -> tuple[_Facts, set[str], set[str]]:
    """(facts, parameters read, parameters upstream of a dropout) of one training forward."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    import adapters.torch as gdt

    facts = _Facts(model)
    drops = {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        *(getattr(torch, n) for n in ("dropout", "alpha_dropout", "feature_dropout")),
    }
    sdpa = F.scaled_dot_product_attention

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            kwargs = kwargs or {}
            if func in drops and args and torch.is_tensor(args[0]):
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                train = kwargs.get("training", kwargs.get("train", True))
                train = args[2] if len(args) > 2 and isinstance(args[2], bool) else train
                if train and float(p) > 0:
                    facts.dropped(args[0], float(p))
            elif func is sdpa:
                p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
                if float(p) > 0:
                    # it drops softmax(q k^T): q and k are upstream of it, v is not
                    for t in list(args[:2]) + [kwargs[k] for k in ("query", "key") if k in kwargs]:
                        if torch.is_tensor(t):
                            facts.dropped(t, float(p))
            elif func is F.multi_head_attention_forward:
                p = kwargs.get("dropout_p", args[10] if len(args) > 10 else 0.0)
                if float(p) > 0:  # its projections run inside: upstream facts only
                    facts.drop_inputs += [t for t in args[:3] if torch.is_tensor(t)]
            out = func(*args, **kwargs)
            facts.record(args, kwargs, out)
            return out

    hooks = []
    for path, mod in model.named_modules():
        if isinstance(mod, gdt.GuidedDropout):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, a: facts.dropped(a[0], float(m.p)) if m.training else None
                )
            )
        elif next(iter(mod.children()), None) is not None and any(True for _ in mod.parameters()):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, a, p=path: facts.calls.__setitem__(p, facts.calls.get(p, 0) + 1)
                )
            )
    model.train()
    torch.manual_seed(0)
    try:
        with torch.enable_grad(), Mode():
            out = model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    outputs = [t for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    drops_in = [t for t in facts.drop_inputs if t.requires_grad]
    return facts, _connected(drops_in + outputs, named), _connected(drops_in, named)


def _connected(tensors: list[Any], named: list[tuple[str, Any]]) -> set[str]:
    """Parameters with an autograd path to any of ``tensors``."""
    import torch

    if not tensors or not named:
        return set()
    total = sum(t.float().sum() for t in tensors)
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None}


def repeated_params(model: Any, calls: dict[str, int]) -> list[str]:
    """Canonical names of the parameters of repeated blocks (see the module docstring)."""
    import torch

    pname = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    blocks = [
        c
        for m in modules.values()
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1
        for c in m
    ]
    blocks += [modules[p] for p, n in calls.items() if n >= 2 and p]
    out: dict[str, None] = {}
    for block in blocks:
        for p in block.parameters():
            if id(p) in pname:
                out[pname[id(p)]] = None
    return list(out)


def check(applied: Any, batch: Any, site_list: Any) -> tuple[str, str]:
    """Invariant (c)'s ``(status, reason)`` for ``site_list`` (found on the model before
    ``apply``) and ``applied`` (that model after ``apply``)."""
    try:
        facts, read, upstream = measure(applied, batch)
    except Exception as exc:  # noqa: BLE001 - the model's own forward with autograd
        return ("fail", f"training forward with autograd failed: {type(exc).__name__}: {exc}")
    repeated = repeated_params(applied, facts.calls)
    if not repeated:
        return (
            "pass",
            "no repeated blocks (ModuleList of 2+ same-type blocks, or a block called 2+ times)",
        )
    by_site = {s.name: set(s.params) for s in site_list}
    guarded = set().union(*by_site.values()) if by_site else set()
    unguarded = dict(getattr(site_list, "unguarded", {}) or {})
    bad: dict[str, list[str]] = {}

    def flag(kind: str, name: str) -> None:
        bad.setdefault(kind, []).append(name)

    for name in repeated:
        reason = unguarded.get(name)
        if name in guarded and reason is not None:
            flag("guarded and listed unguarded", name)
        elif name not in guarded and not reason:
            flag("neither guarded nor listed with a reason", name)
        elif reason is not None and not reason.startswith(REASONS):
            flag("listed with a reason of no known kind", name)
        elif reason is not None and reason.startswith("not read") and name in read:
            flag("said not read, yet the outputs depend on it", name)
        elif reason is not None and reason.startswith("not upstream") and name in upstream:
            flag("said upstream of no dropout, yet a dropout call's input depends on it", name)
        elif reason is not None and reason.startswith("no dropout acts") and name in facts.direct:
            flag("said no dropout acts on its output, yet a dropout call drops it directly", name)
        if name in facts.direct and name not in guarded:
            flag("dropped directly by a dropout call, guarded by no site", name)
    if bad:
        return (
            "fail",
            "; ".join(f"{len(v)} {k}: {_few(v)}" for k, v in bad.items())
            + f" (of {len(repeated)} repeated-block parameters)",
        )
    return ("pass", f"{len(repeated)} repeated-block parameters, each guarded or listed")
