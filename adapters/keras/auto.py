"""What ``adapters.keras.apply(model)`` computes when no profile is given or cached.

The policy (text, sample count, caching, the report's note) is :mod:`gd_core.auto`'s. A Keras
model carries no pretraining head or tokenizer the adapter could recognise, so the objective is
the contrastive one on the model's own outputs (mean-pooled over the sequence axis when there is
one): each paragraph must stay closer to a copy of itself with 10% of its tokens dropped than to
a fixed bank of other paragraphs. ``tokenizer`` turns text into token ids: a callable
``list[str] -> int array (n, seq_len)`` or a Hugging Face tokenizer. The model must take one
integer input of token ids.

Example:
    >>> import numpy as np
    >>> ids = token_ids(lambda texts: [[1, 2, 3]] * len(texts), ["a", "b"], 8)
    >>> ids.shape, ids.dtype.name
    ((2, 8), 'int32')
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gd_core import weights as gd_weights
from gd_core.auto import AutoSettings, Computed
from gd_core.errors import ArgumentError
from gd_core.weights import WeightsId

TEMPERATURE = 0.05
DROP = 0.1


def token_ids(tokenizer: Any, texts: list[str], seq_len: int) -> np.ndarray:
    """Token ids ``(len(texts), seq_len)``, int32, truncated and padded with 0."""
    if hasattr(tokenizer, "batch_decode") or hasattr(tokenizer, "pad_token_id"):  # Hugging Face
        enc = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length")
        rows = enc["input_ids"]
    else:
        rows = tokenizer(texts)
    rows = [list(np.asarray(r).reshape(-1))[:seq_len] for r in rows]
    out = np.zeros((len(rows), seq_len), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _augment(ids: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    drop = (rng.random(ids.shape) < DROP) & (ids != 0)
    drop[:, 0] = False  # keep at least the first token
    return np.where(drop, 0, ids).astype(np.int32)


def computer(model: Any, tokenizer: Any, gdk: Any) -> Any:
    """A ``compute(settings) -> Computed`` for :func:`gd_core.auto.cached_or_computed`, or None
    without a tokenizer (then ``apply`` raises, naming how to make a profile). ``gdk`` is the
    adapter module (:mod:`adapters.keras`), passed in so this module does not import it."""
    if tokenizer is None:
        return None

    def compute(settings: AutoSettings) -> Computed:
        import keras

        ops = keras.ops
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) > 1:
            raise ArgumentError(
                f"model: expected a model with one input of token ids to compute a profile on "
                f"text, received {model.name!r} with {len(inputs)} inputs; fix: compute one with "
                "adapters.keras.profile(model, dataset, loss) and pass it"
            )
        texts, corpus = settings.texts()
        ids = token_ids(tokenizer, texts, settings.seq_len)
        refs = token_ids(tokenizer, settings.references(corpus), settings.seq_len)

        def embed(x: Any) -> Any:
            out = model(x, training=False)
            if isinstance(out, dict):
                out = next(iter(out.values()))
            if isinstance(out, (list, tuple)):
                out = out[0]
            out = ops.cast(out, "float32")
            if len(out.shape) == 3:
                mask = ops.cast(ops.expand_dims(ops.not_equal(x, 0), -1), "float32")
                out = ops.sum(out * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
            elif len(out.shape) != 2:
                out = ops.reshape(out, (ops.shape(out)[0], -1))
            return out / ops.maximum(ops.norm(out, axis=-1, keepdims=True), 1e-12)

        bank = ops.stop_gradient(embed(refs))

        def loss(m: Any, batch: Any) -> Any:
            x, aug = batch
            e, e2 = embed(x), embed(aug)
            pos = ops.sum(e * e2, axis=-1, keepdims=True) / TEMPERATURE
            neg = ops.matmul(e, ops.transpose(bank)) / TEMPERATURE
            logits = ops.concatenate([pos, neg], axis=-1)
            return ops.logsumexp(logits, axis=-1) - pos[:, 0]

        aug = _augment(ids, settings.seed)
        b = settings.batch_size
        data = [(ids[i : i + b], aug[i : i + b]) for i in range(0, len(ids), b)]
        prof = gdk.profile(
            model,
            data,
            loss,
            progress=settings.progress,
            metadata={**corpus.metadata(), "objective": "contrastive", "seq_len": settings.seq_len},
        )
        return Computed(prof, "contrastive", f"Keras model {model.name!r}", None)

    return compute


def weights_id(model: Any, labels: Any = None) -> WeightsId:
    """The digest of the model's weights (:mod:`gd_core.weights`), named by ``model.name``;
    ``labels``: the canonical weight names a profile holds (None: every weight), see
    :func:`adapters.torch.auto.weights_id`.

    Example:
        >>> import keras
        >>> a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> weights_id(a) == weights_id(a)
        True
    """
    from .discovery import ModelIndex

    variables = ModelIndex.build(model).variables
    chosen = (
        {n: n for n in variables}
        if labels is None
        else gd_weights.resolve([str(n) for n in labels], list(variables))
    )
    items = []
    for label, name in chosen.items():
        if name is None:
            items.append((label, (), "absent", np.zeros(0)))
            continue
        w = variables[name]
        values = np.asarray(w.numpy()).reshape(-1)
        items.append(
            (label, tuple(w.shape), str(w.dtype), values[:: gd_weights.stride(values.size)])
        )
    return WeightsId(gd_weights.digest(items), getattr(model, "name", None))
