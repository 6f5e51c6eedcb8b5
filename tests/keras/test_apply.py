"""Sites, fingerprints and apply on Sequential, functional and subclassed Keras models."""

from __future__ import annotations

import numpy as np
import pytest
from keras_helpers import BACKEND, MLP_TORCH_SHAPES, build_mlp

import gd_core
import gd_core.cache
from gd_core.errors import ArgumentError, NoSitesError, ProfileMismatchError
from gd_core.report import ApplyReport, ReportRow

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
layers = keras.layers


def numpy_weights(model):
    return [keras.ops.convert_to_numpy(w.value).copy() for w in model.trainable_weights]


def fake_profile(model, scores, **kwargs):
    """A profile with given site scores (and the model's fingerprint), without estimating Fisher."""
    model_sites = gdk.sites(model)
    rng = np.random.default_rng(0)
    units = {
        s.name: rng.uniform(0.5, 2.0, size=s.units) for s in model_sites if s.units is not None
    }
    return gd_core.SensitivityProfile(
        sites=tuple(model_sites),
        scores=np.asarray(scores, float),
        unit_scores=units,
        fingerprint=gdk.fingerprint(model),
        **kwargs,
    )


# -- sites ----------------------------------------------------------------------------------
@pytest.mark.single_backend
@pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch backend rejects dots in layer names")
def test_sites_mirror_a_torch_module_tree_with_dotted_names():
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(11, 8, name="embeddings.word_embeddings")(inp)
    h = layers.LayerNormalization(name="embeddings.LayerNorm")(h)
    h = layers.Dropout(0.1, name="embeddings.dropout")(h)
    a = layers.Dense(8, name="encoder.layer.0.attention.output.dense")(h)
    a = layers.Dropout(0.1, name="encoder.layer.0.attention.output.dropout")(a)
    h = layers.LayerNormalization(name="encoder.layer.0.attention.output.LayerNorm")(
        layers.Add()([a, h])
    )
    h = layers.Dropout(0.1, name="dropout")(layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, layers.Dense(2, name="classifier")(h))
    found = gdk.sites(model)
    assert [s.name for s in found] == [
        "embeddings.dropout",
        "encoder.layer.0.attention.output.dropout",
        "dropout",
    ]
    emb, attn, top = found
    assert emb.params == (
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    )
    assert emb.unit_axes == {p: a for p, a in zip(emb.params, (1, 0, 0), strict=True)}
    # gd_core.dataflow: the dense, and the LayerNorm that takes the residual sum (rule 3)
    assert attn.params == (
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.output.dense.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
    )
    # canonical (torch) layout: the Dense kernel is the Linear weight (out, in), units on axis 0
    assert all(attn.unit_axes[p] == 0 for p in attn.params) and attn.units == 8
    # the walk back from the last dropout ends at the LayerNorm the previous site holds
    assert top.params == ()


def test_sites_of_a_sequential_model_guard_the_layers_since_the_previous_site():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5, name="d1"),
            layers.Dropout(0.2, name="dr1"),
            layers.Dense(4, name="d2"),
            layers.BatchNormalization(name="bn"),
            layers.AlphaDropout(0.3, name="dr2"),
            layers.GaussianDropout(0.3, name="gauss"),  # not a Bernoulli dropout: not a site
            layers.Dense(3, name="out"),
        ]
    )
    found = gdk.sites(model)
    assert [(s.name, s.units) for s in found] == [("dr1", 5), ("dr2", 4)]
    assert found[0].params == ("d1.weight", "d1.bias")
    assert found[1].params == ("d2.weight", "d2.bias", "bn.weight", "bn.bias")  # no moving stats
    assert found[1].unit_axes == {"d2.weight": 0, "d2.bias": 0, "bn.weight": 0, "bn.bias": 0}


@pytest.mark.single_backend
def test_spatial_dropout_and_guided_dropout_are_sites():
    inp = keras.Input((7, 4))
    h = layers.Conv1D(6, 3, name="conv")(inp)
    h = layers.SpatialDropout1D(0.2, name="spatial")(h)
    h = gdk.GuidedDropout(0.1, name="guided", site="custom.site")(h)
    model = keras.Model(inp, h)
    found = gdk.sites(model)
    assert [s.name for s in found] == ["spatial", "custom.site"]
    assert found[0].params == ("conv.weight", "conv.bias") and found[0].units == 6
    assert gdk.fingerprint(model).params[1] == ("conv.weight", (6, 4, 3))  # torch (out, in, k)
    assert found[0].unit_axes == {"conv.weight": 0, "conv.bias": 0}
    assert found[1].params == ()


@pytest.mark.single_backend
def test_mapping_overrides_guarded_weights_and_is_validated(mlp):
    found = gdk.sites(mlp, {"enc1_dropout": ["classifier.weight"]})
    assert found[1].params == ("classifier.weight",)
    assert found[1].unit_axes == {}  # (3, 8): the output axis is not the site's 8 units
    assert found[0].params == ("enc0_dense.weight", "enc0_dense.bias")
    with pytest.raises(ArgumentError, match=r"mapping: expected keys that are dropout site names"):
        gdk.sites(mlp, {"nope": []})
    with pytest.raises(ArgumentError, match=r"mapping\['enc0_dropout'\].*'dense.kernel'"):
        gdk.sites(mlp, {"enc0_dropout": ["dense.kernel"]})
    with pytest.raises(ArgumentError, match="a list of parameter names"):
        gdk.sites(mlp, {"enc0_dropout": "enc0_dense.weight"})


@pytest.mark.single_backend
def test_models_without_bernoulli_dropout_raise_no_sites_error():
    plain = keras.Sequential([keras.Input((3,)), layers.Dense(2), layers.GaussianDropout(0.1)])
    with pytest.raises(NoSitesError, match="model: expected at least one dropout site"):
        gdk.sites(plain)
    with pytest.raises(NoSitesError):
        gdk.apply(plain, fake_profile(build_mlp(), [1.0, 2.0]))
    with pytest.raises(ArgumentError, match="model: expected a Keras 3 model"):
        gdk.sites("not a model")


def test_fingerprint_uses_canonical_names_and_torch_layout(mlp):
    fp = gdk.fingerprint(mlp)
    assert dict(fp.params) == MLP_TORCH_SHAPES


# -- apply ----------------------------------------------------------------------------------
def test_apply_rewrites_dropout_inside_attention_and_nested_models():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 8))
    att = layers.MultiHeadAttention(2, 4, dropout=0.1, name="attn")(inp, inp)
    h = layers.Dropout(0.1, name="attn_out_dropout")(att)
    inner = keras.Sequential(
        [keras.Input((5, 8)), layers.Dense(8, name="inner_dense"), layers.Dropout(0.2)],
        name="inner",
    )
    model = keras.Model(inp, layers.Dense(2, name="head")(inner(h)))
    found = gdk.sites(model)
    inner_site, outer_site, nested_site = found
    assert inner_site.params[:2] == ("query.weight", "query.bias")  # MHA's own attention dropout
    # the walk back from the output dropout enters the attention block after its inner dropout
    assert outer_site.params == ("attention_output.weight", "attention_output.bias")
    assert nested_site.params == ("inner_dense.weight", "inner_dense.bias")
    report = gdk.apply(model, fake_profile(model, [3.0, 2.0, 1.0]))
    new = report.model
    assert report.probabilities() == dict(
        zip([s.name for s in found], (0.0, 0.05, 0.1), strict=True)
    )
    guided = [g for g in new._flatten_layers() if isinstance(g, gdk.GuidedDropout)]
    assert sorted(g.rate for g in guided) == [0.05, 0.1]
    # MultiHeadAttention keeps its rate in its config (a .keras file loads anywhere)
    assert new.get_layer("attn").get_config()["dropout"] == 0.0
    assert not any(
        type(g) is layers.Dropout
        for g in new._flatten_layers()
        if g is not new.get_layer("attn")._dropout_layer
    )
    x = np.random.default_rng(1).normal(size=(3, 5, 8)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(new(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-5
    )


def test_apply_functional_model_keeps_weights_and_installs_profile_rates(mlp, toy):
    x, y = toy
    mlp.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = numpy_weights(mlp)
    prof = fake_profile(mlp, [2.0, 1.0])
    report = gdk.apply(mlp, prof)
    new = report.model
    assert report.probabilities() == {"enc0_dropout": 0.0, "enc1_dropout": 0.1}
    assert [r.old_p for r in report] == [0.1, 0.1] and report.counts() == {"profile": 2}
    for name, p in report.probabilities().items():
        layer = new.get_layer(name)
        assert isinstance(layer, gdk.GuidedDropout) and layer.rate == p and layer.rates is None
    assert not any(isinstance(layer, gdk.GuidedDropout) for layer in mlp.layers)  # input untouched
    for a, b in zip(before, numpy_weights(mlp), strict=True):
        np.testing.assert_array_equal(a, b)
    assert gdk.fingerprint(new) == gdk.fingerprint(mlp)
    for a, b in zip(mlp.trainable_weights, new.trainable_weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value)
        )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(new(x)), keras.ops.convert_to_numpy(mlp(x)), rtol=1e-6
    )
    assert new.compiled  # the compile config was copied
    text = str(report)
    assert "enc1_dropout" in text and "0.1000" in text and "profile" in text


def test_apply_sequential_model_with_unit_granularity(toy):
    x, _ = toy
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5, name="d1"),
            layers.Dropout(0.2, name="dr1", seed=3),
            layers.Dense(4, name="d2"),
            layers.Dropout(0.3, name="dr2"),
            layers.Dense(3, name="out"),
        ]
    )
    prof = fake_profile(model, [1.0, 2.0])
    report = gdk.apply(model, prof, granularity="unit", mapping={"p_upper": 0.2})
    new = report.model
    assert isinstance(new, keras.Sequential)
    first = new.get_layer("dr1")
    assert first.seed == 3 and len(first.rates) == 5
    assert np.mean(first.rates) == pytest.approx(0.2)
    # less important units (lower unit score) get more dropout
    assert np.argmax(first.rates) == np.argmin(prof.unit_scores["dr1"])
    assert report["dr1"].units == 5 and report["dr2"].new_p == 0.0
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(new(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )


def test_apply_aligns_renamed_profiles_and_applies_the_missing_policy(mlp):
    prof = fake_profile(mlp, [2.0, 1.0]).translate(lambda n: "base." + n)
    report = gdk.apply(mlp, prof)  # the "base." prefix is stripped by gd_core.align
    assert report.probabilities() == {"enc0_dropout": 0.0, "enc1_dropout": 0.1}

    partial = gd_core.SensitivityProfile(
        sites=(gdk.sites(mlp)[0],), scores=np.array([1.0]), mapping={"p_upper": 0.3}
    )
    keep = gdk.apply(mlp, partial, missing="keep")
    assert keep["enc1_dropout"].source == "keep" and keep["enc1_dropout"].new_p == 0.1
    upper = gdk.apply(mlp, partial, missing="upper")
    assert upper["enc1_dropout"].source == "upper" and upper["enc1_dropout"].new_p == 0.3
    with pytest.raises(ProfileMismatchError, match="missing='keep'"):
        gdk.apply(mlp, partial, missing="error")


def test_apply_refuses_a_profile_of_another_model_unless_not_strict(mlp, tmp_path):
    other = build_mlp(hidden=4)
    prof = fake_profile(other, [1.0, 2.0])
    with pytest.raises(ProfileMismatchError, match="strict=False"):
        gdk.apply(mlp, prof)
    report = gdk.apply(mlp, prof, strict=False)
    assert report.probabilities() == {"enc0_dropout": 0.1, "enc1_dropout": 0.0}
    path = prof.save(tmp_path / "other.profile.npz")
    from_file = gdk.apply(mlp, str(path), strict=False)
    assert from_file.probabilities() == report.probabilities()
    with pytest.raises(ArgumentError, match="granularity"):
        gdk.apply(mlp, prof, granularity="layer")
    with pytest.raises(ArgumentError, match="profile: expected None .*a SensitivityProfile"):
        gdk.apply(mlp, 5)


def test_apply_given_probabilities_and_cached_profiles(mlp, tmp_path, monkeypatch):
    report = gdk.apply(mlp, {"enc1_dropout": 0.25}, missing="upper")
    new = report.model
    assert report.probabilities() == {"enc0_dropout": 0.1, "enc1_dropout": 0.25}
    assert [r.source for r in report] == ["upper", "given"]
    assert new.get_layer("enc1_dropout").rate == 0.25
    with pytest.raises(ArgumentError, match=r"profile\['enc1_dropout'\]: expected a float in"):
        gdk.apply(mlp, {"enc1_dropout": 1.0})
    with pytest.raises(ArgumentError, match="keys are dropout sites"):
        gdk.apply(mlp, {"nowhere": 0.1})
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(gd_core.ProfileNotFoundError, match="cache=True"):
        gdk.apply(mlp)
    gd_core.cache.store(fake_profile(mlp, [1.0, 2.0]))
    cached = gdk.apply(mlp)
    assert cached.probabilities() == {"enc0_dropout": 0.1, "enc1_dropout": 0.0}
    only_first = gdk.sites(mlp)[:1]
    one = gdk.apply(mlp, {"enc0_dropout": 0.05}, sites=only_first)
    partial = one.model
    assert one.sites == ["enc0_dropout"]
    assert type(partial.get_layer("enc1_dropout")) is layers.Dropout  # not asked: untouched


def test_apply_unit_granularity_rejects_unit_scores_of_the_wrong_length(mlp):
    prof = fake_profile(mlp, [2.0, 1.0], mapping={"p_lower": 0.05})
    bad_units = dict(prof.unit_scores)
    bad_units["enc0_dropout"] = np.ones(3)
    from dataclasses import replace

    with pytest.raises(ProfileMismatchError, match="expected 8 unit scores"):
        gdk.apply(mlp, replace(prof, unit_scores=bad_units), granularity="unit")


class Block(layers.Layer):
    def __init__(self, units: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = layers.Dense(units, name="dense")
        self.drops = [layers.Dropout(0.1, name="dropout")]

    def call(self, x, training=False):
        return self.drops[0](self.dense(x), training=training)


class Net(keras.Model):
    def __init__(self):
        super().__init__()
        self.b0 = Block(name="b0")
        self.b1 = Block(name="b1")
        self.dropout = layers.Dropout(0.2, name="head_dropout")
        self.head = layers.Dense(3, name="head")

    def call(self, x, training=False):
        h = self.b1(self.b0(x, training=training), training=training)
        return self.head(self.dropout(h, training=training))


def test_apply_subclassed_model_replaces_dropout_attributes_in_place(toy):
    x, y = toy
    net = Net()
    net(x[:2])
    found = gdk.sites(net)
    assert [s.name for s in found] == ["b0.dropout", "b1.dropout", "head_dropout"]
    assert found[1].params == ("b1.dense.weight", "b1.dense.bias")
    before = numpy_weights(net)
    report = gdk.apply(net, fake_profile(net, [3.0, 2.0, 1.0]), granularity="unit")
    same = report.model
    assert same is net and any("in place" in n for n in report.notes), report.notes
    # a subclassed model has no input specs to guess from: the dead-site check is said skipped
    assert any("was not checked" in n for n in report.notes), report.notes
    assert all(r.units is None for r in report)  # subclassed: units unknown, one rate per site
    guided = [layer for layer in net._flatten_layers() if isinstance(layer, gdk.GuidedDropout)]
    assert sorted(g.site for g in guided) == ["b0.dropout", "b1.dropout", "head_dropout"]
    assert not any(type(layer) is layers.Dropout for layer in net._flatten_layers())
    assert [s.name for s in gdk.sites(net)] == ["b0.dropout", "b1.dropout", "head_dropout"]
    for a, b in zip(before, numpy_weights(net), strict=True):
        np.testing.assert_array_equal(a, b)
    net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(x, y, epochs=1, batch_size=32, verbose=0)


@pytest.mark.single_backend
def test_apply_explains_models_it_cannot_rewrite(toy):
    class TupleHeld(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2, name="dense")
            self.drops = (layers.Dropout(0.1, name="tuple_dropout"),)

        def call(self, x, training=False):
            return self.drops[0](self.dense(x), training=training)

    model = TupleHeld()
    model(toy[0][:2])
    prof = gd_core.SensitivityProfile(sites=tuple(gdk.sites(model)), scores=np.array([1.0]))
    with pytest.raises(ArgumentError, match=r"\['tuple_dropout'\] are not attributes"):
        gdk.apply(model, prof)


@pytest.mark.single_backend
def test_report_is_framework_neutral():
    report = ApplyReport(
        [ReportRow("a", 0.1, 0.0, "profile", units=4), ReportRow("b", 0.1, 0.1, "keep")],
        framework="keras",
        notes=["hello"],
    )
    lines = str(report).splitlines()
    assert lines[0].split() == ["site", "old", "p", "new", "p", "source", "units"]
    assert lines[2].split()[:5] == ["a", "0.1000", "0.0000", "profile", "4"]
    assert "2 sites (keras, site granularity): 1 profile, 1 keep" in lines[4]
    assert lines[-1] == "note: hello"
    assert report.to_dict()["rows"][1]["source"] == "keep" and len(report) == 2


def test_fit_smoke_guided_mlp_loss_falls(toy):
    x, y = toy
    base = build_mlp(seed=1)
    new = gdk.apply(base, fake_profile(base, [2.0, 1.0], mapping={"p_upper": 0.2})).model
    new.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(True))
    history = new.fit(x, y, epochs=6, batch_size=32, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_second_apply_keeps_other_sites_per_unit_rates(kind):
    """Issue 14.2: ``missing="keep"`` means unchanged, per-unit rates included."""
    if kind == "functional":
        inp = keras.Input((6,))
        h = layers.Dropout(0.2, name="dr1")(layers.Dense(5, name="d1")(inp))
        h = layers.Dropout(0.3, name="dr2")(layers.Dense(4, name="d2")(h))
        model = keras.Model(inp, layers.Dense(3, name="out")(h))
    else:

        class Net(keras.Model):
            def __init__(self):
                super().__init__()
                # units of a subclassed model are unknown to sites(): start from per-unit rates
                rates = [0.1, 0.3, 0.2, 0.0, 0.4]
                self.d1, self.dr1 = (
                    layers.Dense(5, name="d1"),
                    gdk.GuidedDropout(rates=rates, name="dr1"),
                )
                self.d2, self.dr2 = layers.Dense(4, name="d2"), layers.Dropout(0.3, name="dr2")

            def call(self, x, training=False):
                h = self.dr1(self.d1(x), training=training)
                return self.dr2(self.d2(h), training=training)

        model = Net()
        model(np.zeros((2, 6), "float32"))
    if kind == "functional":
        prof = fake_profile(model, [1.0, 2.0])
        first = gdk.apply(model, prof, granularity="unit", mapping={"p_upper": 0.2}).model
    else:
        first = model
    rates = list(_layer(first, "dr1").rates)
    assert len(rates) == 5 and len(set(rates)) > 1
    report = gdk.apply(first, {"dr2": 0.25}, granularity="unit")
    again = report.model
    assert list(_layer(again, "dr1").rates) == rates  # not collapsed to their mean
    assert report["dr1"].source == "keep" and report["dr1"].how == "kept (5 rates)"
    assert report["dr2"].new_p == pytest.approx(0.25)


def _layer(model, name):
    return next(lay for lay in model._flatten_layers() if lay.name == name)


class AttentionNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.emb = layers.Dense(8, name="emb")
        self.mha = layers.MultiHeadAttention(2, 4, dropout=0.1, name="mha")
        self.head = layers.Dense(2, name="head")

    def call(self, x, training=False):
        h = self.emb(x)
        return self.head(self.mha(h, h, training=training)[:, 0])


def test_attention_dropout_of_a_subclassed_model_stays_one_rate_at_unit_granularity():
    """Unit scores for a MultiHeadAttention's dropout (from another framework's profile, say)
    would give per-unit rates along the attention probabilities' last axis, the key positions:
    the site keeps one rate, and the row says why, as in a functional model and in torch."""
    net = AttentionNet()
    x = np.ones((2, 5, 3), "float32")
    net(x)
    (site,) = gdk.sites(net)
    prof = gd_core.SensitivityProfile(
        sites=(site,),
        scores=np.ones(1),
        unit_scores={site.name: np.arange(1.0, 5.0)},
        fingerprint=gdk.fingerprint(net),
    )
    (row,) = gdk.apply(net, prof, granularity="unit")
    assert row.units is None and "attention probabilities" in row.note
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(net(x, training=True))))
