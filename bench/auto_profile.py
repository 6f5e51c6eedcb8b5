"""Wall time and peak memory of the one-line ``adapters.torch.apply(model)`` on MiniLM.

With no profile given and none cached, ``apply`` computes one (:mod:`gd_core.auto`): the
contrastive objective on the encoder, over the default number of paragraphs of Python's own
documentation. The issue's target: under a minute on two CPU cores. Each cell runs in a fresh
interpreter with an empty profile cache, so nothing is reused between cells; one JSON line per
cell is appended to the results file.

Usage::

    python bench/auto_profile.py --threads 1 2 --repeats 3
    python bench/auto_profile.py --smoke        # 4 samples, one cell: checks the script runs

Example:
    >>> cells(threads=[1, 2], repeats=2, samples=None)[:2]
    [{'threads': 1, 'repeat': 0, 'samples': None}, {'threads': 1, 'repeat': 1, 'samples': None}]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def cells(threads: list[int], repeats: int, samples: int | None) -> list[dict[str, Any]]:
    """The (threads, repeat) grid, threads outermost."""
    return [
        {"threads": t, "repeat": r, "samples": samples} for t in threads for r in range(repeats)
    ]


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed ``apply(model)`` in this process (the worker side)."""
    os.environ["GD_CACHE_DIR"] = tempfile.mkdtemp(prefix="gd-bench-auto-")
    C.set_threads(spec["threads"])
    import transformers

    import adapters.torch as gdt

    model = transformers.AutoModel.from_pretrained(C.minilm_path())
    options: dict[str, Any] = {"progress": False}
    if spec.get("samples"):
        options["samples"] = int(spec["samples"])
    C.reset_peak_rss()
    start = time.perf_counter()
    cpu0 = time.process_time()
    report = gdt.apply(model, auto_profile=options)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "status": "ok",
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(C.proc_status().get("VmHWM", 0) / 1024, 1),
        "sites": len(report.rows),
        "note": report.notes[0] if report.notes else "",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=None, help="default: the library's default")
    ap.add_argument("--out", default=str(C.RESULTS_DIR / "auto_profile.jsonl"))
    ap.add_argument("--smoke", action="store_true", help="4 samples, 1 thread, 1 repeat")
    C.add_worker_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return C.answer_worker(args.worker, run_cell)
    if args.smoke:
        args.threads, args.repeats, args.samples = [1], 1, 4
    results = C.Results(args.out)
    machine = C.machine_info()
    for spec in cells(args.threads, args.repeats, args.samples):
        key = {"bench": "auto_profile", "commit": C.git_commit(), **spec}
        if results.done(key):
            continue
        if args.in_process:
            got = run_cell(spec)
        else:
            got = C.spawn_worker(__file__, spec, args.timeout)
        rec = results.append(key, {**got, "machine": machine})
        C.log(f"threads {spec['threads']} repeat {spec['repeat']}: {rec}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
