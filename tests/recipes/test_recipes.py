"""Issue 25 item 5: the recipes of docs/recipes.md (sentence-transformers' trainer, TRL's
SFTTrainer with LoRA, PyTorch Lightning), each block run alone as the page promises, with checks:
every rate of the report is the rate its dropout reads at each training forward (times the
schedule's multiplier of that step), the trainer's loss is finite, and the loss on the training
data (eval mode) is lower after training than before."""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# the libraries' own deprecations, which this project cannot fix: TRL 1.16 sets and reads the
# Trainer's `gradient_checkpointing` (renamed `activation_checkpointing` in transformers 5);
# Lightning 2.6.6 uses torch's `LeafSpec`, deprecated in torch 2.13
pytestmark = [
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
SECTIONS = {
    "sentence-transformers": "## sentence-transformers",
    "trl": "## TRL",
    "lightning": "## PyTorch Lightning",
}
RUN_HERE = "# doc-test: skip  (run by tests/recipes/test_recipes.py"


def block(section: str) -> str:
    """The one ```python block under the heading that starts with ``SECTIONS[section]``."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n" + SECTIONS[section]) + 1
    end = text.find("\n## ", start)
    body = text[start : end if end >= 0 else len(text)]
    blocks = re.findall(r"^```python\n(.*?)^```", body, re.M | re.S)
    assert len(blocks) == 1, f"{section}: expected one python block, found {len(blocks)}"
    return blocks[0]


def test_every_block_of_the_page_is_run_here():
    """The page's blocks are skipped by tests/test_docs.py because this file runs them: each
    one must belong to a section run here, so none is left unrun."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert sorted(found) == sorted(block(s) for s in SECTIONS)
    assert all(b.startswith(RUN_HERE) for b in found)
    assert "self-contained" in text  # each block runs alone here (a fresh namespace)


def test_make_test_installs_the_recipes_extra():
    """The libraries the recipes run with are pinned in the ``recipes`` extra, which ``dev``
    (the Makefile's install) pulls in, so a clean clone's CI runs these tests."""
    import tomllib

    extras = tomllib.loads((DOC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"
    ]["optional-dependencies"]
    pinned = {r.split("==")[0] for r in extras["recipes"] if "==" in r}
    assert {"sentence-transformers", "datasets", "trl", "lightning"} <= pinned
    (dev,) = [r for r in extras["dev"] if r.startswith("guided-dropout[")]
    assert "recipes" in dev[len("guided-dropout[") : -1].split(",")
    makefile = (DOC.parents[1] / "Makefile").read_text(encoding="utf-8")
    installed = re.findall(r"pip install [^\n]*'\.\[([a-z,-]+)\]'", makefile)
    assert any("dev" in group.split(",") for group in installed), installed


def _is_rate(value: Any) -> bool:
    return isinstance(value, float) or (torch.is_tensor(value) and value.dim() == 0)


class Observer:
    """While active: every rate a module reads at a training forward (``.p`` of a dropout
    module, float attributes whose name has ``drop`` in it), per (module, attribute), in order;
    and the trainable parameters as they were at the first optimiser step. The forwards of the
    library's own calls (``profile``, and ``apply``'s trace with its stand-in rates) are not
    training forwards: :meth:`pausing` wraps those calls."""

    def __init__(self) -> None:
        # (module id, attribute) -> [(optimiser steps taken before that forward, rate read)]
        self.seen: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
        self.by_parent: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
        self.before: dict[Any, Any] = {}
        self.optimizer_steps = 0
        self.paused = 0

    def pausing(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1

        return call

    def _forward(self, module: Any, args: Any) -> None:
        if not module.training or self.paused:
            return
        import adapters.torch as gdt

        if isinstance(module, (torch.nn.Dropout, gdt.GuidedDropout)):
            self.seen[(id(module), "p")].append((self.optimizer_steps, float(module.p)))
        for child in module.children():  # an attention kernel is handed its dropout's .p
            if isinstance(child, (torch.nn.Dropout, gdt.GuidedDropout)):
                self.by_parent[(id(child), "p")].append((self.optimizer_steps, float(child.p)))
        for name, value in list(vars(module).items()):
            if "drop" in name and _is_rate(value):
                self.seen[(id(module), name)].append(
                    (self.optimizer_steps, float(getattr(module, name)))
                )

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.before:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self.before[p] = p.detach().clone()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # counted after the step: Lightning's forward runs inside optimizer.step(closure)
        self.optimizer_steps += 1

    def __enter__(self) -> Observer:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._hooks = [
            register_module_forward_pre_hook(self._forward),
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()

    def rates(self, model: Any, row: Any) -> list[tuple[int, float]]:
        """What the site of ``row`` read at each training forward (a dropout module an attention
        kernel reads instead of calling it: its ``.p`` at each forward of its parent)."""
        if row.kind == "attribute":
            owner, attr = row.site.rsplit(".", 1)
            key = (id(model.get_submodule(owner)), attr)
        else:
            key = (id(model.get_submodule(row.site)), "p")
        return self.seen.get(key) or self.by_parent.get(key, [])

    def loss_before_and_after(self, loss_fn: Any) -> tuple[float, float]:
        """``loss_fn()`` (eval mode, no gradients) with the parameters trained and as they were
        at the first optimiser step."""
        assert self.before, "no optimiser step was seen"
        with torch.no_grad():
            after = float(loss_fn())
            trained = {p: p.detach().clone() for p in self.before}
            for p, v in self.before.items():
                p.copy_(v)
            before = float(loss_fn())
            for p, v in trained.items():
                p.copy_(v)
        return before, after


def run(section: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[dict, Observer]:
    """Run the section's block alone (a fresh namespace), as tests/test_docs.py runs a
    self-contained page, under an :class:`Observer`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path / "gd-cache"))
    import adapters.torch as gdt

    scope: dict[str, Any] = {"__name__": f"doc_recipes_{section}"}
    code = compile(block(section), f"{DOC.name}:{section}", "exec")
    seen = Observer()
    for name in ("apply", "profile"):
        monkeypatch.setattr(gdt, name, seen.pausing(getattr(gdt, name)))
    with seen, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, scope)  # noqa: S102 - the recipe is the test
    ours = [
        w for w in caught if "guessed input" in str(w.message) or "guided-dropout" in str(w.message)
    ]
    assert not ours, [str(w.message) for w in ours]
    for w in caught:  # the libraries' own warnings go on to pytest (and its filters)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return scope, seen


def check_rates(seen: Observer, report: Any, schedule: Any = None) -> None:
    """Every site of the report read its rate (times ``schedule.multiplier(k)`` in the training
    step after ``k`` optimiser steps, when a schedule is given) at every training forward."""
    model = report.model
    for row in report:
        got = seen.rates(model, row)
        assert got, f"{row.site}: no training forward read it"
        want = [
            (k, row.new_p * (1.0 if schedule is None else schedule.multiplier(k))) for k, _ in got
        ]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), (
            row.site,
            got,
        )


def test_sentence_transformers_trainer(monkeypatch, tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    scope, seen = run("sentence-transformers", monkeypatch, tmp_path)
    report, model, trainer = scope["report"], scope["model"], scope["trainer"]
    assert report.model is model
    assert "contrastive objective on BertModel (model.0.model)" in report.notes[0]
    assert len(report) == 7 and {r.source for r in report} == {"profile"}
    assert len({round(r.new_p, 6) for r in report}) > 3  # rates differ by site
    check_rates(seen, report)
    assert trainer.state.global_step == 3 and seen.optimizer_steps == 3
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])

    pairs = scope["pairs"]

    def contrastive():  # the training loss (in-batch negatives), in eval mode
        import sentence_transformers as st

        model.eval()
        a = model.encode(pairs["anchor"], convert_to_tensor=True)
        b = model.encode(pairs["positive"], convert_to_tensor=True)
        scores = st.util.cos_sim(a, b) * 20.0
        return torch.nn.functional.cross_entropy(scores, torch.arange(len(a)))

    before, after = seen.loss_before_and_after(contrastive)
    assert after < before, (before, after)
    # saved and loaded: guided as trained (the plan in the inner model's config.json)
    inner = dict(scope["reloaded"][0].auto_model.named_modules())
    for row in report:
        got = inner[row.site.removeprefix("0.model.")].p
        assert got == pytest.approx(row.new_p, abs=1e-6), row.site


def test_trl_sft_trainer_with_lora(monkeypatch, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    pytest.importorskip("datasets")
    scope, seen = run("trl", monkeypatch, tmp_path)
    report, trainer, tokenizer = scope["report"], scope["trainer"], scope["tokenizer"]
    assert report.model is trainer.model and type(trainer.model).__name__.startswith("PeftModel")
    lora = [r for r in report if r.kind == "lora"]
    attention = [r for r in report if r.kind == "attribute"]
    assert len(lora) == 8 and len(attention) == 2 and len(report) == 10
    assert all(r.source == "profile" and r.old_p == 0.05 for r in lora)
    assert all(r.note.startswith("LoRA on model.layers.") for r in lora)
    assert len({round(r.new_p, 6) for r in lora}) > 2  # one probability per LoRA module
    sched = report.scheduler  # a warm-up over 2 steps, stepped by GuidedDropoutCallback
    assert sched.schedule.multiplier(0) < sched.schedule.multiplier(1) < 1.0
    check_rates(seen, report, sched.schedule)
    assert {k for key in seen.seen for k, _ in seen.seen[key]} == {0, 1, 2, 3}
    assert trainer.state.global_step == 4 and seen.optimizer_steps == 4
    assert sched.step_count == 4 and sched.multiplier == 1.0
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])

    model = trainer.model
    enc = tokenizer(
        list(scope["text"]["text"]),
        max_length=32,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def lm_loss():
        model.eval()
        return model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels
        ).loss

    before, after = seen.loss_before_and_after(lm_loss)
    assert after < before, (before, after)


def test_lightning_with_a_schedule(monkeypatch, tmp_path):
    pytest.importorskip("lightning")
    scope, seen = run("lightning", monkeypatch, tmp_path)
    report, module, trainer = scope["report"], scope["module"], scope["trainer"]
    assert report.model is module
    assert "contrastive objective on BertModel (model.net.bert)" in report.notes[0]
    assert report["net.bert.encoder.layer.0.output.dropout"].source == "profile"
    assert report["net.dropout"].source == "keep"  # the new head's dropout: not in the profile
    assert trainer.global_step == 6 and seen.optimizer_steps == 6
    sched = report.scheduler
    assert sched.step_count == 6 and sched.multiplier == 1.0
    # the k-th batch trains with the warm-up's multiplier of step k (0, 0.25, ..., 1, 1)
    steps = [sched.schedule.multiplier(k) for k in range(6)]
    assert steps[0] < steps[2] < steps[4] == 1.0
    check_rates(seen, report, sched.schedule)
    seen_steps = {k for key in seen.seen for k, _ in seen.seen[key]}
    assert seen_steps == set(range(6))  # one training forward per batch, each checked
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))

    batch = next(iter(torch.utils.data.DataLoader(scope["rows"], batch_size=len(scope["rows"]))))

    def classification_loss():
        module.eval()
        return module(batch).loss

    before, after = seen.loss_before_and_after(classification_loss)
    assert math.isfinite(before) and after < before, (before, after)
