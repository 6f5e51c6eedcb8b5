"""Reference models of the conformance suite, defined once and built in every framework.

Weights are created once (NumPy, seeded) in PyTorch layout; each framework's builder loads the
same numbers. Module and layer names mirror each other, so canonical names agree:
``block1.fc.weight`` in torch is the Keras layer ``block1__fc``'s kernel, which
``adapters.keras.load_state_dict`` fills from the torch-layout array (the binding transposes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MLP_IN, MLP_HIDDEN, MLP_OUT = 6, 12, 3
TF_VOCAB, TF_LEN, TF_HIDDEN, TF_HEADS, TF_FFN, TF_LAYERS, TF_OUT = 23, 6, 8, 2, 12, 1, 3


@dataclass
class RefSpec:
    """A reference model: name, canonical weights (torch layout), samples and site grouping."""

    name: str
    weights: dict[str, np.ndarray]
    inputs: np.ndarray
    labels: np.ndarray
    sites: list[str]
    guards: dict[str, list[str]] = field(default_factory=dict)
    default_rule_agrees: bool = True


def _linear(rng, name, fan_in, fan_out, out):
    bound = 1.0 / math.sqrt(fan_in)
    out[f"{name}.weight"] = rng.uniform(-bound, bound, size=(fan_out, fan_in))
    out[f"{name}.bias"] = rng.uniform(-bound, bound, size=(fan_out,))


def _layernorm(rng, name, dim, out):
    out[f"{name}.weight"] = 1.0 + 0.1 * rng.normal(size=dim)
    out[f"{name}.bias"] = 0.1 * rng.normal(size=dim)


def mlp_spec(n: int = 10, seed: int = 0) -> RefSpec:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    _linear(rng, "block1.fc", MLP_IN, MLP_HIDDEN, w)
    _linear(rng, "block2.fc", MLP_HIDDEN, MLP_HIDDEN, w)
    _linear(rng, "head", MLP_HIDDEN, MLP_OUT, w)
    x = rng.normal(size=(n, MLP_IN))
    y = rng.integers(0, MLP_OUT, size=n)
    guards = {
        "block1.dropout": ["block1.fc.weight", "block1.fc.bias"],
        "block2.dropout": ["block2.fc.weight", "block2.fc.bias"],
    }
    return RefSpec("mlp", w, x, y, list(guards), guards, True)


def encoder_spec(n: int = 6, seed: int = 1) -> RefSpec:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    w["embeddings.word_embeddings.weight"] = rng.normal(size=(TF_VOCAB, TF_HIDDEN))
    w["embeddings.position_embeddings.weight"] = 0.5 * rng.normal(size=(TF_LEN, TF_HIDDEN))
    _layernorm(rng, "embeddings.LayerNorm", TF_HIDDEN, w)
    guards = {
        "embeddings.dropout": [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        ]
    }
    for i in range(TF_LAYERS):
        p = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            _linear(rng, f"{p}.attention.self.{proj}", TF_HIDDEN, TF_HIDDEN, w)
        _linear(rng, f"{p}.attention.output.dense", TF_HIDDEN, TF_HIDDEN, w)
        _layernorm(rng, f"{p}.attention.output.LayerNorm", TF_HIDDEN, w)
        _linear(rng, f"{p}.intermediate.dense", TF_HIDDEN, TF_FFN, w)
        _linear(rng, f"{p}.output.dense", TF_FFN, TF_HIDDEN, w)
        _layernorm(rng, f"{p}.output.LayerNorm", TF_HIDDEN, w)
        guards[f"{p}.attention.self.dropout"] = [
            f"{p}.attention.self.{q}.{k}"
            for q in ("query", "key", "value")
            for k in ("weight", "bias")
        ]
        guards[f"{p}.attention.output.dropout"] = [
            f"{p}.attention.output.{m}.{k}"
            for m in ("dense", "LayerNorm")
            for k in ("weight", "bias")
        ]
        guards[f"{p}.output.dropout"] = [
            f"{p}.output.{m}.{k}" for m in ("dense", "LayerNorm") for k in ("weight", "bias")
        ]
    _linear(rng, "classifier", TF_HIDDEN, TF_OUT, w)
    ids = rng.integers(0, TF_VOCAB, size=(n, TF_LEN))
    y = rng.integers(0, TF_OUT, size=n)
    return RefSpec("encoder", w, ids, y, list(guards), guards, False)


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------
def build_torch(spec: RefSpec, dtype=None):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.fc = nn.Linear(i, o)
            self.act = nn.Tanh()
            self.dropout = nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(self.act(self.fc(x)))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = Block(MLP_IN, MLP_HIDDEN)
            self.block2 = Block(MLP_HIDDEN, MLP_HIDDEN)
            self.head = nn.Linear(MLP_HIDDEN, MLP_OUT)

        def forward(self, x):
            return self.head(self.block2(self.block1(x)))

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(TF_VOCAB, TF_HIDDEN)
            self.position_embeddings = nn.Embedding(TF_LEN, TF_HIDDEN)
            self.LayerNorm = nn.LayerNorm(TF_HIDDEN, eps=1e-6)
            self.dropout = nn.Dropout(0.1)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], device=ids.device)
            h = self.word_embeddings(ids) + self.position_embeddings(pos)
            return self.dropout(self.LayerNorm(h))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(TF_HIDDEN, TF_HIDDEN)
            self.key = nn.Linear(TF_HIDDEN, TF_HIDDEN)
            self.value = nn.Linear(TF_HIDDEN, TF_HIDDEN)
            self.dropout = nn.Dropout(0.1)

        def forward(self, h):
            b, t, _ = h.shape
            d = TF_HIDDEN // TF_HEADS

            def split(z):
                return z.reshape(b, t, TF_HEADS, d).transpose(1, 2)

            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            ctx = self.dropout(probs) @ v
            return ctx.transpose(1, 2).reshape(b, t, TF_HIDDEN)

    class AddNorm(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.dense = nn.Linear(i, o)
            self.LayerNorm = nn.LayerNorm(o, eps=1e-6)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x, residual):
            return self.LayerNorm(self.dropout(self.dense(x)) + residual)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttention()
            self.output = AddNorm(TF_HIDDEN, TF_HIDDEN)

        def forward(self, h):
            return self.output(self.self(h), h)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(TF_HIDDEN, TF_FFN)

        def forward(self, h):
            return torch.tanh(self.dense(h))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = AddNorm(TF_FFN, TF_HIDDEN)

        def forward(self, h):
            a = self.attention(h)
            return self.output(self.intermediate(a), a)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer() for _ in range(TF_LAYERS)])

        def forward(self, h):
            for layer in self.layer:
                h = layer(h)
            return h

    class TinyEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.classifier = nn.Linear(TF_HIDDEN, TF_OUT)

        def forward(self, ids):
            return self.classifier(self.encoder(self.embeddings(ids)).mean(dim=1))

    model = MLP() if spec.name == "mlp" else TinyEncoder()
    dtype = dtype or torch.float64
    model = model.to(dtype)
    state = {k: torch.tensor(v, dtype=dtype) for k, v in spec.weights.items()}
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Keras (functional, layer names mirror the torch module paths)
# ---------------------------------------------------------------------------------------------
def build_keras(spec: RefSpec, dropout_cls=None):
    import keras
    from keras import layers, ops

    import adapters.keras as gdk
    from gd_core.names import to_keras_layer

    drop = dropout_cls or layers.Dropout

    def dense(name, units, act=None):
        return layers.Dense(units, activation=act, name=to_keras_layer(name), dtype="float64")

    if spec.name == "mlp":
        x = inp = keras.Input((MLP_IN,), dtype="float64", name="x")
        for b, i in (("block1", MLP_IN), ("block2", MLP_HIDDEN)):
            del i
            d = dense(f"{b}.fc", MLP_HIDDEN, "tanh")
            x = drop(0.1, name=to_keras_layer(f"{b}.dropout"), dtype="float64")(d(x))
        d = dense("head", MLP_OUT)
        out = d(x)
    else:
        inp = keras.Input((TF_LEN,), dtype="int32", name="ids")
        we = layers.Embedding(
            TF_VOCAB, TF_HIDDEN, name=to_keras_layer("embeddings.word_embeddings"), dtype="float64"
        )
        pe = layers.Embedding(
            TF_LEN,
            TF_HIDDEN,
            name=to_keras_layer("embeddings.position_embeddings"),
            dtype="float64",
        )
        positions = ops.cumsum(ops.ones_like(inp), axis=1) - 1  # symbolic, so pe stays in the graph
        h = we(inp) + pe(positions)

        def ln(name):
            return layers.LayerNormalization(
                epsilon=1e-6, name=to_keras_layer(name), dtype="float64"
            )

        h = drop(0.1, name=to_keras_layer("embeddings.dropout"), dtype="float64")(
            ln("embeddings.LayerNorm")(h)
        )
        d = TF_HIDDEN // TF_HEADS
        for i in range(TF_LAYERS):
            p = f"encoder.layer.{i}"

            def heads(z):
                return ops.transpose(ops.reshape(z, (-1, TF_LEN, TF_HEADS, d)), (0, 2, 1, 3))

            qkv = {}
            for proj in ("query", "key", "value"):
                name = f"{p}.attention.self.{proj}"
                qkv[proj] = heads(dense(name, TF_HIDDEN)(h))
            scores = ops.matmul(qkv["query"], ops.transpose(qkv["key"], (0, 1, 3, 2)))
            probs = ops.softmax(scores / math.sqrt(d), axis=-1)
            probs = drop(0.1, name=to_keras_layer(f"{p}.attention.self.dropout"), dtype="float64")(
                probs
            )
            ctx = ops.reshape(
                ops.transpose(ops.matmul(probs, qkv["value"]), (0, 2, 1, 3)),
                (-1, TF_LEN, TF_HIDDEN),
            )
            lay = dense(f"{p}.attention.output.dense", TF_HIDDEN)
            a = drop(0.1, name=to_keras_layer(f"{p}.attention.output.dropout"), dtype="float64")(
                lay(ctx)
            )
            a = ln(f"{p}.attention.output.LayerNorm")(a + h)
            inter = dense(f"{p}.intermediate.dense", TF_FFN, "tanh")(a)
            lay = dense(f"{p}.output.dense", TF_HIDDEN)
            o = drop(0.1, name=to_keras_layer(f"{p}.output.dropout"), dtype="float64")(lay(inter))
            h = ln(f"{p}.output.LayerNorm")(o + a)
        out = dense("classifier", TF_OUT)(ops.mean(h, axis=1))
    model = keras.Model(inp, out, name=f"ref_{spec.name}")
    gdk.load_state_dict(model, spec.weights)  # torch layout in; the binding converts
    return model
