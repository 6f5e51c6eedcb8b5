"""The keras_hub sweep (issue 23): every ``keras_hub.models`` Backbone class built offline from
generic tiny constructor arguments, with the site invariants checked on each.

On each backbone that builds: (a) ``sites``, ``profile`` and ``apply`` raise no internal error (a
library error, such as ``NoSitesError`` for a model without dropout, is a clear error and is
recorded as the outcome); (b) after ``apply`` with a distinct p per site, every dropout layer
one training forward calls runs at an installed p, and every site's p reaches a call; (c) no
parameter is guarded by two sites. A class the generic arguments cannot build is recorded with
the reason. ``tests/keras/test_hub_zoo.py`` runs a fixed sample, and every class with
``GD_ZOO=all``; ``python tests/keras/hub_zoo.py --write docs/zoo-keras.md`` writes the summary.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: generic tiny values for the constructor arguments keras_hub backbones share
TINY: dict[str, Any] = {
    "vocabulary_size": 50,
    "vocab_size": 50,
    "num_layers": 2,
    "num_hidden_layers": 2,
    "hidden_dim": 8,
    "hidden_size": 8,
    "embedding_dim": 8,
    "intermediate_dim": 16,
    "intermediate_size": 16,
    "moe_intermediate_dim": 8,
    "num_heads": 2,
    "num_attention_heads": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "head_size": 4,
    "num_experts": 2,
    "top_k": 1,
    "max_sequence_length": 16,
    "max_position_embeddings": 16,
    "rope_theta": 10000.0,
    "rotary_percentage": 0.5,  # head size 4: a rotary dimension of 2 (0.25 makes it odd)
    "patch_size": 4,
    "image_shape": (32, 32, 3),
    "image_size": 32,
    "pad_token_id": 0,
    "hidden_activation": "gelu",
    "hidden_act": "gelu",
    "sliding_window": 8,
    "layer_norm_epsilon": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
    "use_bias": True,
    "encoder_num_layers": 2,
    "decoder_num_layers": 2,
    "encoder_hidden_dim": 8,
    "decoder_hidden_dim": 8,
    "encoder_intermediate_dim": 16,
    "decoder_intermediate_dim": 16,
    "encoder_num_heads": 2,
    "decoder_num_heads": 2,
    "num_decoder_layers": 2,
    "num_encoder_layers": 2,
}
#: tiny values of the arguments only one class (or family) takes: image backbones people
#: fine-tune (ViT, Swin, ResNet) and the mixture-of-experts and encoder-decoder variants
PER_CLASS: dict[str, dict[str, Any]] = {
    "ViTBackbone": {"mlp_dim": 16},
    "SwinTransformerBackbone": {
        "embed_dim": 8,
        "depths": [1, 1],
        "num_heads": [2, 2],
        "window_size": 4,
    },
    "ResNetBackbone": {
        "input_conv_filters": [64],
        "input_conv_kernel_sizes": [3],
        "stackwise_num_filters": [64, 64],
        "stackwise_num_blocks": [1, 1],
        "stackwise_num_strides": [1, 2],
        "block_type": "basic_block",
        "image_shape": (32, 32, 3),
    },
    "QwenMoeBackbone": {"shared_expert_intermediate_dim": 8},
    "T5GemmaBackbone": {
        "encoder_num_attention_heads": 2,
        "encoder_num_key_value_heads": 1,
        "encoder_head_dim": 4,
        "encoder_layer_types": ["full_attention"] * 2,
        "decoder_num_attention_heads": 2,
        "decoder_num_key_value_heads": 1,
        "decoder_head_dim": 4,
        "decoder_layer_types": ["full_attention"] * 2,
    },
}
#: rate arguments set to 0.1, so the backbone has dropout layers to guide
RATES = ("dropout", "dropout_rate", "attention_dropout", "attention_dropout_rate")
#: how a problem that is a library error (clear, with a fix) is worded
CLEAR = "clear error"
#: the start of a note saying profile/apply were not checked (not a library problem)
NOT_CHECKED = "profile/apply not checked: "
#: the suffix of a row checking a class at its own default rates (0: dropout-free presets)
DEFAULTS = " (default rates)"
#: the fixed sample of the normal test run
SAMPLE = ("DistilBertBackbone", "GemmaBackbone", "GPT2Backbone")


@dataclass
class Outcome:
    name: str
    built: bool = False
    sites: int = 0
    problems: list[str] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0
    inserted: int = 0  # sites inserted (a dropout-free model: no dropout layer is called)

    @property
    def passed(self) -> bool:
        return self.built and not self.problems

    @property
    def only_clear_errors(self) -> bool:
        """Every problem is a library error with a fix (not handled yet, but not silent)."""
        return bool(self.problems) and all(f": {CLEAR}: " in p for p in self.problems)


def backbone_classes() -> list[type]:
    import keras_hub

    base = keras_hub.models.Backbone
    found = {
        obj
        for name in dir(keras_hub.models)
        for obj in [getattr(keras_hub.models, name)]
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base
    }
    return sorted(found, key=lambda c: c.__name__)


def zero_default(cls: type) -> bool:
    """Whether the class's rate arguments default to 0 (its presets are dropout-free, as
    Gemma's): the sweep then checks it at its defaults too (``DEFAULTS`` rows)."""
    params = inspect.signature(cls.__init__).parameters.values()
    rates = [p for p in params if p.name in RATES]
    return bool(rates) and all(p.default in (0, 0.0) for p in rates)


def tiny_kwargs(cls: type, defaults: bool = False) -> dict[str, Any]:
    """Generic tiny arguments (rates 0.1, or the class's own with ``defaults``); raises
    ValueError naming a required argument with no value."""
    kw: dict[str, Any] = {}
    own = PER_CLASS.get(cls.__name__, {})
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.name in RATES and not (defaults and p.default is not inspect.Parameter.empty):
            kw[p.name] = 0.1
        elif p.name in own:
            kw[p.name] = own[p.name]
        elif p.name in TINY:
            kw[p.name] = TINY[p.name]
        elif p.default is inspect.Parameter.empty:
            raise ValueError(f"required argument {p.name!r} has no generic tiny value")
    return kw


def build(cls: type, defaults: bool = False) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return cls(**tiny_kwargs(cls, defaults))


def _first_float(out: Any) -> Any:
    import keras

    for t in keras.tree.flatten(out):
        if "float" in str(getattr(t, "dtype", "")) and len(getattr(t, "shape", ())) >= 2:
            return t
    raise ValueError("the backbone returns no float tensor of rank >= 2")


def _loss(model: Any, batch: Any) -> Any:
    import keras

    out = _first_float(model(batch, training=False))
    return keras.ops.mean(keras.ops.square(out), axis=tuple(range(1, len(out.shape))))


def _internal(exc: BaseException) -> bool:
    from gd_core.errors import GuidedDropoutError

    return not isinstance(exc, GuidedDropoutError)


def _called_rates(model: Any, example: Any = None) -> dict[str, float] | None:
    """{dropout layer name: rate} of the dropout layers one training forward calls."""
    from adapters.keras.calls import called_layers
    from adapters.keras.discovery import ModelIndex

    idx = ModelIndex.build(model)
    called = called_layers(model, idx.site_layers, example=example)
    if called is None:
        return None
    return {idx.site_name(x): round(float(x.rate), 6) for x in idx.site_layers if id(x) in called}


def twice_guarded(model: Any, sites: list[Any], example: Any = None) -> list[str]:
    """Parameters two sites guard, except a weight of a layer the forward calls more than once
    (a tied embedding read by the encoder and the decoder, DeBERTa's query projection applied
    to the hidden states and to the relative position embeddings: each call's output is
    dropped by its own site, so both guard it)."""
    from adapters.keras.discovery import ModelIndex

    idx = ModelIndex.build(model, example)
    idx.check_calls()
    counts: dict[int, int] = {}
    for layer in idx.calls:
        counts[id(layer)] = counts.get(id(layer), 0) + 1
    first: dict[str, str] = {}
    out = []
    for s in sites:
        for p in s.params:
            layer = idx.owner.get(p)
            reused = len(getattr(layer, "_inbound_nodes", ())) > 1 or counts.get(id(layer), 0) > 1
            if p in first and not reused:
                out.append(f"{p} guarded by {first[p]} and {s.name}")
            first.setdefault(p, s.name)
    return out


def _full_length(model: Any) -> Any:
    """An input whose unknown dimensions after the batch are the generic max sequence length
    (a model that adds position embeddings of its full length, as SigLIP's text encoder)."""
    import keras

    def make(spec: Any) -> Any:
        shape = tuple(
            (2 if i == 0 else TINY["max_sequence_length"]) if d is None else int(d)
            for i, d in enumerate(spec.shape)
        )
        return np.ones(shape, str(spec.dtype))

    return keras.tree.map_structure(make, model.input)


def _runs(model: Any, x: Any) -> str | None:
    """None if the model's own forward runs on ``x``, else why not (one line)."""
    try:
        model(x, training=False)
    except Exception as exc:  # noqa: BLE001 - the input (or the tiny arguments) do not fit
        return _one_line(f"{type(exc).__name__}: {exc}")[:160]
    return None


def check(model: Any, stats: dict[str, int] | None = None) -> tuple[int, list[str], str]:
    """(number of sites, problems, note) for one built backbone (``stats["inserted"]``: how
    many of its sites are inserted, a dropout-free model's). Where the model's own forward
    fails on the guessed input but runs on a full-length one, that one is the ``example_input``
    of ``sites``, ``profile`` and ``apply`` (and the note says so)."""
    import adapters.keras as gdk
    from adapters.keras.calls import guessed_input

    problems: list[str] = []
    x = guessed_input(model)
    why = None if x is None else _runs(model, x)
    given, note = None, ""
    if why is not None:
        full = _full_length(model)
        if _runs(model, full) is None:
            x, given, why = full, full, None
            note = "example_input: a full-length input (the guessed one does not fit)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sites = gdk.sites(model, example_input=given)
        except Exception as exc:  # noqa: BLE001 - recorded
            kind = "internal error" if _internal(exc) else "clear error"
            return (
                0,
                ([f"sites: {kind}: {exc}"[:300]] if _internal(exc) else []),
                (f"{type(exc).__name__}: {str(exc)[:160]}"),
            )
        if stats is not None:
            stats["inserted"] = sum(s.kind == "hook" for s in sites)
        problems += twice_guarded(model, sites, given)
        if x is None:
            return len(sites), problems, NOT_CHECKED + "no input could be guessed"
        if why is not None:
            return (
                len(sites),
                problems,
                f"{NOT_CHECKED}the model's own forward fails on the guessed input ({why})",
            )
        try:
            prof = gdk.profile(model, [x], _loss, progress=False, example_input=given)
            if not np.all(np.isfinite(prof.scores)):
                problems.append("profile: non-finite scores")
        except Exception as exc:  # noqa: BLE001 - recorded
            kind = "internal error" if _internal(exc) else CLEAR
            problems.append(f"profile: {kind}: {type(exc).__name__}: {str(exc)[:200]}")
        rates_given = {s.name: round(0.01 + 0.002 * i, 6) for i, s in enumerate(sites)}
        try:
            guided = gdk.apply(model, rates_given, example_input=given).model
        except Exception as exc:  # noqa: BLE001 - recorded
            kind = "internal error" if _internal(exc) else CLEAR
            problems.append(f"apply: {kind}: {type(exc).__name__}: {str(exc)[:200]}")
            return len(sites), problems, note
        rates = _called_rates(guided, given)
        if rates is None:
            problems.append("the training forward of the guided model fails on the guessed input")
            return len(sites), problems, note
        installed = set(rates_given.values())
        stale = {k: v for k, v in rates.items() if v not in installed}
        if stale:
            problems.append(
                f"dropout called at a rate apply did not install: {dict(list(stale.items())[:3])}"
            )
        unreached = [n for n, p in rates_given.items() if p not in set(rates.values())]
        if unreached:
            problems.append(f"site p reaches no call: {unreached[:3]}")
    return len(sites), problems, note


def sweep_one(cls: type, defaults: bool = False) -> Outcome:
    out = Outcome(cls.__name__ + (DEFAULTS if defaults else ""))
    start = time.perf_counter()
    try:
        model = build(cls, defaults)
    except Exception as exc:  # noqa: BLE001 - recorded: the generic arguments do not fit
        out.note = f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return out
    out.built = True
    try:
        stats: dict[str, int] = {}
        out.sites, out.problems, out.note = check(model, stats)
        out.inserted = stats.get("inserted", 0)
    except Exception as exc:  # noqa: BLE001 - a failure of the sweep itself is a problem too
        out.problems.append(f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
    out.seconds = time.perf_counter() - start
    return out


def _one_line(text: str) -> str:
    """A reason fit for one table cell: terminal colour codes and line breaks removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(text.split()).replace("|", "/")


def summary(rows: list[Outcome], command: str) -> str:
    built = [r for r in rows if r.built]
    with_sites = [r for r in built if r.sites]
    unchecked = [r for r in with_sites if r.note.startswith(NOT_CHECKED)]
    checked = [r for r in with_sites if r not in unchecked]
    passed = [r for r in checked if r.passed]
    free = [r for r in built if r.inserted]
    nosites = [r for r in built if not r.sites and r.note.startswith("NoSitesError")]
    lines = [
        "# Keras Hub sweep",
        "",
        "Generated by `" + command + "` (do not edit by hand). Every `keras_hub.models` Backbone "
        "class is built offline from generic tiny constructor arguments (random weights, "
        "dropout 0.1 where the class takes a rate; a class whose rates default to 0, as "
        "Gemma's presets, is built at its defaults too, in a row marked"
        + DEFAULTS
        + "); on each, `sites`, `profile` and `apply` "
        "must raise no internal error, after `apply` with a distinct p per site every dropout "
        "layer a training forward calls must run at an installed p and every site's p reach a "
        "call, and no parameter may be guarded by two sites (`tests/keras/hub_zoo.py`).",
        "",
        f"- rows: {len(rows)}; built: {len(built)}; with sites: {len(with_sites)}; "
        f"profile/apply not checked (the model's own forward fails on the guessed input): "
        f"{len(unchecked)}; pass every check: {len(passed)} of {len(checked)}",
        f"- dropout-free (no dropout layer the forward calls): "
        f"{len(free)}, given sites inserted on the embedding output and the residual branches "
        f"as adapters.torch does (docs/keras.md); with no sites at all (NoSitesError, a clear "
        f"error): {len(nosites)}",
        "",
        "| backbone | sites | outcome |",
        "|---|---|---|",
    ]
    for r in rows:
        if not r.built:
            outcome = r.note
        elif r.problems:
            outcome = "FAIL: " + "; ".join(r.problems)
        elif r in nosites:
            outcome = "no sites (clear error: " + r.note[:120] + ")"
        elif r.note.startswith(NOT_CHECKED):
            outcome = "not checked: " + r.note[len(NOT_CHECKED) :]
        else:
            note = [f"dropout-free: {r.inserted} sites inserted"] if r.inserted else []
            note += [r.note] if r.note else []
            outcome = "pass" + (f" ({'; '.join(note)})" if note else "")
        lines.append(f"| {r.name} | {r.sites} | {_one_line(outcome)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from gd_core._io import atomic_write_bytes

    rows = []
    for cls in backbone_classes():
        for defaults in (False, True) if zero_default(cls) else (False,):
            rows.append(sweep_one(cls, defaults))
            print(f"{rows[-1].name}: {rows[-1].problems or rows[-1].note or 'pass'}", flush=True)
    text = summary(rows, "PYTHONPATH=. python tests/keras/hub_zoo.py --write docs/zoo-keras.md")
    if len(argv) >= 2 and argv[0] == "--write":
        atomic_write_bytes(Path(argv[1]), text.encode())
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
