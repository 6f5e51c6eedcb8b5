"""The transformers model classes the zoo sweep covers, each built from a tiny config, offline.

Classes come from transformers' auto mappings (sequence classification, masked LM, causal LM,
seq-to-seq LM, image and audio classification), deduplicated by class name. Each config class is
instantiated with its defaults, then every size attribute it has is shrunk (one generic table,
:data:`TINY`; per-family overrides in :data:`OVERRIDES` only where the generic one fails). Dropout
rates the config keeps at 0 by default are set to 0.1 so dropout sites exist; which fields were
raised is recorded in :attr:`Built.raised`. A class that cannot be built records why
(:class:`BuildFailure`): a missing optional dependency, a composite model that needs a
checkpoint, a config the generic shrinking breaks, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the auto mappings the sweep enumerates, and the task each stands for
MAPPINGS = {
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "seq-cls",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "masked-lm",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal-lm",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "seq2seq-lm",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "image-cls",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES": "audio-cls",
}

# generic tiny sizes: set on a config (and its sub-configs) only where the attribute exists
TINY: dict[str, Any] = {
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "embed_dim": 32,
    "dim": 32,
    "embedding_size": 32,
    "word_embed_proj_dim": 32,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "d_kv": 8,
    "intermediate_size": 37,
    "ffn_dim": 37,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
    "d_ff": 37,
    "n_inner": 37,
    "hidden_dim": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "max_source_positions": 32,
    "max_target_positions": 32,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "window_size": 2,
    "num_labels": 3,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "num_mel_bins": 16,
    "max_length": 32,
    "type_vocab_size": 2,
    "pooler_hidden_size": 32,
    "projection_dim": 32,
    "classifier_proj_size": 32,
}

# LayerDrop skips whole layers at random in training: off, so one forward reaches every site
_LAYERDROP = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")

# the ids a tiny vocabulary must still hold
_TOKEN_IDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
)

# per-family overrides, applied after TINY (model_type -> {attribute: value})
OVERRIDES: dict[str, dict[str, Any]] = {
    "swin": {"depths": [1, 1], "num_heads": [2, 4], "embed_dim": 16},
    "swinv2": {"depths": [1, 1], "num_heads": [2, 4], "embed_dim": 16},
    "donut-swin": {"depths": [1, 1], "num_heads": [2, 4], "embed_dim": 16},
    "convnext": {"depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2},
    "convnextv2": {"depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2},
    "resnet": {"depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8},
    "regnet": {"depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8, "groups_width": 8},
    "whisper": {"max_source_positions": 8, "num_mel_bins": 16},
}

# the convolutional feature encoder of wav2vec2-like audio models (set where conv_dim exists)
_TINY_CONV = {
    "conv_dim": [16, 16],
    "conv_kernel": [10, 3],
    "conv_stride": [5, 2],
    "num_feat_extract_layers": 2,
}

# dropout-rate fields: names containing these are rates (raised to 0.1 when 0 by default)
_RATE_WORDS = ("dropout", "pdrop", "drop_prob")


@dataclass(frozen=True)
class Entry:
    """One model class of the registry."""

    model_type: str
    cls_name: str
    tasks: tuple[str, ...]

    @property
    def task(self) -> str:
        return self.tasks[0]


@dataclass
class Built:
    """A tiny random model, ready for the invariants."""

    entry: Entry
    model: Any
    input_kind: str  # input_ids | pixel_values | input_values | input_features
    # config rates changed: "name" (0 -> 0.1, so the site exists), "name=0" (LayerDrop off)
    raised: list[str] = field(default_factory=list)

    def batches(self, n: int = 2, size: int = 2, seed: int = 0) -> list[dict[str, Any]]:
        """``n`` tiny batches of the model's own input kind (keyword dicts for ``model(**b)``)."""
        return [make_inputs(self.model, self.input_kind, size, seed + i) for i in range(n)]


@dataclass
class BuildFailure:
    """Why a class could not be built: ``category`` (short) and the exception's message."""

    entry: Entry
    category: str
    message: str


def entries() -> list[Entry]:
    """Every class named by the auto mappings, once, in model-type order."""
    from transformers.models.auto import modeling_auto as ma

    found: dict[str, tuple[str, list[str]]] = {}
    for mapping, task in MAPPINGS.items():
        for model_type, names in getattr(ma, mapping, {}).items():
            for cls_name in names if isinstance(names, (tuple, list)) else (names,):
                mt, tasks = found.setdefault(cls_name, (model_type, []))
                if task not in tasks:
                    tasks.append(task)
    return sorted(
        (Entry(mt, c, tuple(t)) for c, (mt, t) in found.items()),
        key=lambda e: (e.model_type, e.cls_name),
    )


def by_class(cls_name: str) -> Entry:
    for e in entries():
        if e.cls_name == cls_name:
            return e
    raise KeyError(f"{cls_name} is in none of transformers' auto mappings {sorted(MAPPINGS)}")


def _sub_configs(config: Any) -> list[Any]:
    from transformers import PretrainedConfig

    out = []
    for v in vars(config).values():
        if isinstance(v, PretrainedConfig):
            out.append(v)
            out.extend(_sub_configs(v))
    return out


def _shrink(config: Any, model_type: str, sizes: dict[str, Any]) -> list[str]:
    """Set the tiny sizes on ``config`` and its sub-configs; raise zero rates, switch LayerDrop
    off; return the rate fields changed (``name``: 0 -> 0.1, ``name=0``: LayerDrop off)."""
    raised = []
    for cfg in [config, *_sub_configs(config)]:
        have = vars(cfg)
        over = OVERRIDES.get(model_type, {})
        for name, value in {**TINY, **sizes, **over}.items():
            if name in over or (name in have and not isinstance(have[name], (list, tuple, dict))):
                try:
                    setattr(cfg, name, value)
                except (AttributeError, ValueError, TypeError):
                    pass
        if "conv_dim" in have:  # wav2vec2-like feature encoders: two small conv layers
            for name, value in _TINY_CONV.items():
                setattr(cfg, name, value)
        for name in _LAYERDROP:
            if isinstance(have.get(name), float) and have[name] > 0:
                setattr(cfg, name, 0.0)
                raised.append(f"{name}=0")
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and "pad_token_id" in have and have["pad_token_id"] is None:
            cfg.pad_token_id = 0  # sequence classification of a batch needs a padding token
        for name in _TOKEN_IDS:
            tid = have.get(name)
            if isinstance(vocab, int) and isinstance(tid, int) and tid >= vocab:
                setattr(cfg, name, vocab - 1)
        for name, value in list(have.items()):
            low = name.lower()
            if any(w in low for w in _RATE_WORDS) and isinstance(value, float) and value == 0.0:
                if "path" in low or "layerdrop" in low:
                    continue  # stochastic depth stays as configured
                setattr(cfg, name, 0.1)
                raised.append(name)
    return raised


def _category(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) or "requires the" in text or "pip install" in text:
        return "missing optional dependency"
    if "from_pretrained" in text or "checkpoint" in text.lower():
        return "needs a checkpoint"
    return "tiny config does not build"


def build(entry: Entry, seed: int = 0) -> Built | BuildFailure:
    """The tiny model of ``entry`` in training mode, or why it cannot be built. When the model's
    own forward fails with the generic sizes, it is built once more with the widths aligned
    (:data:`ALIGNED`: fused / grouped kernels want 16-byte strides) and that is recorded."""
    first = _build(entry, seed, {})
    if not isinstance(first, BuildFailure) or first.category != _OWN_FORWARD:
        return first
    second = _build(entry, seed, ALIGNED)
    if isinstance(second, Built):
        second.raised.append("intermediate sizes 32 (37 fails)")
        return second
    return first


# the retry's sizes: every width a multiple of 8
ALIGNED = {k: 32 for k, v in TINY.items() if v == 37} | {"moe_intermediate_size": 32}
_OWN_FORWARD = "own forward fails on the tiny inputs"


def _build(entry: Entry, seed: int, sizes: dict[str, Any]) -> Built | BuildFailure:
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        cls = getattr(transformers, entry.cls_name)
        config = CONFIG_MAPPING[entry.model_type]()
        raised = _shrink(config, entry.model_type, sizes)
        if hasattr(config, "use_cache"):
            config.use_cache = False  # training forwards; a cache object does not export
        torch.manual_seed(seed)
        model = cls(config)
        model.train()
        kind = getattr(model, "main_input_name", "input_ids")
        batch = make_inputs(model, kind, 2, seed)  # fails when the input kind is not supported
    except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
        return BuildFailure(entry, _category(exc), f"{type(exc).__name__}: {str(exc)[:300]}")
    try:  # the model's own forward and loss, before the library touches it
        with torch.no_grad(), torch.random.fork_rng():
            zoo_loss(model, batch)
    except Exception as exc:  # noqa: BLE001 - a tiny config or input the model does not take
        return BuildFailure(entry, _OWN_FORWARD, f"{type(exc).__name__}: {str(exc)[:300]}")
    return Built(entry, model, kind, raised)


def zoo_loss(model: Any, batch: Any) -> Any:
    """Per-sample loss of any zoo model: the negative log-probability of class / token 0,
    averaged over positions (an empirical-Fisher objective that needs no labels)."""
    import torch

    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    logp = torch.log_softmax(logits.float(), dim=-1)[..., 0]
    return -logp.reshape(logp.shape[0], -1).mean(dim=1)


zoo_loss.name = "zoo"  # type: ignore[attr-defined]


def _config(model: Any) -> Any:
    return model.config


def make_inputs(model: Any, kind: str, size: int, seed: int) -> dict[str, Any]:
    """One batch of ``size`` samples the model takes (seeded, independent of the global RNG)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    cfg = _config(model)
    out: dict[str, Any] = {}
    if kind == "input_ids":
        vocab = getattr(cfg, "vocab_size", None) or getattr(
            getattr(cfg, "text_config", None), "vocab_size", 99
        )
        ids = torch.randint(3, max(4, min(vocab, 99)), (size, 8), generator=gen)
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < vocab:  # one end-of-sequence token per row
            ids[ids == eos] = 3 if eos != 3 else 4
            ids[:, -1] = eos
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif kind == "pixel_values":
        side = getattr(cfg, "image_size", 32)
        side = side[0] if isinstance(side, (list, tuple)) else side
        chans = getattr(cfg, "num_channels", 3)
        out = {"pixel_values": torch.randn(size, chans, side, side, generator=gen)}
    elif kind == "input_values":
        if "AST" in type(model).__name__:
            shape = (size, getattr(cfg, "max_length", 32), getattr(cfg, "num_mel_bins", 16))
            out = {"input_values": torch.randn(*shape, generator=gen)}
        else:
            out = {"input_values": torch.randn(size, 1600, generator=gen)}
    elif kind == "input_features":
        frames = 2 * getattr(cfg, "max_source_positions", 8)
        bins = getattr(cfg, "num_mel_bins", 16)
        out = {"input_features": torch.randn(size, bins, frames, generator=gen)}
    else:
        raise ValueError(f"input kind {kind!r} is not one the zoo builds")
    head = type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False) and "Classification" not in head:
        dec = torch.randint(3, 20, (size, 5), generator=gen)
        out["decoder_input_ids"] = dec
    return out
