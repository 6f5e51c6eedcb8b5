"""PyTorch adapter: find dropout sites, estimate the Fisher diagonal, install guided dropout.

A thin translator over :mod:`gd_core`, in modules that show its parts:

- :mod:`~adapters.torch.layer` — :class:`GuidedDropout` (``nn.Dropout`` with per-unit rates);
- :mod:`~adapters.torch.discovery` — :func:`sites`, :func:`fingerprint`;
- :mod:`~adapters.torch.persample` (with :mod:`~adapters.torch.samples`) — exact per-sample
  squared-gradient sums; :mod:`~adapters.torch.losses` — masked LM, causal LM, contrastive;
- :mod:`~adapters.torch.fisher` — :func:`estimate_fisher`, :func:`profile` (the loop is
  :mod:`gd_core.fisher_loop`'s);
- :mod:`~adapters.torch.install` — :func:`apply` (the plan is :mod:`gd_core.plan`'s);
  :mod:`~adapters.torch.schedule` — :class:`Scheduler`;
- :mod:`~adapters.torch.auto` — the profile ``apply(model)`` computes when it has none;
  :mod:`~adapters.torch.lora` — PEFT/LoRA dropout; :mod:`~adapters.torch.trainer` —
  :class:`GuidedDropoutCallback` for ``transformers.Trainer``.

Example:
    >>> import torch, adapters.torch as gdt
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))
    >>> [s.name for s in gdt.sites(net)]
    ['1']
    >>> report = gdt.apply(net, {"1": 0.05})
    >>> net[1].p, report.model is net
    (0.05, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gd_core.fisher import FisherResult
from gd_core.report import ApplyReport

from .. import _own  # noqa: F401 - raises if `adapters` is AdapterHub's (README)
from .discovery import coverage, fingerprint, sites
from .fisher import estimate_fisher, profile
from .install import _watch_from_pretrained, apply, recorded_plan
from .layer import GuidedDropout
from .lora import load as load_peft
from .lora import lora_tensors
from .lora import save as save_peft
from .lora import watch_peft as _watch_peft
from .losses import CausalLMLoss, ContrastiveLoss, MaskedLMLoss
from .schedule import Scheduler

_watch_from_pretrained()  # warn when a model recording a plan is loaded and not re-applied
_watch_peft()  # warn when a PEFT adapter with a sidecar is loaded without load_peft

if TYPE_CHECKING:
    from .trainer import GuidedDropoutCallback

__all__ = [
    "ApplyReport",
    "CausalLMLoss",
    "ContrastiveLoss",
    "FisherResult",
    "GuidedDropout",
    "GuidedDropoutCallback",
    "MaskedLMLoss",
    "Scheduler",
    "apply",
    "coverage",
    "estimate_fisher",
    "fingerprint",
    "load_peft",
    "lora_tensors",
    "profile",
    "recorded_plan",
    "save_peft",
    "sites",
]


def __getattr__(name: str) -> Any:
    if name == "GuidedDropoutCallback":  # imports transformers only when asked for
        from .trainer import GuidedDropoutCallback

        return GuidedDropoutCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
