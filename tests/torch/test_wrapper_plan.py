"""The plan ``apply`` records for a wrapper whose ``config`` is its transformers model's (a
SentenceTransformer delegates ``.config``): recorded in that model's names, so the model loads
guided from its own folder (``SentenceTransformer(folder)``, ``from_pretrained``), and
``apply(wrapper)`` restores it in the wrapper's names.

Found writing docs/recipes.md: the plan was recorded in the wrapper's names
(``0.model.encoder...``) into the inner model's config, so a saved SentenceTransformer came back
with p = 0.1 everywhere, silently (the restore at load matched no site)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402

PLAN = {
    "0.model.embeddings.dropout": 0.02,
    "0.model.encoder.layer.0.attention.self.dropout": 0.03,
    "0.model.encoder.layer.0.output.dropout": 0.07,
}


def config(tokenizer):
    return transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=12, max_position_embeddings=32,
    )  # fmt: skip


def test_saved_sentence_transformer_loads_guided(tokenizer, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    transformers.BertModel(config(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")
    report = gdt.apply(model, PLAN)
    assert report.probabilities()["0.model.encoder.layer.0.output.dropout"] == 0.07
    # recorded in the inner model's own names: what loads from its folder
    sites = model[0].auto_model.config.guided_dropout["sites"]
    assert sites["encoder.layer.0.output.dropout"] == pytest.approx(0.07)
    assert not any(k.startswith("0.") for k in sites)
    model.save(str(tmp_path / "st"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
        bert = loaded[0].auto_model
        assert bert.encoder.layer[0].output.dropout.p == pytest.approx(0.07)  # guided at load
        assert bert.embeddings.dropout.p == pytest.approx(0.02)
        assert bert.encoder.layer[0].attention.output.dropout.p == pytest.approx(0.1)  # kept
        again = gdt.apply(loaded)  # restores the same plan, in the wrapper's names
        loaded.train()
        loaded[0](loaded.tokenize(["a b c"]))  # a training forward: no "not installed" warning
    assert not [w for w in caught if "guided-dropout plan" in str(w.message)], caught
    assert "restored the plan recorded in the model's config (guided_dropout)" in again.notes
    want = {k: pytest.approx(v) for k, v in report.probabilities().items()}
    assert again.probabilities() == want
    # the inner model's folder alone, as transformers loads it
    plain = transformers.BertModel.from_pretrained(tmp_path / "st")
    assert plain.encoder.layer[0].output.dropout.p == pytest.approx(0.07)


class Holder(torch.nn.Module):
    """A wrapper that hands out its first transformers model's config (as SentenceTransformer
    does), with a second one and a dropout of its own outside that model."""

    def __init__(self, net, other=None):
        super().__init__()
        self.net = net
        self.other = other
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(8, 2)

    @property
    def config(self):
        return self.net.config

    def forward(self, input_ids):
        hidden = self.net(input_ids=input_ids).last_hidden_state
        if self.other is not None:
            hidden = hidden + self.other(input_ids=input_ids).last_hidden_state
        return self.head(self.drop(hidden))


def example():
    return {"input_ids": torch.randint(5, 50, (2, 6))}


def test_wrapper_plan_loads_with_its_model_and_restores_in_the_wrapper(tokenizer, tmp_path):
    torch.manual_seed(0)
    holder = Holder(transformers.BertModel(config(tokenizer)))
    report = gdt.apply(holder, {"net.encoder.layer.0.output.dropout": 0.06}, missing="keep")
    assert report["net.encoder.layer.0.output.dropout"].new_p == 0.06
    recorded = holder.net.config.guided_dropout["sites"]
    assert recorded["encoder.layer.0.output.dropout"] == pytest.approx(0.06)
    assert not any(k.startswith("net.") for k in recorded)
    assert not [n for n in report.notes if "not recorded" in n]
    holder.net.save_pretrained(tmp_path / "net")
    loaded = transformers.BertModel.from_pretrained(tmp_path / "net")
    assert loaded.encoder.layer[0].output.dropout.p == pytest.approx(0.06)
    loaded.encoder.layer[0].output.dropout.p = 0.1  # as if loaded without the adapter
    again = gdt.apply(Holder(loaded))  # restores the recorded plan, in the wrapper's names
    assert "restored the plan recorded in the model's config (guided_dropout)" in again.notes
    assert again.probabilities()["net.encoder.layer.0.output.dropout"] == pytest.approx(0.06)
    assert loaded.encoder.layer[0].output.dropout.p == pytest.approx(0.06)
    assert loaded.config.guided_dropout["sites"] == recorded


def test_sites_outside_the_configs_model_are_named(tokenizer):
    torch.manual_seed(0)
    holder = Holder(
        transformers.BertModel(config(tokenizer)), transformers.BertModel(config(tokenizer))
    )
    plan = {"net.encoder.layer.0.output.dropout": 0.06, "drop": 0.2}
    report = gdt.apply(holder, plan, missing="keep", example_input=example())
    assert report.probabilities()["drop"] == 0.2
    recorded = holder.net.config.guided_dropout["sites"]
    assert recorded["encoder.layer.0.output.dropout"] == pytest.approx(0.06)
    assert "drop" not in recorded and not any(k.startswith(("net.", "other.")) for k in recorded)
    (note,) = [n for n in report.notes if "not recorded" in n]
    assert "BertModel (model.net)" in note and "'drop'" in note
    assert "'other.encoder.layer.0.output.dropout'" in note


def test_wrapper_own_dropout_is_traced_with_an_example_for_the_wrapper(tokenizer):
    """A LightningModule-like wrapper with a head of its own (encoder, dropout, classifier): with
    ``example_input`` (a batch for the wrapper's forward) its dropout is a live site; with a guessed input only the model inside runs, and the head's dropout is named as not
    traced with that fix, not as never used (it was called dead, "never used by a training-mode
    forward", even with example_input given)."""
    torch.manual_seed(0)
    holder = Holder(transformers.BertModel(config(tokenizer)))
    live = gdt.sites(holder, example_input=example())
    assert "drop" in [s.name for s in live] and "drop" not in live.dead
    report = gdt.apply(holder, {"drop": 0.2}, missing="keep", example_input=example())
    assert report["drop"].new_p == 0.2 and holder.drop.p == 0.2
    guessed = gdt.sites(holder)  # the input is guessed for the BertModel inside
    assert "net.encoder.layer.0.output.dropout" in [s.name for s in guessed]
    why = guessed.dead["drop"]
    assert "outside BertModel (model.net)" in why and "example_input" in why, why
