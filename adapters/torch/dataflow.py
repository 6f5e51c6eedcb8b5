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

from .layer import tracing

_SDPA = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
_DROPOUTS = {
    f
    for f in (
        torch.nn.functional.dropout,
        torch.nn.functional.dropout1d,
        torch.nn.functional.dropout2d,
        torch.nn.functional.dropout3d,
        torch.nn.functional.alpha_dropout,
        torch.nn.functional.feature_alpha_dropout,
        getattr(torch, "dropout", None),
        getattr(torch, "alpha_dropout", None),
        getattr(torch, "feature_dropout", None),
        getattr(torch, "feature_alpha_dropout", None),
        getattr(torch.Tensor, "dropout", None),
    )
    if f is not None
}


_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})

# distinct rates given to every candidate rate holder during the trace: a dropout call's rate
# names the holder it was read from (a module's ``.p``, a rate attribute, a config field)
_SENTINEL_BASE = 0.0123
_SENTINEL_STEP = 2.0**-22


def _writes_into(func: Any, args: Any) -> bool:
    """An in-place write that returns nothing (``t[idx] = value``, RWKV's and Longformer's
    outputs filled piece by piece): the written tensor depends on what was written."""
    name = getattr(func, "__name__", "")
    return name == "__setitem__" and bool(args) and torch.is_tensor(args[0])


def _rate_arg(func: Any, args: Any, kwargs: Any) -> Any:
    """The rate a dropout function or an attention kernel was called with (None: unknown)."""
    if func is _SDPA:
        return kwargs.get("dropout_p", args[4] if len(args) > 4 else None)
    if "p" in kwargs:
        return kwargs["p"]
    return args[1] if len(args) > 1 else None


class _Recorder(TorchFunctionMode):
    def __init__(
        self,
        pname: Mapping[int, str],
        rates: Mapping[float, str],
        module_site: Callable[[str, Any], str | None],
        is_norm: Callable[[Any], bool],
    ) -> None:
        super().__init__()
        self.pname = pname
        self.rates = rates
        self.module_site = module_site
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

    def holder(self, func: Any, args: Any, kwargs: Any) -> str | None:
        rate = _rate_arg(func, args, kwargs)
        if isinstance(rate, torch.Tensor) and rate.numel() == 1:
            rate = rate.item()
        if not isinstance(rate, float):
            return None
        found = self.rates.get(rate)
        if found is None:  # a rate held in a float32 tensor (a scheduled attention rate)
            k = round((rate - _SENTINEL_BASE) / _SENTINEL_STEP)
            key = _SENTINEL_BASE + k * _SENTINEL_STEP
            if abs(rate - key) < _SENTINEL_STEP / 4:
                found = self.rates.get(key)
        return found

    # -- functions ---------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.leaf_depth:
            return func(*args, **kwargs)
        if func is _F.multi_head_attention_forward:
            return self._inside(func, args, kwargs)
        out = func(*args, **kwargs)  # the mode is off inside its handler: nested calls unseen
        data, params = self.split((args, kwargs))
        site = self.holder(func, args, kwargs) if func in _DROPOUTS or func is _SDPA else None
        outs = self.outs(out)
        if not outs and _writes_into(func, args):  # t[i] = v: a new version of t reads v too
            outs = [self.new(args[0])]
        if not outs:
            return out
        if site is not None and func in _DROPOUTS and data:
            self.seen_sites.add(site)
            self.ops.append(Op(site, data[:1], outs, site=True))
        elif site is not None and func is _SDPA and len(data) >= 3:
            # the kernel's dropout acts on its attention probabilities: scores -> site -> @ V
            self.seen_sites.add(site)
            self.counter += 1
            q, k, v = data[:3]
            s, sd = f"{site}#scores{self.counter}", f"{site}#dropped{self.counter}"
            self.ops.append(Op(self.here("scores"), (q, k, *data[3:]), (s,), softmax=True))
            self.ops.append(Op(site, (s,), (sd,), site=True))
            self.ops.append(Op(self.here("context"), (sd, v), tuple(outs)))
        else:
            name = getattr(func, "__name__", "op")
            self.ops.append(
                Op(
                    self.here(name),
                    data,
                    outs,
                    params,
                    add=name in _ADDS,
                    softmax="softmax" in name,
                )
            )
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
        site_of = self.module_site(path, mod)
        ins = [a for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a)]
        if len(ins) == 1 and out is ins[0] and site_of is None:
            return  # an identity (a ResNet shortcut): no computation, the tensor passes through
        data, direct = self.split((args, kwargs))  # parameters passed in are read here too
        params = [self.pname[id(p)] for p in mod.parameters() if id(p) in self.pname]
        params += [p for p in direct if p not in params]
        site = site_of
        outs = self.outs(out)
        if site is not None:
            self.seen_sites.add(site)
        self.ops.append(
            Op(
                site or path,
                data,
                outs,
                () if site else params,
                site=site is not None,
                norm=self.is_norm(mod),
                softmax=isinstance(mod, (nn.Softmax, nn.LogSoftmax)),
            )
        )
        self._first_out(path, out)


def _unleak(root: nn.Module, rates: Mapping[float, str], old: Mapping[str, Any]) -> None:
    """Modules the forward built (BigBird switching its attention type on short inputs) copied a
    sentinel rate from a holder: give them the holder's real rate."""
    for mod in root.modules():
        for attr, value in list(vars(mod).items()):
            if isinstance(value, float) and value in rates and rates[value] in old:
                setattr(mod, attr, old[rates[value]])


def sentinel_rates(holders: Sequence[tuple[Any, str, str]]) -> dict[float, str]:
    """A distinct rate for each candidate holder ``(object, attribute, holder name)``."""
    return {_SENTINEL_BASE + i * _SENTINEL_STEP: name for i, (_, _, name) in enumerate(holders)}


def _opaque_leaf(mod: nn.Module) -> bool:
    """Whether a childless module is recorded as one op (its parameters read by it) rather than
    through the functions it calls: a module with parameters, a dropout module or a softmax (the
    tracer adds holders and norms). A parameterless helper (a rotary embedding that reads its input only for the dtype and
    device) is seen through, so reading a tensor's metadata is not taken for reading its values."""
    return next(iter(mod.parameters(recurse=False)), None) is not None or isinstance(
        mod, (nn.Softmax, nn.LogSoftmax, nn.modules.dropout._DropoutNd)
    )


def trace(
    root: nn.Module,
    example: Any,
    *,
    holders: Sequence[tuple[Any, str, str]] = (),
    module_site: Callable[[str, Any], str | None],
    is_norm: Callable[[Any], bool],
    entry: nn.Module | None = None,
) -> tuple[list[Op], set[str], dict[str, str], dict[str, str]]:
    """Ops of one forward of ``root`` on ``example`` (a dict of keyword inputs, a tuple of
    positional inputs or one tensor), the holder names the forward reached, and for tensors that a
    module returned, that module's path (the outermost one), and the reverse.

    ``holders``: candidate rate holders ``(object, attribute, name)`` (a dropout module's ``p``, a
    rate attribute, a config field). During the forward each holds a distinct sentinel rate, so
    every dropout call (``F.dropout`` and variants, ``torch.dropout``, an attention kernel's
    ``dropout_p``) names the holder its rate was read from; all rates are restored afterwards.
    ``module_site(path, module)``: the holder a leaf module call is (a dropout module), or None.
    ``entry``: the module of ``root`` whose forward is called (a wrapper's transformers model,
    see :func:`wrapped_models`); paths stay ``root``'s.
    """
    call = root if entry is None else entry
    pname = {id(p): n for n, p in root.named_parameters()}
    rates = sentinel_rates(holders)
    rec = _Recorder(pname, rates, module_site, is_norm)
    handles = []
    for path, mod in root.named_modules():
        leaf = next(iter(mod.children()), None) is None and bool(path)
        leaf = leaf and (_opaque_leaf(mod) or module_site(path, mod) is not None or is_norm(mod))
        handles.append(mod.register_forward_pre_hook(lambda m, a, p=path, lf=leaf: rec.pre(p, lf)))
        handles.append(
            mod.register_forward_hook(
                lambda m, a, k, o, p=path, lf=leaf: rec.post(p, m, lf, a, k, o), with_kwargs=True
            )
        )
    was = root.training
    # the forward leaves no trace in the model or the program: buffers (BatchNorm statistics,
    # counters) and rates are restored and the random streams (dropout draws) are forked
    saved = [(b, b.detach().clone()) for b in root.buffers()]
    old_rates = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in holders]
    cuda = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    root.train()
    tracing[0] += 1
    try:
        for (obj, attr, _), rate in zip(holders, rates, strict=True):
            setattr(obj, attr, rate)
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), rec:
            if isinstance(example, Mapping):
                call(**example)
            elif isinstance(example, Sequence) and not torch.is_tensor(example):
                call(*example)
            else:
                call(example)
    finally:
        tracing[0] -= 1
        for obj, attr, value in old_rates:
            setattr(obj, attr, value)
        _unleak(
            root,
            rates,
            {name: value for (_, _, name), (_, _, value) in zip(holders, old_rates, strict=True)},
        )
        for h in handles:
            h.remove()
        root.train(was)
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    return rec.ops, rec.seen_sites, rec.module_out, rec.path_out


def _ids(config: Any, vocab: int, gen: Any) -> Any:
    """Token ids (2, 8) avoiding special tokens, each row ending in the eos token if there is one
    (classification heads that pool at ``<eos>``, e.g. BART's, need one per row)."""
    special: set[int] = set()
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, k, None)  # an id, None, or a list of ids (GLM: several eos)
        values = value if isinstance(value, (list, tuple)) else [value]
        special.update(v for v in values if isinstance(v, int))
    pool = [i for i in range(min(vocab, 32)) if i not in special] or [0]
    pick = torch.randint(0, len(pool), (2, 8), generator=gen)
    ids = torch.tensor(pool)[pick]
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[:, -1] = eos
    return ids


def _size(value: Any, default: int) -> int:
    if isinstance(value, (list, tuple)) and value:
        value = value[-1]
    return int(value) if isinstance(value, int) and value > 0 else default


def _from_config(root: nn.Module, gen: Any) -> dict[str, Any] | None:
    """A guessed input from a transformers model's own facts: ``main_input_name`` (token ids,
    pixel values of the configured size and channels, raw audio, audio features) and decoder
    inputs for an encoder-decoder."""
    config = getattr(root, "config", None)
    name = getattr(root, "main_input_name", None)
    if config is None or not isinstance(name, str):
        return None
    dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        emb = next((m for m in root.modules() if isinstance(m, nn.Embedding)), None)
        vocab = emb.num_embeddings if emb is not None else 16
    example: dict[str, Any] = {}
    if name == "input_ids":
        example[name] = _ids(config, vocab, gen)
    elif name == "pixel_values":
        size = _size(getattr(config, "image_size", None), 32)
        chans = _size(getattr(config, "num_channels", None), 3)
        example[name] = torch.randn(2, chans, size, size, generator=gen).to(dtype)
    elif name == "input_values" and isinstance(getattr(config, "num_mel_bins", None), int):
        frames = _size(getattr(config, "max_length", None), 32)  # a spectrogram (AST)
        example[name] = torch.randn(2, frames, config.num_mel_bins, generator=gen).to(dtype)
    elif name == "input_values":  # raw audio: long enough for the feature encoder and masking
        example[name] = torch.randn(2, 8000, generator=gen).to(dtype)
    elif name == "input_features":
        mels = getattr(config, "num_mel_bins", None)
        if isinstance(mels, int):
            frames = 2 * _size(getattr(config, "max_source_positions", None), 32)
            example[name] = torch.randn(2, mels, frames, generator=gen).to(dtype)
        else:
            feats = _size(getattr(config, "input_feat_per_channel", None), 80)
            feats *= _size(getattr(config, "input_channels", None), 1)
            example[name] = torch.randn(2, 32, feats, generator=gen).to(dtype)
    else:
        return None
    if getattr(config, "is_encoder_decoder", False):
        example["decoder_input_ids"] = _ids(config, vocab, gen)
    return example


def example_input(root: nn.Module) -> Any:
    """A small input for one forward when the caller gave none: for a transformers model, what
    its ``main_input_name`` asks for (see :func:`_from_config`); else ``input_ids`` for models
    with a first ``nn.Embedding``, a float batch (of the layer's dtype) for a first ``nn.Linear``;
    ``None`` when unknown."""
    gen = torch.Generator().manual_seed(0)  # the same input every time; the global stream untouched
    guess = _from_config(root, gen)
    if guess is not None:
        return guess
    first = next((m for m in root.modules() if isinstance(m, (nn.Embedding, nn.Linear))), None)
    if isinstance(first, nn.Embedding):
        ids = torch.randint(0, min(first.num_embeddings, 8), (2, 6), generator=gen)
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
