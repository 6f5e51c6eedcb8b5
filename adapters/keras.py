"""Guided dropout for Keras 3 (TensorFlow or torch backend).

A thin translator over :mod:`gd_core`: it finds a model's dropout sites and weights under canonical
(PyTorch-style) names, computes per-sample squared gradients natively, and installs
:class:`GuidedDropout` layers at a profile's probabilities.

Example:
    >>> import numpy as np, keras
    >>> import adapters.keras as gdk
    >>> inp = keras.Input((4,))
    >>> h = keras.layers.Dense(8, name="dense")(inp)
    >>> h = keras.layers.Dropout(0.1, name="dropout")(h)
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    >>> [s.name for s in gdk.sites(model)]
    ['dropout']

Layer names are the canonical names (Keras allows dots, so ``encoder.layer.0.output.dropout`` mirrors
a torch module tree); weights are ``<layer name>.weight|bias`` (``kernel``, ``gamma``,
``embeddings`` -> ``weight``, ``beta`` -> ``bias``).

Loading a saved ``.keras`` model that contains ``GuidedDropout`` needs only ``import
adapters.keras`` first (the layer is registered as ``guided_dropout>GuidedDropout``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gd_core import cache as _cache
from gd_core.align import align, find_cached, resolve, resolve_given
from gd_core.errors import (
    ArgumentError,
    ProfileMismatchError,
    ProfileNotFoundError,
    bad_argument,
)
from gd_core.fingerprint import Fingerprint
from gd_core.fisher import FisherResult
from gd_core.profile import SensitivityProfile, as_profile
from gd_core.report import ApplyReport, ReportRow
from gd_core.schedules import Schedule
from gd_core.sites import Site

from ._keras_fisher import estimate
from ._keras_layer import GuidedDropout, GuidedDropoutScheduler, _all_layers, keras
from ._keras_sites import ModelIndex, _is_graph_model, is_site, layer_rate, sites_of

__all__ = [
    "FisherResult",
    "GuidedDropout",
    "GuidedDropoutScheduler",
    "apply",
    "estimate_fisher",
    "fingerprint",
    "profile",
    "sites",
]

GRANULARITIES: tuple[str, ...] = ("site", "unit")


# -- discovery ------------------------------------------------------------------------------------
def sites(model: Any, mapping: Mapping[str, Sequence[str]] | None = None) -> list[Any]:
    """The model's dropout sites (``gd_core.Site``) in graph order, with canonical names.

    Sites are ``Dropout``, ``SpatialDropout1D/2D/3D``, ``AlphaDropout`` and ``GuidedDropout``
    layers (not ``GaussianDropout``/``GaussianNoise``). A site guards, by default, the trainable
    weights of the layers between the previous site and itself in the functional graph (for
    subclassed models: in layer order); ``mapping`` ``{site: [weight names]}`` overrides that.
    Unit axes are the last axis of every guarded weight whose last dimension equals the site's
    units (Dense kernel ``(in, out)`` -> 1, bias/LayerNormalization -> 0, Embedding -> 1).

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="fc"),
        ...                       keras.layers.Dropout(0.1, name="drop")])
        >>> s = sites(m)[0]
        >>> s.name, s.params, s.units, s.unit_axes
        ('drop', ('fc.weight', 'fc.bias'), 4, {'fc.weight': 1, 'fc.bias': 0})
    """
    return sites_of(ModelIndex.build(model), mapping)


def _fingerprint(idx: ModelIndex) -> Fingerprint:
    return Fingerprint.from_shapes([(n, tuple(v.shape)) for n, v in idx.variables.items()])


def fingerprint(model: Any) -> Fingerprint:
    """The model's weights (canonical names, Keras shapes), excluding dropout layers' state.

    Keras shapes differ from torch's for dense kernels (``(in, out)`` vs ``(out, in)``), so a
    profile computed in another framework matches a Keras model only with ``strict=False``.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="fc")])
        >>> fingerprint(m).params
        (('fc.bias', (4,)), ('fc.weight', (3, 4)))
    """
    return _fingerprint(ModelIndex.build(model))


# -- Fisher -------------------------------------------------------------------------------------
def estimate_fisher(
    model: Any,
    dataset: Any,
    loss: Callable[[Any, Any], Any] | Any,
    *,
    max_samples: int | None = None,
    progress: bool = True,
    on_nonfinite: str = "raise",
    chunk_size: int | None = None,
) -> FisherResult:
    """Empirical Fisher diagonal of every trainable weight: mean of squared per-sample gradients.

    Args:
        model: a built Keras 3 model.
        dataset: an iterable of batches (``tf.data.Dataset``, list of tuples, ``PyDataset``,
            torch ``DataLoader``); numpy/TF/torch arrays are converted to backend tensors.
        loss: ``loss(model, batch) -> 1-D per-sample losses`` (call the model with
            ``training=False``), or a ``keras.losses.Loss`` with ``reduction=None`` (or a Keras
            loss name) used on ``(x, y)`` batches as ``loss(y, model(x, training=False))``.
        max_samples: stop after this many samples (default: the whole dataset).
        progress: show a tqdm progress bar (if tqdm is installed).
        on_nonfinite: ``"raise"`` (NonFiniteGradientError naming the weight) or ``"skip"`` (drop
            and count such samples: ``result.skipped``).
        chunk_size: split each batch into pieces of at most this many samples (the per-sample
            gradients of one piece are held in memory at once); default the whole batch.

    Per-sample gradients are vectorised over the batch (TensorFlow: ``GradientTape.jacobian``
    with pfor; torch: ``torch.func.vmap``), squared and summed in float64 in the framework, and the
    sums are handed to ``gd_core.FisherAccumulator``. Memory grows with batch (or chunk) size x
    weights.

    Example:
        >>> import numpy as np, keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
        >>> data = [(np.ones((4, 3), "float32"), np.zeros((4,), "int32"))]
        >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        >>> f = estimate_fisher(m, data, loss, progress=False)
        >>> f.count, sorted(f), f["fc.weight"].shape
        (4, ['fc.bias', 'fc.weight'], (3, 2))
    """
    idx = ModelIndex.build(model)
    trainable = idx.trainable()
    return estimate(
        model,
        list(trainable),
        list(trainable.values()),
        dataset,
        loss,
        max_samples=max_samples,
        progress=progress,
        on_nonfinite=on_nonfinite,
        chunk_size=chunk_size,
    )


def profile(
    model: Any,
    dataset: Any,
    loss: Callable[[Any, Any], Any] | Any,
    *,
    max_samples: int | None = None,
    progress: bool = True,
    on_nonfinite: str = "raise",
    chunk_size: int | None = None,
    sites: Mapping[str, Sequence[str]] | Sequence[Site] | None = None,
    aggregation: str = "tensor_mean",
    mapping: str | Mapping[str, Any] | None = None,
    with_units: bool = True,
    cache: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> SensitivityProfile:
    """Estimate Fisher and aggregate it into a ``gd_core.SensitivityProfile`` for this model.

    Takes :func:`estimate_fisher`'s arguments, plus ``sites`` (None, a list of ``gd_core.Site``
    of this model, or a site mapping ``{site: [weight names]}`` as in :func:`sites`),
    ``aggregation`` and ``mapping`` (the score-to-probability mapping stored in the profile,
    default ``linear_rank`` over ``[0.0, 0.1]``), ``cache`` (store the profile in the per-user
    cache, where :func:`apply` with ``profile=None`` finds it) and ``metadata`` (merged into the
    profile's). The profile carries the model's fingerprint and metadata ``framework="keras"``,
    ``backend``, ``samples``, ``skipped`` and ``loss``.

    Example:
        >>> import numpy as np, keras
        >>> inp = keras.Input((3,))
        >>> h = keras.layers.Dropout(0.1, name="drop_in")(keras.layers.Dense(4, name="a")(inp))
        >>> h = keras.layers.Dropout(0.1, name="drop_mid")(keras.layers.Dense(4, name="b")(h))
        >>> m = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
        >>> data = [(np.ones((4, 3), "float32"), np.zeros((4,), "int32"))]
        >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        >>> prof = profile(m, data, loss, progress=False)
        >>> prof.site_names, prof.metadata["framework"]
        (['drop_in', 'drop_mid'], 'keras')
    """
    idx = ModelIndex.build(model)
    model_sites = [site for site, _ in _resolve_sites(idx, sites)]
    trainable = idx.trainable()
    fisher = estimate(
        model,
        list(trainable),
        list(trainable.values()),
        dataset,
        loss,
        max_samples=max_samples,
        progress=progress,
        on_nonfinite=on_nonfinite,
        chunk_size=chunk_size,
    )
    meta = {
        "framework": "keras",
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "model": str(model.name),
        "samples": fisher.count,
        "skipped": fisher.skipped,
        "loss": fisher.accumulator.metadata.get("loss"),
        **dict(metadata or {}),
    }
    prof = SensitivityProfile.from_fisher(
        fisher,
        model_sites,
        aggregation=aggregation,
        mapping=mapping,
        fingerprint=_fingerprint(idx),
        metadata=meta,
        with_units=with_units,
    )
    if cache:
        _cache.store(prof)
    return prof


def _resolve_sites(idx: ModelIndex, given: Any) -> list[tuple[Site, Any]]:
    """(Site, layer) pairs: discovered (optionally with a site mapping) or the given Sites."""
    if given is None or isinstance(given, Mapping):
        found = sites_of(idx, given)
        return list(zip(found, idx.site_layers, strict=True))
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        given = [given]
    found = sites_of(idx)
    layer_of = {s.name: layer for s, layer in zip(found, idx.site_layers, strict=True)}
    out = []
    for site in given:
        if not isinstance(site, Site):
            raise bad_argument(
                "sites",
                "None, a list of gd_core.Site, or a site mapping {site: [weight names]}",
                type(site).__name__,
                "pass sites=adapters.keras.sites(model) or a dict",
            )
        if site.name not in layer_of:
            raise bad_argument(
                "sites",
                "sites of this model",
                site.name,
                f"use names from adapters.keras.sites(model), e.g. {list(layer_of)[:3]}",
            )
        out.append((site, layer_of[site.name]))
    return out


# -- apply --------------------------------------------------------------------------------------
def _check_p(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad_argument(what, "a float in [0, 1)", value, "pass a dropout probability")
    p = float(value)
    if not np.isfinite(p) or not 0.0 <= p < 1.0:
        raise bad_argument(what, "a float in [0, 1)", value, "pass a dropout probability")
    return p


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
    if schedule is None and isinstance(layer, GuidedDropout):
        schedule = layer.schedule
    return GuidedDropout(
        rate=None if rates is not None else p,
        rates=None if rates is None else [float(r) for r in rates],
        noise_shape=noise_shape,
        seed=getattr(layer, "seed", None),
        site=None if site == layer.name else site,
        schedule=schedule,
        name=layer.name,
        dtype=layer.dtype_policy,
    )


def _how(layer: Any, rates: np.ndarray | None) -> str:
    """What replaces the layer, for the report."""
    alpha = getattr(keras.layers, "AlphaDropout", None)
    if alpha is not None and isinstance(layer, alpha):
        return "AlphaDropout rate"
    return "GuidedDropout" if rates is None else f"GuidedDropout, unit rates ({len(rates)})"


def _unit_note(layer: Any) -> str | None:
    """Why a site cannot take per-unit rates (None if it can)."""
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
    mapping: str | Mapping[str, Any] | None = None,
    granularity: str = "site",
    missing: str = "keep",
    strict: bool = True,
    *,
    sites: Mapping[str, Sequence[str]] | Sequence[Site] | None = None,
    spread: float = 1.0,
    schedule: Schedule | Mapping[str, Any] | None = None,
) -> tuple[Any, ApplyReport]:
    """A model whose dropout layers are ``GuidedDropout`` layers at the profile's probabilities.

    Args:
        model: a Keras 3 model (Sequential, functional or subclassed).
        profile: a ``SensitivityProfile`` (or its path), e.g. from :func:`profile` or from another
            adapter; names are aligned with ``gd_core.align.align`` (prefix renaming) and, with
            ``strict``, the profiled weights must exist here with the same shapes. Also a dict
            ``{site: p}`` of probabilities to install as given, or None to use a cached profile
            of this model (see ``profile(..., cache=True)``).
        mapping: override of the profile's score-to-probability mapping (a name such as
            ``"linear_rank"`` or a dict like ``{"p_upper": 0.2}``).
        granularity: ``"site"`` (one probability per dropout layer) or ``"unit"`` (per-unit
            probabilities along the last axis from the profile's unit scores, mean = site p).
        missing: what sites the profile lacks get: ``"keep"`` their rate, ``"upper"`` the
            mapping's ``p_upper``, ``"error"`` raise.
        strict: check the profile's fingerprint against the model's.
        sites: the model's sites to work on (a list of ``gd_core.Site``) or a site mapping, as
            in :func:`profile`; default all dropout layers.
        spread: how far unit probabilities spread around the site's (``unit`` granularity).
        schedule: a ``gd_core.Schedule`` (or config dict) installed on every new layer.

    Sequential and functional models are rebuilt with ``keras.models.clone_model`` (same layer
    names, weights copied, compile config copied when the model was compiled); the input model is
    unchanged. Subclassed models are changed *in place* (dropout attributes, including items of
    lists and dicts, are replaced) and returned; recompile them before training. ``AlphaDropout``
    stays an ``AlphaDropout`` (its SELU-preserving noise) with the new rate.

    Returns ``(new_model, report)``; ``print(report)`` shows site, old p, new p, source.

    Example:
        >>> import numpy as np, keras, gd_core
        >>> inp = keras.Input((3,))
        >>> h = keras.layers.Dropout(0.1, name="d1")(keras.layers.Dense(4, name="a")(inp))
        >>> h = keras.layers.Dropout(0.1, name="d2")(keras.layers.Dense(4, name="b")(h))
        >>> m = keras.Model(inp, h)
        >>> prof = gd_core.SensitivityProfile(
        ...     sites=tuple(sites(m)), scores=np.array([2.0, 1.0]), fingerprint=fingerprint(m))
        >>> new, report = apply(m, prof)
        >>> report.probabilities()
        {'d1': 0.0, 'd2': 0.1}
        >>> type(new.get_layer("d2")).__name__
        'GuidedDropout'
    """
    if granularity not in GRANULARITIES:
        raise bad_argument(
            "granularity", f"one of {GRANULARITIES}", granularity, "use granularity='site'"
        )
    sched = None if schedule is None else Schedule.from_config(schedule)
    idx = ModelIndex.build(model)
    pairs = _resolve_sites(idx, sites)
    names = [site.name for site, _ in pairs]
    current = {site.name: layer_rate(layer) for site, layer in pairs}
    unit_p: dict[str, np.ndarray] = {}
    if isinstance(profile, Mapping):
        resolved, _ = resolve_given(
            profile,
            names,
            current,
            mapping=mapping,
            missing=missing,
            sites_hint="adapters.keras.sites(model)",
        )
    else:
        fp = _fingerprint(idx)
        if profile is None:
            prof = find_cached(names, fp)
            if prof is None:
                raise ProfileNotFoundError(
                    f"profile: expected a sensitivity profile for Keras model {model.name!r}, "
                    f"received none (profile=None) and no compatible profile is cached in "
                    f"{_cache.cache_dir()}; fix: pass profile=..., or run "
                    "adapters.keras.profile(model, dataset, loss, cache=True) once"
                )
        else:
            prof = as_profile(
                profile, "compute one with adapters.keras.profile(model, dataset, loss)"
            )
        aligned = align(prof, names, fp, strict=strict)
        resolved = resolve(aligned, names, current, mapping=mapping, missing=missing)
        if granularity == "unit":
            site_p = {s: p for s, (p, src) in resolved.items() if src == "profile"}
            unit_p = aligned.unit_probabilities(site_p, spread=spread)

    rows: list[ReportRow] = []
    factories: dict[int, Callable[[], Any]] = {}
    for site, layer in pairs:
        p, source = resolved[site.name]
        rates = None
        note = ""
        if granularity == "unit" and source in ("profile", "given"):
            why = _unit_note(layer)
            if source == "given":
                note = "a given probability is one per site"
            elif site.name not in unit_p:
                note = "no unit scores in the profile"
            elif why is not None:
                note = why
            else:
                rates = unit_p[site.name]
                if site.units is not None and len(rates) != site.units:
                    raise ProfileMismatchError(
                        f"profile: expected {site.units} unit scores for site {site.name!r} "
                        f"(its input's last axis), received {len(rates)}; fix: compute the "
                        "profile on this model, or use granularity='site'"
                    )
        rows.append(
            ReportRow(
                site.name,
                float(current[site.name]),
                float(p),
                source,
                None if rates is None else len(rates),
                note,
                how=_how(layer, rates),
                kind=site.kind,
            )
        )
        factories[id(layer)] = lambda layer=layer, name=site.name, p=p, rates=rates: _replacement(
            layer, name, p, rates, sched
        )
    notes: list[str] = []
    if isinstance(model, keras.Sequential) or _is_graph_model(model):
        new_model = _rewrite_graph(model, idx, factories)
    else:
        _rewrite_in_place(model, idx, factories)
        new_model = model
        notes.append(
            f"{type(model).__name__} is a subclassed model: its dropout layers were replaced in "
            "place (the returned model is the same object); compile it again before training"
        )
    return new_model, ApplyReport(rows, framework="keras", granularity=granularity, notes=notes)


def _cannot_rewrite(model: Any, why: str) -> ArgumentError:
    return ArgumentError(
        f"model: expected a model whose dropout layers can be replaced, received "
        f"{type(model).__name__} {model.name!r} where {why}; fix: build the model with "
        "keras.layers.Dropout layers held as attributes (subclassed) or in a Sequential/"
        "functional graph, and give custom layers a get_config()"
    )


def _rewrite_graph(model: Any, idx: ModelIndex, factories: Mapping[int, Callable[[], Any]]) -> Any:
    pairs: list[tuple[Any, Any]] = []

    def clone(layer: Any) -> Any:
        if id(layer) in factories:
            return factories[id(layer)]()
        new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    try:
        new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild is reported with its cause
        raise _cannot_rewrite(model, f"keras.models.clone_model failed ({exc!s:.300})") from exc
    for old, new in pairs:
        if getattr(old, "weights", None):
            try:
                new.set_weights(old.get_weights())
            except Exception as exc:  # noqa: BLE001
                raise _cannot_rewrite(
                    model, f"the weights of layer {old.name!r} could not be copied ({exc!s:.200})"
                ) from exc
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
    if _fingerprint(ModelIndex.build(new_model)) != _fingerprint(idx):
        raise _cannot_rewrite(model, "the rebuilt model's weights differ from the original's")
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


def _rewrite_in_place(
    root: Any, idx: ModelIndex, factories: Mapping[int, Callable[[], Any]]
) -> None:
    """Replace site layers held as attributes (or in list/dict attributes) of their parents."""
    made: dict[int, Any] = {}

    def new_for(old: Any) -> Any:
        if id(old) not in made:
            made[id(old)] = factories[id(old)]()
        return made[id(old)]

    for parent in idx.layers:
        if parent is not root and is_site(parent):
            continue
        tracker = getattr(parent, "_tracker", None)
        holders = dict(vars(parent))
        holders.update(getattr(parent, "_modules", None) or {})
        for attr, value in holders.items():
            if attr in ("_layers", "_tracker", "_modules", "_parameters", "_buffers"):
                continue
            if id(value) in factories:
                new = new_for(value)
                _swap_tracked(tracker, value, new)
                setattr(parent, attr, new)
            elif isinstance(value, list):
                for i, item in enumerate(list(value)):
                    if id(item) in factories:
                        new = new_for(item)
                        _swap_tracked(tracker, item, new)
                        list.__setitem__(value, i, new)
            elif isinstance(value, dict):
                for key, item in list(value.items()):
                    if id(item) in factories:
                        new = new_for(item)
                        _swap_tracked(tracker, item, new)
                        dict.__setitem__(value, key, new)
    left = [
        layer.name for layer in idx.site_layers if id(layer) in factories and id(layer) not in made
    ]
    if left:
        raise _cannot_rewrite(
            root,
            f"dropout layers {left[:3]} are not attributes of a layer (nor items of a list or "
            "dict attribute), so they cannot be replaced",
        )
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(root, attr, None) is not None:
            setattr(root, attr, None)  # traced functions captured the old layers


def _swap_tracked(tracker: Any, old: Any, new: Any) -> None:
    if tracker is None:
        return
    if tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)
    else:
        tracker.track(new)
