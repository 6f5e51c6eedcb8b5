"""``transformers.Trainer`` with guided dropout: the ``torch`` extra installs what it needs
(issue 14.9), it trains a guided model (site and unit granularity, with a schedule), and
``GuidedDropoutCallback`` steps schedules per optimiser step and resumes (issue 15)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _requirement_names(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", r)
        assert m, r
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def _trainer_modules():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="Trainer needs accelerate (the torch extra has it)")
    import adapters.torch as gdt

    return torch, transformers, gdt


def test_torch_extra_installs_what_trainer_needs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    torch_extra = _requirement_names(extras["torch"])
    assert "accelerate" in torch_extra, "transformers.Trainer needs accelerate"
    assert "transformers" in torch_extra
    pytest.importorskip("transformers")
    from packaging.requirements import Requirement
    from packaging.version import Version
    from transformers.utils import import_utils

    spec = Requirement("accelerate" + torch_extra["accelerate"]).specifier
    lower = [Version(s.version) for s in spec if s.operator in (">=", ">")]
    assert lower and max(lower) >= Version(import_utils.ACCELERATE_MIN_VERSION)


@pytest.mark.parametrize("granularity", ["site", "unit"])
def test_trainer_runs_a_few_steps_on_a_guided_model(tmp_path, granularity):
    torch, transformers, gdt = _trainer_modules()
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=2,
    )
    torch.manual_seed(0)
    encoder = transformers.BertForMaskedLM(config)
    batches = [{"input_ids": torch.randint(5, 100, (4, 16))} for _ in range(2)]
    profile = gdt.profile(encoder, batches, loss=gdt.MaskedLMLoss(mask_token_id=4), progress=False)
    model = transformers.BertForSequenceClassification(config)
    report = gdt.apply(
        model,
        profile.with_mapping(p_upper=0.3),
        missing="upper",
        granularity=granularity,
        schedule={"kind": "linear_warmup", "steps": 2},
    )

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {
                "input_ids": torch.randint(5, 100, (16,), generator=g),
                "labels": torch.tensor(i % 2),
            }

    callback = gdt.GuidedDropoutCallback(report)  # as docs/torch.md shows
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Data(), callbacks=[callback]
    )
    out = trainer.train()
    assert out.global_step == 3 and report.scheduler.step_count == 3
    assert torch.isfinite(torch.tensor(out.training_loss))
    # the schedule reached full strength through the callback, and the guided per-unit rates
    # are in the trained model (Trainer changes no dropout setting)
    assert report.scheduler.multiplier == 1.0
    # saved per-unit rates (a schedule's one-rate tensors at site granularity are not saved)
    rates = [b for n, b in model.state_dict().items() if n.endswith("rates")]
    assert (len(rates) > 0) == (granularity == "unit")
    assert all(float(r.max()) < 1.0 for r in rates)
    if rates:  # per-unit rates differ inside a site
        assert any(r.numel() > 1 and float(r.std()) > 0 for r in rates)
    assert len({round(float(p), 6) for p in report.probabilities().values()}) > 1


def _net_and_data(torch):
    class Data(torch.utils.data.Dataset):
        def __init__(self, n=16):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 4, generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i]}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(0.2)
            self.seen: list[float] = []  # the dropout p at every forward pass (micro-batch)

        def forward(self, x):
            self.seen.append(self.drop.p)
            loss = self.drop(self.lin(x)).pow(2).mean()
            return {"loss": loss}

    return Net, Data


def _small_trainer(transformers, data, net, tmp_path, callback, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        logging_strategy="no",
        disable_tqdm=True,
        **kw,
    )
    return transformers.Trainer(model=net, args=args, train_dataset=data, callbacks=[callback])


def test_callback_steps_per_optimizer_step_with_accumulation(tmp_path):
    torch, transformers, gdt = _trainer_modules()
    from gd_core import Schedule

    Net, Data = _net_and_data(torch)
    net = Net()
    report = gdt.apply(net, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=4))
    cb = gdt.GuidedDropoutCallback(report)
    net.seen.clear()  # apply traced one forward (what each site guards)
    t = _small_trainer(
        transformers,
        Data(),
        net,
        tmp_path,
        cb,
        max_steps=6,
        gradient_accumulation_steps=2,
        save_steps=100,
    )
    t.train()
    # two micro-batches per optimiser step share one p; warm-up over 4 optimiser steps
    expected = [0.2 * min(s, 4) / 4 for s in range(6) for _ in range(2)]
    assert net.seen == pytest.approx(expected)
    assert report.scheduler.step_count == 6 and net.drop.p == pytest.approx(0.2)


def test_callback_resumes_from_checkpoint(tmp_path):
    torch, transformers, gdt = _trainer_modules()
    from gd_core import Schedule

    Net, Data = _net_and_data(torch)
    net = Net()
    report = gdt.apply(net, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=8))
    cb = gdt.GuidedDropoutCallback(report)
    net.seen.clear()  # apply traced one forward (what each site guards)
    _small_trainer(transformers, Data(), net, tmp_path, cb, max_steps=3, save_steps=3).train()
    # a new process: a fresh model and schedule, resumed from the checkpoint of step 3
    net2 = Net()
    report2 = gdt.apply(net2, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=8))
    assert net2.drop.p == 0.0
    cb2 = gdt.GuidedDropoutCallback(report2)
    net2.seen.clear()
    t = _small_trainer(transformers, Data(), net2, tmp_path, cb2, max_steps=5, save_steps=100)
    t.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert net2.seen == pytest.approx([0.2 * 3 / 8, 0.2 * 4 / 8])
    assert report2.scheduler.step_count == 5


def test_callback_needs_a_scheduler():
    torch, _, gdt = _trainer_modules()
    Net, _ = _net_and_data(torch)
    with pytest.raises(TypeError, match="schedule="):
        gdt.GuidedDropoutCallback(gdt.apply(Net(), {"drop": 0.1}))
