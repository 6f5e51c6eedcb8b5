"""Sites inserted into a dropout-free Keras model (issue 23, item 5): as adapters.torch does, a
model whose forward calls no dropout layer gets sites on the embedding output and on every
residual branch, found from the dataflow of a traced forward (the residual adds of a block
happen inside its ``call``), named ``<layer>.gd_dropout``, installed by ``apply`` and kept in
``.keras`` files. Before, ``sites`` raised NoSitesError saying this binding does not insert."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
from keras_helpers import BACKEND  # noqa: E402

from adapters.keras.calls import called_layers  # noqa: E402
from adapters.keras.discovery import ModelIndex  # noqa: E402
from gd_core.errors import NoSitesError  # noqa: E402

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="sites are inserted from a traced TensorFlow forward"
)


@keras.saving.register_keras_serializable(package="gd_test_inserted")
class PreNormBlock(keras.layers.Layer):
    """A pre-norm transformer-like block, no dropout: ``x + mlp(norm(x))``, then a tanh GELU
    written out (``h + 0.044715 h^3``: an addition, but no residual branch) in the MLP."""

    def __init__(self, dim=8, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.up = keras.layers.Dense(2 * dim, name="up")
        self.down = keras.layers.Dense(dim, name="down")
        self.mix = keras.layers.Dense(dim, name="mix")

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.up.build(input_shape)
        self.down.build((*input_shape[:-1], 2 * self.dim))
        self.mix.build(input_shape)

    def call(self, x):
        h = self.up(self.norm(x))
        h = 0.5 * h * (1.0 + keras.ops.tanh(0.79788456 * (h + 0.044715 * h * h * h)))
        x = x + self.down(h)
        return x + self.mix(x)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="ids")
    h = keras.layers.Embedding(20, 8, name="embed")(ids)
    h = PreNormBlock(name="block0")(h)
    h = PreNormBlock(name="block1")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.LayerNormalization(name="final")(h))
    return keras.Model(ids, out)


def tokens(n=4, seq=5):
    return np.random.default_rng(0).integers(0, 20, size=(n, seq)).astype("int32")


def quiet_sites(m, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = gdk.sites(m, **kw)
    return found, [str(w.message) for w in caught]


def test_a_dropout_free_model_gets_sites_on_the_embedding_output_and_residual_branches():
    found, said = quiet_sites(model())
    assert [s.name for s in found] == [
        "embed.gd_dropout",
        "block0.down.gd_dropout",
        "block0.mix.gd_dropout",
        "block1.down.gd_dropout",
        "block1.mix.gd_dropout",
    ]  # not the GELU's inner addition
    assert {s.kind for s in found} == {"hook"}
    by = {s.name: set(s.params) for s in found}
    assert by["embed.gd_dropout"] == {"embed.weight"}
    assert by["block0.down.gd_dropout"] == {
        f"block0.{x}.{w}" for x in ("norm", "up", "down") for w in ("weight", "bias")
    }
    assert by["block0.mix.gd_dropout"] == {"block0.mix.weight", "block0.mix.bias"}
    assert all(s.units == 8 for s in found)
    assert any("site(s) inserted" in m for m in said)  # never silent


def test_apply_installs_the_inserted_sites_and_every_p_reaches_a_call():
    m = model()
    found, _ = quiet_sites(m)
    given = {s.name: 0.01 * (i + 1) for i, s in enumerate(found)}
    report = gdk.apply(m, given)
    new = report.model
    assert {r.site: r.new_p for r in report.rows} == given
    assert all(r.old_p == 0.0 and r.how.startswith("inserted") for r in report.rows)
    idx = ModelIndex.build(new)
    called = called_layers(new, idx.site_layers, example=tokens())
    assert {idx.site_name(x): float(x.rate) for x in idx.site_layers if id(x) in called} == given
    # the model keeps exactly its weights, computes the same in inference, and drops in training
    assert gdk.fingerprint(new) == gdk.fingerprint(m) and len(new.weights) == len(m.weights)
    x = tokens()
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(m(x)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(new(x, training=True)), np.asarray(m(x)))
    # the guided model's sites are the inserted ones, guarding the same weights
    again, _ = quiet_sites(new)
    assert [(s.name, s.params, s.kind) for s in again] == [
        (s.name, s.params, s.kind) for s in found
    ]
    assert len(ModelIndex.build(m).site_layers) == 0  # the input model is unchanged


def test_profile_and_apply_of_a_profile_on_a_dropout_free_model():
    m = model()

    def loss(model, batch):
        return keras.ops.mean(keras.ops.square(model(batch, training=False)), axis=(1, 2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = gdk.profile(m, [tokens()], loss, progress=False)
        report = gdk.apply(m, prof, granularity="unit")
    assert prof.site_names[0] == "embed.gd_dropout" and np.all(np.isfinite(prof.scores))
    assert all(r.units == 8 for r in report.rows), report  # per-unit rates on hidden features
    assert any("inserted" in n for n in report.notes)


def test_a_keras_file_keeps_the_inserted_sites(tmp_path):
    m = model()
    found, _ = quiet_sites(m)
    given = {s.name: 0.02 * (i + 1) for i, s in enumerate(found)}
    new = gdk.apply(m, given).model
    path = os.path.join(tmp_path, "inserted.keras")
    new.save(path)
    loaded = keras.saving.load_model(path)
    idx = ModelIndex.build(loaded)
    called = called_layers(loaded, idx.site_layers, example=tokens())
    assert {idx.site_name(x): float(x.rate) for x in idx.site_layers if id(x) in called} == given
    np.testing.assert_allclose(
        np.asarray(loaded(tokens())), np.asarray(m(tokens())), rtol=1e-5, atol=1e-6
    )


def test_a_model_whose_forward_cannot_be_traced_gets_a_clear_error(monkeypatch):
    from adapters.keras import inserted

    monkeypatch.setattr(inserted, "backend_ok", lambda: False)
    with pytest.raises(NoSitesError, match="inserts sites .* only from a traced forward"):
        gdk.sites(model())


def test_a_model_with_no_residual_branch_gets_a_clear_error():
    inp = keras.Input((4,))
    m = keras.Model(inp, keras.layers.Dense(2, name="fc")(keras.layers.Dense(4)(inp)))
    with pytest.raises(NoSitesError, match="no residual branch or embedding output"):
        gdk.sites(m)


def test_gemma_at_its_presets_dropout_0_gets_residual_sites():
    """keras_hub's Gemma presets have dropout 0: its blocks call no dropout layer. torch's
    Llama gets sites on its residual branches; so does this Gemma (the attention output and
    the feed-forward output of each block; its embedding output is ``x * sqrt(hidden_dim)``,
    an operation of the graph no layer returns, which a note names)."""
    keras_hub = pytest.importorskip("keras_hub")
    import hub_zoo  # tests/keras is on sys.path (conftest)

    cls = keras_hub.models.GemmaBackbone
    m = cls(**{**hub_zoo.tiny_kwargs(cls), "dropout": 0.0})
    found, said = quiet_sites(m)
    assert [s.name for s in found] == [
        f"decoder_block_{i}.{x}.gd_dropout" for i in (0, 1) for x in ("attention", "ffw_linear")
    ]
    ffw = set(found[1].params)
    assert {p.split(".")[1] for p in ffw} == {
        "pre_ffw_norm",
        "ffw_gating",
        "ffw_gating_2",
        "ffw_linear",
    }
    assert any("not returned by a layer" in m for m in said)
    assert hub_zoo.twice_guarded(m, found) == []
    given = {s.name: 0.01 * (i + 1) for i, s in enumerate(found)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = gdk.apply(m, given).model
    assert hub_zoo._called_rates(new) == given
    # the task model wrapping the backbone has the same inserted sites (a backbone profile
    # applies to it site for site)
    lm = keras_hub.models.GemmaCausalLM(backbone=m, preprocessor=None)
    assert [s.name for s in quiet_sites(lm)[0]] == list(given)


class NoConfigResidual(keras.layers.Layer):
    """A residual block whose ``get_config`` fails (LlamaTransformerDecoder's): clone_model
    cannot copy it, so ``apply`` builds the model again from its own config."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(4, name="fc")

    def call(self, x):
        return x + self.fc(x)

    def get_config(self):
        raise AttributeError("'NoConfigResidual' object has no attribute 'rope_scaling_factor'")


@keras.saving.register_keras_serializable(package="gd_test_inserted")
class HyperNet(keras.Model):
    """A functional model saved by its hyperparameters (a keras_hub backbone)."""

    def __init__(self, units=4, **kwargs):
        inp = keras.Input((4,), name="x")
        h = keras.layers.Dense(units, name="stem")(inp)
        out = keras.layers.Dense(2, name="head")(NoConfigResidual(name="block")(h))
        super().__init__(inp, out, **kwargs)
        self.units = units

    def get_config(self):
        return {"units": self.units, "name": self.name}


def test_a_model_saved_by_its_hyperparameters_refuses_to_save_inserted_sites(tmp_path):
    keras.utils.set_random_seed(0)
    m = HyperNet()
    found, _ = quiet_sites(m)
    assert [s.name for s in found] == ["stem.gd_dropout", "fc.gd_dropout"]  # unique names
    report = gdk.apply(m, {s.name: 0.05 for s in found})
    assert any("saving it raises" in n for n in report.notes), report.notes
    with pytest.raises(Exception, match="keeps its guided dropout sites"):
        report.model.save(os.path.join(tmp_path, "hyper.keras"))


def test_a_residual_add_layer_of_the_graph_is_a_residual_join():
    """ResNet's blocks join with ``keras.layers.Add`` in the functional graph: a leaf layer whose
    call is one addition is an addition (from its op types)."""
    inp = keras.Input((4,))
    h = keras.layers.Dense(4, name="stem")(inp)
    b = keras.layers.Dense(4, name="branch")(keras.layers.Activation("relu", name="act")(h))
    out = keras.layers.Dense(2, name="head")(keras.layers.Add(name="join")([h, b]))
    found, _ = quiet_sites(keras.Model(inp, out))
    assert [(s.name, s.params) for s in found] == [
        ("stem.gd_dropout", ("stem.weight", "stem.bias")),
        ("branch.gd_dropout", ("branch.weight", "branch.bias")),
    ]


class DropFirstEncoder(keras.layers.Layer):
    """ViT's encoder: a layer whose first call drops its input (the embeddings another layer
    of the graph computed), then a residual block."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.drop = keras.layers.Dropout(0.1, name="drop")
        self.fc = keras.layers.Dense(8, name="fc")
        self.fc_drop = keras.layers.Dropout(0.1, name="fc_drop")

    def call(self, x, training=None):
        x = self.drop(x, training=training)
        return x + self.fc_drop(self.fc(x), training=training)


def test_a_dropout_first_in_a_layer_guards_what_the_graph_computed_before_it():
    """ViTBackbone's ``vit_encoder.dropout`` guarded nothing (the layer-order rule stops at the
    layer's start), so ``profile`` failed on a NaN score; the traced dataflow gives it the
    embeddings it drops."""
    ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="embed")(ids)
    m = keras.Model(ids, keras.layers.Dense(2, name="head")(DropFirstEncoder(name="enc")(h)))
    found, _ = quiet_sites(m)
    by = {s.name: s.params for s in found}
    assert by == {"enc.drop": ("embed.weight",), "enc.fc_drop": ("fc.weight", "fc.bias")}


def test_apply_again_on_the_guided_model_sets_the_inserted_sites():
    m = model()
    found, _ = quiet_sites(m)
    first = gdk.apply(m, {s.name: 0.05 for s in found}).model
    given = {s.name: 0.01 * (i + 1) for i, s in enumerate(found)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gdk.apply(first, given)
    assert {r.site: r.old_p for r in report.rows} == {s.name: 0.05 for s in found}
    idx = ModelIndex.build(report.model)
    called = called_layers(report.model, idx.site_layers, example=tokens())
    assert {idx.site_name(x): float(x.rate) for x in idx.site_layers if id(x) in called} == given
