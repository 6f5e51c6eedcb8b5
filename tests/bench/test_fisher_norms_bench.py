"""bench/fisher.py's norms-path methods (issue 17) run and agree with the reference on the smoke
model; not a timed test."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_fisher_bench_norms_methods_smoke(
    tmp_path, shared_data, bench_main
):  # the smoke runs read the corpus
    out = tmp_path / "fisher.jsonl"
    methods = "gd_norms,gd_norms_gram,gd_norms_blocks,floor,opacus_ghost"
    args = ["--smoke", "--methods", methods, "--out", str(out), "--ref-dir", str(tmp_path / "refs")]
    rc, _, err = bench_main("fisher", *args)  # --smoke: the cells in this process
    assert rc == 0, err[-2000:]
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(methods.split(","))
    for m in ("gd_norms", "gd_norms_gram", "gd_norms_blocks"):
        assert rows[m]["status"] == "ok", rows[m]
        agree = rows[m]["agreement"]
        assert agree["agree"] and agree["max_rel_err_above_atol"] < 1e-4, agree
    assert rows["floor"]["status"] == "ok" and "agreement" not in rows["floor"]
    ghost = rows["opacus_ghost"]
    assert ghost["status"] in ("ok", "unavailable"), ghost
    if ghost["status"] == "ok":
        assert ghost["agreement"]["agree"], ghost["agreement"]
