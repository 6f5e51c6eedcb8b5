"""Sites inserted into ONNX graphs without Dropout nodes (eval-mode exports): the names and the
guarded groups the torch adapter gives the same model, apply inserts ratio-carrying Dropout nodes,
the eval graph equals the original and ORT Training trains with the inserted dropout active."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from gd_core.errors import ArgumentError

torch = pytest.importorskip("torch", reason="torch exports the test models")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import adapters.onnx as gdo  # noqa: E402
import adapters.torch as gdt  # noqa: E402
import gd_core  # noqa: E402
from adapters.onnx.insert import HOOK_CHILD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from heldout_models import Logits, encoder, llama  # noqa: E402
from ort_helpers import train_losses  # noqa: E402

nn = torch.nn


def _eval_export(model, example, names, *, randomise_norms=True, **export):  # type: ignore[no-untyped-def]
    """An eval-mode export (no Dropout nodes); ``export``: more ``torch.onnx.export`` keywords.
    Norm weights are randomised first unless told not to, because the exporter merges
    equal-valued initializers in eval mode (freshly initialised norms are all ones)."""
    torch.manual_seed(1)
    for mod in model.modules() if randomise_norms else ():
        for attr in ("weight", "bias"):
            p = getattr(mod, attr, None)
            if "Norm" in type(mod).__name__ and isinstance(p, torch.nn.Parameter):
                with torch.no_grad():
                    p.normal_()
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        example,
        buf,
        input_names=names,
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,
        **export,
    )
    proto = onnx.load_from_string(buf.getvalue())
    assert not [n for n in proto.graph.node if n.op_type == "Dropout"]
    return proto


_encoder = encoder


def _llama():  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    return Logits(llama())


def _groups(sites) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    return {s.name: set(s.params) for s in sites}


def test_hook_child_is_the_torch_adapters() -> None:
    from adapters.torch.layer import HOOK_CHILD as TORCH_HOOK_CHILD

    assert HOOK_CHILD == TORCH_HOOK_CHILD


def test_llama_eval_export_gets_the_torch_hook_sites() -> None:
    model = _llama()
    proto = _eval_export(model, (torch.randint(0, 64, (2, 8)),), ["ids"])
    t = _groups(gdt.sites(model))
    o = _groups(gdo.sites(proto))
    hooks = {n for n in t if n.endswith(f".{HOOK_CHILD}")}
    # issue 24: the attention probabilities get a site too (after the Softmax, where torch's
    # self_attn.attention_dropout acts), named as a training-mode export names it
    attn = {n.replace(HOOK_CHILD, "dropout") for n in hooks if ".self_attn." in n}
    assert len(hooks) == 5 and len(attn) == 2 and set(o) == hooks | attn
    for name in hooks:
        assert o[name] == t[name], name  # the same groups as torch, site by site
    for name in attn:
        assert o[name] == t[name.replace(".dropout", ".attention_dropout")], name

    # a torch profile is placed by what each site guards; inserted sites take torch's names
    def loss(m, ids):  # type: ignore[no-untyped-def]
        return m(ids).float().pow(2).mean(dim=(1, 2))

    prof = gdt.profile(model, [torch.randint(0, 64, (2, 8))], loss=loss, progress=False)
    report = gdo.apply(proto, prof)
    renamed = {n.replace(".dropout", ".attention_dropout") for n in attn}
    assert set(report.inserted) == hooks | renamed
    assert sorted(report.absent) == sorted(set(t) - hooks - renamed)
    assert all(n in report.absent_reasons for n in report.absent)
    # a {site: p} naming sites the graph does not have is refused, as in every adapter
    with pytest.raises(ArgumentError, match="dropout sites of this model"):
        gdo.apply(proto, {n: 0.2 for n in t})


def test_encoder_eval_export_sites_pool_the_lost_dropout_modules() -> None:
    """nn.TransformerEncoderLayer has nn.Dropout modules, which an eval export drops: its
    inserted sites (the attention probabilities and the residual branches) guard what torch's
    sites there guard; the feed-forward's inner dropout (not on a residual branch) is merged
    into the branch's site, until a torch profile says where it acts: then it is inserted there
    (it used to stay merged, reported as such, and keep no p of its own)."""
    model = _encoder()
    proto = _eval_export(model, (torch.randint(0, 50, (2, 5)),), ["ids"])
    t = _groups(gdt.sites(model))
    o = _groups(gdo.sites(proto))
    layer = "encoder.layers.0"
    assert list(o) == [
        f"embed.{HOOK_CHILD}",
        f"{layer}.self_attn.dropout",
        f"{layer}.self_attn.{HOOK_CHILD}",
        f"{layer}.linear2.{HOOK_CHILD}",
    ]
    assert o[f"embed.{HOOK_CHILD}"] == {"embed.weight"}
    assert o[f"{layer}.self_attn.dropout"] == t[f"{layer}.self_attn.dropout"]
    assert o[f"{layer}.self_attn.{HOOK_CHILD}"] == t[f"{layer}.dropout1"]
    assert o[f"{layer}.linear2.{HOOK_CHILD}"] == t[f"{layer}.dropout"] | t[f"{layer}.dropout2"]
    rng = np.random.default_rng(0)
    fisher = {n: rng.random(tuple(p.shape)) for n, p in model.named_parameters()}
    prof = gd_core.SensitivityProfile.from_fisher(fisher, gdt.sites(model))
    report = gdo.apply(proto, prof, strict=False)
    assert report.matched[f"{layer}.dropout1"] == f"{layer}.dropout1"  # inserted, torch's name
    assert report.absent_reasons == {}
    assert report.matched[f"{layer}.dropout"] == f"{layer}.dropout"  # the inner dropout, placed
    assert f"{layer}.dropout" in report.inserted
    # a torch profile of this model names sites the eval graph does not have: refused, not silent
    with pytest.raises(Exception, match="(?i)site"):
        gdo.apply(proto, {n: 0.2 for n in t})


def test_apply_inserts_eval_unchanged_and_ort_training_drops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")
    model = _llama()
    ids = torch.randint(0, 64, (2, 8))
    proto = _eval_export(model, (ids,), ["ids"])
    names = [s.name for s in gdo.sites(proto)]
    report = gdo.apply(proto, {n: 0.3 for n in names})
    assert report.inserted == names
    assert all(r.note.startswith("inserted") and r.new_p == pytest.approx(0.3) for r in report.rows)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    drops = [n for n in out.graph.node if n.op_type == "Dropout"]
    assert len(drops) == len(names) and all(len(n.input) == 3 for n in drops)
    feeds = {"ids": ids.numpy()}
    original = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    with torch.no_grad():
        np.testing.assert_allclose(original, model(ids).numpy(), rtol=1e-4, atol=1e-5)
    zero = gdo.apply(proto, {n: 0.0 for n in names}).model  # ratio 0: the identity
    np.testing.assert_allclose(
        ort.InferenceSession(zero.SerializeToString()).run(None, feeds)[0], original, atol=1e-6
    )

    art = gdo.make_artifacts(out, tmp_path, loss="mse")
    module, opt, _ = art.open()
    batch = {"ids": feeds["ids"], "target": np.zeros_like(original)}
    module.eval()
    eval_loss = float(module(*gdo.module_inputs(module, batch)))
    assert eval_loss == pytest.approx(float(np.mean(original**2)), rel=1e-4)  # dropout off
    module.train()
    losses = []
    for _ in range(3):
        module.lazy_reset_grad()
        losses.append(float(module(*gdo.module_inputs(module, batch))))
        opt.step()
    assert all(np.isfinite(losses))
    module.lazy_reset_grad()
    a = float(module(*gdo.module_inputs(module, batch)))
    b = float(module(*gdo.module_inputs(module, batch)))
    assert a != b  # the inserted dropout is active in the training graph (fresh masks)


def test_graph_without_residual_stream_still_raises() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "f.weight")
    node = helper.make_node("MatMul", ["x", "f.weight"], ["y"], name="/f/MatMul")
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "xy"]
    m = helper.make_model(
        helper.make_graph([node], "g", vi[:1], vi[1:], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    from gd_core.errors import NoSitesError

    with pytest.raises(NoSitesError, match="residual stream"):
        gdo.sites(m)


def test_tied_initializers_of_an_eval_export_are_a_note() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "f.weight")
    nodes = [
        helper.make_node("Identity", ["f.weight"], ["g.weight"], name="Identity_0"),
        helper.make_node("MatMul", ["x", "f.weight"], ["a"], name="/f/MatMul"),
        helper.make_node("Add", ["x", "a"], ["s"], name="/Add"),
        helper.make_node("MatMul", ["s", "g.weight"], ["b"], name="/g/MatMul"),
        helper.make_node("Add", ["s", "b"], ["y"], name="/Add_1"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "xy"]
    m = helper.make_model(
        helper.make_graph(nodes, "g", vi[:1], vi[1:], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    report = gdo.apply(m, {"f.gd_dropout": 0.1, "g.gd_dropout": 0.2})
    assert report.inserted == ["f.gd_dropout", "g.gd_dropout"]
    assert any("g.weight = f.weight" in n for n in report.notes)


def _two_blocks():  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), f"{b}.dense.weight")
        for b in "ab"
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "a.dense.weight"], ["p"], name="/a/dense/MatMul"),
        helper.make_node("Add", ["x", "p"], ["s"], name="/Add"),
        helper.make_node("MatMul", ["s", "b.dense.weight"], ["q"], name="/b/dense/MatMul"),
        helper.make_node("Add", ["s", "q"], ["y"], name="/Add_1"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "xy"]
    return helper.make_model(
        helper.make_graph(nodes, "g", vi[:1], vi[1:], inits),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )


def test_inserted_sites_take_ratio_inputs_and_unit_rates() -> None:
    m = _two_blocks()
    assert [(s.name, s.params) for s in gdo.sites(m)] == [
        ("a.gd_dropout", ("a.dense.weight",)),
        ("b.gd_dropout", ("b.dense.weight",)),
    ]
    assert not [n for n in m.graph.node if n.op_type == "Dropout"]  # sites() copies
    rates = {"a.gd_dropout": 0.1, "b.gd_dropout": 0.2}
    r = gdo.apply(m, rates, ratios_as_inputs=True)
    assert [i.name for i in r.model.graph.input] == [
        "x",
        "a.gd_dropout.ratio",
        "b.gd_dropout.ratio",
    ]
    assert not [t for t in r.model.graph.initializer if t.name.endswith(".ratio")]
    u = gdo.apply(m, rates, granularity="unit")
    assert [(row.units, row.note.split(";")[0]) for row in u.rows] == [
        (4, "inserted (the graph had no Dropout node here)")
    ] * 2
    feeds = {"x": np.ones((3, 4), np.float32)}
    want = ort.InferenceSession(m.SerializeToString()).run(None, feeds)[0]
    zero = gdo.apply(m, {k: 0.0 for k in rates}).model
    got = ort.InferenceSession(zero.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_unscoped_node_names_are_refused_with_the_fix() -> None:
    from gd_core.errors import NoSitesError

    m = _two_blocks()
    for node in m.graph.node:  # names as an exporter without module scopes gives them
        node.name = f"node_{node.op_type}_{id(node) % 97}"
    with pytest.raises(NoSitesError, match="dynamo=False"):
        gdo.sites(m)


def test_unit_rewritten_inserted_graph_gets_no_second_insertion() -> None:
    m = gdo.apply(_two_blocks(), {"a.gd_dropout": 0.1, "b.gd_dropout": 0.2}, granularity="unit")
    from adapters.onnx.insert import wanted

    assert not wanted(m.model)


def test_bert_eval_export_inserted_sites_train_and_eval_equals_original(
    tmp_path, batch, make_bert
) -> None:  # type: ignore[no-untyped-def]
    """The issue's "done means": an eval-mode export of the tiny BERT classifier gets Dropout
    nodes inserted, ORT Training trains it (loss falls), its eval graph equals the original."""
    pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")
    model = make_bert("eager")
    example = (
        torch.from_numpy(batch["input_ids"][:2]),
        torch.from_numpy(batch["attention_mask"][:2]),
    )
    proto = _eval_export(
        model,
        example,
        ["input_ids", "attention_mask"],
        randomise_norms=False,
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
    )
    # the eager attention's scaling Mul belongs to no module: said, not dropped silently
    with pytest.warns(UserWarning, match=r"insertion point\(s\) get no site"):
        names = [s.name for s in gdo.sites(proto)]
    layer = "bert.encoder.layer.0"
    assert names[:4] == [
        f"bert.embeddings.{HOOK_CHILD}",
        f"{layer}.attention.self.dropout",
        f"{layer}.attention.output.dense.{HOOK_CHILD}",
        f"{layer}.output.dense.{HOOK_CHILD}",
    ]
    assert len(names) == 7  # embedding output + 2 layers x (attention probs + 2 branches)
    report = gdo.apply(proto, {n: 0.1 for n in names})
    assert report.inserted == names
    losses = train_losses(gdo.make_artifacts(report.model, tmp_path / "art"), batch)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # the eval graph of fresh artifacts: the original graph's loss, dropout off
    fresh = gdo.make_artifacts(report.model, tmp_path / "fresh")
    module, _, _ = fresh.open(optimizer=False)
    module.eval()
    eval_loss = float(module(*gdo.module_inputs(module, batch)))
    feeds = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    want = -float(np.mean(logp[np.arange(len(logp)), batch["labels"]]))
    assert eval_loss == pytest.approx(want, rel=1e-4)
