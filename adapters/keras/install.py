"""``apply`` for Keras 3: replace dropout layers by :class:`GuidedDropout` layers at the plan's
probabilities (the plan is :func:`gd_core.plan.make_plan`'s)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

import numpy as np

from gd_core.auto import lookup as auto_lookup
from gd_core.errors import ArgumentError
from gd_core.face import ApplyOptions, ApplySettings
from gd_core.plan import make_plan
from gd_core.profile import SensitivityProfile
from gd_core.report import ApplyReport, ReportRow
from gd_core.schedules import Schedule
from gd_core.sites import Site

from . import auto as _auto
from .discovery import (
    ModelIndex,
    _fingerprint,
    _is_graph_model,
    is_site,
    layer_rate,
    resolve_sites,
)
from .holders import _cannot_rewrite, _rewrite_in_place, carry, insert_sites, refuse_saving_plain
from .layer import HOOK, GuidedDropout, GuidedDropoutScheduler, _all_layers, keras
from .rebuild import align_names, rebuilt


def _spatial_noise_shape(layer: Any) -> tuple[int | None, ...] | None:
    """The fixed noise shape equivalent to a SpatialDropoutND layer (None if not spatial)."""
    name = type(layer).__name__
    rank = {"SpatialDropout1D": 1, "SpatialDropout2D": 2, "SpatialDropout3D": 3}.get(name)
    if rank is None:
        return None
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return (None, None, *([1] * rank))
    return (None, *([1] * rank), None)


def _plain_noise_shape(layer: Any) -> Any:
    shape = getattr(layer, "noise_shape", None)
    return None if shape is None else tuple(shape)


def _replacement(
    layer: Any, site: str, p: float, rates: np.ndarray | None, schedule: Schedule | None
) -> Any:
    alpha = getattr(keras.layers, "AlphaDropout", None)
    if alpha is not None and isinstance(layer, alpha):
        return alpha(
            rate=p,
            noise_shape=_plain_noise_shape(layer),
            seed=layer.seed,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
    noise_shape = _spatial_noise_shape(layer) or _plain_noise_shape(layer)
    inherit = schedule is None and isinstance(layer, GuidedDropout)
    if inherit:
        schedule = layer.schedule
    new = GuidedDropout(
        rate=None if rates is not None else p,
        rates=None if rates is None else [float(r) for r in rates],
        noise_shape=noise_shape,
        seed=getattr(layer, "seed", None),
        site=None if site == layer.name else site,
        schedule=schedule,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    if inherit and layer.step_count is not None and new.step_count is not None:
        new.step_count.assign(layer.step_count)  # the same schedule goes on where it was
        new.multiplier.assign(layer.multiplier)
    return new


def _inserted_dropout(name: str, p: float, rates: Any, schedule: Schedule | None) -> Any:
    return GuidedDropout(
        rate=None if rates is not None else p,
        rates=None if rates is None else [float(r) for r in rates],
        site=name,
        schedule=schedule,
        name=HOOK,
    )


def _row_how(layer: Any, rates: Any, kept: bool, in_mha: bool) -> str:
    if kept:
        return "kept" if rates is None else f"kept ({len(rates)} rates)"
    return "MultiHeadAttention dropout rate" if in_mha else _how(layer, rates)


def _how(layer: Any, rates: np.ndarray | None) -> str:
    """What replaces the layer, for the report."""
    alpha = getattr(keras.layers, "AlphaDropout", None)
    if alpha is not None and isinstance(layer, alpha):
        return "AlphaDropout rate"
    return "GuidedDropout" if rates is None else f"GuidedDropout, unit rates ({len(rates)})"


_ATTENTION = "attention probabilities (last axis: key positions, not features): one rate"


def _unit_note(layer: Any, in_mha: bool = False) -> str | None:
    """Why a site cannot take per-unit rates (None if it can)."""
    if in_mha:
        return "a MultiHeadAttention keeps one dropout rate in its config"
    alpha = getattr(keras.layers, "AlphaDropout", None)
    if alpha is not None and isinstance(layer, alpha):
        return "AlphaDropout keeps one rate"
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return "channels_first: units are not the last axis"
    shape = _spatial_noise_shape(layer) or _plain_noise_shape(layer)
    if shape and shape[-1] == 1:
        return "noise_shape shares the mask across units"
    return None


def apply(
    model: Any,
    profile: SensitivityProfile | str | os.PathLike[str] | Mapping[str, float] | None = None,
    *,
    sites: Mapping[str, Sequence[str]] | Sequence[Site] | None = None,
    tokenizer: Any = None,
    auto_profile: Any = True,
    example_input: Any = None,
    **options: Unpack[ApplyOptions],
) -> ApplyReport:
    """Replace the model's dropout layers by ``GuidedDropout`` layers at the plan's probabilities.

    Args:
        model: a Keras 3 model (Sequential, functional or subclassed).
        profile: a ``SensitivityProfile`` (or its path), e.g. from :func:`profile` or from another
            adapter; a dict ``{site: p}`` of probabilities to install as given; or None to use a
            cached profile of this model (see ``profile(..., cache=True)``). Names are aligned by
            prefix and, with ``strict``, the profile must come from this model
            (:func:`gd_core.plan.make_plan` decides, for every adapter alike).
        mapping: override of the profile's score-to-probability mapping (a name such as
            ``"linear_rank"`` or a dict like ``{"p_upper": 0.2}``).
        granularity: ``"site"`` (one probability per dropout layer) or ``"unit"`` (per-unit
            probabilities along the last axis from the profile's unit scores, mean = site p).
        missing: what sites the profile lacks get: ``"keep"`` leaves them unchanged (rate,
            per-unit rates, schedule and step), ``"upper"`` the mapping's ``p_upper``,
            ``"error"`` raise.
        strict: refuse a profile of another model (its weights differ in shape, or it covers
            a different set of layers). A ``{site: p}`` key that is no site here always raises.
        sites: the model's sites to work on (a list of ``gd_core.Site``) or a site mapping, as
            in :func:`profile`; default all dropout layers.
        spread: how far unit probabilities spread around the site's (``unit`` granularity).
        schedule: a ``gd_core.Schedule`` (or config dict) installed on every new layer; the
            report's ``scheduler`` is then a :class:`GuidedDropoutScheduler` for ``fit``.
        tokenizer: with ``profile=None`` and nothing cached, a profile is computed on text
            (:mod:`gd_core.auto`, the contrastive objective on the model's outputs): a Hugging
            Face tokenizer or a callable ``list[str] -> token ids`` turns the text into the
            model's integer input. Without one, ``apply`` raises ProfileNotFoundError.
        example_input: the input of the forward that finds the sites (which dropout layers
            are called, in which order), as in :func:`~adapters.keras.sites`; default one
            guessed from a functional model's input specs.
        auto_profile: options of that computation (``{"samples": 192, "corpus": None,
            "seq_len": 128, "progress": True, ...}``); False never computes one.

    Sequential and functional models are rebuilt with ``keras.models.clone_model`` (same layer
    names, weights copied, compile config copied when the model was compiled); the input model is
    unchanged. Where ``clone_model`` fails (a keras_hub layer whose config does not rebuild it),
    a model whose class builds it from its config is built again that way and its dropout layers
    replaced in the copy (:mod:`adapters.keras.rebuild`). Subclassed models are changed *in place* (dropout attributes, including items of
    lists and dicts, are replaced); recompile them before training. A subclassed model, or a
    layer of a graph that makes its own dropout layers (keras_hub's transformer layers), gets a
    ``Guided<Name>`` subclass of its class whose config keeps the new dropout layers, so a saved
    ``.keras`` file loads with them (:mod:`adapters.keras.holders`). ``AlphaDropout`` stays an
    ``AlphaDropout`` (its SELU-preserving noise) with the new rate.

    Returns the :class:`gd_core.report.ApplyReport`; ``report.model`` is the model to train
    and ``print(report)`` shows site, old p, new p, source.

    Example:
        >>> import numpy as np, keras, gd_core
        >>> from adapters.keras import fingerprint, sites
        >>> inp = keras.Input((3,))
        >>> h = keras.layers.Dropout(0.1, name="d1")(keras.layers.Dense(4, name="a")(inp))
        >>> h = keras.layers.Dropout(0.1, name="d2")(keras.layers.Dense(4, name="b")(h))
        >>> m = keras.Model(inp, h)
        >>> prof = gd_core.SensitivityProfile(
        ...     sites=tuple(sites(m)), scores=np.array([2.0, 1.0]), fingerprint=fingerprint(m))
        >>> report = apply(m, prof)
        >>> report.probabilities()
        {'d1': 0.0, 'd2': 0.1}
        >>> type(report.model.get_layer("d2")).__name__
        'GuidedDropout'
    """
    opts = ApplySettings.of(options, "apply")
    sched = None if opts.schedule is None else Schedule.from_config(opts.schedule)
    idx = ModelIndex.build(model, example_input)
    pairs = resolve_sites(idx, sites)
    current = {site.name: 0.0 if layer is None else layer_rate(layer) for site, layer in pairs}
    auto_notes: list[str] = []
    find = auto_lookup(
        _auto.computer(model, tokenizer, sys.modules["adapters.keras"]),
        auto_profile,
        auto_notes,
        weights=lambda labels: _auto.weights_id(model, labels),
    )
    plan = make_plan(
        profile,
        [site for site, _ in pairs],
        current,
        _fingerprint(idx),
        **opts.plan(),
        framework="keras",
        not_found=(
            f"Keras model {model.name!r}",
            "pass profile=..., pass tokenizer= so apply computes one on text, or run "
            "adapters.keras.profile(model, batches, loss, cache=True) once",
        ),
        lookup=find,
    )
    rows: list[ReportRow] = []
    factories: dict[int, Callable[[], Any]] = {}
    graph = isinstance(model, keras.Sequential) or _is_graph_model(model)
    fixed: list[str] = []  # sites a schedule cannot reach
    inserts: dict[str, tuple[Any, Callable[[], Any]]] = {}  # sites to insert (a dropout-free model)
    for site, layer in pairs:
        entry = plan[site.name]
        rates, note = entry.rates, entry.note
        if layer is None:
            point = idx.inserted[site.name]
            rows.append(
                ReportRow(
                    site.name,
                    0.0,
                    entry.p,
                    entry.source,
                    None if rates is None else len(rates),
                    note,
                    how=f"inserted: GuidedDropout on the output of {idx.layer_names[id(point.layer)]}",
                    kind=site.kind,
                )
            )
            inserts[site.name] = (
                point,
                lambda name=site.name, p=entry.p, rates=rates: _inserted_dropout(
                    name, p, rates, sched
                ),
            )
            continue
        mha = idx.parent.get(id(layer))
        is_mha = isinstance(mha, keras.layers.MultiHeadAttention)
        in_mha = graph and is_mha
        # a graph's MultiHeadAttention is rebuilt from its config (one fixed rate); one inside
        # a layer that makes it (keras_hub) keeps a GuidedDropout (adapters.keras.holders)
        in_config = in_mha and isinstance(idx.parent.get(id(mha)), keras.Model)
        # attention probabilities, as the dataflow shows them: a MultiHeadAttention's own
        # dropout, or any site whose input the forward saw to be a softmax output
        on_probs = is_mha or id(layer) in idx.attention
        why = _unit_note(layer, in_mha) or (_ATTENTION if on_probs else None)
        if rates is not None and why is not None:
            rates, note = None, why
        if in_config and sched is not None:
            fixed.append(site.name)
        kept = entry.source == "keep"
        if kept and isinstance(layer, GuidedDropout) and layer.rates is not None:
            rates = np.asarray(layer.rates, dtype=np.float64)  # "keep" means unchanged
        rows.append(
            ReportRow(
                site.name,
                float(current[site.name]),
                entry.p,
                entry.source,
                None if rates is None else len(rates),
                note,
                how=_row_how(layer, rates, kept, in_config),
                kind=site.kind,
            )
        )
        factories[id(layer)] = lambda layer=layer, name=site.name, p=entry.p, rates=rates: (
            _replacement(layer, name, p, rates, sched)
        )
    notes: list[str] = list(idx.notes)
    for note in (idx.dead_note(), idx.unchecked_note()):
        if note is not None:
            notes.append(note)
    if fixed:
        notes.append(
            f"the schedule does not reach {', '.join(fixed)}: a MultiHeadAttention keeps one "
            "fixed dropout rate in its config (the guided rate, without the schedule)"
        )
    if graph:
        new_model = _rewrite_graph(model, idx, factories, notes)
        notes += insert_sites(new_model, idx, inserts)
    else:
        _rewrite_in_place(model, idx, factories)
        notes += insert_sites(model, idx, inserts)
        carry(model)
        new_model = model
        notes.append(
            f"{type(model).__name__} is a subclassed model: its dropout layers were replaced in "
            "place (report.model is the same object); compile it again before training"
        )
    return ApplyReport(
        rows,
        framework="keras",
        granularity=opts.granularity,
        notes=auto_notes + notes + list(plan.notes),
        model=new_model,
        scheduler=None if sched is None else GuidedDropoutScheduler(),
    )


def _rewrite_graph(
    model: Any, idx: ModelIndex, factories: Mapping[int, Callable[[], Any]], notes: list[str]
) -> Any:
    pairs: list[tuple[Any, Any]] = []

    def clone(layer: Any) -> Any:
        if id(layer) in factories:
            return factories[id(layer)]()
        config = layer.get_config()
        inner = getattr(layer, "_dropout_layer", None)
        if isinstance(layer, keras.layers.MultiHeadAttention) and id(inner) in factories:
            # MultiHeadAttention keeps one rate in its config: the clone (and a saved .keras
            # file, loaded anywhere) carries the guided rate with no custom layer inside
            config["dropout"] = float(factories[id(inner)]().rate)
        new = layer.__class__.from_config(config)
        pairs.append((layer, new))
        return new

    try:
        new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild is reported with its cause
        # a layer clone_model cannot make from its own config (keras_hub): the model is built
        # again from its config and its dropout layers replaced in that copy
        try:
            new_model = rebuilt(model, idx, factories)
            refuse_saving_plain(new_model, notes)
            return _compiled_like(model, new_model)
        except ArgumentError as again:
            raise _cannot_rewrite(
                model, f"keras.models.clone_model failed ({exc!s:.300}); {again!s:.300}"
            ) from exc
    for old, new in pairs:
        if getattr(old, "weights", None):
            try:
                new.set_weights(old.get_weights())
            except Exception as exc:  # noqa: BLE001
                raise _cannot_rewrite(
                    model, f"the weights of layer {old.name!r} could not be copied ({exc!s:.200})"
                ) from exc
        if isinstance(old, keras.layers.MultiHeadAttention):
            continue  # its rate is in the clone's config
        if any(is_site(sub) for sub in _all_layers(old)[1:]):
            # a custom layer holding dropout layers: replace them inside its clone
            old_subs, new_subs = _all_layers(old), _all_layers(new)
            if [type(a) for a in old_subs] != [type(b) for b in new_subs]:
                raise _cannot_rewrite(model, f"the clone of layer {old.name!r} differs from it")
            inner = {
                id(b): factories[id(a)]
                for a, b in zip(old_subs, new_subs, strict=True)
                if id(a) in factories
            }
            _rewrite_in_place(new, ModelIndex.build(new), inner)
            carry(new)  # its config alone would make plain dropout layers again when loaded
    # layers made without a name are named from a process-wide counter: the clone's layers
    # take the original's names, so its weights keep their canonical names
    if _fingerprint(align_names(idx, new_model)) != _fingerprint(idx):
        raise _cannot_rewrite(model, "the rebuilt model's weights differ from the original's")
    return _compiled_like(model, new_model)


def _compiled_like(model: Any, new_model: Any) -> Any:
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config()
            if config:
                new_model.compile_from_config(config)
        except Exception as exc:  # noqa: BLE001 - compiling is a convenience
            warnings.warn(
                f"apply: could not compile the new model like the original ({exc!s:.200}); "
                "call new_model.compile(...) yourself",
                RuntimeWarning,
                stacklevel=3,
            )
    return new_model
