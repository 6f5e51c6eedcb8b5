"""PEFT / LoRA: each LoRA module's dropout from the Fisher of the base weight it adapts.

A LoRA layer (``peft.tuners.lora.LoraLayer``) wraps a pretrained ``base_layer`` and adds, per
adapter, ``lora_dropout[adapter] -> lora_A[adapter] -> lora_B[adapter]``; PEFT gives every
module one ``lora_dropout`` value. The rule here: the dropout of ``<module>.lora_dropout.<name>``
guards ``<module>.base_layer.weight``, so its probability comes from that weight's Fisher in a
profile made on the base model (the profile's per-tensor Fisher means, mapped to probabilities
with the profile's mapping across the LoRA modules). Names are translated between the two models:
``base_model.model.`` and ``.base_layer`` are dropped, then the prefix renaming of
:func:`gd_core.align.find_renaming` matches them to the profile (a ``BertModel`` profile applies
to LoRA on a ``BertForSequenceClassification``).

PEFT saves no dropout values per module, so :func:`save` writes them beside the adapter
(``guided_dropout.json``) and :func:`load` puts them back.

Example:
    >>> base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import Fingerprint, SensitivityProfile
from gd_core._io import atomic_write_bytes
from gd_core.align import find_renaming
from gd_core.errors import ArgumentError, ProfileError, ProfileMismatchError, _show
from gd_core.mappings import map_scores
from gd_core.profile import _mapping_dict
from gd_core.report import ReportRow

from .._lazy import require
from ._watch import disarm, warn_at_first_training_forward, when_imported

torch = require("torch")
nn = torch.nn

SIDECAR = "guided_dropout.json"
_PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """A PEFT model's parameter or module name as the base model calls it."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


def is_lora_layer(mod: Any) -> bool:
    return isinstance(getattr(mod, "lora_dropout", None), nn.ModuleDict) and isinstance(
        getattr(mod, "base_layer", None), nn.Module
    )


@dataclass(frozen=True)
class LoraSite:
    """One LoRA module's dropout for one adapter."""

    name: str  # <module>.lora_dropout.<adapter>, the site name in the PEFT model
    holder: Any  # the lora_dropout ModuleDict
    adapter: str
    weight: str  # the base weight's name in the base model's naming

    @property
    def p(self) -> float:
        mod = self.holder[self.adapter]
        return float(getattr(mod, "p", 0.0))


def lora_sites(model: Any) -> list[LoraSite]:
    """Every (LoRA module, adapter) dropout of ``model``; empty for a model without LoRA."""
    out = []
    for path, mod in model.named_modules():
        if not is_lora_layer(mod):
            continue
        weight = getattr(mod.base_layer, "weight", None)
        if weight is None:
            continue
        for adapter in mod.lora_dropout:
            out.append(
                LoraSite(
                    f"{path}.lora_dropout.{adapter}",
                    mod.lora_dropout,
                    adapter,
                    base_name(f"{path}.base_layer.weight"),
                )
            )
    return out


def fingerprint(model: Any) -> Fingerprint:
    """The fingerprint of a PEFT model as its base model would have it under the PEFT prefix:
    LoRA weights left out, ``.base_layer`` dropped (so a base model's profile aligns)."""
    shapes = {
        n.replace(".base_layer.", "."): tuple(p.shape)
        for n, p in model.named_parameters()
        if ".lora_" not in n
    }
    return Fingerprint.from_shapes(shapes)


def lora_tensors(model: Any) -> list[str]:
    """Names of the weights LoRA usually adapts (every ``nn.Linear`` weight but the output head):
    pass them to a profile of the base model so it holds their Fisher (``tensors=``).

    Example:
        >>> import torch
        >>> lora_tensors(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)))
        ['0.weight', '2.weight']
    """
    out = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not path.endswith(("lm_head", "classifier", "score")):
            out.append(f"{path}.weight")
    return out


def probabilities(
    sites: Sequence[LoraSite],
    profile: SensitivityProfile,
    *,
    mapping: str | Mapping[str, Any] | None = None,
    missing: str = "keep",
) -> dict[str, tuple[float, str]]:
    """``{site: (p, source)}``: the LoRA sites whose base weight the profile holds are ranked by
    that weight's Fisher and mapped with the profile's mapping; the others follow ``missing``."""
    means = dict(profile.tensor_means)
    weights = [s.weight for s in sites]
    # rename the base weights into the profile's names (not the other way: the profile keeps many
    # more tensors than LoRA adapts, and a renaming must place most of what it renames)
    renaming = find_renaming(weights, list(means))
    known = {w: float(means[renaming(w)]) for w in weights if renaming(w) in means}
    m = _mapping_dict(profile.mapping if mapping is None else mapping)
    kwargs = {k: m[k] for k in ("p_lower", "p_upper", "target_mean") if k in m}
    have = [s for s in sites if s.weight in known]
    out: dict[str, tuple[float, str]] = {}
    if have:
        scores = np.array([known[s.weight] for s in have])
        probs = map_scores(scores, str(m.get("name", "linear_rank")), **kwargs)
        out.update({s.name: (float(p), "profile") for s, p in zip(have, probs, strict=True)})
    lacking = [s for s in sites if s.name not in out]
    if lacking and missing == "error":
        raise ProfileMismatchError(
            f"profile: expected the Fisher of the base weights LoRA adapts, received a profile "
            f"without {lacking[0].weight!r} (and {len(lacking) - 1} more); fix: profile the base "
            "model with tensors=adapters.torch.lora_tensors(base_model), or pass missing='keep'"
        )
    for s in lacking:
        out[s.name] = (float(m["p_upper"]), "upper") if missing == "upper" else (s.p, "keep")
    return out


def install(
    sites: Sequence[LoraSite], resolved: Mapping[str, tuple[float, str]]
) -> list[ReportRow]:
    """Set each LoRA dropout's probability (an ``nn.Identity``, PEFT's p=0, becomes ``nn.Dropout``)."""
    rows = []
    for s in sites:
        p, source = resolved[s.name]
        old = s.p
        mod = s.holder[s.adapter]
        if hasattr(mod, "p"):
            mod.p = p
        else:
            drop = nn.Dropout(p)
            drop.train(mod.training)
            s.holder[s.adapter] = drop
        note = f"LoRA on {s.weight}"
        rows.append(ReportRow(s.name, old, p, source, note=note, how="p (LoRA)", kind="lora"))
    return rows


SIDECAR_FORMAT = "guided-dropout-lora"
SIDECAR_VERSION = 1


def save(model: Any, folder: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus the LoRA dropout probabilities (``guided_dropout.json``,
    written atomically).

    Example:
        >>> save(peft_model, "my-adapter")  # doctest: +SKIP
        PosixPath('my-adapter/guided_dropout.json')
    """
    model.save_pretrained(str(folder), **kwargs)
    probs = {s.name: s.p for s in lora_sites(model)}
    data = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "p": probs}
    return atomic_write_bytes(Path(folder) / SIDECAR, json.dumps(data, indent=1).encode())


def _sidecar_error(path: Path, field: str, expected: str, received: Any, fix: str) -> ProfileError:
    return ProfileError(
        f"{path}: field {field!r}: expected {expected}, received {_show(received)}; fix: {fix}"
    )


def read_sidecar(path: Path) -> dict[str, float]:
    """The ``{site: p}`` a sidecar holds, checked (format, version, every p in [0, 1))."""
    resave = "save the adapter again with adapters.torch.save_peft(model, folder)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(
            f"{path}: expected the JSON adapters.torch.save_peft writes, received a file that "
            f"does not read ({type(exc).__name__}: {exc}); fix: {resave}"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        got = data.get("format") if isinstance(data, dict) else data
        raise _sidecar_error(path, "format", repr(SIDECAR_FORMAT), got, resave)
    version = data.get("version", SIDECAR_VERSION)  # files from before versions were written
    if version != SIDECAR_VERSION or isinstance(version, bool):
        raise _sidecar_error(
            path, "version", f"{SIDECAR_VERSION} (the version this library reads)", version,
            "upgrade guided-dropout to read it, or " + resave,
        )  # fmt: skip
    probs = data.get("p")
    if not isinstance(probs, dict):
        raise _sidecar_error(path, "p", "an object {LoRA dropout name: p}", probs, resave)
    out = {}
    for name, p in probs.items():
        number = isinstance(p, (int, float)) and not isinstance(p, bool)
        if not number or not math.isfinite(p) or not 0.0 <= p < 1.0:
            raise _sidecar_error(path, f"p[{name!r}]", "a probability in [0, 1)", p, resave)
        out[str(name)] = float(p)
    return out


def _module(name: str) -> tuple[str, str]:
    """``(<module>, <adapter>)`` of a LoRA dropout name ``<module>.lora_dropout.<adapter>``."""
    head, _, adapter = name.rpartition(".lora_dropout.")
    return head, adapter


def match(sites: Sequence[LoraSite], probs: Mapping[str, float], path: Path) -> dict[str, float]:
    """``{model site: p}`` for the sidecar ``probs``: by name; when the sidecar holds one adapter
    and the model another (one each), by module, with a warning. Entries no site of the model
    matches are refused (a sidecar of another model); sites the sidecar lacks are warned about."""
    names = {s.name for s in sites}
    saved_adapters = sorted({_module(n)[1] for n in probs})
    model_adapters = sorted({s.adapter for s in sites})
    chosen = {n: p for n, p in probs.items() if n in names}
    if not chosen and len(saved_adapters) == 1 and len(model_adapters) == 1 and probs:
        by_module = {_module(n)[0]: p for n, p in probs.items()}
        chosen = {
            s.name: by_module[_module(s.name)[0]] for s in sites if _module(s.name)[0] in by_module
        }
        if chosen:
            warnings.warn(
                f"{path}: saved for the LoRA adapter {saved_adapters[0]!r}, restored onto the "
                f"model's adapter {model_adapters[0]!r} module by module",
                UserWarning,
                stacklevel=3,
            )
    if len(chosen) != len(probs):
        theirs = {_module(n)[0] for n in chosen}
        unknown = [n for n in probs if n not in chosen and _module(n)[0] not in theirs]
        unknown = unknown or [n for n in probs if n not in chosen]
        raise ProfileMismatchError(
            f"{path}: expected LoRA dropouts of this model (adapters {model_adapters}), received "
            f"{len(unknown)} entries it does not have, e.g. {unknown[:3]}; fix: load the adapter "
            "saved for this base model (same layers and adapter names), or apply a profile "
            "again with adapters.torch.apply(model, profile)"
        )
    lacking = [s.name for s in sites if s.name not in chosen]
    if lacking:
        warnings.warn(
            f"{path}: holds no p for {len(lacking)} LoRA dropouts of this model (e.g. "
            f"{lacking[:3]}); they keep their current p",
            UserWarning,
            stacklevel=3,
        )
    return chosen


def load(model: Any, folder: str | os.PathLike[str]) -> dict[str, float]:
    """Put the probabilities :func:`save` wrote back on a PEFT model loaded from ``folder``;
    returns what was restored, by the model's site names. The file is checked first
    (:func:`read_sidecar`, :func:`match`): bad values and entries for modules the model does not
    have are refused, naming the file and entry.

    Example:
        >>> model = peft.PeftModel.from_pretrained(base, "my-adapter")  # doctest: +SKIP
        >>> load(model, "my-adapter")  # doctest: +SKIP
        {'base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.default': 0.0, ...}
    """
    path = Path(folder) / SIDECAR
    if not path.is_file():
        raise ArgumentError(
            f"folder: expected a PEFT adapter saved with adapters.torch.save_peft (it holds "
            f"{SIDECAR}), received {str(folder)!r} without one; fix: save it with "
            "adapters.torch.save_peft(model, folder)"
        )
    sites = lora_sites(model)
    chosen = match(sites, read_sidecar(path), path)
    _disarm(model)
    install([s for s in sites if s.name in chosen], {n: (p, "given") for n, p in chosen.items()})
    return chosen


# -- a PEFT adapter loaded without load_peft warns ----------------------------------------------
_UNLOADED = "_gd_lora_unloaded"


def _disarm(model: Any) -> None:
    disarm(model, _UNLOADED)


def _arm(model: Any, folder: Any) -> None:
    """After ``PeftModel.from_pretrained`` of a folder holding a sidecar: warn once, at the first
    training-mode forward, unless :func:`load` has put the probabilities back."""
    try:
        path = Path(str(folder)) / SIDECAR
        present = path.is_file()
    except (OSError, TypeError, ValueError):
        return
    if not present or not isinstance(model, nn.Module):
        return

    warn_at_first_training_forward(
        model,
        _UNLOADED,
        f"the adapter folder holds {path} (guided LoRA dropout probabilities) that was not "
        "loaded, so PEFT's lora_dropout runs; fix: call "
        f"adapters.torch.load_peft(model, {str(folder)!r}) after loading",
    )


def _patch_peft(module: Any) -> None:
    base = getattr(module, "PeftModel", None)
    current = getattr(base, "__dict__", {}).get("from_pretrained")
    func = getattr(current, "__func__", None)
    if func is None or getattr(func, "_gd_watch", False):
        return

    @functools.wraps(func)
    def from_pretrained(cls: Any, model: Any, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        out = func(cls, model, model_id, *args, **kwargs)
        _arm(out, model_id)
        return out

    from_pretrained._gd_watch = True  # type: ignore[attr-defined]
    base.from_pretrained = classmethod(from_pretrained)


def watch_peft() -> None:
    """Make ``PeftModel.from_pretrained`` arm :func:`_arm`: now if PEFT is imported, else as soon
    as it is (importing this adapter never imports PEFT)."""
    when_imported("peft.peft_model", _patch_peft)
