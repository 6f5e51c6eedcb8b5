"""Issue 28: the automatic-profile cache is keyed by the weights too, not by the architecture only."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from adapters.torch.auto import weights_id  # noqa: E402
from gd_core import ProfileMismatchError  # noqa: E402

FAST = {"samples": 8, "seq_len": 16, "progress": False}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def checkpoint(tokenizer, folder, seed):
    """A tiny BERT MLM with weights drawn from ``seed``, saved to ``folder`` and loaded back."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=32,
    )
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return transformers.BertForMaskedLM.from_pretrained(folder)


def test_another_checkpoint_of_the_architecture_recomputes(tokenizer, tmp_path, cache):
    folder = tmp_path / "ckpt"
    first = gdt.apply(checkpoint(tokenizer, folder, 0), auto_profile=FAST)
    assert first.notes[0].startswith("profile computed by apply()")
    # another fine-tune saved to the same folder: same names and shapes, other values
    second_model = checkpoint(tokenizer, folder, 1)
    second = gdt.apply(second_model, auto_profile=FAST)
    assert "not using the cached profile" in second.notes[0], second.notes
    assert f"checkpoint {folder}" in second.notes[0]
    assert second.notes[1].startswith("profile computed by apply()")
    assert len(list(cache.glob("*.profile.npz"))) == 2  # one entry per checkpoint
    # each checkpoint finds its own entry, which names the checkpoint and its digest
    again = gdt.apply(checkpoint(tokenizer, folder, 1), auto_profile=FAST)
    assert again.notes[0].startswith("profile from the cache"), again.notes
    assert f"on checkpoint {folder} (weights " in again.notes[0]
    from gd_core import SensitivityProfile

    entries = [SensitivityProfile.load(p) for p in cache.glob("*.profile.npz")]
    labels = [n for n, _ in entries[0].fingerprint.params]  # the tensors the profile covers
    digests = {e.metadata["weights_digest"] for e in entries}
    assert weights_id(second_model, labels).digest in digests
    assert weights_id(second_model, labels).digest[:12] in again.notes[0]
    assert again.probabilities() == second.probabilities()
    back = gdt.apply(checkpoint(tokenizer, folder, 0), auto_profile=FAST)
    assert back.probabilities() == first.probabilities()


def test_nothing_to_compute_with_refuses_another_checkpoints_profile(tokenizer, tmp_path):
    gdt.apply(checkpoint(tokenizer, tmp_path / "a", 0), auto_profile=FAST)
    other = checkpoint(tokenizer, tmp_path / "b", 1)
    with pytest.raises(ProfileMismatchError, match=f"came from checkpoint {tmp_path / 'a'}"):
        gdt.apply(other, auto_profile=False)


def test_a_profile_cached_by_the_user_records_no_weights_and_says_so(tokenizer, tmp_path):
    model = checkpoint(tokenizer, tmp_path / "a", 0)
    ids = tokenizer(["a short text here"] * 2, return_tensors="pt")
    batches = [{"input_ids": ids["input_ids"][i : i + 1]} for i in range(2)]
    loss = gdt.MaskedLMLoss(mask_token_id=tokenizer.mask_token_id, seed=0)
    gdt.profile(model, batches, loss, cache=True)
    report = gdt.apply(checkpoint(tokenizer, tmp_path / "b", 1), auto_profile=FAST)
    assert "records no weights digest" in report.notes[0], report.notes


def test_the_digest_reads_values_names_and_dtypes():
    torch.manual_seed(0)
    a = torch.nn.Linear(300, 300)  # 90,000 values: sampled
    same = weights_id(a)
    assert weights_id(a) == same
    with torch.no_grad():
        a.weight[0, 0] += 1.0  # the sample starts at the first value
    assert weights_id(a) != same
    assert weights_id(a.double()).digest != weights_id(a.float()).digest


def test_a_task_model_loaded_twice_finds_its_encoders_profile(tokenizer, tmp_path):
    """The fresh head is drawn anew at every load: it is not part of the key."""
    folder = tmp_path / "enc"
    checkpoint(
        tokenizer, folder, 0
    )  # a pretrained checkpoint (MLM head: dropped by the task model)
    load = transformers.BertForSequenceClassification.from_pretrained
    first = gdt.apply(load(folder), auto_profile=FAST)
    assert first.notes[0].startswith("profile computed by apply()")
    second = gdt.apply(load(folder), auto_profile=FAST)  # another random head
    assert second.notes[0].startswith("profile from the cache"), second.notes
