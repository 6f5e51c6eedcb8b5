"""Where the dropout sites of a torch model are and which parameters each guards.

Sites are ``nn.Dropout``-family modules, float attributes named like ``*dropout*`` /
``*_pdrop``, and places after modules where guided dropout can be added (kind ``hook``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gd_core import Fingerprint, Site
from gd_core.dataflow import guarded, insertion_points, with_sites
from gd_core.errors import bad_argument, no_sites
from gd_core.sites import site_mapping
from gd_core.validate import check_known

from .layer import HOOK_CHILD, GuidedDropout, torch

nn = torch.nn

_DROPOUT_TYPES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
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


@dataclass
class SiteHandle:
    """A dropout site and its torch handle (every adapter names this pair ``SiteHandle``)."""

    site: Site
    owner: Any  # the dropout module; the module holding the attribute; the hook target
    parent: Any  # the module holding the dropout module (None for attributes / hooks)
    attr: str  # child name in parent / attribute name / HOOK_CHILD
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


def _module_site(index: _Index, path: str, mod: Any) -> SiteHandle:
    parent_path, leaf = _split(path)
    parent = index.modules[parent_path]
    if isinstance(mod, GuidedDropout) and mod.hook:
        params = index.params_of([parent], recurse=True)
        units = _hidden_units([parent])
        site = Site(path, params, units, _unit_axes(index, params, units), "hook")
        return SiteHandle(site, mod, parent, leaf, "hidden")
    role = _role(leaf, parent)
    every, before = _default_guard(parent, leaf, role)
    guard = before or every
    if guard:
        params = index.params_of(guard)
    else:  # no leaf sibling with parameters: guard the parent's whole subtree
        params = index.params_of([parent], recurse=True)
    units = _hidden_units(before) if role == "hidden" else None
    site = Site(path, params, units, _unit_axes(index, params, units), "module")
    return SiteHandle(site, mod, parent, leaf, role)


def _is_rate_attr(name: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, float):
        return False
    low = name.lower()
    if "dropout" not in low and not low.endswith("_pdrop"):
        return False
    return 0.0 <= value < 1.0


def _attribute_sites(index: _Index, path: str, mod: Any) -> list[SiteHandle]:
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
        out.append(SiteHandle(site, mod, None, attr, role))
    return out


def _hook_targets(index: _Index, add_sites: Any, flow: _Flow | None = None) -> list[str]:
    if add_sites is True:
        targets = []
        if flow is not None:  # the residual branches and the embedding output (gd_core rule)
            targets = [
                flow.module_out[t] for t in insertion_points(flow.ops) if t in flow.module_out
            ]
        if not targets:  # no residual stream, or no forward could be traced: after every norm
            targets = [p for p, m in index.modules.items() if p and _is_norm(m)]
        return [
            p
            for p in dict.fromkeys(targets)
            if not isinstance(getattr(index.modules[p], HOOK_CHILD, None), GuidedDropout)
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
        if not isinstance(getattr(index.modules[t], HOOK_CHILD, None), GuidedDropout)
    ]


@dataclass
class _Flow:
    """One traced forward: ops, and for tensors a module returned, its path (both ways)."""

    ops: list[Any]
    module_out: dict[str, str]
    path_out: dict[str, str]


def _trace(root: Any, index: _Index, found: Sequence[SiteHandle]) -> _Flow | None:
    """The model's dataflow from one forward on a small guessed input (``None`` when no input
    can be guessed or the forward fails: the structural rule is used then)."""
    from .dataflow import example_input, trace, wrapped_models

    inner = wrapped_models(root)  # a wrapper: the forward of the transformers model inside
    entry = inner[0][1] if len(inner) == 1 else None
    names = {f.site.name: f for f in found}
    attention = {}
    for n, f in names.items():
        if f.role == "attention":
            attention.setdefault(_split(n)[0], []).append(n)
    example = example_input(root if entry is None else entry)
    if example is None:
        return None
    device = next((p.device for p in root.parameters()), None)
    if device is not None and device.type != "cpu":
        example = (
            {k: v.to(device) for k, v in example.items()}
            if isinstance(example, Mapping)
            else tuple(v.to(device) for v in example)
        )
    try:
        ops, _, module_out, path_out = trace(
            root,
            example,
            is_site=lambda p, m: _is_dropout(m) and p in names,
            functional_site=lambda mp: (
                attention[mp][0] if len(attention.get(mp, ())) == 1 else None
            ),
            is_norm=_is_norm,
            entry=entry,
        )
    except Exception as exc:  # noqa: BLE001 - a model the guessed input does not fit
        warnings.warn(
            f"adapters.torch: one forward of {type(root).__name__} on a guessed input failed "
            f"({type(exc).__name__}: {str(exc)[:200]}), so what each dropout site guards is "
            "the structural guess (the parameters of the modules before it); pass "
            "mapping={site: [parameter names]} to sites()/profile() to set it",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return _Flow(ops, module_out, path_out)


def _regroup(index: _Index, found: list[SiteHandle], flow: _Flow) -> list[SiteHandle]:
    """Guarded parameters by the one rule of :mod:`gd_core.dataflow`; sites the forward did not
    reach keep the structural rule's."""
    at = {}
    for f in found:
        if not f.installed:
            target = _split(f.site.name)[0]
            if target in flow.path_out:
                at[flow.path_out[target]] = f.site.name
    groups = guarded(with_sites(flow.ops, at))
    order = {n: i for i, n in enumerate(index.pname.values())}
    out = []
    for f in found:
        params = groups.get(f.site.name)
        if params is None:
            out.append(f)
            continue
        params = sorted(params, key=lambda n: order.get(n, len(order)))  # model order
        units = f.site.units
        if f.role == "hidden" and params:
            units = _hidden_units([index.owner[n][0] for n in groups[f.site.name][:1]]) or units
        site = Site(f.site.name, params, units, _unit_axes(index, params, units), f.site.kind)
        out.append(replace(f, site=site))
    return out


def _virtual_hook_site(index: _Index, target: str) -> SiteHandle:
    mod = index.modules[target]
    params = index.params_of([mod], recurse=True)
    units = _hidden_units([mod])
    name = _join(target, HOOK_CHILD)
    site = Site(name, params, units, _unit_axes(index, params, units), "hook")
    return SiteHandle(site, mod, None, HOOK_CHILD, "hidden", installed=False)


def _apply_mapping(index: _Index, found: list[SiteHandle], mapping: Any) -> list[SiteHandle]:
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


def _adapter_dropout(name: str) -> bool:
    """A PEFT adapter's own dropout (``...q_proj.lora_dropout.default``)."""
    return ".lora_dropout." in f".{name}."


def _discover(
    model: Any,
    mapping: Any = None,
    add_sites: Any = None,
    *,
    required: bool = True,
    trace: bool = True,
) -> tuple[_Index, list[SiteHandle]]:
    """The sites and their handles; ``trace=False`` skips the traced forward (what each site
    guards is then the structural guess: enough for callers that only need the handles)."""
    root = _unwrap(model)
    index = _Index(root)
    found: list[SiteHandle] = []
    for path, mod in index.modules.items():
        if path and _is_dropout(mod):
            found.append(_module_site(index, path, mod))
        found.extend(_attribute_sites(index, path, mod))
    flow = _trace(root, index, found) if trace else None
    if add_sites is None:  # zero-valued rate attributes (attention_dropout = 0.0) do not count,
        # nor adapter dropouts (PEFT's lora_dropout: on a side branch, not the residual stream)
        add_sites = not any(
            (f.site.kind != "attribute" or current_p(f) > 0) and not _adapter_dropout(f.site.name)
            for f in found
        )
    if add_sites is not False:
        found.extend(_virtual_hook_site(index, t) for t in _hook_targets(index, add_sites, flow))
    if flow is not None:
        found = _regroup(index, found, flow)
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
    What a site guards is :mod:`gd_core.dataflow`'s rule applied to one traced forward (on a
    guessed input; without one, the parameters of its parent's leaf children registered before
    it); ``mapping`` ({site: [parameter names]} or a function site -> names or None) overrides
    that. ``add_sites=None`` adds hook sites only when the model has no dropout (zero-valued rate
    attributes and PEFT's ``lora_dropout`` do not count): on the embedding output and every residual branch (after every
    LayerNorm in a model without residual stream); ``True`` always does; a list names the modules
    to add dropout after.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.1))
        >>> s = sites(net)[0]
        >>> s.name, s.params, s.units, s.unit_axes, s.kind
        ('1', ('0.weight', '0.bias'), 5, {'0.weight': 0, '0.bias': 0}, 'module')
    """
    return [f.site for f in _discover(model, mapping, add_sites)[1]]


def fingerprint(model: Any, *, params: Iterable[str] | None = None) -> Fingerprint:
    """Names and shapes of the model's parameters (or of the named subset ``params``).

    Example:
        >>> import torch
        >>> fingerprint(torch.nn.Linear(2, 3)).params
        (('bias', (3,)), ('weight', (3, 2)))
        >>> fingerprint(torch.nn.Linear(2, 3), params=["weight"]).params
        (('weight', (3, 2)),)
    """
    root = _unwrap(model)
    named = dict(root.named_parameters())
    if params is None:
        return Fingerprint.from_shapes((n, tuple(p.shape)) for n, p in named.items())
    wanted = check_known(
        params, "params", list(named), "names of this model's parameters", "check the names"
    )
    return Fingerprint.from_shapes((n, tuple(named[n].shape)) for n in wanted)


def _resolve_sites(model: Any, sites_arg: Any, add_sites: Any) -> tuple[_Index, list[SiteHandle]]:
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


def _model_name(root: Any) -> str:
    cfg = getattr(root, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else type(root).__name__


def current_p(f: SiteHandle) -> float:
    """The probability a site has now (0 for a hook site not installed yet)."""
    if not f.installed:
        return 0.0
    if f.site.kind == "attribute":
        return float(getattr(f.owner, f.attr))
    return float(f.owner.p)
