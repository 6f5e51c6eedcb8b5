"""ONNX adapter at unit granularity: per-unit rates realised by an inverted-dropout subgraph.

A tiny hand-built graph (MatMul -> Dropout, last axis 8) and the tiny BERT export of conftest:
per-unit drop fractions and means against gd_core's bounds, eval identity, seeds, masks,
training through ORT artifacts, and the site-level fallback of attention-probability dropout.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from ort_helpers import train  # noqa: E402

import adapters.onnx as ao  # noqa: E402
from adapters.onnx import graph as g  # noqa: E402
from adapters.onnx import rewrite as rw  # noqa: E402
from gd_core import (  # noqa: E402
    ArgumentError,
    Fingerprint,
    SensitivityProfile,
    Site,
    binomial_halfwidth,
    mean_halfwidth,
)

UNITS, FEATURES, ROWS = 8, 4, 20000


# ---------------------------------------------------------------------------------------------
# the tiny graph
# ---------------------------------------------------------------------------------------------
def tiny(
    *, mode_input: bool = False, mask_output: bool = False, last: int | str = UNITS, pre="MatMul"
):
    """x[b, 4] -> MatMul(dense.weight) -> Dropout(0.1) -> y[b, 8] (+ mask, training_mode input)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(FEATURES, UNITS)).astype(np.float32) + 0.5
    mode = "train" if mode_input else "t"
    nodes = [
        helper.make_node("Constant", [], ["r"], value=numpy_helper.from_array(np.float32(0.1))),
        helper.make_node("Dropout", ["h", "r", mode], ["y", "m"], name="/drop/Dropout"),
    ]
    if pre == "MatMul":
        nodes.insert(0, helper.make_node("MatMul", ["x", "dense.weight"], ["h"], name="/dense/MM"))
    else:
        nodes.insert(0, helper.make_node(pre, ["x"], ["h"], name=f"/attn/{pre}"))
    if not mode_input:
        t = numpy_helper.from_array(np.array(True))
        nodes.insert(1, helper.make_node("Constant", [], ["t"], value=t))
    width = last
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])]
    if pre != "MatMul":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", last])]
    if mode_input:
        inputs.append(helper.make_tensor_value_info("train", TensorProto.BOOL, []))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])]
    if mask_output:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, ["batch", width]))
    inits = [numpy_helper.from_array(w, "dense.weight")] if pre == "MatMul" else []
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)


def tiny_profile(units: int = UNITS, p: float = 0.25) -> SensitivityProfile:
    """A profile of site ``drop`` with per-unit scores (unit axis 1 of dense.weight)."""
    rng = np.random.default_rng(1)
    shape = (FEATURES, units)
    fisher = {"dense.weight": rng.uniform(0.1, 1.0, size=shape)}
    site = Site("drop", ("dense.weight",), units=units, unit_axes={"dense.weight": 1})
    return SensitivityProfile.from_fisher(
        fisher,
        [site],
        fingerprint=Fingerprint.from_shapes({"dense.weight": shape}),
        mapping={"p_lower": p, "p_upper": p},
    )


def weight(model) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits["dense.weight"]


def run(model, **feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_unit_statistics(x: np.ndarray, y: np.ndarray, rates: np.ndarray) -> None:
    """Per-unit drop fractions within binomial_halfwidth, multipliers' means within
    mean_halfwidth, and kept values scaled by exactly 1 / (1 - rate)."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    assert np.all(x2 != 0)
    n = x2.shape[0]
    dropped = (y2 == 0).mean(axis=0)
    means = (y2 / x2).mean(axis=0)
    for j, r in enumerate(rates.astype(np.float64)):
        assert abs(dropped[j] - r) <= binomial_halfwidth(n, r), (j, dropped[j], r)
        assert abs(means[j] - 1.0) <= mean_halfwidth(n, r), (j, means[j], r)
        kept = y2[:, j] != 0
        np.testing.assert_allclose(y2[kept, j], x2[kept, j] / (1 - r), rtol=1e-5)


def test_tiny_graph_per_unit_rates_fractions_and_mean():
    m, prof = tiny(), tiny_profile()
    report = ao.apply(m, prof, granularity="unit", seed=11)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    assert not any(n.op_type == "Dropout" and not g.gd_role(n) for n in out.graph.node)
    rates = prof.unit_probabilities()["drop"]
    assert rates.std() > 0.05 and rates.max() > 0.4 and rates.min() == 0.0  # really per unit
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["drop.rates"], rates.astype(np.float32))
    assert report.unit_rates["drop"].shape == (UNITS,) and report.ratio_names == {
        "drop": "drop.rates"
    }
    row = report["drop"]
    assert row.units == UNITS and row.new_p == pytest.approx(0.25, abs=1e-6)
    assert row.old_p == pytest.approx(0.1) and row.note == ""
    assert report.granularity == "unit" and "units" in str(report)
    assert [p.name for p in ao.parameters(out)] == ["dense.weight"]  # rates are not trained
    x = np.ones((ROWS, FEATURES), np.float32)
    (y,) = run(out, x=x)
    assert_unit_statistics(x @ weight(m), y, rates)


def test_eval_identity_and_mask_output_follow_training_mode():
    m = tiny(mode_input=True, mask_output=True)
    report = ao.apply(m, tiny_profile(), granularity="unit", seed=0)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == ["y", "m"]
    x = np.random.default_rng(2).normal(size=(4000, FEATURES)).astype(np.float32)
    h = x @ weight(m)
    y, mask = run(out, x=x, train=np.array(False))
    np.testing.assert_array_equal(y, h)  # eval: the identity, exactly
    assert mask.dtype == bool and mask.all()
    y, mask = run(out, x=x, train=np.array(True))
    np.testing.assert_array_equal(mask, y != 0)
    assert 0 < (~mask).mean() < 0.5
    assert report.activated == []


def test_same_seed_same_mask_and_different_seed_different_mask():
    x = np.ones((2000, FEATURES), np.float32)

    def masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
        out = ao.apply(tiny(), tiny_profile(), granularity="unit", seed=seed).model
        session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0] == 0, session.run(None, {"x": x})[0] == 0

    first, second = masks(3)
    again, _ = masks(3)
    other, _ = masks(4)
    np.testing.assert_array_equal(first, again)  # a fresh session with the same seed
    assert (first != other).mean() > 0.05
    assert (first != second).mean() > 0.05  # each run of a session draws a new mask
    out = ao.apply(tiny(), tiny_profile(), granularity="unit", seed=3).model
    (noise,) = [n for n in out.graph.node if n.op_type == "RandomUniformLike"]
    assert onnx.helper.get_attribute_value(noise.attribute[0]) == 3.0


def test_node_seed_is_kept_without_seed_argument():
    m = tiny()
    drop = next(n for n in m.graph.node if n.op_type == "Dropout")
    drop.attribute.append(helper.make_attribute("seed", 42))
    out = ao.apply(m, tiny_profile(), granularity="unit").model
    (noise,) = [n for n in out.graph.node if n.op_type == "RandomUniformLike"]
    assert [(a.name, a.f) for a in noise.attribute] == [("seed", 42.0)]


def test_tiny_graph_trains_through_artifacts_and_eval_graph_is_dropout_free(tmp_path):
    m = tiny()
    out = ao.apply(m, tiny_profile(p=0.3), granularity="unit", seed=1).model
    art = ao.make_artifacts(out, tmp_path / "art", loss="mse")
    assert art.requires_grad == ["dense.weight"] and art.dropout == "constant"
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, FEATURES)).astype(np.float32)
    target = (x @ rng.normal(size=(FEATURES, UNITS))).astype(np.float32)
    module, opt, state = art.open()
    opt.set_learning_rate(0.05)
    module.train()
    losses = []
    for _ in range(40):
        module.lazy_reset_grad()
        losses.append(float(module(x, target)))
        opt.step()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    module.eval()
    trained = state.parameters["dense.weight"].data
    eval_losses = [float(module(x, target)) for _ in range(3)]
    want = float(np.mean((x @ trained - target) ** 2))
    assert eval_losses == [eval_losses[0]] * 3
    assert eval_losses[0] == pytest.approx(want, rel=1e-5)  # no dropout in the eval graph
    eval_model = onnx.load(str(art.eval_model))
    drops = [n for n in eval_model.graph.node if n.op_type == "Dropout"]
    assert drops and all(len(n.input) < 3 or not n.input[2] for n in drops)


def test_rates_as_inputs_feeds_schedules_and_fisher(tmp_path):
    m = tiny()
    report = ao.apply(m, tiny_profile(), granularity="unit", ratios_as_inputs=True, seed=2)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    assert report.ratio_inputs == {"drop": "drop.rates"}
    (rates_input,) = [i for i in out.graph.input if i.name == "drop.rates"]
    assert [d.dim_value for d in rates_input.type.tensor_type.shape.dim] == [UNITS]
    feeds = ao.ratio_feeds(report, multiplier=0.5)
    np.testing.assert_allclose(feeds["drop.rates"], report.unit_rates["drop"] * 0.5, rtol=1e-6)
    with pytest.raises(ArgumentError, match="rates of 'drop'"):
        ao.ratio_feeds(report, multiplier=3.0)
    x = np.ones((ROWS, FEATURES), np.float32)
    h = x @ weight(m)
    (y,) = run(out, x=x, **ao.ratio_feeds(report, multiplier=0.0))
    np.testing.assert_array_equal(y, h)  # rates fed as 0: no dropout
    (y,) = run(out, x=x, **feeds)
    assert_unit_statistics(h, y, feeds["drop.rates"])
    art = ao.make_artifacts(out, tmp_path / "art", loss="mse", optimizer=None)
    assert art.ratio_inputs == {"drop": "drop.rates"} and art.dropout == "inputs"
    with pytest.raises(ArgumentError, match="per-unit rate inputs"):
        ao.estimate_fisher(art, [{"x": x[:2], "target": h[:2]}])
    # given the model, the per-unit dropout is removed: the same Fisher as the original graph's
    batch = {"x": np.random.default_rng(4).normal(size=(5, FEATURES)).astype(np.float32)}
    batch["target"] = np.zeros((5, UNITS), np.float32)
    want = ao.estimate_fisher(m, [batch], loss="mse")
    got = ao.estimate_fisher(out, [batch], loss="mse")
    assert got.count == 5 and set(got) == set(want) == {"dense.weight"}
    np.testing.assert_allclose(got["dense.weight"], want["dense.weight"], rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "strict", "why"),
    [
        (lambda: tiny(pre="Softmax"), True, "attention probabilities"),
        (lambda: tiny(pre="Identity", last="features"), True, "no known unit count"),
        (lambda: tiny(last=UNITS), False, "6 unit scores"),
    ],
    ids=["softmax", "dynamic", "scores"],
)
def test_sites_without_feature_units_fall_back_to_site_level(model, strict, why):
    prof = tiny_profile(units=6) if why == "6 unit scores" else {"drop": 0.2}
    report = ao.apply(model(), prof, granularity="unit", strict=strict)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    row = report["drop"]
    assert row.units is None and row.note.startswith("site level: ") and why in row.note
    assert report.unit_rates == {} and report.ratio_names == {"drop": "drop.ratio"}
    assert [n.op_type for n in out.graph.node].count("Dropout") == 1
    assert not any(g.gd_role(n) for n in out.graph.node)
    assert "0 site(s) per unit, 1 at site level" in " ".join(report.notes)


def test_default_site_granularity_is_unchanged_and_bad_arguments_are_refused():
    m, prof = tiny(), tiny_profile()
    default = ao.apply(m, prof).model
    report = ao.apply(m, prof, granularity="site")
    site = report.model
    assert default.SerializeToString() == site.SerializeToString()
    assert report.granularity == "site" and report.unit_rates == {}
    with pytest.raises(ArgumentError, match="granularity"):
        ao.apply(m, prof, granularity="feature")
    with pytest.raises(ArgumentError, match="spread"):
        ao.apply(m, prof, granularity="unit", spread=2.0)
    unit = ao.apply(m, prof, granularity="unit").model
    with pytest.raises(ArgumentError, match="original export"):
        ao.apply(unit, prof, granularity="unit")
    # a dict profile (no unit scores): the site's p for every unit
    report = ao.apply(m, {"drop": 0.2}, granularity="unit")
    np.testing.assert_array_equal(report.unit_rates["drop"], np.full(UNITS, np.float32(0.2)))
    assert report["drop"].units == UNITS and "no unit scores" in report["drop"].note


# ---------------------------------------------------------------------------------------------
# the tiny BERT export
# ---------------------------------------------------------------------------------------------
HIDDEN = 32
ATTENTION = (
    "bert.encoder.layer.0.attention.self.dropout",
    "bert.encoder.layer.1.attention.self.dropout",
)
WATCHED = "bert.encoder.layer.0.output.dropout"


def bert_unit_profile(model) -> SensitivityProfile:
    """Every nn.Dropout guarding its parent's parameters, with per-unit (hidden) axes."""
    torch = pytest.importorskip("torch")
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    sites = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Dropout):
            continue
        parent = name.rpartition(".")[0]
        if parent:
            guarded = [f"{parent}.{n}" for n, _ in modules[parent].named_parameters()]
        else:  # the classifier's dropout guards the pooler
            guarded = [n for n in params if n.startswith("bert.pooler.")]
        if name in ATTENTION:  # the torch adapter gives attention probabilities no units
            sites.append(Site(name, tuple(guarded)))
            continue
        axes = {p: (1 if "embeddings" in p and len(params[p]) == 2 else 0) for p in guarded}
        sites.append(Site(name, tuple(guarded), HIDDEN, axes))
    rng = np.random.default_rng(0)
    fisher = {n: rng.uniform(0.01, 1.0, size=s) for n, s in params.items()}
    return SensitivityProfile.from_fisher(
        fisher, sites, fingerprint=Fingerprint.from_shapes(params), mapping={"p_upper": 0.3}
    )


@pytest.fixture(scope="module")
def bert(exported):
    model, path = exported(17, "sdpa")
    return model, path, bert_unit_profile(model)


def watch(model, site: str):
    """A copy of ``model`` that also outputs the input and output of ``site``'s unit dropout."""
    (unit,) = [u for u in rw.unit_dropouts(model) if u.site == site]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in (unit.x, unit.y):
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out, unit


def test_bert_unit_rewrite_reports_fallback_trains_and_evaluates_without_dropout(
    bert, batch, tmp_path
):
    torch = pytest.importorskip("torch")
    model, path, prof = bert
    report = ao.apply(path, prof, granularity="unit", seed=0)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    unit_p = prof.unit_probabilities()
    assert set(unit_p) == set(prof.site_names) - set(ATTENTION)
    for row in report:
        if row.site in ATTENTION:  # attention probabilities: site level, and the row says so
            assert row.units is None and "site level: attention probabilities" in row.note
            assert row.new_p == pytest.approx(prof.probabilities()[row.site], abs=1e-7)
        else:
            assert row.units == HIDDEN, row
            got = report.unit_rates[row.site]
            np.testing.assert_allclose(got, unit_p[row.site], atol=1e-7)
    assert report.activated == list(ATTENTION)  # SDPA's inert attention dropout
    assert "6 site(s) per unit, 2 at site level" in " ".join(report.notes)
    assert sorted(u.site for u in rw.unit_dropouts(out)) == sorted(unit_p)
    art = ao.make_artifacts(out, tmp_path / "art")
    assert not any(n.endswith(".rates") for n in art.requires_grad)
    losses, module, state = train(art, batch)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # the eval graph ORT derived is dropout-free: it equals torch's eval forward on the same
    # (trained) weights
    module.eval()
    eval_loss = float(module(*ao.module_inputs(module, batch)))
    trained = {n: np.asarray(p.data) for n, p in state.parameters}
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in trained:
                p.copy_(torch.from_numpy(trained[name]))
        logits = reference(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
        ).logits
        want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]))
    assert len(trained) > 30 and eval_loss == pytest.approx(float(want), rel=1e-4)


def test_bert_per_unit_fractions_mean_and_seeds(bert):
    _, path, prof = bert
    rng = np.random.default_rng(5)
    feeds = {
        "input_ids": rng.integers(1, 100, (512, 8)).astype(np.int64),
        "attention_mask": np.ones((512, 8), np.int64),
    }

    def dropped(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        report = ao.apply(path, prof, granularity="unit", seed=seed)
        out = report.model
        watched, unit = watch(out, WATCHED)
        _, x, y = run(watched, **feeds)
        return x, y, report.unit_rates[WATCHED]

    x, y, rates = dropped(7)
    assert rates.std() > 0.01
    assert_unit_statistics(x, y, rates)
    _, again, _ = dropped(7)
    _, other, _ = dropped(8)
    np.testing.assert_array_equal(y == 0, again == 0)
    assert (y == 0).any() and ((y == 0) != (other == 0)).mean() > 0.01


def test_docs_unit_section_runs(bert, batch, tmp_path, capsys):
    _, path, prof = bert
    text = (Path(__file__).resolve().parents[2] / "docs" / "onnx.md").read_text()
    section = text.split("## Unit granularity", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert block.startswith("# doc-test: skip")  # a fragment of the quickstart: run here
    shutil.copy(path, tmp_path / "model.onnx")
    scope = {"gdo": ao, "work": tmp_path, "profile": prof, "batch": batch}
    exec(compile(block, "docs/onnx.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "site level: attention probabilities" in out and "units" in out
    assert scope["report"].granularity == "unit"
