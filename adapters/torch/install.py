"""``apply`` for torch: install the plan :func:`gd_core.plan.make_plan` decides, in place."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Unpack

from gd_core.auto import lookup as auto_lookup
from gd_core.errors import bad_argument
from gd_core.face import ApplyOptions, ApplySettings
from gd_core.plan import make_plan
from gd_core.recorded import check_recorded, check_unit_count, compare_sites
from gd_core.report import ApplyReport, ReportRow
from gd_core.validate import check_probability

from . import auto as _auto
from . import lora as _lora
from ._watch import disarm, warn_at_first_training_forward, when_imported
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
    *,
    sites: Any = None,
    add_sites: Any = None,
    generator: Any = None,
    tokenizer: Any = None,
    auto_profile: Any = True,
    example_input: Any = None,
    **options: Unpack[ApplyOptions],
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
    the :class:`GuidedDropout` modules installed; ``example_input`` is the batch the site
    discovery traces (see :func:`adapters.torch.sites`). Rate holders the training forward never
    uses (dead) are left as they are and named in ``report.notes``. ``report.model`` is ``model``
    itself.

    A model with a ``config`` (Hugging Face) records what ``apply`` installed in
    ``config.guided_dropout`` (plain JSON: every site's p or per-unit rates), so
    ``save_pretrained`` keeps it; after ``from_pretrained``, ``apply(model)`` with no profile
    restores that plan exactly (see :func:`recorded_plan`). A model loaded with such a config
    and not re-applied warns once, at its first training-mode forward.

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
    opts = ApplySettings.of(options, "apply")
    root = _unwrap(model)
    _disarm(root)  # this call installs (or restores) a plan: no "not installed" warning
    _watch_from_pretrained()
    recorded = recorded_plan(root) if profile is None and sites is None else None
    if recorded is not None:
        _only_defaults(opts)
        return _restore(
            root, recorded, schedule=opts.schedule, add_sites=add_sites, generator=generator
        )
    index, found = _resolve_sites(root, sites, add_sites, example_input)
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
    find = auto_lookup(
        _auto.computer(root, tokenizer, sys.modules["adapters.torch"]),
        auto_profile,
        auto_notes,
        weights=lambda labels: _auto.weights_id(root, labels),
    )
    plan = make_plan(
        profile,
        [f.site.name for f in found],  # torch measures unit widths at run time (GuidedDropout)
        current,
        None if isinstance(profile, Mapping) else fp,
        **opts.plan(),
        framework="torch",
        not_found=(
            f"this {type(root).__name__}",
            f"create one with `gd profile --model {name} --corpus FILE --out PROFILE` and pass "
            "profile='PROFILE', or in Python run adapters.torch.profile(model, batches, "
            "cache=True) once",
        ),
        lookup=find,
    )
    device = _model_device(root)
    rows = []
    for f in found:
        entry = plan[f.site.name]
        p = entry.p
        if entry.source == "keep":  # "keep" means unchanged: not p, not per-unit rates, not modules
            mod = f.owner
            rates = getattr(mod, "rates", None) if isinstance(mod, GuidedDropout) else None
            how = "kept" if rates is None or rates.numel() <= 1 else f"kept ({rates.numel()} rates)"
            rows.append(
                ReportRow(f.site.name, current[f.site.name], current[f.site.name], "keep",
                          how=how, kind=f.site.kind)
            )  # fmt: skip
            continue
        if not f.installed:
            f = _install_hook(f, generator, device)
        mod = f.owner
        if f.site.kind == "attribute":
            setattr(f.owner, f.attr, p)
            how = "attribute"
        elif (
            opts.granularity == "unit"
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
            if opts.granularity == "unit":
                why = {
                    "attention": "attention probabilities, read through .p: one rate",
                    "unknown": "what it drops is unknown without a traced forward: one rate",
                }.get(f.role, f"{type(mod).__name__} kept")
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
        lora_plan = _lora.probabilities(
            lora_sites, plan.profile, mapping=opts.mapping, missing=opts.missing
        )
    else:
        lora_plan = {}
    rows.extend(_lora.install(lora_sites, lora_plan))
    notes = auto_notes + list(plan.notes) + list(index.notes)
    if index.dead:
        notes.append(
            f"{len(index.dead)} dead rate holder(s) left as they are, not installed (one "
            f"training-mode forward never uses them): {sorted(index.dead)}"
        )
    report = ApplyReport(rows, "torch", opts.granularity, notes, model=root)
    outside = _record(
        root, lambda: _resolve_sites(root, sites, add_sites, example_input)[1], opts.granularity
    )
    if outside:
        report.notes.append(
            f"not recorded in the config ({CONFIG_KEY}), which is {outside[0]}'s: "
            f"{outside[1:]} lie outside it, so a model loaded from its folder, or apply(model) "
            "restoring the recorded plan, leaves them as they are; fix: apply the profile again "
            "after loading"
        )
    if opts.schedule is not None:
        report.scheduler = Scheduler(report, opts.schedule)
        report.notes.extend(report.scheduler.notes)
    return report


# -- the applied plan, recorded in the model (Hugging Face: in ``config``, as plain JSON) -------
CONFIG_KEY = "guided_dropout"
_UNAPPLIED = "_gd_unapplied_hook"


def _config_prefix(root: Any) -> tuple[str, str]:
    """Where ``root.config`` belongs: ``("", "")`` for the model's own config, else
    ``("<path>.", "<Class> (model.<path>)")`` when ``root`` is a wrapper handing out the config
    of the transformers model at ``<path>`` (a SentenceTransformer's ``.config``). A plan is
    recorded in that model's names, so that model loads guided from its own folder."""
    from .dataflow import wrapped_models

    config = getattr(root, "config", None)
    for path, inner in wrapped_models(root):
        if getattr(inner, "config", None) is config:
            return path + ".", f"{type(inner).__name__} (model.{path})"
    return "", ""


def _record(root: Any, found: Any, granularity: str) -> list[str]:
    """Write what is installed now into ``root.config.guided_dropout`` (plain JSON), so that
    ``save_pretrained`` keeps it and ``apply(model)`` after ``from_pretrained`` restores it.
    ``found()`` lists the sites as installed (called only for a model with a config: it traces
    one forward). For a wrapper handing out its transformers model's config, the names are that
    model's; returns ``[that model, site outside it, ...]`` when some sites cannot be recorded
    there (else ``[]``)."""
    _disarm(root)
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    prefix, owner = _config_prefix(root)
    installed: dict[str, Any] = {}
    outside: list[str] = []
    for f in found():
        if not f.site.name.startswith(prefix):
            outside.append(f.site.name)
            continue
        name = f.site.name[len(prefix) :]
        mod = f.owner
        if isinstance(mod, GuidedDropout) and mod.rates.numel() > 1 and f.role == "hidden":
            installed[name] = [float(v) for v in mod.rates.detach().cpu().tolist()]
        else:
            installed[name] = float(current_p(f))
    if any(isinstance(v, list) for v in installed.values()):
        granularity = "unit"  # per-unit rates installed by an earlier apply are kept
    setattr(config, CONFIG_KEY, {"version": 1, "granularity": granularity, "sites": installed})
    return [owner, *outside] if outside else []


def recorded_plan(model: Any) -> dict[str, Any] | None:
    """The plan an earlier :func:`apply` recorded in ``model.config`` (None if there is none).

    ``{"version": 1, "granularity": ..., "sites": {site: p or [per-unit rates]}}``, plain JSON,
    so ``save_pretrained`` writes it into ``config.json``; ``apply(model)`` restores it.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        >>> recorded_plan(net) is None  # no config to record it in
        True
    """
    root = _unwrap(model)
    rec = getattr(getattr(root, "config", None), CONFIG_KEY, None)
    if rec is None:
        return None
    checked = check_recorded(rec, _config_where(root))
    prefix, _ = _config_prefix(root)  # a wrapper's config: the plan is in its model's names
    if prefix:
        checked = {**checked, "sites": {prefix + k: v for k, v in checked["sites"].items()}}
    return checked


def _config_where(root: Any) -> str:
    """Where a recorded plan came from, for messages: the checkpoint's ``config.json`` when the
    model was loaded from a folder, else the model's ``config``."""
    folder = getattr(root.config, "_name_or_path", None) or ""
    if folder and os.path.isfile(os.path.join(str(folder), "config.json")):
        return os.path.join(str(folder), "config.json")
    return f"{type(root).__name__}.config"


def _only_defaults(opts: ApplySettings) -> None:
    """Restoring a recorded plan installs it exactly: refuse arguments that would change it."""
    defaults = ApplySettings()
    for name in ("mapping", "granularity", "missing", "spread"):
        if getattr(opts, name) != getattr(defaults, name):
            raise bad_argument(
                name,
                f"{name}={getattr(defaults, name)!r} when apply(model) restores the plan recorded "
                f"in the model's config ({CONFIG_KEY})",
                getattr(opts, name),
                "pass the profile (or {site: p}) again to apply a new plan with these settings",
            )


def _restore(
    root: Any, rec: dict[str, Any], *, schedule: Any, add_sites: Any, generator: Any
) -> ApplyReport:
    """Install a recorded plan (checked by :func:`recorded_plan`) exactly: site probabilities
    and per-unit rates; recorded sites the model lacks, and its sites the plan lacks, are
    noted."""
    values = dict(rec["sites"])
    raw = getattr(root.config, CONFIG_KEY)  # as recorded (a wrapper's: in its model's names)
    unit = rec.get("granularity") == "unit" or any(isinstance(v, list) for v in values.values())
    granularity = "unit" if unit else "site"
    _disarm(root)  # finding the sites runs a forward: not the user's, so no warning
    try:
        _, before = _resolve_sites(root, None, add_sites)
        where = _config_where(root)
        for f in before:
            v = values.get(f.site.name)
            if isinstance(v, list) and f.role == "hidden":
                check_unit_count(where, f.site.name, v, f.site.units)
    except Exception:
        _arm(root)  # not restored: standard dropout still runs, so the warning stays
        raise
    notes = compare_sites(values, [f.site.name for f in before])
    values = {k: v for k, v in values.items() if any(f.site.name == k for f in before)}
    probs = {k: (sum(v) / len(v) if isinstance(v, list) else float(v)) for k, v in values.items()}
    report = apply(
        root,
        probs,
        granularity=granularity,
        missing="keep",
        strict=False,
        add_sites=add_sites,
        generator=generator,
    )
    _, found = _resolve_sites(root, None, add_sites)
    for f in found:
        v = values.get(f.site.name)
        if isinstance(v, list) and isinstance(f.owner, GuidedDropout):
            f.owner.set_rates(v)
    setattr(root.config, CONFIG_KEY, raw)
    report.notes.append(f"restored the plan recorded in the model's config ({CONFIG_KEY})")
    report.notes.extend(f"{where}: {n}" for n in notes)
    if schedule is not None:
        report.scheduler = Scheduler(report, schedule)
        report.notes.extend(report.scheduler.notes)
    return report


def _disarm(root: Any) -> None:
    disarm(root, _UNAPPLIED)


def _arm(model: Any) -> None:
    """After ``from_pretrained`` of a model whose config records a plan: warn once, at the first
    training-mode forward, that standard dropout runs until ``apply(model)`` restores it."""
    config = getattr(model, "config", None)  # a plan that does not check still warns here
    if getattr(config, CONFIG_KEY, None) is None:
        return
    warn_at_first_training_forward(
        model,
        _UNAPPLIED,
        f"its config records a guided-dropout plan ({CONFIG_KEY}) that is not installed, so "
        "standard dropout runs; fix: call adapters.torch.apply(model) after loading to restore it",
    )


def _restore_loaded(model: Any) -> None:
    """After ``from_pretrained``: a config that records a plan gets it installed now (the
    report is ``model.guided_dropout_report``); if that fails, the model warns (with the reason)
    at its first training-mode forward, as :func:`_arm` says."""
    if not isinstance(model, nn.Module):
        return
    if getattr(getattr(model, "config", None), CONFIG_KEY, None) is None:
        return
    try:  # a plan that does not check (recorded_plan raises) warns here, and apply() says why
        if recorded_plan(model) is None:
            return
        model.__dict__["guided_dropout_report"] = apply(model)
    except Exception as exc:  # noqa: BLE001 - reported, and the model still loads
        warnings.warn(
            f"{type(model).__name__}: its config records a guided-dropout plan ({CONFIG_KEY}) "
            f"that could not be restored at load ({type(exc).__name__}: {exc}); standard dropout "
            "runs; fix: call adapters.torch.apply(model) with the profile",
            UserWarning,
            stacklevel=3,
        )
        _arm(model)


def _watch_from_pretrained() -> None:
    """Make ``PreTrainedModel.from_pretrained`` arm :func:`_arm`: now if transformers'
    ``modeling_utils`` is already imported, else as soon as it is (an import hook), so importing
    this adapter never imports transformers and the import order does not matter."""
    when_imported(
        "transformers.modeling_utils",
        lambda utils: _patch_from_pretrained(getattr(utils, "PreTrainedModel", None)),
    )


def _patch_from_pretrained(base: Any) -> None:
    current = getattr(base, "__dict__", {}).get("from_pretrained")
    func = getattr(current, "__func__", None)
    if func is None or getattr(func, "_gd_watch", False):
        return

    @functools.wraps(func)
    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        model = func(cls, *args, **kwargs)
        _restore_loaded(model)
        return model

    from_pretrained._gd_watch = True  # type: ignore[attr-defined]
    base.from_pretrained = classmethod(from_pretrained)
