"""``transformers.Trainer`` steps guided-dropout schedules through ``GuidedDropoutCallback``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the torch extra installs it)")

import adapters.torch as gdt  # noqa: E402
from gd_core import Schedule  # noqa: E402


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


def trainer(net, tmp_path, callback, **kw):
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
    return transformers.Trainer(model=net, args=args, train_dataset=Data(), callbacks=[callback])


def test_callback_steps_per_optimizer_step_with_accumulation(tmp_path):
    net = Net()
    report = gdt.apply(net, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=4))
    cb = gdt.GuidedDropoutCallback(report)
    trainer(net, tmp_path, cb, max_steps=6, gradient_accumulation_steps=2, save_steps=100).train()
    # two micro-batches per optimiser step share one p; warm-up over 4 optimiser steps
    expected = [0.2 * min(s, 4) / 4 for s in range(6) for _ in range(2)]
    assert net.seen == pytest.approx(expected)
    assert report.scheduler.step_count == 6 and net.drop.p == pytest.approx(0.2)


def test_callback_resumes_from_checkpoint(tmp_path):
    net = Net()
    report = gdt.apply(net, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=8))
    trainer(net, tmp_path, gdt.GuidedDropoutCallback(report), max_steps=3, save_steps=3).train()
    # a new process: a fresh model and schedule, resumed from the checkpoint of step 3
    net2 = Net()
    report2 = gdt.apply(net2, {"drop": 0.2}, schedule=Schedule("linear_warmup", steps=8))
    assert net2.drop.p == 0.0
    t = trainer(net2, tmp_path, gdt.GuidedDropoutCallback(report2), max_steps=5, save_steps=100)
    t.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert net2.seen == pytest.approx([0.2 * 3 / 8, 0.2 * 4 / 8])
    assert report2.scheduler.step_count == 5


def test_callback_needs_a_scheduler():
    net = Net()
    with pytest.raises(TypeError, match="schedule="):
        gdt.GuidedDropoutCallback(gdt.apply(net, {"drop": 0.1}))
