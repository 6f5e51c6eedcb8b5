"""What ``adapters.torch.apply(model)`` computes when no profile is given or cached.

The policy (text, sample count, caching, the report's note) is :mod:`gd_core.auto`'s; this module
supplies the torch side: which part of the model is pretrained, its objective, a tokenizer, the
batches and the per-sample loss.

* a model with a masked-LM or causal-LM head is profiled with that head's loss;
* a task model (``...ForSequenceClassification`` and the like, whose head is new) is profiled
  through its pretrained encoder (``model.base_model``) with the contrastive objective, so the
  fresh head plays no part;
* a bare encoder gets the contrastive objective;
* a PEFT model is not profiled here (its weights are wrapped): profile the base model first.

Example:
    >>> import transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=12)
    >>> target, objective, path = pretrained_part(transformers.BertForSequenceClassification(cfg))
    >>> type(target).__name__, objective, path
    ('BertModel', 'contrastive', 'bert')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import weights as gd_weights
from gd_core.auto import AutoSettings, Computed, objective_for
from gd_core.errors import ArgumentError
from gd_core.weights import WeightsId

from .._lazy import require

torch = require("torch")

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")


def _peft_base(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (``base_model.model``), else the model."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if type(model).__module__.startswith("peft") and isinstance(inner, torch.nn.Module):
        return inner
    return model


def pretrained_part(model: Any) -> tuple[Any, str, str]:
    """(module to profile, objective, its path in ``model``) for a transformers model."""
    model = _peft_base(model)
    objective = objective_for([type(model).__name__])
    if objective != "contrastive":
        return model, objective, ""
    base = getattr(model, "base_model", None)
    prefix = getattr(model, "base_model_prefix", "")
    if isinstance(base, torch.nn.Module) and base is not model:
        return base, "contrastive", prefix
    return model, "contrastive", ""


def _model_name(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else None


def find_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else the one saved beside the model's checkpoint, else an error."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            transformers = require("transformers", "loading a tokenizer")
            return transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        return tokenizer
    name = _model_name(model)
    folder = Path(name) if name else None
    if (
        folder is not None
        and folder.is_dir()
        and any((folder / f).is_file() for f in _TOKENIZER_FILES)
    ):
        transformers = require("transformers", "loading a tokenizer")
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    if name:  # a hub name: only what is already downloaded (no network at apply time)
        transformers = require("transformers", "loading a tokenizer")
        try:
            return transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, TypeError):
            pass
    raise ArgumentError(
        f"tokenizer: expected a tokenizer for this {type(model).__name__} to turn text into "
        f"batches, received none (the model's checkpoint {name!r} has none saved beside it); "
        "fix: pass apply(model, tokenizer=your_tokenizer), or compute a profile with "
        "`gd profile` / adapters.torch.profile and pass it"
    )


def _tokenize(
    tokenizer: Any, texts: list[str], seq_len: int, batch_size: int
) -> list[dict[str, Any]]:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            max_length=seq_len,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _device(model: Any) -> Any:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def computer(model: Any, tokenizer: Any, gdt: Any, *, loss: Any = None) -> Any:
    """A ``compute(settings) -> Computed`` for :func:`gd_core.auto.cached_or_computed`, or None
    when the model is not a transformers model (no known pretraining objective). ``gdt`` is the
    adapter module (:mod:`adapters.torch`), passed in so this module does not import it.
    A PEFT model gets None too: its weights are wrapped (``base_layer``), so profile the base
    model before adding LoRA (``profile(base, batches, tensors=lora_tensors(base))``)."""
    from .dataflow import wrapped_models

    if _peft_base(model) is not model:
        return None
    inner = wrapped_models(model)
    if not inner and getattr(model, "config", None) is None and loss is None:
        return None
    if tokenizer is None and inner:  # a SentenceTransformer carries its tokenizer
        tokenizer = getattr(model, "tokenizer", None)

    def compute(settings: AutoSettings) -> Computed:
        outer = ""
        profiled = model
        if len(inner) > 1:
            paths = ", ".join(f"model.{p} ({type(m).__name__})" for p, m in inner)
            raise ArgumentError(
                f"model: expected one transformers model inside this {type(model).__name__} to "
                f"profile, received {len(inner)}: {paths}; fix: pass the one to profile, e.g. "
                f"apply(model.{inner[0][0]}), or compute a profile with adapters.torch.profile"
            )
        if inner:
            outer, profiled = inner[0]
        target, objective, path = pretrained_part(profiled)
        path = ".".join(p for p in (outer, path) if p)
        tok = find_tokenizer(target if _model_name(target) else profiled, tokenizer)
        texts, corpus = settings.texts()
        limit = getattr(getattr(target, "config", None), "max_position_embeddings", None)
        seq_len = min(settings.seq_len, limit) if isinstance(limit, int) else settings.seq_len
        device = _device(target)
        batches = [
            {k: v.to(device) for k, v in b.items()}
            for b in _tokenize(tok, texts, seq_len, settings.batch_size)
        ]
        special = list(getattr(tok, "all_special_ids", []) or [])
        chosen = loss
        if chosen is None:
            if objective == "mlm":
                mask = getattr(tok, "mask_token_id", None)
                if mask is None:
                    objective = "contrastive"
                else:
                    chosen = gdt.MaskedLMLoss(
                        mask_token_id=int(mask), special_token_ids=special, seed=settings.seed
                    )
            if objective == "clm":
                chosen = gdt.CausalLMLoss()
            if objective == "contrastive":
                refs = _tokenize(tok, settings.references(corpus), seq_len, 10**6)[0]
                chosen = gdt.ContrastiveLoss(
                    references={k: v.to(device) for k, v in refs.items()},
                    special_token_ids=special,
                    seed=settings.seed,
                )
        else:
            objective = getattr(chosen, "name", type(chosen).__name__)
        prof = gdt.profile(
            target,
            batches,
            loss=chosen,
            progress=settings.progress,
            # the bar's total (and so its ETA): every sample of the batches, none truncated
            max_samples=sum(int(b["input_ids"].shape[0]) for b in batches),
            seed=settings.seed,
            metadata={
                **corpus.metadata(),
                "objective": objective,
                "seq_len": seq_len,
                "model_path": _model_name(target) or "",
            },
        )
        where = f"{type(target).__name__}" + (f" (model.{path})" if path else "")
        return Computed(prof, objective, where, _model_name(target))

    return compute


def weights_id(model: Any, labels: Any = None) -> WeightsId:
    """The digest of the model's weights (:mod:`gd_core.weights`) and the checkpoint it came
    from. ``labels``: the parameters a profile names (its fingerprint, e.g. a bare encoder's
    names on a task model: matched by :func:`gd_core.weights.resolve`), hashed under those names,
    so weights the profile does not depend on (a task head drawn anew at every load) play no
    part; None: every parameter. A PEFT model's LoRA weights are left out and ``.base_layer``
    dropped, so it matches its base model's.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) is not None
        True
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> weights_id(a) == weights_id(a), weights_id(a) == weights_id(b)
        (True, False)
        >>> weights_id(a, ["weight"]) == weights_id(torch.nn.Sequential(a), ["weight"])
        True
    """
    params = {
        name.replace(".base_layer.", "."): p
        for name, p in model.named_parameters()
        if ".lora_" not in name
    }
    chosen = (
        {n: n for n in params}
        if labels is None
        else gd_weights.resolve([str(n) for n in labels], list(params))
    )
    items = []
    for label, name in chosen.items():
        if name is None:
            items.append((label, (), "absent", np.zeros(0)))
            continue
        p = params[name]
        flat = p.detach().reshape(-1)[:: gd_weights.stride(p.numel())]
        if flat.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            flat = flat.float()
        items.append((label, tuple(p.shape), str(p.dtype), flat.cpu().numpy()))
    return WeightsId(gd_weights.digest(items), _model_name(_peft_base(model)))
