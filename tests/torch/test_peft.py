"""PEFT / LoRA: each LoRA module's dropout from the Fisher of the base weight it adapts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="the [peft] extra is not installed")

import adapters.torch as gdt  # noqa: E402
import adapters.torch.lora as gdp  # noqa: E402
from gd_core import SensitivityProfile  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_bert_config():
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )


def batches(n=2, size=4, seq=10):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 64, (size, seq), generator=g)} for _ in range(n)]


def base_profile(model, loss):
    """A profile of the base model holding the Fisher of every weight LoRA may adapt."""
    return gdt.profile(model, batches(), loss=loss, progress=False, tensors=gdt.lora_tensors(model))


LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


@pytest.mark.parametrize("granularity", ["site", "unit"])
def test_lora_llama_probabilities_train_save_load(tmp_path, granularity):
    base = tiny_llama()
    prof = base_profile(base, "clm")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=LLAMA_TARGETS)
    model = peft.get_peft_model(base, cfg)
    report = gdt.apply(model, prof, granularity=granularity)
    lora = [r for r in report if r.kind == "lora"]
    assert len(lora) == 2 * len(LLAMA_TARGETS)
    assert all(r.source == "profile" and "LoRA on model.layers." in r.note for r in lora)
    assert len({round(r.new_p, 6) for r in lora}) > 2  # differ by module
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (
        q.lora_dropout["default"].p
        == report["base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.default"].new_p
    )
    # a training step runs
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = batches(1)[0]
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    out.loss.backward()
    opt.step()
    # saves and loads with its probabilities
    gdt.save_peft(model, tmp_path / "adapter")
    fresh = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    gdt.load_peft(fresh, tmp_path / "adapter")
    got = {s.name: s.p for s in gdp.lora_sites(fresh)}
    assert got == pytest.approx({r.site: r.new_p for r in lora})


def test_lora_bert_classifier_from_encoder_profile():
    cfg = tiny_bert_config()
    torch.manual_seed(0)
    encoder = transformers.BertModel(cfg)
    prof = base_profile(encoder, "contrastive")
    clf = transformers.BertForSequenceClassification(cfg)
    clf.bert.load_state_dict(encoder.state_dict())
    lcfg = peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=BERT_TARGETS, task_type="SEQ_CLS"
    )
    model = peft.get_peft_model(clf, lcfg)
    report = gdt.apply(model, prof, missing="upper")
    lora = [r for r in report if r.kind == "lora"]
    # lora_dropout=0.0: PEFT uses nn.Identity; apply puts nn.Dropout there
    # attention.output.dense and output.dense both match "output.dense": 5 modules a layer
    assert len(lora) == 2 * 5 and all(r.old_p == 0.0 for r in lora)
    assert all(r.source == "profile" for r in lora), [r for r in lora if r.source != "profile"]
    assert len({round(r.new_p, 6) for r in lora}) > 2
    names = {r.site for r in report}
    assert (
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_dropout.default" in names
    )
    model.train()
    out = model(input_ids=batches(1)[0]["input_ids"], labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()


def test_lora_profile_without_base_weights_follows_missing():
    base = tiny_llama()
    # guarded weights only: every block's (the dataflow sites), not the LM head after the last
    prof = gdt.profile(base, batches(1), loss="clm", progress=False)
    assert "lm_head.weight" not in prof.tensor_means
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_dropout=0.05, target_modules=["q_proj", "lm_head"])
    )
    report = gdt.apply(model, prof, missing="keep")
    by = {r.site.split(".")[-3]: r.source for r in report if r.kind == "lora"}
    assert by == {"q_proj": "profile", "lm_head": "keep"}, by
    with pytest.raises(Exception, match="lora_tensors"):
        gdt.apply(model, prof, missing="error")


def test_base_name_and_profile_type():
    assert gdp.base_name("base_model.model.bert.x.base_layer.weight") == "bert.x.weight"
    assert isinstance(base_profile(tiny_llama(), "clm"), SensitivityProfile)


def test_peft_model_without_profile_asks_for_one(tmp_path, monkeypatch):
    from gd_core import ProfileNotFoundError

    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ProfileNotFoundError, match="gd profile"):
        gdt.apply(model)
