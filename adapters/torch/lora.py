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

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import Fingerprint, SensitivityProfile
from gd_core.align import find_renaming
from gd_core.errors import ArgumentError, ProfileMismatchError
from gd_core.mappings import map_scores
from gd_core.profile import _mapping_dict
from gd_core.report import ReportRow

from .._lazy import require

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


def save(model: Any, folder: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus the LoRA dropout probabilities (``guided_dropout.json``).

    Example:
        >>> save(peft_model, "my-adapter")  # doctest: +SKIP
        PosixPath('my-adapter/guided_dropout.json')
    """
    model.save_pretrained(str(folder), **kwargs)
    path = Path(folder) / SIDECAR
    probs = {s.name: s.p for s in lora_sites(model)}
    path.write_text(json.dumps({"format": "guided-dropout-lora", "p": probs}, indent=1))
    return path


def load(model: Any, folder: str | os.PathLike[str]) -> dict[str, float]:
    """Put the probabilities :func:`save` wrote back on a PEFT model loaded from ``folder``.

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
    probs = {str(k): float(v) for k, v in json.loads(path.read_text())["p"].items()}
    sites = lora_sites(model)
    install(sites, {s.name: (probs.get(s.name, s.p), "given") for s in sites})
    return probs
