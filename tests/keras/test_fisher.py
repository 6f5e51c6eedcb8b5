"""Per-sample Fisher on Keras models against a slow reference loop; profile()."""

from __future__ import annotations

import numpy as np
import pytest
from keras_helpers import BACKEND, batches, reference_fisher, sce

import gd_core
from gd_core.errors import ArgumentError, NonFiniteGradientError

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")


def callable_loss(model, batch):
    x, y = batch
    logits = model(x, training=False)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


@pytest.fixture(scope="module")
def model():
    from keras_helpers import build_mlp

    return build_mlp(seed=3)


def assert_close(result, reference, rtol=1e-4):
    assert sorted(result) == sorted(reference)
    for name, ref in reference.items():
        assert result[name].dtype == np.float64
        np.testing.assert_allclose(result[name], ref, rtol=rtol, atol=1e-9, err_msg=name)


def test_fisher_equals_the_per_sample_reference_loop(model, toy):
    x, y = toy
    x, y = x[:24], y[:24]
    samples = list(zip(x, y, strict=True))
    reference = reference_fisher(model, samples, callable_loss)
    result = gdk.estimate_fisher(model, batches(x, y, 16), callable_loss, progress=False)
    assert isinstance(result, gd_core.FisherResult)
    assert result.count == 24 and result.skipped == 0
    assert result.accumulator.count == 24
    assert_close(result, reference)
    # a keras loss object with reduction=None on (x, y) batches gives the same
    again = gdk.estimate_fisher(model, batches(x, y, 12), sce(), progress=False)
    assert_close(again, reference)


def test_max_samples_stops_mid_batch(model, toy):
    x, y = toy
    reference = reference_fisher(model, list(zip(x[:13], y[:13], strict=True)), callable_loss)
    result = gdk.estimate_fisher(
        model, batches(x[:32], y[:32], 8), sce(), max_samples=13, progress=False
    )
    assert result.count == 13
    assert_close(result, reference)
    chunked = gdk.estimate_fisher(
        model, batches(x[:32], y[:32], 16), sce(), max_samples=13, chunk_size=4, progress=False
    )
    assert chunked.count == 13
    assert_close(chunked, reference)


def test_tf_data_datasets_are_accepted(model, toy):
    tf = pytest.importorskip("tensorflow")
    x, y = toy
    ds = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(8)
    result = gdk.estimate_fisher(model, ds, "sparse_categorical_crossentropy", progress=False)
    reference = reference_fisher(
        model,
        list(zip(x[:16], y[:16], strict=True)),
        lambda m, b: keras.losses.sparse_categorical_crossentropy(b[1], m(b[0], training=False)),
    )
    assert result.count == 16
    assert_close(result, reference)


def test_non_finite_samples_raise_or_are_skipped(model, toy):
    x, y = toy
    x = x[:12].copy()
    x[5, 0] = np.nan
    data = batches(x, y[:12], 6)
    with pytest.raises(NonFiniteGradientError, match="on_nonfinite='skip'"):
        gdk.estimate_fisher(model, data, sce(), progress=False)
    result = gdk.estimate_fisher(model, data, sce(), progress=False, on_nonfinite="skip")
    assert (result.count, result.skipped) == (11, 1)
    keep = [i for i in range(12) if i != 5]
    reference = reference_fisher(model, [(x[i], y[i]) for i in keep], callable_loss)
    assert_close(result, reference)


@pytest.mark.single_backend
def test_bad_losses_and_datasets_are_explained(model, toy):
    x, y = toy
    data = batches(x[:8], y[:8], 8)

    def batch_mean(m, batch):
        return keras.ops.mean(callable_loss(m, batch))

    with pytest.raises(ArgumentError, match="1-D tensor of per-sample losses"):
        gdk.estimate_fisher(model, data, batch_mean, progress=False)
    reduced = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ArgumentError, match="reduction=None"):
        gdk.estimate_fisher(model, data, reduced, progress=False)
    with pytest.raises(ArgumentError, match="loss: expected a callable"):
        gdk.estimate_fisher(model, data, 3, progress=False)
    with pytest.raises(ArgumentError, match="batches: expected at least one batch"):
        gdk.estimate_fisher(model, [], sce(), progress=False)
    with pytest.raises(ArgumentError, match="batches: expected an iterable"):
        gdk.estimate_fisher(model, 5, sce(), progress=False)
    with pytest.raises(ArgumentError, match=r"\(x, y\) batches"):
        gdk.estimate_fisher(model, [x[:4]], sce(), progress=False)
    with pytest.raises(ArgumentError, match="max_samples"):
        gdk.estimate_fisher(model, data, sce(), max_samples=0, progress=False)
    with pytest.raises(ArgumentError, match="chunk_size"):
        gdk.estimate_fisher(model, data, sce(), chunk_size=0, progress=False)
    with pytest.raises(ArgumentError, match="on_nonfinite"):
        gdk.estimate_fisher(model, data, sce(), on_nonfinite="ignore", progress=False)


def test_profile_aggregates_fisher_over_sites(model, toy, tmp_path):
    x, y = toy
    data = batches(x[:32], y[:32], 16)
    prof = gdk.profile(model, data, sce(), progress=False)
    fisher = gdk.estimate_fisher(model, data, sce(), progress=False)
    assert prof.site_names == ["enc0_dropout", "enc1_dropout"]
    np.testing.assert_allclose(prof.scores, gd_core.aggregate(fisher, gdk.sites(model)), rtol=1e-12)
    assert prof.metadata["framework"] == "keras" and prof.metadata["backend"] == BACKEND
    assert prof.metadata["samples"] == 32
    engine = {"tensorflow": "per_sample", "torch": "vmap"}[BACKEND]
    assert prof.metadata["fisher_engine"] == engine
    assert prof.metadata.get("fisher_fallback", {}) == {}
    assert prof.fingerprint == gdk.fingerprint(model)
    assert set(prof.unit_scores) == {"enc0_dropout", "enc1_dropout"}
    assert prof.unit_scores["enc0_dropout"].shape == (8,)
    mapped = gdk.profile(
        model, data, sce(), progress=False, sites={"enc1_dropout": ["classifier.weight"]}
    )
    assert mapped.site("enc1_dropout").params == ("classifier.weight",)
    assert mapped.scores[1] == pytest.approx(fisher["classifier.weight"].mean())
    loaded = gd_core.SensitivityProfile.load(prof.save(tmp_path / "mlp.profile.npz"))
    report = gdk.apply(model, loaded, granularity="unit")
    new = report.model
    assert sorted(report.probabilities().values()) == [0.0, 0.1]
    p_site = report.probabilities()
    for name, p in p_site.items():
        layer = new.get_layer(name)
        assert layer.rate == pytest.approx(p)
        if p > 0:
            assert len(layer.rates) == 8 and np.mean(layer.rates) == pytest.approx(p)
