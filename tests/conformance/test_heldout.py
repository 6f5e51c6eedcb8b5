"""Issue 13: held-out architectures — what a dropout guards is decided by dataflow, with the same
site names and groups in every framework. Each test reproduces one bullet of the issue's
"What goes wrong today"."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from heldout_models import Logits, encoder, llama  # noqa: E402

_encoder = encoder


def _onnx(model: nn.Module, example: tuple, names: list[str], eval_mode: bool = False):  # type: ignore[no-untyped-def]
    import onnx

    buf = io.BytesIO()
    if eval_mode:
        model.eval()
        torch.onnx.export(model, example, buf, input_names=names, dynamo=False, opset_version=16)
    else:
        from gd_cli.models import export_training_onnx

        export_training_onnx(model, example, buf, input_names=names)
    return onnx.load_from_string(buf.getvalue())


def _groups(sites) -> dict[str, tuple[str, ...]]:  # type: ignore[no-untyped-def]
    return {s.name: tuple(sorted(s.params)) for s in sites}


L0 = "encoder.layers.0"


def test_transformer_encoder_torch_groups_by_dataflow() -> None:
    import adapters.torch as gdt

    g = _groups(gdt.sites(_encoder()))
    assert f"{L0}.self_attn.out_proj.weight" in g[f"{L0}.dropout1"]
    assert f"{L0}.linear2.weight" in g[f"{L0}.dropout2"]
    assert f"{L0}.linear2.weight" not in g[f"{L0}.dropout1"]
    assert g[f"{L0}.dropout1"] != g[f"{L0}.dropout2"]
    assert f"{L0}.self_attn.out_proj.weight" not in g[f"{L0}.self_attn.dropout"]
    assert f"{L0}.self_attn.in_proj_weight" in g[f"{L0}.self_attn.dropout"]


def test_transformer_encoder_hidden_sites_score_differently() -> None:
    import numpy as np

    import adapters.torch as gdt
    import gd_core

    model = _encoder()
    rng = np.random.default_rng(0)
    fisher = {n: rng.random(tuple(p.shape)) for n, p in model.named_parameters()}
    prof = gd_core.SensitivityProfile.from_fisher(fisher, gdt.sites(model))
    one, two = prof.site_names.index(f"{L0}.dropout1"), prof.site_names.index(f"{L0}.dropout2")
    assert prof.scores[one] != prof.scores[two]  # the issue: identical groups, tied probabilities
    probs = prof.probabilities()
    assert probs[f"{L0}.dropout1"] != probs[f"{L0}.dropout2"]


def test_transformer_encoder_torch_and_onnx_agree() -> None:
    import adapters.onnx as gdo
    import adapters.torch as gdt

    model = _encoder()
    proto = _onnx(model, (torch.randint(0, 50, (2, 5)),), ["ids"])
    assert _groups(gdt.sites(model)) == _groups(gdo.sites(proto))


def test_sequential_names_agree() -> None:
    import adapters.onnx as gdo
    import adapters.torch as gdt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    proto = _onnx(net, (torch.ones(2, 4),), ["x"])
    assert [s.name for s in gdt.sites(net)] == [s.name for s in gdo.sites(proto)]
    assert _groups(gdt.sites(net)) == _groups(gdo.sites(proto))


def _llama():  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    return llama()


def test_llama_zero_rate_attributes_do_not_suppress_insertion() -> None:
    import adapters.torch as gdt

    names = [s.name for s in gdt.sites(_llama())]
    # residual branches (attention and MLP outputs) of both layers and the embedding output
    assert len([n for n in names if n.startswith("model.layers.")]) >= 4
    assert any(n.startswith("model.embed_tokens") for n in names)
    assert not any("norm" in n.split(".")[-2] for n in names if "." in n)  # not after norms


def test_llama_apply_installs_every_profile_site() -> None:
    import adapters.torch as gdt

    model = _llama()
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]

    def loss(m, batch):  # type: ignore[no-untyped-def]
        out = m(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss.reshape(1).expand(batch["input_ids"].shape[0])

    # the issue: a profile made with add_sites=True has 7 sites; apply installed 2, silently
    prof = gdt.profile(model, batches, loss=loss, progress=False, add_sites=True)
    assert len(prof.site_names) >= 5
    task = _llama()
    report = gdt.apply(task, prof)
    listed = {r.site for r in report.rows}
    assert listed == set(prof.site_names)
    modules = dict(task.named_modules())
    for name in prof.site_names:  # every hook site really installed, not only listed
        if name.endswith(".gd_dropout"):
            assert isinstance(modules.get(name), gdt.GuidedDropout), name
    task.train()
    out = task(input_ids=batches[0]["input_ids"], labels=batches[0]["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---- Keras MultiHeadAttention ---------------------------------------------------------------


def _keras_mha_encoder(n_layers: int = 2):  # type: ignore[no-untyped-def]
    keras = pytest.importorskip("keras")
    inp = keras.Input((6,), dtype="int32", name="ids")
    x = keras.layers.Embedding(40, 16, name="embed")(inp)
    for i in range(n_layers):
        att = keras.layers.MultiHeadAttention(2, 8, dropout=0.1, name=f"mha{i}")(x, x)
        att = keras.layers.Dropout(0.1, name=f"drop{i}")(att)
        x = keras.layers.LayerNormalization(name=f"norm{i}")(x + att)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inp, out)


def test_keras_mha_names_are_stable_across_builds() -> None:
    import adapters.keras as gdk

    first = [s.name for s in gdk.sites(_keras_mha_encoder())]
    second = [s.name for s in gdk.sites(_keras_mha_encoder())]
    assert first == second
    assert "mha0.dropout" in first and "mha1.dropout" in first


def test_keras_mha_profile_applies_to_a_second_build() -> None:
    import numpy as np

    import adapters.keras as gdk

    keras = pytest.importorskip("keras")
    first = _keras_mha_encoder()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (8, 6)).astype("int32")
    y = rng.integers(0, 3, (8,)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    prof = gdk.profile(first, [(x, y)], loss, progress=False)
    second = _keras_mha_encoder()  # same architecture, built again in this process
    report = gdk.apply(second, prof)  # the issue: refused, its auto-named sites differ
    assert {r.site for r in report.rows} == set(prof.site_names)
    assert {"mha0.dropout", "mha1.dropout"} <= set(prof.site_names)


def test_keras_mha_dropout_is_reported_as_what_it_is() -> None:
    import adapters.keras as gdk

    model = _keras_mha_encoder()
    rates = {s.name: 0.2 for s in gdk.sites(model)}
    report = gdk.apply(model, rates, schedule={"kind": "early", "steps": 5})
    how = {r.site: r.how for r in report.rows}
    assert how["mha0.dropout"] == "MultiHeadAttention dropout rate"  # not a GuidedDropout
    assert how["drop0"].startswith("GuidedDropout")
    assert any("schedule does not reach mha0.dropout, mha1.dropout" in n for n in report.notes)
    assert report.model.get_layer("mha1").get_config()["dropout"] == 0.2


def test_keras_two_mha_layers_guard_their_own_weights() -> None:
    import adapters.keras as gdk

    g = {s.name: s.params for s in gdk.sites(_keras_mha_encoder())}
    for i, other in ((0, 1), (1, 0)):
        assert not any(p.startswith(f"mha{other}.") for p in g[f"mha{i}.dropout"])
        assert any(p.startswith(f"mha{i}.query") for p in g[f"mha{i}.dropout"])


# ---- ONNX graphs without Dropout nodes ------------------------------------------------------


def test_onnx_eval_export_gets_sites() -> None:
    import adapters.onnx as gdo

    model = _encoder()
    proto = _onnx(model, (torch.randint(0, 50, (2, 5)),), ["ids"], eval_mode=True)
    assert [n for n in proto.graph.node if n.op_type == "Dropout"] == []
    names = [s.name for s in gdo.sites(proto)]
    # the eval graph has lost the nn.Dropout modules: sites go on the embedding output, the
    # attention probabilities (issue 24) and the residual branches, named after the modules
    # returning them (tests/onnx/test_onnx_insert.py)
    assert names == [
        "embed.gd_dropout",
        f"{L0}.self_attn.dropout",
        f"{L0}.self_attn.gd_dropout",
        f"{L0}.linear2.gd_dropout",
    ]


def test_keras_mha_model_loads_in_fresh_process_after_apply(tmp_path, warm_python) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    import adapters.keras as gdk

    model = _keras_mha_encoder()
    names = [s.name for s in gdk.sites(model)]
    report = gdk.apply(model, {n: 0.25 for n in names})
    path = tmp_path / "mha.keras"
    getattr(report, "model", model).save(path)
    code = (
        "import keras, adapters.keras as gdk\n"
        f"m = keras.saving.load_model({str(path)!r})\n"
        "ds = [getattr(x, '_dropout_layer', x) for x in m.layers]\n"
        "print(sorted({round(float(d.rate), 4) for d in ds if 'ropout' in type(d).__name__}))\n"
        "print(sorted(s.name for s in gdk.sites(m)))\n"
    )
    # a process of its own, forked warm (tests/_warm.py)
    done = subprocess.run([warm_python, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "[0.25]"  # the MHA layers' guided rates survive save and load
    assert lines[-1] == str(sorted(names))


# ---- the same model in torch and ONNX: names, groups, no spurious sharing, probabilities ----


def _hf(kind: str):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
        )
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "encoder", "sequential"])
def test_torch_and_onnx_agree_site_by_site(kind: str) -> None:
    """Sites are the same when they guard the same parameters (issue 24): GPT-2 under SDPA
    exports its attention-probability Dropout in the attention's scope (``attn.dropout``) while
    torch's site is the ``attn.attn_dropout`` rate; they guard the same parameters, so they are
    one site and a torch profile gives it torch's p (this was a strict xfail)."""
    import numpy as np

    import adapters.onnx as gdo
    import adapters.torch as gdt
    from gd_core.dataflow import shared_groups
    from gd_core.identity import correspond

    if kind == "encoder":
        model, example, names = _encoder(), (torch.randint(0, 50, (2, 5)),), ["ids"]
    elif kind == "sequential":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 8), nn.Dropout(0.2))
        example, names = (torch.ones(2, 4),), ["x"]
    else:
        model, example, names = Logits(_hf(kind)), (torch.randint(0, 60, (2, 6)),), ["ids"]
    t = gdt.sites(model)
    proto = _onnx(model, example, names)
    o = gdo.sites(proto)
    pairs = correspond(t, o)
    assert pairs.absent == [] and len(pairs.pairs) == len(t) == len(o)
    assert all(p.how == "same parameters" for p in pairs.pairs)
    same = pairs.names()
    if kind != "gpt2":
        assert all(a == b for a, b in same.items())  # and the same names where torch can tell
    assert {same[k]: v for k, v in _groups(t).items()} == _groups(o)
    assert shared_groups({s.name: list(s.params) for s in t}) == []
    # one profile, the same probabilities
    rng = np.random.default_rng(0)
    import gd_core

    fisher = {n: rng.random(tuple(p.shape)) for n, p in model.named_parameters()}
    prof = gd_core.SensitivityProfile.from_fisher(fisher, t)
    po = gd_core.SensitivityProfile.from_fisher(fisher, o)
    assert {same[k]: v for k, v in prof.probabilities().items()} == po.probabilities()
    report = gdo.apply(proto, prof)
    assert report.probabilities() == pytest.approx(po.probabilities())
