"""GLUE quality benchmark: guided dropout against standard dropout and controls, paired by seed.

Fine-tunes the packaged MiniLM-L6 (``BertForSequenceClassification``) on CoLA, MRPC, RTE and
STS-B read from ``../shared/data/glue`` with the paper's protocol: pool train and dev, shuffle with
the run's seed, split 80/20, fine-tune with AdamW and evaluate on the 20%. Every run writes one
JSON line to the results file as soon as it finishes; a rerun skips runs already present.

Methods (all on the same split, data order and head initialisation for a given seed):

* ``standard``       uniform dropout 0.1 (the model's own dropout, untouched)
* ``guided``         guided dropout, paper mapping: linear by Fisher rank, 0.0 (most important)
                     to 0.1 (least), from a MiniLM profile on WikiText-2 (contrastive objective)
* ``guided_rescaled`` the guided probabilities rescaled to mean 0.1 (equal budget to standard)
* ``none``           no dropout anywhere
* ``uniform_mean``   every profiled site at the guided probabilities' mean (0.05 for the paper's
                     0.0-0.1 range): the same budget as ``guided`` without the ordering, paired
                     with ``guided`` ("why not just set dropout to 0.05?")
* ``random_order``   the guided probabilities assigned to sites in a random order
                     (``gd_core.shuffled`` with the run's seed): tests whether the order matters
* ``depth``          the same range ordered by depth (``depth_linear``, LIMA-style)
* ``uniform_0.15``   uniform dropout 0.15
* ``guided_0.3``     guided 0.0 to 0.3 (mean 0.15, compared with ``uniform_0.15``)
* ``guided_unit``    the ``guided`` site probabilities, spread over each site's units by the
                     profile's per-unit scores (``granularity="unit"``; every site keeps its mean)

The classification head's dropout is not a profiled site; it stays at the standard rate of the
comparison (0.1; 0.15 for the 0.15-budget pair; 0 for ``none``).

Settings: ``full`` (100% of the training split, 3 epochs, lr 2e-5), ``half`` (50%, 3 epochs,
lr 2e-5), ``low`` (500 examples; more optimisation so that CoLA learns at all: see
``--low-epochs``/``--low-lr``, the same for every method).

Examples::

    python bench/glue.py --smoke                 # < 1 minute, tiny random BERT
    python bench/glue.py --quick                 # the ~90-minute grid (low data, 3 methods)
    python bench/glue.py --grid full             # everything; resumable across sessions
    python bench/glue.py --tasks CoLA --settings low --methods standard,guided --seeds 0-9
    python bench/glue.py --device cuda --jobs 8 --deadline 420 ...   # see bench/gpu_grid.sh

With ``--jobs N`` the runs are dealt round-robin to N worker processes; a worker that has
finished its own share takes runs nobody has started yet (a claim file per run), so a grid on a
GPU shared by several workers finishes together. ``--deadline S`` stops taking new runs S
seconds after the start (runs already going finish); a rerun resumes what is left.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

# --------------------------------------------------------------------------------------------
# tasks and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    pair: bool
    num_labels: int  # 1 = regression
    primary: str
    metrics: tuple[str, ...]


TASKS = {
    "CoLA": Task("CoLA", False, 2, "mcc", ("mcc", "accuracy")),
    "MRPC": Task("MRPC", True, 2, "accuracy", ("accuracy", "f1")),
    "RTE": Task("RTE", True, 2, "accuracy", ("accuracy",)),
    "STS-B": Task("STS-B", True, 1, "pearson", ("pearson", "spearman")),
}


@dataclass
class Example:
    a: str
    b: str | None
    label: float


def _rows(path: Path, header: bool) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    head: list[str] = []
    if header and lines:
        head, lines = lines[0].split("\t"), lines[1:]
    return head, [ln.split("\t") for ln in lines if ln.strip()]


def read_task(task: str, data_dir: Path = C.GLUE_DIR) -> tuple[list[Example], int]:
    """Pooled train + dev examples of ``task`` (in file order) and the number of skipped rows.

    Layouts follow ``../shared/data/README.md``: CoLA has no header (source, label, original
    label, sentence); RTE ``index sentence1 sentence2 label``; MRPC ``Quality #1 ID #2 ID
    #1 String #2 String``; STS-B the 10-column header with ``score``.
    """
    out: list[Example] = []
    bad = 0
    for split in ("train", "dev"):
        path = data_dir / task / f"{split}.tsv"
        if not path.exists():
            raise FileNotFoundError(
                f"data: expected {path} (see ../shared/data/README.md), received no file; "
                "fix: run from the repository checkout next to ../shared/data"
            )
        head, rows = _rows(path, header=task != "CoLA")
        for r in rows:
            try:
                if task == "CoLA":
                    out.append(Example(r[3], None, float(int(r[1]))))
                elif task == "MRPC":
                    out.append(Example(r[3], r[4], float(int(r[0]))))
                elif task == "RTE":
                    lab = r[head.index("label")].strip()
                    if lab not in ("entailment", "not_entailment"):
                        raise ValueError(lab)
                    out.append(
                        Example(
                            r[head.index("sentence1")],
                            r[head.index("sentence2")],
                            1.0 if lab == "entailment" else 0.0,
                        )
                    )
                else:  # STS-B
                    out.append(
                        Example(
                            r[head.index("sentence1")],
                            r[head.index("sentence2")],
                            float(r[head.index("score")]),
                        )
                    )
            except (IndexError, ValueError):
                bad += 1
    return out, bad


def split_examples(
    examples: Sequence[Example], seed: int, train_size: int | float, eval_cap: int | None
) -> tuple[list[Example], list[Example]]:
    """The paper's split: shuffle the pooled rows with ``seed``, 80% train / 20% eval.

    ``train_size`` is a fraction of the 80% (1.0, 0.5) or a number of examples (500); the
    subset is a prefix of the shuffled training part, so smaller settings are nested in larger
    ones. ``eval_cap`` keeps the first examples of the shuffled eval part.
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    cut = int(round(0.8 * len(examples)))
    train = [examples[i] for i in order[:cut]]
    evals = [examples[i] for i in order[cut:]]
    if isinstance(train_size, float):
        train = train[: max(1, int(round(train_size * len(train))))]
    else:
        train = train[: int(train_size)]
    if eval_cap:
        evals = evals[:eval_cap]
    return train, evals


def encode_examples(tok: Any, examples: Sequence[Example], max_len: int) -> list[dict[str, Any]]:
    """Token ids per example (truncated to ``max_len``, not padded)."""
    a = [e.a for e in examples]
    b = [e.b for e in examples] if examples and examples[0].b is not None else None
    enc = (
        tok(a, b, truncation=True, max_length=max_len)
        if b
        else tok(a, truncation=True, max_length=max_len)
    )
    out = []
    for i, e in enumerate(examples):
        out.append(
            {
                "input_ids": enc["input_ids"][i],
                "token_type_ids": enc["token_type_ids"][i],
                "label": e.label,
            }
        )
    return out


def collate(items: Sequence[dict[str, Any]], pad_id: int, regression: bool) -> dict[str, Any]:
    """Pad a batch to its longest example (dynamic padding)."""
    import torch

    n = len(items)
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    tt = torch.zeros((n, width), dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = torch.tensor(it["input_ids"])
        tt[i, :k] = torch.tensor(it["token_type_ids"])
        att[i, :k] = 1
    labels = torch.tensor(
        [it["label"] for it in items], dtype=torch.float32 if regression else torch.long
    )
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": att, "labels": labels}


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def mcc(y: np.ndarray, p: np.ndarray) -> float:
    """Matthews correlation of binary labels (0 when a row or column of the table is empty)."""
    tp = float(np.sum((y == 1) & (p == 1)))
    tn = float(np.sum((y == 0) & (p == 0)))
    fp = float(np.sum((y == 0) & (p == 1)))
    fn = float(np.sum((y == 1) & (p == 0)))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def f1(y: np.ndarray, p: np.ndarray) -> float:
    """F1 of the positive class (label 1)."""
    tp = float(np.sum((y == 1) & (p == 1)))
    fp = float(np.sum((y == 0) & (p == 1)))
    fn = float(np.sum((y == 1) & (p == 0)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    uniq, inv = np.unique(x, return_inverse=True)  # average ranks of ties
    sums = np.bincount(inv, weights=r)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (0 when either side is constant)."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    den = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return 0.0 if den == 0 else float(np.sum(x * y) / den)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks)."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def task_metrics(task: Task, labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics from labels and predictions (classes or scores)."""
    if task.num_labels == 1:
        return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
    out = {"accuracy": float(np.mean(preds == labels))}
    if "mcc" in task.metrics:
        out["mcc"] = mcc(labels, preds)
    if "f1" in task.metrics:
        out["f1"] = f1(labels, preds)
    return out


#: a baseline whose primary metric is at or below this has not learned (flagged, not a tie)
LEARN_THRESHOLD = {"mcc": 0.05, "pearson": 0.1}
#: accuracy within this margin of the majority-class rate: not learned
MAJORITY_MARGIN = 0.01


def learned(task: Task, metrics: dict[str, float], majority: float | None) -> bool:
    """Whether a run beat the trivial predictor (MCC/Pearson threshold, majority accuracy)."""
    if task.primary == "accuracy":
        return majority is None or metrics["accuracy"] > majority + MAJORITY_MARGIN
    return metrics[task.primary] > LEARN_THRESHOLD[task.primary]


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------

PAPER = {"name": "linear_rank", "p_lower": 0.0, "p_upper": 0.1, "target_mean": None}


@dataclass(frozen=True)
class Method:
    name: str
    native: float | None  # uniform dropout set through the config (no adapter)
    head: float  # classification-head dropout
    mapping: dict[str, Any] | None = None  # mapping of the profile's scores
    shuffle: bool = False
    baseline: str = "standard"
    granularity: str = "site"  # "unit": per-unit rates inside each site (same site means)
    flatten: bool = False  # every site at the mean of the mapped probabilities


METHODS = {
    "standard": Method("standard", 0.1, 0.1),
    "guided": Method("guided", None, 0.1, PAPER),
    "guided_rescaled": Method("guided_rescaled", None, 0.1, {**PAPER, "target_mean": 0.1}),
    "none": Method("none", 0.0, 0.0),
    # the controls are also paired with guided: does the Fisher ordering beat a random or a
    # depth ordering of the same probabilities?
    "random_order": Method("random_order", None, 0.1, PAPER, shuffle=True, baseline="guided"),
    "uniform_mean": Method("uniform_mean", None, 0.1, PAPER, baseline="guided", flatten=True),
    "depth": Method("depth", None, 0.1, {**PAPER, "name": "depth_linear"}, baseline="guided"),
    "uniform_0.15": Method("uniform_0.15", 0.15, 0.15),
    "guided_0.3": Method(
        "guided_0.3", None, 0.15, {**PAPER, "p_upper": 0.3}, baseline="uniform_0.15"
    ),
    # the library's step beyond the paper, paired with guided: do per-unit rates help?
    "guided_unit": Method("guided_unit", None, 0.1, PAPER, baseline="guided", granularity="unit"),
}


def site_probabilities(method: Method, profile: Any, seed: int) -> dict[str, float] | None:
    """Per-site probabilities of a guided method (None for native uniform methods)."""
    import gd_core

    if method.mapping is None:
        return None
    probs = profile.probability_array(method.mapping)
    if method.shuffle:
        probs = gd_core.shuffled(probs, seed)
    if method.flatten:  # the same mean rate, no ordering
        probs = np.full_like(probs, float(np.mean(probs)))
    return {name: float(p) for name, p in zip(profile.site_names, probs, strict=True)}


# --------------------------------------------------------------------------------------------
# the profile (computed once, cached under bench/results/)
# --------------------------------------------------------------------------------------------


def ensure_profile(
    path: Path, model_name: str, samples: int, seq_len: int, batch_size: int = 16
) -> Any:
    """Load the MiniLM profile from ``path`` or compute it on the WikiText-2 sample and save it.

    Contrastive objective (MiniLM is a bare sentence encoder): ``gd_cli.corpus.objective_loss``
    with a fixed bank of 32 reference paragraphs disjoint from the samples.
    """
    from gd_core import SensitivityProfile

    if path.exists():
        return SensitivityProfile.load(path)
    import adapters.torch as gdt
    from gd_cli import corpus as gdc
    from gd_cli.text import text_batches

    paragraphs = C.corpus_paragraphs()
    chosen = gdc.select(paragraphs, samples + 32, seed=0)
    texts, refs = chosen[:samples], chosen[samples:]
    tok = C.tokenizer()
    model = C.load_model(model_name, "BertModel").eval()
    tm = gdc.TextModel(model, tok, "contrastive", model_name, "")
    batches, loss = text_batches(
        tm, texts, seq_len=seq_len, batch_size=batch_size, seed=0, references=refs
    )
    C.log(f"profiling {model_name} on {samples} WikiText-2 paragraphs (len {seq_len}) ...")
    with C.Timer() as t:
        prof = gdt.profile(
            model,
            batches,
            loss=loss,
            progress=False,
            metadata={
                "corpus": str(C.CORPUS.name),
                "seq_len": seq_len,
                "objective": "contrastive",
                "references": len(refs),
            },
        )
    C.log(f"profile done in {t.seconds:.1f} s -> {path}")
    prof.save(path)
    return prof


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    train_size: int | float
    epochs: int
    lr: float


def build_model(model_name: str, task: Task, method: Method, seed: int) -> Any:
    """Task model with the method's native dropout; head re-initialised from ``seed``."""
    import torch

    p = 0.1 if method.native is None else method.native
    overrides = {
        "num_labels": task.num_labels,
        "hidden_dropout_prob": p,
        "attention_probs_dropout_prob": p,
        "classifier_dropout": method.head,
    }
    torch.manual_seed(seed)
    # pretrained MiniLM, or a random tiny BERT with the same weights for every seed and method
    model = C.load_model(model_name, "BertForSequenceClassification", **overrides)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        std = float(model.config.initializer_range)
        model.classifier.weight.normal_(0.0, std, generator=g)
        model.classifier.bias.zero_()
    return model


def train_and_eval(
    model: Any,
    task: Task,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    warmup: float = 0.1,
    device: str = "cpu",
) -> dict[str, Any]:
    """AdamW (weight decay 0.01, none on biases/LayerNorm; the fused kernel where torch has it),
    linear warm-up 10% then linear decay, gradient clipping at 1.0; evaluation after the last
    epoch."""
    import torch
    import torch.nn.functional as F

    regression = task.num_labels == 1
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if n.endswith("bias") or "LayerNorm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused CPU kernel is 4-10x faster than the default on this 22M-parameter model
        opt = torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    warm = max(1, int(round(warmup * total)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order_gen = torch.Generator().manual_seed(20_000 + seed)
    torch.manual_seed(30_000 + seed)  # dropout masks
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for _epoch in range(epochs):
        perm = torch.randperm(len(train), generator=order_gen).tolist()
        epoch_losses = []
        for s in range(0, len(train), batch_size):
            batch = collate([train[i] for i in perm[s : s + batch_size]], pad_id, regression)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            if regression:
                loss = F.mse_loss(logits.squeeze(-1), labels)
            else:
                loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            epoch_losses.append(loss.detach())
        losses.append(float(torch.stack(epoch_losses).mean()))  # one device sync per epoch
    train_s = time.perf_counter() - t0
    model.eval()
    preds, labels_all = [], []
    t1 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(evals), 64):
            batch = collate(evals[s : s + 64], pad_id, regression)
            labels_all.append(batch.pop("labels").numpy())
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out = logits.squeeze(-1) if regression else logits.argmax(-1)
            preds.append(out.cpu().numpy())
    eval_s = time.perf_counter() - t1
    y = np.concatenate(labels_all)
    p = np.concatenate(preds)
    return {
        "metrics": task_metrics(task, y, p),
        "train_loss_by_epoch": [round(v, 5) for v in losses],
        "steps": total,
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "pred_positive_rate": None if regression else float(np.mean(p == 1)),
    }


def run_one(
    args: argparse.Namespace,
    task: Task,
    setting: Setting,
    method: Method,
    seed: int,
    examples: list[Example],
    tok: Any,
    profile: Any,
) -> dict[str, Any]:
    """Split, tokenise, configure dropout, fine-tune, evaluate: the measured fields of one run."""

    import adapters.torch as gdt

    train_ex, eval_ex = split_examples(examples, seed, setting.train_size, args.eval_cap)
    max_len = args.max_len_pair if task.pair else args.max_len
    train = encode_examples(tok, train_ex, max_len)
    evals = encode_examples(tok, eval_ex, max_len)
    majority = None
    if task.num_labels > 1:
        train_labels = np.array([e.label for e in train_ex])
        maj_label = float(np.bincount(train_labels.astype(int)).argmax())
        majority = float(np.mean(np.array([e.label for e in eval_ex]) == maj_label))
    model = build_model(args.model, task, method, seed).to(args.device)
    probs = site_probabilities(method, profile, seed)
    applied: dict[str, Any] = {"native": method.native}
    if probs is not None:
        if method.granularity == "unit":
            # the same site probabilities as ``guided``, spread over units by the profile
            report = gdt.apply(
                model, profile, mapping=method.mapping, granularity="unit", missing="keep"
            )
            set_by = "profile"
        else:
            report = gdt.apply(model, probs, missing="keep")
            set_by = "given"
        ps = [r.new_p for r in report if r.source == set_by]
        applied = {
            "sites_set": len(ps),
            "mean_p": round(float(np.mean(ps)), 5),
            "min_p": round(float(np.min(ps)), 5),
            "max_p": round(float(np.max(ps)), 5),
            "kept": [r.site for r in report if r.source == "keep"],
        }
        if method.flatten:  # recorded as what it is: one uniform rate, guided's mean
            applied["uniform_p"] = applied["mean_p"]
        if method.granularity == "unit":
            applied["unit_sites"] = sum(1 for r in report if r.how.startswith("unit rates"))
    applied["head_p"] = round(float(model.dropout.p), 6)
    out = train_and_eval(
        model,
        task,
        train,
        evals,
        seed=seed,
        epochs=setting.epochs,
        lr=setting.lr,
        batch_size=args.batch_size,
        pad_id=int(tok.pad_token_id),
        device=args.device,
    )
    ok = learned(task, out["metrics"], majority)
    return {
        **out,
        "primary": task.primary,
        "majority_rate": majority,
        "learned": ok,
        "n_train": len(train),
        "n_eval": len(evals),
        "dropout": applied,
    }


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


#: seconds per epoch over 500 training examples (lengths 64 / 128, batch 16, 2 threads) and
#: fixed seconds per run (model load, tokenisation, evaluation of 500 examples), measured with
#: MiniLM on the 2-core machine of docs/benchmarks.md (load average 0.4-2)
EPOCH_S_PER_500 = {"CoLA": 10.5, "MRPC": 31.0, "RTE": 71.0, "STS-B": 26.0}
FIXED_S = 7.0
POOLED = {"CoLA": 9594, "MRPC": 4076, "RTE": 2767, "STS-B": 5749}


def len_examples(task: str) -> int:
    """Pooled train + dev rows of a task (from ../shared/data/README.md)."""
    return POOLED[task]


def estimate_seconds(task: Task, setting: Setting, pooled: int) -> float:
    """Rough wall time of one run, scaled from :data:`EPOCH_S_PER_500`.

    Example:
        >>> round(estimate_seconds(TASKS["RTE"], Setting("low", 500, 10, 5e-5), 2767))
        717
    """
    train = int(round(0.8 * pooled))
    n = setting.train_size if isinstance(setting.train_size, int) else setting.train_size * train
    return FIXED_S + EPOCH_S_PER_500[task.name] * setting.epochs * min(n, train) / 500


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0..4]; ``"0,3,7"`` -> [0, 3, 7].

    Example:
        >>> parse_seeds("0-2,5")
        [0, 1, 2, 5]
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def run_jobs(args: argparse.Namespace, argv: Sequence[str] | None, jobs: int) -> int:
    """Run the remaining runs in ``jobs`` worker processes (``--shard i/jobs``), each pinned to
    ``--threads`` (default: the machine's cores split between them), all appending to one file.

    Runs are dealt round-robin from the seed-major plan, so the workers move through the grid
    together and a grid cut short still holds complete seed pairs; a worker done with its share
    takes runs not yet started by the others (one claim file per run in a folder made for this
    invocation, so claims never outlive it).
    """
    import shutil
    import subprocess
    import tempfile

    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    base = list(sys.argv[1:] if argv is None else argv)
    claims = tempfile.mkdtemp(prefix=".claims-", dir=Path(args.out).parent)
    extra = ["--threads", str(threads), "--out", args.out, "--claims", claims]
    extra += ["--started", repr(args.started)]
    if args.profile:
        extra += ["--profile", args.profile]
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *base, *extra]
                + ["--shard", f"{i}/{jobs}"]
            )
            for i in range(jobs)
        ]
        C.log(f"{jobs} workers of {threads} thread(s) started")
        codes = [proc.wait() for proc in procs]
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    return max(codes)


def claim(claims: str | None, key: dict[str, Any]) -> bool:
    """Take the run ``key`` for this worker; False when another worker already took it.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> claim(folder, {"seed": 0}), claim(folder, {"seed": 0}), claim(folder, {"seed": 1})
        (True, False, True)
        >>> claim(None, {"seed": 0})  # a single process needs no claims
        True
    """
    import hashlib

    if claims is None:
        return True
    digest = hashlib.sha1(C.cell_key(key).encode()).hexdigest()
    try:
        os.close(os.open(os.path.join(claims, digest), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def make_settings(args: argparse.Namespace) -> dict[str, Setting]:
    if args.smoke:  # every setting on a few examples: the bookkeeping, not the optimisation
        return {
            "full": Setting("full", 32, args.epochs, args.lr),
            "half": Setting("half", 16, args.epochs, args.lr),
            "low": Setting("low", args.low_size, args.low_epochs, args.low_lr),
        }
    return {
        "full": Setting("full", 1.0, args.epochs, args.lr),
        "half": Setting("half", 0.5, args.epochs, args.lr),
        "low": Setting("low", args.low_size, args.low_epochs, args.low_lr),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, a few examples")
    ap.add_argument("--quick", action="store_true", help="the ~90-minute low-data grid")
    ap.add_argument("--grid", choices=("full",), help="every task, setting and method")
    ap.add_argument("--tasks", default=None, help="comma list (default: all four)")
    ap.add_argument("--settings", default=None, help="comma list of full,half,low")
    ap.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)}")
    ap.add_argument("--seeds", default=None, help="e.g. 0-4 (default 5; 10 in low data)")
    ap.add_argument("--model", default="minilm", choices=("minilm", "tiny", "smoke"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--low-size", type=int, default=500)
    ap.add_argument("--low-epochs", type=int, default=None, help="default 10 (--quick: 4)")
    ap.add_argument("--low-lr", type=float, default=None, help="default 5e-5 (--quick: 1e-4)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128, help="single sentences")
    ap.add_argument("--max-len-pair", type=int, default=None, help="pairs; 128 (--quick: 96)")
    ap.add_argument("--eval-cap", type=int, default=0, help="max eval examples (0 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes sharing the runs (default 1; --quick: 2 where there are 2+ cores; "
        "on 2 cores, 2 workers of 1 thread finish a grid about twice as fast as 1 of 2 threads)",
    )
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/N", set by --jobs
    ap.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # set by --jobs
    ap.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device of model and batches: cpu, cuda, cuda:1, ... (default cpu)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after the start after which no new run starts (runs going finish); "
        "a rerun resumes the rest",
    )
    ap.add_argument("--profile", default=None, help="profile file (default: cached per model)")
    ap.add_argument("--profile-samples", type=int, default=512)
    ap.add_argument("--profile-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="results JSONL (appended; resumes)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs still to do")
    args = ap.parse_args(argv)
    if args.started is None:
        args.started = time.time()
    if args.deadline is not None and args.deadline <= 0:
        ap.error(f"--deadline must be positive seconds, got {args.deadline}")
    if args.device != "cpu":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            ap.error(
                f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
                "use --device cpu"
            )

    if args.smoke:
        args.model = "smoke"
        args.low_size, args.low_epochs, args.epochs = 16, 1, 1
        args.max_len, args.max_len_pair, args.eval_cap = 32, 48, 16
        args.profile_samples, args.profile_len = 8, 32
        tasks = args.tasks or "CoLA,MRPC,RTE,STS-B"
        settings = args.settings or "low"
        methods = args.methods or "standard,guided,random_order,depth"
        seeds = args.seeds or "0"
        default_out = Path("/tmp/gd-bench-smoke/glue-smoke.jsonl")
    elif args.quick:
        # sized to fit ~90 minutes on 2 cores (docs/benchmarks.md: "Sizing the quick grid")
        args.max_len = min(args.max_len, 64)
        args.max_len_pair = args.max_len_pair or 96
        args.low_epochs = args.low_epochs or 4
        args.low_lr = args.low_lr or 1e-4
        if args.jobs is None:
            args.jobs = 2 if (os.cpu_count() or 1) >= 2 else 1
        args.eval_cap = args.eval_cap or 500
        tasks = args.tasks or "CoLA,MRPC,RTE,STS-B"
        settings = args.settings or "low"
        methods = args.methods or "standard,guided,random_order"
        seeds = args.seeds or "0-4"
        default_out = C.RESULTS_DIR / "glue-quick.jsonl"
    else:
        tasks = args.tasks or "CoLA,MRPC,RTE,STS-B"
        settings = args.settings or "full,half,low"
        methods = args.methods or ",".join(METHODS)
        seeds = args.seeds or ""
        default_out = C.RESULTS_DIR / "glue.jsonl"
    args.max_len_pair = args.max_len_pair or 128
    args.low_epochs = args.low_epochs or 10
    args.low_lr = args.low_lr or 5e-5
    args.jobs = args.jobs or 1
    out_path = Path(args.out) if args.out else default_out
    args.out = str(out_path)
    task_list = [TASKS[t] for t in tasks.split(",")]
    all_settings = make_settings(args)
    setting_list = [all_settings[s] for s in settings.split(",")]
    method_list = [METHODS[m] for m in methods.split(",")]
    C.set_threads(args.threads)

    protocol = (
        f"bs{args.batch_size}-len{args.max_len}/{args.max_len_pair}-eval{args.eval_cap or 'all'}"
    )
    plan = []
    for setting in setting_list:
        seed_list = parse_seeds(seeds) if seeds else list(range(10 if setting.name == "low" else 5))
        # seed-major order: every task and method of a seed runs before the next seed, so a
        # grid cut short still holds complete pairs on every task
        for seed in seed_list:
            for task in task_list:
                for method in method_list:
                    key = {
                        "task": task.name,
                        "setting": setting.name,
                        "method": method.name,
                        "seed": seed,
                        "model": args.model,
                        "epochs": setting.epochs,
                        "lr": setting.lr,
                        "train_size": setting.train_size,
                        "protocol": protocol,
                    }
                    plan.append((key, task, setting, method, seed))
    results = C.Results(out_path)
    todo = [p for p in plan if not results.done(p[0])]
    C.log(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {out_path}")
    import torch
    import transformers

    cuda = torch.cuda.is_available()  # what bench/gpu_grid.sh's log shows per phase
    C.log(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {cuda}")
    est = sum(estimate_seconds(t, s, len_examples(t.name)) for _, t, s, _, _ in todo)
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        # this worker's own share first, then (with claims) whatever the others have not started
        own = todo[index::count]
        todo = own + ([p for p in todo if p not in own] if args.claims else [])
    elif args.jobs > 1:
        est /= min(args.jobs, max(1, len(todo)))
    C.log(f"rough estimate for the runs left: {est / 3600:.1f} h (quiet 2-core machine)")
    if args.dry_run:
        for key, *_ in todo:
            print(C.cell_key(key))
        return 0
    if not todo:
        return 0

    needs_profile = any(m.mapping is not None for _, _, _, m, _ in todo)
    profile = None
    if needs_profile:
        if args.profile:
            prof_path = Path(args.profile)
        elif args.smoke:
            prof_path = out_path.parent / "smoke.profile.npz"
        else:
            prof_path = (
                C.RESULTS_DIR
                / f"{args.model}-wikitext2-contrastive-{args.profile_samples}x{args.profile_len}.profile.npz"
            )
        profile = ensure_profile(prof_path, args.model, args.profile_samples, args.profile_len)
        args.profile = str(prof_path)  # workers read the profile made here, never race for it
    if args.jobs > 1 and not args.shard:
        return run_jobs(args, argv, min(args.jobs, len(todo)))
    tok = C.tokenizer()
    machine = {**C.machine_info(), **C.device_info(args.device)}
    data: dict[str, list[Example]] = {}
    start = time.perf_counter()
    done_here = 0
    for i, (key, task, setting, method, seed) in enumerate(todo):
        if args.deadline is not None and time.time() - args.started > args.deadline:
            C.log(f"deadline of {args.deadline:.0f} s reached: no new runs; rerun to resume")
            break
        if not claim(args.claims, key):
            continue
        done_here += 1
        if task.name not in data:
            data[task.name], bad = read_task(task.name)
            if bad:
                C.log(f"{task.name}: skipped {bad} malformed rows")
        with C.Timer() as t:
            fields = run_one(args, task, setting, method, seed, data[task.name], tok, profile)
        fields["bench"] = "glue"
        fields["run_s"] = round(t.seconds, 2)
        fields["machine"] = {**machine, "loadavg_1m": C.machine_info()["loadavg_1m"]}
        if profile is not None:
            fields["profile"] = {
                "samples": profile.metadata.get("samples"),
                "seq_len": profile.metadata.get("seq_len"),
            }
        results.append(key, fields)
        elapsed = time.perf_counter() - start
        eta = elapsed / done_here * (len(todo) - i - 1)
        m = fields["metrics"]
        C.log(
            (f"worker {args.shard}: " if args.shard else "")
            + f"[{i + 1}/{len(todo)}] {task.name} {setting.name} {method.name} seed {seed}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
            + f"{'' if fields['learned'] else ' (NOT LEARNED)'}; {t.seconds:.0f} s; "
            f"eta {eta / 60:.0f} min"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
