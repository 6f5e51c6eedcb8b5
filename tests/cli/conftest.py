"""Fixtures of the CLI tests: a tiny random BERT with an MLM head and a tokenizer, saved with
``save_pretrained``, a small corpus file, and an in-process runner of ``gd``."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

WORDS = (
    "the a of and to in is was for on with as by at from it he she they this that film song "
    "game city river team album season war ship line road house church school station"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_POSITIONS = 32


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``gd ARGS`` in this process: (exit status, stdout, stderr)."""
    from gd_cli.main import main

    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse: --help, --version, bad arguments
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def gd(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``gd("profile", "--model", ...) -> (rc, stdout, stderr)``."""
    return lambda *args: run_cli([str(a) for a in args], capsys)


def write_corpus(path: Path, paragraphs: int = 40, seed: int = 0) -> Path:
    """A WikiText-like file: headings, blank lines and random sentences of the tiny vocabulary."""
    rng = random.Random(seed)
    lines = [" = Tiny Corpus = ", ""]
    for i in range(paragraphs):
        if i % 10 == 5:
            lines += ["", f" = = Section {i} = = ", ""]
        lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) + " . ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder: BertForMaskedLM (hidden 16, 2 layers) and its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + ["."]) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    cfg = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS) + 1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=MAX_POSITIONS,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def tiny_profile(
    tiny_model: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A profile of the tiny model written by ``gd profile`` (8 samples)."""
    from gd_cli.main import main

    out = tmp_path_factory.mktemp("profile") / "tiny.profile.npz"
    rc = main(
        [
            "profile",
            "--model",
            str(tiny_model),
            "--corpus",
            str(corpus_file),
            "--samples",
            "8",
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0 and out.exists()
    return out
