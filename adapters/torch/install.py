"""``apply`` for torch: install the plan :func:`gd_core.plan.make_plan` decides, in place."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gd_core import Schedule
from gd_core.auto import as_settings
from gd_core.auto import lookup as auto_lookup
from gd_core.plan import make_plan
from gd_core.report import ApplyReport, ReportRow
from gd_core.validate import check_probability

from . import auto as _auto
from . import lora as _lora
from .discovery import SiteHandle, _resolve_sites, _unwrap, current_p, fingerprint
from .layer import HOOK_CHILD, GuidedDropout, hook_forward, torch
from .schedule import Scheduler

nn = torch.nn


def _model_device(root: Any) -> Any:
    for t in root.parameters():
        return t.device
    for t in root.buffers():
        return t.device
    return torch.device("cpu")


def _install_hook(f: SiteHandle, generator: Any, device: Any) -> SiteHandle:
    target = f.owner
    gd = GuidedDropout(0.0, generator=generator, hook=True).to(device)
    target.add_module(HOOK_CHILD, gd)
    target.register_forward_hook(hook_forward)
    return replace(f, owner=gd, parent=target, installed=True)


def apply(
    model: Any,
    profile: Any = None,
    mapping: str | Mapping[str, Any] | None = None,
    granularity: str = "site",
    missing: str = "keep",
    strict: bool = True,
    *,
    sites: Any = None,
    spread: float = 1.0,
    schedule: Schedule | Mapping[str, Any] | None = None,
    add_sites: Any = None,
    generator: Any = None,
    tokenizer: Any = None,
    auto_profile: Any = True,
) -> ApplyReport:
    """Set every dropout site's probability from a profile, in place; returns the report.

    ``profile`` is a :class:`gd_core.SensitivityProfile`, a path to one, a dict
    ``{site: p}``, or None to use a cached profile of this model. The plan (which probability
    each site gets, and why) is :func:`gd_core.plan.make_plan`'s: names are matched with a prefix
    renaming (an encoder's profile applies to a classifier wrapping it); with ``strict`` a
    profile from a model with other parameters is refused; ``mapping`` overrides the profile's
    score-to-probability mapping (e.g. ``{'p_upper': 0.2}``); sites the profile lacks follow
    ``missing`` (``keep``, ``upper`` or ``error``). ``granularity='unit'`` replaces called
    ``nn.Dropout`` modules by :class:`GuidedDropout` with per-unit rates (attention-probability
    dropout, read through ``.p``, stays site-level). ``sites`` restricts or overrides the sites
    (see :func:`adapters.torch.sites`); ``schedule`` attaches a :class:`Scheduler` as
    ``report.scheduler``; ``add_sites`` adds guided dropout after modules; ``generator`` seeds
    the :class:`GuidedDropout` modules installed. ``report.model`` is ``model`` itself.

    With ``profile=None`` and no compatible profile cached, a transformers model gets one computed
    now (:mod:`gd_core.auto`): its own masked-/causal-LM head, else the contrastive objective on
    its pretrained encoder, on Python's documentation or ``auto_profile={'corpus': FILE}``, with
    ``tokenizer`` (default: the one saved beside the checkpoint); it is cached and the report's
    notes say so. ``auto_profile=False`` raises instead. On a PEFT model each LoRA module's
    dropout gets a probability from the Fisher of the base weight it adapts
    (:mod:`adapters.torch.lora`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        >>> report = apply(net, {"1": 0.03})
        >>> report.probabilities(), [(r.old_p, r.how, r.source) for r in report]
        ({'1': 0.03}, [(0.1, 'p', 'given')])
        >>> report.model is net
        True
    """
    root = _unwrap(model)
    index, found = _resolve_sites(root, sites, add_sites)
    lora_sites = _lora.lora_sites(root)
    lora_names = {s.name for s in lora_sites}
    found = [f for f in found if f.site.name not in lora_names]
    given_lora: dict[str, float] = {}
    if isinstance(profile, Mapping):
        given_lora = {k: v for k, v in profile.items() if k in lora_names}
        profile = {k: v for k, v in profile.items() if k not in lora_names}
    current = {f.site.name: current_p(f) for f in found}
    name = getattr(getattr(root, "config", None), "_name_or_path", None) or "PATH"
    auto_notes: list[str] = []
    fp = _lora.fingerprint(root) if lora_sites else fingerprint(root)
    plan = make_plan(
        profile,
        [f.site.name for f in found],  # torch measures unit widths at run time (GuidedDropout)
        current,
        None if isinstance(profile, Mapping) else fp,
        mapping=mapping,
        missing=missing,
        strict=strict,
        granularity=granularity,
        spread=spread,
        framework="torch",
        not_found=(
            f"this {type(root).__name__}",
            f"create one with `gd profile --model {name} --corpus FILE --out PROFILE` and pass "
            "profile='PROFILE', or in Python run adapters.torch.profile(model, batches, "
            "cache=True) once",
        ),
        lookup=auto_lookup(
            _auto.computer(root, tokenizer, sys.modules["adapters.torch"]),
            as_settings(auto_profile),
            auto_notes,
        ),
    )
    device = _model_device(root)
    rows = []
    for f in found:
        entry = plan[f.site.name]
        p = entry.p
        if not f.installed:
            f = _install_hook(f, generator, device)
        mod = f.owner
        if f.site.kind == "attribute":
            setattr(f.owner, f.attr, p)
            how = "attribute"
        elif (
            granularity == "unit"
            and f.role == "hidden"
            and (type(mod) is nn.Dropout or isinstance(mod, GuidedDropout))
        ):
            values = [p] if entry.rates is None else entry.rates
            if isinstance(mod, GuidedDropout):
                mod.set_rates(values)
            else:
                gd = GuidedDropout(values, generator=generator).to(device)
                gd.train(mod.training)
                setattr(f.parent, f.attr, gd)
            how = "uniform rate" if entry.rates is None else f"unit rates ({len(entry.rates)})"
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
        rows.append(
            ReportRow(f.site.name, current[f.site.name], p, entry.source, how=how, kind=f.site.kind)
        )
    if isinstance(profile, Mapping):
        lora_plan = {
            s.name: (
                check_probability(given_lora[s.name], f"profile[{s.name!r}]", "pass e.g. 0.1"),
                "given",
            )
            if s.name in given_lora
            else (s.p, "keep")
            for s in lora_sites
        }
    elif lora_sites and plan.profile is not None:
        lora_plan = _lora.probabilities(lora_sites, plan.profile, mapping=mapping, missing=missing)
    else:
        lora_plan = {}
    rows.extend(_lora.install(lora_sites, lora_plan))
    report = ApplyReport(rows, "torch", granularity, auto_notes + list(plan.notes), model=root)
    if schedule is not None:
        report.scheduler = Scheduler(report, schedule)
    return report
