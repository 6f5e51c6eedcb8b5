"""The batched per-sample engine of adapters.onnx.estimate_fisher against the exact loop.

``adapters.onnx.fisher._PER_SAMPLE = False`` makes every parameter take the loop (one ORT train
step per sample, the path before issue 18); both must give the same Fisher diagonal.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")

import adapters.onnx as ao  # noqa: E402
from adapters.onnx import fisher as _f  # noqa: E402
from adapters.onnx import persample as _ps  # noqa: E402
from adapters.onnx.graph import example_model, numpy_helper, onnx  # noqa: E402
from gd_core.errors import NonFiniteGradientError  # noqa: E402

V, H, T = 11, 6, 5


def _both(model, batches, **kw):
    """``(per-sample result, loop result)`` of estimate_fisher on the same batches."""
    out = []
    for per_sample in (True, False):
        saved = _f._PER_SAMPLE
        _f._PER_SAMPLE = per_sample
        try:
            out.append(ao.estimate_fisher(model, list(batches), progress=False, **kw))
        finally:
            _f._PER_SAMPLE = saved
    return out


def _assert_same(new, old, rtol=1e-5):
    assert new.count == old.count and new.skipped == old.skipped
    assert set(new) == set(old)
    scale = max(float(np.max(v)) for v in old.values())
    for name in old:
        # floor: float noise of a gradient that is zero in exact arithmetic (BERT's key biases)
        np.testing.assert_allclose(new[name], old[name], rtol=rtol, atol=1e-9 * scale, err_msg=name)
    assert old.accumulator.metadata["fisher_engine"] == "loop"


def _tied_model(extra_div: bool = False):
    """ids -> Gather(E) + Gather(P, positions) -> LayerNorm -> MatMul + bias -> Relu -> Mul(s)
    -> MatMul(E^T): the embedding ``E`` is tied to the output projection (through a Transpose),
    the position table is gathered with indices that carry no batch axis, a segment table is
    sliced and added. ``extra_div``: a
    weight used by a Div, which no rule covers."""
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(1)

    def init(name, *shape, scale=0.5):
        return numpy_helper.from_array((scale * rng.normal(size=shape)).astype(np.float32), name)

    inits = [
        init("emb.weight", V, H),
        init("pos.weight", T, H),
        init("seg.weight", T + 2, H),
        init("ln.weight", H, scale=1.0),
        init("ln.bias", H),
        init("fc.weight", H, H),
        init("fc.bias", H),
        init("scale.weight", H, scale=1.0),
        numpy_helper.from_array(np.arange(T, dtype=np.int64).reshape(1, T), "positions"),
        numpy_helper.from_array(np.array([1], np.int64), "starts"),
        numpy_helper.from_array(np.array([T + 1], np.int64), "ends"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["e"], name="/emb/Gather"),
        helper.make_node("Gather", ["pos.weight", "positions"], ["p"], name="/pos/Gather"),
        helper.make_node("Add", ["e", "p"], ["h0"], name="/Add"),
        helper.make_node("Slice", ["seg.weight", "starts", "ends"], ["s"], name="/seg/Slice"),
        helper.make_node("Add", ["h0", "s"], ["h00"], name="/seg/Add"),
        helper.make_node(
            "LayerNormalization", ["h00", "ln.weight", "ln.bias"], ["h1"], name="/ln/LN", axis=-1
        ),
        helper.make_node("MatMul", ["h1", "fc.weight"], ["h2"], name="/fc/MatMul"),
        helper.make_node("Add", ["h2", "fc.bias"], ["h3"], name="/fc/Add"),
        helper.make_node("Relu", ["h3"], ["h4"], name="/Relu"),
        helper.make_node("Mul", ["h4", "scale.weight"], ["h5"], name="/scale/Mul"),
    ]
    last = "h5"
    if extra_div:
        inits.append(numpy_helper.from_array(np.full(H, 2.0, np.float32), "div.weight"))
        nodes.append(helper.make_node("Div", ["h5", "div.weight"], ["h6"], name="/div/Div"))
        last = "h6"
    nodes += [
        helper.make_node("Transpose", ["emb.weight"], ["eT"], name="/head/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", [last, "eT"], ["logits"], name="/head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", tp.INT64, ["batch", T])],
        [helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", T, V])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tied_batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "ids": rng.integers(0, V, (n, T)).astype(np.int64),
            "target": rng.normal(size=(n, T, V)).astype(np.float32),
        }
        for n in sizes
    ]


def test_tiny_bert_equals_the_loop_with_a_short_last_batch(exported, batch):
    _, path = exported(17)
    short = {k: v[:3] for k, v in batch.items()}
    new, old = _both(path, [batch, short])
    _assert_same(new, old)
    assert new.count == 11
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert new.accumulator.metadata["fisher_fallback"] == {}


def test_folded_bert_maps_transposed_weights_back(exported, batch):
    _, path = exported(14, "eager", fold=True)
    assert any(p.transposed for p in ao.parameters(path))
    new, old = _both(path, [{k: v[:5] for k, v in batch.items()}])
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_fallback"] == {}


def test_tied_embedding_position_table_layernorm_and_mul():
    model = _tied_model()
    new, old = _both(model, _tied_batches([1, 4, 4, 2]), loss="mse")  # one, full, short
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert new.accumulator.metadata["fisher_fallback"] == {}
    assert new["emb.weight"].shape == (V, H) and new.count == 11


def test_a_parameter_no_rule_covers_falls_back_and_is_reported(caplog):
    with caplog.at_level(logging.INFO, logger="adapters.onnx.fisher"):
        new, old = _both(_tied_model(extra_div=True), _tied_batches([4, 3]), loss="mse")
    _assert_same(new, old)
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert list(fallback) == ["div.weight"] and "Div node" in fallback["div.weight"]
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert "div.weight" in caplog.text and "exact per-sample loop" in caplog.text


def test_the_first_batch_check_demotes_a_wrong_rule(monkeypatch):
    real = _ps._use_grad

    def wrong(u, values, n, lo, hi):
        g = real(u, values, n, lo, hi)
        return 2 * g if u.kind == "bias" else g

    monkeypatch.setattr(_ps, "_use_grad", wrong)
    new, old = _both(_tied_model(), _tied_batches([4, 3]), loss="mse")
    _assert_same(new, old)
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert set(fallback) == {"fc.bias", "ln.bias", "seg.weight"}
    assert all("first batch's check" in why for why in fallback.values())


def _with_nan(batches, where):
    out = [dict(b) for b in batches]
    for k, row in where:
        out[k]["target"] = out[k]["target"].copy()
        out[k]["target"][row] = np.nan
    return out


@pytest.mark.parametrize("extra_div", [False, True])
def test_skip_leaves_out_exactly_the_nonfinite_samples(extra_div):
    batches = _with_nan(_tied_batches([4, 4, 3]), [(1, 2), (2, 0)])
    new, old = _both(_tied_model(extra_div), batches, loss="mse", on_nonfinite="skip")
    _assert_same(new, old)
    assert new.count == 9 and new.skipped == 2


def test_raise_names_the_nonfinite_loss_as_the_loop_does():
    batches = _with_nan(_tied_batches([4, 4]), [(1, 1)])
    _f._PER_SAMPLE, saved = True, _f._PER_SAMPLE
    try:
        with pytest.raises(NonFiniteGradientError, match="loss"):
            ao.estimate_fisher(_tied_model(), batches, loss="mse", progress=False)
    finally:
        _f._PER_SAMPLE = saved


def test_artifacts_folder_takes_the_batched_engine(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    y = np.zeros((5, 2), np.float32)
    model = ao.apply(example_model(), {"dropout": 0.1, "head_drop": 0.1}, ratios_as_inputs=True)
    art = ao.make_artifacts(model.model, tmp_path, loss="mse", optimizer=None)
    batches = [{"x": x[:3], "target": y[:3]}, {"x": x[3:], "target": y[3:]}]
    new, old = _both(art.directory, batches)
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_engine"] == "per_sample"
    assert new.accumulator.metadata["fisher_fallback"] == {}  # Gemm weight (transB) and bias


def test_profile_metadata_says_how_fisher_was_computed(exported, batch):
    _, path = exported(17)
    prof = ao.profile(path, [batch], progress=False)
    assert prof.metadata["fisher_engine"] == "per_sample"
    assert prof.metadata["fisher_fallback"] == {}


def test_a_graph_the_taps_break_takes_the_loop_and_says_so(monkeypatch):
    def broken(model, plan):
        raise RuntimeError("no taps today")

    monkeypatch.setattr(_ps._t, "add_taps", broken)
    new, old = _both(_tied_model(), _tied_batches([4, 3]), loss="mse")
    _assert_same(new, old)
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert new.accumulator.metadata["fisher_engine"] == "loop"
    assert set(fallback) == set(old) and all("no taps today" in w for w in fallback.values())


@pytest.mark.parametrize("which", ["mlp", "encoder"])
def test_conformance_fixtures_equal_the_loop(which):
    pytest.importorskip("torch", reason="torch exports the conformance fixtures")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
    import refmodels
    from harness import OnnxHarness

    spec = refmodels.mlp_spec() if which == "mlp" else refmodels.encoder_spec()
    harness = OnnxHarness()
    model = harness.build(spec)
    batch = {**harness._feed(spec), "labels": spec.labels.astype(np.int64)}
    half = len(spec.labels) // 2
    batches = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]
    new, old = _both(model, batches)
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_fallback"] == {}


def test_batches_of_one_take_the_loop_and_say_so():
    new, old = _both(_tied_model(), _tied_batches([1, 1, 1]), loss="mse")
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_engine"] == "loop"
    fallback = new.accumulator.metadata["fisher_fallback"]
    assert set(fallback) == set(old) and all("two or more" in w for w in fallback.values())


def test_chunk_size_splits_batches_without_changing_the_result():
    """``chunk_size`` (the face's memory knob) runs one train step per piece: same Fisher as
    whole batches and as the loop; pieces of one sample still count every sample."""
    batches = _tied_batches([7, 4])
    whole = ao.estimate_fisher(_tied_model(), batches, loss="mse", progress=False)
    for chunk in (3, 1):
        got = ao.estimate_fisher(
            _tied_model(), batches, loss="mse", progress=False, chunk_size=chunk
        )
        assert got.count == whole.count == 11
        for name in whole:
            np.testing.assert_allclose(got[name], whole[name], rtol=1e-5, err_msg=name)


def test_a_loss_with_ignore_index_takes_the_loop_and_says_why():
    """A mean over the targets a cross-entropy keeps gives samples unequal shares, so scaling
    output gradients by the batch size is not exact: every parameter takes the loop, reported."""
    from adapters.onnx import taps

    helper, tp = onnx.helper, onnx.TensorProto

    def training_graph(**loss_attrs):
        w = numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
            helper.make_node(
                "SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], **loss_attrs
            ),
            helper.make_node("Identity", ["logits"], ["logits_grad"]),
        ]
        out = [helper.make_tensor_value_info("loss", tp.FLOAT, [])]
        return helper.make_model(helper.make_graph(nodes, "g", [], out, [w]))

    p = taps.plan(training_graph(ignore_index=-100), ["W"], {"W": (3, 4)})
    assert not p.uses and "ignore_index" in p.fallback["W"]
    # the same loss without ignore_index: the rules apply
    assert list(taps.plan(training_graph(), ["W"], {"W": (3, 4)}).uses) == ["W"]


def test_matmul_weights_square_into_their_gradient_buffers(exported, batch, tmp_path):
    """Issue 27: a single-use MatMul weight's squared per-sample sums are fed to its gradient
    accumulator in place of the batch gradient, whose nodes are removed (the step computes the
    per-sample products instead of, not besides, the batch product); the engine reads them from
    ``state.parameters[name].grad`` and still equals the loop."""
    from adapters.onnx import taps
    from adapters.onnx.train import make_artifacts

    _, path = exported(17)
    art = make_artifacts(path, tmp_path / "art", "cross_entropy", optimizer=None)
    model = onnx.load(str(art.training_model))
    before = {o for node in model.graph.node for o in node.output}
    shapes = {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in model.graph.input
        if i.name in art.requires_grad
    }
    plan = taps.plan(model, art.requires_grad, shapes)
    taps.add_taps(model, plan)
    buffered = [n for n, us in plan.uses.items() if len(us) == 1 and us[0].sq == taps.IN_BUFFER]
    assert len(buffered) >= 6, buffered  # query/key/value/output/intermediate/... weights
    acc = {
        node.input[0]: node.input[1]
        for node in model.graph.node
        if node.op_type == "InPlaceAccumulatorV2"
    }
    outputs = {o for node in model.graph.node for o in node.output}
    for name in buffered:
        assert acc[name + "_grad.accumulation.buffer"].startswith(taps.TAP_PREFIX), name
        assert name + "_grad" in before and name + "_grad" not in outputs, name
    new, old = _both(path, [batch])
    _assert_same(new, old)
    assert new.accumulator.metadata["fisher_fallback"] == {}


def test_a_gathered_table_sums_only_its_touched_rows():
    """Issue 27: an embedding table's squared per-sample sums are handed over as its touched rows
    (scaling and accumulating them reads no other row) and equal the dense per-sample sums."""
    from adapters.onnx import taps

    rng = np.random.default_rng(3)
    n, k, vocab, width = 4, 6, 50, 3
    idx = rng.integers(0, 5, (n, k)).astype(np.int64)  # repeats within and across samples
    d = rng.normal(size=(n, k, width)).astype(np.float32)
    u = taps.Use("E", "gather", "Gather node 'g'", "y", "ids", shape=(vocab, width))
    got = _ps._gather_sparse(u, {"ids": idx, "y_grad": d}, n, (vocab, width))
    assert isinstance(got, _ps._Rows) and len(got.rows) <= 5
    want = np.zeros((vocab, width))
    for b in range(n):
        g = np.zeros((vocab, width))
        np.add.at(g, idx[b], d[b].astype(np.float64))
        want += g * g
    np.testing.assert_allclose(got.dense(), want, rtol=1e-6)
    engine = _ps.Engine.__new__(_ps.Engine)
    engine.pending = {}
    engine.add({"E": want.copy()}, n)
    engine.add({"E": got}, n)
    np.testing.assert_allclose(engine.pending["E"], 2 * want, rtol=1e-6)
