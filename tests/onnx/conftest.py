"""Fixtures of the ONNX adapter tests: tiny BERT classifiers exported from torch in training mode.

Torch is needed only to export (and for the autograd reference); tests that use these fixtures
skip with a reason when torch or transformers is missing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX adapter needs the onnx package")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ort_helpers (importlib mode)

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, LABELS = 100, 32, 2, 2, 37, 8, 3


def _torch() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch", reason="torch is needed to export the test models")
    transformers = pytest.importorskip("transformers", reason="transformers builds the test BERT")
    return torch, transformers


def tiny_bert(attn: str = "sdpa", hidden: int = HIDDEN, seed: int = 0) -> Any:
    """BertForSequenceClassification with a tiny random config (hidden 32, 2 layers, 2 heads)."""
    torch, transformers = _torch()
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=16,
        num_labels=LABELS,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def export(model: Any, path: Path, opset: int, fold: bool = False) -> Path:
    """torch.onnx.export in training mode, dynamic batch axis, as in docs/onnx.md."""
    from gd_cli.models import export_training_onnx

    torch, _ = _torch()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    export_training_onnx(model, (ids, mask), path, opset=opset, constant_folding=fold)
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Any, Path]]:
    """``exported(opset, attn, fold=False) -> (torch model, path)``, cached per session."""
    cache: dict[tuple[int, str, bool], tuple[Any, Path]] = {}
    folder = tmp_path_factory.mktemp("onnx_exports")

    def get(opset: int, attn: str = "sdpa", fold: bool = False) -> tuple[Any, Path]:
        key = (opset, attn, fold)
        if key not in cache:
            model = tiny_bert(attn)
            path = export(model, folder / f"bert_{opset}_{attn}_{int(fold)}.onnx", opset, fold)
            cache[key] = (model, path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def batch() -> dict[str, np.ndarray]:
    """A fixed batch of 8 sequences of 8 tokens with labels."""
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1, VOCAB, (8, SEQ)).astype(np.int64),
        "attention_mask": np.ones((8, SEQ), np.int64),
        "labels": rng.integers(0, LABELS, 8).astype(np.int64),
    }


@pytest.fixture(scope="session")
def make_bert() -> Callable[..., Any]:
    """``make_bert(attn='sdpa', hidden=32, seed=0)``: a tiny random BERT classifier."""
    return tiny_bert


@pytest.fixture(autouse=True)
def _ort_caches(tmp_path_factory: Any, monkeypatch: Any) -> Any:
    """Artifacts that estimate_fisher caches go to one folder of this session (not the user's
    cache); engines it keeps open in the process are dropped after each test (tests patch them)."""
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gd-cache"))
    yield
    fisher = sys.modules.get("adapters.onnx.fisher")
    if fisher is not None and hasattr(fisher, "_ENGINES"):
        fisher._ENGINES.clear()
