"""Keras Hub backbones (random-initialised from a config, offline): sites, profile, apply, ``fit``,
and a guided backbone saved to ``.keras`` loads with its guided probabilities (also in a fresh
process).

``keras-hub`` is not in the ``keras`` extra: it requires ``tensorflow-text``, which requires the
full ``tensorflow`` package, which would be installed beside the pinned ``tensorflow-cpu`` (two
distributions owning the same files). ``make`` installs it with ``--no-deps`` plus its small
runtime needs (see the Makefile); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed (the Makefile installs it with --no-deps: its "
    "tensorflow-text requirement would pull full tensorflow beside tensorflow-cpu)",
)
gdk = pytest.importorskip("adapters.keras")
from adapters.keras.discovery import ModelIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def bert_inputs(n=8, seq=8, vocab=50):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, vocab, size=(n, seq)).astype("int32"),
        "segment_ids": np.zeros((n, seq), "int32"),
        "padding_mask": np.ones((n, seq), "int32"),
    }


def tiny_bert():
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=12,
        max_sequence_length=16,
        dropout=0.1,
    )


def tiny_gpt2():
    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=12,
        max_sequence_length=16,
        dropout=0.1,
    )


def pooled_loss(model, batch):  # one value per sample: a stand-in objective for the test
    out = model(batch, training=False)
    seq = out["sequence_output"] if isinstance(out, dict) else out
    return keras.ops.mean(keras.ops.square(seq), axis=(1, 2))


def inputs_for(model):
    x = bert_inputs()
    if "Bert" not in type(model).__name__:
        x.pop("segment_ids")
    return x


def fits(model, x) -> bool:
    """One epoch of ``fit`` on the backbone's sequence output runs to a finite loss."""
    out = model(model.input)
    seq = keras.Model(model.input, out["sequence_output"] if isinstance(out, dict) else out)
    seq.compile("adam", "mse")
    target = np.zeros((len(x["token_ids"]), 8, 8), "float32")
    history = seq.fit(x, target, epochs=1, batch_size=4, verbose=0)
    return bool(np.isfinite(history.history["loss"][0]))


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_keras_hub_profile_and_apply(build):
    model = build()
    prof = gdk.profile(model, [inputs_for(model)], pooled_loss, progress=False)
    assert len(set(np.round(list(prof.probabilities().values()), 6))) > 1
    report = gdk.apply(model, prof)
    assert report.counts() == {"profile": len(prof.site_names)}


def sequence_of(out):
    return np.asarray(out["sequence_output"] if isinstance(out, dict) else out)


def site_state(model):
    """{site: (rate, per-unit rates, step)} of every dropout site, as the index names them."""
    idx = ModelIndex.build(model)
    return {
        idx.site_name(layer): (
            round(float(layer.rate), 6),
            None if getattr(layer, "rates", None) is None else [round(r, 6) for r in layer.rates],
            getattr(layer, "current_step", None),
        )
        for layer in idx.site_layers
    }


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_keras_hub_backbone_sites_apply_fit_save_load(build, tmp_path):
    model = build()
    sites = gdk.sites(model)
    names = [s.name for s in sites]
    assert len(names) == len(set(names)) >= 5, names  # unique names across transformer layers
    assert all(s.params for s in sites)
    given = {n: round(0.01 * (i + 1), 4) for i, n in enumerate(names)}
    report = gdk.apply(model, given)
    assert report.probabilities() == pytest.approx(given)
    guided = report.model
    x = inputs_for(model)
    expected = sequence_of(guided(x, training=False))
    guided.save(tmp_path / "guided.keras")
    loaded = keras.saving.load_model(tmp_path / "guided.keras")
    # the transformer layers made plain Dropout layers again from their config; the guided ones
    # saved in it are back in their place (and the MultiHeadAttention's config has its rate)
    assert site_state(loaded) == site_state(guided)
    again = {r.site: r.old_p for r in gdk.apply(loaded, dict.fromkeys(names, 0.0))}
    assert again == pytest.approx(given, abs=1e-6)
    np.testing.assert_allclose(sequence_of(loaded(x, training=False)), expected, atol=1e-6)
    loaded.save(tmp_path / "again.keras")  # a loaded model saves and loads again
    assert site_state(keras.saving.load_model(tmp_path / "again.keras")) == site_state(guided)
    assert fits(guided, x)  # the guided model trains, and so does the one loaded from its file
    assert fits(loaded, x)


def test_keras_hub_task_model_save_load(tmp_path):
    """A task model (BertTextClassifier: the backbone nested in a functional model) too."""
    clf = keras_hub.models.BertTextClassifier(tiny_bert(), num_classes=2, preprocessor=None)
    names = [s.name for s in gdk.sites(clf)]
    given = {n: round(0.01 * (i + 1), 4) for i, n in enumerate(names)}
    guided = gdk.apply(clf, given).model
    x = bert_inputs()
    guided.save(tmp_path / "clf.keras")
    loaded = keras.saving.load_model(tmp_path / "clf.keras")
    assert site_state(loaded) == site_state(guided)
    again = {r.site: r.old_p for r in gdk.apply(loaded, dict.fromkeys(names, 0.0))}
    assert again == pytest.approx(given, abs=1e-6)
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)), np.asarray(guided(x, training=False)), atol=1e-6
    )


def test_keras_hub_save_load_in_a_fresh_process(tmp_path, warm_python):
    model = tiny_bert()
    x = inputs_for(model)
    prof = gdk.profile(model, [x], pooled_loss, progress=False)
    report = gdk.apply(model, prof, granularity="unit", schedule={"kind": "early", "steps": 8})
    guided = report.model
    # the attention dropout inside a transformer layer is a GuidedDropout: the schedule reaches it
    assert not any("does not reach" in note for note in report.notes), report.notes
    for layer in guided._flatten_layers():
        if isinstance(layer, gdk.GuidedDropout) and layer.schedule is not None:
            layer.step(3)
    state = site_state(guided)
    assert any(rates for _, rates, _ in state.values())  # per-unit rates where a site takes them
    assert {step for _, _, step in state.values()} == {3}
    expected = sequence_of(guided(x, training=False))
    guided.save(tmp_path / "guided.keras")
    np.savez(tmp_path / "x.npz", **x)
    code = f"""
import json, keras, keras_hub, numpy as np
import adapters.keras as gdk
from adapters.keras.discovery import ModelIndex
m = keras.saving.load_model({str(tmp_path / "guided.keras")!r})
x = dict(np.load({str(tmp_path / "x.npz")!r}))
out = m(x, training=False)
np.save({str(tmp_path / "got.npy")!r}, np.asarray(out["sequence_output"]))
idx = ModelIndex.build(m)
print(json.dumps({{idx.site_name(l): [round(float(l.rate), 6),
    None if getattr(l, "rates", None) is None else [round(r, 6) for r in l.rates],
    getattr(l, "current_step", None)] for l in idx.site_layers}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(  # a process of its own, forked warm (tests/_warm.py)
        [warm_python, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: tuple(v) for k, v in got.items()} == state
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), expected, atol=1e-6)


def test_a_rebuilt_llama_backbone_refuses_a_file_that_would_drop_its_rates(tmp_path):
    # keras_hub's LlamaBackbone cannot be cloned (a layer's get_config fails) and is rebuilt from
    # its hyperparameters: its .keras file loaded every site at the config's 0.1, silently
    import warnings

    from gd_core.errors import ArgumentError

    model = keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_key_value_heads=1,
        dropout=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [s.name for s in gdk.sites(model)]
        report = gdk.apply(model, {n: 0.01 * (i + 1) for i, n in enumerate(names)})
    assert any("saved by its own config" in n for n in report.notes), report.notes
    with pytest.raises(ArgumentError, match="save the weights"):
        report.model.save(tmp_path / "llama.keras")
    assert not (tmp_path / "llama.keras").exists()
