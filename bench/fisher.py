"""Fisher-estimation benchmark: throughput, peak memory and agreement of per-sample Fisher methods.

Every (method, number of samples, repeat) cell runs in a FRESH subprocess so that its peak memory
is its own: the worker loads the model and data, warms the method up on one small batch, resets
the peak RSS (``/proc/self/clear_refs``), then times the method on N samples and reads
``VmHWM`` (peak resident memory) from ``/proc/self/status``. Peak growth = VmHWM after - VmRSS
before. One JSON line per cell goes to the results file (append, flush; reruns skip done cells).

Methods (all on the same samples, the same per-sample loss, the same parameters):

* ``gd``           ``adapters.torch.estimate_fisher`` (hooks: one forward + one backward per batch)
* ``gd_norms``     ``estimate_fisher(output="norms")``: per tensor the squared per-sample gradient
                   norms and per output unit the same (what ``profile()`` keeps), Gram products or
                   materialised blocks per call shape, whichever is cheaper
* ``gd_norms_gram`` / ``gd_norms_blocks``: ``gd_norms`` with one route forced for every linear
                   weight (``GD_NORMS_ROUTE``): where Gram products stop paying off
* ``floor``        forward + a backward that computes input gradients only (every weight frozen,
                   gradients asked of the embedding output): the least work any method must do
* ``opacus_ghost`` Opacus ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``:
                   per-sample gradient norms per tensor (``p._norm_sample``), squared and summed;
                   recorded as unavailable when Opacus is not installed
* ``train_step``   an ordinary batched training step: forward + ``losses.sum().backward()``, no
                   optimizer (the cost floor; computes no Fisher)
* ``loop_inplace`` batch of one, ``torch.autograd.grad``, squares added in place (``addcmul_``)
* ``authors``      a faithful re-implementation of the authors' approach: batch of one,
                   ``torch.autograd.grad``, squared gradients kept in a Python list and summed
                   every 100 samples
* ``opacus``       Opacus ``GradSampleModule`` (``p.grad_sample``), squared and summed
* ``torch_func``   ``torch.func.vmap(grad(...))`` over the batch with ``functional_call``

Keras cells (TensorFlow backend, ``gd_cli.models.keras_bert_classifier`` of the same config with
random weights, dropout 0, per-sample sparse cross-entropy on 2 random labels; compared with each
other and Keras' own training step, not with the torch rows, whose loss differs):

* ``keras_gd``          ``adapters.keras.fisher.batch_fn``, the per-batch engine
                        ``adapters.keras.estimate_fisher`` uses: ``adapters.keras.persample``
                        (one forward + one backward per batch, jacobian fallback per weight; the
                        number of fallback weights is recorded as ``fallback``)
* ``keras_jacobian``    ``adapters.keras.batchfn._TFBatchFn`` (``GradientTape.jacobian``, pfor):
                        the path ``adapters.keras.estimate_fisher`` used before issue 18 (now
                        only its fallback)
* ``keras_train_step``  forward + ``GradientTape.gradient`` + ``SGD.apply`` in a ``tf.function``

ONNX Runtime Training cells (``transformers.BertForSequenceClassification`` of the same config with
random weights and 2 labels, exported with ``gd_cli.models.export_training_onnx`` at opset 17,
dropout-free cross-entropy artifacts built as ``adapters.onnx.estimate_fisher`` builds them; ORT's
default threads; compared with each other and ORT's own training step):

* ``ort_gd``            ``adapters.onnx.persample.Engine``, the engine ``adapters.onnx.
                        estimate_fisher`` uses: one train step per batch with the tapped output
                        gradients, the exact loop for the parameters it does not cover
                        (recorded as ``fallback``)
* ``ort_loop``          the same engine with ``per_sample=False``: one train step on a batch of
                        one per sample, the path before issue 18 (now only the fallback)
* ``ort_train_step``    ``Module`` train step on the whole batch + ``Optimizer.step`` (SGD)

The public call, fixed costs included (``bench/_fisher_public.py``; one process per cell, the
paired comparison inside it: the first call timed alone, then ``--pairs`` interleaved pairs of
the framework's training steps on the N samples and the public call on the same samples):

* ``keras_public``      ``adapters.keras.estimate_fisher`` against ``keras_train_step``'s step
* ``ort_public``        ``adapters.onnx.estimate_fisher`` on the ``.onnx`` file against
                        ``ort_train_step``'s step (artifacts built by the first call are reused)

The per-sample loss is the library's ``ContrastiveLoss`` (MiniLM is a bare sentence encoder) with
``drop_prob=0`` and a fixed bank of 32 reference paragraphs, so that each sample's loss does not
depend on which other samples share its batch (needed to compare batch-of-one methods with
batched ones); dropout is off (p = 0) in every method. Agreement with ``gd`` (same N) is checked in
the worker, after the timed section: ``numpy.allclose(F, F_gd, rtol=1e-5, atol=...)`` per tensor
(see ``--atol-rel``) and the largest relative error are recorded.

Examples::

    python bench/fisher.py --smoke                         # < 1 minute, tiny random BERT
    python bench/fisher.py                                 # MiniLM, batch 16, len 64, N 16,64,128
    python bench/fisher.py --samples 16,64 --methods gd,train_step,authors --repeats 3
    python bench/fisher.py --samples 64 --methods ort_gd,ort_train_step --batch-size 32 \
        --seq-len 128                                      # ONNX Runtime Training (issue 18)
    python bench/fisher.py --samples 64 --methods gd,gd_norms,train_step,floor,opacus_ghost \
        --threads 2 --repeats 3 --seq-len 128            # the norms path (issue 17)

``--device cuda`` puts the model and the batches on the GPU (timings synchronise; peak memory is
then ``torch.cuda.max_memory_allocated`` growth).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as C
import numpy as np
from _fisher_public import PUBLIC_METHODS

TORCH_METHODS = (
    "gd",
    "gd_norms",
    "gd_norms_gram",
    "gd_norms_blocks",
    "train_step",
    "floor",
    "loop_inplace",
    "authors",
    "opacus",
    "opacus_ghost",
    "torch_func",
)
KERAS_METHODS = ("keras_gd", "keras_jacobian", "keras_train_step")
ORT_METHODS = ("ort_gd", "ort_loop", "ort_train_step")
METHODS = TORCH_METHODS + KERAS_METHODS + ORT_METHODS + PUBLIC_METHODS
NORM_METHODS = (
    "gd_norms",
    "gd_norms_gram",
    "gd_norms_blocks",
    "opacus_ghost",
)  # compared with the reference reduced to norms
HOLD = 100  # the authors' approach sums its list of squared gradients every 100 samples


# --------------------------------------------------------------------------------------------
# worker: one method, one N, in this (fresh) process
# --------------------------------------------------------------------------------------------


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, list[dict[str, Any]], list[str]]:
    import torch

    from adapters.torch import ContrastiveLoss
    from gd_cli import corpus as gdc

    C.set_threads(spec["threads"])
    tok = C.tokenizer()
    model = C.load_model(
        spec["model"],
        "BertModel",
        init_kwargs={"add_pooling_layer": False},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).eval()
    device = torch.device(spec.get("device") or "cpu")
    model.to(device)
    n, bs, t = spec["n_samples"], spec["batch_size"], spec["seq_len"]
    chosen = gdc.select(C.corpus_paragraphs(), 32 + n, seed=0)
    refs, texts = chosen[:32], chosen[32:]

    def enc(xs: list[str]) -> dict[str, Any]:
        b = C.encode(tok, xs, t)
        b["position_ids"] = torch.arange(t).expand(len(xs), t).clone()
        return {k: v.to(device) for k, v in b.items()}

    batches = [enc(texts[i : i + bs]) for i in range(0, n, bs)]
    loss = ContrastiveLoss(
        drop_prob=0.0, references=enc(refs), special_token_ids=tok.all_special_ids
    )
    with torch.no_grad():  # builds the fixed reference bank once, outside the timed section
        loss(model, _take(batches[0], 0, 1))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    return model, loss, batches, names


def _take(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {k: v[lo:hi] for k, v in batch.items()}


def _rows(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            out.append(_take(b, i, i + 1))
    return out


def _estimate(
    model: Any,
    loss: Any,
    batches: list[dict[str, Any]],
    names: list[str],
    spec: dict[str, Any],
    **options: Any,
) -> Any:
    """``adapters.torch.estimate_fisher`` with the cell's sample count and chunk size."""
    import adapters.torch as gdt

    return gdt.estimate_fisher(
        model,
        batches,
        loss=loss,
        max_samples=spec["n_samples"],
        progress=False,
        chunk_size=spec.get("chunk_size") or None,
        params=names,
        **options,
    )


def run_gd(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    res = _estimate(model, loss, batches, names, spec)
    return {k: np.asarray(v) for k, v in res.items()}


def run_gd_norms(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    res = _estimate(model, loss, batches, names, spec, output="norms")
    out = {f"{k}:sum": np.asarray(v) for k, v in res.items()}
    for k, marg in res.marginals.items():
        for a, m in marg.items():
            out[f"{k}:axis{a}"] = np.asarray(m)
    return out


def run_floor(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> None:
    """Forward + backward to the input embeddings only: every weight frozen, so autograd
    computes activation gradients and no parameter gradient."""
    import torch

    flags = [(p, p.requires_grad) for p in model.parameters()]
    leaves: list[Any] = []

    def leaf(_m: Any, _a: Any, out: Any) -> Any:
        out = out.detach().requires_grad_(torch.is_grad_enabled())
        leaves.append(out)
        return out

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for b in batches:
            leaves.clear()
            losses = loss(model, b)
            torch.autograd.grad(losses.sum(), leaves[-1])
    finally:
        handle.remove()
        for p, f in flags:
            p.requires_grad_(f)
    return None


def run_train_step(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> None:
    for b in batches:
        model.zero_grad(set_to_none=True)
        loss(model, b).sum().backward()
    return None


def run_loop_inplace(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    import torch

    params = dict(model.named_parameters())
    plist = [params[n] for n in names]
    acc = [torch.zeros_like(p) for p in plist]
    count = 0
    for one in _rows(batches):
        grads = torch.autograd.grad(loss(model, one).sum(), plist, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.addcmul_(g, g)
        count += 1
    return {n: a.double().cpu().numpy() / count for n, a in zip(names, acc, strict=True)}


def run_authors(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Batch of one; ``torch.autograd.grad``; squared gradients appended to a Python list that is
    summed (and emptied) every 100 samples."""
    import torch

    params = dict(model.named_parameters())
    plist = [params[n] for n in names]
    held: list[list[Any]] = []
    total: list[Any] | None = None
    count = 0

    def fold() -> None:
        nonlocal total, held
        summed = [sum(sample[k] for sample in held) for k in range(len(plist))]
        total = summed if total is None else [a + b for a, b in zip(total, summed, strict=True)]
        held = []

    for one in _rows(batches):
        grads = torch.autograd.grad(loss(model, one)[0], plist, allow_unused=True)
        held.append(
            [torch.zeros_like(p) if g is None else g**2 for p, g in zip(plist, grads, strict=True)]
        )
        count += 1
        if len(held) == HOLD:
            fold()
    if held:
        fold()
    assert total is not None
    return {n: t.double().cpu().numpy() / count for n, t in zip(names, total, strict=True)}


_OPACUS: dict[int, Any] = {}


def run_opacus(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    import torch
    from opacus import GradSampleModule

    gsm = _OPACUS.get(id(model))
    if gsm is None:  # wrap once (the warm-up call and the timed call share the wrapper)
        gsm = _OPACUS[id(model)] = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.train()  # Opacus records activations only in training mode (dropout is 0 here)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    for b in batches:
        gsm.zero_grad(set_to_none=True)
        loss(gsm, b).sum().backward()
        for n in names:
            gs = params[n].grad_sample
            if gs is not None:
                acc[n].add_(gs.square().sum(0))
            params[n].grad_sample = None
        count += int(b["input_ids"].shape[0])
    return {n: a.double().cpu().numpy() / count for n, a in acc.items()}


_GHOST: dict[int, Any] = {}


def run_opacus_ghost(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Opacus' ghost norms: per-sample gradient norms per tensor, without per-sample gradients
    for the layers it has a norm sampler for (Linear, Embedding, ...), squared and summed."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = _GHOST.get(id(model))
    if gsm is None:
        gsm = _GHOST[id(model)] = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="sum", use_ghost_clipping=True
        )
    gsm.train()  # Opacus records activations only in training mode (dropout is 0 here)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros((), dtype=torch.float64, device=params[n].device) for n in names}
    count = 0
    for b in batches:
        gsm.zero_grad(set_to_none=True)
        loss(gsm, b).sum().backward()
        for n in names:
            ns = getattr(params[n], "_norm_sample", None)
            if ns is not None:
                acc[n].add_(ns.double().square().sum())
                params[n]._norm_sample = None
        count += int(b["input_ids"].shape[0])
    return {f"{n}:sum": a.cpu().numpy() / count for n, a in acc.items()}


def run_torch_func(
    model: Any, loss: Any, batches: list[dict[str, Any]], names: list[str], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    bank = loss.bank
    temp = loss.temperature

    def one(ps: dict[str, Any], ids: Any, att: Any, tt: Any, pos: Any) -> Any:
        kwargs = {
            "input_ids": ids[None],
            "attention_mask": att[None],
            "token_type_ids": tt[None],
            "position_ids": pos[None],
        }
        h = functional_call(model, ps, (), kwargs).last_hidden_state
        m = att[None].to(h.dtype).unsqueeze(-1)
        z = F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)
        p = z.detach()  # drop_prob=0: the positive is the same embedding under stop-gradient
        s_pos = (z * p).sum(-1, keepdim=True)
        s_neg = (z @ bank.T).masked_fill((p @ bank.T) > 1.0 - 1e-4, float("-inf"))
        return -torch.log_softmax(torch.cat([s_pos, s_neg], 1) / temp, 1)[0, 0]

    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for b in batches:
        g = per_sample(
            params, b["input_ids"], b["attention_mask"], b["token_type_ids"], b["position_ids"]
        )
        for n in names:
            acc[n].add_(g[n].square().sum(0))
        count += int(b["input_ids"].shape[0])
    return {n: a.double().cpu().numpy() / count for n, a in acc.items()}


RUNNERS = {
    "gd": run_gd,
    "gd_norms": run_gd_norms,
    "gd_norms_gram": run_gd_norms,
    "gd_norms_blocks": run_gd_norms,
    "floor": run_floor,
    "opacus_ghost": run_opacus_ghost,
    "train_step": run_train_step,
    "loop_inplace": run_loop_inplace,
    "authors": run_authors,
    "opacus": run_opacus,
    "torch_func": run_torch_func,
}


def agreement(
    fisher: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float, atol_rel: float
) -> dict[str, Any]:
    """``allclose(F, F_ref, rtol, atol)`` for every tensor, with ``atol = atol_rel x`` the largest
    reference Fisher value of the whole model (a floor for entries that are numerically zero,
    e.g. attention key biases, whose exact gradient is 0), plus error summaries."""
    scale = max((float(np.max(np.abs(r))) for r in ref.values() if r.size), default=0.0)
    atol = atol_rel * scale
    failed = []
    worst_rel = 0.0
    beyond = 0.0
    total = 0
    for name, r in ref.items():
        a = fisher.get(name)
        if a is None or a.shape != r.shape:
            failed.append(name)
            continue
        diff = np.abs(a - r)
        if not np.allclose(a, r, rtol=rtol, atol=atol):
            failed.append(name)
        big = np.abs(r) > atol
        if big.any():
            worst_rel = max(worst_rel, float(np.max(diff[big] / np.abs(r[big]))))
        beyond += float(np.sum(diff > rtol * np.abs(r)))
        total += r.size
    return {
        "agree": not failed,
        "rtol": rtol,
        "atol": atol,
        "atol_rel": atol_rel,
        "tensors_failed": failed[:10],
        "n_tensors_failed": len(failed),
        "max_rel_err_above_atol": worst_rel,
        "frac_elements_beyond_rtol_no_atol": beyond / max(total, 1),
    }


def reduce_reference(ref: dict[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The full-diagonal reference reduced to the norms a method returned (``name:sum``,
    ``name:axisK``)."""
    out = {}
    for key in keys:
        name, _, what = key.rpartition(":")
        r = ref[name]
        if what == "sum":
            out[key] = np.asarray(r.sum())
        else:
            a = int(what[4:])
            out[key] = r.sum(axis=tuple(d for d in range(r.ndim) if d != a))
    return out


def _describe(exc: BaseException) -> str:
    """``Type: message`` plus the innermost library frame that raised it (``file:line fn``)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    lib = [f for f in frames if "site-packages" in f.filename and "/torch/" not in f.filename]
    where = lib[-1] if lib else (frames[-1] if frames else None)
    loc = ""
    if where is not None:
        short = where.filename.split("site-packages/")[-1]
        loc = f" [at {short}:{where.lineno} {where.name}: {str(where.line).strip()[:120]}]"
    return f"{type(exc).__name__}: {str(exc)[:300]}{loc}"


def keras_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One Keras cell (fresh process): warm-up on the first batch, then N samples timed."""
    import os

    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if spec["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(int(spec["threads"]))
        tf.config.threading.set_inter_op_parallelism_threads(int(spec["threads"]))
    import keras

    from adapters.keras.batchfn import _TFBatchFn
    from adapters.keras.discovery import ModelIndex
    from adapters.keras.fisher import batch_fn
    from gd_cli import corpus as gdc
    from gd_cli.models import keras_bert_classifier

    keras.utils.set_random_seed(0)
    cfg = C.bert_config(spec["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = keras_bert_classifier(cfg)
    n, bs, t = spec["n_samples"], spec["batch_size"], spec["seq_len"]
    texts = gdc.select(C.corpus_paragraphs(), 32 + n, seed=0)[32:]
    enc = C.tokenizer()(
        texts, padding="max_length", truncation=True, max_length=t, return_tensors="np"
    )
    ids, att = enc["input_ids"].astype("int32"), enc["attention_mask"].astype("int32")
    labels = np.random.default_rng(0).integers(0, 2, size=n).astype("int32")
    batches = [
        ({"input_ids": ids[a : a + bs], "attention_mask": att[a : a + bs]}, labels[a : a + bs])
        for a in range(0, n, bs)
    ]
    batches = [
        tuple(tf.convert_to_tensor(x) for x in (b[0]["input_ids"], b[0]["attention_mask"], b[1]))
        for b in batches
    ]

    def loss(model: Any, batch: Any) -> Any:
        i, m, y = batch
        logits = model({"input_ids": i, "attention_mask": m}, training=False)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    variables = list(ModelIndex.build(model).trainable().values())
    method = spec["method"]
    if method == "keras_train_step":
        opt = keras.optimizers.SGD(1e-6)
        opt.build(model.trainable_variables)

        @tf.function
        def step(batch: Any) -> Any:
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(loss(model, batch))
            grads = tape.gradient(total, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return total

        def run_batch(batch: Any) -> Any:
            return step(batch).numpy()
    else:
        fn = (batch_fn if method == "keras_gd" else _TFBatchFn)(model, variables, loss, False)

        def run_batch(batch: Any) -> Any:
            return fn(batch, 2**31 - 1)

    out: dict[str, Any] = {"n_params": int(sum(int(np.prod(v.shape)) for v in variables))}
    out["status"] = "ok"
    gc.collect()
    rss0 = C.proc_status().get("VmRSS", 0)
    reset_ok = C.reset_peak_rss()
    try:
        run_batch(batches[0])  # warm-up: tracing (keras_gd: its one-time first-batch check)
        if method == "keras_gd":
            run_batch(batches[0])  # and the tracing of its unchecked function
        t0 = time.perf_counter()
        acc = None
        for batch in batches:
            r = run_batch(batch)
            if method != "keras_train_step":  # the float64 sums, as estimate_fisher accumulates
                acc = r[0] if acc is None else [a + b for a, b in zip(acc, r[0], strict=True)]
        seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", error=_describe(exc))
        return out
    st = C.proc_status()
    if method == "keras_gd":
        out["fallback"] = len(getattr(fn, "fallback", {}))
    out.update(_measured(seconds, n, rss0, st, reset_ok, int(spec["threads"] or 0)))
    return out


def _ort_artifacts(spec: dict[str, Any], folder: Path, optimizer: str | None) -> tuple[Any, Any]:
    """``(Artifacts, {onnx name: Param})`` of the cell's BERT classifier, dropout-free, as
    ``adapters.onnx.estimate_fisher`` builds them (``optimizer``: for the train step)."""
    import onnx
    import torch
    import transformers

    from adapters.onnx import graph as g
    from adapters.onnx.discovery import prepare_for_training
    from adapters.onnx.train import _drop_unused_inputs, _dropout_off, _ratio_inputs, make_artifacts
    from gd_cli.models import export_training_onnx

    torch.manual_seed(0)
    cfg = C.bert_config(spec["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.num_labels = 2
    net = transformers.BertForSequenceClassification(cfg)
    t = spec["seq_len"]
    example = (torch.ones(2, t, dtype=torch.long), torch.ones(2, t, dtype=torch.long))
    path = export_training_onnx(net, example, folder / "model.onnx", opset=17)
    proto = onnx.load(str(path))
    fixed, _ = prepare_for_training(_dropout_off(proto))
    _drop_unused_inputs(fixed, _ratio_inputs(proto).values())
    art = make_artifacts(fixed, folder / "art", "cross_entropy", optimizer=optimizer, repair=False)
    table = {
        n: g.Param(n, str(art.params[n][0]), (), bool(art.params[n][1])) for n in art.requires_grad
    }
    return art, table


def ort_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One ONNX Runtime Training cell (fresh process): warm-up on the first batch (``ort_gd``:
    its one-time check against the loop), then N samples timed."""
    import tempfile

    from adapters.onnx.persample import Engine
    from adapters.onnx.train import module_inputs
    from gd_cli import corpus as gdc

    method = spec["method"]
    n, bs, t = spec["n_samples"], spec["batch_size"], spec["seq_len"]
    texts = gdc.select(C.corpus_paragraphs(), 32 + n, seed=0)[32:]
    enc = C.tokenizer()(
        texts, padding="max_length", truncation=True, max_length=t, return_tensors="np"
    )
    ids, att = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    labels = np.random.default_rng(0).integers(0, 2, size=n).astype(np.int64)
    batches = [
        {
            "input_ids": ids[a : a + bs],
            "attention_mask": att[a : a + bs],
            "labels": labels[a : a + bs],
        }
        for a in range(0, n, bs)
    ]
    tmp = tempfile.TemporaryDirectory(prefix="gd-bench-ort-")
    art, table = _ort_artifacts(spec, Path(tmp.name), "sgd" if method == "ort_train_step" else None)
    out: dict[str, Any] = {"status": "ok"}
    gc.collect()
    rss0 = C.proc_status().get("VmRSS", 0)
    reset_ok = C.reset_peak_rss()
    engine = None
    try:
        if method == "ort_train_step":
            module, opt, state = art.open("cpu", optimizer=True)
            module.train()
            names = list(module.input_names())

            def run_batch(batch: dict[str, Any]) -> Any:
                module.lazy_reset_grad()
                loss = module(*module_inputs(names, batch))
                opt.step()
                return loss
        else:
            engine = Engine(art, table, "cpu", per_sample=method == "ort_gd")

            def run_batch(batch: dict[str, Any]) -> Any:
                return engine.sq_grad_sums(batch)

        run_batch(batches[0])  # warm-up (ort_gd: its one-time first-batch check)
        t0 = time.perf_counter()
        for batch in batches:
            r = run_batch(batch)
            if engine is not None:  # the float64 sums, accumulated as estimate_fisher does
                engine.add(r.sums, len(batches))
        seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", error=_describe(exc))
        return out
    finally:
        tmp.cleanup()
    st = C.proc_status()
    state = engine.state if engine is not None else state
    out["n_params"] = int(sum(int(state.parameters[k].data.size) for k in art.requires_grad))
    if engine is not None:
        out["fallback"] = len(engine.report()["fallback"])
    out.update(_measured(seconds, n, rss0, st, reset_ok, int(spec["threads"] or 0)))
    return out


def _measured(
    seconds: float, n: int, rss0: float, st: dict[str, Any], reset_ok: bool, threads: int
) -> dict[str, Any]:
    """The fields every cell records: time per sample and per 16, resident memory and its peak
    growth since ``rss0`` (kB, from /proc/self/status ``st``)."""
    return {
        "seconds": round(seconds, 4),
        "samples_per_s": round(n / seconds, 3),
        "s_per_16": round(seconds / n * 16, 4),
        "rss_before_mb": round(rss0 / 1024, 1),
        "peak_rss_mb": round(st.get("VmHWM", 0) / 1024, 1),
        "peak_growth_mb": round((st.get("VmHWM", 0) - rss0) / 1024, 1),
        "peak_reset": reset_ok,
        "threads": threads,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell and return its measured fields (called in a fresh process)."""
    if spec["method"] in KERAS_METHODS:
        return keras_worker(spec)
    if spec["method"] in ORT_METHODS:
        return ort_worker(spec)
    if spec["method"] in PUBLIC_METHODS:
        import _fisher_public

        return _fisher_public.run(spec)
    import torch

    from gd_core._io import atomic_write_npz, read_npz

    method = spec["method"]
    _OPACUS.clear()
    _GHOST.clear()
    if method.startswith("opacus"):
        import importlib.util

        if importlib.util.find_spec("opacus") is None:
            return {"status": "unavailable", "reason": "opacus is not installed"}
    cuda = str(spec.get("device") or "cpu").startswith("cuda")
    import os

    if method.startswith("gd_norms_"):
        os.environ["GD_NORMS_ROUTE"] = method.rpartition("_")[2]
    else:  # gd_norms: the cost rule
        os.environ.pop("GD_NORMS_ROUTE", None)
    model, loss, batches, names = _setup(spec)
    n_params = sum(int(p.numel()) for n, p in model.named_parameters() if n in names)
    out: dict[str, Any] = {"n_params": n_params, "status": "ok"}
    if method == "authors":
        need_gb = min(spec["n_samples"], HOLD) * n_params * 4 / 1e9 + 1.0
        avail = C.mem_available_gb()
        out["est_need_gb"] = round(need_gb, 2)
        if avail is not None and need_gb > 0.8 * avail:
            out.update(
                status="skipped",
                reason=f"needs ~{need_gb:.1f} GB (holds {min(spec['n_samples'], HOLD)} squared "
                f"gradients), {avail:.1f} GB available",
            )
            return out
    runner = RUNNERS[method]
    # peak memory is measured from here (model, data and reference bank loaded): the warm-up on
    # one small batch (first-call allocations, hook set-up) is included, it is small
    gc.collect()
    rss0 = C.proc_status().get("VmRSS", 0)
    reset_ok = C.reset_peak_rss()
    try:
        runner(
            model,
            loss,
            [_take(batches[0], 0, min(2, spec["batch_size"]))],
            names,
            {**spec, "n_samples": 2},
        )
    except Exception as exc:  # noqa: BLE001 - a comparison row that cannot run is a result
        out.update(status="error", error=_describe(exc))
        return out
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        gpu0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        fisher = runner(model, loss, batches, names, spec)
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", error=_describe(exc))
        return out
    seconds = time.perf_counter() - t0
    if cuda:
        out["gpu_peak_growth_mb"] = round((torch.cuda.max_memory_allocated() - gpu0) / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    st = C.proc_status()
    n = spec["n_samples"]
    out.update(_measured(seconds, n, rss0, st, reset_ok, torch.get_num_threads()))
    ref_path = spec.get("ref")
    if fisher is not None and ref_path:
        if method == "gd" and spec.get("write_ref"):
            atomic_write_npz(
                ref_path, json.dumps({"names": list(fisher)}), dict(enumerate_keys(fisher))
            )
        elif Path(ref_path).exists():
            meta, arrays = read_npz(ref_path, what="Fisher reference")
            ref = {name: arrays[f"a{i}"] for i, name in enumerate(meta["names"])}
            if method in NORM_METHODS:
                ref = reduce_reference(ref, list(fisher))
            out["agreement"] = agreement(fisher, ref, spec["rtol"], spec["atol_rel"])
    return out


def enumerate_keys(fisher: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    return [(f"a{i}", v) for i, v in enumerate(fisher.values())]


# --------------------------------------------------------------------------------------------
# parent: plan, spawn workers, record
# --------------------------------------------------------------------------------------------


def run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """``worker(spec)`` in this process (smoke runs: no interpreter start-up per cell)."""
    try:
        return worker(spec)
    except Exception as exc:  # noqa: BLE001 - recorded like a crashed worker
        return {"status": "crashed", "reason": _describe(exc)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    C.add_worker_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 8 samples")
    ap.add_argument("--model", default="minilm", choices=("minilm", "tiny", "smoke"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", default="16,64,128", help="comma list of N")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=0, help="gd chunk_size (0 = its default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model and batches on it)")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument(
        "--atol-rel",
        type=float,
        default=1e-6,
        help="absolute tolerance as a fraction of each tensor's largest Fisher value",
    )
    ap.add_argument("--ref-dir", default="/tmp/gd-bench-fisher-refs")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs (*_public methods)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.worker is not None:
        return C.answer_worker(args.worker, worker)

    if args.smoke:
        args.model, args.samples, args.batch_size, args.seq_len = "smoke", "8", 4, 16
        args.in_process = True
        default_out = Path("/tmp/gd-bench-smoke/fisher-smoke.jsonl")
    else:
        default_out = C.RESULTS_DIR / "fisher.jsonl"
    out_path = Path(args.out) if args.out else default_out
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: expected names from {METHODS}, received {m!r}")
    sizes = [int(s) for s in args.samples.split(",") if s]
    results = C.Results(out_path)
    machine = C.machine_info()
    ref_dir = Path(args.ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "chunk_size": args.chunk_size,
    }
    if args.device != "cpu":  # keeps the keys of earlier CPU results unchanged
        base["device"] = args.device
    for rep in range(args.repeats):
        for n in sizes:
            ref = ref_dir / (f"{args.model}-n{n}-bs{args.batch_size}-len{args.seq_len}.fisher.npz")
            if args.device != "cpu":
                ref = ref.with_name(ref.name.replace(".fisher", f"-{args.device}.fisher"))
            # gd first: its Fisher is the reference the other methods are checked against
            torch_rows = any(m in TORCH_METHODS for m in methods)
            order = (["gd"] if "gd" in methods or (torch_rows and not ref.exists()) else []) + [
                m for m in methods if m != "gd"
            ]
            for method in order:
                key = {**base, "method": method, "n_samples": n, "repeat": rep}
                recorded = method in methods and not results.done(key)
                if method == "gd":
                    need_ref = not ref.exists() and any(
                        m
                        not in ("gd", "train_step", "floor")
                        + KERAS_METHODS
                        + ORT_METHODS
                        + PUBLIC_METHODS
                        and not results.done({**base, "method": m, "n_samples": n, "repeat": rep})
                        for m in methods
                    )
                    if not recorded and not need_ref:
                        continue
                elif not recorded:
                    continue
                spec = {
                    **base,
                    "method": method,
                    "n_samples": n,
                    "ref": str(ref),
                    "write_ref": method == "gd" and not ref.exists(),
                    "rtol": args.rtol,
                    "atol_rel": args.atol_rel,
                    "pairs": args.pairs,
                }
                C.log(f"fisher: {method} N={n} repeat {rep} ...")
                res = (
                    run_in_process(spec)
                    if args.in_process
                    else C.spawn_worker(__file__, spec, args.timeout)
                )
                if not recorded:
                    continue
                res["machine"] = {**machine, "loadavg_1m": C.machine_info()["loadavg_1m"]}
                res["bench"] = "fisher"
                results.append(key, res)
                agree = res.get("agreement", {})
                if method in PUBLIC_METHODS and res.get("status") == "ok":
                    C.log(
                        f"  first call {res['first_call_s']:.2f} s; median public/step "
                        f"{res['median_ratio']:.2f} ({res['median_public_s']:.2f} s / "
                        f"{res['median_step_s']:.2f} s); load {res['loadavg_before']:.1f}"
                    )
                    continue
                C.log(
                    f"  {res.get('status')}: "
                    + (
                        f"{res['seconds']:.2f} s, {res['samples_per_s']:.2f} samples/s, "
                        f"peak +{res['peak_growth_mb']:.0f} MB"
                        if res.get("status") == "ok"
                        else str(res.get("reason") or res.get("error"))
                    )
                    + (f", agree={agree.get('agree')}" if agree else "")
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
