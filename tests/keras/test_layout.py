"""The Keras binding's boundary is the canonical (torch) layout: fingerprint, Fisher, unit axes
and ``load_state_dict`` (the conformance suite compares the same against the torch adapter)."""

from __future__ import annotations

import numpy as np
import pytest
from keras_helpers import MLP_TORCH_SHAPES, build_mlp

from gd_core.errors import ArgumentError

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")

TORCH_SHAPES = MLP_TORCH_SHAPES


def torch_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype("float32") for n, s in TORCH_SHAPES.items()}


def numpy_forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """build_mlp's forward pass written with torch-layout weights (x @ W.T + b)."""
    h = np.tanh(x @ w["enc0_dense.weight"].T + w["enc0_dense.bias"])
    h = np.tanh(h @ w["enc1_dense.weight"].T + w["enc1_dense.bias"])
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-3) * w["enc1_norm.weight"] + w["enc1_norm.bias"]
    return h @ w["classifier.weight"].T + w["classifier.bias"]


def test_load_state_dict_takes_torch_layout_and_the_model_computes_with_it():
    model, state = build_mlp(), torch_state()
    assert gdk.load_state_dict(model, state) == gdk.LoadedKeys([], [])
    kernel = keras.ops.convert_to_numpy(model.get_layer("enc0_dense").kernel)
    np.testing.assert_array_equal(kernel, state["enc0_dense.weight"].T)  # Keras keeps (in, out)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    got = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, numpy_forward(state, x), rtol=1e-4, atol=1e-5)
    assert dict(gdk.fingerprint(model).params) == TORCH_SHAPES


def _kernel(model: keras.Model, layer: str) -> np.ndarray:
    return keras.ops.convert_to_numpy(model.get_layer(layer).kernel).copy()


def test_load_state_dict_errors_name_missing_unexpected_and_misshaped_weights():
    model = build_mlp()
    before = _kernel(model, "enc0_dense")
    state = torch_state()
    del state["enc0_dense.bias"]
    with pytest.raises(ArgumentError, match=r"state_dict: expected .* every weight.*1 weight\(s\)"
                       r" of the model missing, 0 key\(s\) unexpected.*add arrays for "
                       r"\['enc0_dense.bias'\].*strict=False"):  # fmt: skip
        gdk.load_state_dict(model, state)
    state = {**torch_state(), "embeddings.position_ids": np.arange(4)}
    with pytest.raises(ArgumentError, match=r"0 weight\(s\) of the model missing, 1 key\(s\) "
                       r"unexpected.*drop \['embeddings.position_ids'\]"):  # fmt: skip
        gdk.load_state_dict(model, state)
    state = torch_state()
    state["classifier.weight"] = state["classifier.weight"].T  # Keras layout given by mistake
    with pytest.raises(ArgumentError, match=r"state_dict\['classifier.weight'\]: expected an "
                       r"array of the canonical \(torch-layout\) shape \(3, 8\), received "
                       r"'shape \(8, 3\)'"):  # fmt: skip
        gdk.load_state_dict(model, state)
    np.testing.assert_array_equal(_kernel(model, "enc0_dense"), before)  # nothing was assigned
    with pytest.raises(ArgumentError, match="state_dict: expected a mapping"):
        gdk.load_state_dict(model, list(torch_state().items()))


def test_load_state_dict_strict_false_loads_a_part_and_says_what_it_skipped():
    model = build_mlp()
    bias_before = keras.ops.convert_to_numpy(model.get_layer("classifier").bias).copy()
    state = torch_state()
    part = {"enc0_dense.weight": state["enc0_dense.weight"], "step": 3}
    loaded = gdk.load_state_dict(model, part, strict=False)
    assert loaded.unexpected_keys == ["step"]
    assert loaded.missing_keys == [n for n in TORCH_SHAPES if n != "enc0_dense.weight"]
    np.testing.assert_array_equal(_kernel(model, "enc0_dense"), state["enc0_dense.weight"].T)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("classifier").bias), bias_before
    )


def test_convolutions_are_reported_and_loaded_in_torch_layout():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 6, 3)
            self.deconv = torch.nn.ConvTranspose1d(6, 5, 3)

        def forward(self, x):
            return self.deconv(torch.tanh(self.conv(x)))

    torch.manual_seed(0)
    net = Net().eval()
    inp = keras.Input((9, 4))
    h = keras.layers.Conv1D(6, 3, activation="tanh", name="conv")(inp)
    model = keras.Model(inp, keras.layers.Conv1DTranspose(5, 3, name="deconv")(h))
    assert gdk.load_state_dict(model, net.state_dict()) == gdk.LoadedKeys([], [])  # tensors too
    shapes = {n: tuple(t.shape) for n, t in net.state_dict().items()}
    assert dict(gdk.fingerprint(model).params) == shapes  # (out, in, k) and (in, out, k)
    x = np.random.default_rng(2).normal(size=(2, 9, 4)).astype("float32")
    with torch.no_grad():
        want = net(torch.tensor(x).transpose(1, 2)).transpose(1, 2).numpy()  # channels last
    got = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unit_axes_and_fisher_are_in_torch_layout(toy):
    model = build_mlp()
    site = gdk.sites(model)[0]
    assert site.unit_axes == {"enc0_dense.weight": 0, "enc0_dense.bias": 0}  # Linear (out, in)
    x, y = toy
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    fisher = gdk.estimate_fisher(model, [(x[:8], y[:8])], loss, progress=False)
    assert {n: a.shape for n, a in fisher.items()} == TORCH_SHAPES
    prof = gdk.profile(model, [(x[:8], y[:8])], loss, progress=False)
    np.testing.assert_allclose(  # unit j of the site is row j of the torch-layout weight
        prof.unit_scores["enc0_dropout"][:3],
        [(fisher["enc0_dense.weight"][j].mean() + fisher["enc0_dense.bias"][j]) / 2
         for j in range(3)],
        rtol=1e-12,
    )  # fmt: skip
