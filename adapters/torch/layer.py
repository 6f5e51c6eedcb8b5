"""The torch ``GuidedDropout`` module: ``nn.Dropout`` with one probability per feature."""

from __future__ import annotations

from typing import Any

from gd_core.errors import bad_argument
from gd_core.validate import check_probability, check_rates

from .._lazy import require

torch = require("torch")
nn = torch.nn

HOOK_CHILD = "gd_dropout"
_FIX = "pass a dropout probability in [0, 1), e.g. 0.1 (1 would drop every unit)"


#: > 0 while :func:`adapters.torch.dataflow.trace` runs a forward: a rate held in a tensor (a
#: scheduled attention rate) is then read as a float and applied with ``F.dropout``, so the trace
#: links the call to the holder of its rate
tracing = [0]


def _torch_wording(name: str, expected: str, received: Any) -> str:
    """``nn.Dropout``'s own message, naming the argument this library checked."""
    return f"dropout probability has to be between 0 and 1, but got {received} ({name}: {expected})"


def _rates(value: Any, name: str) -> Any:
    if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.dim() == 0):
        p = check_probability(
            float(value) if torch.is_tensor(value) else value, name, _FIX, wording=_torch_wording
        )
        return torch.tensor([p], dtype=torch.float32)
    arr = check_rates(
        value.detach().cpu().numpy() if torch.is_tensor(value) else value,
        name,
        wording=_torch_wording,
    )
    return torch.as_tensor(arr, dtype=torch.float32)


class GuidedDropout(nn.Module):
    """``nn.Dropout`` with one probability per feature of the last axis.

    Takes ``nn.Dropout``'s arguments with its defaults (``p=0.5``, ``inplace=False``) and its
    exception types (``ValueError`` for a probability out of range, ``TypeError`` for one that
    is not a number, with ``nn.Dropout``'s wording and this library's fix); ``p`` may also be a
    sequence of per-unit probabilities (``rates``). The one difference: ``p=1`` (every unit
    dropped, outputs scaled by ``1/0``) is refused. ``rates`` is a registered buffer (saved in
    the state dict unless ``persistent=False``); a single rate broadcasts over any width. Kept values are scaled by
    ``1 / (1 - rate)``; in eval mode the module is the identity. ``.p`` (the mean rate) keeps
    code that reads or sets ``module.p`` working; setting it makes the rates uniform.

    Example:
        >>> import torch
        >>> drop = GuidedDropout([0.0, 0.5], generator=torch.Generator().manual_seed(0))
        >>> y = drop(torch.ones(1000, 2))
        >>> bool((y[:, 0] == 1).all()), sorted(set(y[:, 1].tolist()))
        (True, [0.0, 2.0])
        >>> drop.p
        0.25
        >>> bool((drop.eval()(torch.ones(3, 2)) == 1).all())
        True
        >>> GuidedDropout().p
        0.5
    """

    rates: Any

    def __init__(
        self,
        p: Any = 0.5,
        inplace: bool = False,
        *,
        generator: Any = None,
        hook: bool = False,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        rates = _rates(p, "rates" if not _is_scalar(p) else "p")
        self.register_buffer("rates", rates, persistent=persistent)
        # what ``.p`` reads while dynamo traces: fixed, so a compiled graph never guards on a
        # value the schedule changes (kernels that read ``.p`` get the tensor rate elsewhere)
        self._traced_p = float(rates.mean())
        self.tensor_kernel = False  # True once the guided attention kernel reads ``rates``
        self.inplace = inplace
        self.generator = generator
        self.hook = hook

    @property
    def p(self) -> float:
        """The mean drop probability over units (a fixed float while dynamo traces)."""
        if self.tensor_kernel and torch.compiler.is_compiling():
            return self._traced_p
        return float(self.rates.float().mean())

    @p.setter
    def p(self, value: float) -> None:
        value = check_probability(value, "p", _FIX, wording=_torch_wording)
        with torch.no_grad():
            self.rates.fill_(value)

    def set_rates(self, rates: Any) -> None:
        """Replace the per-unit probabilities (same buffer when the size is unchanged)."""
        new = _rates(rates, "rates").to(self.rates.device)
        with torch.no_grad():
            if new.shape == self.rates.shape:
                self.rates.copy_(new)
            else:
                self.rates = new

    def forward(self, x: Any) -> Any:
        if not self.training:
            return x
        rates = self.rates
        if rates.numel() != 1 and x.shape[-1] != rates.numel():
            raise bad_argument(
                "input of GuidedDropout",
                f"a last axis of {rates.numel()} features (one per rate)",
                f"shape {tuple(x.shape)}",
                "apply the profile with granularity='site', or recompute the profile with "
                "adapters.torch.profile() so the unit counts are measured",
            )
        if self.generator is None:
            u = torch.rand(x.shape, device=x.device, dtype=torch.float32)
        else:
            u = torch.rand(
                x.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32
            ).to(x.device)
        rates = rates.to(device=x.device, dtype=torch.float32)
        scale = ((u >= rates).to(torch.float32) / (1.0 - rates)).to(x.dtype)
        return x.mul_(scale) if self.inplace else x * scale

    def extra_repr(self) -> str:
        n = self.rates.numel()
        extra = ", inplace=True" if self.inplace else ""
        if n == 1:
            return f"p={self.p:.4g}{extra}"
        return (
            f"units={n}, p_mean={self.p:.4g}, p_min={float(self.rates.min()):.4g}, "
            f"p_max={float(self.rates.max()):.4g}{extra}"
        )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.dim() == 0)


def hook_forward(module: Any, args: Any, output: Any) -> Any:
    """Forward hook that runs a module's ``gd_dropout`` child on its output (hook sites)."""
    drop = getattr(module, HOOK_CHILD, None)
    if drop is None:
        return output
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return (drop(output[0]), *output[1:])
    if torch.is_tensor(output):
        return drop(output)
    return output
