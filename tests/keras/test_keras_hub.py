"""Keras Hub backbones (random-initialised from a config, offline): sites, profile, apply, ``fit``;
saving a guided backbone to ``.keras`` is an expected failure (see its reason).

``keras-hub`` is not in the ``keras`` extra: it requires ``tensorflow-text``, which requires the
full ``tensorflow`` package, which would be installed beside the pinned ``tensorflow-cpu`` (two
distributions owning the same files). ``make`` installs it with ``--no-deps`` plus its small
runtime needs (see the Makefile); without it these tests skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed (the Makefile installs it with --no-deps: its "
    "tensorflow-text requirement would pull full tensorflow beside tensorflow-cpu)",
)
gdk = pytest.importorskip("adapters.keras")


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


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_keras_hub_backbone_sites_apply_save_fit(build, tmp_path):
    model = build()
    sites = gdk.sites(model)
    names = [s.name for s in sites]
    assert len(names) == len(set(names)) >= 5, names  # unique names across transformer layers
    assert all(s.params for s in sites)
    x = inputs_for(model)
    given = {n: round(0.01 * (i + 1), 4) for i, n in enumerate(names)}
    report = gdk.apply(model, given)
    guided = report.model
    assert report.probabilities() == pytest.approx(given)
    out = guided(guided.input)
    seq = keras.Model(guided.input, out["sequence_output"] if isinstance(out, dict) else out)
    seq.compile("adam", "mse")
    target = np.zeros((len(x["token_ids"]), 8, 8), "float32")
    history = seq.fit(x, target, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_keras_hub_profile_and_apply(build):
    model = build()
    prof = gdk.profile(model, [inputs_for(model)], pooled_loss, progress=False)
    assert len(set(np.round(list(prof.probabilities().values()), 6))) > 1
    report = gdk.apply(model, prof)
    assert report.counts() == {"profile": len(prof.site_names)}


@pytest.mark.xfail(
    strict=True,
    reason="a keras_hub transformer layer rebuilds its own Dropout layers from its config on "
    "load, so the GuidedDropout layers' state saved in a .keras file has nowhere to go; "
    "see docs/keras.md#keras-hub",
)
def test_keras_hub_save_load(tmp_path):
    model = tiny_bert()
    names = [s.name for s in gdk.sites(model)]
    given = {n: round(0.01 * (i + 1), 4) for i, n in enumerate(names)}
    guided = gdk.apply(model, given).model
    path = os.path.join(tmp_path, "guided.keras")
    guided.save(path)
    loaded = keras.saving.load_model(path)
    again = {r.site: r.old_p for r in gdk.apply(loaded, dict.fromkeys(names, 0.0))}
    assert again == pytest.approx(given, abs=1e-6)
