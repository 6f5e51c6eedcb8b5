"""Site discovery beyond BERT's shape (issue 23), on tiny random transformers configs built
offline: a dropout module called more than once, functional dropout whose rate is an attribute,
dead holders, models the old guessed input did not fit, attention found by dataflow not names."""

from __future__ import annotations

import warnings

import pytest
import torch

from adapters.torch import apply, sites

T = pytest.importorskip("transformers")
TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
)
BART = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=64,
    activation_dropout=0.1,
    attention_dropout=0.1,
)


def _build(name: str):
    torch.manual_seed(0)
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**TINY))
    if name == "electra":
        return T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=16, **TINY))
    if name == "mpnet":
        return T.MPNetForSequenceClassification(T.MPNetConfig(**TINY))
    if name == "albert":
        return T.AlbertForSequenceClassification(
            T.AlbertConfig(embedding_size=8, hidden_dropout_prob=0.1, **TINY)
        )
    if name == "phi":
        return T.PhiForCausalLM(T.PhiConfig(resid_pdrop=0.1, embd_pdrop=0.1, **TINY))
    if name == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(**BART))
    if name == "bart_cls":
        return T.BartForSequenceClassification(T.BartConfig(**BART))
    if name == "xlmr":
        return T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**TINY))
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**TINY))
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(
            T.DistilBertConfig(
                vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                max_position_embeddings=64,
            )
        )  # fmt: skip
    raise KeyError(name)


def _sites(model, **kw):
    """sites() with warnings turned into errors: no structural fallback may happen silently, and
    none is expected for these models."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return sites(model, **kw)


@pytest.mark.parametrize("name", ["roberta", "electra", "mpnet", "albert", "phi"])
def test_a_dropout_module_called_twice_is_one_site_guarding_the_union(name):
    model = _build(name)
    found = _sites(model)
    names = [s.name for s in found]
    assert len(names) == len(set(names))
    twice = {
        "roberta": "classifier.dropout",
        "electra": "classifier.dropout",
        "mpnet": "classifier.dropout",
        "albert": "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.output_dropout",
        "phi": "model.layers.0.resid_dropout",
    }[name]
    site = found[twice]
    if name in ("roberta", "electra", "mpnet"):  # before and after the head's dense layer
        assert "classifier.dense.weight" in site.params
        assert "classifier.out_proj.weight" not in site.params
    if name == "phi":  # after the attention and after the MLP
        assert "model.layers.0.self_attn.dense.weight" in site.params
        assert "model.layers.0.mlp.fc2.weight" in site.params
    report = apply(model, {s.name: 0.01 * (i + 1) for i, s in enumerate(found)})
    assert report.probabilities()[twice] > 0


def test_roberta_profile_runs():
    from adapters.torch import profile

    model = _build("roberta")
    ids = torch.randint(3, 60, (4, 8))
    batches = [{"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}]

    def loss(m, b):
        return torch.nn.functional.cross_entropy(
            m(input_ids=b["input_ids"]).logits, b["labels"], reduction="none"
        )

    prof = profile(model, batches, loss=loss, progress=False)
    assert "classifier.dropout" in prof.site_names


def test_bart_functional_dropout_is_linked_to_its_attribute():
    model = _build("bart")
    found = _sites(model)
    layer = "model.decoder.layers.0"
    drop, act = found[f"{layer}.dropout"], found[f"{layer}.activation_dropout"]
    assert set(act.params) == {f"{layer}.fc1.weight", f"{layer}.fc1.bias"}
    assert f"{layer}.fc2.weight" in drop.params
    assert f"{layer}.self_attn.out_proj.weight" in drop.params
    assert not set(drop.params) & set(act.params)
    cross = found[f"{layer}.encoder_attn.dropout"]
    assert cross.units is None  # attention probabilities
    assert not any(p.startswith("model.encoder.") for p in cross.params)
    assert {p.rsplit(".", 2)[-2] for p in cross.params} == {"q_proj", "k_proj", "v_proj"}


def test_dead_holders_are_reported_never_profiled_nor_installed():
    model = _build("albert")
    dead = "albert.encoder.albert_layer_groups.0.albert_layers.0.dropout"
    found = _sites(model)
    assert dead not in [s.name for s in found]
    assert dead in found.dead and "never used" in found.dead[dead]
    report = apply(model, {s.name: 0.05 for s in found})
    assert dead not in report.sites
    assert any(dead in n and "dead" in n for n in report.notes)
    module = model.get_submodule(dead)
    assert module.p == 0.1  # left as it was


def test_xlm_roberta_traces_and_equals_bert():
    xlmr, bert = _sites(_build("xlmr")), _sites(_build("bert"))

    def body(found, prefix):  # the encoder's sites (the heads differ: BERT has a pooler)
        return {
            s.name[len(prefix) :]: {p.replace(prefix, "", 1) for p in s.params}
            for s in found
            if s.name.startswith(prefix)
        }

    assert body(xlmr, "roberta.") == body(bert, "bert.")
    layer = "roberta.encoder.layer.0"
    emb = xlmr["roberta.embeddings.dropout"].params
    assert "roberta.embeddings.position_embeddings.weight" in emb
    assert f"{layer}.intermediate.dense.weight" in xlmr[f"{layer}.output.dropout"].params


@pytest.mark.parametrize("name", ["bart_cls"])
def test_models_the_old_guess_did_not_fit_trace_without_fallback(name):
    found = _sites(_build(name))
    assert found and not found.notes


def test_example_input_is_used_and_a_failing_one_warns():
    model = _build("bert")
    ids = torch.randint(3, 60, (1, 5))
    assert [s.name for s in sites(model, example_input={"input_ids": ids})] == [
        s.name for s in _sites(model)
    ]
    with pytest.warns(RuntimeWarning, match="example_input"):
        found = sites(model, example_input={"nonsense": ids})
    assert found.notes


def test_distilbert_attention_dropout_is_decided_by_dataflow():
    model = _build("distilbert")
    found = _sites(model)
    att = found["distilbert.transformer.layer.0.attention.dropout"]
    assert att.units is None
    assert {p.rsplit(".", 2)[-2] for p in att.params} == {"q_lin", "k_lin", "v_lin"}
    report = apply(model, {s.name: 0.05 for s in found}, granularity="unit")
    row = report["distilbert.transformer.layer.0.attention.dropout"]
    assert "attention probabilities" in row.how


def test_no_name_lists_decide_a_site_kind():
    import adapters.torch.discovery as d

    for old in ("_QKV_CHILDREN", "_HIDDEN_WORDS", "_ATTENTION_WORDS"):
        assert not hasattr(d, old)
