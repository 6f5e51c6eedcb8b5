"""Guided dropout's cost on a GPU, in one run of a few minutes (issue 27): run by bench/gpu_perf.sh.

Three sections, each appended to ``OUT/gpu-perf.jsonl`` as soon as it is measured (one JSON line
per cell, with the device named):

1. ``overhead``: the guided/standard step-time ratio. Two ``BertForSequenceClassification``
   copies of MiniLM (batch 32, length 128; standard dropout at the profile's mean rate, and
   ``adapters.torch.apply(profile, granularity=site|unit)``), a full AdamW training step each, in
   ``float32`` and under ``torch.autocast(bfloat16)``; ``--pairs`` A/B pairs in random order after
   a warm-up, synchronised, paired ratios (median, quartiles). Targets: 1.02 (site), 1.05 (unit).
2. ``profile``: the public ``adapters.torch.profile()`` (the norms path, contrastive loss, dropout
   off) per sample against a training step (forward + backward) and the floor (forward + a
   backward to the input embeddings only) on the same samples, interleaved ``--repeats`` times.
3. ``apply``: wall time of the one-line ``adapters.torch.apply(model)`` on a model on the device,
   with an empty profile cache (the automatic profile is computed).

``--smoke``: the tiny random BERT on the CPU, seconds (the test suite runs it). The sections share
one deadline (``--deadline`` seconds from the start): a section that would start after it is
recorded as skipped, never dropped silently.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

TARGET = {"site": 1.02, "unit": 1.05}
CARRY_PROFILE = C.ROOT / "bench" / "carry" / "minilm-wikitext2-contrastive-512x128.profile.npz"


def _tmpdir(prefix: str) -> str:
    """A temporary folder removed when the script exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _ratios(ta: list[float], tb: list[float]) -> dict[str, Any]:
    r = np.asarray(tb) / np.asarray(ta)
    q25, med, q75 = (float(v) for v in np.percentile(r, [25, 50, 75]))
    return {
        "pairs": len(r),
        "ratio_median": round(med, 4),
        "ratio_q25": round(q25, 4),
        "ratio_q75": round(q75, 4),
        "standard_ms": round(1e3 * float(np.median(ta)), 3),
        "guided_ms": round(1e3 * float(np.median(tb)), 3),
    }


def get_profile(args: argparse.Namespace) -> Any:
    """The carried MiniLM profile (bench/gpu_carry.py), else one computed here (smoke: tiny)."""
    import glue

    from gd_core import SensitivityProfile

    if not args.smoke and CARRY_PROFILE.exists():
        return SensitivityProfile.load(CARRY_PROFILE)
    folder = Path(_tmpdir("gd-gpu-perf-"))
    samples, length = (8, 16) if args.smoke else (512, 128)
    return glue.ensure_profile(folder / "p.profile.npz", args.model, samples, length)


def section_overhead(args: argparse.Namespace, profile: Any) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    import adapters.torch as gdt

    pbar = float(np.mean(list(profile.probabilities().values())))
    tok = C.tokenizer()
    enc = tok(
        C.corpus_paragraphs()[: args.batch_size],
        truncation=True,
        max_length=args.seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    batch = {k: v.to(args.device) for k, v in enc.items() if k != "token_type_ids"}
    labels = torch.randint(0, 2, (args.batch_size,), generator=torch.Generator().manual_seed(0))
    labels = labels.to(args.device)
    out = []
    for gran in ("site", "unit"):
        models = []
        for guided in (False, True):
            m = C.load_model(
                args.model,
                "BertForSequenceClassification",
                num_labels=2,
                hidden_dropout_prob=pbar,
                attention_probs_dropout_prob=pbar,
                classifier_dropout=0.1,
            ).to(args.device)
            if guided:
                gdt.apply(m, profile, granularity=gran, missing="keep")
            models.append(m.train())
        for dtype in ("float32", "bfloat16"):
            if dtype == "bfloat16" and args.device == "cpu" and not args.smoke:
                continue

            def make(model: Any, dtype: str = dtype) -> Callable[[], None]:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

                def step() -> None:
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(
                        args.device.split(":")[0],
                        dtype=torch.bfloat16,
                        enabled=dtype == "bfloat16",
                    ):
                        logits = model(**batch).logits
                    F.cross_entropy(logits.float(), labels).backward()
                    opt.step()

                return step

            a, b = make(models[0]), make(models[1])
            for _ in range(args.warmup):
                a()
                b()
            rng = np.random.default_rng(0)
            ta: list[float] = []
            tb: list[float] = []
            for _ in range(args.pairs):
                first_b = rng.random() < 0.5
                for which in ((b, tb), (a, ta)) if first_b else ((a, ta), (b, tb)):
                    which[1].append(_timed(which[0], args.device))
            rec = {"section": "overhead", "granularity": gran, "dtype": dtype, "mean_p": pbar}
            rec.update(_ratios(ta, tb), target=TARGET[gran])
            rec["meets_target"] = rec["ratio_median"] <= TARGET[gran]
            out.append(rec)
            C.log(f"overhead {gran} {dtype}: guided/standard {rec['ratio_median']:.4f}")
        del models
    return out


def section_profile(args: argparse.Namespace) -> list[dict[str, Any]]:
    import fisher

    import adapters.torch as gdt

    spec = {
        "model": args.model,
        "threads": 0,
        "device": args.device,
        "n_samples": args.samples,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
    }
    model, loss, batches, names = fisher._setup(spec)

    def prof() -> None:
        gdt.profile(model, batches, loss, progress=False, max_samples=args.samples)

    def step() -> None:
        fisher.run_train_step(model, loss, batches, names, spec)

    def floor() -> None:
        fisher.run_floor(model, loss, batches, names, spec)

    first = _timed(prof, args.device)  # its first call (cuDNN/cuBLAS set-up included)
    step()
    floor()
    rows = []
    for _ in range(args.repeats):
        rows.append([_timed(f, args.device) for f in (prof, step, floor)])
    t = np.median(np.asarray(rows), axis=0)
    n = args.samples
    rec = {
        "section": "profile",
        "n_samples": n,
        "first_call_s": round(first, 3),
        "profile_ms_per_sample": round(1e3 * t[0] / n, 3),
        "train_step_ms_per_sample": round(1e3 * t[1] / n, 3),
        "floor_ms_per_sample": round(1e3 * t[2] / n, 3),
        "profile_over_step": round(float(np.median([r[0] / r[1] for r in rows])), 3),
        "profile_over_floor": round(float(np.median([r[0] / r[2] for r in rows])), 3),
        "repeats": args.repeats,
    }
    C.log(f"profile: {rec['profile_over_step']:.2f}x a training step per sample")
    return [rec]


def section_apply(args: argparse.Namespace) -> list[dict[str, Any]]:
    import transformers

    import adapters.torch as gdt

    os.environ["GD_CACHE_DIR"] = _tmpdir("gd-gpu-perf-cache-")  # empty cache
    source = C.minilm_path() if not args.smoke else None
    if source is None:  # the tiny random model, saved with a tokenizer as a checkpoint would be
        source = _tmpdir("gd-gpu-perf-model-")
        C.load_model(args.model, "BertModel").save_pretrained(source)
        C.tokenizer().save_pretrained(source)
    model = transformers.AutoModel.from_pretrained(source).to(args.device)
    options: dict[str, Any] = {"progress": False}
    if args.smoke:
        options["samples"] = 8
    start = time.perf_counter()
    report = gdt.apply(model, auto_profile=options)
    _sync(args.device)
    wall = time.perf_counter() - start
    rec = {"section": "apply", "wall_s": round(wall, 2), "sites": len(report.rows)}
    rec["note"] = report.notes[0] if report.notes else ""
    C.log(f"apply(model), empty cache: {wall:.1f} s")
    return [rec]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT on the CPU, seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(C.RESULTS_DIR), help="folder of gpu-perf.jsonl")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=256, help="profile section: samples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--deadline", type=float, default=270.0, help="seconds for all sections")
    args = ap.parse_args(argv)
    args.model = "minilm"
    if args.smoke:
        args.device, args.model = "cpu", "smoke"
        args.pairs, args.warmup, args.repeats, args.samples = 3, 1, 1, 8
        args.batch_size, args.seq_len = 4, 16
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        C.log("gpu_perf: --device cuda but torch sees no GPU (use --smoke on a CPU)")
        return 2
    started = time.perf_counter()
    results = C.Results(Path(args.out) / "gpu-perf.jsonl")
    stamp = {
        "machine": C.machine_info(),
        "device_info": C.device_info(args.device),
        "bench": "gpu_perf",
        "commit": os.environ.get("GD_COMMIT") or C.git_commit(),
    }
    run_id = time.strftime("%Y%m%dT%H%M%S")
    base = {"run": run_id, "device": args.device, "model": args.model, "smoke": args.smoke}
    base.update(batch_size=args.batch_size, seq_len=args.seq_len)
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("overhead", lambda: section_overhead(args, get_profile(args))),
        ("profile", lambda: section_profile(args)),
        ("apply", lambda: section_apply(args)),
    ]
    for name, fn in sections:
        if time.perf_counter() - started > args.deadline:
            results.append({**base, "section": name}, {"status": "skipped (deadline)", **stamp})
            C.log(f"{name}: skipped, past the {args.deadline:.0f} s deadline")
            continue
        try:
            recs = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the next section still runs
            results.append({**base, "section": name}, {"status": "error", "error": repr(exc)[:800]})
            C.log(f"{name}: error {exc!r:.300}")
            continue
        for i, rec in enumerate(recs):
            key = {**base, "section": name, "cell": i}
            results.append(key, {"status": "ok", **rec, **stamp})
    C.log(f"gpu_perf: done in {time.perf_counter() - started:.0f} s -> {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
