"""Issue 24's zoo column: what the wider sweep found (tests/zoo/onnx_column.py), each kept here.

A torch profile applied to an ONNX export puts each torch site's p on the Dropout nodes guarding
the same parameters, whatever the exporter made of the calls:

- ALBERT's one shared layer, unrolled into several scopes (several graph sites guard exactly what
  one torch site guards), was refused ("guarded equally by several sites"): now one site, one p;
- BART's ``dropout`` and ``activation_dropout`` are functional calls in one layer's scope, so the
  exporter names them alike; ``activation_dropout`` was reported merged and kept the old ratio;
- a classifier head's dropout (off the residual stream) was missing from eval-mode exports;
- residual sites torch's model lacks (Llama with only attention dropout) were inserted anyway;
- the math attention kernel's NaN guard (``Where(IsNaN(p), 0, p)``) kept the values out of the
  attention-probability site of eval-mode exports.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest

import gd_core
from gd_core.dataflow import Op
from gd_core.identity import placements, regroup
from gd_core.sites import Site

# ---- the rules (framework-neutral) -----------------------------------------------------------


def test_regroup_splits_calls_named_alike_and_merges_unrolled_calls() -> None:
    prof = [
        Site("l.dropout", ("l.attn.w", "l.fc2.w")),
        Site("l.activation_dropout", ("l.fc1.w",)),
        Site("shared.attn_dropout", ("shared.q", "shared.k")),
    ]
    parts = {
        "n0": ("l.attn.w",),
        "n1": ("l.fc1.w",),
        "n2": ("l.fc2.w",),
        "u0": ("shared.q", "shared.k"),
        "u1": ("shared.q", "shared.k"),
    }
    grouping = {"n0": "l.dropout", "n1": "l.dropout", "n2": "l.dropout"}
    grouping |= {"u0": "shared.dropout", "u1": "shared_1.dropout"}
    got = regroup(prof, parts, grouping)
    assert got == {
        "n0": "l.dropout",
        "n1": "l.activation_dropout",
        "n2": "l.dropout",
        "u0": "shared.attn_dropout",
        "u1": "shared.attn_dropout",
    }


def test_regroup_merges_only_sites_guarding_all_of_the_profile_site() -> None:
    """A site guarding part of a torch site's parameters is not merged into it (it is a call
    torch does not make: an embedding site where torch has none)."""
    prof = [Site("l1.attn_dropout", ("emb.w", "l1.q"))]
    parts = {"e": ("emb.w",), "a": ("emb.w", "l1.q")}
    grouping = {"e": "emb.gd_dropout", "a": "l1.dropout"}
    assert regroup(prof, parts, grouping) == grouping


def test_placements_find_where_dropping_guards_exactly_the_parameters() -> None:
    ops = [
        Op("emb", ("ids",), ("x",), ("emb.w",)),
        Op("emb.dropout", ("x",), ("d",), site=True),
        Op("pool", ("d",), ("p",), ("pool.w",)),
        Op("tanh", ("p",), ("t",)),
        Op("head", ("t",), ("z",), ("head.w",)),
    ]
    assert placements(ops, {"dropout": ["pool.w"], "other": ["nowhere.w"]}) == {"dropout": "t"}


# ---- the exports -------------------------------------------------------------------------------


def _torch() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch", reason="torch exports the test models")
    transformers = pytest.importorskip("transformers", reason="transformers builds them")
    return torch, transformers


def _distinct(model: Any) -> Any:
    """Weights made distinct (the eval-mode exporter merges equal initializers)."""
    torch, _ = _torch()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    return model


def _profile(model: Any) -> Any:
    import adapters.torch as gdt

    rng = np.random.default_rng(0)
    fisher = {n: rng.random(tuple(p.shape)) for n, p in model.named_parameters()}
    return gd_core.SensitivityProfile.from_fisher(fisher, gdt.sites(model))


def _export(model: Any, inputs: dict[str, Any], how: str) -> Any:
    import onnx

    torch, _ = _torch()
    model = copy.deepcopy(model)
    model.train(how == "training")
    mode = torch.onnx.TrainingMode.TRAINING if how == "training" else torch.onnx.TrainingMode.EVAL
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (),
        buf,
        kwargs=inputs,
        training=mode,
        do_constant_folding=False,
        dynamo=False,
    )
    return onnx.load_from_string(buf.getvalue())


def _carried(model: Any, inputs: dict[str, Any], how: str) -> tuple[dict[str, float], Any, Any]:
    """``(torch p by site, ONNX p by torch site, report)`` for one export."""
    import adapters.onnx as gdo
    import adapters.torch as gdt

    prof = _profile(model)
    report = gdo.apply(_export(model, inputs, how), prof)
    torch_p = gdt.apply(copy.deepcopy(model), prof).probabilities()
    onnx_p = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    return torch_p, onnx_p, report


def _assert_site_by_site(torch_p: dict[str, float], onnx_p: dict[str, float]) -> None:
    assert sorted(onnx_p) == sorted(torch_p)
    for site, p in torch_p.items():
        assert onnx_p[site] == pytest.approx(p, abs=1e-6), site


def test_albert_shared_layer_unrolled_is_one_site() -> None:
    torch, transformers = _torch()
    cfg = transformers.AlbertConfig(
        vocab_size=60,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = _distinct(transformers.AlbertForSequenceClassification(cfg))
    torch_p, onnx_p, report = _carried(
        model, {"input_ids": torch.randint(3, 60, (2, 6))}, "training"
    )
    _assert_site_by_site(torch_p, onnx_p)
    attn = next(s for s in torch_p if s.endswith("attention.attention_dropout"))
    onnx_site = next(s for s, t in report.matched.items() if t == attn)
    assert len(report.nodes[onnx_site]) == 2  # both unrolled calls, one p
    assert any("regrouped" in n for n in report.notes)


def _bart(torch: Any, transformers: Any) -> Any:
    cfg = transformers.BartConfig(
        vocab_size=60,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=16,
        dropout=0.1,
        activation_dropout=0.1,
        attention_dropout=0.1,
        attn_implementation="eager",
        use_cache=False,
    )
    torch.manual_seed(0)
    return _distinct(transformers.BartForConditionalGeneration(cfg))


def test_bart_activation_dropout_is_its_own_site() -> None:
    torch, transformers = _torch()
    model = _bart(torch, transformers)
    ids = torch.randint(3, 60, (2, 6))
    torch_p, onnx_p, _ = _carried(
        model, {"input_ids": ids, "decoder_input_ids": ids[:, :4]}, "training"
    )
    act = [s for s in torch_p if s.endswith("activation_dropout")]
    assert len(act) == 2
    _assert_site_by_site(torch_p, onnx_p)


def test_head_dropout_of_an_eval_export_is_inserted_where_torch_drops() -> None:
    torch, transformers = _torch()
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = _distinct(transformers.BertForSequenceClassification(cfg))
    torch_p, onnx_p, report = _carried(model, {"input_ids": torch.randint(3, 60, (2, 6))}, "eval")
    assert "dropout" in torch_p  # the classifier head's dropout, after the pooler's tanh
    _assert_site_by_site(torch_p, onnx_p)
    assert all(p.how == "same parameters" for p in report.pairs), report.notes
    node = next(n for n in report.model.graph.node if n.name in report.nodes["dropout"])
    producer = next(n for n in report.model.graph.node if node.input[0] in n.output)
    assert producer.op_type == "Tanh"


def test_eval_export_gets_no_residual_site_torch_lacks() -> None:
    torch, transformers = _torch()
    cfg = transformers.LlamaConfig(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attention_dropout=0.1,
        attn_implementation="eager",
        use_cache=False,
    )
    torch.manual_seed(0)
    model = _distinct(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(3, 60, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch_p, onnx_p, report = _carried(model, inputs, "eval")
    assert all(s.endswith("attention_dropout") for s in torch_p)
    _assert_site_by_site(torch_p, onnx_p)
    assert not [s for s in report.probabilities() if s.endswith("gd_dropout")]
    assert any("not inserted" in n for n in report.notes)


def test_a_piecewise_norm_is_told_by_what_it_computes_not_its_name() -> None:
    """Issue 23 item 3 (no name lists): a LayerNorm exported piecewise (opset < 17) is one norm
    op because its scope computes a mean and a square root, whatever the module is called (the
    scope name used to decide: ``norm`` or ``ln`` in it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from adapters.onnx.dataflow import ops_of

    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.ones((4, 4), f32), "f.weight"),
        numpy_helper.from_array(np.full(4, 1.5, f32), "post.weight"),
        numpy_helper.from_array(np.full(4, 0.5, f32), "post.bias"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(2.0, f32), "two"),
        numpy_helper.from_array(np.array(1e-5, f32), "eps"),
    ]
    s = "/blk/post/"
    nodes = [
        helper.make_node("MatMul", ["x", "f.weight"], ["b"], name="/blk/f/MatMul"),
        helper.make_node("Add", ["x", "b"], ["h"], name="/blk/Add"),
        helper.make_node("ReduceMean", ["h", "axes"], ["m"], name=s + "ReduceMean"),
        helper.make_node("Sub", ["h", "m"], ["c"], name=s + "Sub"),
        helper.make_node("Pow", ["c", "two"], ["sq"], name=s + "Pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["v"], name=s + "ReduceMean_1"),
        helper.make_node("Add", ["v", "eps"], ["ve"], name=s + "Add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=s + "Sqrt"),
        helper.make_node("Div", ["c", "sd"], ["n"], name=s + "Div"),
        helper.make_node("Mul", ["n", "post.weight"], ["g"], name=s + "Mul"),
        helper.make_node("Add", ["g", "post.bias"], ["y"], name=s + "Add_1"),
    ]
    io_ = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "xy"]
    graph = helper.make_graph(nodes, "g", io_[:1], io_[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    params = {n: n for n in ("f.weight", "post.weight", "post.bias")}
    ops, _ = ops_of(model, params, lambda i, n: None)
    norms = [op for op in ops if op.norm]
    assert [sorted(op.params) for op in norms] == [["post.bias", "post.weight"]]


def test_placements_allow_parameters_no_profile_site_guards() -> None:
    """Whisper's encoder.dropout guards the convolutions; the frozen position table added
    before it is in no torch site (the profile leaves frozen parameters out), so a place that
    also guards it is still the site's place (it was left folded)."""
    ops = [
        Op("conv", ("x",), ("c",), ("conv.w",)),
        Op("pos", ("ids",), ("p",), ("pos.w",)),
        Op("add", ("c", "p"), ("h",), add=True),
        Op("layer", ("h",), ("y",), ("layer.w",)),
    ]
    assert placements(ops, {"enc.dropout": ["conv.w"]}) == {}
    got = placements(ops, {"enc.dropout": ["conv.w"]}, unclaimed=frozenset({"pos.w"}))
    assert got == {"enc.dropout": "h"}
