"""The README's "Does it help?" figures are the committed results' own numbers: each paired
difference it states for the CPU equal-budget cell is recomputed here from
``bench/results/glue-cpu-stsb-half.jsonl`` with the report's statistics (a re-run that changes
the file, or an edit that changes the text, fails until the two agree again)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "glue-cpu-stsb-half.jsonl"


def signed(v: float) -> str:
    return f"{v:+.3f}".replace("-", "\N{MINUS SIGN}")


@pytest.mark.parametrize(
    "a, b",
    [
        ("guided", "standard"),
        ("guided", "uniform_mean"),
        ("guided", "random_order"),
        ("guided", "none"),
        ("guided_rescaled", "standard"),
    ],
)
def test_readme_states_the_cpu_cells_paired_differences(bench_path, a, b):
    report = importlib.import_module("report")
    recs = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines()]
    by = {(r["method"], r["seed"]): r["metrics"]["pearson"] for r in recs}
    seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
    assert seeds == [0, 1, 2, 3, 4], f"{a} and {b} pair on seeds {seeds}, not the five"
    mean, lo, hi = report.paired_ci([by[(a, s)] - by[(b, s)] for s in seeds])
    claim = f"{signed(mean)} [{signed(lo)}, {signed(hi)}]"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert claim in " ".join(readme.split()), f"README.md does not state {a} - {b} = {claim}"
    assert claim in benchmarks, f"docs/benchmarks.md does not state {a} - {b} = {claim}"
