"""The conformance suite: every adapter against the NumPy core, on the same models and samples.

See docs/conformance.md. Parametrised over ``harness.HARNESSES``; the Keras harness runs on the
TensorFlow backend here and on the torch backend through ``test_keras_torch_backend``.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from harness import HARNESSES, Harness
from refmodels import encoder_spec, mlp_spec

from gd_core import (
    MAPPINGS,
    ArgumentError,
    FisherAccumulator,
    NoSitesError,
    ProfileMismatchError,
    SensitivityProfile,
    binomial_halfwidth,
    mean_halfwidth,
)

SPECS = {"mlp": mlp_spec(), "encoder": encoder_spec()}


@pytest.fixture(params=HARNESSES, ids=lambda h: h.name)
def harness(request) -> Harness:
    h = request.param
    if h.missing:
        pytest.skip(f"{h.name}: {h.missing}")
    return h


@pytest.fixture(params=list(SPECS), scope="module")
def spec(request):
    return SPECS[request.param]


def reference_fisher(spec) -> dict[str, np.ndarray]:
    """The reference: torch autograd one sample at a time, squared, into the core accumulator."""
    torch = pytest.importorskip("torch")
    from refmodels import build_torch

    model = build_torch(spec, torch.float64).eval()
    acc = FisherAccumulator()
    params = dict(model.named_parameters())
    for x, y in zip(spec.inputs, spec.labels, strict=True):
        logits = model(torch.tensor(x[None]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y]))
        grads = torch.autograd.grad(loss, list(params.values()))
        acc.add_sample({n: g.numpy() for n, g in zip(params, grads, strict=True)})
    return acc.mean()


_REF: dict[str, dict[str, np.ndarray]] = {}


def ref_fisher(spec):
    if spec.name not in _REF:
        _REF[spec.name] = reference_fisher(spec)
    return _REF[spec.name]


def assert_fisher_close(got, want, names):
    # Parameters with an (analytically) zero Fisher, such as attention key biases, carry only
    # rounding noise; the floor is relative to the largest Fisher value of the model.
    floor = 1e-7 * max(float(want[n].max()) for n in names)
    for name in names:
        w = want[name]
        g = np.asarray(got[name], dtype=np.float64)
        assert g.shape == w.shape, f"{name}: shape {g.shape} vs {w.shape}"
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=floor, err_msg=name)


# -- sites ------------------------------------------------------------------------------------
def test_same_sites_same_order_same_guards(harness, spec):
    sites = harness.sites(harness.build(spec), spec)
    assert [s.name for s in sites] == spec.sites
    for s in sites:
        assert sorted(s.params) == sorted(spec.guards[s.name]), s.name


# -- Fisher and profile -----------------------------------------------------------------------
def test_same_fisher_per_parameter_and_site(harness, spec):
    model = harness.build(spec)
    fisher = harness.fisher(model, spec)
    want = ref_fisher(spec)
    guarded = [p for s in spec.sites for p in spec.guards[s]]
    assert_fisher_close(fisher, want, guarded)
    prof = harness.profile(model, spec)
    assert prof.site_names == spec.sites
    sites = [prof.site(n) for n in spec.sites]
    expected = SensitivityProfile.from_fisher(want, sites, with_units=False).scores
    np.testing.assert_allclose(prof.scores, expected, rtol=1e-4)


# -- canonical (torch) layout -----------------------------------------------------------------
_TORCH: dict[str, tuple] = {}


def torch_reference(spec):
    """(fingerprint, sites, profile with unit scores) of the spec's torch model: what every
    binding hands out for its own replica, in the same canonical layout."""
    if spec.name not in _TORCH:
        pytest.importorskip("torch")
        from harness import TorchHarness

        t = TorchHarness()
        model = t.build(spec)
        _TORCH[spec.name] = (t.fingerprint(model), t.sites(model, spec), t.profile(model, spec))
    return _TORCH[spec.name]


def test_same_fingerprint_in_the_canonical_layout(harness, spec):
    want = torch_reference(spec)[0]
    got = harness.fingerprint(harness.build(spec))
    assert got.differences(want) == []
    assert got.digest == want.digest


def test_same_fisher_for_every_weight_in_the_canonical_layout(harness, spec):
    fisher = harness.fisher(harness.build(spec), spec)
    want = ref_fisher(spec)
    assert sorted(fisher) == sorted(want)
    assert_fisher_close(fisher, want, list(want))  # shapes and values, no conversion


def test_same_unit_axes_and_unit_scores(harness, spec):
    if harness.no_unit_axes:
        pytest.skip(harness.no_unit_axes)
    _, torch_sites, torch_profile = torch_reference(spec)
    model = harness.build(spec)
    axes = {s.name: dict(s.unit_axes) for s in harness.sites(model, spec)}
    assert axes == {s.name: dict(s.unit_axes) for s in torch_sites}
    assert any(axes.values()), "the reference models have per-unit sites"
    got = harness.profile(model, spec).unit_scores
    assert sorted(got) == sorted(torch_profile.unit_scores)
    for name, want in torch_profile.unit_scores.items():
        floor = 1e-7 * float(np.abs(want).max())
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=floor, err_msg=name)


def test_a_torch_profile_applies_to_every_replica_with_strict(harness, spec):
    """strict=True is the default: the torch profile's fingerprint matches each replica's."""
    profile = torch_reference(spec)[2]
    model = harness.apply(harness.build(spec), spec, profile, granularity="unit")
    got = harness.installed(model, spec)
    want = profile.unit_probabilities()
    for site in spec.sites:
        if site in want:
            np.testing.assert_allclose(
                np.broadcast_to(got[site], want[site].shape), want[site], atol=1e-6
            )
        else:
            assert float(np.mean(got[site])) == pytest.approx(profile.probabilities()[site])


# -- probabilities ----------------------------------------------------------------------------
MAPPING_CASES = [{"name": m, "p_lower": 0.0, "p_upper": 0.3} for m in MAPPINGS] + [
    {"name": "linear_rank", "p_lower": 0.0, "p_upper": 0.1, "target_mean": 0.1}
]


@pytest.mark.parametrize(
    "mapping", MAPPING_CASES, ids=lambda m: m["name"] + ("+mean" if m.get("target_mean") else "")
)
def test_identical_site_probabilities_for_every_mapping(harness, mapping):
    spec = SPECS["mlp"]
    profile = reference_profile(spec)
    model = harness.apply(harness.build(spec), spec, profile, mapping=mapping)
    got = harness.installed(model, spec)
    want = profile.probabilities(mapping)
    for site in spec.sites:
        assert float(np.mean(got[site])) == pytest.approx(want[site], abs=1e-6), site


def test_identical_unit_probabilities(harness):
    spec = SPECS["mlp"]
    profile = reference_profile(spec)
    model = harness.apply(harness.build(spec), spec, profile, granularity="unit")
    got = harness.installed(model, spec)
    want = profile.unit_probabilities()
    for site in spec.sites:
        np.testing.assert_allclose(
            np.broadcast_to(got[site], want[site].shape), want[site], atol=1e-6
        )


def reference_profile(spec):
    """The profile every adapter is handed: core aggregation of the reference Fisher."""
    from gd_core import Site

    fisher = ref_fisher(spec)
    sites = [
        Site(n, tuple(spec.guards[n]), 12, {p: 0 for p in spec.guards[n]})
        if spec.name == "mlp"
        else Site(n, tuple(spec.guards[n]))
        for n in spec.sites
    ]
    return SensitivityProfile.from_fisher(fisher, sites)


# -- dropout behaviour ------------------------------------------------------------------------
ROWS = 3000


def _drop_stats(harness, model, spec, site, seed=0, training=True):
    x = np.random.default_rng(5).normal(size=(ROWS, spec.inputs.shape[1]))
    i, o = harness.site_io(model, spec, site, x, seed, training)
    live = np.abs(i) > 1e-9
    return i, o, live


@pytest.mark.parametrize("granularity", ["site", "unit"])
def test_training_mode_statistics(harness, granularity):
    spec = SPECS["mlp"]
    profile = reference_profile(spec)
    mapping = {"name": "linear_rank", "p_lower": 0.1, "p_upper": 0.4}
    model = harness.apply(
        harness.build(spec), spec, profile, mapping=mapping, granularity=granularity, seed=3
    )
    probs = harness.installed(model, spec)
    for site in spec.sites:
        i, o, live = _drop_stats(harness, model, spec, site)
        p = np.broadcast_to(np.asarray(probs[site]), (i.shape[-1],))
        dropped = (np.abs(o) < 1e-12) & live
        for j in range(i.shape[-1]):
            n = int(live[:, j].sum())
            frac = dropped[:, j].sum() / n
            assert abs(frac - p[j]) <= binomial_halfwidth(n, float(p[j])), (site, j, frac, p[j])
        kept = live & ~dropped
        ratio = np.where(kept, o / np.where(live, i, 1.0), 0.0)
        np.testing.assert_allclose(
            ratio[kept], np.broadcast_to(1 / (1 - p), ratio.shape)[kept], rtol=1e-5
        )
        n = int(live.sum())
        assert abs(ratio[live].mean() - 1.0) <= mean_halfwidth(n, float(p.max())), site


def test_inference_is_identity(harness):
    spec = SPECS["mlp"]
    model = harness.apply(
        harness.build(spec),
        spec,
        reference_profile(spec),
        mapping={"name": "uniform", "p_upper": 0.5},
    )
    for site in spec.sites:
        i, o, _ = _drop_stats(harness, model, spec, site, training=False)
        np.testing.assert_array_equal(i, o)


def test_seeds(harness):
    spec = SPECS["mlp"]
    mapping = {"name": "uniform", "p_upper": 0.5}
    site = spec.sites[0]

    def mask(seed):
        model = harness.apply(
            harness.build(spec), spec, reference_profile(spec), mapping=mapping, seed=seed
        )
        _, o, _ = _drop_stats(harness, model, spec, site, seed=seed)
        return o == 0

    a, b, c = mask(11), mask(11), mask(12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.1


# -- errors -----------------------------------------------------------------------------------
def _message(fn):
    """Error type and message up to the fix; the fix, a detail naming the model's class and the
    model argument's name may be framework-specific, the rest must be identical."""
    with pytest.raises(Exception) as info:
        fn()
    text = str(info.value)
    assert "; fix: " in text, f"error without a fix: {text}"
    head = re.sub(r" \([^()]*\)$", "", text.split("; fix: ")[0])
    head = re.sub(r"^(model|model_proto): ", "<model>: ", head)  # each API's own argument name
    return type(info.value), head


def test_same_errors_for_same_bad_inputs(harness):
    spec = SPECS["mlp"]
    other = reference_profile(SPECS["encoder"])
    mine = reference_profile(spec)
    bad_p = {"name": "linear_rank", "p_lower": 0.0, "p_upper": 1.5}
    errors = {
        "other model": _message(lambda: harness.apply(harness.build(spec), spec, other)),
        "p out of range": _message(
            lambda: harness.apply(harness.build(spec), spec, mine, mapping=bad_p)
        ),
        "no sites": _message(lambda: harness.sites(harness.build(spec, dropout=False), spec)),
    }
    assert errors["other model"][0] is ProfileMismatchError
    assert issubclass(errors["p out of range"][0], ArgumentError)
    assert errors["no sites"][0] is NoSitesError
    _ERRORS.setdefault("all", {})[harness.name] = errors
    first = next(iter(_ERRORS["all"].values()))
    assert errors == first, "adapters disagree on error type or message"


_ERRORS: dict[str, dict] = {}


# -- the torch backend of Keras ---------------------------------------------------------------
@pytest.mark.slow
def test_keras_torch_backend(keras_backend_run):
    """The whole suite for the Keras harness again under Keras's torch backend, in the nested
    pytest that also reruns tests/keras under it (tests/conftest.py: one interpreter for both)."""
    pytest.importorskip("keras")
    pytest.importorskip("torch")
    if os.environ.get("KERAS_BACKEND") == "torch":
        pytest.skip("already running on the torch backend")
    cases = keras_backend_run("torch", "conformance")
    assert any("keras-torch" in test_id for test_id, _ in cases), cases
