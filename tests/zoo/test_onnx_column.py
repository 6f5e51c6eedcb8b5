"""The ONNX column's own instrument (tests/zoo/onnx_column.py): it can fail, it says why, and its
time cap holds. The column itself runs in the full sweep (``make zoo``, docs/zoo.md)."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX column needs the onnx extra")

from gd_core.profile import SensitivityProfile  # noqa: E402
from gd_core.sites import Site  # noqa: E402
from tests.zoo import onnx_column  # noqa: E402


def _placed(rates: dict[str, float]):  # type: ignore[no-untyped-def]
    import adapters.onnx as gdo
    from adapters.onnx.graph import example_model

    graph = example_model()
    return graph, gdo.apply(graph, rates)


def test_compare_passes_when_every_site_carries_torchs_p() -> None:
    graph, placed = _placed({"dropout": 0.05, "head_drop": 0.2})
    verdict = onnx_column.compare({"dropout": 0.05, "head_drop": 0.2}, graph, placed)
    assert verdict.status == "pass", verdict


def test_compare_fails_on_other_p_absent_and_onnx_only_sites() -> None:
    graph, placed = _placed({"dropout": 0.05, "head_drop": 0.2})
    verdict = onnx_column.compare({"dropout": 0.07, "pooler.dropout": 0.1}, graph, placed)
    assert verdict.status == "fail"
    assert "other p: dropout" in verdict.reason
    assert "absent in ONNX: pooler.dropout" in verdict.reason
    assert "ONNX-only sites: head_drop" in verdict.reason


def test_compare_fails_when_other_nodes_changed() -> None:
    from onnx import helper

    graph, placed = _placed({"dropout": 0.05, "head_drop": 0.2})
    placed.model.graph.node.append(helper.make_node("Relu", ["x"], ["extra"], name="/extra"))
    verdict = onnx_column.compare({"dropout": 0.05, "head_drop": 0.2}, graph, placed)
    assert verdict.status == "fail" and "other nodes changed" in verdict.reason, verdict


def test_distinct_profile_gives_each_site_its_rate() -> None:
    sites = tuple(Site(f"s{i}", (f"w{i}",)) for i in range(4))
    prof = SensitivityProfile(sites=sites, scores=np.array([1.0, 2.0, 3.0, 4.0]))
    rates = {"s0": 0.0213, "s1": 0.0244, "s2": 0.0275, "s3": 0.0306}
    got = onnx_column.distinct_profile(prof, rates).probabilities()
    assert got == pytest.approx(rates, abs=1e-9)


def test_time_cap_interrupts_and_keeps_the_outer_alarm() -> None:
    def outer(signum, frame):  # type: ignore[no-untyped-def]
        raise AssertionError("the outer alarm fired early")

    previous = signal.signal(signal.SIGALRM, outer)
    signal.alarm(30)
    try:
        start = time.monotonic()
        with pytest.raises(onnx_column._OverCap), onnx_column._cap(0.2):
            time.sleep(5)
        assert time.monotonic() - start < 2
        assert 25 <= signal.alarm(0) <= 30  # the outer limit is back, less the time spent
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_tally_counts_not_exportable_and_time_cap_apart() -> None:
    rows = [
        {"verdicts": {"e-train": ["pass", ""], "e-eval": ["fail", "x"]}},
        {"verdicts": {"e-train": ["skip", "not exportable: E"], "e-eval": ["skip", "time cap: t"]}},
    ]
    t = onnx_column.tally(rows)
    assert t["e-train"] == {"pass": 1, "not exportable": 1}
    assert t["e-eval"] == {"fail": 1, "time cap": 1}
    lines = "\n".join(onnx_column.summary_lines(rows))
    assert "| e-train |" in lines and "100.0%" in lines and "0.0%" in lines
