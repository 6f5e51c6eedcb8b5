"""Helpers shared by the ONNX Runtime Training tests (imported by name, not collected)."""

from __future__ import annotations

from typing import Any

import adapters.onnx as ao


def train(art: Any, batch: Any, steps: int = 12, lr: float = 5e-3) -> tuple[list[float], Any, Any]:
    """``steps`` training steps of the artifacts ``art`` on ``batch``: the losses, the module
    and the checkpoint state (to evaluate or read the trained weights afterwards)."""
    module, opt, state = art.open()
    opt.set_learning_rate(lr)
    module.train()
    losses = []
    for _ in range(steps):
        module.lazy_reset_grad()
        losses.append(float(module(*ao.module_inputs(module, batch))))
        opt.step()
    return losses, module, state


def train_losses(art: Any, batch: Any, steps: int = 12, lr: float = 5e-3) -> list[float]:
    """The losses of :func:`train`."""
    return train(art, batch, steps, lr)[0]
