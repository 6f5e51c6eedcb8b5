"""``transformers.Trainer`` drives guided-dropout schedules: :class:`GuidedDropoutCallback`.

The callback sets the :class:`adapters.torch.Scheduler`'s step to the Trainer's
``state.global_step`` before and after every optimiser step. ``global_step`` counts optimiser
steps (not micro-batches), so gradient accumulation is handled; and a Trainer resumed from a
checkpoint restores ``global_step`` before its first step, so the schedule resumes where it was.
Setting the step (rather than counting calls) makes it idempotent.

Example:
    >>> import torch
    >>> from gd_core import Schedule
    >>> import adapters.torch as gdt
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))
    >>> cb = GuidedDropoutCallback(gdt.Scheduler(net, Schedule("linear_warmup", steps=4)))
    >>> class State:
    ...     global_step = 2
    >>> _ = cb.on_step_end(None, State(), None)
    >>> round(net[1].p, 6)
    0.1
"""

from __future__ import annotations

from typing import Any

from .._lazy import require

transformers = require("transformers", "the Trainer callback")


class GuidedDropoutCallback(transformers.TrainerCallback):  # type: ignore[misc]
    """Step a :class:`adapters.torch.Scheduler` (or an ``ApplyReport`` with a scheduler) with the
    Trainer's optimiser steps.

    Example:
        >>> import torch, transformers  # doctest: +SKIP
        >>> report = gdt.apply(model, profile, schedule=Schedule("early", steps=500))  # doctest: +SKIP
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
        ...                                callbacks=[gdt.GuidedDropoutCallback(report)])
    """

    def __init__(self, scheduler: Any) -> None:
        sched = getattr(scheduler, "scheduler", scheduler)
        if sched is None or not hasattr(sched, "load_state_dict"):
            raise TypeError(
                "scheduler: expected an adapters.torch.Scheduler or the report of "
                f"apply(..., schedule=...), received {type(scheduler).__name__} without one; fix: "
                "pass schedule=Schedule(...) to apply and give the callback report.scheduler"
            )
        self.scheduler = sched

    def _sync(self, state: Any) -> None:
        step = int(getattr(state, "global_step", 0) or 0)
        if step != self.scheduler.step_count:
            self.scheduler.load_state_dict({"step": step})

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._sync(state)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._sync(state)  # after a resume, global_step is the checkpoint's
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._sync(state)
        return control
