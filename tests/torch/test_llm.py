"""Decoder LLM end to end: the docs/llm.md recipe (profile with the causal-LM objective, LoRA
dropout from the profile, a few Trainer steps) on a tiny Llama, in well under a minute on CPU."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the [peft] extra is not installed")
pytest.importorskip("accelerate", reason="Trainer needs accelerate")

DOC = Path(__file__).resolve().parents[2] / "docs" / "llm.md"


def test_llm_recipe_runs_under_a_minute(capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    start = time.perf_counter()
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    elapsed = time.perf_counter() - start
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
    assert elapsed < 60, elapsed
