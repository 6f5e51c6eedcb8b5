"""gd_cli.corpus: reading, choosing, sharding and tokenising text; loading models; losses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gd_cli import corpus as gdc


def test_read_paragraphs_skips_headings_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(
        " = Valkyria Chronicles = \n\n Senjō no  Valkyria 3 : Unrecorded Chronicles . \n"
        " = = Gameplay = = \n\n As with previous games , a = b holds . \n   \n",
        encoding="utf-8",
    )
    assert gdc.read_paragraphs(p) == [
        "Senjō no Valkyria 3 : Unrecorded Chronicles .",
        "As with previous games , a = b holds .",
    ]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "non-empty"),
        (b" = Heading = \n\n", "non-empty"),
        (b"\x00\x00binary", "binary"),
        (b"caf\xe9 latin-1", "UTF-8"),
    ],
)
def test_unusable_corpus_raises_corpus_error(tmp_path: Path, content: bytes, words: str) -> None:
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(gdc.CorpusError, match=words) as info:
        gdc.read_paragraphs(p)
    assert str(p) in str(info.value) and "fix:" in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(gdc.CorpusError, match="does not exist"):
        gdc.read_paragraphs(tmp_path / "nope.txt")
    with pytest.raises(gdc.CorpusError, match="folder"):
        gdc.read_paragraphs(tmp_path)


def test_python_docs_corpus_is_prose() -> None:
    paras = gdc.python_docs_paragraphs()
    assert len(paras) > 300
    assert all(len(p) >= 80 and "\n" not in p and "  " not in p for p in paras)
    assert not any(set(p) <= set("*=-~^ ") for p in paras)
    c = gdc.load_corpus(None)
    assert c.source == "python-docs" and c.texts == tuple(paras)
    assert c.sha256 == gdc.texts_sha256(paras)


@given(n=st.integers(1, 30), m=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_selection_is_a_seeded_prefix(n: int, m: int, seed: int) -> None:
    texts = [f"t{i}" for i in range(20)]
    a, b = gdc.select(texts, n, seed), gdc.select(texts, m, seed)
    k = min(n, m, 20)
    assert a[:k] == b[:k]
    assert len(a) == min(n, 20) and len(set(a)) == len(a)


def test_selection_depends_on_the_seed() -> None:
    texts = [f"t{i}" for i in range(50)]
    assert gdc.select(texts, 10, 0) != gdc.select(texts, 10, 1)
    with pytest.raises(gdc.ArgumentError, match="samples"):
        gdc.select(texts, 0)


@given(n=st.integers(0, 40), world=st.integers(1, 6))
def test_shards_are_disjoint_and_cover(n: int, world: int) -> None:
    items = list(range(n))
    parts = [gdc.shard(items, r, world) for r in range(world)]
    assert sorted(x for part in parts for x in part) == items
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_bad_shard_arguments() -> None:
    with pytest.raises(gdc.ArgumentError, match="rank"):
        gdc.shard([1, 2], 2, 2)


def test_tokenize_truncates_and_pads(tiny_model: Path) -> None:
    torch = pytest.importorskip("torch")
    tm = gdc.load_text_model(str(tiny_model))
    long = " ".join(["film"] * 50)
    batches = gdc.tokenize(tm.tokenizer, [long, "the song", "a"], seq_len=10, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 10]), torch.Size([1, 10])]
    assert batches[0]["attention_mask"].sum(1).tolist() == [10, 4]  # [CLS] the song [SEP]
    assert batches[1]["attention_mask"].sum().item() == 3
    pad = tm.tokenizer.pad_token_id
    assert (batches[0]["input_ids"][1, 4:] == pad).all()
    with pytest.raises(gdc.ArgumentError, match="seq_len"):
        gdc.tokenize(tm.tokenizer, ["a"], seq_len=1, batch_size=1)


def test_model_kind_and_objective(tiny_model: Path) -> None:
    pytest.importorskip("torch")
    tm = gdc.load_text_model(str(tiny_model))
    assert tm.objective == "mlm" and type(tm.model).__name__ == "BertForMaskedLM"
    assert not tm.model.training
    enc = gdc.load_text_model(str(tiny_model), "contrastive")
    assert type(enc.model).__name__ == "BertModel"
    with pytest.raises(gdc.ArgumentError, match="--objective mlm"):
        gdc.load_text_model(str(tiny_model), "clm")
    with pytest.raises(gdc.ArgumentError, match="objective"):
        gdc.load_text_model(str(tiny_model), "bogus")


def test_losses_mask_by_content_not_call_order(tiny_model: Path) -> None:
    torch = pytest.importorskip("torch")
    tm = gdc.load_text_model(str(tiny_model))
    texts = ["the film was a song", "a river and a city", "the team at the station"]
    b1, b2 = gdc.tokenize(tm.tokenizer, texts, seq_len=12, batch_size=2)
    loss = gdc.objective_loss(tm, seed=3)
    first = loss(tm.model, b1)
    loss(tm.model, b2)
    again = gdc.objective_loss(tm, seed=3)
    again(tm.model, b2)
    assert torch.equal(again(tm.model, b1), first)  # same batch, same masks, whatever came before
    other = gdc.objective_loss(tm, seed=4)(tm.model, b1)
    assert not torch.equal(other, first)
