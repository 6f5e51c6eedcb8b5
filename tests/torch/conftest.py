"""Fixtures shared by the torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled MiniLM's tokenizer (loaded once per test session)."""
    transformers = pytest.importorskip("transformers")
    from gd_cli.models import minilm_path

    return transformers.AutoTokenizer.from_pretrained(minilm_path())
