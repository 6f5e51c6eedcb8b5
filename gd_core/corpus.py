"""Text for Fisher estimation that needs nothing outside the standard library and NumPy.

A corpus file holds **one paragraph per non-empty line**; WikiText headings (`` = Title = ``,
`` = = Section = = ``) are skipped. :func:`python_docs_paragraphs` is the corpus that needs no
download: English prose from Python's own documentation (``pydoc_data.topics``, which ships with
every CPython). Sample selection is deterministic: a seeded permutation of the paragraphs, of
which the first ``n`` are taken, so the first 8 samples of a 16-sample run are the 8 samples of an
8-sample run.

Shared by the adapters (a profile computed on the fly by ``apply(model)``), the ``gd`` command
line (:mod:`gd_cli.corpus` re-exports these names) and the benchmarks.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArgumentError, GuidedDropoutError

DEFAULT_CORPUS_NAME = "python-docs"

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
