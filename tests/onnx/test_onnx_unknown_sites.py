"""Issue 14.3 (ONNX): an unknown site in a `{site: p}` dict raises, as in torch and Keras."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")

import adapters.onnx as ao  # noqa: E402


def _example():
    try:
        from adapters.onnx.graph import example_model  # the adapters package layout
    except ImportError:
        from adapters._onnx_graph import example_model
    return example_model()


def test_unknown_site_in_a_dict_raises():
    with pytest.raises(Exception, match="nosuch") as info:
        ao.apply(_example(), {"dropout": 0.2, "nosuch": 0.3})
    assert "dropout" in str(info.value)  # the fix names the real sites


def test_known_sites_still_apply():
    out = ao.apply(_example(), {"dropout": 0.2})
    report = out[1] if isinstance(out, tuple) else out
    assert report.probabilities()["dropout"] == pytest.approx(0.2)


def test_a_unit_rewritten_graph_is_never_re_planned():
    """Issue 14.2 (ONNX): a second apply cannot collapse per-unit rates: it is refused, with the
    fix (apply to the original export), so "keep" never silently rewrites another site."""
    unit = ao.apply(_example(), {"dropout": 0.1}, granularity="unit").model
    with pytest.raises(Exception, match="original export"):
        ao.apply(unit, {"head_drop": 0.2}, missing="keep")
