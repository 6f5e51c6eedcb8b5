"""Replacing the dropout layers a layer holds, and keeping them when the model is saved.

A layer that makes its own dropout layers (keras_hub's ``TransformerEncoder`` and
``TransformerDecoder``, a custom layer creating ``Dropout`` in ``__init__`` or ``build``) makes
them again from its config when a ``.keras`` file is loaded, and its config holds hyperparameters
(one ``dropout`` for all of them), not the layers: the guided probabilities would be lost; so
would a subclassed model's, which makes its layers in ``__init__``. So :func:`carry` gives such a
layer (or subclassed model), once ``apply`` has replaced its dropout layers, the class
``Guided<Name>``: a subclass of its own class made here (with the same ``__name__``), whose
config also holds the dropout layers now inside it (key ``guided_dropout``) and which puts them
back when it is built again. ``keras.saving.load_model`` (after ``import adapters.keras``, which
registers the classes, as for :class:`~adapters.keras.GuidedDropout`) then returns the guided
probabilities, per-unit rates and schedules; ``isinstance(layer, TransformerEncoder)`` still holds.

Every ``Guided<Name>`` class is saved under one registered name (``guided_dropout>GuidedSites``):
loading resolves it to :class:`GuidedSites`, whose ``from_config`` finds the base class recorded
in the config (registered name, or a ``keras``/``keras_hub`` module) and makes the subclass again.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from gd_core.errors import ArgumentError, ProfileError

from .discovery import ModelIndex, _is_graph_model, is_site
from .layer import HOOK, keras

CONFIG_KEY = "guided_dropout"
#: the version of the ``guided_dropout`` entry of a ``Guided<Name>`` config
SAVED_VERSION = 1
_PACKAGE, _NAME = "guided_dropout", "GuidedSites"
#: packages whose modules Keras itself imports when loading (``_retrieve_class_or_fn``)
_KERAS_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})
_CLASSES: dict[type, type] = {}


def _register(cls: type) -> type:
    return keras.saving.register_keras_serializable(package=_PACKAGE, name=_NAME)(cls)


@_register
class GuidedSites:
    """Mixin of every ``Guided<Name>`` layer class (see the module); its registered name.

    Example:
        >>> import keras
        >>> from adapters.keras.holders import guided_class
        >>> cls = guided_class(keras.layers.TimeDistributed)
        >>> cls.__qualname__, cls.__name__, issubclass(cls, keras.layers.TimeDistributed)
        ('GuidedTimeDistributed', 'TimeDistributed', True)
        >>> keras.saving.get_registered_name(cls)
        'guided_dropout>GuidedSites'
    """

    _gd_base: type | None = None
    _gd_pending: list[dict[str, Any]] | None = None

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()  # type: ignore[misc]
        held = _held_sites(self)
        config[CONFIG_KEY] = {
            "version": SAVED_VERSION,
            "base": _class_info(self._gd_base or type(self)),
            "sites": [keras.saving.serialize_keras_object(layer) for layer in held],
        }
        hooks = _hooks_of(self, held)
        if hooks:  # sites inserted on the output of a layer in it (adapters.keras.inserted)
            config[CONFIG_KEY]["hooks"] = hooks
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        config = dict(config)
        saved = config.get(CONFIG_KEY)
        if not isinstance(saved, dict) or not isinstance(saved.get("sites"), list):
            raise TypeError(
                f"{cls.__name__}.from_config: expected a config with {CONFIG_KEY!r} (the dropout "
                f"layers a guided layer holds, as adapters.keras saves them), received keys "
                f"{sorted(config)}; fix: load a .keras file saved after adapters.keras.apply"
            )
        if cls is GuidedSites:  # the registered name of every Guided<Name>: find its base class
            return guided_class(_resolve(saved.get("base"))).from_config(config)
        _check_saved(saved, str(config.get("name") or cls.__name__))
        del config[CONFIG_KEY]
        layer = super().from_config(config)  # type: ignore[misc]
        sites = list(saved["sites"])
        for h in saved.get("hooks") or ():  # sites inserted on a layer's output: marked
            i = h.get("site") if isinstance(h, dict) else None
            if not isinstance(i, int) or not 0 <= i < len(sites):
                raise ProfileError(
                    f"layer {config.get('name')!r}: field '{CONFIG_KEY}.hooks': expected "
                    f"entries {{'site': index into sites, 'layer': position, 'output': index}}, "
                    f"received {h!r}; fix: save the model again after adapters.keras.apply"
                )
            sites[i] = {"hook": h, "site": sites[i]}
        object.__setattr__(layer, "_gd_pending", sites)
        if layer.built or _default_build(cls._gd_base):
            _install_pending(layer)  # made in __init__ (else when built: see guided_class)
        return layer


def guided_class(base: Any) -> Any:
    """``Guided<Name>``: ``base`` whose config keeps the dropout layers installed in it (cached).

    Example:
        >>> import keras
        >>> guided_class(keras.layers.TimeDistributed) is guided_class(keras.layers.TimeDistributed)
        True
    """
    if issubclass(base, GuidedSites):
        return base
    if base in _CLASSES:
        return _CLASSES[base]
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"Guided{base.__name__}",
        "__doc__": f"{base.__name__} keeping its guided dropout layers when saved "
        "(adapters.keras.holders).",
        "_gd_base": base,
    }
    if not _default_build(base):

        @functools.wraps(base.build)  # Keras records the build shapes by build's signature
        def build(self: Any, *args: Any, **kwargs: Any) -> None:
            base.build(self, *args, **kwargs)
            _install_pending(self)

        namespace["build"] = build
    # the same __name__: Keras names weights in .weights.h5 / .keras files after the class name,
    # so the original's weight files load into the guided model and the reverse
    cls = type(base.__name__, (GuidedSites, base), namespace)
    # one registered name for all (a fresh process cannot know the classes made here): register
    # the new class under it, so Keras writes that name, then give the name back to GuidedSites
    _register(cls)
    _register(GuidedSites)
    _CLASSES[base] = cls
    return cls


def carry(layer: Any) -> None:
    """Give ``layer`` (a layer or subclassed model; a Sequential or functional model's config holds
    its layers already) the class ``Guided<Name>`` if it holds dropout sites, so that a saved
    ``.keras`` file keeps them; see the module. ``apply`` calls it.

    Example:
        >>> import keras
        >>> class Block(keras.layers.Layer):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.drop = keras.layers.Dropout(0.1)
        ...     def call(self, x):
        ...         return self.drop(x)
        >>> block = Block()
        >>> carry(block)
        >>> type(block).__qualname__, isinstance(block, Block), "guided_dropout" in block.get_config()
        ('GuidedBlock', True, True)
    """
    graph = isinstance(layer, keras.Sequential) or _is_graph_model(layer)
    if graph or isinstance(layer, GuidedSites) or not _held_sites(layer):
        return  # a graph's config already holds its layers
    layer.__class__ = guided_class(type(layer))


def _default_build(base: Any) -> bool:
    return base is None or bool(getattr(base.build, "_is_default", False))


def _held_sites(layer: Any) -> list[Any]:
    return list(ModelIndex.build(layer).site_layers)


def _class_info(cls: type) -> dict[str, Any]:
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": keras.saving.get_registered_name(cls),
    }


def _resolve(info: Any) -> Any:
    """The layer class a saved ``Guided<Name>`` extends (as Keras itself finds classes)."""
    if not isinstance(info, dict) or not isinstance(info.get("class_name"), str):
        raise TypeError(
            f"{CONFIG_KEY}.base: expected the saved layer class ({{'module', 'class_name', "
            f"'registered_name'}}), received {info!r}; fix: save the model again after apply"
        )
    name, module = info["class_name"], str(info.get("module") or "")
    found = keras.saving.get_registered_object(info.get("registered_name") or name)
    if found is None and module.split(".")[0] in _KERAS_PACKAGES:
        try:
            found = vars(importlib.import_module(module)).get(name)
        except ImportError:
            found = None
    if not (isinstance(found, type) and issubclass(found, keras.layers.Layer)):
        raise TypeError(
            f"Could not locate the layer class {module}.{name} that the guided layer "
            f"Guided{name} saved in this file extends; fix: import the module defining {name} "
            f"(registered with keras.saving.register_keras_serializable) before loading, or "
            f"pass custom_objects={{{name!r}: {name}}} to keras.saving.load_model"
        )
    return found


def _check_saved(saved: Mapping[str, Any], name: str) -> None:
    """Refuse a ``guided_dropout`` config of a version this code does not know, or one whose
    ``sites`` holds a layer that is not a dropout layer (e.g. ``GaussianNoise`` edited in)."""
    version = saved.get("version")
    if version != SAVED_VERSION or isinstance(version, bool):
        raise ProfileError(
            f"layer {name!r}: field '{CONFIG_KEY}.version': expected {SAVED_VERSION} (the version "
            f"this guided-dropout reads), received {version!r}; fix: upgrade guided-dropout to "
            "load this file, or load the model without it and call adapters.keras.apply again"
        )
    for i, entry in enumerate(saved["sites"]):
        layer = None
        if isinstance(entry, dict):
            try:
                layer = keras.saving.deserialize_keras_object(entry)
            except Exception:  # noqa: BLE001 - reported below, naming the entry
                layer = None
        if not is_site(layer):
            what = entry.get("class_name") if isinstance(entry, dict) else entry
            raise ProfileError(
                f"layer {name!r}: field '{CONFIG_KEY}.sites[{i}]': expected a saved dropout "
                f"layer (Dropout, GuidedDropout, SpatialDropout...), received {what!r}; fix: "
                "put back the dropout layer the file was saved with, or load the model without "
                "it and call adapters.keras.apply again"
            )


def _install_pending(layer: Any) -> None:
    """Put the dropout layers saved in the config back in place of those the layer just made."""
    saved = layer._gd_pending
    if saved is None:
        return
    object.__setattr__(layer, "_gd_pending", None)
    hooks = [h for h in saved if isinstance(h, dict) and h.get("hook") is not None]
    saved = [s for s in saved if s not in hooks]
    idx = ModelIndex.build(layer)
    found = idx.site_layers
    if len(found) != len(saved):
        names = [s.get("config", {}).get("name") for s in saved]
        warnings.warn(
            f"{type(layer).__name__} {layer.name!r}: the saved file holds {len(saved)} guided "
            f"dropout layers ({names}) but the layer made {len(found)}, so its dropout layers "
            f"keep the rates of its config, not the guided ones; fix: call "
            f"adapters.keras.apply(model, profile) on the loaded model again",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    factories: dict[int, Callable[[], Any]] = {
        id(old): functools.partial(keras.saving.deserialize_keras_object, config)
        for old, config in zip(found, saved, strict=True)
    }
    _rewrite_in_place(layer, idx, factories)
    _restore_hooks(layer, hooks)


def _cannot_rewrite(model: Any, why: str) -> ArgumentError:
    return ArgumentError(
        f"model: expected a model whose dropout layers can be replaced, received "
        f"{type(model).__name__} {model.name!r} where {why}; fix: build the model with "
        "keras.layers.Dropout layers held as attributes (subclassed) or in a Sequential/"
        "functional graph, and give custom layers a get_config()"
    )


def _rewrite_in_place(
    root: Any,
    idx: ModelIndex,
    factories: Mapping[int, Callable[[], Any]],
    done: set[int] | None = None,
) -> None:
    """Replace site layers held as attributes (or in list/dict attributes) of their parents
    (``done``: ids of those replaced otherwise already, e.g. as nodes of a functional graph)."""
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
            if id(value) in factories and attr == HOOK:  # inserted: untracked, as it was
                object.__setattr__(parent, attr, new_for(value))
            elif id(value) in factories:
                new = new_for(value)
                _swap_tracked(tracker, value, new)
                setattr(parent, attr, new)
                if attr == "_dropout_layer" and isinstance(
                    getattr(parent, "_dropout", None), float
                ):
                    # MultiHeadAttention rebuilds its dropout from its config when loaded: keep
                    # the config's rate the one now in force, so a saved model keeps it
                    parent._dropout = float(new.rate)
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
        layer.name
        for layer in idx.site_layers
        if id(layer) in factories and id(layer) not in made and id(layer) not in (done or ())
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


# -- sites inserted on a layer's output (adapters.keras.inserted) ------------------------------
def _plain_layers(layer: Any) -> list[Any]:
    """The layers under ``layer`` (itself first) that are not sites: laid out alike in a copy
    built from the same config, before and after sites are inserted."""
    return [x for x in ModelIndex.build(layer).layers if x is layer or not is_site(x)]


def _hooks_of(layer: Any, held: list[Any]) -> list[dict[str, Any]]:
    """Where each inserted site of ``held`` sits: ``{"site": its index in held, "layer": the
    position of the layer it drops the output of, "output": which output}``."""
    from .inserted import hooked

    plain = _plain_layers(layer)
    out = []
    for pos, x in enumerate(plain):
        site = hooked(x)
        if site is None:
            continue
        i = next(i for i, h in enumerate(held) if h is site)
        out.append({"site": i, "layer": pos, "output": int(getattr(x, "_gd_hook_output", 0))})
    return out


def _restore_hooks(layer: Any, hooks: list[dict[str, Any]]) -> None:
    from .inserted import hook

    if not hooks:
        return
    plain = _plain_layers(layer)
    for h in hooks:
        pos = h["hook"].get("layer")
        if not isinstance(pos, int) or not 0 <= pos < len(plain):
            warnings.warn(
                f"{type(layer).__name__} {layer.name!r}: the saved file holds a guided dropout "
                f"inserted on the output of its layer number {pos!r}, but the layer has "
                f"{len(plain)} layers, so it was not put back; fix: call "
                "adapters.keras.apply(model, profile) on the loaded model again",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        drop = keras.saving.deserialize_keras_object(h["site"])
        hook(plain[pos], drop, int(h["hook"].get("output", 0)))


def insert_sites(model: Any, idx: ModelIndex, inserts: Mapping[str, Any]) -> list[str]:
    """Install the sites to insert (``{name: (Point of idx, factory)}``) into ``model``, a copy
    of ``idx.model`` laid out alike (or that model itself), and make the layers holding them
    keep them in a ``.keras`` file. Returns notes for the report."""
    from .inserted import hook

    if not inserts:
        return []
    new = ModelIndex.build(model)
    by_name = {new.layer_names[id(x)]: x for x in new.layers}
    notes = []
    tops: dict[int, Any] = {}
    for name, (point, factory) in inserts.items():
        target = by_name.get(idx.layer_names[id(point.layer)])
        if target is None:
            raise _cannot_rewrite(model, f"the layer {name!r} is inserted on is not in the copy")
        hook(target, factory(), point.output)
        top, graph = target, new.parent.get(id(target))
        while graph is not None and not _is_graph_model(graph):
            top, graph = graph, new.parent.get(id(graph))
        if graph is not None:
            tops[id(top)] = (top, graph)
    for top, graph in tops.values():
        carry(top)
        if getattr(graph, "_gd_own_get_config", None) is None and not _keeps_layers(graph):
            notes.append(
                f"{type(graph).__name__} {graph.name!r} is saved by its own config (not its "
                "layers), so a .keras file of it would not hold the inserted sites: saving it "
                "raises; save the weights (model.save_weights) and call apply again after "
                "building the model"
            )
            _refuse_saving(graph)
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)  # traced functions captured the model without the sites
    return notes


def _keeps_layers(graph: Any) -> bool:
    try:
        return "layers" in graph.get_config()
    except Exception:  # noqa: BLE001 - a config that cannot be made keeps nothing
        return False


def refuse_saving_plain(graph: Any, notes: list[str]) -> None:
    """Make saving ``graph`` raise when its config holds hyperparameters, not its layers: a
    ``.keras`` file of it would load plain dropout layers at the config's rates (a rebuilt
    keras_hub backbone). A note saying so goes to ``notes``."""
    if _keeps_layers(graph):
        return
    notes.append(
        f"{type(graph).__name__} {graph.name!r} is saved by its own config (its "
        "hyperparameters, not its layers), so a .keras file of it would load plain dropout "
        "layers at the config's rates (and no inserted sites): saving it raises; save the weights "
        "(model.save_weights) and call apply again after building the model"
    )
    _refuse_saving(graph)


def config_of(graph: Any) -> Any:
    """``graph.get_config()``, or the config it had before saving it was refused."""
    own = getattr(graph, "_gd_own_get_config", None)
    return own() if own is not None else graph.get_config()


def _refuse_saving(graph: Any) -> None:
    if getattr(graph, "_gd_own_get_config", None) is None:
        object.__setattr__(graph, "_gd_own_get_config", graph.get_config)

    def get_config() -> Any:
        raise ArgumentError(
            f"model: expected a model whose .keras file keeps its guided dropout sites, "
            f"received {type(graph).__name__} {graph.name!r}, whose config holds its "
            "hyperparameters, not its layers (loaded, it would run its config's dropout "
            "rates); fix: save the weights (model.save_weights) and call adapters.keras.apply "
            "again on the model built from its config"
        )

    def save(*args: Any, **kwargs: Any) -> Any:
        get_config()  # before Keras opens the file: nothing half-written on disk

    object.__setattr__(graph, "get_config", get_config)
    object.__setattr__(graph, "save", save)
