"""Site discovery beyond BERT's shape (issue 23), on tiny random transformers configs built
offline: a dropout module called more than once, functional dropout whose rate is an attribute,
dead holders, models the old guessed input did not fit, attention found by dataflow not names."""

from __future__ import annotations

import warnings

import pytest
import torch

import adapters.torch as gdt
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


def _vision(name: str):
    torch.manual_seed(0)
    if name == "resnet":
        cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
        return T.ResNetForImageClassification(cfg)
    if name == "regnet":
        cfg = T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], groups_width=8)
        return T.RegNetForImageClassification(cfg)
    if name == "swin":
        cfg = T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
            window_size=2, drop_path_rate=0.1,
        )  # fmt: skip
        return T.SwinForImageClassification(cfg)
    if name == "wav2vec2":
        cfg = T.Wav2Vec2Config(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, classifier_proj_size=8,
        )  # fmt: skip
        return T.Wav2Vec2ForSequenceClassification(cfg)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["swin", "wav2vec2"])
def test_image_and_audio_models_trace_from_their_main_input(name):
    found = _sites(_vision(name))
    assert not [n for n in found.notes if "structural" in n or "no traced forward" in n]
    assert any(s.units is None for s in found)  # attention probabilities found by dataflow


def test_stochastic_depth_is_reported_as_not_handled():
    found = _sites(_vision("swin"))
    assert any("stochastic depth" in n and "drop_path" in n for n in found.notes)


@pytest.mark.parametrize("name", ["resnet", "regnet"])
def test_image_models_without_dropout_get_residual_sites(name):
    model = _vision(name)
    found = _sites(model)
    assert found and all(s.kind == "hook" for s in found)
    report = apply(model, {s.name: 0.05 for s in found})
    assert all(r.new_p == 0.05 for r in report)


def test_parameters_read_directly_are_seen():
    torch.manual_seed(0)
    cfg = T.DebertaV2Config(
        relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", **TINY
    )
    found = _sites(T.DebertaV2ForSequenceClassification(cfg))
    guarded = {p for s in found for p in s.params}
    assert "deberta.encoder.rel_embeddings.weight" in guarded


def test_bigbird_building_modules_in_the_forward_does_not_leak_rates():
    torch.manual_seed(0)
    cfg = T.BigBirdConfig(attention_type="block_sparse", block_size=2, num_random_blocks=2, **TINY)
    model = T.BigBirdForSequenceClassification(cfg)
    found = _sites(model)
    assert any("built or replaced modules" in n for n in found.notes)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.1}  # no sentinel rate left behind
    assert found["bert.encoder.layer.0.attention.self.dropout"].units is None


def test_a_rate_read_from_config_at_forward_time_is_installable():
    torch.manual_seed(0)
    cfg = T.FalconConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        hidden_dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip
    model = T.FalconForCausalLM(cfg)
    found = _sites(model)
    assert "config.hidden_dropout" in [s.name for s in found]
    assert "transformer.h.0.hidden_dropout" in found.dead  # copied at init, never read
    apply(model, {s.name: 0.07 for s in found})
    assert model.config.hidden_dropout == 0.07
    seen = []
    real = torch.nn.functional.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        seen.append(p)
        return real(x, p, training, inplace)

    torch.nn.functional.dropout = spy
    try:
        model.train()
        model(input_ids=torch.randint(3, 60, (1, 6)))
    finally:
        torch.nn.functional.dropout = real
    assert seen and set(seen) == {0.07}  # every call runs at the installed rate


@pytest.mark.parametrize("model", ["opt", "bloom"])
def test_more_dead_holders(model):
    torch.manual_seed(0)
    if model == "opt":
        cfg = T.OPTConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
            num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
        )  # fmt: skip
        found, dead = _sites(T.OPTForCausalLM(cfg)), "model.decoder.dropout"
    else:
        cfg = T.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.1)
        found, dead = _sites(T.BloomForCausalLM(cfg)), "transformer.h.0.hidden_dropout"
    assert dead in found.dead and dead not in [s.name for s in found]


def test_coverage_lists_every_parameter_guarded_or_with_a_reason():
    from adapters.torch import coverage

    model = _build("bert")
    c = coverage(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(c["guarded"]) | set(c["unguarded"]) == names
    assert not set(c["guarded"]) & set(c["unguarded"])
    layer = "bert.encoder.layer.0"
    for p in (f"{layer}.attention.self.query.weight", f"{layer}.output.dense.weight"):
        assert p in c["guarded"]
    assert "no dropout acts on its output" in c["unguarded"]["classifier.weight"]
    assert _sites(model).unguarded == c["unguarded"]


def test_frozen_and_parameterless_sites_are_left_out_of_the_profile_with_the_reason():
    """Whisper's frozen position table and DeBERTa-v2's pooler dropout (it drops the encoder's
    output, no parameter between it and the previous site) crashed profile (KeyError / NaN
    scores). Frozen parameters are left out of a site; a site left with none gets no score, is
    named in the metadata and a warning, and apply treats it as missing."""
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 1),
    )
    net[0].requires_grad_(False)
    batches = [torch.randn(6, 4)]

    def loss(model, batch):
        return model(batch).squeeze(-1) ** 2

    with pytest.warns(UserWarning, match="no score"):
        prof = gdt.profile(net, batches, loss=loss, progress=False, example_input=batches[0])
    why = prof.metadata["unscored_sites"]
    assert "frozen" in why["1"] and "no parameters" in why["4"], why
    assert prof.site_names == ["3"]
    report = gdt.apply(net, prof, missing="upper")
    assert {r.site: r.source for r in report}["1"] == "upper"


class _Experts(torch.nn.Module):
    """A mixture of two experts (Linear -> Dropout -> Linear); the router sends every token of a
    batch to expert e0 unless ``route`` says otherwise (SwitchTransformers' experts, tiny)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 4)
        self.experts = torch.nn.ModuleDict(
            {
                f"e{i}": torch.nn.Sequential(
                    torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4)
                )
                for i in range(2)
            }
        )
        self.route = "e0"

    def forward(self, x):
        h = self.inp(x)
        return h + self.experts[self.route](h)


def test_dropout_in_an_expert_the_input_never_reaches_is_a_site_not_dead():
    """SwitchTransformers: a dropout in an expert the traced input was not routed to was
    reported dead (left at its old rate); a batch routed there ran it at 0.1. It is a site
    guarding what the reached expert's dropout guards, in its own expert, and a note says so."""
    net = _Experts()
    found = sites(net, example_input=torch.randn(3, 4))
    by = {s.name: s for s in found}
    assert "experts.e1.1" in by and "experts.e1.1" not in found.dead
    assert by["experts.e0.1"].params == ("experts.e0.0.weight", "experts.e0.0.bias")
    assert by["experts.e1.1"].params == ("experts.e1.0.weight", "experts.e1.0.bias")
    assert any("experts.e1.1" in n and "not reached by the traced input" in n for n in found.notes)
    # the parameter after it has the reason of its twin in the reached expert, said to be copied
    assert found.unguarded["experts.e1.2.weight"].startswith(found.unguarded["experts.e0.2.weight"])
    assert "as experts.e0.2.weight" in found.unguarded["experts.e1.2.weight"]
    apply(net, {"experts.e0.1": 0.2, "experts.e1.1": 0.3}, example_input=torch.randn(3, 4))
    assert net.experts.e1[1].p == pytest.approx(0.3)


def test_a_dropout_after_the_experts_guards_the_experts_the_input_never_reaches_too():
    """The experts' outputs dropped by one dropout after the mixture: the experts the traced
    input was not routed to are guarded as the reached one is (they were 'not read')."""

    class Moe(_Experts):
        def __init__(self) -> None:
            super().__init__()
            for e in self.experts.values():
                e[1] = torch.nn.Identity()
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x):
            h = self.inp(x)
            return h + self.drop(self.experts[self.route](h))

    found = sites(Moe(), example_input=torch.randn(3, 4))
    guarded = {s.name: s for s in found}["drop"].params
    for e in ("e0", "e1"):
        assert {f"experts.{e}.0.weight", f"experts.{e}.2.weight"} <= set(guarded), guarded
    assert not any(p.startswith("experts.") for p in found.unguarded)


def test_a_tensor_filled_by_item_assignment_depends_on_what_was_written():
    """RWKV and Longformer fill their attention output piece by piece (``out[:, t] = ...``):
    the trace dropped the write (it returns nothing), so the parameters computing what was
    written were said to be upstream of no dropout, and guarded by none."""

    class Fill(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x):
            out = torch.zeros(x.shape)
            out[:, :2] = self.lin(x)[:, :2]
            return self.drop(out)

    found = sites(Fill(), example_input=torch.randn(3, 4))
    assert found[0].params == ("lin.weight", "lin.bias"), found[0].params


def test_ast_gets_a_spectrogram_as_its_guessed_input():
    """AST's ``input_values`` is a spectrogram (frames x mel bins), not raw audio: the guessed
    input failed, so its sites kept the structural guess (its MLP's fc2, dropped directly by the
    layer's dropout, was guarded by no site)."""
    cfg = T.ASTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_length=32, num_mel_bins=16, hidden_dropout_prob=0.1, num_labels=2,
    )  # fmt: skip
    found = _sites(T.ASTForAudioClassification(cfg))  # a structural fallback warns: an error here
    guarded = {p for s in found for p in s.params}
    assert "audio_spectrogram_transformer.encoder.layer.0.mlp.fc2.weight" in guarded or any(
        p.endswith("layers.0.mlp.fc2.weight") for p in guarded
    ), sorted(guarded)


def test_reading_a_tensor_only_for_its_dtype_is_not_a_dependency():
    # Llama's rotary embedding takes the embedding output only for its dtype and device; the
    # trace took that for a data dependency, and layer 1's attention dropout (every reader of the
    # embedding output led to it) claimed the word embeddings
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.1,
    )
    found = sites(T.LlamaForCausalLM(cfg))
    owners = [s.name for s in found if "model.embed_tokens.weight" in s.params]
    assert owners == []
    assert "no dropout acts on its own output" in found.unguarded["model.embed_tokens.weight"]
    for i in range(3):
        params = found[f"model.layers.{i}.self_attn.attention_dropout"].params
        assert all(p.startswith(f"model.layers.{i}.") for p in params), params
