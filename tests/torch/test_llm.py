"""Decoder LLM end to end: the docs/llm.md recipe (profile with the causal-LM objective, LoRA
dropout from the profile, a few Trainer steps) on a tiny Llama."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the [peft] extra is not installed")
pytest.importorskip("accelerate", reason="Trainer needs accelerate")

DOC = Path(__file__).resolve().parents[2] / "docs" / "llm.md"


def test_llm_recipe_runs(capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    report, model, fresh = scope["report"], scope["model"], scope["fresh"]
    lora = [r for r in report if r.kind == "lora"]
    assert len(lora) == 8 and len({round(r.new_p, 6) for r in lora}) > 2
    assert all(r.source == "profile" for r in lora)
    assert scope["trainer"].state.global_step == 6
    assert report.scheduler.step_count == 6
    import adapters.torch.lora as gdp

    assert {s.name: s.p for s in gdp.lora_sites(fresh)} == pytest.approx(
        {s.name: s.p for s in gdp.lora_sites(model)}
    )
