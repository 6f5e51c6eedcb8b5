"""Torch models of the held-out architecture tests, shared by tests/conformance and tests/onnx."""

from __future__ import annotations

import torch

nn = torch.nn


class Encoder(nn.Module):
    """nn.TransformerEncoder (d_model 32, 2 heads, batch_first) with an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):  # type: ignore[no-untyped-def]
        return self.head(self.encoder(self.embed(ids)).mean(1))


def encoder() -> nn.Module:
    """An :class:`Encoder` with seeded weights."""
    torch.manual_seed(0)
    return Encoder()


def llama() -> nn.Module:
    """A tiny seeded Llama-style causal LM (2 layers, no dropout modules): ``transformers``
    must be importable (callers skip first)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


class Logits(nn.Module):
    """A Hugging Face model called on token ids, returning its logits (one tensor to export)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids):  # type: ignore[no-untyped-def]
        return self.inner(input_ids=ids).logits
