"""Issue 28: a plan recorded in ``config.json`` (``guided_dropout``) is checked before it is used."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from gd_core import ProfileError  # noqa: E402

HIDDEN = "bert.encoder.layer.0.output.dropout"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT classifier applied with {site: p} and saved: the folder and its config."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=20,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg)
    gdt.apply(model, {s.name: 0.02 for s in gdt.sites(model)})
    folder = tmp_path_factory.mktemp("m")
    model.save_pretrained(folder)
    return folder, json.loads((folder / "config.json").read_text())


def load_with(saved, tmp_path, plan, malformed=True):
    """The saved model with ``plan`` in its config.json; a malformed plan warns at load (the
    model still loads) and ``apply`` raises the error."""
    folder, config = saved
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config, "guided_dropout": plan}))
    if not malformed:
        return transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="could not be restored at load"):
        return transformers.BertForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "plan", ["0.1", [0.1, 0.2], 0.1, {"version": 1}, {"version": 1, "sites": 3}]
)
def test_a_plan_of_the_wrong_shape_is_refused_naming_the_file(saved, tmp_path, plan):
    loaded = load_with(saved, tmp_path, plan)
    with pytest.raises(ProfileError, match=r"config\.json: field 'guided_dropout(\.sites)?'") as e:
        gdt.apply(loaded)
    assert "fix:" in str(e.value) and "expected" in str(e.value)


def test_an_unknown_version_is_refused(saved, tmp_path):
    plan = {**saved[1]["guided_dropout"], "version": 99}
    with pytest.raises(ProfileError, match="guided_dropout.version.*expected 1.*received 99"):
        gdt.apply(load_with(saved, tmp_path, plan))


@pytest.mark.parametrize("bad", [None, 1.5, -0.1, float("nan"), "0.1", True])
def test_a_bad_p_is_refused_naming_the_site(saved, tmp_path, bad):
    plan = json.loads(json.dumps(saved[1]["guided_dropout"]))
    plan["sites"][HIDDEN] = bad
    with pytest.raises(ProfileError, match=rf"sites\['{HIDDEN}'\].*expected a probability"):
        gdt.apply(load_with(saved, tmp_path, plan))


def test_unit_rates_of_the_wrong_length_are_refused_at_apply(saved, tmp_path):
    plan = json.loads(json.dumps(saved[1]["guided_dropout"]))
    plan["sites"][HIDDEN] = [0.05] * 5  # the site drops 16 features
    plan["granularity"] = "unit"
    with pytest.raises(ProfileError, match=r"expected 16 per-unit rates.*received 5 rates"):
        gdt.apply(load_with(saved, tmp_path, plan))


def test_unknown_and_removed_sites_are_noted(saved, tmp_path):
    plan = json.loads(json.dumps(saved[1]["guided_dropout"]))
    plan["sites"]["bert.encoder.layer.7.output.dropout"] = 0.05  # a site the model lacks
    del plan["sites"][HIDDEN]  # a site of the model the plan lacks
    loaded = load_with(saved, tmp_path, plan, malformed=False)
    report = gdt.apply(loaded)
    notes = " ".join(report.notes)
    assert "does not have, skipped: ['bert.encoder.layer.7.output.dropout']" in notes
    assert f"does not name keep their current p: ['{HIDDEN}']" in notes
    assert str(tmp_path / "config.json") in notes
    assert report[HIDDEN].new_p == pytest.approx(0.1) and report[HIDDEN].source == "keep"
    assert report["bert.encoder.layer.0.attention.output.dropout"].new_p == pytest.approx(0.02)
