"""Issue 25: ONNX Runtime's info lines ([I:onnxruntime...]) are off while artifacts are built,
unless asked for with $GD_ORT_LOG_SEVERITY."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")
from test_onnx_units import tiny, tiny_profile  # noqa: E402

import adapters.onnx as ao  # noqa: E402
from gd_core.errors import ArgumentError  # noqa: E402


def build(tmp_path, name):
    out = ao.apply(tiny(), tiny_profile(p=0.3), granularity="unit", seed=1).model
    art = ao.make_artifacts(out, tmp_path / name, loss="mse")
    art.open()


def test_no_info_lines_unless_asked(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("GD_ORT_LOG_SEVERITY", raising=False)
    build(tmp_path, "quiet")
    err = capfd.readouterr().err
    assert "[I:onnxruntime" not in err, err[:2000]
    monkeypatch.setenv("GD_ORT_LOG_SEVERITY", "1")
    build(tmp_path, "loud")
    assert "[I:onnxruntime" in capfd.readouterr().err
    monkeypatch.setenv("GD_ORT_LOG_SEVERITY", "loud")
    with pytest.raises(ArgumentError, match="GD_ORT_LOG_SEVERITY"):
        build(tmp_path, "bad")
    monkeypatch.setenv("GD_ORT_LOG_SEVERITY", "2")  # the default for what follows
    build(tmp_path, "again")
