"""ONNX adapter end to end on a tiny BERT classifier exported from torch in training mode.

Export (opset 14..17) -> apply a profile -> check -> ORT training artifacts -> a few training
steps with falling loss; Fisher through ORT against a torch per-sample autograd reference.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to export the test models")
pytest.importorskip("transformers", reason="transformers builds the test BERT")
pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training")
onnx = pytest.importorskip("onnx")

from ort_helpers import train_losses  # noqa: E402

import adapters.onnx as ao  # noqa: E402
from gd_core import Fingerprint, ProfileMismatchError, SensitivityProfile, Site  # noqa: E402

N_SITES = 8  # embeddings + 3 per layer x 2 layers + classifier


def torch_sites(model) -> list[Site]:
    """Every nn.Dropout module, guarding the parameters of its parent module (test rule)."""
    modules = dict(model.named_modules())
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Dropout):
            continue
        parent = name.rpartition(".")[0]
        if parent:
            params = [f"{parent}.{n}" for n, _ in modules[parent].named_parameters()]
        else:  # the classifier's dropout guards the pooler
            params = [n for n, _ in model.named_parameters() if n.startswith("bert.pooler.")]
        out.append(Site(name, tuple(params)))
    return out


def synthetic_profile(model, seed: int = 0, sites=None, fp=None) -> SensitivityProfile:
    """A profile of ``model``'s dropout sites from a random (positive) Fisher diagonal."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    fisher = {n: rng.uniform(0.01, 1.0) * np.ones(tuple(p.shape)) for n, p in params.items()}
    if fp is None:
        fp = Fingerprint.from_shapes({n: tuple(p.shape) for n, p in params.items()})
    return SensitivityProfile.from_fisher(
        fisher, sites or torch_sites(model), fingerprint=fp, mapping={"p_upper": 0.1}
    )


def ratios(model) -> dict[str, float]:
    """``{Dropout node name: ratio}`` read back from the graph's initializers."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "Dropout"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sites_are_the_torch_dropout_modules(exported, attn):
    model, path = exported(14 if attn == "eager" else 17, attn)
    found = ao.sites(path)
    torch_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert [s.name for s in found] == torch_names and len(found) == N_SITES
    by_name = {s.name: s for s in found}
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert q in by_name["bert.encoder.layer.0.attention.self.dropout"].params
    guarded = [p for s in found for p in s.params]
    assert len(guarded) == len(set(guarded))  # each parameter guarded by one site
    assert set(guarded) <= set(dict(model.named_parameters()))


@pytest.mark.parametrize(("opset", "attn"), [(14, "eager"), (16, "sdpa"), (17, "sdpa")])
def test_rewrite_check_artifacts_and_train(exported, batch, tmp_path, opset, attn):
    model, path = exported(opset, attn)
    prof = synthetic_profile(model)
    report = ao.apply(path, prof)
    out = report.model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    assert report.absent == [] and report.counts() == {"profile": N_SITES}
    expected = prof.probabilities()
    nodes = report.nodes
    got = ratios(out)
    for site, p in expected.items():
        for node in nodes[site]:
            assert got[node] == pytest.approx(p, abs=1e-7), node
    assert len(set(np.round(list(expected.values()), 6))) > 2  # the profile is not uniform
    n_ln = sum(n.op_type == "LayerNormalization" for n in out.graph.node)
    assert n_ln == (0 if opset < 17 else 5)
    assert sum("LayerNormalization" in c for c in report.changes) == n_ln
    if attn == "sdpa":  # torch's SDPA export leaves attention dropout inert: apply activates it
        assert report.activated == [
            "bert.encoder.layer.0.attention.self.dropout",
            "bert.encoder.layer.1.attention.self.dropout",
        ]
    art = ao.make_artifacts(out, tmp_path / "art")
    losses = train_losses(art, batch)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    eval_model = onnx.load(str(art.eval_model))
    drops = [n for n in eval_model.graph.node if n.op_type == "Dropout"]
    assert drops and all(len(n.input) < 3 or not n.input[2] for n in drops)  # eval: inert


def test_opset17_layernorm_needs_the_repair(exported, tmp_path):
    model, path = exported(17, "sdpa")
    report = ao.apply(path, synthetic_profile(model), repair=False)
    out = report.model
    assert report.changes == []
    with pytest.raises(Exception, match="OutputDefs"):
        ao.make_artifacts(out, tmp_path, repair=False, optimizer=None)


def test_eval_graph_ignores_ratios_while_training_graph_uses_them(exported, batch, tmp_path):
    model, path = exported(14, "eager")
    report = ao.apply(path, synthetic_profile(model), ratios_as_inputs=True)
    out = report.model
    assert len(report.ratio_inputs) == N_SITES
    assert {i.name for i in out.graph.input} >= set(report.ratio_inputs.values())
    art = ao.make_artifacts(out, tmp_path, optimizer=None)
    module, _, _ = art.open(optimizer=False)

    def run(multiplier: float, training: bool) -> float:
        module.train(training)
        feeds = {**batch, **ao.ratio_feeds(report, multiplier=multiplier)}
        if training:
            module.lazy_reset_grad()
        return float(module(*ao.module_inputs(module, feeds)))

    assert run(0.0, False) == run(5.0, False)  # eval: ratios irrelevant
    assert run(0.0, True) == pytest.approx(run(0.0, False), rel=1e-5)  # p=0: no dropout
    with_dropout = [run(5.0, True) for _ in range(3)]  # p up to 0.5
    assert len(set(with_dropout)) == 3 and run(0.0, True) not in with_dropout


def _torch_fisher(model, batch) -> dict[str, np.ndarray]:
    """Mean over samples of squared per-sample cross-entropy gradients (autograd, eval mode)."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {n: np.zeros(tuple(p.shape)) for n, p in params.items()}
    n = len(batch["labels"])
    for i in range(n):
        out = model(
            input_ids=torch.from_numpy(batch["input_ids"][i : i + 1]),
            attention_mask=torch.from_numpy(batch["attention_mask"][i : i + 1]),
        ).logits
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(batch["labels"][i : i + 1]))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                sums[name] += g.double().numpy() ** 2
    return {k: v / n for k, v in sums.items()}


@pytest.mark.parametrize("fold", [False, True])
def test_fisher_through_ort_equals_torch_autograd(exported, batch, fold):
    model, path = exported(14, "eager", fold=fold)
    small = {k: v[:6] for k, v in batch.items()}
    fisher = ao.estimate_fisher(path, [small])
    ref = _torch_fisher(model, small)
    assert fisher.count == 6 and set(fisher) == set(ref)
    if fold:  # Linear weights were folded into transposed onnx::MatMul_N initializers
        assert any(p.transposed for p in ao.parameters(path))
    scale = max(float(v.max()) for v in ref.values())
    for name, want in ref.items():
        np.testing.assert_allclose(fisher[name], want, rtol=1e-4, atol=1e-7 * scale, err_msg=name)


def test_profile_from_another_model_is_refused(exported, make_bert):
    _, path = exported(14, "eager")
    wider = make_bert("eager", hidden=48)
    with pytest.raises(ProfileMismatchError, match="shape"):
        ao.apply(path, synthetic_profile(wider))


def test_profile_from_adapters_torch_applies_to_the_export(exported):
    adapters_torch = pytest.importorskip("adapters.torch", reason="the torch adapter is absent")
    model, path = exported(17, "sdpa")
    try:
        tsites, fp = adapters_torch.sites(model), adapters_torch.fingerprint(model)
    except Exception as exc:  # noqa: BLE001 - the other adapter's state is not under test here
        pytest.skip(f"adapters.torch could not list sites ({type(exc).__name__}: {exc})")
    prof = synthetic_profile(model, sites=tsites, fp=fp)
    report = ao.apply(path, prof)
    out = report.model
    assert report.absent == [] and report.counts().get("profile") == N_SITES
    for site, p in prof.probabilities().items():
        for node in report.nodes[site]:
            assert ratios(out)[node] == pytest.approx(p, abs=1e-7)


def test_docs_quickstart_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "onnx.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    runnable = [b for b in blocks if not b.startswith("# doc-test: skip")]
    quick = [b for b in runnable if "export in training mode" in b]
    assert len(quick) == 1  # tests/test_docs.py runs the others
    exec(compile(quick[0], "docs/onnx.md", "exec"), {"__name__": "docs_onnx"})
    out = capsys.readouterr().out
    assert "bert.embeddings.dropout" in out and "eval loss:" in out
