"""The benchmark scripts are not timed tests, but their bookkeeping must be right: results append
and resume, parallel workers share one file without losing or doubling a run, pairs are paired,
and the report's statistics and flags say what they claim."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, str(BENCH))
    try:
        yield BENCH
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", ["_common", "glue", "report"])
def test_docstring_examples(bench_path, name):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, verbose=False)
    assert attempted > 0, f"{name} has no examples"
    assert failed == 0


def test_median_ci_covers_and_narrows(bench_path):
    report = importlib.import_module("report")
    rng = np.random.default_rng(0)
    covered = 0
    trials = 400
    for _ in range(trials):
        lo, hi = report.median_ci(rng.normal(1.0, 0.05, size=30))
        covered += lo <= 1.0 <= hi
    # the order-statistic interval has >= 95% coverage (95.7% at n = 30)
    assert covered / trials >= 0.92
    wide = np.subtract(*reversed(report.median_ci(rng.normal(1.0, 0.05, size=15))))
    narrow = np.subtract(*reversed(report.median_ci(rng.normal(1.0, 0.05, size=300))))
    assert narrow < wide


def test_paired_ci_detects_a_consistent_difference(bench_path):
    report = importlib.import_module("report")
    mean, lo, hi = report.paired_ci([0.02, 0.03, 0.025, 0.028, 0.022])
    assert lo > 0 and hi > mean > lo
    mean, lo, hi = report.paired_ci([0.02, -0.03, 0.01, -0.01, 0.0])
    assert lo < 0 < hi


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=BENCH.parent, capture_output=True, text=True, timeout=600
    )


def test_glue_smoke_grid_parallel_workers_append_and_resume(tmp_path):
    out = tmp_path / "glue.jsonl"
    args = ["bench/glue.py", "--smoke", "--tasks", "MRPC,STS-B", "--out", str(out)]
    done = _run(*args, "--jobs", "2", "--methods", "standard,guided")
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["task"], r["method"], r["seed"]) for r in recs]
    assert sorted(keys) == sorted(
        (t, m, 0) for t in ("MRPC", "STS-B") for m in ("standard", "guided")
    )
    assert "worker 0/2" in done.stderr and "worker 1/2" in done.stderr
    guided = [r for r in recs if r["method"] == "guided"]
    assert all(r["dropout"]["sites_set"] > 0 for r in guided)
    assert all(r["dropout"]["min_p"] == 0.0 and r["dropout"]["max_p"] == 0.1 for r in guided)

    # a rerun with one more method runs only the missing runs, and nothing twice
    again = _run(*args, "--methods", "standard,guided,random_order")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 runs planned, 4 already in" in again.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6
    assert {r["method"] for r in recs} == {"standard", "guided", "random_order"}

    # the smoke model does not learn: the report must flag the cells, never call them ties
    rep = _run("bench/report.py", str(out), "--only", "glue")
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "FLAG: baseline not learned" in rep.stdout
    assert "| tie |" not in rep.stdout
