"""``adapters.torch.apply(model)`` with nothing else: a profile is computed, cached and reported."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from gd_core import ProfileNotFoundError  # noqa: E402
from gd_core.auto import DEFAULT_SAMPLES  # noqa: E402
from gd_core.errors import ArgumentError  # noqa: E402

FAST = {"samples": 8, "seq_len": 16, "progress": False}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def bert_config(tokenizer):
    return transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=32,
    )


def test_task_model_profiles_its_encoder_and_caches(tokenizer, cache):
    torch.manual_seed(0)
    clf = transformers.BertForSequenceClassification(bert_config(tokenizer))
    report = gdt.apply(clf, tokenizer=tokenizer, auto_profile=FAST)
    note = report.notes[0]
    assert "contrastive objective on BertModel (model.bert)" in note
    assert "8 paragraphs of python-docs" in note and "gd profile --model" in note
    assert report["bert.encoder.layer.0.output.dropout"].source == "profile"
    assert report["dropout"].source == "keep"  # the new head's dropout is not profiled
    assert len(list(cache.glob("*.profile.npz"))) == 1
    # the same model again: it records what was applied (config.guided_dropout) and restores it
    restored = gdt.apply(clf, tokenizer=tokenizer, auto_profile=FAST)
    assert "restored the plan recorded" in restored.notes[0]
    assert restored.probabilities() == report.probabilities()
    # a fresh copy of the model (no recorded plan) finds the cached profile
    fresh = transformers.BertForSequenceClassification(bert_config(tokenizer))
    fresh.load_state_dict(clf.state_dict())
    again = gdt.apply(fresh, tokenizer=tokenizer, auto_profile=FAST)
    assert again.notes[0].startswith("profile from the cache (computed by apply() earlier")
    assert again.probabilities() == report.probabilities()


def test_mlm_head_and_tokenizer_beside_the_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-mlm"
    transformers.BertForMaskedLM(bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = transformers.BertForMaskedLM.from_pretrained(folder)
    report = gdt.apply(model, auto_profile=FAST)  # the tokenizer is found beside the checkpoint
    assert "mlm objective on BertForMaskedLM" in report.notes[0]
    assert f"gd profile --model {folder}" in report.notes[0]


def test_causal_lm_and_a_corpus_file(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Paragraph number {i} says something." for i in range(20)))
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    report = gdt.apply(model, tokenizer=tokenizer, auto_profile={**FAST, "corpus": corpus})
    assert f"clm objective on LlamaForCausalLM, 8 paragraphs of {corpus}" in report.notes[0]


def test_no_objective_or_no_tokenizer_or_disabled(tokenizer):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    with pytest.raises(ProfileNotFoundError, match="gd profile"):
        gdt.apply(net)  # not a transformers model: no pretraining objective is known
    clf = transformers.BertForSequenceClassification(bert_config(tokenizer))
    with pytest.raises(ArgumentError, match="tokenizer=your_tokenizer"):
        gdt.apply(clf, auto_profile=FAST)
    with pytest.raises(ProfileNotFoundError):
        gdt.apply(clf, tokenizer=tokenizer, auto_profile=False)
    with pytest.raises(ArgumentError, match="auto_profile"):
        gdt.apply(clf, tokenizer=tokenizer, auto_profile={"sample": 3})


@pytest.mark.slow
def test_default_profile_of_minilm(minilm_auto_profile, tmp_path):
    """The one-liner on the real MiniLM: a profile of every site from the default corpus (its
    wall time is measured by bench/auto_profile.py, not here). Computed once per test run, at 48
    samples instead of the default 192 (the same loop; tests/conftest.py::minilm_auto_profile);
    the README's first block uses the same cache."""
    from gd_core.auto import AutoSettings
    from gd_core.corpus import load_corpus

    facts = minilm_auto_profile(tmp_path / "cache")
    note = facts["notes"][0]
    assert note.startswith("profile computed by apply(): contrastive objective on BertModel")
    assert "48 paragraphs of python-docs (128 tokens)" in note
    assert facts["sources"] == ["profile"]
    assert facts["rows"] == facts["sites"] > 0
    assert len(facts["cached"]) == 1
    # what the one-liner does with no settings: the default count, which the corpus can give
    assert AutoSettings().samples == DEFAULT_SAMPLES <= len(load_corpus(None).texts)
