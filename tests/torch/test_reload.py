"""Issue 25: an ApplyReport used as the model fails naming report.model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import adapters.torch as gdt  # noqa: E402


def test_report_used_as_a_model_names_report_model():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    model = gdt.apply(net, {"1": 0.05})  # the habit: model = apply(model)
    for use in (
        lambda: model.to("cpu"),
        lambda: model.train(),
        lambda: list(model.parameters()),
        lambda: model(torch.ones(1, 2)),
    ):
        with pytest.raises((AttributeError, TypeError), match=r"report\.model"):
            use()
    assert model.model is net and hasattr(model, "rows") and not hasattr(model, "cuda")
