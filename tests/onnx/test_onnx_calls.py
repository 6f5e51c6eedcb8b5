"""Issue 24, the ONNX column's categories: a torch site realised by several ONNX sites, and torch
sites a dropout-free graph has no Dropout node for.

- one torch site, several ONNX sites: a rate holder called at several places (XLM's stack
  ``dropout`` after the embeddings and after each attention; ALBERT's head ``dropout``, which
  also guards the shared FFN unrolled per call; Dory's attention module called twice) guards the
  union of what its calls guard, and the graph's sites each guard one call's part. They were
  refused ("guarded equally by ..."): now they are that site's calls, one p;
- torch sites with no Dropout node in an eval export: the parts no inserted site guards are
  placed where the calls act (one tensor per call), and two branches meeting in one sum
  (GPT-NeoX's parallel residual) get a site each, before the sum.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gd_core.dataflow import Op
from gd_core.identity import regroup
from gd_core.sites import Site

# ---- the rules (framework-neutral) -----------------------------------------------------------


def test_regroup_merges_calls_that_guard_the_same_part() -> None:
    """Dory: the attention module is called twice; both calls guard q, k, v; the torch site also
    guards a scale the graph folds (no graph site guards it)."""
    prof = [Site("attn.attention_dropout", ("attn.sqk", "attn.q", "attn.k", "attn.v"))]
    parts = {"c0": ("attn.q", "attn.k", "attn.v"), "c1": ("attn.q", "attn.k", "attn.v")}
    grouping = {"c0": "attn.dropout", "c1": "attn_1.dropout"}
    got = regroup(prof, parts, grouping)
    assert got == {"c0": "attn.attention_dropout", "c1": "attn.attention_dropout"}


def test_regroup_merges_unrolled_calls_with_another_part() -> None:
    """ALBERT: the head's ``dropout`` guards the shared FFN (two unrolled calls, each guarding
    all of it) and the pooler (a third site): all three are its calls."""
    prof = [
        Site("dropout", ("ffn.w", "ffn.b", "pool.w")),
        Site("attn.dropout", ("q.w",)),
    ]
    parts = {"f0": ("ffn.w", "ffn.b"), "f1": ("ffn.w", "ffn.b"), "p": ("pool.w",), "a": ("q.w",)}
    grouping = {
        "f0": "ffn.gd_dropout",
        "f1": "layer.gd_dropout",
        "p": "dropout",
        "a": "attn.dropout",
    }
    got = regroup(prof, parts, grouping)
    assert got == {"f0": "dropout", "f1": "dropout", "p": "dropout", "a": "attn.dropout"}


def test_regroup_keeps_sites_that_guard_other_profile_sites_parameters() -> None:
    """No merge across profile sites: a graph site guarding parameters of two profile sites is
    no call of either."""
    prof = [Site("a", ("x", "y")), Site("b", ("z",))]
    parts = {"n0": ("x",), "n1": ("y", "z")}
    grouping = {"n0": "s0", "n1": "s1"}
    assert regroup(prof, parts, grouping) == grouping


def _covers() -> Any:
    from gd_core import identity

    if not hasattr(identity, "covers"):
        pytest.fail("gd_core.identity.covers is missing")
    return identity.covers


def test_covers_places_each_call_of_a_rate_holder() -> None:
    """A stack dropout called on the embeddings and again after a projection: two tensors."""
    ops = [
        Op("emb", ("ids",), ("e",), ("emb.w",)),
        Op("blk", ("e",), ("h",), ("blk.w",)),
        Op("blk.drop", ("h",), ("hd",), site=True),
        Op("add", ("e", "hd"), ("r",), add=True),
        Op("final", ("r",), ("n",), ("final.w",)),
        Op("head", ("n",), ("y",), ("head.w",)),
    ]
    assert _covers()(ops, {"drop": ["emb.w", "final.w"]}) == {"drop": ["e", "n"]}


def test_covers_places_the_missing_part_only() -> None:
    """The part an inserted site guards already (an attention output) is not placed again:
    only the embeddings' part is asked for, and placed on the embeddings' output."""
    ops = [
        Op("emb", ("ids",), ("e0",), ("emb.w",)),
        Op("emb.norm", ("e0",), ("e",), ("emb.norm.w",), norm=True),
        Op("attn", ("e",), ("a",), ("attn.out.w",)),
        Op("#site", ("a",), ("ad",), site=True),
        Op("add", ("e", "ad"), ("r",), add=True),
    ]
    got = _covers()(ops, {"drop": ["emb.w", "emb.norm.w"]})
    assert got == {"drop": ["e"]}


def test_covers_gives_parallel_branches_a_site_each_before_their_sum() -> None:
    """GPT-NeoX's parallel residual: attention and MLP read the same input and meet in one sum;
    dropping either branch's output alone guards both until the other is placed too."""
    ops = [
        Op("emb", ("ids",), ("x",), ("emb.w",)),
        Op("attn", ("x",), ("a",), ("attn.w",)),
        Op("mlp", ("x",), ("m",), ("mlp.w",)),
        Op("sum", ("a", "m"), ("s",), add=True),
        Op("res", ("x", "s"), ("y",), add=True),
        Op("head", ("y",), ("z",), ("head.w",)),
    ]
    got = _covers()(ops, {"post_attn": ["attn.w"], "post_mlp": ["mlp.w"]})
    assert got == {"post_attn": ["a"], "post_mlp": ["m"]}


def test_covers_leaves_out_a_site_it_cannot_place_exactly() -> None:
    ops = [
        Op("f", ("x",), ("a",), ("f.w", "g.w")),  # one op owns both: no tensor splits them
        Op("head", ("a",), ("y",), ("head.w",)),
    ]
    assert _covers()(ops, {"drop": ["f.w"]}) == {}


# ---- the exports -------------------------------------------------------------------------------


def _helpers() -> Any:
    import test_onnx_zoo_column as z  # tests/onnx is on sys.path (conftest)

    return z


def test_gpt_neox_parallel_residual_eval_export_carries_every_site() -> None:
    z = _helpers()
    torch, transformers = z._torch()
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        use_parallel_residual=True,
        use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.GPTNeoXForCausalLM(config))
    ids = torch.randint(0, 64, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch_p, onnx_p, report = z._carried(model, inputs, "eval")
    assert any("post_attention_dropout" in s for s in torch_p)
    z._assert_site_by_site(torch_p, onnx_p)
    assert report.absent == []


def test_albert_head_dropout_over_the_unrolled_ffn_is_one_site_in_eval_exports() -> None:
    z = _helpers()
    torch, transformers = z._torch()
    config = transformers.AlbertConfig(
        vocab_size=64,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.AlbertForSequenceClassification(config))
    ids = torch.randint(0, 64, (2, 6))
    torch_p, onnx_p, _ = z._carried(model, {"input_ids": ids}, "eval")
    z._assert_site_by_site(torch_p, onnx_p)


def test_a_site_guarding_no_parameter_is_inserted_at_the_source_models_rate() -> None:
    """DeBERTa-v2's ``pooler.dropout`` acts on the first token, with nothing computed from
    parameters since the previous site: the profile cannot score it and an eval export has no
    node for it. It is inserted before the pooler's dense, at the rate torch keeps for it."""
    z = _helpers()
    torch, transformers = z._torch()
    import adapters.onnx as gdo
    import adapters.torch as gdt

    config = transformers.DebertaV2Config(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
        pooler_dropout=0.07,
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.DebertaV2ForSequenceClassification(config))
    ids = torch.randint(0, 64, (2, 6))
    from tests.zoo.registry import zoo_loss  # any per-sample loss of the logits

    with pytest.warns(UserWarning, match="get no score"):
        prof = gdt.profile(
            copy.deepcopy(model), [{"input_ids": ids}], loss=zoo_loss, progress=False
        )
    assert "pooler.dropout" in prof.metadata["unscored_sites"]
    assert prof.metadata["unscored_rates"]["pooler.dropout"] == pytest.approx(0.07)
    report = gdo.apply(z._export(model, {"input_ids": ids}, "eval"), prof)
    torch_p = gdt.apply(copy.deepcopy(model), prof).probabilities()
    onnx_p = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    z._assert_site_by_site(torch_p, onnx_p)
    assert onnx_p["pooler.dropout"] == pytest.approx(0.07)
    assert any("guarding no parameter inserted" in n for n in report.notes)
    node = next(n for n in report.model.graph.node if n.name.startswith("/pooler/dropout/"))
    dense = next(n for n in report.model.graph.node if n.name.startswith("/pooler/dense/"))
    assert node.output[0] in dense.input  # dropped before the pooler's dense, as in torch


def test_t5_stack_dropouts_on_the_shared_embedding_are_told_apart_by_module() -> None:
    """T5's ``encoder.dropout`` and ``decoder.dropout`` both guard the shared embedding only;
    an eval export has a site for the encoder's embedding output and none for the decoder's.
    Each is placed in its own stack, the decoder's on the decoder's embedding output."""
    z = _helpers()
    torch, transformers = z._torch()
    config = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.T5ForConditionalGeneration(config))
    ids = torch.randint(1, 64, (2, 6))
    inputs = {"input_ids": ids, "decoder_input_ids": ids}
    torch_p, onnx_p, report = z._carried(model, inputs, "eval")
    z._assert_site_by_site(torch_p, onnx_p)
    graph = report.model.graph
    decoder = [
        n for n in graph.node if n.op_type == "Dropout" and n.name.startswith("/decoder/dropout/")
    ]
    assert decoder and all("/decoder/embed_tokens/" in n.input[0] for n in decoder), decoder


def test_bart_dynamo_export_places_the_decoder_dropout_on_what_the_graph_has() -> None:
    """torch's default exporter folds BART's position lookups of a fixed-length example into
    constants and names the shared embedding ``lm_head.weight``: ``model.decoder.dropout``
    guards only its ``layernorm_embedding`` here. It is placed on that part (it was ``folded``)."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    z = _helpers()
    torch, transformers = z._torch()
    import adapters.onnx as gdo
    import adapters.torch as gdt

    config = transformers.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=32,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.BartForConditionalGeneration(config)).eval()
    ids = torch.randint(3, 64, (2, 6))
    prof = z._profile(model)
    proto = torch.onnx.export(
        copy.deepcopy(model), (), kwargs={"input_ids": ids}, dynamo=True, verbose=False
    ).model_proto
    report = gdo.apply(proto, prof)
    torch_p = gdt.apply(copy.deepcopy(model), prof).probabilities()
    onnx_p = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    z._assert_site_by_site(torch_p, onnx_p)
    assert "model.decoder.dropout" in report.inserted


def test_gpt2_dynamo_export_names_the_tied_embedding_as_the_profile_does() -> None:
    """torch's default exporter names GPT-2's word embedding, tied to the LM head,
    ``lm_head.weight``, and folds the position slice: ``transformer.drop`` was ``not exported``.
    The torch profile records the tied names; ``apply`` renames the initializer back."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    z = _helpers()
    torch, transformers = z._torch()
    import adapters.onnx as gdo
    import adapters.torch as gdt
    from tests.zoo.registry import zoo_loss

    config = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, use_cache=False
    )
    torch.manual_seed(0)
    model = z._distinct(transformers.GPT2LMHeadModel(config)).eval()
    ids = torch.randint(0, 64, (2, 6))
    prof = gdt.profile(
        copy.deepcopy(model).train(), [{"input_ids": ids}], loss=zoo_loss, progress=False
    )
    assert prof.metadata["tied_parameters"] == {"lm_head.weight": "transformer.wte.weight"}
    proto = torch.onnx.export(
        copy.deepcopy(model), (), kwargs={"input_ids": ids}, dynamo=True, verbose=False
    ).model_proto
    assert "lm_head.weight" in {t.name for t in proto.graph.initializer}
    report = gdo.apply(proto, prof)
    torch_p = gdt.apply(copy.deepcopy(model), prof).probabilities()
    onnx_p = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    z._assert_site_by_site(torch_p, onnx_p)
    assert any("lm_head.weight -> transformer.wte.weight" in n for n in report.notes)
