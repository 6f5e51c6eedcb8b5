"""Schedules for torch: scale every site's probability as training proceeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gd_core import Schedule
from gd_core.report import ApplyReport
from gd_core.validate import check_int

from . import rates
from .discovery import SiteHandle, _discover, current_p
from .layer import GuidedDropout, torch


class Scheduler:
    """Scale every site's probability by ``schedule.multiplier(step)`` as training proceeds.

    Built from an :class:`ApplyReport` (its sites) or a model (all its sites); the probabilities
    present at construction are the base ones. Call :meth:`step` after each optimiser step.

    Example:
        >>> import torch
        >>> from gd_core import Schedule
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))
        >>> sched = Scheduler(net, Schedule("linear_warmup", steps=4))
        >>> net[1].p
        0.0
        >>> _ = sched.step(); _ = sched.step()
        >>> round(net[1].p, 6)
        0.1
    """

    def __init__(
        self, target: ApplyReport | Any, schedule: Schedule | Mapping[str, Any], *, start: int = 0
    ) -> None:
        if isinstance(schedule, Schedule):
            self.schedule = schedule
        else:
            self.schedule = Schedule.from_config(schedule)
        model = target.model if isinstance(target, ApplyReport) else target
        _, found = _discover(model, None, False, trace=False)  # handles only: no forward
        if any(
            rates.reads_kernel(f.owner if f.site.kind == "attribute" else f.parent)
            for f in found
            if f.site.kind != "hook"
        ):  # which holders an attention kernel reads is a dataflow fact: one traced forward
            _, found = _discover(model, None, False, required=False)
        if isinstance(target, ApplyReport):
            wanted = {r.site for r in target.rows}
            found = [f for f in found if f.site.name in wanted]
        self.notes: list[str] = []
        found = self._tensorize(model, found)
        self._entries: list[tuple[SiteHandle, Any]] = []
        for f in found:
            if isinstance(f.owner, GuidedDropout):
                base: Any = f.owner.rates.detach().clone()
            else:
                base = current_p(f)
            self._entries.append((f, base))
        self.step_count = check_int(start, "start", 0, 0)
        self._set()

    def _tensorize(self, model: Any, found: list[SiteHandle]) -> list[SiteHandle]:
        """Hold every scheduled rate in a tensor (see :mod:`adapters.torch.rates`), so a compiled
        model reads new rates without recompiling; what cannot be, is in ``self.notes`` (and in
        the report's notes when ``apply(..., schedule=)`` builds the scheduler)."""
        out = []
        attention: list[tuple[str, Any, str]] = []  # (kind, module, attribute or child name)
        for f in found:
            mod = f.owner
            if f.site.kind == "attribute":
                if f.role == "attention" and rates.reads_kernel(mod):
                    attention.append(("attribute", mod, f.attr))
                else:
                    self.notes.append(
                        f"{f.site.name}: a float attribute read by the model's own code; a "
                        "compiled model recompiles when the schedule changes it"
                    )
            elif type(mod) is torch.nn.Dropout or isinstance(mod, GuidedDropout):
                if f.parent is not None and f.site.kind != "hook":
                    mod = rates.tensorize_module(f.parent, f.attr, mod)
                    f = replace(f, owner=mod)
                    if f.role == "attention" and rates.reads_kernel(f.parent):
                        attention.append(("child", f.parent, f.attr))
            else:
                self.notes.append(
                    f"{f.site.name}: {type(mod).__name__} reads .p as a float; a compiled model "
                    "recompiles when the schedule changes it"
                )
            out.append(f)
        if attention:
            note = rates.use_guided_attention(model)
            if note is not None:  # the kernels read floats: leave the rates where they read them
                self.notes.append(note)
                return out
            for kind, holder, name in attention:
                if kind == "attribute":
                    rates.tensorize_attribute(holder, name)
                else:
                    rates.mark_attention_child(holder, name)
        return out

    @property
    def multiplier(self) -> float:
        """The current multiplier of the base probabilities."""
        return self.schedule.multiplier(self.step_count)

    def _set(self) -> None:
        m = self.multiplier
        for f, base in self._entries:
            if isinstance(f.owner, GuidedDropout):
                f.owner.set_rates(base * m)
            elif f.site.kind == "attribute":
                setattr(f.owner, f.attr, float(base) * m)
            else:
                f.owner.p = float(base) * m

    def step(self) -> float:
        """Advance one step and set the probabilities; returns the new multiplier."""
        self.step_count += 1
        self._set()
        return self.multiplier

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step_count = check_int(state.get("step"), "state['step']", 0, 0)
        self._set()
