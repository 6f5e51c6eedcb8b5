"""Where the dropout sites of a torch model are and which parameters each guards.

Sites are ``nn.Dropout``-family modules, float attributes named like ``*dropout*`` /
``*_pdrop``, and places after modules where guided dropout can be added (kind ``hook``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gd_core import Fingerprint, Site, SiteList
from gd_core.dataflow import attention_sites, guarded, insertion_points, with_sites
from gd_core.errors import bad_argument, no_sites
from gd_core.sites import site_mapping
from gd_core.validate import check_known

from ._unreached import NOTE as UNREACHED
from ._unreached import extend, note, revive, twins, unused
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


@dataclass
class SiteHandle:
    """A dropout site and its torch handle (every adapter names this pair ``SiteHandle``)."""

    site: Site
    owner: Any  # the dropout module; the module holding the attribute; the hook target
    parent: Any  # the module holding the dropout module (None for attributes / hooks)
    attr: str  # child name in parent / attribute name / HOOK_CHILD
    role: str  # "hidden", "attention" (drops attention probabilities) or "unknown" (no trace)
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
        self.dead: dict[str, str] = {}  # holders one forward never uses: {name: reason}
        self.notes: list[str] = []
        self.unguarded: dict[str, str] = {}  # parameters no site guards: {name: reason}
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


def _default_guard(parent: Any, leaf: str) -> tuple[list[Any], list[Any]]:
    """(guarded leaf modules, those registered before the dropout) under ``parent``: the
    structural guess used when no forward could be traced."""
    before: list[Any] = []
    every: list[Any] = []
    seen_self = False
    for name, child in parent.named_children():
        if name == leaf:
            seen_self = True
            continue
        if _is_dropout(child) or not _is_leaf(child) or not _has_params(child):
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
    every, before = _default_guard(parent, leaf)
    guard = before or every
    if guard:
        params = index.params_of(guard)
    else:  # no leaf sibling with parameters: guard the parent's whole subtree
        params = index.params_of([parent], recurse=True)
    # without a trace a called module is taken for hidden dropout (the trace decides otherwise)
    units = _hidden_units(before)
    site = Site(path, params, units, _unit_axes(index, params, units), "module")
    return SiteHandle(site, mod, parent, leaf, "hidden")


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
        leaves = _default_guard(mod, "")[0]
        params = index.params_of(leaves) if leaves else index.params_of([mod], recurse=True)
        if hasattr(mod, "in_proj_weight"):  # nn.MultiheadAttention keeps in_proj on itself
            params = index.params_of([mod], recurse=True)
        name = _join(path, attr)
        site = Site(name, params, None, {}, "attribute")
        out.append(SiteHandle(site, mod, None, attr, "unknown"))
    return out


def _config_holders(index: _Index) -> list[SiteHandle]:
    """Rate fields of the ``config`` objects modules read at forward time (Falcon, Persimmon,
    ProphetNet): candidates only, a site once the trace sees a call at that rate. A config shared
    by several modules is one holder, named after the first module holding it."""
    out: list[SiteHandle] = []
    seen: set[int] = set()
    for path, mod in index.modules.items():
        config = vars(mod).get("config")
        if config is None or isinstance(config, nn.Module) or id(config) in seen:
            continue
        seen.add(id(config))
        for field, value in list(vars(config).items()):
            if field.startswith("_") or not _is_rate_attr(field, value):
                continue
            name = _join(path, "config", field)
            site = Site(name, index.params_of([mod], recurse=True), None, {}, "attribute")
            out.append(SiteHandle(site, config, None, field, "unknown"))
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
    """One traced forward: ops, the holders it reached, and for tensors a module returned, its
    path (both ways)."""

    ops: list[Any]
    seen: set[str]
    module_out: dict[str, str]
    path_out: dict[str, str]
    entry: tuple[str, str] | None = None  # a wrapper traced through its model: (path, class)
    sited: list[Any] | None = None  # ops with the hook sites inserted (set by _regroup)


def _on_device(example: Any, root: Any) -> Any:
    device = next((p.device for p in root.parameters()), None)
    if device is None or device.type == "cpu":
        return example
    if torch.is_tensor(example):
        return example.to(device)
    if isinstance(example, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
    return tuple(v.to(device) if torch.is_tensor(v) else v for v in example)


def _trace(
    root: Any, found: Sequence[SiteHandle], example: Any = None, *, given: bool = False
) -> _Flow | None:
    """The model's dataflow from one forward on ``example`` (guessed when not given; ``None``
    when no input can be guessed or the forward fails: the structural rule is used then, with a
    warning)."""
    from .dataflow import example_input, trace, wrapped_models

    inner = wrapped_models(root)  # a wrapper: the forward of the transformers model inside,
    # unless the caller gave a batch (it is for the forward of the model it passed)
    entry = inner[0][1] if len(inner) == 1 and not given else None
    holders = [
        (f.owner, f.attr if f.site.kind == "attribute" else "p", f.site.name)
        for f in found
        if f.installed and not isinstance(f.owner, GuidedDropout)
    ]
    modules = {
        id(f.owner): f.site.name for f in found if f.installed and f.site.kind != "attribute"
    }
    if example is None:
        example = example_input(root if entry is None else entry)
    if example is None:
        warnings.warn(
            f"adapters.torch: no input could be guessed for {type(root).__name__}, so what each "
            "dropout site guards is the structural guess (the parameters of the modules before "
            "it); pass example_input=<one small batch> to sites()/profile()/apply()",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    try:
        ops, seen, module_out, path_out = trace(
            root,
            _on_device(example, root),
            holders=holders,
            module_site=lambda p, m: modules.get(id(m)),
            is_norm=_is_norm,
            entry=entry,
        )
    except Exception as exc:  # noqa: BLE001 - a model the input does not fit
        what = "the given example_input" if given else "a guessed input"
        warnings.warn(
            f"adapters.torch: one forward of {type(root).__name__} on {what} failed "
            f"({type(exc).__name__}: {str(exc)[:200]}), so what each dropout site guards is "
            "the structural guess (the parameters of the modules before it); pass "
            "example_input=<one small batch the model's forward takes> or "
            "mapping={site: [parameter names]} to sites()/profile()/apply()",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    where = (inner[0][0], type(entry).__name__) if entry is not None else None
    return _Flow(ops, seen, module_out, path_out, where)


def _regroup(index: _Index, found: list[SiteHandle], flow: _Flow) -> list[SiteHandle]:
    """Guarded parameters by the one rule of :mod:`gd_core.dataflow`, and each site's role from
    what it drops (a softmax output: attention probabilities, no hidden units)."""
    at = {}
    for f in found:
        if not f.installed:
            target = _split(f.site.name)[0]
            if target in flow.path_out:
                at[flow.path_out[target]] = f.site.name
    ops = flow.sited = with_sites(flow.ops, at)
    groups = guarded(ops)
    attention = attention_sites(ops)
    order = {n: i for i, n in enumerate(index.pname.values())}
    out = []
    for f in found:
        params = groups.get(f.site.name)
        if params is None:
            out.append(f)
            continue
        params = sorted(params, key=lambda n: order.get(n, len(order)))  # model order
        role = "attention" if f.site.name in attention else "hidden"
        units = None
        if role == "hidden" and params:
            first = groups[f.site.name][:1]
            units = _hidden_units([index.owner[n][0] for n in first]) or f.site.units
        site = Site(f.site.name, params, units, _unit_axes(index, params, units), f.site.kind)
        out.append(replace(f, site=site, role=role))
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


def _candidates(root: Any) -> tuple[_Index, list[SiteHandle]]:
    """Every candidate rate holder (dropout modules, rate attributes) with its structural guess;
    stochastic depth (modules with a ``drop_prob`` rate) is noted as not handled."""
    index = _Index(root)
    found: list[SiteHandle] = []
    depth = []
    for path, mod in index.modules.items():
        if path and _is_dropout(mod):
            found.append(_module_site(index, path, mod))
        found.extend(_attribute_sites(index, path, mod))
        rate = vars(mod).get("drop_prob")
        if isinstance(rate, float) and rate > 0 and not _is_dropout(mod):
            depth.append(path)
    if depth:
        index.notes.append(
            f"stochastic depth is not a site kind and is left as it is: {len(depth)} module(s) "
            f"with drop_prob > 0 ({depth[:3]}...)"
        )
    return index, found


def _discover(
    model: Any,
    mapping: Any = None,
    add_sites: Any = None,
    *,
    required: bool = True,
    trace: bool = True,
    example_input: Any = None,
) -> tuple[_Index, list[SiteHandle]]:
    """The live sites and their handles (``index.dead``: holders the forward never uses;
    ``index.notes``: what was guessed or is not handled); ``trace=False`` skips the traced forward
    (what each site guards is then the structural guess, and no holder is found dead: enough for
    callers that only need the handles)."""
    root = _unwrap(model)
    index, found = _candidates(root)
    flow = None
    if trace:
        config = _config_holders(index)
        flow = _trace(root, found + config, example_input, given=example_input is not None)
        if flow is not None and {id(m) for m in root.modules()} != {
            id(m) for m in index.modules.values()
        }:  # the forward built or replaced modules (BigBird on short inputs): list them again
            built = sorted(set(dict(root.named_modules())) - set(index.modules))
            index, found = _candidates(root)
            config = _config_holders(index)
            flow = _trace(root, found + config, example_input, given=example_input is not None)
            index.notes.append(
                f"the traced forward built or replaced modules ({built[:4]}...): the sites are "
                "those of the model after it"
            )
        if flow is not None:
            index.dead = {
                f.site.name: unused(f.site.name, flow.entry)
                for f in found
                if f.installed and f.site.name not in flow.seen
            }
            unreached: list[SiteHandle] = [f for f in found if f.site.name in index.dead]
            found = [f for f in found if f.site.name not in index.dead]
            found += [f for f in config if f.site.name in flow.seen]
        else:
            index.notes.append(
                "no traced forward: what each site guards is the structural guess and "
                "no holder could be checked for use"
            )
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
        back, near = revive(unreached, found, index.modules, flow.path_out, index.pname.values())
        found += back  # holders in blocks the input did not reach (experts): sites, with a note
        index.dead = {k: v for k, v in index.dead.items() if k not in {f.site.name for f in back}}
        index.notes += [note(back, near)] if back else []
        twin = twins(index.modules, flow.path_out, index.pname.values())
        found = extend(found, twin, lambda ps, u: _unit_axes(index, ps, u))
    found = _apply_mapping(index, found, mapping)
    index.unguarded = _unguarded(index, found, flow, mapping is not None)
    for p, t in (twin if flow is not None else {}).items():  # blocks the input did not reach
        if p in index.unguarded and t in index.unguarded:
            index.unguarded[p] = f"{index.unguarded[t]} (as {t}: its block was {UNREACHED})"
    if required and not found:
        raise no_sites(
            "use a model with nn.Dropout modules or dropout-rate attributes, or pass "
            "add_sites=['<module name>', ...] to add guided dropout after those modules",
            detail=type(root).__name__,
        )
    return index, found


def _upstream(ops: Sequence[Any]) -> set[str]:
    """Parameters of the ops whose outputs reach a dropout site (any number of ops away)."""
    tensors: set[str] = set()
    out: set[str] = set()
    for op in reversed(ops):  # execution order reversed: every reader comes before its producer
        if op.site or any(t in tensors for t in op.outputs):
            tensors.update(op.inputs)
            out.update(op.params)
    return out


def _unguarded(
    index: _Index, found: Sequence[SiteHandle], flow: _Flow | None, mapped: bool = False
) -> dict[str, str]:
    """Every parameter no site guards, with the reason (from the traced dataflow)."""
    guarded_now = {p for f in found for p in f.site.params}
    ops = (flow.sited or flow.ops) if flow is not None else []
    used = {p for op in ops for p in op.params}
    upstream = _upstream(ops)
    out = {}
    for name in index.pname.values():
        if name in guarded_now:
            continue
        if flow is None:
            out[name] = "unknown: no traced forward (what the sites guard is a structural guess)"
        elif name not in used:
            out[name] = "not read by the traced training-mode forward"
        elif name not in upstream:
            out[name] = (
                "not upstream of any dropout: no dropout acts on its output, nor on anything "
                "computed from it (e.g. a head after the last dropout)"
            )
        elif mapped:
            out[name] = "upstream of a dropout, but the mapping= given puts it in no site"
        else:
            out[name] = (
                "no dropout acts on its own output: what it computes reaches a dropout only "
                "past a residual branch point, another site's output or a norm an earlier site "
                "guards (that dropout guards the computation nearer to it)"
            )
    return out


def coverage(
    model: Any, mapping: Any = None, *, add_sites: Any = None, example_input: Any = None
) -> dict[str, dict[str, Any]]:
    """Which parameters the sites guard and which none does, with the reason.

    Returns ``{"guarded": {parameter: [site names]}, "unguarded": {parameter: reason}}``, every
    parameter of the model in one of the two (tied parameters under their first name). Same
    arguments as :func:`sites`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 5), torch.nn.Dropout(0.1), torch.nn.Linear(5, 2)
        ... )
        >>> c = coverage(net)
        >>> c["guarded"], sorted(c["unguarded"])
        ({'0.weight': ['1'], '0.bias': ['1']}, ['2.bias', '2.weight'])
    """
    index, found = _discover(model, mapping, add_sites, example_input=example_input)
    by: dict[str, list[str]] = {}
    for f in found:
        for p in f.site.params:
            by.setdefault(p, []).append(f.site.name)
    return {"guarded": by, "unguarded": dict(index.unguarded)}


def sites(
    model: Any, mapping: Any = None, *, add_sites: Any = None, example_input: Any = None
) -> SiteList:
    """Every live dropout site of ``model`` with the parameters it guards.

    A site is a rate holder: an ``nn.Dropout``-family module (called, or only read through
    ``.p`` by an attention kernel), a float attribute named like ``*dropout*`` / ``*_pdrop``
    holding a rate in [0, 1) that a functional dropout reads (``F.dropout(h, p=self.dropout)``),
    a rate field of a ``config`` the modules read at forward time, and, with ``add_sites``, places
    after modules where guided dropout can be added (kind ``"hook"``). One traced training-mode
    forward (on ``example_input``, else an input guessed from the model: ``main_input_name``,
    image size, audio, decoder inputs) links every dropout call to its holder; every call adds to
    what the site guards (:mod:`gd_core.dataflow`'s rule, the union over calls), and a site that
    drops a softmax output is attention-probability dropout (``units`` is ``None``). Holders the
    forward never uses are not sites: they are listed in the result's ``dead`` with the reason;
    parameters no site guards are in its ``unguarded``, with the reason (see :func:`coverage`).
    Without a traced forward (a warning says why) a site guards the parameters of its parent's
    leaf children registered before it. ``mapping`` ({site: [parameter names]} or a function
    site -> names or None) overrides what a site guards. ``add_sites=None`` adds hook sites only
    when the model has no live dropout (zero-valued rate attributes and PEFT's ``lora_dropout``
    do not count): on the embedding output and every residual branch (after every LayerNorm in a
    model without residual stream); ``True`` always does; a list names the modules to add
    dropout after.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.1))
        >>> s = sites(net)[0]
        >>> s.name, s.params, s.units, s.unit_axes, s.kind
        ('1', ('0.weight', '0.bias'), 5, {'0.weight': 0, '0.bias': 0}, 'module')
    """
    index, found = _discover(model, mapping, add_sites, example_input=example_input)
    return SiteList(
        [f.site for f in found], dead=index.dead, unguarded=index.unguarded, notes=index.notes
    )


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


def _resolve_sites(
    model: Any, sites_arg: Any, add_sites: Any, example_input: Any = None
) -> tuple[_Index, list[SiteHandle]]:
    if sites_arg is None or isinstance(sites_arg, Mapping) or callable(sites_arg):
        return _discover(model, sites_arg, add_sites, example_input=example_input)
    given = list(sites_arg)
    if not all(isinstance(s, Site) for s in given):
        raise bad_argument(
            "sites",
            "None, a list of gd_core.Site, or a site mapping {site: [parameter names]}",
            type(sites_arg).__name__,
            "pass sites=adapters.torch.sites(model) or a dict",
        )
    index, found = _discover(
        model,
        None,
        True if add_sites is None else add_sites,
        required=False,
        example_input=example_input,
    )
    by_name = {f.site.name: f for f in found}
    out = []
    for s in given:
        if s.name not in by_name:
            dead = index.dead.get(s.name)
            raise bad_argument(
                "sites",
                "live sites of this model",
                s.name,
                f"it is {dead}; drop it"
                if dead
                else f"use names from adapters.torch.sites(model), e.g. {list(by_name)[:3]}",
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
