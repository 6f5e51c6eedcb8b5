"""Dropout rates held in tensors, so a compiled model's rates change without recompiling.

``torch.compile`` guards on every Python float a traced forward reads: ``nn.Dropout.p``, a float
attribute like Llama's ``attention_dropout``, and the ``dropout=`` float an attention module hands
to its kernel. A :class:`~adapters.torch.schedule.Scheduler` that changed those floats each step
made every step a recompile. :func:`tensorize` (called by the scheduler) moves every scheduled
rate into a tensor the compiled graph reads as data:

* ``nn.Dropout`` on hidden states becomes a :class:`GuidedDropout` with one rate (a buffer);
* attention-probability dropout (a dropout module the kernel reads through ``.p``, or a float
  attribute) keeps its rate in a :class:`GuidedDropout` / a ``gd_attention_rate`` buffer, and a
  transformers model's attention implementation becomes :data:`PREFIX` + the original
  (``gd_sdpa``, ``gd_eager``): the same kernel in eval mode or at rate 0, and in training the
  eager computation with the tensor rate. While dynamo traces, ``.p`` and the attribute read as
  a fixed float (the kernel ignores it), so nothing the graph guards on changes.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))
    >>> swapped = tensorize_module(net, "1", net[1])
    >>> type(net[1]).__name__, round(net[1].p, 6)
    ('GuidedDropout', 0.2)
"""

from __future__ import annotations

import inspect
from typing import Any

from gd_core.errors import ArgumentError

from .layer import GuidedDropout, torch, tracing

nn = torch.nn
PREFIX = "gd_"
RATE_BUFFER = "gd_attention_rate"
CHILD_KEY = "_gd_attention_child"
_SUPPORTED = ("sdpa", "eager")
_registered: set[str] = set()


def tensorize_module(parent: Any, attr: str, mod: Any) -> Any:
    """Replace ``parent.<attr>`` (an ``nn.Dropout``) by a one-rate :class:`GuidedDropout` whose
    rate is a tensor (not saved in the state dict: the model's keys stay as they were)."""
    if isinstance(mod, GuidedDropout):
        return mod
    gd = GuidedDropout(float(mod.p), inplace=bool(getattr(mod, "inplace", False)), persistent=False)
    gd.to(_device_of(parent))
    gd.train(mod.training)
    setattr(parent, attr, gd)
    return gd


def _device_of(mod: Any) -> Any:
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return torch.device("cpu")


def reads_kernel(attention: Any) -> bool:
    """Whether a module hands its attention to transformers' kernel table (the kernels
    :func:`use_guided_attention` can replace)."""
    code = getattr(inspect.unwrap(type(attention).forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def mark_attention_child(attention: Any, attr: str) -> None:
    """Tell the guided attention kernel that ``attention.<attr>`` holds its dropout rate."""
    attention.__dict__[CHILD_KEY] = attr
    getattr(attention, attr).tensor_kernel = True


def tensorize_attribute(owner: Any, attr: str) -> None:
    """Hold a float rate attribute (``owner.<attr>``) in a buffer: reading the attribute gives
    the buffer's value (a fixed float while dynamo traces), setting it writes the buffer."""
    if isinstance(type(owner).__dict__.get(attr), property):
        return
    value = float(getattr(owner, attr))
    rate = torch.tensor(value, dtype=torch.float32, device=_device_of(owner))
    owner.register_buffer(RATE_BUFFER, rate, persistent=False)
    owner.__dict__["_gd_traced_rate"] = value
    base = type(owner)

    def get(self: Any) -> float:
        if torch.compiler.is_compiling():
            return self.__dict__["_gd_traced_rate"]
        return float(getattr(self, RATE_BUFFER))

    def put(self: Any, v: float) -> None:
        with torch.no_grad():
            getattr(self, RATE_BUFFER).fill_(float(v))
        self.__dict__[attr] = float(v)  # what ``vars`` shows (site discovery reads it)

    owner.__class__ = type(
        base.__name__, (base,), {attr: property(get, put), "__module__": base.__module__}
    )


def use_guided_attention(model: Any) -> str | None:
    """Switch the attention of a transformers model (or of each one a wrapper holds) to the
    tensor-rate kernel; returns a note when it cannot (an implementation other than sdpa/eager,
    or no transformers model), else None."""
    from .dataflow import wrapped_models

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    targets = [model] if isinstance(impl, str) else [m for _, m in wrapped_models(model)]
    if not targets:
        return (
            f"attention dropout: {type(model).__name__} holds no transformers model whose "
            "attention kernel could read a tensor rate; a compiled model recompiles when the "
            "schedule changes it"
        )
    for target in targets:
        impl = getattr(getattr(target, "config", None), "_attn_implementation", None)
        if not isinstance(impl, str) or impl.startswith(PREFIX):
            continue
        if impl not in _SUPPORTED:
            return (
                f"attention dropout: the {impl!r} attention implementation reads its rate as a "
                "Python float, so a compiled model recompiles when the schedule changes it; use "
                "attn_implementation='sdpa' or 'eager' to keep it in a tensor"
            )
    for target in targets:
        impl = target.config._attn_implementation
        if impl.startswith(PREFIX):
            continue
        name = _register(impl)
        try:
            target.set_attn_implementation(name)
        except (AttributeError, ValueError, KeyError):
            for mod in target.modules():
                cfg = getattr(mod, "config", None)
                if getattr(cfg, "_attn_implementation", None) == impl:
                    cfg._attn_implementation = name
    return None


def _register(impl: str) -> str:
    name = PREFIX + impl
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = None if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]  # eager: _eager

    def kernel(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
               dropout: float = 0.0, scaling: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        rate = attention_rate(module) if module.training else None
        if impl == "eager":  # eager stays eager (attention weights returned, any rate)
            p = float(dropout) if module.training else 0.0
            return _eager(module, query, key, value, attention_mask, rate, scaling, kwargs, p)
        if rate is None:
            return original(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kwargs)  # fmt: skip
        return _eager(module, query, key, value, attention_mask, rate, scaling, kwargs, 0.0)

    AttentionInterface.register(name, kernel)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    _registered.add(name)
    return name


def attention_rate(module: Any) -> Any:
    """The tensor holding an attention module's dropout rate, or None."""
    child = module.__dict__.get(CHILD_KEY)
    if child is not None:
        return getattr(module, child).rates
    return module._buffers.get(RATE_BUFFER)


def _eager(module: Any, query: Any, key: Any, value: Any, mask: Any, rate: Any, scaling: Any,
           kwargs: dict[str, Any], dropout: float) -> Any:  # fmt: skip
    """Attention with dropout at a tensor rate (the eager computation transformers uses); with
    no tensor rate, at the float ``dropout`` (0: none)."""
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ArgumentError(
                f"attention of {type(module).__name__}: expected no {unsupported!r} (the guided "
                f"attention kernel does not implement it), received one; fix: load the model "
                "with attn_implementation='eager' before apply, or apply without a schedule"
            )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        mask = mask[..., :k_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    else:
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = q_len > 1 and getattr(module, "is_causal", False)
        if causal:
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(
                k_len - q_len
            )
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if rate is not None and tracing[0]:  # seen by the dataflow trace as a dropout call
        rate, dropout = None, float(rate)
    if rate is not None:
        rate = rate.to(device=weights.device, dtype=torch.float32)
        kept = torch.rand(weights.shape, device=weights.device) >= rate
        weights = weights * kept / (1.0 - rate)
    elif dropout > 0.0:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    weights = weights.to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights
