"""bench/gpu_perf.sh (the one-command GPU performance recipe, issue 27) runs on the CPU with
``--smoke`` and records every section."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_perf_smoke_records_every_section(
    tmp_path, shared_data, warm_python
):  # the smoke runs read the corpus
    # the recipe's interpreters forked warm (tests/_warm.py)
    env = {**os.environ, "PYTHON": warm_python, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "bench/gpu_perf.sh", "--smoke", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "gpu-perf.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    cells = sorted((r["granularity"], r["dtype"]) for r in recs if r["section"] == "overhead")
    assert cells == [
        ("site", "bfloat16"),
        ("site", "float32"),
        ("unit", "bfloat16"),
        ("unit", "float32"),
    ]
    for r in recs:
        assert r["device"] == "cpu" and r["smoke"] is True and r["device_info"]
        if r["section"] == "overhead":
            assert r["pairs"] == 3 and r["ratio_median"] > 0 and r["target"] in (1.02, 1.05)
    (prof,) = [r for r in recs if r["section"] == "profile"]
    assert prof["profile_over_step"] > 0 and prof["floor_ms_per_sample"] > 0
    (app,) = [r for r in recs if r["section"] == "apply"]
    assert app["wall_s"] > 0 and app["sites"] > 0


def test_fisher_smoke_public_cells(fisher_smoke):  # one fisher.py run for every smoke cell
    """bench/fisher.py's public-call cells (issue 27): the first call, then paired ratios."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("onnxruntime.training")
    _, cells = fisher_smoke(["keras_public", "ort_public"])
    recs = {r["method"]: r for r in cells}
    assert sorted(recs) == ["keras_public", "ort_public"]
    for r in recs.values():
        assert r["status"] == "ok" and r["first_call_s"] > 0 and r["fallback"] == 0, r
        assert len(r["pairs"]) == 2 and r["median_ratio"] > 0
        assert all(p["loadavg_1m"] >= 0 for p in r["pairs"])
