"""Rate holders in blocks the traced input did not reach (mixture-of-experts experts).

A dropout inside an expert that the traced forward's tokens were never routed to is not dead: a
training batch routed there runs it. When such a holder's block was never called while a block
of the same type beside it (same parent, e.g. ``experts.expert_0`` for ``experts.expert_3``) was,
the holder is a site (siblings: children of one ``ModuleList``/``ModuleDict``, never, e.g., a
decoder's cross-attention beside its self-attention in a model run without an encoder): it guards what the reached sibling's holder guards, its parameter names
moved to its own block, and the sites are named in a note (``sites(model).notes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from gd_core import Site

from .layer import torch

NOTE = "not reached by the traced input"


def _container(mod: Any) -> bool:
    """A ``ModuleList``/``ModuleDict`` (or a subclass: SwitchTransformers' experts)."""
    return isinstance(mod, (torch.nn.ModuleList, torch.nn.ModuleDict))


def _sibling(name: str, other: str, modules: Mapping[str, Any], called: Any) -> int | None:
    """The path depth at which ``name``'s unreached block and ``other``'s reached block differ,
    when they are same-type children of one parent (None otherwise)."""
    a, b = name.split("."), other.split(".")
    if len(a) != len(b):
        return None
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(diff) != 1 or diff[0] == len(a) - 1:
        return None
    i = diff[0]
    mine, theirs = ".".join(a[: i + 1]), ".".join(b[: i + 1])
    if mine not in modules or theirs not in modules or mine in called or theirs not in called:
        return None
    if not _container(modules.get(".".join(a[:i]), None)):
        return None  # experts sit in a ModuleList/ModuleDict (not a decoder's cross-attention)
    if type(modules[mine]) is not type(modules[theirs]):
        return None
    return i


def revive(
    dead: Sequence[Any],
    live: Sequence[Any],
    modules: Mapping[str, Any],
    called: Any,
    params: Any,
) -> tuple[list[Any], list[str]]:
    """Site handles for the ``dead`` holders (``SiteHandle``s) whose block the traced forward
    never called while a same-type sibling block's holder is ``live`` (already regrouped);
    ``called``: the module paths the forward called; ``params``: every parameter name. Returns
    the new handles and the names of the reached sibling sites they copied."""
    out = []
    known = set(params)
    reached: dict[str, None] = {}
    for f in dead:
        for g in live:
            i = _sibling(f.site.name, g.site.name, modules, called)
            if i is None:
                continue
            theirs = ".".join(g.site.name.split(".")[: i + 1]) + "."
            mine = ".".join(f.site.name.split(".")[: i + 1]) + "."
            moved = [mine + p[len(theirs) :] if p.startswith(theirs) else p for p in g.site.params]
            moved = [p for p in moved if p in known]
            axes = {
                mine + p[len(theirs) :] if p.startswith(theirs) else p: a
                for p, a in g.site.unit_axes.items()
            }
            axes = {p: a for p, a in axes.items() if p in moved}
            site = Site(f.site.name, moved, g.site.units, axes, f.site.kind)
            out.append(replace(f, site=site, role=g.role))
            reached.setdefault(g.site.name, None)
            break
    return out, list(reached)


def note(back: Sequence[Any], siblings: Sequence[str]) -> str:
    """The note naming the sites :func:`revive` made and the reached sites they copied."""
    return (
        f"{len(back)} site(s) {NOTE} (in blocks it was not routed to, e.g. the experts of a "
        "mixture of experts): each guards what the same holder of a reached sibling block "
        f"guards: {[f.site.name for f in back]}; these and their reached siblings "
        f"{list(siblings)} run only on the tokens routed to their block, so a batch may leave "
        "some of them unused"
    )


def twins(modules: Mapping[str, Any], called: Any, params: Any) -> dict[str, str]:
    """``{parameter of a block the forward never called: the same parameter of a called
    same-type sibling block in the same ModuleList/ModuleDict}`` (an expert and the expert beside
    it that the input was routed to)."""
    names = list(params)
    out: dict[str, str] = {}
    for path, mod in modules.items():
        if not path or path in called:
            continue
        parent, _, leaf = path.rpartition(".")
        holder = modules[parent]
        if not _container(holder):
            continue  # experts sit in a ModuleList/ModuleDict (not a decoder's cross-attention)
        kids = [f"{parent}.{k}" if parent else k for k, _ in holder.named_children()]
        twin = next((k for k in kids if k in called and type(modules[k]) is type(mod)), None)
        if twin is None:
            continue
        known = set(names)
        for p in names:
            if p.startswith(path + "."):
                other = twin + p[len(path) :]
                if other in known:
                    out[p] = other
    return out


def extend(found: Sequence[Any], twin: Mapping[str, str], axes: Any) -> list[Any]:
    """Each site also guards the parameters no site guards whose twin it guards (``axes(params,
    units)``: the unit axes of a parameter list)."""
    if not twin:
        return list(found)
    taken = {p for f in found for p in f.site.params}
    twin = {p: t for p, t in twin.items() if p not in taken}
    out = []
    for f in found:
        has = set(f.site.params)
        more = [p for p, t in twin.items() if t in has and p not in has]
        if more:
            params = [*f.site.params, *more]
            site = Site(f.site.name, params, f.site.units, axes(params, f.site.units), f.site.kind)
            f = replace(f, site=site)
        out.append(f)
    return out


def unused(name: str, entry: tuple[str, str] | None) -> str:
    """Why a holder counts as dead: the traced forward never used it, or (a wrapper traced
    through the transformers model inside) it lies outside what ran."""
    if entry is not None and not name.startswith(entry[0] + "."):
        return (
            f"outside {entry[1]} (model.{entry[0]}), the only forward traced (on an input guessed "
            "for it): not traced, left as it is; pass example_input=<one batch for the wrapper's "
            "forward> to include it"
        )
    return (
        "never used by a training-mode forward (not called, its rate never read by a dropout call)"
    )
