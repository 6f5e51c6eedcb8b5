"""Artifact folders: built once per graph and reused (issue 27), built aside and moved in one
rename, a folder whose files do not belong together refused with the reason, an empty ``.onnx``
named (issue 28)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training", reason="ONNX Runtime Training is needed")

import adapters.onnx as ao  # noqa: E402
import adapters.onnx.fisher as of  # noqa: E402
import adapters.onnx.persample as ps  # noqa: E402
import adapters.onnx.train as ot  # noqa: E402
from adapters.onnx.graph import example_model  # noqa: E402
from gd_core.errors import ArgumentError  # noqa: E402


def _data(hidden=4, n=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, hidden)).astype(np.float32)
    y = rng.normal(size=(n, 2)).astype(np.float32)
    return [{"x": x[:3], "target": y[:3]}, {"x": x[3:], "target": y[3:]}]


def _counted(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_a_later_call_reuses_the_artifacts_and_the_checked_engine(monkeypatch, tmp_path):
    # a fresh cache and no engine from an earlier test in this worker: the first call builds
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(of, "_ENGINES", type(of._ENGINES)())
    monkeypatch.setattr(of, "_KNOWN", type(of._KNOWN)())
    built = _counted(monkeypatch, of, "make_artifacts")
    opened = _counted(monkeypatch, of, "Engine")
    model, data = example_model(0.1), _data()
    first = ao.estimate_fisher(model, data, "mse", progress=False)
    checks = _counted(monkeypatch, ps.Engine, "_check")
    second = ao.estimate_fisher(model, data, "mse", progress=False)
    assert (len(built), len(opened), len(checks)) == (1, 1, 0)
    of._ENGINES.clear()  # as in a new process: the folder is reused, the engine opened again
    third = ao.estimate_fisher(model, data, "mse", progress=False)
    assert (len(built), len(opened)) == (1, 2)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
        np.testing.assert_allclose(first[name], third[name], rtol=1e-6, err_msg=name)
    assert second.accumulator.metadata["fisher_engine"] == "per_sample"
    # another graph (other weights) gets its own artifacts
    other = example_model(0.1)
    other.graph.initializer[1].raw_data = np.ones(4, np.float32).tobytes()
    changed = ao.estimate_fisher(other, data, "mse", progress=False)
    assert len(built) == 2
    assert not np.allclose(changed["dense.weight"], first["dense.weight"])


def test_a_file_rewritten_in_place_is_not_taken_for_the_earlier_one(tmp_path):
    import onnx

    path, data = tmp_path / "m.onnx", _data()
    onnx.save(example_model(0.1), str(path))
    first = ao.estimate_fisher(path, data, "mse", progress=False)
    assert ao.estimate_fisher(path, data, "mse", progress=False).count == 6
    other = example_model(0.1)
    other.graph.initializer[1].raw_data = np.ones(4, np.float32).tobytes()
    onnx.save(other, str(path))  # same size, other weights
    again = ao.estimate_fisher(path, data, "mse", progress=False)
    assert not np.allclose(again["dense.weight"], first["dense.weight"])


def test_a_tampered_cached_folder_is_rebuilt_with_a_warning(monkeypatch, tmp_path):
    # a fresh cache and no engine from an earlier test in this worker (an engine kept from a
    # test with another cache folder would leave none in this one: a flaky failure once)
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(of, "_ENGINES", type(of._ENGINES)())
    monkeypatch.setattr(of, "_KNOWN", type(of._KNOWN)())
    model, data = example_model(0.1), _data()
    want = ao.estimate_fisher(model, data, "mse", progress=False)
    of._ENGINES.clear()
    (folder,) = [
        p
        for p in (of.cache_dir() / "ort-artifacts").iterdir()
        if p.is_dir()
        if (p / "checkpoint").exists() and _same(p, model)
    ]
    (folder / "checkpoint").write_bytes((folder / "checkpoint").read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(RuntimeWarning, match="rebuilt.*checkpoint is not the file"):
        got = ao.estimate_fisher(model, data, "mse", progress=False)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def _same(folder, model):
    fixed, _ = of.prepare_for_training(of._dropout_off(model))
    return folder.name == of._graph_digest(fixed, "mse", None, None)[:32]


def _artifacts(tmp_path, hidden, name):
    return ao.make_artifacts(example_model(0.0, hidden), tmp_path / name, "mse", optimizer=None)


def test_a_rebuild_interrupted_between_moves_leaves_no_mixed_folder(tmp_path, monkeypatch):
    _artifacts(tmp_path, 4, "art")
    moves = []

    def interrupted(src, dst):
        moves.append(dst)
        if len(moves) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    real_replace, real_rename = ot.os.replace, ot.os.rename
    monkeypatch.setattr(ot.os, "replace", interrupted)
    monkeypatch.setattr(ot.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _artifacts(tmp_path, 6, "art")
    monkeypatch.setattr(ot.os, "replace", real_replace)
    monkeypatch.setattr(ot.os, "rename", real_rename)
    # the previous folder, whole (on the old code: model 6's checkpoint beside model 4's graph)
    assert ao.estimate_fisher(tmp_path / "art", _data(4), progress=False).count == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.gd-build-")]


def test_another_models_checkpoint_is_refused_with_the_reason(tmp_path):
    a, b = _artifacts(tmp_path, 4, "a"), _artifacts(tmp_path, 6, "b")
    shutil.copy(b.checkpoint, a.checkpoint)
    with pytest.raises(ArgumentError, match="checkpoint is not the file gd_artifacts.json"):
        ao.estimate_fisher(a.directory, _data(4), progress=False)
    meta = json.loads((a.directory / ot.META_FILE).read_text())
    del meta["files"]  # metadata written before the digests were recorded
    (a.directory / ot.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArgumentError, match=r"parameter 'dense.bias' has shape \[6\]"):
        ao.estimate_fisher(a.directory, _data(4), progress=False)
    (a.directory / ot.META_FILE).unlink()  # no digests: the shapes tell
    with pytest.raises(
        ArgumentError,
        match=r"parameter 'dense.bias' has shape \[6\], training_model.onnx expects \[4\]",
    ):
        ao.estimate_fisher(a.directory, _data(4), "mse", progress=False)


def test_empty_files_are_named(tmp_path):
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ArgumentError, match=r"model\.onnx'?, an empty file \(0 bytes\)"):
        ao.estimate_fisher(empty, _data(), "mse", progress=False)
    with pytest.raises(ArgumentError, match=r"an empty file \(0 bytes\)"):
        ao.apply(empty, {"dropout": 0.1})
    art = _artifacts(tmp_path, 4, "art")
    art.checkpoint.write_bytes(b"")
    with pytest.raises(ArgumentError, match=r"checkpoint is empty \(0 bytes\)"):
        ao.estimate_fisher(art.directory, _data(), progress=False)


def test_an_unknown_metadata_version_is_refused(tmp_path):
    art = _artifacts(tmp_path, 4, "art")
    meta = json.loads((art.directory / ot.META_FILE).read_text())
    meta["version"] = 99
    (art.directory / ot.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArgumentError, match="version 99"):
        ot.Artifacts.load(art.directory)


def test_a_folder_with_other_files_keeps_them(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    ao.make_artifacts(example_model(0.0, 4), folder, "mse", optimizer=None)
    art = ao.make_artifacts(example_model(0.0, 6), folder, "mse", optimizer=None)
    assert (folder / "notes.txt").read_text() == "mine"
    assert ot.Artifacts.load(folder).files == art.files
    assert ao.estimate_fisher(folder, _data(6), progress=False).count == 6
