"""Issue 24, training-mode exports: renamed attention-rate attributes matched by what they
guard, a module called twice is one site, a graph whose only Dropout nodes have p = 0 still gets
the residual sites torch adds (named as torch names them)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch exports the test models")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import adapters.onnx as gdo  # noqa: E402
import adapters.torch as gdt  # noqa: E402
import gd_core  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from heldout_models import Logits  # noqa: E402

_SMALL = dict(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
)


def _trained(model):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _training_export(model, names=("ids",)):  # type: ignore[no-untyped-def]
    from gd_cli.models import export_training_onnx

    buf = io.BytesIO()
    export_training_onnx(model, (torch.randint(0, 60, (2, 6)),), buf, input_names=list(names))
    return onnx.load_from_string(buf.getvalue())


def _profile(model):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    fisher = {n: rng.random(tuple(p.shape)) for n, p in model.named_parameters()}
    return gd_core.SensitivityProfile.from_fisher(fisher, gdt.sites(model))


def test_renamed_attention_rate_is_matched_by_what_it_guards() -> None:
    """GPT-NeoX: torch's site is the ``attention.attention_dropout`` rate, the export's node sits
    in ``attention``'s scope (``attention.dropout``). It was reported absent ("an exporter folded
    them away") and kept the old ratio; it now gets torch's p."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        **_SMALL, attention_dropout=0.1, hidden_dropout=0.1, attn_implementation="eager"
    )
    model = Logits(_trained(transformers.GPTNeoXForCausalLM(cfg)))
    proto = _training_export(model)
    prof = _profile(model)
    torch_p = gdt.apply(model, prof).probabilities()
    report = gdo.apply(proto, prof)
    assert report.absent == []
    for layer in (0, 1):
        onnx_site = f"inner.gpt_neox.layers.{layer}.attention.dropout"
        torch_site = f"inner.gpt_neox.layers.{layer}.attention.attention_dropout"
        assert report.matched[onnx_site] == torch_site
        assert report[onnx_site].new_p == pytest.approx(torch_p[torch_site], abs=1e-6)
    assert any("under another name" in n for n in report.notes)
    assert not any("folded" in n for n in report.notes)


def test_a_module_called_twice_is_one_site() -> None:
    """RoBERTa's classification head calls ``classifier.dropout`` twice: the export scopes the
    second call ``classifier/dropout_1``, which was a second site torch does not have."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(**{**_SMALL, "max_position_embeddings": 20}, num_labels=3)
    proto = _training_export(_trained(transformers.RobertaForSequenceClassification(cfg)))
    nodes = gdo.site_nodes(proto)
    assert "classifier.dropout_1" not in nodes
    assert len(nodes["classifier.dropout"]) == 2
    sites = {s.name: set(s.params) for s in gdo.sites(proto)}
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} & sites["classifier.dropout"]


def test_p0_attention_nodes_do_not_suppress_residual_sites() -> None:
    """Qwen2's only dropout is a zero attention rate: its training-mode export has p = 0 Dropout
    nodes there, which suppressed insertion (2 sites instead of torch's 7). The embedding site is
    named ``embed_tokens.gd_dropout`` as in torch (the export's Shape readers of the embedding
    hid it behind the first norm's Cast)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**_SMALL, num_key_value_heads=2, attn_implementation="eager")
    model = Logits(_trained(transformers.Qwen2ForCausalLM(cfg)))
    proto = _training_export(model)
    t = {s.name: set(s.params) for s in gdt.sites(model)}
    o = {s.name: set(s.params) for s in gdo.sites(proto)}
    hooks = {n for n in t if n.endswith(".gd_dropout")}
    assert len(hooks) == 5 and hooks <= set(o)
    assert "inner.model.embed_tokens.gd_dropout" in o
    for name in hooks:
        assert o[name] == t[name], name
    prof = _profile(model)
    torch_p = gdt.apply(model, prof).probabilities()
    report = gdo.apply(proto, prof)
    assert report.absent == []
    got = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    assert got == pytest.approx(torch_p)


class _Pixels(torch.nn.Module):
    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.inner = inner

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.inner(pixel_values=x).logits


def test_swin_attention_rate_and_differing_reads_carry_torchs_p() -> None:
    """Swin: the attention rate is ``attention.attention_dropout`` in torch and the node sits in
    ``attention``'s scope. torch's groups here are its structural guess (its forward on a guessed
    input fails for pixel inputs), so a block dropout's parameters overlap the attention site
    more than its own: it is still its same-named site (not absent), with the differences in a
    note, and every site carries torch's p."""
    from gd_cli.models import export_training_onnx

    torch.manual_seed(0)
    cfg = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        attention_probs_dropout_prob=0.1,
        hidden_dropout_prob=0.1,
        drop_path_rate=0.0,
        num_labels=3,
    )
    model = _Pixels(_trained(transformers.SwinForImageClassification(cfg)))
    buf = io.BytesIO()
    export_training_onnx(model, (torch.randn(2, 3, 32, 32),), buf, input_names=["x"])
    proto = onnx.load_from_string(buf.getvalue())
    prof = _profile(model)
    torch_p = gdt.apply(model, prof).probabilities()
    report = gdo.apply(proto, prof)
    assert report.absent == []
    assert sorted(report.matched.get(s, s) for s in report.probabilities()) == sorted(torch_p)
    got = {report.matched.get(s, s): p for s, p in report.probabilities().items()}
    assert got == pytest.approx(torch_p)
    for stage in (0, 1):
        site = f"inner.swin.encoder.layers.{stage}.blocks.0.attention.dropout"
        assert report.matched[site] == site.replace(".dropout", ".attention_dropout")
