"""Issue 25: apply(wrapper) finds the transformers model inside (SentenceTransformer, a
LightningModule-like module) for the automatic profile, with no guessed-input warning."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from gd_core.errors import ArgumentError  # noqa: E402

FAST = {"samples": 8, "seq_len": 16, "progress": False}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))


def config(tokenizer):
    return transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=12, max_position_embeddings=32,
    )  # fmt: skip


class Lit(torch.nn.Module):
    """What a LightningModule holding a transformers model looks like to apply."""

    def __init__(self, net, other=None):
        super().__init__()
        self.net = net
        self.other = other
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def forward(self, batch):  # a signature no guessed input fits
        return self.net(**batch).logits


def quiet_apply(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = gdt.apply(model, auto_profile=FAST, **kwargs)
    assert not [w for w in caught if "guessed input" in str(w.message)], caught
    return report


def test_module_holding_a_transformers_model(tokenizer):
    torch.manual_seed(0)
    lit = Lit(transformers.BertForSequenceClassification(config(tokenizer)))
    report = quiet_apply(lit, tokenizer=tokenizer)
    assert "contrastive objective on BertModel (model.net.bert)" in report.notes[0]
    assert report["net.bert.encoder.layer.0.output.dropout"].source == "profile"


def test_sentence_transformer(tokenizer, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    transformers.BertModel(config(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")
    report = quiet_apply(model)  # its own tokenizer is used
    assert "contrastive objective on BertModel" in report.notes[0]
    assert {r.source for r in report} == {"profile"}


def test_two_transformers_models_inside_are_named(tokenizer):
    a = transformers.BertModel(config(tokenizer))
    b = transformers.BertModel(config(tokenizer))
    with pytest.raises(ArgumentError, match=r"model\.net \(BertModel\), model\.other"):
        gdt.apply(Lit(a, b), tokenizer=tokenizer, auto_profile=FAST)


def test_automatic_profile_progress_bar_has_a_total(tokenizer, monkeypatch):
    from gd_core import fisher_loop

    seen = []
    real = fisher_loop.progress_bar

    def spy(total, enabled):
        seen.append((total, enabled))
        return real(total, False)

    monkeypatch.setattr(fisher_loop, "progress_bar", spy)
    clf = transformers.BertForSequenceClassification(config(tokenizer))
    gdt.apply(clf, tokenizer=tokenizer, auto_profile={**FAST, "progress": True})
    assert seen == [(FAST["samples"], True)]  # a total, so tqdm shows the ETA
