"""Issue 14 (torch): "keep" keeps, alignment never crosses architectures, distributed edge cases,
masks that do not depend on how samples are batched, and Hugging Face save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from gd_core import ProfileMismatchError  # noqa: E402

HERE = Path(__file__).resolve().parent


def bert_config(layers: int = 2) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
    )


@pytest.fixture(scope="module")
def bert_profile():
    torch.manual_seed(0)
    enc = transformers.BertForMaskedLM(bert_config())
    batches = [{"input_ids": torch.randint(5, 100, (4, 16))} for _ in range(2)]
    return gdt.profile(enc, batches, loss=gdt.MaskedLMLoss(mask_token_id=4), progress=False)


def gpt2(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=layers, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def gpt2_profile():
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))}]
    return gdt.profile(gpt2(2), batches, loss="clm", progress=False)


def classifier(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(bert_config())


def _rates(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("rates")}


def _ps(model) -> dict[str, float]:
    return {s.name: float(p) for s, p in zip(gdt.sites(model), _site_ps(model), strict=True)}


def _site_ps(model) -> list[float]:
    report = gdt.apply(model, {}, missing="keep")  # a no-op apply reports the current p
    return [r.new_p for r in report.rows]


# -- item 2: "keep" means unchanged ----------------------------------------------------------
def test_second_unit_apply_keeps_other_sites_per_unit_rates(bert_profile):
    model = classifier()
    gdt.apply(model, bert_profile, granularity="unit", missing="upper")
    before = _rates(model)
    assert any(t.shape == (32,) for t in before.values())
    report = gdt.apply(model, {"dropout": 0.2}, granularity="unit")
    after = _rates(model)
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        if name == "dropout.rates":
            continue
        assert after[name].shape == t.shape, name
        torch.testing.assert_close(after[name], t, rtol=0, atol=0)
    assert float(after["dropout.rates"].mean()) == pytest.approx(0.2)
    assert {r.site: r.source for r in report.rows}["dropout"] == "given"
    # a state dict saved now loads into a fresh model given the same two applies
    fresh = classifier(seed=2)
    gdt.apply(fresh, bert_profile, granularity="unit", missing="upper")
    gdt.apply(fresh, {"dropout": 0.2}, granularity="unit")
    fresh.load_state_dict(model.state_dict())


# -- item 3: alignment never matches across architectures -------------------------------------
def test_a_gpt2_profile_never_lands_on_bert_sites(gpt2_profile):
    model = classifier()
    try:
        report = gdt.apply(model, gpt2_profile, strict=False, missing="upper")
    except ProfileMismatchError as exc:
        assert "transformer.h.0" in str(exc) or "transformer." in str(exc)
        return
    assert not [r.site for r in report.rows if r.source == "profile"]


def test_strict_refusal_names_the_profile_s_real_names(gpt2_profile):
    with pytest.raises(ProfileMismatchError) as info:
        gdt.apply(classifier(), gpt2_profile, strict=True, missing="upper")
    text = str(info.value)
    assert "transformer." in text  # the names as profiled, not with a guessed prefix removed


def test_strict_refuses_a_profile_of_fewer_layers(gpt2_profile):
    with pytest.raises(ProfileMismatchError, match=r"transformer\.h\.2"):
        gdt.apply(gpt2(3), gpt2_profile, strict=True)
    report = gdt.apply(gpt2(3), gpt2_profile, strict=False)  # asked for: allowed, said
    assert {r.source for r in report.rows} >= {"profile", "keep"}


def test_unknown_site_in_a_dict_raises():
    with pytest.raises(Exception, match="nosuch"):
        gdt.apply(classifier(), {"dropout": 0.2, "nosuch": 0.3})


# -- item 5: masks depend on (seed, sample), not on batching or call order -------------------
def test_masked_lm_masks_do_not_depend_on_batching():
    model = transformers.BertForMaskedLM(bert_config(1)).eval()
    ids = torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    whole = gdt.MaskedLMLoss(mask_token_id=4, seed=7)
    _, m_all = whole.mask(model, {"input_ids": ids})
    split = gdt.MaskedLMLoss(mask_token_id=4, seed=7)
    _, m_b = split.mask(model, {"input_ids": ids[2:]})  # the second half first
    _, m_a = split.mask(model, {"input_ids": ids[:2]})
    assert torch.equal(m_all, torch.cat([m_a, m_b]))
    other = gdt.MaskedLMLoss(mask_token_id=4, seed=8)
    assert not torch.equal(other.mask(model, {"input_ids": ids})[1], m_all)


@pytest.mark.parametrize("output", ["diagonal", "norms"])
def test_unequal_batch_counts_across_ranks_never_hang_or_lie(gloo_two_process_run, output):
    """Rank 0 gets 2 batches, rank 1 gets 5 (in the shared gloo run, tests/torch/conftest.py)."""
    import _torch_dist_worker as base

    folder = gloo_two_process_run / f"unequal-{output}"
    outs = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    if all("error" in o for o in outs):  # a clear error on every rank
        assert all("batch" in o["error"] for o in outs), outs
        return
    assert not any("error" in o for o in outs), outs
    single = gdt.estimate_fisher(
        base.make_model(), base.make_batches(7), loss=base.loss, progress=False, output=output
    )
    for o in outs:  # equalised: every rank has the profile of all 7 batches
        assert o["count"] == single.count == 21
        for name, f in single.items():
            np.testing.assert_allclose(o["fisher"][name], np.asarray(f), rtol=1e-10, err_msg=name)


def test_masked_lm_two_processes_equal_one(gloo_two_process_run):
    """MaskedLMLoss, each rank its strided shard (in the shared gloo run)."""
    import _dist_edge_worker as worker

    single = gdt.estimate_fisher(
        worker.tiny_mlm(),
        worker.mlm_batches(),
        loss=gdt.MaskedLMLoss(mask_token_id=4, seed=0),
        progress=False,
    )
    with np.load(gloo_two_process_run / "masked" / "masked.npz", allow_pickle=False) as got:
        assert int(got["count"]) == single.count
        for name, f in single.items():
            np.testing.assert_allclose(
                got[name.replace(".", "_")], f, rtol=1e-4, atol=1e-12, err_msg=name
            )


# -- item 7: Hugging Face save/load keeps the plan ---------------------------------------------
@pytest.mark.parametrize("granularity", ["site", "unit"])
def test_save_pretrained_then_apply_restores_the_plan(tmp_path, bert_profile, granularity):
    model = classifier()
    gdt.apply(
        model, bert_profile.with_mapping(p_upper=0.3), granularity=granularity, missing="upper"
    )
    ps, rates = _ps(model), _rates(model)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert any("guided" in k for k in config), sorted(config)  # the plan, as plain JSON
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m")
    gdt.apply(loaded)  # no other argument: the recorded plan
    assert _ps(loaded) == pytest.approx(ps, abs=1e-7)
    got = _rates(loaded)
    assert sorted(got) == sorted(rates)
    for name, t in rates.items():
        torch.testing.assert_close(got[name], t)
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a[0] == b[0]
        torch.testing.assert_close(a[1], b[1])


def test_from_pretrained_comes_back_guided_and_apply_is_silent(tmp_path, bert_profile):
    """Issue 25: plain from_pretrained ran p = 0.1 until apply, and that apply warned."""
    model = classifier()
    gdt.apply(model, bert_profile, missing="upper")
    ps = _ps(model)
    model.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m")
        assert _ps(loaded) == pytest.approx(ps, abs=1e-7)  # guided as loaded
        assert loaded.guided_dropout_report.notes
        loaded.train()
        ids = torch.randint(5, 100, (2, 8))
        loaded(input_ids=ids)
        gdt.apply(loaded)  # restoring again: no warning either
        loaded(input_ids=ids)
    assert not [w for w in caught if "guided" in str(w.message).lower()]
    assert _ps(loaded) == pytest.approx(ps, abs=1e-7)


def test_a_plan_that_cannot_be_restored_at_load_warns_with_the_fix(
    tmp_path, bert_profile, monkeypatch
):
    from adapters.torch import install

    model = classifier()
    gdt.apply(model, bert_profile, missing="upper")
    model.save_pretrained(tmp_path / "m")

    def broken(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(install, "apply", broken)
    with pytest.warns(UserWarning, match="could not be restored.*broken on purpose"):
        loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m")
    monkeypatch.undo()
    loaded.train()
    with pytest.warns(UserWarning, match="not installed.*apply"):
        loaded(input_ids=torch.randint(5, 100, (2, 8)))


def test_restoring_refuses_arguments_that_would_change_the_plan(tmp_path, bert_profile):
    model = classifier()
    gdt.apply(model, bert_profile, missing="upper")
    model.save_pretrained(tmp_path / "m")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m")
    with pytest.raises(Exception, match="granularity.*guided_dropout"):
        gdt.apply(loaded, granularity="unit")


def test_the_warning_does_not_depend_on_the_import_order(tmp_path, bert_profile):
    """`import adapters.torch` before transformers is imported: from_pretrained still restores."""
    model = classifier()
    gdt.apply(model, bert_profile, missing="upper")
    model.save_pretrained(tmp_path / "m")
    code = f"""
import sys, warnings
import adapters.torch as gdt
assert "transformers" not in sys.modules
import torch, transformers
m = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "m")!r})
print(m.bert.encoder.layer[0].output.dropout.p)
"""
    root = str(HERE.parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = _ps(model)["bert.encoder.layer.0.output.dropout"]
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(want, abs=1e-7)
