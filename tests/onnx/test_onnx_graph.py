"""ONNX adapter on hand-built graphs: sites, rewriting, repairs, errors, run-time ratios, Fisher.

No torch needed: the graphs are built with onnx.helper and the Fisher reference is NumPy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import adapters.onnx as ao  # noqa: E402
from adapters.onnx.graph import example_model  # noqa: E402
from gd_core import (  # noqa: E402
    ArgumentError,
    Fingerprint,
    NonFiniteGradientError,
    NoSitesError,
    ProfileMismatchError,
    Schedule,
    SensitivityProfile,
    Site,
    binomial_halfwidth,
)

ort = pytest.importorskip("onnxruntime")


def _ratio_of(model, node_name):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return node.input[1], float(inits[node.input[1]]) if node.input[1] in inits else None


def _identity_dropout(ratio: float = 0.5, n: int = 20000):
    """x -> Identity -> Dropout(ratio, training_mode=True) -> y."""
    nodes = [
        helper.make_node("Identity", ["x"], ["h"], name="/pre/Identity"),
        helper.make_node("Constant", [], ["r"], value=numpy_helper.from_array(np.float32(ratio))),
        helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Dropout", ["h", "r", "t"], ["y"], name="/drop/Dropout", seed=3),
    ]
    graph = helper.make_graph(
        nodes,
        "identity_dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)


def _profile(site_names, params, shapes, scores_from=None):
    """A profile over ``site_names`` (one guarded parameter each) with synthetic Fisher."""
    rng = np.random.default_rng(1)
    sites = [Site(s, (p,)) for s, p in zip(site_names, params, strict=True)]
    fisher = {p: rng.uniform(0.1, 1.0, size=shapes[p]) for p in params}
    if scores_from is not None:
        fisher = {p: np.full(shapes[p], v) for p, v in zip(params, scores_from, strict=True)}
    return SensitivityProfile.from_fisher(
        fisher, sites, fingerprint=Fingerprint.from_shapes(shapes)
    )


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def test_import_does_not_pull_in_torch_or_tensorflow():
    code = (
        "import sys, adapters.onnx; "
        "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, timeout=120, cwd=root
    )


def test_sites_parameters_and_fingerprint_use_canonical_torch_names():
    m = example_model()
    found = ao.sites(m)
    assert [s.name for s in found] == ["dropout", "head_drop"]
    assert found[0].params == ("dense.weight", "dense.bias")
    assert found[1].params == ("head.weight", "head.bias")
    assert all(s.kind == "node" for s in found)
    assert found[0].units == 4
    params = {p.onnx_name: p for p in ao.parameters(m)}
    assert params["onnx::MatMul_7"].name == "dense.weight"
    assert params["onnx::MatMul_7"].transposed and "transposed" in params["onnx::MatMul_7"].note
    assert not params["head.weight"].transposed  # Gemm(transB=1) keeps torch layout
    assert "shared_ratio" not in params and "train" not in params
    fp = dict(ao.fingerprint(m).params)
    assert fp == {"dense.weight": (4, 4), "dense.bias": (4,), "head.weight": (2, 4),
                  "head.bias": (2,)}  # fmt: skip


def test_functional_dropout_is_named_after_its_module_and_repeated_calls_share_a_site():
    nodes = [
        helper.make_node("Dropout", ["x"], ["a"], name="/enc/attn/Dropout"),
        helper.make_node("Dropout", ["a"], ["b"], name="/enc/dropout/Dropout"),
        helper.make_node("Dropout", ["b"], ["y"], name="/enc/dropout/Dropout_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)
    assert ao.site_nodes(m) == {
        "enc.attn.dropout": ["/enc/attn/Dropout"],
        "enc.dropout": ["/enc/dropout/Dropout", "/enc/dropout/Dropout_1"],
    }


def test_no_dropout_nodes_raise_no_sites_error_naming_the_fix():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)
    with pytest.raises(NoSitesError, match="TrainingMode.TRAINING"):
        ao.sites(m)
    with pytest.raises(NoSitesError, match="model: "):
        ao.apply(m, {"x": 0.1})


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------
def test_apply_gives_each_node_its_own_ratio_and_never_mutates_a_shared_one():
    m = example_model(ratio=0.1)
    before = m.SerializeToString()
    report = ao.apply(m, {"dropout": 0.0, "head_drop": 0.2})
    out = report.model
    assert m.SerializeToString() == before  # the input model is untouched
    assert _ratio_of(out, "/dropout/Dropout") == ("dropout.ratio", 0.0)
    name, value = _ratio_of(out, "/head_drop/Dropout")
    assert name == "head_drop.ratio" and value == pytest.approx(0.2)
    assert "shared_ratio" not in {t.name for t in out.graph.initializer}  # unused: pruned
    assert report.probabilities() == {"dropout": 0.0, "head_drop": 0.2}
    assert [r.old_p for r in report] == [0.1, 0.1]
    onnx.checker.check_model(out, full_check=True)


def test_a_shared_ratio_still_used_elsewhere_is_kept_unchanged():
    m = example_model(ratio=0.1)
    m.graph.node.append(helper.make_node("Mul", ["y", "shared_ratio"], ["z"], name="/scale/Mul"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 2]))
    out = ao.apply(m, {"dropout": 0.05, "head_drop": 0.0}).model
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert float(inits["shared_ratio"]) == pytest.approx(0.1)
    assert float(inits["dropout.ratio"]) == pytest.approx(0.05)


def test_apply_twice_replaces_its_own_ratios_and_can_switch_to_inputs():
    once = ao.apply(example_model(), {"dropout": 0.02, "head_drop": 0.04}).model
    twice = ao.apply(once, {"dropout": 0.07, "head_drop": 0.0}).model
    names = [t.name for t in twice.graph.initializer]
    assert names.count("dropout.ratio") == 1
    assert _ratio_of(twice, "/dropout/Dropout")[1] == pytest.approx(0.07)
    report = ao.apply(twice, {"dropout": 0.07, "head_drop": 0.0}, ratios_as_inputs=True)
    as_inputs = report.model
    assert "dropout.ratio" not in {t.name for t in as_inputs.graph.initializer}
    assert [i.name for i in as_inputs.graph.input] == ["x", "dropout.ratio", "head_drop.ratio"]
    assert report.ratio_inputs == {"dropout": "dropout.ratio", "head_drop": "head_drop.ratio"}


def test_missing_policies_for_sites_the_profile_lacks():
    m = example_model(ratio=0.1)
    keep = ao.apply(m, {"dropout": 0.0})
    assert keep["head_drop"].new_p == pytest.approx(0.1) and keep["head_drop"].source == "keep"
    upper = ao.apply(m, {"dropout": 0.0}, mapping={"p_upper": 0.3}, missing="upper")
    assert upper["head_drop"].new_p == pytest.approx(0.3) and upper["head_drop"].source == "upper"
    with pytest.raises(ProfileMismatchError, match="missing='keep'"):
        ao.apply(m, {"dropout": 0.0}, missing="error")


def test_profile_is_renamed_applied_and_absent_sites_are_reported():
    shapes = {"model.dense.weight": (4, 4), "model.head.weight": (2, 4), "model.attn.q": (3,)}
    prof = _profile(
        ["model.dropout", "model.head_drop", "model.attn.dropout"],
        ["model.dense.weight", "model.head.weight", "model.attn.q"],
        shapes,
        scores_from=[5.0, 1.0, 3.0],
    )
    report = ao.apply(example_model(), prof)
    out = report.model
    expected = {k.removeprefix("model."): v for k, v in prof.probabilities().items()}
    assert report.probabilities() == {s: expected[s] for s in ("dropout", "head_drop")}
    assert report.absent == ["attn.dropout"]
    # issue 24: the true reason (its parameter is not in the graph), not "folded away"
    assert "not exported" in report.absent_reasons["attn.dropout"]
    assert any("(not exported)" in n for n in report.notes)
    assert _ratio_of(out, "/head_drop/Dropout")[1] == pytest.approx(expected["head_drop"])


def test_profile_of_another_model_is_refused_unless_not_strict():
    shapes = {"dense.weight": (5, 4), "head.weight": (2, 4)}  # dense is wider than here
    prof = _profile(["dropout", "head_drop"], ["dense.weight", "head.weight"], shapes)
    with pytest.raises(ProfileMismatchError, match=r"dense.weight: shape \(5, 4\)"):
        ao.apply(example_model(), prof)
    ao.apply(example_model(), prof, strict=False)  # accepted when asked
    other = _profile(["enc.layer.0.drop", "enc.layer.1.drop"], ["a.w", "b.w"], {"a.w": (2,),
                     "b.w": (2,)})  # fmt: skip
    with pytest.raises(ProfileMismatchError, match="match this model"):
        ao.apply(example_model(), other)
    foreign = _profile(["dropout", "head_drop"], ["x.w", "y.w"], {"x.w": (4,), "y.w": (4,)})
    with pytest.raises(ProfileMismatchError, match="none of its parameters"):
        ao.apply(example_model(), foreign)


def test_ir_version_ort_cannot_load_gives_a_clear_error(tmp_path):
    m = example_model()
    m.ir_version = 11
    for call in (
        lambda: ao.apply(m, {"dropout": 0.1}),
        lambda: ao.prepare_for_training(m),
        lambda: ao.make_artifacts(m, tmp_path),
        lambda: ao.check_ort_compatible(m),
    ):
        with pytest.raises(ArgumentError, match=r"IR version 11.*onnx==1\.17"):
            call()


def test_old_opset_without_dropout_inputs_is_refused():
    m = example_model()
    m.opset_import[0].version = 11
    with pytest.raises(ArgumentError, match="opset >= 12"):
        ao.apply(m, {"dropout": 0.1})


def test_bad_profile_values_are_refused():
    with pytest.raises(ArgumentError, match=r"profile\['dropout'\]"):
        ao.apply(example_model(), {"dropout": 1.5})
    with pytest.raises(ArgumentError, match="SensitivityProfile"):
        ao.apply(example_model(), [0.1, 0.2])


# ---------------------------------------------------------------------------------------------
# repairs
# ---------------------------------------------------------------------------------------------
def test_prepare_for_training_declares_layernorm_and_dropout_outputs_once():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="/ln/LN", axis=-1),
        helper.make_node("Dropout", ["h", "r"], ["y"], name="/attn/Dropout"),
    ]
    inits = [
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.float32(0.1), "r"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fixed, changes = ao.prepare_for_training(m)
    assert len(fixed.graph.node[0].output) == 3 and len(fixed.graph.node[1].output) == 2
    assert len(changes) == 3
    assert ["LayerNormalization" in c for c in changes].count(True) == 1
    assert any("mask output" in c for c in changes)
    assert any("inert" in c and "ratio set to 0" in c for c in changes)
    assert _ratio_of(fixed, "/attn/Dropout")[1] == 0.0
    assert len(m.graph.node[0].output) == 1  # input untouched
    again, more = ao.prepare_for_training(fixed)
    assert more == [] and again.SerializeToString() == fixed.SerializeToString()
    onnx.checker.check_model(fixed, full_check=True)


def test_apply_activates_inert_dropout_and_reports_repairs():
    m = example_model()
    node = m.graph.node[2]
    del node.input[2:]  # no training_mode: inert, as torch's SDPA export emits it
    del node.output[1:]
    report = ao.apply(m, {"dropout": 0.05, "head_drop": 0.0})
    out = report.model
    assert report.activated == ["dropout"]
    assert report["dropout"].old_p == 0.0 and "activated" in report["dropout"].note
    fixed = next(n for n in out.graph.node if n.name == "/dropout/Dropout")
    assert len(fixed.input) == 3 and len(fixed.output) == 2
    assert any("mask" in c for c in report.changes)
    kept = ao.apply(m, {"dropout": 0.05}, activate=False)
    assert kept.activated == [] and "inert" in kept["dropout"].note
    assert kept["dropout"].new_p == 0.0 and any("ratio set to 0" in c for c in kept.changes)


# ---------------------------------------------------------------------------------------------
# run time
# ---------------------------------------------------------------------------------------------
def test_ratios_as_inputs_change_the_drop_rate_at_run_time():
    n = 20000
    report = ao.apply(_identity_dropout(0.5, n), {"drop": 0.3}, ratios_as_inputs=True)
    m = report.model
    assert report.ratio_inputs == {"drop": "drop.ratio"}
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones(n, np.float32)
    for p in (0.1, 0.5):
        (y,) = sess.run(None, {"x": x, "drop.ratio": np.array(p, np.float32)})
        dropped = float(np.mean(y == 0))
        assert abs(dropped - p) <= binomial_halfwidth(n, p)
        np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - p), rtol=1e-6)


def test_ratio_feeds_follow_the_report_and_a_schedule():
    report = ao.apply(example_model(), {"dropout": 0.08, "head_drop": 0.02},
                      ratios_as_inputs=True)  # fmt: skip
    feeds = ao.ratio_feeds(report, schedule=Schedule("linear_warmup", steps=4), step=1)
    assert set(feeds) == {"dropout.ratio", "head_drop.ratio"}
    assert float(feeds["dropout.ratio"]) == pytest.approx(0.02)
    assert feeds["dropout.ratio"].dtype == np.float32 and feeds["dropout.ratio"].shape == ()
    constant = ao.apply(example_model(), {"dropout": 0.08})
    with pytest.raises(ArgumentError, match="ratios_as_inputs=True"):
        ao.ratio_feeds(constant)


# ---------------------------------------------------------------------------------------------
# Fisher (NumPy reference) and artifacts
# ---------------------------------------------------------------------------------------------
def _numpy_fisher(m, x, t):
    """Per-sample squared gradients of mean((y - t)^2) for the example model, dropout off."""
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}
    w1, b1, w2, b2 = w["onnx::MatMul_7"], w["dense.bias"], w["head.weight"], w["head.bias"]
    sums = {"dense.weight": 0.0, "dense.bias": 0.0, "head.weight": 0.0, "head.bias": 0.0}
    for xi, ti in zip(x.astype(np.float64), t.astype(np.float64), strict=True):
        h = xi @ w1 + b1
        y = h @ w2.T + b2
        dy = 2.0 * (y - ti) / y.size
        dh = dy @ w2
        grads = {
            "head.weight": np.outer(dy, h),
            "head.bias": dy,
            "dense.weight": np.outer(dh, xi),  # torch layout [out, in]
            "dense.bias": dh,
        }
        for k, g in grads.items():
            sums[k] = sums[k] + g * g
    return {k: v / len(x) for k, v in sums.items()}


def test_estimate_fisher_matches_a_numpy_reference_in_torch_layout():
    m = example_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    t = rng.normal(size=(6, 2)).astype(np.float32)
    fisher = ao.estimate_fisher(m, [{"x": x[:4], "target": t[:4]}, (x[4:], t[4:])], loss="mse")
    ref = _numpy_fisher(m, x, t)
    assert fisher.count == 6 and fisher.skipped == 0
    assert set(fisher) == set(ref)
    for k in ref:
        np.testing.assert_allclose(fisher[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_fisher_non_finite_policy():
    x = np.ones((3, 4), np.float32)
    x[1, 0] = np.nan
    batches = [{"x": x, "target": np.zeros((3, 2), np.float32)}]
    with pytest.raises(NonFiniteGradientError, match="on_nonfinite='skip'"):
        ao.estimate_fisher(example_model(), batches, loss="mse")
    f = ao.estimate_fisher(example_model(), batches, loss="mse", on_nonfinite="skip")
    assert (f.count, f.skipped) == (2, 1)


def test_fisher_from_artifacts_with_ratio_inputs_equals_fisher_from_the_model(tmp_path):
    rng = np.random.default_rng(2)
    batches = [{"x": rng.normal(size=(5, 4)).astype(np.float32),
                "target": rng.normal(size=(5, 2)).astype(np.float32)}]  # fmt: skip
    m = ao.apply(example_model(), {"dropout": 0.3, "head_drop": 0.3}, ratios_as_inputs=True).model
    art = ao.make_artifacts(m, tmp_path / "inputs", loss="mse")
    assert art.ratio_inputs == {"dropout": "dropout.ratio", "head_drop": "head_drop.ratio"}
    from_dir = ao.estimate_fisher(tmp_path / "inputs", batches)
    from_model = ao.estimate_fisher(m, batches, loss="mse")
    assert set(from_dir) == set(from_model)
    for k in from_model:
        np.testing.assert_allclose(from_dir[k], from_model[k], rtol=1e-5, atol=1e-9)
    fixed = ao.apply(example_model(), {"dropout": 0.3, "head_drop": 0.3}).model
    ao.make_artifacts(fixed, tmp_path / "fixed", loss="mse")
    with pytest.raises(ArgumentError, match="ratios_as_inputs=True"):
        ao.estimate_fisher(tmp_path / "fixed", batches)


def test_profile_from_onnx_applies_back_to_the_same_graph():
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(size=(4, 4)).astype(np.float32),
                "target": rng.normal(size=(4, 2)).astype(np.float32)}]  # fmt: skip
    prof = ao.profile(example_model(), batches, loss="mse")
    assert prof.site_names == ["dropout", "head_drop"]
    assert prof.metadata["samples"] == 4 and prof.fingerprint == ao.fingerprint(example_model())
    report = ao.apply(example_model(), prof)
    assert report.probabilities() == pytest.approx(prof.probabilities())
    assert sorted(report.probabilities().values()) == [0.0, 0.1]


def test_make_artifacts_rejects_unknown_names_and_losses(tmp_path):
    with pytest.raises(ArgumentError, match="requires_grad"):
        ao.make_artifacts(example_model(), tmp_path, requires_grad=["nope.weight"])
    with pytest.raises(ArgumentError, match="loss"):
        ao.make_artifacts(example_model(), tmp_path, loss="hinge")
    art = ao.make_artifacts(example_model(), tmp_path, "mse", requires_grad=["dense.weight"])
    assert art.requires_grad == ["onnx::MatMul_7"]
    assert art.params == {"onnx::MatMul_7": ["dense.weight", True]}
    assert ao.Artifacts.load(tmp_path).params == art.params
    assert not any(p.name.startswith(".gd-artifacts") for p in tmp_path.iterdir())


def test_seed_makes_masks_reproducible_and_distinct_per_seed():
    def mask(seed: int) -> np.ndarray:
        m = ao.apply(_identity_dropout(0.5, 1000), {"drop": 0.5}, seed=seed).model
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": np.ones(1000, np.float32)})[0] == 0

    assert np.array_equal(mask(7), mask(7))
    assert not np.array_equal(mask(7), mask(8))


def test_site_mapping_overrides_guarded_parameters_and_reaches_the_profile():
    m = example_model()
    found = ao.sites(m, {"head_drop": ["dense.bias", "head.weight"]})
    assert found[1].params == ("dense.bias", "head.weight") and found[0].params[0] == "dense.weight"
    found = ao.sites(m, lambda s: ["onnx::MatMul_7"] if s == "dropout" else None)
    assert found[0].params == ("dense.weight",)  # ONNX names map to canonical ones
    with pytest.raises(ArgumentError, match="site names"):
        ao.sites(m, {"nope": ["dense.bias"]})
    with pytest.raises(ArgumentError, match=r"mapping\['dropout'\]"):
        ao.sites(m, {"dropout": ["missing.weight"]})
    batches = [{"x": np.ones((2, 4), np.float32), "target": np.zeros((2, 2), np.float32)}]
    prof = ao.profile(m, batches, loss="mse", sites={"dropout": ["dense.bias"]})
    assert prof.site("dropout").params == ("dense.bias",)
    assert set(prof.tensor_means) == {"dense.bias", "head.weight", "head.bias"}


def test_no_profile_is_refused_naming_the_command(tmp_path, monkeypatch):
    from gd_core import ProfileNotFoundError

    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    with pytest.raises(ProfileNotFoundError, match="gd profile --model .*gd apply-onnx"):
        ao.apply(example_model(ratio=0.1))
