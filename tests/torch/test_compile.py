"""torch.compile under a schedule: rates held in tensors, zero recompiles after the first step."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adapters.torch as gdt  # noqa: E402
from gd_core import Schedule  # noqa: E402

STEPS = 20
SCHEDULE = Schedule("linear_warmup", steps=STEPS)


def tiny_bert(attn: str):
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=32, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).train()


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("granularity", ["site", "unit"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compiled_bert_under_a_schedule_never_recompiles(no_recompile, granularity, attn):
    model = tiny_bert(attn)
    names = [s.name for s in gdt.sites(model)]
    att = "encoder.layer.0.attention.self.dropout"
    plan = {n: (0.6 if n == att else 0.3) for n in names}
    report = gdt.apply(model, plan, schedule=SCHEDULE, granularity=granularity)
    compiled = torch.compile(model, backend="eager")
    x = torch.randint(5, 50, (8, 24))
    hidden = model.encoder.layer[0].output.dropout
    for step in range(STEPS):
        m = SCHEDULE.multiplier(step)
        weights = model(input_ids=x, output_attentions=True).attentions[0]
        seen = float((weights == 0).float().mean())  # attention dropout the kernel applied
        assert seen == pytest.approx(0.6 * m, abs=0.05), (step, seen)
        torch.manual_seed(step)
        got = compiled(input_ids=x).last_hidden_state
        torch.manual_seed(step)
        want = model(input_ids=x).last_hidden_state  # the same random draws, uncompiled
        torch.testing.assert_close(got, want)
        assert float(hidden.rates.mean()) == pytest.approx(0.3 * m, abs=1e-6)
        report.scheduler.step()
    assert model.config._attn_implementation == "gd_" + attn
    # eval: no dropout, the same outputs as the model with its own attention implementation
    model.eval()
    plain = tiny_bert(attn).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # unit: + rates buffers
    torch.testing.assert_close(
        model(input_ids=x).last_hidden_state, plain(input_ids=x).last_hidden_state
    )


def test_compiled_dropout_module_rate_seen_each_step(no_recompile):
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Dropout(0.1)).train()
    # (an input to trace: with none to guess for a bare Sequential, apply warns)
    report = gdt.apply(net, {"1": 0.5}, schedule=SCHEDULE, example_input=torch.ones(8))
    compiled = torch.compile(net, backend="eager")
    x = torch.ones(20000)
    for step in range(STEPS):
        seen = float((compiled(x) == 0).float().mean())
        assert seen == pytest.approx(0.5 * SCHEDULE.multiplier(step), abs=0.02), step
        report.scheduler.step()
    assert net[1].p == pytest.approx(0.5)  # eager reads the real rate
    assert "rates" not in net.state_dict() and list(net.state_dict()) == []


def test_attribute_rate_held_in_a_tensor_reads_and_writes():
    from adapters.torch import rates

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout = 0.2

    a = Attn()
    rates.tensorize_attribute(a, "attention_dropout")
    assert a.attention_dropout == pytest.approx(0.2)
    a.attention_dropout = 0.05
    assert float(a.gd_attention_rate) == pytest.approx(0.05)
    assert type(a).__name__ == "Attn" and isinstance(a, Attn)


def test_compiled_llama_attribute_rate_never_recompiles(no_recompile):
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_dropout=0.4, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    site = "model.layers.0.self_attn.attention_dropout"
    assert site in [s.name for s in gdt.sites(model)]
    report = gdt.apply(model, {site: 0.5}, schedule=SCHEDULE, missing="keep")
    compiled = torch.compile(model, backend="eager")
    attn = model.model.layers[0].self_attn
    x = torch.randint(0, 50, (4, 24))
    for step in range(STEPS):
        assert attn.attention_dropout == pytest.approx(0.5 * SCHEDULE.multiplier(step))
        torch.manual_seed(step)
        got = compiled(input_ids=x).logits
        torch.manual_seed(step)
        torch.testing.assert_close(got, model(input_ids=x).logits)
        report.scheduler.step()
    assert site in [s.name for s in gdt.sites(model)]
    assert model.config._attn_implementation == "gd_sdpa"


def test_compiled_wrapper_of_a_transformers_model_never_recompiles(no_recompile):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_bert("sdpa")

        def forward(self, ids):
            return self.net(input_ids=ids).last_hidden_state

    model = Wrapper().train()
    plan = {s.name: 0.4 for s in gdt.sites(model)}
    report = gdt.apply(model, plan, schedule=SCHEDULE)
    assert model.net.config._attn_implementation == "gd_sdpa"
    compiled = torch.compile(model, backend="eager")
    x = torch.randint(5, 50, (4, 24))
    for step in range(STEPS):
        torch.manual_seed(step)
        got = compiled(x)
        torch.manual_seed(step)
        torch.testing.assert_close(got, model(x))
        report.scheduler.step()
