"""Fine-tuning overhead: training-step time of guided dropout against standard dropout.

For each cell (framework x model x granularity) a FRESH subprocess builds two copies of the same
classifier: **A** with standard dropout at the mean probability of the guided profile (every
profiled site at that p), **B** with guided dropout applied from the profile. It then times
``--pairs`` interleaved A/B pairs of training steps (forward, loss, backward, optimizer step on
one fixed batch) in random order within each pair, after ``--warmup`` steps of each, and records
the ratio ``t_B / t_A`` of every pair: its median, quartiles and IQR go into one JSON line per
cell (append, flush; a rerun skips cells already present).

Frameworks: ``torch`` (``adapters.torch.apply``, granularity ``site`` and ``unit``), ``keras``
(``adapters.keras.apply`` on ``gd_cli.models.keras_bert_classifier``, the functional Keras 3 BERT
with the torch model's shapes and layer names; TensorFlow backend; granularity ``site`` and ``unit``), ``ort`` (the torch classifier
exported to ONNX in training mode, ``adapters.onnx.apply`` + ``make_artifacts``, one
``onnxruntime.training.api`` step; granularity ``site`` and ``unit``, the latter a per-unit
rate subgraph in front of each hidden-state Dropout). Models: ``tiny`` (random BERT 2x128)
and ``minilm`` (the packaged MiniLM-L6, 6x384, pretrained for torch/ORT; same shapes, random
weights, for Keras). The classification head's dropout is not profiled and stays 0.1 in A and B.

Targets (from the issue): site level <= 1.01, unit level <= 1.05.

Examples::

    python bench/overhead.py --smoke
    python bench/overhead.py --frameworks torch,keras,ort --models tiny,minilm --pairs 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

TARGET = {"site": 1.01, "unit": 1.05}
GRANULARITIES = {"torch": ("site", "unit"), "keras": ("site", "unit"), "ort": ("site", "unit")}


# --------------------------------------------------------------------------------------------
# shared set-up (inside a worker)
# --------------------------------------------------------------------------------------------


def get_profile(spec: dict[str, Any]) -> Any:
    """The guided profile of ``spec['model']`` (cached under bench/results/, or a temp dir)."""
    import glue

    model = spec["model"]
    samples, seq_len = spec["profile_samples"], spec["profile_len"]
    folder = Path(spec["profile_dir"])
    path = folder / f"{model}-wikitext2-contrastive-{samples}x{seq_len}.profile.npz"
    return glue.ensure_profile(path, model, samples, seq_len)


def fixed_batch(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """``batch_size`` WikiText-2 paragraphs padded to ``seq_len`` and seeded random labels."""
    tok = C.tokenizer()
    texts = C.corpus_paragraphs()[: spec["batch_size"]]
    enc = tok(
        texts,
        truncation=True,
        max_length=spec["seq_len"],
        padding="max_length",
        return_tensors="np",
    )
    labels = np.random.default_rng(0).integers(0, 2, spec["batch_size"])
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "labels": labels.astype(np.int64),
    }


def summarize(ta: list[float], tb: list[float], granularity: str) -> dict[str, Any]:
    """Median, quartiles and IQR of the per-pair ratios t_B / t_A, and the target verdict."""
    r = np.asarray(tb) / np.asarray(ta)
    q25, med, q75 = (float(v) for v in np.percentile(r, [25, 50, 75]))
    return {
        "pairs": len(r),
        "ratio_median": round(med, 4),
        "ratio_q25": round(q25, 4),
        "ratio_q75": round(q75, 4),
        "ratio_iqr": round(q75 - q25, 4),
        "t_a_median_s": round(float(np.median(ta)), 5),
        "t_b_median_s": round(float(np.median(tb)), 5),
        "target": TARGET[granularity],
        "meets_target": med <= TARGET[granularity],
        "t_a_s": [round(v, 5) for v in ta],
        "t_b_s": [round(v, 5) for v in tb],
    }


def interleave(
    step_a: Callable[[], None], step_b: Callable[[], None], pairs: int, warmup: int, seed: int
) -> tuple[list[float], list[float]]:
    """``warmup`` steps of each, then ``pairs`` A/B pairs in random order; returns both timings."""
    for _ in range(warmup):
        step_a()
        step_b()
    rng = np.random.default_rng(seed)
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(pairs):
        order = (("a", step_a), ("b", step_b))
        if rng.random() < 0.5:
            order = order[::-1]
        for which, fn in order:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            (ta if which == "a" else tb).append(dt)
    return ta, tb


def _mean_p(profile: Any) -> float:
    return float(np.mean(list(profile.probabilities().values())))


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


def _torch_classifier(model: str, p: float, attn: str | None = None) -> Any:
    extra = {} if attn is None else {"_attn_implementation": attn}
    return C.load_model(
        model,
        "BertForSequenceClassification",
        num_labels=2,
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=p,
        classifier_dropout=0.1,
        **extra,
    )


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import adapters.torch as gdt

    C.set_threads(spec["threads"])
    profile = get_profile(spec)
    pbar = _mean_p(profile)
    a = _torch_classifier(spec["model"], pbar).train()
    b = _torch_classifier(spec["model"], pbar).train()
    report = gdt.apply(b, profile, granularity=spec["granularity"], missing="keep")
    batch = {k: torch.from_numpy(v) for k, v in fixed_batch(spec).items()}
    labels = batch.pop("labels")

    def make_step(model: Any) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            opt.step()

        return step

    ta, tb = interleave(make_step(a), make_step(b), spec["pairs"], spec["warmup"], spec["seed"])
    hows: dict[str, int] = {}
    for r in report:
        hows[r.how] = hows.get(r.how, 0) + 1
    return {
        "mean_p": round(pbar, 5),
        "applied": hows,
        **summarize(ta, tb, spec["granularity"]),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# keras (TensorFlow backend): a functional BERT with torch-style names
# --------------------------------------------------------------------------------------------


def run_keras(spec: dict[str, Any]) -> dict[str, Any]:
    import keras

    import adapters.keras as gdk
    from gd_cli.models import keras_bert_classifier

    if spec["threads"]:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    profile = get_profile(spec)
    pbar = _mean_p(profile)
    # every encoder site at the profile's mean p; the head's dropout stays 0.1 in A and B
    cfg = C.bert_config(
        spec["model"],
        hidden_dropout_prob=pbar,
        attention_probs_dropout_prob=pbar,
        classifier_dropout=0.1,
    )
    keras.utils.set_random_seed(0)
    a = keras_bert_classifier(cfg)
    b0 = keras_bert_classifier(cfg)
    b0.set_weights(a.get_weights())
    report = gdk.apply(b0, profile, granularity=spec["granularity"], missing="keep")
    b = report.model
    batch = fixed_batch(spec)
    x = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    y = batch["labels"]
    for m in (a, b):
        m.compile(
            optimizer=keras.optimizers.AdamW(1e-5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    def make_step(m: Any) -> Callable[[], None]:
        def step() -> None:
            m.train_on_batch(x, y)

        return step

    ta, tb = interleave(make_step(a), make_step(b), spec["pairs"], spec["warmup"], spec["seed"])
    rows = list(report)
    sources: dict[str, int] = {}
    for r in rows:
        src = getattr(r, "source", "?")
        sources[src] = sources.get(src, 0) + 1
    units = sum(1 for r in rows if getattr(r, "units", None))
    return {
        "mean_p": round(pbar, 5),
        "applied": {"sources": sources, "unit_sites": units},
        "backend": keras.backend.backend(),
        **summarize(ta, tb, spec["granularity"]),
    }


# --------------------------------------------------------------------------------------------
# ORT Training
# --------------------------------------------------------------------------------------------


def run_ort(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import adapters.onnx as ao
    from gd_cli.models import export_training_onnx

    C.set_threads(spec["threads"])
    profile = get_profile(spec)
    pbar = _mean_p(profile)
    # eager attention exports its probability dropout as a Dropout node
    model = _torch_classifier(spec["model"], 0.1, attn="eager")
    batch = fixed_batch(spec)
    work = Path(tempfile.mkdtemp(prefix="gd-bench-ort-"))
    onnx_path = work / "model.onnx"
    ids = torch.from_numpy(batch["input_ids"][:2])
    mask = torch.from_numpy(batch["attention_mask"][:2])
    export_training_onnx(model, (ids, mask), onnx_path, opset=14)
    guided = profile.probabilities()
    uniform = {k: pbar for k in guided}
    arts = {}
    notes = {}
    # B at unit granularity needs the profile itself (its per-unit scores), not {site: p}
    b_source = guided if spec["granularity"] == "site" else profile
    for which, probs in (("a", uniform), ("b", b_source)):
        report = ao.apply(
            str(onnx_path),
            probs,
            missing="keep",
            granularity="site" if which == "a" else spec["granularity"],
        )
        arts[which] = ao.make_artifacts(report.model, work / which, loss="cross_entropy")
        notes[which] = {"absent": list(getattr(report, "absent", []) or [])}
    steps = {}
    for which, art in arts.items():
        module, opt, _ = art.open()
        module.train()
        feeds = ao.module_inputs(module, batch)

        def step(module: Any = module, opt: Any = opt, feeds: Any = feeds) -> None:
            module.lazy_reset_grad()
            module(*feeds)
            opt.step()

        steps[which] = step
    ta, tb = interleave(steps["a"], steps["b"], spec["pairs"], spec["warmup"], spec["seed"])
    return {
        "mean_p": round(pbar, 5),
        "applied": notes,
        **summarize(ta, tb, spec["granularity"]),
    }


RUNNERS = {"torch": run_torch, "keras": run_keras, "ort": run_ort}


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"status": "ok", **RUNNERS[spec["framework"]](spec)}
    except Exception as exc:  # noqa: BLE001 - a framework that cannot run is a result
        import traceback

        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:600]}"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    C.add_worker_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 3 pairs")
    ap.add_argument("--frameworks", default="torch,keras,ort")
    ap.add_argument("--models", default="tiny,minilm")
    ap.add_argument("--granularities", default="site,unit")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-samples", type=int, default=512)
    ap.add_argument("--profile-len", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.worker is not None:
        return C.answer_worker(args.worker, worker)

    if args.smoke:
        args.models, args.pairs, args.warmup = "smoke", 3, 1
        args.in_process = True
        args.batch_size, args.seq_len = 4, 16
        args.profile_samples, args.profile_len = 8, 16
        default_out = Path("/tmp/gd-bench-smoke/overhead-smoke.jsonl")
        profile_dir = default_out.parent
    else:
        default_out = C.RESULTS_DIR / "overhead.jsonl"
        profile_dir = C.RESULTS_DIR
    out_path = Path(args.out) if args.out else default_out
    results = C.Results(out_path)
    machine = C.machine_info()
    wanted = set(args.granularities.split(","))
    for model in args.models.split(","):
        for fw in args.frameworks.split(","):
            if fw not in RUNNERS:
                ap.error(f"--frameworks: expected names from {sorted(RUNNERS)}, received {fw!r}")
            for gran in GRANULARITIES[fw]:
                if gran not in wanted:
                    continue
                key = {
                    "framework": fw,
                    "model": model,
                    "granularity": gran,
                    "batch_size": args.batch_size,
                    "seq_len": args.seq_len,
                    "pairs": args.pairs,
                    "threads": args.threads,
                }
                if results.done(key):
                    continue
                spec = {
                    **key,
                    "warmup": args.warmup,
                    "seed": args.seed,
                    "profile_samples": args.profile_samples,
                    "profile_len": args.profile_len,
                    "profile_dir": str(profile_dir),
                }
                C.log(f"overhead: {fw} {model} {gran} ({args.pairs} pairs) ...")
                with C.Timer() as t:
                    res = (
                        worker(spec)
                        if args.in_process
                        else C.spawn_worker(__file__, spec, args.timeout)
                    )
                res["wall_s"] = round(t.seconds, 1)
                res["bench"] = "overhead"
                res["machine"] = {**machine, "loadavg_1m": C.machine_info()["loadavg_1m"]}
                results.append(key, res)
                if res.get("status") == "ok":
                    C.log(
                        f"  ratio median {res['ratio_median']:.4f} (IQR {res['ratio_iqr']:.4f}); "
                        f"A {res['t_a_median_s'] * 1e3:.1f} ms, B {res['t_b_median_s'] * 1e3:.1f} ms"
                    )
                else:
                    C.log(f"  {res.get('status')}: {res.get('error') or res.get('reason')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
