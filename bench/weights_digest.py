"""What the automatic-profile cache key costs: hashing MiniLM's weights against the profile itself.

``apply(model)`` with no profile hashes the model's weights (:mod:`gd_core.weights`: every
tensor's name, shape, dtype and a strided sample of at most 65,536 of its values) to find a
cached profile computed on the same checkpoint. The issue's target: under 5% of the automatic
profile's time. This script times ``weights_id`` (the median of ``--repeats`` calls) and then
one automatic profile (``apply`` on an empty cache, the default settings) in the same process,
on the same machine, and appends one JSON line to the results file.

Usage::

    python bench/weights_digest.py --threads 2 --repeats 5
    python bench/weights_digest.py --smoke      # 4 samples: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def measure(
    threads: int, repeats: int, samples: int | None, digest_only: bool = False
) -> dict[str, Any]:
    import os

    os.environ["GD_CACHE_DIR"] = tempfile.mkdtemp(prefix="gd-bench-digest-")
    C.set_threads(threads)
    import transformers

    import adapters.torch as gdt
    from adapters.torch.auto import weights_id

    model = transformers.AutoModel.from_pretrained(C.minilm_path())
    labels = [n for n, _ in model.named_parameters()]  # as apply passes them: resolved by name
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        weights_id(model, labels)
        times.append(time.perf_counter() - start)
    digest_s = statistics.median(times)
    row: dict[str, Any] = {
        "threads": threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(labels),
        "digest_s": [round(t, 4) for t in times],
        "digest_median_s": round(digest_s, 4),
    }
    if digest_only:
        return row
    options: dict[str, Any] = {"progress": False}
    if samples:
        options["samples"] = samples
    start = time.perf_counter()
    gdt.apply(model, auto_profile=options)
    profile_s = time.perf_counter() - start
    row.update(
        profile_s=round(profile_s, 2),
        samples=samples or "default",
        fraction=round(digest_s / profile_s, 5),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=None, help="default: the library's default")
    ap.add_argument("--out", default=str(C.RESULTS_DIR / "weights_digest.jsonl"))
    ap.add_argument("--smoke", action="store_true", help="4 samples, 1 repeat")
    ap.add_argument("--digest-only", action="store_true", help="time the hashing only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.samples = 1, 4
    row = measure(args.threads, args.repeats, args.samples, args.digest_only)
    print(json.dumps(row))
    if not args.smoke:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
