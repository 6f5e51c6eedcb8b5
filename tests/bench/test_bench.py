"""The benchmark scripts are not timed tests, but their bookkeeping must be right: results append
and resume, parallel workers share one file without losing or doubling a run, pairs are paired,
and the report's statistics and flags say what they claim."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("name", ["_common", "glue", "report", "auto_profile"])
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


def test_glue_smoke_grid_parallel_workers_append_and_resume(
    tmp_path, shared_data, bench_main
):  # the smoke runs read the corpus
    out = tmp_path / "glue.jsonl"
    args = ["--smoke", "--tasks", "MRPC,STS-B", "--out", str(out)]
    rc, _, err = bench_main("glue", *args, "--jobs", "2", "--methods", "standard,guided")
    assert rc == 0, err[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["task"], r["method"], r["seed"]) for r in recs]
    assert sorted(keys) == sorted(
        (t, m, 0) for t in ("MRPC", "STS-B") for m in ("standard", "guided")
    )
    assert "worker 0/2" in err and "worker 1/2" in err  # two worker processes ran
    guided = [r for r in recs if r["method"] == "guided"]
    assert all(r["dropout"]["sites_set"] > 0 for r in guided)
    assert all(r["dropout"]["min_p"] == 0.0 and r["dropout"]["max_p"] == 0.1 for r in guided)

    # a rerun with one more method runs only the missing runs, and nothing twice
    rc, _, err = bench_main("glue", *args, "--methods", "standard,guided,random_order")
    assert rc == 0, err[-3000:]
    assert "6 runs planned, 4 already in" in err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6
    assert {r["method"] for r in recs} == {"standard", "guided", "random_order"}

    # the smoke model does not learn: the report must flag the cells, never call them ties
    rc, stdout, err = bench_main("report", str(out), "--only", "glue")
    assert rc == 0, err[-3000:]
    assert "FLAG: baseline not learned" in stdout
    assert "| tie |" not in stdout


def test_gpu_grid_script_runs_every_phase_once_on_cpu(
    tmp_path, shared_data, warm_python
):  # the smoke runs read the corpus
    """bench/gpu_grid.sh (the one-command GPU recipe) on the CPU with the smoke model: every
    phase runs, appending to and resuming the shared files (each run exactly once), and
    guided_unit installs per-unit rates with guided's site probabilities.

    One worker per phase (GD_JOBS=1): the recipe's bookkeeping is what this test checks; two
    worker processes sharing runs through claims (the code path of the recipe's ``--jobs``) are
    checked by test_glue_smoke_grid_parallel_workers_append_and_resume, and two workers per
    phase would double the interpreters started here (74 -> 38 CPU s for the script)."""
    env = {
        **os.environ,
        "GD_DEVICE": "cpu",
        "GD_SMOKE": "1",
        "GD_JOBS": "1",
        "PYTHON": warm_python,  # each phase's interpreter forked warm (tests/_warm.py)
    }
    done = subprocess.run(
        ["bash", "bench/gpu_grid.sh", str(tmp_path)],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    # every phase logs the versions and whether CUDA is there (the recipe's first check there)
    assert (done.stdout + done.stderr).count(", cuda False") == 4, done.stderr[-3000:]
    grid = [json.loads(line) for line in (tmp_path / "glue-gpu.jsonl").read_text().splitlines()]
    keys = sorted((r["task"], r["setting"], r["method"]) for r in grid)
    expected = sorted(
        [
            (t, s, m)
            for t in ("STS-B", "MRPC")
            for s in ("full", "half")
            for m in ("standard", "guided_unit")
        ]
        + [
            (t, s, m)
            for t in ("CoLA", "RTE")
            for s in ("full", "half")
            for m in ("standard", "guided_unit")
        ]
    )
    assert keys == expected  # every run once: none lost, none run twice across the phases
    quick = [
        json.loads(line) for line in (tmp_path / "glue-gpu-quick.jsonl").read_text().splitlines()
    ]
    assert sorted((r["task"], r["method"]) for r in quick) == sorted(
        (t, m) for t in ("STS-B", "MRPC") for m in ("standard", "guided", "guided_unit")
    )
    for task in ("STS-B", "MRPC"):
        by = {r["method"]: r["dropout"] for r in quick if r["task"] == task}
        assert by["guided_unit"]["unit_sites"] > 0
        assert by["guided_unit"]["mean_p"] == by["guided"]["mean_p"]  # same site means
        assert by["guided_unit"]["sites_set"] == by["guided"]["sites_set"]
    assert all(r["machine"]["device"] == "cpu" for r in grid + quick)


def test_glue_deadline_stops_new_runs_and_a_rerun_resumes(
    tmp_path, shared_data, bench_main
):  # the smoke runs read the corpus
    out = tmp_path / "glue.jsonl"
    args = ["--smoke", "--tasks", "STS-B", "--methods", "standard,guided", "--out", str(out)]
    rc, _, err = bench_main("glue", *args, "--deadline", "0.01")
    assert rc == 0, err[-3000:]
    assert "deadline of 0 s reached: no new runs" in err
    assert not out.exists() or out.read_text() == ""
    rc, _, err = bench_main("glue", *args)
    assert rc == 0, err[-3000:]
    assert len(out.read_text().splitlines()) == 2
    rc, _, err = bench_main("glue", *args, "--deadline", "-5")
    assert rc == 2 and "--deadline must be positive" in err


def test_fisher_smoke_keras_cells(fisher_smoke):  # one fisher.py run for every smoke cell
    pytest.importorskip("tensorflow")
    _, recs = fisher_smoke(["keras_gd", "keras_train_step"])
    assert sorted(r["method"] for r in recs) == ["keras_gd", "keras_train_step"]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in recs), recs


def test_fisher_smoke_ort_cells(fisher_smoke):  # one fisher.py run for every smoke cell
    pytest.importorskip("onnxruntime.training")
    pytest.importorskip("transformers")
    _, cells = fisher_smoke(["ort_gd", "ort_loop", "ort_train_step"])
    recs = {r["method"]: r for r in cells}
    assert sorted(recs) == ["ort_gd", "ort_loop", "ort_train_step"]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in recs.values()), recs
    assert recs["ort_gd"]["fallback"] == 0 and recs["ort_loop"]["n_params"] > 0


def test_auto_profile_smoke_cell_records_and_resumes(
    tmp_path, shared_data, bench_main
):  # the smoke runs read the corpus
    pytest.importorskip("transformers")
    out = tmp_path / "auto.jsonl"
    rc, _, err = bench_main("auto_profile", "--smoke", "--out", str(out))  # a worker process
    assert rc == 0, err[-3000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["status"] == "ok" and rec["wall_s"] > 0 and rec["sites"] > 0, rec
    assert "4 paragraphs of python-docs" in rec["note"], rec["note"]
    rc, _, err = bench_main("auto_profile", "--smoke", "--out", str(out))  # the cell is done
    assert rc == 0 and len(out.read_text().splitlines()) == 1, err[-3000:]
