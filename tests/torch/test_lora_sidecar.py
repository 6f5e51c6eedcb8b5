"""Issue 28: a LoRA sidecar (``guided_dropout.json``) is checked before it is used."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="the [peft] extra is not installed")

import adapters.torch as gdt  # noqa: E402
import adapters.torch.lora as gdp  # noqa: E402
from gd_core import ProfileError, ProfileMismatchError  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def plain_llama(layers=1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def lora_llama(layers=2, adapter="default"):
    lora = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=TARGETS)
    return peft.get_peft_model(plain_llama(layers), lora, adapter_name=adapter)


def saved(tmp_path, layers=1, adapter="default"):
    """A sidecar saved from a model with ``layers`` layers, each LoRA dropout at its own p."""
    model = lora_llama(layers, adapter)
    sites = gdp.lora_sites(model)
    gdt.apply(model, {s.name: 0.01 * (i + 1) for i, s in enumerate(sites)})
    gdt.save_peft(model, tmp_path / "adapter")
    return tmp_path / "adapter", {s.name: s.p for s in sites}


def test_another_adapter_name_is_restored_module_by_module(tmp_path):
    folder, saved_p = saved(tmp_path, layers=2)
    fresh = lora_llama(2, adapter="mine")
    with pytest.warns(UserWarning, match="adapter 'default', restored onto .* adapter 'mine'"):
        got = gdt.load_peft(fresh, folder)
    now = {s.name: s.p for s in gdp.lora_sites(fresh)}
    assert got == now  # what was restored, by the model's names
    assert sorted(got.values()) == pytest.approx(sorted(saved_p.values()))
    assert all(n.endswith(".lora_dropout.mine") for n in got)


def test_entries_for_modules_the_model_lacks_are_refused(tmp_path):
    folder, _ = saved(tmp_path, layers=2)
    with pytest.raises(ProfileMismatchError, match=r"guided_dropout.json: .*layers\.1\."):
        gdt.load_peft(lora_llama(1), folder)


def test_a_sidecar_of_fewer_layers_restores_those_and_warns_about_the_rest(tmp_path):
    folder, saved_p = saved(tmp_path, layers=1)
    model = lora_llama(2)
    with pytest.warns(UserWarning, match=r"holds no p for 2 LoRA dropouts"):
        got = gdt.load_peft(model, folder)
    assert got == pytest.approx(saved_p)


@pytest.mark.parametrize("bad", [1.5, float("nan"), -0.1, None, "0.1"])
def test_a_bad_p_is_refused_at_load_naming_the_entry(tmp_path, bad):
    folder, saved_p = saved(tmp_path)
    name = sorted(saved_p)[0]
    data = json.loads((folder / "guided_dropout.json").read_text())
    data["p"][name] = bad
    (folder / "guided_dropout.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=rf"p\['{name}'\].*expected a probability in \[0, 1\)"):
        gdt.load_peft(lora_llama(1), folder)


def test_an_unknown_version_is_refused(tmp_path):
    folder, _ = saved(tmp_path)
    data = json.loads((folder / "guided_dropout.json").read_text())
    assert data["version"] == 1
    data["version"] = 99
    (folder / "guided_dropout.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"'version': expected 1 .*received 99"):
        gdt.load_peft(lora_llama(1), folder)


def test_loading_an_adapter_with_a_sidecar_without_load_peft_warns(tmp_path):
    import warnings

    folder, _ = saved(tmp_path)
    ids = torch.randint(0, 64, (1, 6))
    loaded = peft.PeftModel.from_pretrained(plain_llama(), folder)
    loaded.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded(input_ids=ids)
        loaded(input_ids=ids)
    ours = [w for w in caught if "guided_dropout.json" in str(w.message)]
    assert len(ours) == 1 and "load_peft" in str(ours[0].message)
    again = peft.PeftModel.from_pretrained(plain_llama(), folder)
    gdt.load_peft(again, folder)  # restored: no warning
    again.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again(input_ids=ids)
    assert not [w for w in caught if "guided_dropout.json" in str(w.message)]
