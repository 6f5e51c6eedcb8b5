"""The public ``estimate_fisher`` call against the framework's training steps, paired (issue 27).

One process per cell: the data and model are built, the framework's training step is warmed up,
then the FIRST public call is timed (its fixed costs: Keras' tracing and first-batch check, ORT's
artifacts, tapped module and check), then ``pairs`` interleaved pairs (training steps on the N
samples, then the public call on the same N samples, fixed costs included) are timed. The ratio of
each pair and their median are recorded with the load average before and after, so that a pair
timed while the machine was busy can be told apart.

* ``keras_public``: ``adapters.keras.estimate_fisher`` (TensorFlow backend,
  ``gd_cli.models.keras_bert_classifier`` with random weights, dropout 0, per-sample sparse
  cross-entropy on random labels) against forward + ``GradientTape.gradient`` + ``SGD.apply`` in a
  ``tf.function``.
* ``ort_public``: ``adapters.onnx.estimate_fisher`` on the exported ``.onnx`` file
  (``BertForSequenceClassification``, random weights, 2 labels, ``export_training_onnx``, opset
  17; cross-entropy) against ORT's batched train step (``Module`` + SGD ``Optimizer.step``) on
  artifacts built once beforehand.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

PUBLIC_METHODS = ("keras_public", "ort_public")


def _texts(n: int, seq_len: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from gd_cli import corpus as gdc

    texts = gdc.select(C.corpus_paragraphs(), 32 + n, seed=0)[32:]
    enc = C.tokenizer()(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    labels = np.random.default_rng(0).integers(0, 2, size=n).astype(dtype)
    return enc["input_ids"].astype(dtype), enc["attention_mask"].astype(dtype), labels


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _paired(first: Any, step: Any, public: Any, pairs: int) -> dict[str, Any]:
    """Warm the step, time the first public call, then ``pairs`` interleaved pairs."""
    step()  # warm-up: tracing / the session's first run
    load0 = os.getloadavg()[0]
    first_s = _timed(first)
    rows = []
    for _ in range(pairs):
        load = os.getloadavg()[0]
        s, p = _timed(step), _timed(public)
        rows.append(
            {
                "step_s": round(s, 3),
                "public_s": round(p, 3),
                "ratio": round(p / s, 3),
                "loadavg_1m": round(load, 2),
            }
        )
    ratios = [r["ratio"] for r in rows]
    return {
        "status": "ok",
        "first_call_s": round(first_s, 3),
        "first_call_ratio": round(first_s / statistics.median(r["step_s"] for r in rows), 3),
        "pairs": rows,
        "median_ratio": round(statistics.median(ratios), 3),
        "median_step_s": round(statistics.median(r["step_s"] for r in rows), 3),
        "median_public_s": round(statistics.median(r["public_s"] for r in rows), 3),
        "loadavg_before": round(load0, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }


def keras_public(spec: dict[str, Any], pairs: int = 3) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if spec["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(int(spec["threads"]))
        tf.config.threading.set_inter_op_parallelism_threads(int(spec["threads"]))
    import keras

    from adapters.keras import estimate_fisher
    from gd_cli.models import keras_bert_classifier

    keras.utils.set_random_seed(0)
    cfg = C.bert_config(spec["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = keras_bert_classifier(cfg)
    n, bs = spec["n_samples"], spec["batch_size"]
    ids, att, labels = _texts(n, spec["seq_len"], "int32")
    batches = [
        tuple(tf.convert_to_tensor(a[i : i + bs]) for a in (ids, att, labels))
        for i in range(0, n, bs)
    ]

    def loss(model: Any, batch: Any) -> Any:
        i, m, y = batch
        logits = model({"input_ids": i, "attention_mask": m}, training=False)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    opt = keras.optimizers.SGD(1e-9)
    opt.build(model.trainable_variables)

    @tf.function
    def train(batch: Any) -> Any:
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(loss(model, batch))
        grads = tape.gradient(total, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return total

    def step() -> None:
        for b in batches:
            train(b).numpy()

    def public() -> None:
        f = estimate_fisher(model, batches, loss, progress=False)
        assert f.count == n, f.count

    out = _paired(public, step, public, pairs)
    out["fallback"] = len(
        estimate_fisher(model, batches[:1], loss, progress=False).accumulator.metadata.get(
            "fisher_fallback", {}
        )
    )
    return out


def ort_public(spec: dict[str, Any], pairs: int = 3) -> dict[str, Any]:
    import torch
    import transformers

    from adapters.onnx import estimate_fisher
    from adapters.onnx.train import module_inputs

    torch.manual_seed(0)
    cfg = C.bert_config(spec["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.num_labels = 2
    net = transformers.BertForSequenceClassification(cfg)
    n, bs, t = spec["n_samples"], spec["batch_size"], spec["seq_len"]
    ids, att, labels = _texts(n, t, np.int64)
    batches = [
        {
            "input_ids": ids[i : i + bs],
            "attention_mask": att[i : i + bs],
            "labels": labels[i : i + bs],
        }
        for i in range(0, n, bs)
    ]
    with tempfile.TemporaryDirectory(prefix="gd-bench-ort-public-") as tmp:
        path, module, opt, names, fixed = ort_training(net, t, tmp)

        def step() -> None:
            for b in batches:
                module.lazy_reset_grad()
                module(*module_inputs(names, {**b, **fixed}))
                opt.step()

        def public() -> None:
            f = estimate_fisher(path, batches, "cross_entropy", progress=False)
            assert f.count == n, f.count

        out = _paired(public, step, public, pairs)
        f = estimate_fisher(path, batches[:1], "cross_entropy", progress=False)
        out["fallback"] = len(f.accumulator.metadata.get("fisher_fallback", {}))
        return out


def ort_training(net: Any, seq_len: int, tmp: str) -> tuple[str, Any, Any, list[str], dict]:
    """Export ``net`` for training into ``tmp`` (with an empty cache there, so the first
    ``estimate_fisher`` call is cold), build SGD artifacts and open ORT's training module: (the
    ``.onnx`` path, the module in training mode, its optimizer, its input names, the dropout-ratio
    feeds at 0)."""
    import torch

    from adapters.onnx import make_artifacts
    from gd_cli.models import export_training_onnx

    os.environ["GD_CACHE_DIR"] = str(Path(tmp) / "cache")
    ones = torch.ones(2, seq_len, dtype=torch.long)
    path = str(export_training_onnx(net, (ones, ones), Path(tmp) / "model.onnx", opset=17))
    art = make_artifacts(path, Path(tmp) / "art", "cross_entropy", optimizer="sgd")
    module, opt, _ = art.open("cpu", optimizer=True)
    module.train()
    names = list(module.input_names())
    zero = np.zeros((), np.float32)
    return path, module, opt, names, {v: zero for v in art.ratio_inputs.values() if v in names}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    fn = keras_public if spec["method"] == "keras_public" else ort_public
    out = fn(spec, int(spec.get("pairs", 3)))
    out["n_samples"] = spec["n_samples"]
    return out
