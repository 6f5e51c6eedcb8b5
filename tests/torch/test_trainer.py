"""Issue 14.9: the documented `transformers.Trainer` path works with what the `torch` extra
installs, on a model with guided dropout applied (site and unit granularity, with a schedule)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _requirement_names(reqs: list[str]) -> dict[str, str]:
    import re

    out = {}
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", r)
        assert m, r
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


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
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import adapters.torch as gdt

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

    class GuidedDropoutSchedule(transformers.TrainerCallback):  # as docs/torch.md shows
        def __init__(self, scheduler):
            self.scheduler = scheduler
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.scheduler.step()
            self.steps += 1

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {
                "input_ids": torch.randint(5, 100, (16,), generator=g),
                "labels": torch.tensor(i % 2),
            }

    callback = GuidedDropoutSchedule(report.scheduler)
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
    assert out.global_step == 3 and callback.steps == 3
    assert torch.isfinite(torch.tensor(out.training_loss))
    # the schedule reached full strength through the callback, and the guided per-unit rates
    # are in the trained model (Trainer changes no dropout setting)
    assert report.scheduler.multiplier == 1.0
    rates = [b for n, b in model.named_buffers() if n.endswith("rates")]
    assert (len(rates) > 0) == (granularity == "unit")
    assert all(float(r.max()) < 1.0 for r in rates)
    if rates:  # per-unit rates differ inside a site
        assert any(r.numel() > 1 and float(r.std()) > 0 for r in rates)
    assert len({round(float(p), 6) for p in report.probabilities().values()}) > 1
