"""``adapters.keras.apply(model, tokenizer=...)`` with no profile: one is computed on text."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")

import gd_core  # noqa: E402

FAST = {"samples": 8, "seq_len": 12, "batch_size": 4, "progress": False}


def words(texts):  # a tokenizer: a callable texts -> token ids
    return [[1 + (hash(w) % 97) for w in t.lower().split()] for t in texts]


def encoder():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(100, 8, name="embeddings")(inputs)
    h = keras.layers.Dropout(0.1, name="embeddings_dropout")(h)
    h = keras.layers.Dense(8, activation="relu", name="ffn")(h)
    h = keras.layers.Dropout(0.1, name="ffn_dropout")(h)
    return keras.Model(inputs, keras.layers.Dense(8, name="out")(h), name="tiny_encoder")


def test_keras_apply_computes_caches_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    model = encoder()
    report = gdk.apply(model, tokenizer=words, auto_profile=FAST)
    guided = report.model
    note = report.notes[0]
    assert "contrastive objective on Keras model 'tiny_encoder'" in note
    assert "8 paragraphs of python-docs" in note and "gd profile" in note
    assert report.counts() == {"profile": 2}
    assert len(list(tmp_path.glob("*.profile.npz"))) == 1
    again = gdk.apply(model, auto_profile=FAST)  # no tokenizer needed: found in the cache
    assert again.notes[0].startswith("profile from the cache")
    assert again.probabilities() == report.probabilities()
    guided.compile("adam", "mse")
    x = np.array(words(["a b c d e f g h i j k l"] * 4), "int32")
    guided.fit(x, np.zeros((4, 12, 8), "float32"), verbose=0)


def test_keras_apply_without_tokenizer_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    with pytest.raises(gd_core.ProfileNotFoundError, match="tokenizer="):
        gdk.apply(encoder())


def test_keras_another_checkpoint_of_the_architecture_recomputes(tmp_path, monkeypatch):
    """Issue 28: the cache is keyed by the weights too; another set of weights recomputes."""
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    gdk.apply(encoder(), tokenizer=words, auto_profile=FAST)
    other = encoder()
    other.set_weights([w + 0.5 for w in other.get_weights()])  # same names and shapes
    report = gdk.apply(other, tokenizer=words, auto_profile=FAST)
    assert "not using the cached profile" in report.notes[0], report.notes
    assert "checkpoint tiny_encoder (weights" in report.notes[0]
    assert report.notes[1].startswith("profile computed by apply()")
    assert len(list(tmp_path.glob("*.profile.npz"))) == 2
