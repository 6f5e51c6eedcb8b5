"""PyTorch adapter: find dropout sites, estimate the Fisher diagonal, install guided dropout.

A thin translator over :mod:`gd_core`: this module discovers sites natively (dropout modules and
dropout-rate attributes), computes sums of squared per-sample gradients with
:mod:`adapters._torch_persample`, hands the sums to :class:`gd_core.FisherAccumulator`, and sets
the probabilities a :class:`gd_core.SensitivityProfile` implies on the model in place.

Example:
    >>> import torch, adapters.torch as gdt
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))
    >>> [s.name for s in gdt.sites(net)]
    ['1']
    >>> report = gdt.apply(net, {"1": 0.05})
    >>> net[1].p
    0.05
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import (
    Fingerprint,
    FisherAccumulator,
    NonFiniteGradientError,
    ProfileNotFoundError,
    Schedule,
    SensitivityProfile,
    Site,
)
from gd_core import align as _align
from gd_core import cache as _cache
from gd_core.errors import bad_argument, no_sites
from gd_core.fisher import FisherResult
from gd_core.profile import as_profile
from gd_core.report import ApplyReport as _CoreReport
from gd_core.report import ReportRow
from gd_core.sites import site_mapping

from ._lazy import require

torch = require("torch")
nn = torch.nn

from ._torch_persample import CausalLMLoss, ContrastiveLoss, MaskedLMLoss  # noqa: E402

__all__ = [
    "ApplyReport",
    "CausalLMLoss",
    "ContrastiveLoss",
    "FisherResult",
    "GuidedDropout",
    "MaskedLMLoss",
    "Scheduler",
    "apply",
    "estimate_fisher",
    "fingerprint",
    "profile",
    "sites",
]

_DROPOUT_TYPES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_HOOK_CHILD = "gd_dropout"
_QKV_CHILDREN = frozenset(
    {
        "query",
        "key",
        "value",
        "q",
        "k",
        "v",
        "q_proj",
        "k_proj",
        "v_proj",
        "c_attn",
        "qkv",
        "query_key_value",
        "wqkv",
        "in_proj",
    }
)
_HIDDEN_WORDS = frozenset(
    {"resid", "residual", "out", "output", "proj", "hidden", "ffn", "mlp", "embd", "emb", "embed"}
)
_ATTENTION_WORDS = frozenset({"attn", "attention", "att", "probs"})
_LOSS_NAMES = ("mlm", "clm", "contrastive")


# ---------------------------------------------------------------------------------------------
# GuidedDropout
# ---------------------------------------------------------------------------------------------
def _check_rates(rates: Any, name: str = "rates") -> Any:
    t = torch.as_tensor(rates, dtype=torch.float32).detach().reshape(-1).clone()
    if t.numel() == 0:
        raise bad_argument(name, "at least one probability", "an empty sequence", "pass e.g. 0.1")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t >= 1).any()):
        shown = t.tolist() if t.numel() <= 8 else f"values in [{t.min():g}, {t.max():g}]"
        raise bad_argument(name, "probabilities in [0, 1)", shown, "clip them to [0, 1)")
    return t


class GuidedDropout(nn.Module):
    """Inverted dropout with one probability per feature of the last axis.

    ``rates`` is a registered buffer (saved in the state dict); a single rate broadcasts over any
    width. Kept values are scaled by ``1 / (1 - rate)``, so the expected output equals the input;
    in eval mode the module is the identity. ``p`` (the mean rate) keeps code that reads or sets
    ``module.p`` working; setting it makes the rates uniform.

    Example:
        >>> import torch
        >>> drop = GuidedDropout([0.0, 0.5], generator=torch.Generator().manual_seed(0))
        >>> y = drop(torch.ones(1000, 2))
        >>> bool((y[:, 0] == 1).all()), sorted(set(y[:, 1].tolist()))
        (True, [0.0, 2.0])
        >>> drop.p
        0.25
        >>> bool((drop.eval()(torch.ones(3, 2)) == 1).all())
        True
    """

    rates: Any

    def __init__(self, rates: Any = 0.1, generator: Any = None, *, hook: bool = False) -> None:
        super().__init__()
        self.register_buffer("rates", _check_rates(rates))
        self.generator = generator
        self.hook = hook

    @property
    def p(self) -> float:
        """The mean drop probability over units."""
        return float(self.rates.float().mean())

    @p.setter
    def p(self, value: float) -> None:
        value = _check_p(value, "p")
        with torch.no_grad():
            self.rates.fill_(value)

    def set_rates(self, rates: Any) -> None:
        """Replace the per-unit probabilities (same buffer when the size is unchanged)."""
        new = _check_rates(rates).to(self.rates.device)
        with torch.no_grad():
            if new.shape == self.rates.shape:
                self.rates.copy_(new)
            else:
                self.rates = new

    def forward(self, x: Any) -> Any:
        if not self.training:
            return x
        rates = self.rates
        if rates.numel() != 1 and x.shape[-1] != rates.numel():
            raise bad_argument(
                "input of GuidedDropout",
                f"a last axis of {rates.numel()} features (one per rate)",
                f"shape {tuple(x.shape)}",
                "apply the profile with granularity='site', or recompute the profile with "
                "adapters.torch.profile() so the unit counts are measured",
            )
        if self.generator is None:
            u = torch.rand(x.shape, device=x.device, dtype=torch.float32)
        else:
            u = torch.rand(
                x.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32
            ).to(x.device)
        rates = rates.to(device=x.device, dtype=torch.float32)
        scale = (u >= rates).to(torch.float32) / (1.0 - rates)
        return x * scale.to(x.dtype)

    def extra_repr(self) -> str:
        n = self.rates.numel()
        if n == 1:
            return f"p={self.p:.4g}"
        return f"units={n}, p_mean={self.p:.4g}, p_min={float(self.rates.min()):.4g}, p_max={float(self.rates.max()):.4g}"


def _check_p(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 <= float(value) < 1.0:
        raise bad_argument(name, "a dropout probability in [0, 1)", value, "pass e.g. 0.1")
    return float(value)


def _hook_forward(module: Any, args: Any, output: Any) -> Any:
    drop = getattr(module, _HOOK_CHILD, None)
    if drop is None:
        return output
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return (drop(output[0]), *output[1:])
    if torch.is_tensor(output):
        return drop(output)
    return output


# ---------------------------------------------------------------------------------------------
# site discovery
# ---------------------------------------------------------------------------------------------
@dataclass
class _Found:
    site: Site
    owner: Any  # the dropout module; the module holding the attribute; the hook target
    parent: Any  # the module holding the dropout module (None for attributes / hooks)
    attr: str  # child name in parent / attribute name / _HOOK_CHILD
    role: str  # "hidden" or "attention"
    installed: bool = True  # False for hook sites not installed yet


def _unwrap(model: Any) -> Any:
    if not isinstance(model, nn.Module):
        raise bad_argument(
            "model", "a torch.nn.Module", type(model).__name__, "pass the PyTorch model itself"
        )
    seen = 0
    while seen < 4:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model


def _split(path: str) -> tuple[str, str]:
    if "." in path:
        parent, leaf = path.rsplit(".", 1)
        return parent, leaf
    return "", path


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_dropout(mod: Any) -> bool:
    return isinstance(mod, (*_DROPOUT_TYPES, GuidedDropout))


def _is_norm(mod: Any) -> bool:
    if isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    name = type(mod).__name__
    return name.endswith(("LayerNorm", "RMSNorm"))


def _features(mod: Any) -> tuple[int, dict[str, int]] | None:
    """(output feature count, {parameter leaf name: unit axis}) of a guarded module."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, {"weight": 0, "bias": 0}
    if type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "nf", None), int):
        return mod.nf, {"weight": 1, "bias": 0}  # transformers Conv1D: weight is (in, out)
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim, {"weight": 1}
    if _is_norm(mod):
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            return int(w.shape[0]), {"weight": 0, "bias": 0}
    return None


def _is_leaf(mod: Any) -> bool:
    return next(iter(mod.children()), None) is None


def _has_params(mod: Any) -> bool:
    return next(iter(mod.parameters()), None) is not None


class _Index:
    """Name lookups over one model: canonical parameter names (tied weights keep their first)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.modules: dict[str, Any] = dict(root.named_modules())
        self.pname: dict[int, str] = {id(p): n for n, p in root.named_parameters()}
        self.owner: dict[str, tuple[Any, str]] = {}
        for mod in self.modules.values():
            for leaf, p in mod.named_parameters(recurse=False):
                name = self.pname.get(id(p))
                if name is not None and name not in self.owner:
                    self.owner[name] = (mod, leaf)

    def params_of(self, mods: Sequence[Any], recurse: bool = False) -> list[str]:
        out: list[str] = []
        for m in mods:
            for p in m.parameters(recurse=recurse):
                name = self.pname.get(id(p))
                if name is not None and name not in out:
                    out.append(name)
        return out


def _unit_axes(index: _Index, params: Sequence[str], units: int | None) -> dict[str, int]:
    if units is None:
        return {}
    axes = {}
    for name in params:
        mod, leaf = index.owner[name]
        feats = _features(mod)
        if feats is not None and feats[0] == units and leaf in feats[1]:
            axes[name] = feats[1][leaf]
    return axes


def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[^a-z]+", name.lower()) if w}


def _qkv_children(holder: Any) -> list[Any]:
    return [c for n, c in holder.named_children() if n.lower() in _QKV_CHILDREN]


def _role(leaf: str, holder: Any) -> str:
    """'attention' for attention-probability dropout, 'hidden' for dropout on hidden states."""
    words = _words(leaf)
    if words & _HIDDEN_WORDS:
        return "hidden"
    if words & _ATTENTION_WORDS:
        return "attention"
    if _qkv_children(holder) or hasattr(holder, "in_proj_weight"):
        return "attention"
    return "hidden"


def _default_guard(parent: Any, leaf: str, role: str) -> tuple[list[Any], list[Any]]:
    """(guarded leaf modules, those registered before the dropout) under ``parent``.

    In a module with query/key/value projections, attention-probability dropout guards those
    projections and hidden-state dropout guards the other leaf children.
    """
    qkv = {id(c) for c in _qkv_children(parent)}
    before: list[Any] = []
    every: list[Any] = []
    seen_self = False
    for name, child in parent.named_children():
        if name == leaf:
            seen_self = True
            continue
        if _is_dropout(child) or not _is_leaf(child) or not _has_params(child):
            continue
        if qkv and (id(child) in qkv) != (role == "attention"):
            continue
        every.append(child)
        if not seen_self:
            before.append(child)
    return every, before


def _hidden_units(mods: Sequence[Any]) -> int | None:
    for m in reversed(mods):
        feats = _features(m)
        if feats is not None:
            return feats[0]
    return None


def _module_site(index: _Index, path: str, mod: Any) -> _Found:
    parent_path, leaf = _split(path)
    parent = index.modules[parent_path]
    if isinstance(mod, GuidedDropout) and mod.hook:
        params = index.params_of([parent], recurse=True)
        units = _hidden_units([parent])
        site = Site(path, params, units, _unit_axes(index, params, units), "hook")
        return _Found(site, mod, parent, leaf, "hidden")
    role = _role(leaf, parent)
    every, before = _default_guard(parent, leaf, role)
    guard = before or every
    if guard:
        params = index.params_of(guard)
    else:  # no leaf sibling with parameters: guard the parent's whole subtree
        params = index.params_of([parent], recurse=True)
    units = _hidden_units(before) if role == "hidden" else None
    site = Site(path, params, units, _unit_axes(index, params, units), "module")
    return _Found(site, mod, parent, leaf, role)


def _is_rate_attr(name: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, float):
        return False
    low = name.lower()
    if "dropout" not in low and not low.endswith("_pdrop"):
        return False
    return 0.0 <= value < 1.0


def _attribute_sites(index: _Index, path: str, mod: Any) -> list[_Found]:
    if _is_dropout(mod):
        return []
    out = []
    for attr, value in vars(mod).items():
        if attr.startswith("_") or not _is_rate_attr(attr, value):
            continue
        role = _role(attr, mod)
        leaves = _default_guard(mod, "", role)[0]
        params = index.params_of(leaves) if leaves else index.params_of([mod], recurse=True)
        if hasattr(mod, "in_proj_weight"):  # nn.MultiheadAttention keeps in_proj on itself
            params = index.params_of([mod], recurse=True)
        units = _hidden_units(leaves) if role == "hidden" else None
        name = _join(path, attr)
        site = Site(name, params, units, _unit_axes(index, params, units), "attribute")
        out.append(_Found(site, mod, None, attr, role))
    return out


def _hook_targets(index: _Index, add_sites: Any) -> list[str]:
    if add_sites is True:
        return [
            p
            for p, m in index.modules.items()
            if p and _is_norm(m) and not isinstance(getattr(m, _HOOK_CHILD, None), GuidedDropout)
        ]
    if isinstance(add_sites, str) or not isinstance(add_sites, Iterable):
        raise bad_argument(
            "add_sites",
            "None (automatic), True, False or a list of module names",
            add_sites,
            "pass add_sites=True (after every LayerNorm) or add_sites=['encoder.0.norm']",
        )
    targets = list(add_sites)
    unknown = [t for t in targets if t not in index.modules or not t]
    if unknown:
        raise bad_argument(
            "add_sites",
            "names of modules in the model (from model.named_modules())",
            unknown[:3],
            f"pick module names such as {[p for p in index.modules if p][:3]}",
        )
    return [
        t
        for t in targets
        if not isinstance(getattr(index.modules[t], _HOOK_CHILD, None), GuidedDropout)
    ]


def _virtual_hook_site(index: _Index, target: str) -> _Found:
    mod = index.modules[target]
    params = index.params_of([mod], recurse=True)
    units = _hidden_units([mod])
    name = _join(target, _HOOK_CHILD)
    site = Site(name, params, units, _unit_axes(index, params, units), "hook")
    return _Found(site, mod, None, _HOOK_CHILD, "hidden", installed=False)


def _apply_mapping(index: _Index, found: list[_Found], mapping: Any) -> list[_Found]:
    if mapping is None:
        return found
    given = site_mapping(
        mapping, [f.site.name for f in found], index.owner, sites_hint="adapters.torch.sites(model)"
    )
    out = []
    for f in found:
        if f.site.name not in given:
            out.append(f)
            continue
        params = given[f.site.name]
        units = f.site.units
        if units is None and f.role == "hidden" and params:
            units = _hidden_units([index.owner[params[-1]][0]])
        site = Site(f.site.name, params, units, _unit_axes(index, params, units), f.site.kind)
        out.append(replace(f, site=site))
    return out


def _discover(
    model: Any, mapping: Any = None, add_sites: Any = None, *, required: bool = True
) -> tuple[_Index, list[_Found]]:
    root = _unwrap(model)
    index = _Index(root)
    found: list[_Found] = []
    for path, mod in index.modules.items():
        if path and _is_dropout(mod):
            found.append(_module_site(index, path, mod))
        found.extend(_attribute_sites(index, path, mod))
    if add_sites is None:
        add_sites = not found
    if add_sites is not False:
        found.extend(_virtual_hook_site(index, t) for t in _hook_targets(index, add_sites))
    found = _apply_mapping(index, found, mapping)
    if required and not found:
        raise no_sites(
            "use a model with nn.Dropout modules or dropout-rate attributes, or pass "
            "add_sites=['<module name>', ...] to add guided dropout after those modules",
            detail=type(root).__name__,
        )
    return index, found


def sites(model: Any, mapping: Any = None, *, add_sites: Any = None) -> list[Site]:
    """Every dropout site of ``model`` with the parameters it guards.

    Sites are ``nn.Dropout``-family modules (also ones that are only read through ``.p``), float
    attributes named like ``*dropout*`` / ``*_pdrop`` holding a rate in [0, 1), and, with
    ``add_sites``, places after modules where guided dropout can be added (kind ``"hook"``).
    By default a dropout module guards the parameters of its parent's leaf children registered
    before it; ``mapping`` ({site: [parameter names]} or a function site -> names or None)
    overrides that. ``add_sites=None`` adds hook sites after every LayerNorm only when the model
    has no dropout at all; ``True`` always does; a list names the modules to add dropout after.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.1))
        >>> s = sites(net)[0]
        >>> s.name, s.params, s.units, s.unit_axes, s.kind
        ('1', ('0.weight', '0.bias'), 5, {'0.weight': 0, '0.bias': 0}, 'module')
    """
    return [f.site for f in _discover(model, mapping, add_sites)[1]]


def fingerprint(model: Any, params: Iterable[str] | None = None) -> Fingerprint:
    """Names and shapes of the model's parameters (or of the named subset ``params``).

    Example:
        >>> import torch
        >>> fingerprint(torch.nn.Linear(2, 3)).params
        (('bias', (3,)), ('weight', (3, 2)))
        >>> fingerprint(torch.nn.Linear(2, 3), ["weight"]).params
        (('weight', (3, 2)),)
    """
    root = _unwrap(model)
    named = dict(root.named_parameters())
    if params is None:
        return Fingerprint.from_shapes((n, tuple(p.shape)) for n, p in named.items())
    wanted = list(params)
    unknown = [n for n in wanted if n not in named]
    if unknown:
        raise bad_argument(
            "params", "names of this model's parameters", unknown[:3], "check the names"
        )
    return Fingerprint.from_shapes((n, tuple(named[n].shape)) for n in wanted)


# ---------------------------------------------------------------------------------------------
# Fisher estimation
# ---------------------------------------------------------------------------------------------
def _persample() -> Any:
    from . import _torch_persample

    return _torch_persample


def _norms() -> Any:
    from adapters import _torch_norms

    return _torch_norms


def _resolve_loss(loss: Any, seed: int) -> tuple[Callable[..., Any], str]:
    if isinstance(loss, str):
        mod = _persample()
        if loss == "mlm":
            return mod.MaskedLMLoss(seed=seed), "mlm"
        if loss == "clm":
            return mod.CausalLMLoss(), "clm"
        if loss == "contrastive":
            return mod.ContrastiveLoss(), "contrastive"
    elif callable(loss):
        name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
        name = name or _BUILTIN_NAMES.get(type(loss).__name__, type(loss).__name__)
        return loss, str(name)
    raise bad_argument(
        "loss",
        f"one of {_LOSS_NAMES} or a callable (model, batch) -> per-sample losses",
        loss,
        "pass loss='mlm' for a masked LM, 'clm' for a causal LM, 'contrastive' for an encoder",
    )


def _is_builtin_loss(loss: Any) -> bool:
    mod = _persample()
    return isinstance(loss, (mod.MaskedLMLoss, mod.CausalLMLoss, mod.ContrastiveLoss))


_BUILTIN_NAMES = {"MaskedLMLoss": "mlm", "CausalLMLoss": "clm", "ContrastiveLoss": "contrastive"}


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (Mapping, Sequence)) or hasattr(values, "__iter__"):
        for v in values:
            if torch.is_tensor(v) and v.dim() > 0:
                return int(v.shape[0])
    raise bad_argument(
        "batches",
        "batches that are tensors, or dicts / tuples of tensors with the batch on axis 0",
        type(batch).__name__,
        "yield e.g. tokenizer(texts, return_tensors='pt', padding=True)",
    )


def _map_batch(batch: Any, fn: Callable[[Any], Any]) -> Any:
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        out = {k: _map_batch(v, fn) if _is_container(v) else v for k, v in batch.items()}
        try:
            return type(batch)(out)
        except Exception:  # noqa: BLE001 - mapping types without a dict constructor
            return out
    if isinstance(batch, tuple | list):
        return type(batch)(_map_batch(v, fn) if _is_container(v) else v for v in batch)
    return batch


def _is_container(v: Any) -> bool:
    return torch.is_tensor(v) or isinstance(v, Mapping | tuple | list)


def _take(batch: Any, index: Any, size: int) -> Any:
    def pick(t: Any) -> Any:
        return t[index] if t.dim() > 0 and t.shape[0] == size else t

    return _map_batch(batch, pick)


def _to_device(batch: Any, device: Any) -> Any:
    return _map_batch(batch, lambda t: t.to(device))


def _dist() -> Any:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d
    return None


class _Estimator:
    """Runs the per-batch loop; keeps on-device sums between flushes into the accumulator."""

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[..., Any],
        names: list[str],
        chunk_size: int | None,
        on_nonfinite: str,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.names = names
        self.chunk_size = chunk_size
        self.on_nonfinite = on_nonfinite
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in names}
        self.device = params[names[0]].device
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.pending = {  # on each parameter's own device (model-parallel models work too)
            n: torch.zeros(params[n].shape, dtype=self.dtype, device=params[n].device)
            for n in names
        }
        self.pending_n = 0
        self.pending_skipped = 0
        self.local_samples = 0

    def skip_batches(self, k: int) -> None:
        """Keep a built-in loss's seeded draws in step when resuming past ``k`` batches."""
        counter = getattr(self.loss_fn, "counter", None)
        if k and isinstance(counter, int) and _is_builtin_loss(self.loss_fn):
            self.loss_fn.counter = counter + k

    def _compute(self, batch: Any) -> tuple[dict[str, Any], int, Any]:
        sums, n, losses = _persample().per_sample_sq_grad_sums(
            self.model, self.loss_fn, batch, params=self.params, chunk_size=self.chunk_size
        )
        return sums, int(n), losses

    @staticmethod
    def _nonfinite_names(sums: Mapping[str, Any]) -> list[str]:
        names = list(sums)
        if not names:
            return []
        totals = torch.stack([sums[n].detach().sum() for n in names])  # one sync per batch
        if bool(torch.isfinite(totals).all()):
            return []
        return [n for n in names if not bool(torch.isfinite(sums[n]).all())]

    def _raise(self, name: str | None, what: str = "gradient") -> None:
        if name is None:
            raise NonFiniteGradientError(
                "loss: expected finite per-sample losses, received NaN or Inf; fix: check the "
                "inputs of that batch, or pass on_nonfinite='skip' to skip and count such samples"
            )
        raise NonFiniteGradientError(
            f"{what} of parameter {name!r} contains NaN or Inf; fix: check the loss and inputs "
            "of that batch, or pass on_nonfinite='skip' to skip and count such samples",
            parameter=name,
        )

    def _add(self, sums: Mapping[str, Any], n: int) -> None:
        for name in self.names:
            acc = self.pending[name]
            acc += sums[name].detach().to(device=acc.device, dtype=self.dtype)
        self.pending_n += n
        self.local_samples += n

    def step(self, batch: Any) -> int:
        """Process one batch; returns the number of samples it covered (counted or skipped)."""
        size = _batch_size(batch)
        sums, n, losses = self._compute(batch)
        losses = torch.as_tensor(losses).detach().reshape(-1)
        finite = torch.isfinite(losses)
        bad_loss = not bool(finite.all())
        bad = self._nonfinite_names(sums)
        if not bad_loss and not bad:
            self._add(sums, n)
            return n
        if self.on_nonfinite == "raise":
            self._raise(bad[0] if bad else None)
        if bad_loss and bool(finite.any()) and losses.numel() == size:
            keep = torch.nonzero(finite).reshape(-1).to(losses.device)
            dropped = size - int(keep.numel())
            sub = _take(batch, keep.to(_first_device(batch)), size)
            sums, n2, losses2 = self._compute(sub)
            if not self._nonfinite_names(sums):
                self._add(sums, n2)
                self.pending_skipped += dropped
                self.local_samples += dropped
                return size
            batch, size = sub, int(keep.numel())
            self.pending_skipped += dropped
            self.local_samples += dropped
        elif bad_loss and not bool(finite.any()):
            self.pending_skipped += size
            self.local_samples += size
            return size
        # finite losses but a non-finite gradient somewhere: find the samples one by one
        for i in range(size):
            one = _take(batch, slice(i, i + 1), size)
            s1, n1, l1 = self._compute(one)
            if self._nonfinite_names(s1) or not bool(torch.isfinite(torch.as_tensor(l1)).all()):
                self.pending_skipped += 1
                self.local_samples += 1
            else:
                self._add(s1, n1)
        return size

    def flush(self, acc: FisherAccumulator) -> None:
        """Hand pending sums (summed over ranks when distributed) to the accumulator."""
        d = _dist()
        rank_samples: list[int] | None = None
        if d is not None:
            world, rank = d.get_world_size(), d.get_rank()
            counts = torch.zeros(world + 2, dtype=torch.float64, device=self.device)
            counts[rank] = float(self.local_samples)
            counts[world] = float(self.pending_n)
            counts[world + 1] = float(self.pending_skipped)
            flat = torch.cat([self.pending[n].reshape(-1).to(self.device) for n in self.names])
            d.all_reduce(counts, op=d.ReduceOp.SUM)
            d.all_reduce(flat, op=d.ReduceOp.SUM)
            offset = 0
            for n in self.names:
                size = self.pending[n].numel()
                self.pending[n].copy_(flat[offset : offset + size].view(self.pending[n].shape))
                offset += size
            rank_samples = [int(round(float(c))) for c in counts[:world].tolist()]
            n_total = int(round(float(counts[world])))
            skipped_total = int(round(float(counts[world + 1])))
        else:
            n_total, skipped_total = self.pending_n, self.pending_skipped
        if n_total or skipped_total:
            arrays = {n: self.pending[n].double().cpu().numpy() for n in self.names}
            acc.add(arrays if n_total else {}, n_total, skipped=skipped_total)
        for t in self.pending.values():
            t.zero_()
        self.pending_n = 0
        self.pending_skipped = 0
        acc.metadata["rank_samples"] = (
            rank_samples if rank_samples is not None else [self.local_samples]
        )


def _first_device(batch: Any) -> Any:
    found: list[Any] = []
    _map_batch(batch, lambda t: found.append(t.device) or t)
    return found[0] if found else torch.device("cpu")


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    d = _dist()
    if d is not None and d.get_rank() != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="sample", desc="Fisher", disable=None, file=sys.stderr)


def _check_int(name: str, value: Any, low: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise bad_argument(name, f"an int >= {low}", value, f"pass e.g. {name}={example}")
    return int(value)


def estimate_fisher(
    model: Any,
    batches: Iterable[Any],
    loss: str | Callable[..., Any] = "mlm",
    max_samples: int | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    *,
    params: Sequence[str] | None = None,
    seed: int = 0,
    output: str = "diagonal",
    norm_axes: Mapping[str, Sequence[int]] | None = None,
) -> Any:
    """The exact empirical Fisher diagonal: the mean over samples of squared per-sample gradients.

    The model is put in eval mode while estimating (and restored after). Sums are kept on the
    model's device (float64 where the device has it) and handed to a
    :class:`gd_core.FisherAccumulator` at checkpoints and at the end. ``loss`` is ``"mlm"``,
    ``"clm"``, ``"contrastive"`` or a callable ``(model, batch) -> per-sample losses``.
    ``max_samples`` truncates the last batch (per process when distributed). With ``checkpoint``,
    the accumulator is saved atomically every ``checkpoint_every`` batches and at the end;
    ``resume=True`` loads it and skips the batches it already counts. A NaN/Inf loss or gradient
    raises :class:`gd_core.NonFiniteGradientError` naming the parameter, or with
    ``on_nonfinite='skip'`` the offending samples are skipped and counted in ``.skipped``. Under
    ``torch.distributed`` the sums and counts of every rank are added together (each rank feeds
    its own shard of the data).

    ``output="norms"`` returns a :class:`adapters._torch_norms.FisherNorms` instead: per tensor
    the sum of its Fisher diagonal (the mean squared per-sample gradient norm) and, per
    ``norm_axes`` (``{name: axes}``; default: each tensor's output-unit axis, the one per-unit
    scores use), the diagonal summed over every other axis -- what :func:`profile` needs,
    computed with Gram products where cheaper, without per-sample weight gradients and without
    per-parameter float64 buffers.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> def loss(model, batch):  # one loss per sample
        ...     return (model(batch[0]).squeeze(-1) - batch[1]) ** 2
        >>> data = [(torch.randn(4, 3), torch.randn(4))]
        >>> fisher = estimate_fisher(net, data, loss=loss, progress=False)
        >>> sorted(fisher), fisher.count, fisher["weight"].shape
        (['bias', 'weight'], 4, (1, 3))
    """
    root = _unwrap(model)
    loss_fn, loss_name = _resolve_loss(loss, seed)
    if max_samples is not None:
        max_samples = _check_int("max_samples", max_samples, 1, "1000")
    if chunk_size is not None:
        chunk_size = _check_int("chunk_size", chunk_size, 1, "8")
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1, "50")
    acc = FisherAccumulator(on_nonfinite)  # validates on_nonfinite
    if output not in ("diagonal", "norms"):
        raise bad_argument("output", "'diagonal' or 'norms'", output, "use output='diagonal'")
    all_params = dict(root.named_parameters())
    if params is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    else:
        unknown = [n for n in params if n not in all_params]
        if unknown:
            raise bad_argument(
                "params",
                "names of this model's parameters",
                unknown[:3],
                f"use names such as {list(all_params)[:3]}",
            )
        names = [n for n in params if all_params[n].requires_grad]
    if not names:
        raise bad_argument(
            "model", "parameters that require gradients", "none", "unfreeze the model"
        )
    d = _dist()
    world = d.get_world_size() if d is not None else 1
    rank = d.get_rank() if d is not None else 0
    batches_done = 0
    base_local = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        acc = FisherAccumulator.load(checkpoint)
        acc.on_nonfinite = on_nonfinite  # type: ignore[assignment]
        meta = acc.metadata
        # an empty checkpoint (``gd profile`` writes one carrying its run settings before the
        # first batch) holds no sums of either kind, so it cannot mix outputs
        if (acc.count + acc.skipped) and (
            meta.get("loss") not in (None, loss_name)
            or int(meta.get("world_size", 1)) != world
            or meta.get("output", "diagonal") != output
        ):
            raise bad_argument(
                "resume",
                f"a checkpoint of the same run (loss {loss_name!r}, {world} process(es), "
                f"output {output!r})",
                f"one with loss {meta.get('loss')!r}, {meta.get('world_size', 1)} process(es), "
                f"output {meta.get('output', 'diagonal')!r}",
                "delete the checkpoint file or pass resume=False to start over",
            )
        batches_done = int(meta.get("batches_done", 0))
        base_local = int(list(meta.get("rank_samples", [0] * world))[rank])
    elif resume and checkpoint is None:
        raise bad_argument(
            "checkpoint",
            "a checkpoint path when resume=True",
            None,
            "pass checkpoint='fisher.ckpt.npz' (the file an interrupted run wrote)",
        )
    acc.metadata.update({"loss": loss_name, "world_size": world})

    if output == "norms":
        nm = _norms()
        axes = nm.default_axes(root, names, _features, ())
        if norm_axes is not None:
            axes = nm.resolve_axes(names, {n: all_params[n].shape for n in names}, norm_axes)
        acc.metadata["output"] = "norms"
        acc.metadata["norm_shapes"] = {n: list(all_params[n].shape) for n in names}
        est = nm.make_estimator(
            _Estimator,
            root,
            loss_fn,
            names,
            chunk_size,
            on_nonfinite,
            axes,
            _persample().per_sample_sq_grad_sums,
        )
    else:
        est = _Estimator(root, loss_fn, names, chunk_size, on_nonfinite)
    est.local_samples = base_local
    est.skip_batches(batches_done)
    bar = _progress(max_samples, progress)
    modes = [(m, m.training) for m in root.modules()]
    root.eval()

    def save() -> None:
        est.flush(acc)
        acc.metadata["batches_done"] = batches_done
        if rank == 0 and checkpoint is not None:
            acc.save(checkpoint)
        if d is not None:
            d.barrier()

    try:
        for i, batch in enumerate(batches):
            if i < batches_done:
                continue
            if max_samples is not None and est.local_samples >= max_samples:
                break
            size = _batch_size(batch)
            if max_samples is not None and est.local_samples + size > max_samples:
                keep = max_samples - est.local_samples
                batch, size = _take(batch, slice(0, keep), size), keep
            batch = _to_device(batch, est.device)
            est.step(batch)
            batches_done += 1
            if bar is not None:
                bar.update(size)
            if checkpoint is not None and batches_done % checkpoint_every == 0:
                save()
        if checkpoint is not None:
            save()
        else:
            est.flush(acc)
            acc.metadata["batches_done"] = batches_done
    finally:
        for m, mode in modes:
            m.training = mode
        if bar is not None:
            bar.close()
    if acc.count == 0:
        raise bad_argument(
            "batches",
            "at least one sample with a finite loss",
            f"{acc.skipped} skipped sample(s)" if acc.skipped else "no batches",
            "pass a non-empty iterable of batches (and check the inputs for NaN)",
        )
    if output == "norms":
        return _norms().FisherNorms.from_accumulator(acc)
    return FisherResult.from_accumulator(acc)


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------
def _resolve_sites(model: Any, sites_arg: Any, add_sites: Any) -> tuple[_Index, list[_Found]]:
    if sites_arg is None or isinstance(sites_arg, Mapping) or callable(sites_arg):
        return _discover(model, sites_arg, add_sites)
    given = list(sites_arg)
    if not all(isinstance(s, Site) for s in given):
        raise bad_argument(
            "sites",
            "None, a list of gd_core.Site, or a site mapping {site: [parameter names]}",
            type(sites_arg).__name__,
            "pass sites=adapters.torch.sites(model) or a dict",
        )
    index, found = _discover(model, None, True if add_sites is None else add_sites, required=False)
    by_name = {f.site.name: f for f in found}
    out = []
    for s in given:
        if s.name not in by_name:
            raise bad_argument(
                "sites",
                "sites of this model",
                s.name,
                f"use names from adapters.torch.sites(model), e.g. {list(by_name)[:3]}",
            )
        out.append(replace(by_name[s.name], site=s))
    return index, out


def _norms_args(root: Any, guarded: Sequence[str], found: Sequence[Any]) -> dict[str, Any]:
    names = list(guarded) or [n for n, p in root.named_parameters() if p.requires_grad]
    extra = [(p, a) for f in found for p, a in f.site.unit_axes.items()]
    return {"output": "norms", "norm_axes": _norms().default_axes(root, names, _features, extra)}


def _model_name(root: Any) -> str:
    cfg = getattr(root, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else type(root).__name__


def profile(
    model: Any,
    batches: Iterable[Any],
    loss: str | Callable[..., Any] = "mlm",
    max_samples: int | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    *,
    sites: Any = None,
    add_sites: Any = None,
    aggregation: str = "tensor_mean",
    mapping: str | Mapping[str, Any] | None = None,
    cache: bool = False,
    metadata: Mapping[str, Any] | None = None,
    seed: int = 0,
    method: str = "norms",
) -> SensitivityProfile:
    """Estimate the Fisher diagonal of the guarded parameters and build a sensitivity profile.

    Takes :func:`estimate_fisher`'s arguments, plus ``sites`` (None, a list of Sites or a site
    mapping), ``add_sites`` (see :func:`sites`), ``aggregation`` and ``mapping`` (stored in the
    profile), ``cache`` (store it in the per-user cache so :func:`apply` finds it) and
    ``metadata`` (merged into the profile's). The width of each dropped tensor is measured
    during estimation, so per-unit scores are right even where the structure is ambiguous.
    ``method="norms"`` (default) estimates only what the profile keeps (per-tensor and
    per-unit sums, :func:`estimate_fisher` with ``output="norms"``); ``method="diagonal"``
    estimates the full diagonal first (same scores to float rounding, slower).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1),
        ...                           torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> def loss(model, batch):
        ...     return model(batch).pow(2).mean(-1)
        >>> prof = profile(net, [torch.randn(8, 3)], loss=loss, progress=False)
        >>> prof.site_names, prof.metadata["samples"]
        (['1', '3'], 8)
    """
    root = _unwrap(model)
    if method not in ("norms", "diagonal"):
        raise bad_argument("method", "'norms' or 'diagonal'", method, "use method='norms'")
    index, found = _resolve_sites(root, sites, add_sites)
    _, loss_name = _resolve_loss(loss, seed)
    guarded = [n for n in index.owner if any(n in f.site.params for f in found)]
    widths: dict[str, int] = {}
    handles = []
    for f in found:
        if f.site.kind == "attribute" or f.role != "hidden":
            continue
        target = f.owner
        is_hook_virtual = not f.installed  # the hook target's output is what gets dropped

        def record(
            mod: Any, args: Any, out: Any, _name: str = f.site.name, _post: bool = is_hook_virtual
        ) -> None:
            t = out if _post else (args[0] if args else None)
            if isinstance(t, tuple) and t:
                t = t[0]
            if torch.is_tensor(t) and t.dim() > 0:
                widths[_name] = int(t.shape[-1])

        handles.append(target.register_forward_hook(record))
    try:
        result = estimate_fisher(
            root,
            batches,
            loss=loss,
            max_samples=max_samples,
            progress=progress,
            chunk_size=chunk_size,
            on_nonfinite=on_nonfinite,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            params=guarded or None,
            seed=seed,
            **(_norms_args(root, guarded, found) if method == "norms" else {}),
        )
    finally:
        for h in handles:
            h.remove()
    measured = []
    for f in found:
        w = widths.get(f.site.name)
        if w is not None and w != f.site.units:
            f = replace(
                f, site=replace(f.site, units=w, unit_axes=_unit_axes(index, f.site.params, w))
            )
        measured.append(f.site)
    meta = {
        "model": _model_name(root),
        "samples": result.count,
        "skipped": result.skipped,
        "loss": loss_name,
        "framework": "torch",
        "torch_version": torch.__version__,
        "seed": seed,
        "max_samples": max_samples,
        "unit_widths": "measured" if widths else "structural",
    }
    tf = sys.modules.get("transformers")
    if tf is not None:
        meta["transformers_version"] = getattr(tf, "__version__", "")
    meta.update(dict(metadata or {}))
    build = _norms().profile_from_norms if method == "norms" else SensitivityProfile.from_fisher
    prof = build(
        result,
        measured,
        aggregation=aggregation,
        mapping=mapping,
        fingerprint=fingerprint(root, sorted({p for s in measured for p in s.params})),
        metadata=meta,
    )
    if cache:
        _cache.store(prof)
    return prof


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------
class ApplyReport(_CoreReport):
    """What :func:`apply` changed: one :class:`gd_core.report.ReportRow` per site.

    Rows carry ``how`` (``p``: the module's ``.p``; ``attribute``: a rate attribute; ``hook``:
    guided dropout added after a module; ``unit rates (N)``: a :class:`GuidedDropout` with N
    per-unit rates; ``uniform rate``; or ``p (...)`` with the reason unit granularity was not
    possible there) and ``source`` (``profile``, ``given``, ``keep`` or ``upper``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        >>> report = apply(net, {"1": 0.03})
        >>> report.probabilities(), [(r.old_p, r.how, r.source) for r in report]
        ({'1': 0.03}, [(0.1, 'p', 'given')])
    """

    def __init__(self, model: Any, rows: Sequence[ReportRow], granularity: str) -> None:
        super().__init__(list(rows), framework="torch", granularity=granularity)
        self.model = model
        self.scheduler: Scheduler | None = None

    def __repr__(self) -> str:
        return f"ApplyReport(sites={len(self.rows)}, granularity={self.granularity!r})"


def _get_p(f: _Found) -> float:
    if not f.installed:
        return 0.0
    if f.site.kind == "attribute":
        return float(getattr(f.owner, f.attr))
    return float(f.owner.p)


def _model_device(root: Any) -> Any:
    for t in root.parameters():
        return t.device
    for t in root.buffers():
        return t.device
    return torch.device("cpu")


def _not_found(root: Any) -> ProfileNotFoundError:
    cfg = getattr(root, "config", None)
    name = getattr(cfg, "_name_or_path", None) or "PATH"
    return ProfileNotFoundError(
        f"profile: expected a sensitivity profile for this {type(root).__name__}, received none "
        f"(profile=None) and no compatible profile is cached in {_cache.cache_dir()}; fix: "
        f"create one with `gd profile --model {name} --corpus FILE --out PROFILE` and pass "
        "profile='PROFILE', or in Python run adapters.torch.profile(model, batches, cache=True) "
        "once"
    )


def _install_hook(f: _Found, p: float, generator: Any, device: Any) -> _Found:
    target = f.owner
    gd = GuidedDropout(p, generator, hook=True).to(device)
    target.add_module(_HOOK_CHILD, gd)
    target.register_forward_hook(_hook_forward)
    return replace(f, owner=gd, parent=target, installed=True)


def apply(
    model: Any,
    profile: Any = None,
    mapping: str | Mapping[str, Any] | None = None,
    granularity: str = "site",
    missing: str = "keep",
    strict: bool = True,
    add_sites: Any = None,
    schedule: Schedule | Mapping[str, Any] | None = None,
    *,
    sites: Any = None,
    spread: float = 1.0,
    generator: Any = None,
) -> ApplyReport:
    """Set every dropout site's probability from a profile, in place; returns a report.

    ``profile`` is a :class:`gd_core.SensitivityProfile`, a path to one, a dict
    ``{site: p}``, or None to use a cached profile of this model. Profile names are matched to
    the model with a prefix renaming (an encoder's profile applies to a classifier wrapping it);
    with ``strict`` a profile from a model with other parameters is refused. ``mapping``
    overrides the profile's score-to-probability mapping (e.g. ``{'p_upper': 0.2}``). Sites the
    profile lacks follow ``missing``: ``keep``, ``upper`` (the mapping's p_upper) or ``error``.
    ``granularity='unit'`` replaces called ``nn.Dropout`` modules by :class:`GuidedDropout` with
    per-unit rates (attention-probability dropout, read through ``.p``, stays site-level).
    ``add_sites`` adds guided dropout after modules (see :func:`sites`); ``schedule`` attaches a
    :class:`Scheduler` as ``report.scheduler``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1),
        ...                           torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> prof = profile(net, [torch.randn(8, 3)], loss=lambda m, b: m(b).pow(2).mean(-1),
        ...                progress=False)
        >>> report = apply(net, prof)
        >>> report.probabilities() == prof.probabilities()
        True
    """
    root = _unwrap(model)
    if granularity not in ("site", "unit"):
        raise bad_argument("granularity", "'site' or 'unit'", granularity, "use granularity='site'")
    index, found = _resolve_sites(root, sites, add_sites)
    names = [f.site.name for f in found]
    current = {f.site.name: _get_p(f) for f in found}
    unit_p: dict[str, np.ndarray] = {}
    if isinstance(profile, Mapping):
        resolved, _ = _align.resolve_given(
            profile,
            names,
            current,
            mapping=mapping,
            missing=missing,
            sites_hint="adapters.torch.sites(model)",
        )
    else:
        fp = fingerprint(root)
        if profile is None:
            prof = _align.find_cached(names, fp)
            if prof is None:
                raise _not_found(root)
        else:
            prof = as_profile(
                profile, "pass profile=adapters.torch.profile(model, batches) or a saved path"
            )
        aligned = _align.align(prof, names, fp, strict=strict)
        resolved = _align.resolve(aligned, names, current, mapping=mapping, missing=missing)
        if granularity == "unit":
            from_profile = {s: p for s, (p, src) in resolved.items() if src == "profile"}
            unit_p = aligned.unit_probabilities(from_profile, spread=spread)
    device = _model_device(root)
    rows = []
    for f in found:
        name = f.site.name
        p, source = resolved[name]
        p = _check_p(p, f"probability of site {name!r}")
        old = current[name]
        if not f.installed:
            f = _install_hook(f, 0.0, generator, device)
        mod = f.owner
        if f.site.kind == "attribute":
            setattr(f.owner, f.attr, p)
            how = "attribute"
        elif (
            granularity == "unit"
            and f.role == "hidden"
            and (type(mod) is nn.Dropout or isinstance(mod, GuidedDropout))
        ):
            rates = unit_p.get(name)
            values = [p] if rates is None else rates
            if isinstance(mod, GuidedDropout):
                mod.set_rates(values)
            else:
                gd = GuidedDropout(values, generator).to(device)
                gd.train(mod.training)
                setattr(f.parent, f.attr, gd)
            how = "uniform rate" if rates is None else f"unit rates ({len(rates)})"
        else:
            mod.p = p
            how = "hook" if f.site.kind == "hook" else "p"
            if granularity == "unit":
                why = (
                    "attention probabilities, read through .p"
                    if f.role == "attention"
                    else f"{type(mod).__name__} kept"
                )
                how = f"p ({why})"
        rows.append(ReportRow(name, old, p, source, how=how, kind=f.site.kind))
    report = ApplyReport(root, rows, granularity)
    if schedule is not None:
        report.scheduler = Scheduler(report, schedule)
    return report


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
class Scheduler:
    """Scale every site's probability by ``schedule.multiplier(step)`` as training proceeds.

    Built from an :class:`ApplyReport` (its sites) or a model (all its sites); the probabilities
    present at construction are the base ones. Call :meth:`step` after each optimiser step.

    Example:
        >>> import torch
        >>> from gd_core import Schedule
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))
        >>> sched = Scheduler(net, Schedule("linear_warmup", steps=4))
        >>> net[1].p
        0.0
        >>> _ = sched.step(); _ = sched.step()
        >>> round(net[1].p, 6)
        0.1
    """

    def __init__(
        self, target: ApplyReport | Any, schedule: Schedule | Mapping[str, Any], *, start: int = 0
    ) -> None:
        if isinstance(schedule, Schedule):
            self.schedule = schedule
        else:
            self.schedule = Schedule.from_config(schedule)
        model = target.model if isinstance(target, ApplyReport) else target
        _, found = _discover(model, None, False)
        if isinstance(target, ApplyReport):
            wanted = {r.site for r in target.rows}
            found = [f for f in found if f.site.name in wanted]
        self._entries: list[tuple[_Found, Any]] = []
        for f in found:
            if isinstance(f.owner, GuidedDropout):
                base: Any = f.owner.rates.detach().clone()
            else:
                base = _get_p(f)
            self._entries.append((f, base))
        self.step_count = _check_int("start", start, 0, "0")
        self._set()

    @property
    def multiplier(self) -> float:
        """The current multiplier of the base probabilities."""
        return self.schedule.multiplier(self.step_count)

    def _set(self) -> None:
        m = self.multiplier
        for f, base in self._entries:
            if isinstance(f.owner, GuidedDropout):
                f.owner.set_rates(base * m)
            elif f.site.kind == "attribute":
                setattr(f.owner, f.attr, float(base) * m)
            else:
                f.owner.p = float(base) * m

    def step(self) -> float:
        """Advance one step and set the probabilities; returns the new multiplier."""
        self.step_count += 1
        self._set()
        return self.multiplier

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step_count = _check_int("state['step']", state.get("step"), 0, "0")
        self._set()
