"""Keras Hub backbones and task models get the same site invariants as torch (issue 23):
an embedding dropout guards the embeddings only, a backbone profile applies to the task model
wrapping it under one prefix (strict refuses a partial match, naming the sites), a dropout
layer never called in the forward is a dead site, and no parameter is guarded twice by
accident. Random-initialised tiny backbones, built offline from constructor arguments.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")
gdk = pytest.importorskip("adapters.keras")
import gd_core  # noqa: E402
from gd_core.errors import ArgumentError, ProfileMismatchError  # noqa: E402

TINY = dict(
    vocabulary_size=50,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=12,
    max_sequence_length=16,
    dropout=0.1,
)


def distilbert():
    keras.utils.set_random_seed(0)
    return keras_hub.models.DistilBertBackbone(**TINY)


def roberta():
    keras.utils.set_random_seed(0)
    return keras_hub.models.RobertaBackbone(**TINY)


def token_inputs(n=4, seq=8):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, 50, size=(n, seq)).astype("int32"),
        "padding_mask": np.ones((n, seq), "int32"),
    }


def twice_guarded(sites):
    seen: dict[str, str] = {}
    out = []
    for s in sites:
        for p in s.params:
            if p in seen:
                out.append((p, seen[p], s.name))
            seen.setdefault(p, s.name)
    return out


@pytest.mark.parametrize("build", [distilbert, roberta], ids=["distilbert", "roberta"])
def test_embeddings_dropout_guards_the_embeddings_only(build):
    sites = {s.name: s.params for s in gdk.sites(build())}
    emb = sites["embeddings_dropout"]
    assert emb and all(not p.startswith("transformer_layer_") for p in emb), emb
    assert any("embedding" in p for p in emb)
    assert twice_guarded(gdk.sites(build())) == []


def test_backbone_profile_applies_to_the_task_model_under_one_prefix():
    backbone = distilbert()
    names = [s.name for s in gdk.sites(backbone)]
    clf = keras_hub.models.DistilBertTextClassifier(backbone, num_classes=2, preprocessor=None)
    clf_names = [s.name for s in gdk.sites(clf)]
    assert set(names) <= set(clf_names), sorted(set(names) - set(clf_names))
    assert twice_guarded(gdk.sites(clf)) == []
    sites = gdk.sites(backbone)
    prof = gd_core.SensitivityProfile(
        sites=tuple(sites),
        scores=np.linspace(1.0, 2.0, len(sites)),
        fingerprint=gdk.fingerprint(backbone),
    )
    report = gdk.apply(clf, prof, strict=True)
    got = report.probabilities()
    want = prof.probabilities()
    assert {n: got[n] for n in names} == pytest.approx(want)
    sources = {r.site: r.source for r in report}
    assert all(sources[n] == "profile" for n in names), sources


def test_strict_refuses_a_partial_prefix_match_naming_the_sites():
    """The names an older release gave a task model: two sites gained the backbone's prefix,
    the others not. No renaming places them all; strict refuses, naming the sites."""
    from gd_core.plan import make_plan

    backbone = distilbert()
    sites = gdk.sites(backbone)
    prof = gd_core.SensitivityProfile(sites=tuple(sites), scores=np.linspace(1.0, 2.0, len(sites)))
    model_names = [
        "distil_bert_backbone." + s.name
        if s.name.endswith("self_attention_layer.dropout")
        else s.name
        for s in sites
    ]
    with pytest.raises(ProfileMismatchError, match="transformer_layer_0.self_attention_layer"):
        make_plan(prof, model_names, {}, None, strict=True)
    plan = make_plan(prof, model_names, {}, None, strict=False)
    assert sum(e.source == "profile" for e in plan.entries) == len(sites) - 2


def gemma(dropout=0.1):
    keras.utils.set_random_seed(0)
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        dropout=dropout,
    )


def token_loss(model, batch):  # one value per sample: a stand-in objective for the test
    out = model(batch, training=False)
    return keras.ops.mean(keras.ops.square(out), axis=(1, 2))


def test_gemma_dead_feedforward_dropout_is_reported_not_profiled():
    model = gemma(0.1)
    with pytest.warns(UserWarning, match="feedforward_dropout"):
        sites = gdk.sites(model)
    names = [s.name for s in sites]
    assert not any(n.endswith("feedforward_dropout") for n in names), names
    assert all(s.params for s in sites)  # (a second sites() call would warn again)
    prof = gdk.profile(model, [token_inputs()], token_loss, progress=False)
    assert np.all(np.isfinite(prof.scores))
    assert sorted(prof.metadata["dead_sites"]) == [
        "decoder_block_0.feedforward_dropout",
        "decoder_block_1.feedforward_dropout",
    ]
    report = gdk.apply(model, prof)
    assert {r.site for r in report} == set(names)  # a dead site is not "installed"
    assert any("dead sites" in n and "feedforward_dropout" in n for n in report.notes)


def test_non_finite_scores_name_the_sites():
    sites = (gd_core.Site("a", ("w",)), gd_core.Site("b", ()), gd_core.Site("c", ("v",)))
    with pytest.raises(ArgumentError, match=r"sites \['b'\]; \['b'\] guard no parameters"):
        gd_core.SensitivityProfile(sites=sites, scores=np.array([1.0, np.nan, 3.0])).probabilities()


@keras.saving.register_keras_serializable(package="test_hub_sites")
class Mixer(keras.layers.Layer):
    """A custom layer: a dropout on a softmax output under a neutral name, and one named like
    attention that drops hidden features."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scores = keras.layers.Dense(6, name="scores")
        self.mix = keras.layers.Dropout(0.1, name="mix")
        self.out = keras.layers.Dense(6, name="out")
        self.attention_dropout = keras.layers.Dropout(0.1, name="attention_dropout")

    def call(self, x, training=None):
        probs = self.mix(keras.ops.softmax(self.scores(x), axis=-1), training=training)
        return self.attention_dropout(self.out(probs), training=training)


def test_attention_probabilities_are_found_by_dataflow_not_names():
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(Mixer(name="mixer")(inp)))
    names = [s.name for s in gdk.sites(model)]
    assert names == ["mixer.mix", "mixer.attention_dropout"]
    sites = gdk.sites(model)
    prof = gd_core.SensitivityProfile(
        sites=tuple(sites),
        scores=np.array([1.0, 2.0]),
        unit_scores={s.name: np.linspace(1.0, 2.0, 6) for s in sites},
        fingerprint=gdk.fingerprint(model),
    )
    notes = {r.site: r.note for r in gdk.apply(model, prof, granularity="unit")}
    assert "attention probabilities" in notes["mixer.mix"]
    assert "attention probabilities" not in notes["mixer.attention_dropout"]


def test_gemma_attention_probability_site_is_found_by_dataflow():
    from adapters.keras.discovery import ModelIndex

    idx = ModelIndex.build(gemma(0.1))
    idx.live_layers()
    probs = sorted(idx.site_name(x) for x in idx.site_layers if id(x) in idx.attention)
    assert probs == ["decoder_block_0.attention.dropout", "decoder_block_1.attention.dropout"]


def test_a_blocks_inner_sites_do_not_reach_before_the_block():
    """Inside a transformer block (no graph) the layer-order rule stays in the block: Gemma's
    first attention dropout guards its block's norm and Q/K/V, not the token embedding or the
    previous block's MLP (which no dropout of Gemma acts on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dead sites: another test
        found = gdk.sites(gemma(0.1))
    sites = {s.name: s.params for s in found}
    for block in (0, 1):
        params = sites[f"decoder_block_{block}.attention.dropout"]
        assert params and all(p.startswith(f"decoder_block_{block}.") for p in params), params
    assert twice_guarded(found) == []
