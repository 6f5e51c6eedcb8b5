"""Fisher estimation and profiles for torch models.

The per-batch work (squared per-sample gradient sums) is :mod:`adapters.torch.persample`; the
loop (``max_samples``, non-finite samples, progress, checkpoints) is :mod:`gd_core.fisher_loop`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Unpack

import numpy as np

from gd_core import SensitivityProfile
from gd_core import fisher_loop as loop
from gd_core.errors import bad_argument, no_sites
from gd_core.face import FisherOptions, FisherSettings, ProfileOptions, ProfileSettings
from gd_core.fisher_loop import BatchSums, FisherEngine
from gd_core.sites import scorable
from gd_core.validate import check_choice, check_int, check_known

from . import losses, norms, persample
from .discovery import _features, _resolve_sites, _unit_axes, _unwrap, current_p, fingerprint
from .layer import torch

_LOSS_NAMES = ("mlm", "clm", "contrastive")


def _resolve_loss(loss: Any, seed: int) -> tuple[Callable[..., Any], str]:
    if isinstance(loss, str):
        mod = losses
        if loss == "mlm":
            return mod.MaskedLMLoss(seed=seed), "mlm"
        if loss == "clm":
            return mod.CausalLMLoss(), "clm"
        if loss == "contrastive":
            return mod.ContrastiveLoss(), "contrastive"
    elif callable(loss):
        name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
        name = name or _BUILTIN_NAMES.get(type(loss).__name__, type(loss).__name__)
        return loss, str(name)
    raise bad_argument(
        "loss",
        f"one of {_LOSS_NAMES} or a callable (model, batch) -> per-sample losses",
        loss,
        "pass loss='mlm' for a masked LM, 'clm' for a causal LM, 'contrastive' for an encoder",
    )


def _is_builtin_loss(loss: Any) -> bool:
    return isinstance(loss, (losses.MaskedLMLoss, losses.CausalLMLoss, losses.ContrastiveLoss))


_BUILTIN_NAMES = {"MaskedLMLoss": "mlm", "CausalLMLoss": "clm", "ContrastiveLoss": "contrastive"}


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (Mapping, Sequence)) or hasattr(values, "__iter__"):
        for v in values:
            if torch.is_tensor(v) and v.dim() > 0:
                return int(v.shape[0])
    raise bad_argument(
        "batches",
        "batches that are tensors, or dicts / tuples of tensors with the batch on axis 0",
        type(batch).__name__,
        "yield e.g. tokenizer(texts, return_tensors='pt', padding=True)",
    )


def _map_batch(batch: Any, fn: Callable[[Any], Any]) -> Any:
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        out = {k: _map_batch(v, fn) if _is_container(v) else v for k, v in batch.items()}
        try:
            return type(batch)(out)
        except Exception:  # noqa: BLE001 - mapping types without a dict constructor
            return out
    if isinstance(batch, tuple | list):
        return type(batch)(_map_batch(v, fn) if _is_container(v) else v for v in batch)
    return batch


def _is_container(v: Any) -> bool:
    return torch.is_tensor(v) or isinstance(v, Mapping | tuple | list)


def _take(batch: Any, index: Any, size: int) -> Any:
    def pick(t: Any) -> Any:
        return t[index] if t.dim() > 0 and t.shape[0] == size else t

    return _map_batch(batch, pick)


def _to_device(batch: Any, device: Any) -> Any:
    return _map_batch(batch, lambda t: t.to(device))


def _dist() -> Any:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d
    return None


class _Engine(FisherEngine):
    """Per-sample squared-gradient sums from :mod:`adapters.torch.persample`, kept on the
    parameters' devices between flushes and summed over ranks under ``torch.distributed``."""

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[..., Any],
        names: list[str],
        chunk_size: int | None,
        axes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in names}
        self.axes = None if axes is None else {n: tuple(axes.get(n, ())) for n in names}
        self.device = params[names[0]].device
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.pending = self._buffers()  # on each parameter's own device (model parallel works)
        self.names = list(self.pending)
        d = _dist()
        self.world = d.get_world_size() if d is not None else 1
        self.rank = d.get_rank() if d is not None else 0

    def _buffers(self) -> dict[str, Any]:
        """Zeroed sums, one per key of what :meth:`sq_grad_sums` returns."""
        return {
            n: torch.zeros(p.shape, dtype=self.dtype, device=p.device)
            for n, p in self.params.items()
        }

    def _keyed(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        return dict(sums)

    def size(self, batch: Any) -> int:
        return _batch_size(batch)

    def take(self, batch: Any, index: Any) -> Any:
        if not isinstance(index, slice):
            index = torch.as_tensor(list(index), dtype=torch.long, device=_first_device(batch))
        return _take(batch, index, _batch_size(batch))

    def skip_batches(self, k: int) -> None:
        """Keep a built-in loss's seeded draws in step when resuming past ``k`` batches."""
        counter = getattr(self.loss_fn, "counter", None)
        if k and isinstance(counter, int) and _is_builtin_loss(self.loss_fn):
            self.loss_fn.counter = counter + k

    def sq_grad_sums(self, batch: Any) -> BatchSums:
        sums, n, per_sample = persample.per_sample_sq_grad_sums(
            self.model,
            self.loss_fn,
            _to_device(batch, self.device),
            params=self.params,
            chunk_size=self.chunk_size,
            **({} if self.axes is None else {"norms": self.axes}),
        )
        losses = torch.as_tensor(per_sample).detach().reshape(-1).double().cpu().numpy()
        return BatchSums(self._keyed(sums), int(n), losses=losses)

    def nonfinite(self, sums: Mapping[str, Any]) -> list[str]:
        names = list(sums)
        if not names:
            return []
        totals = torch.stack([sums[n].detach().sum() for n in names])  # one sync per batch
        if bool(torch.isfinite(totals).all()):
            return []
        return [n for n in names if not bool(torch.isfinite(sums[n]).all())]

    def add(self, sums: Mapping[str, Any], n: int) -> None:
        for name in self.names:
            acc = self.pending[name]
            acc += sums[name].detach().to(device=acc.device, dtype=self.dtype)

    def flush(
        self, counted: int, skipped: int, local: int
    ) -> tuple[dict[str, np.ndarray], int, int, list[int]]:
        d = _dist()
        ranks = [local]
        if d is not None:
            counts = torch.zeros(self.world + 2, dtype=torch.float64, device=self.device)
            counts[self.rank] = float(local)
            counts[self.world] = float(counted)
            counts[self.world + 1] = float(skipped)
            flat = torch.cat([self.pending[n].reshape(-1).to(self.device) for n in self.names])
            d.all_reduce(counts, op=d.ReduceOp.SUM)
            d.all_reduce(flat, op=d.ReduceOp.SUM)
            offset = 0
            for n in self.names:
                size = self.pending[n].numel()
                self.pending[n].copy_(flat[offset : offset + size].view(self.pending[n].shape))
                offset += size
            ranks = [int(round(float(c))) for c in counts[: self.world].tolist()]
            counted = int(round(float(counts[self.world])))
            skipped = int(round(float(counts[self.world + 1])))
        arrays = {n: self.pending[n].double().cpu().numpy().copy() for n in self.names}
        for t in self.pending.values():
            t.zero_()
        return arrays, counted, skipped, ranks

    def barrier(self) -> None:
        d = _dist()
        if d is not None:
            d.barrier()

    def sync_progress(self, done: bool, batches_done: int) -> tuple[bool, list[int]]:
        d = _dist()
        if d is None:
            return done, [batches_done]
        state = torch.zeros(self.world + 1, dtype=torch.float64, device=self.device)
        state[0] = 0.0 if done else 1.0
        state[1 + self.rank] = float(batches_done)
        d.all_reduce(state, op=d.ReduceOp.SUM)
        return float(state[0]) == 0.0, [int(round(float(b))) for b in state[1:].tolist()]


class _NormsEngine(_Engine):
    """:class:`_Engine` keeping only what a profile needs: per tensor the sum of its squared
    per-sample gradient norms and, per unit axis, the same summed over every other axis
    (``output="norms"``; the arithmetic is :mod:`adapters.torch.norms`)."""

    axes: dict[str, tuple[int, ...]]

    def _buffers(self) -> dict[str, Any]:
        out = {}
        for n, p in self.params.items():
            out[norms.keys_of(n, ())[0]] = torch.zeros((), dtype=self.dtype, device=p.device)
            for a in self.axes[n]:
                key = norms.keys_of(n, (a,))[1]
                out[key] = torch.zeros(p.shape[a], dtype=self.dtype, device=p.device)
        return out

    def _keyed(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        return dict(norms.flatten(sums))

    def nonfinite(self, sums: Mapping[str, Any]) -> list[str]:
        bad = super().nonfinite(sums)  # keys "name:sum", "name:axisK" -> parameter names
        return list(dict.fromkeys(norms.param_of(k) for k in bad))


def _first_device(batch: Any) -> Any:
    found: list[Any] = []
    _map_batch(batch, lambda t: found.append(t.device) or t)
    return found[0] if found else torch.device("cpu")


def estimate_fisher(
    model: Any,
    batches: Iterable[Any],
    loss: str | Callable[..., Any] = "mlm",
    *,
    params: Sequence[str] | None = None,
    seed: int = 0,
    output: str = "diagonal",
    norm_axes: Mapping[str, Sequence[int]] | None = None,
    **options: Unpack[FisherOptions],
) -> Any:
    """The exact empirical Fisher diagonal: the mean over samples of squared per-sample gradients.

    The model is put in eval mode while estimating (and restored after). Sums are kept on the
    model's device (float64 where the device has it) and handed to a
    :class:`gd_core.FisherAccumulator` at checkpoints and at the end. ``loss`` is ``"mlm"``,
    ``"clm"``, ``"contrastive"`` or a callable ``(model, batch) -> per-sample losses``.
    ``options`` are the Fisher loop's, the same in every adapter (:class:`gd_core.face.FisherOptions`:
    ``max_samples``, ``progress``, ``chunk_size``, ``on_nonfinite``, ``checkpoint``,
    ``checkpoint_every``, ``resume``). ``max_samples`` truncates the last batch (per process when distributed). With ``checkpoint``,
    the accumulator is saved atomically every ``checkpoint_every`` batches and at the end;
    ``resume=True`` loads it and skips the batches it already counts. A NaN/Inf loss or gradient
    raises :class:`gd_core.NonFiniteGradientError` naming the parameter, or with
    ``on_nonfinite='skip'`` the offending samples are skipped and counted in ``.skipped``. Under
    ``torch.distributed`` the sums and counts of every rank are added together (each rank feeds
    its own shard of the data).

    ``output="norms"`` returns a :class:`adapters.torch.norms.FisherNorms` instead: per tensor
    the sum of its Fisher diagonal (the mean squared per-sample gradient norm) and, per
    ``norm_axes`` (``{name: axes}``; default: each tensor's output-unit axis, the one per-unit
    scores use), the diagonal summed over every other axis -- what :func:`profile` needs,
    computed with Gram products where cheaper, without per-sample weight gradients and without
    per-parameter float64 buffers.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> def loss(model, batch):  # one loss per sample
        ...     return (model(batch[0]).squeeze(-1) - batch[1]) ** 2
        >>> data = [(torch.randn(4, 3), torch.randn(4))]
        >>> fisher = estimate_fisher(net, data, loss=loss, progress=False)
        >>> sorted(fisher), fisher.count, fisher["weight"].shape
        (['bias', 'weight'], 4, (1, 3))
    """
    opts = FisherSettings.of(options, "estimate_fisher")
    root = _unwrap(model)
    loss_fn, loss_name = _resolve_loss(loss, seed)
    chunk_size = check_int(opts.chunk_size, "chunk_size", 1, 8, optional=True)
    all_params = dict(root.named_parameters())
    if params is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    else:
        wanted = check_known(params, "params", list(all_params), "names of this model's parameters")
        names = [n for n in wanted if all_params[n].requires_grad]
    if not names:
        raise bad_argument(
            "model", "parameters that require gradients", "none", "unfreeze the model"
        )
    check_choice(output, "output", ("diagonal", "norms"))
    run: dict[str, Any] = {"loss": loss_name, "output": output}
    if output == "norms":
        axes = norms.default_axes(root, names, _features, ())
        if norm_axes is not None:
            axes = norms.resolve_axes(names, {n: all_params[n].shape for n in names}, norm_axes)
        run["norm_shapes"] = {n: list(all_params[n].shape) for n in names}
        engine: _Engine = _NormsEngine(root, loss_fn, names, chunk_size, axes)
    else:
        engine = _Engine(root, loss_fn, names, chunk_size)
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        return loop.estimate(
            batches,
            engine,
            run=run,
            result=norms.FisherNorms.from_accumulator if output == "norms" else None,
            **opts.loop(),
        )
    finally:
        for m, mode in modes:
            m.training = mode


def _norms_args(root: Any, guarded: Sequence[str], found: Sequence[Any]) -> dict[str, Any]:
    names = list(guarded) or [n for n, p in root.named_parameters() if p.requires_grad]
    extra = [(p, a) for f in found for p, a in f.site.unit_axes.items()]
    return {"output": "norms", "norm_axes": norms.default_axes(root, names, _features, extra)}


def _model_name(root: Any) -> str:
    cfg = getattr(root, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else type(root).__name__


def profile(
    model: Any,
    batches: Iterable[Any],
    loss: str | Callable[..., Any] = "mlm",
    *,
    sites: Any = None,
    add_sites: Any = None,
    seed: int = 0,
    method: str = "norms",
    tensors: Iterable[str] | None = None,
    example_input: Any = None,
    **options: Unpack[ProfileOptions],
) -> SensitivityProfile:
    """Estimate the Fisher diagonal of the guarded parameters and build a sensitivity profile.

    Takes :func:`estimate_fisher`'s arguments, plus ``sites`` (None, a list of Sites or a site
    mapping), ``add_sites`` (see :func:`sites`), ``aggregation`` and ``mapping`` (stored in the
    profile), ``cache`` (store it in the per-user cache so :func:`apply` finds it) and
    ``metadata`` (merged into the profile's), ``tensors`` (more parameter names whose Fisher the
    profile keeps, e.g. :func:`adapters.torch.lora_tensors` for LoRA fine-tuning). The width of
    each dropped tensor is measured during estimation, so per-unit scores are right even where
    the structure is ambiguous. ``example_input`` is the batch the site discovery traces (see
    :func:`adapters.torch.sites`); rate holders that forward never uses are not profiled.
    ``method="norms"`` (default) estimates only what the profile keeps (per-tensor and
    per-unit sums, :func:`estimate_fisher` with ``output="norms"``); ``method="diagonal"``
    estimates the full diagonal first (same scores to float rounding, slower).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1),
        ...                           torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> def loss(model, batch):
        ...     return model(batch).pow(2).mean(-1)
        >>> prof = profile(net, [torch.randn(8, 3)], loss=loss, progress=False)
        >>> prof.site_names, prof.metadata["samples"]
        (['1', '3'], 8)
    """
    opts = ProfileSettings.of(options, "profile")
    root = _unwrap(model)
    check_choice(method, "method", ("norms", "diagonal"))
    index, found = _resolve_sites(root, sites, add_sites, example_input)
    _, loss_name = _resolve_loss(loss, seed)
    guarded = [n for n in index.owner if any(n in f.site.params for f in found)]
    if tensors is not None:
        extra = check_known(
            [str(t) for t in tensors],
            "tensors",
            list(index.owner),
            "parameter names of this model",
            f"use names from model.named_parameters(), e.g. {list(index.owner)[:2]}",
        )
        guarded += [t for t in extra if t not in guarded]
    widths: dict[str, int] = {}
    handles = []
    for f in found:
        if f.site.kind == "attribute" or f.role != "hidden":
            continue
        target = f.owner
        is_hook_virtual = not f.installed  # the hook target's output is what gets dropped

        def record(
            mod: Any, args: Any, out: Any, _name: str = f.site.name, _post: bool = is_hook_virtual
        ) -> None:
            t = out if _post else (args[0] if args else None)
            if isinstance(t, tuple) and t:
                t = t[0]
            if torch.is_tensor(t) and t.dim() > 0:
                widths[_name] = int(t.shape[-1])

        handles.append(target.register_forward_hook(record))
    try:
        result = estimate_fisher(
            root,
            batches,
            loss=loss,
            params=guarded or None,
            seed=seed,
            **(_norms_args(root, guarded, found) if method == "norms" else {}),
            **opts.fisher(),
        )
    finally:
        for h in handles:
            h.remove()
    measured = []
    for f in found:
        w = widths.get(f.site.name)
        if w is not None and w != f.site.units:
            f = replace(
                f, site=replace(f.site, units=w, unit_axes=_unit_axes(index, f.site.params, w))
            )
        measured.append(f.site)
    meta = {
        "model": _model_name(root),
        "samples": result.count,
        "skipped": result.skipped,
        "loss": loss_name,
        "framework": "torch",
        "torch_version": torch.__version__,
        "seed": seed,
        "max_samples": opts.max_samples,
        "unit_widths": "measured" if widths else "structural",
    }
    tf = sys.modules.get("transformers")
    if tf is not None:
        meta["transformers_version"] = getattr(tf, "__version__", "")
    first: dict[int, str] = {}
    tied = {}  # a parameter shared by several modules: its other names (an exporter may use one)
    for n, p in root.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), n) != n:
            tied[n] = first[id(p)]
    if tied:
        meta["tied_parameters"] = tied
    frozen = [n for n, p in root.named_parameters() if not p.requires_grad]
    measured, unscored = scorable(measured, frozen)
    if unscored:  # never silent: in the profile's metadata and a warning
        meta["unscored_sites"] = unscored
        # the rate each has in this model: an export without its Dropout node keeps it there
        meta["unscored_rates"] = {
            f.site.name: current_p(f) for f in found if f.site.name in unscored
        }
        warnings.warn(
            f"adapters.torch.profile: {len(unscored)} site(s) get no score and are left out of "
            f"the profile (apply treats them like any site the profile lacks): {unscored}",
            UserWarning,
            stacklevel=2,
        )
    if not measured:
        raise no_sites(
            "the sites guard only frozen parameters or none: unfreeze the pretrained weights "
            "(requires_grad=True) before profiling",
            detail=type(root).__name__,
        )
    build = norms.profile_from_norms if method == "norms" else SensitivityProfile.from_fisher
    fp = fingerprint(root, params=sorted({p for s in measured for p in s.params}))
    return opts.finish(build, result, measured, fp, meta)
