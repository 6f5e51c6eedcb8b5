"""`gd apply-onnx` on a tiny exported BERT and `gd landscape` on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gd_cli.models import export_training_onnx  # noqa: E402
from gd_core import SensitivityProfile, Site  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a sequence classifier, exported in training mode (opset 16)."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    clf.train()
    path = tmp_path_factory.mktemp("onnx") / "tiny-classifier.onnx"
    ids = torch.randint(5, 40, (2, 8))
    export_training_onnx(clf, (ids, torch.ones_like(ids)), path, opset=16, dynamic_batch=False)
    return path


def _ratios(path: Path) -> dict[str, float]:
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: float(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer
             if t.name.endswith(".ratio")}  # fmt: skip
    return {name[: -len(".ratio")]: p for name, p in inits.items()}


def test_apply_onnx_sets_the_profile_probabilities(gd, exported, tiny_profile, tmp_path):
    out = tmp_path / "guided.onnx"
    rc, stdout, err = gd("apply-onnx", exported, tiny_profile, out)
    assert rc == 0, err
    assert f"written to {out}" in stdout and "bert.embeddings.dropout" in stdout
    want = SensitivityProfile.load(tiny_profile).probabilities()
    got = _ratios(out)
    assert set(want) <= set(got)
    for site, p in want.items():
        assert got[site] == pytest.approx(p, abs=1e-7)
    assert got["dropout"] == pytest.approx(
        0.1, abs=1e-7
    )  # the head keeps its rate (--missing keep)


def test_apply_onnx_mapping_override_and_ratio_inputs(gd, exported, tiny_profile, tmp_path):
    import onnx

    out = tmp_path / "guided.onnx"
    rc, stdout, err = gd(
        "apply-onnx", exported, tiny_profile, out, "--ratios-as-inputs", "--p-upper", "0.3",
        "--missing", "upper",
    )  # fmt: skip
    assert rc == 0, err
    inputs = [i.name for i in onnx.load(str(out)).graph.input]
    prof = SensitivityProfile.load(tiny_profile)
    assert all(f"{s}.ratio" in inputs for s in prof.site_names)
    assert "dropout.ratio" in inputs  # --missing upper: the head's site is set too
    row = next(line for line in stdout.splitlines() if line.startswith("dropout "))
    assert row.split()[2] == "0.3000"


def test_apply_onnx_refuses_another_models_profile(gd, exported, tmp_path):
    other = SensitivityProfile.from_fisher(
        {"x.weight": np.ones(2), "y.weight": np.full(2, 2.0)},
        [Site("x.dropout", ("x.weight",)), Site("y.dropout", ("y.weight",))],
    )
    other.save(tmp_path / "other.npz")
    rc, _, err = gd("apply-onnx", exported, tmp_path / "other.npz", tmp_path / "o.onnx")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "profile" in err
    assert not (tmp_path / "o.onnx").exists()


def test_landscape_writes_a_png_and_a_summary(gd, tiny_model, tiny_profile, corpus_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "land.png"
    rc, stdout, err = gd(
        "landscape", "--model", tiny_model, "--profile", tiny_profile, "--corpus", corpus_file,
        "--out", out, "--samples", "4", "--seq-len", "16", "--directions", "2", "--points", "5",
        "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    for group in ("top", "bottom", "all"):
        assert group in rows
        assert np.isfinite(float(rows[group][-1]))  # curvature
    assert f"plot written to {out}" in stdout


def test_landscape_refuses_another_models_profile(gd, tiny_model, corpus_file, tmp_path):
    other = SensitivityProfile.from_fisher(
        {"x.weight": np.ones(2), "y.weight": np.full(2, 2.0)},
        [Site("x.dropout", ("x.weight",)), Site("y.dropout", ("y.weight",))],
    )
    other.save(tmp_path / "other.npz")
    rc, _, err = gd(
        "landscape", "--model", tiny_model, "--profile", tmp_path / "other.npz", "--corpus",
        corpus_file, "--out", tmp_path / "l.png", "--samples", "2", "--seq-len", "8",
    )  # fmt: skip
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "profile" in err
    assert not (tmp_path / "l.png").exists()


def test_landscape_even_points_is_one_line(gd, tiny_model, tiny_profile, corpus_file, tmp_path):
    rc, _, err = gd(
        "landscape", "--model", tiny_model, "--profile", tiny_profile, "--corpus", corpus_file,
        "--out", tmp_path / "l.png", "--samples", "2", "--seq-len", "8", "--points", "4",
    )  # fmt: skip
    assert rc == 2 and "odd" in err and len(err.strip().splitlines()) == 1
