"""The loss-landscape diagnostic: how sharp do the high-Fisher parameters make the landscape?

Sharma et al. show that the pretraining loss rises much faster along random directions that move
only the parameters with high Fisher information than along directions that move only the
low-Fisher ones. This module reproduces that study for any PyTorch model and profile:

* the profile's sites are ranked by score; the **top** group is every parameter guarded by the
  top half of the sites, the **bottom** group every parameter guarded by the bottom half, and
  **all** every guarded parameter;
* for each of ``directions`` random Gaussian directions (one draw per direction, shared by the
  three groups and masked to each group), the loss is evaluated at ``theta + a * d`` for
  ``points`` steps ``a`` in ``[-radius, radius]``;
* directions are normalised either per filter (``"filter"``, Li et al. 2018: every row of a
  matrix, and every vector parameter as a whole, gets the norm of the corresponding slice of
  ``theta``, so ``a`` is a *relative* step) or as a whole (``"plain"``: the masked direction
  gets the norm of the group's parameters).

The summary gives, per group, the mean loss increase at ``|a| = radius`` and the curvature at
``a = 0`` (central second difference at the smallest step). Plot with :func:`plot_landscape`.

Example:
    >>> import numpy as np, torch
    >>> from gd_core import SensitivityProfile, Site
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(), torch.nn.Linear(3, 1),
    ...                           torch.nn.Dropout())
    >>> prof = SensitivityProfile.from_fisher(
    ...     {n: np.full(tuple(p.shape), float(i + 1)) for i, (n, p) in enumerate(net.named_parameters())},
    ...     [Site("1", ("0.weight", "0.bias")), Site("3", ("2.weight", "2.bias"))])
    >>> data = [torch.randn(8, 3)]
    >>> res = loss_landscape(net, lambda m, b: m(b).squeeze(-1) ** 2, data, prof, points=5,
    ...                      directions=2, progress=False)
    >>> sorted(res.losses), res.losses["top"].shape
    (['all', 'bottom', 'top'], (2, 5))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapters import require
from gd_core import ArgumentError, ProfileMismatchError, SensitivityProfile
from gd_core import align as _align

from .plots import save_png

NORMALIZATIONS: tuple[str, ...] = ("filter", "plain")
GROUPS: tuple[str, ...] = ("top", "bottom", "all")
_COLORS = {"top": "#cc3311", "bottom": "#0077bb", "all": "#555555"}
_LABELS = {
    "top": "top-50% Fisher sites",
    "bottom": "bottom-50% Fisher sites",
    "all": "all guarded parameters",
}


@dataclass
class LandscapeResult:
    """Losses along random directions for the three parameter groups.

    Attributes:
        steps: the step sizes ``a`` (``points`` values from ``-radius`` to ``radius``).
        losses: ``{group: array (directions, points)}`` of mean per-sample losses.
        base_loss: the loss at ``a = 0``.
        group_sites: ``{group: site names}``; group_params: ``{group: parameter names}``.
        group_sizes: ``{group: number of scalar parameters moved}``.
        normalization, radius, seed: how the directions were drawn.
    """

    steps: np.ndarray
    losses: dict[str, np.ndarray]
    base_loss: float
    group_sites: dict[str, list[str]]
    group_params: dict[str, list[str]]
    group_sizes: dict[str, int]
    normalization: str
    radius: float
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per group: ``increase_at_radius`` (mean over directions and both signs),
        ``max_increase`` and ``curvature`` (second difference at the smallest step, mean over
        directions).

        Example:
            >>> r = LandscapeResult(np.array([-1.0, 0.0, 1.0]), {"top": np.array([[3.0, 1.0, 5.0]])},
            ...     1.0, {}, {}, {}, "plain", 1.0, 0)
            >>> r.summary()["top"]
            {'increase_at_radius': 3.0, 'max_increase': 4.0, 'curvature': 6.0}
        """
        steps = self.steps
        zero = int(np.argmin(np.abs(steps)))
        ends = [0, len(steps) - 1]
        out = {}
        for g, arr in self.losses.items():
            inc = arr[:, ends].mean() - self.base_loss
            curv = float("nan")
            if 0 < zero < len(steps) - 1:
                h1, h2 = steps[zero] - steps[zero - 1], steps[zero + 1] - steps[zero]
                left, mid, right = arr[:, zero - 1], arr[:, zero], arr[:, zero + 1]
                # second derivative from three unevenly spaced points
                second = 2 * (h1 * right - (h1 + h2) * mid + h2 * left) / (h1 * h2 * (h1 + h2))
                curv = float(second.mean())
            out[g] = {
                "increase_at_radius": float(inc),
                "max_increase": float(arr.max() - self.base_loss),
                "curvature": curv,
            }
        return out

    def table(self) -> str:
        """The summary as aligned text, one row per group.

        Example:
            >>> r = LandscapeResult(np.array([-1.0, 0.0, 1.0]), {"top": np.array([[3.0, 1.0, 5.0]])},
            ...     1.0, {"top": ["s"]}, {"top": ["w"]}, {"top": 4}, "plain", 1.0, 0)
            >>> print(r.table().splitlines()[1].split())
            ['top', '1', '4', '3.0000', '4.0000', '6.000e+00']
        """
        summ = self.summary()
        head = (
            f"{'group':<7} {'sites':>5} {'params':>10} {'dloss@r':>9} {'max dloss':>10} "
            f"{'curvature':>10}"
        )
        lines = [head]
        for g in self.losses:
            s = summ[g]
            lines.append(
                f"{g:<7} {len(self.group_sites.get(g, [])):>5} {self.group_sizes.get(g, 0):>10} "
                f"{s['increase_at_radius']:>9.4f} {s['max_increase']:>10.4f} "
                f"{s['curvature']:>10.3e}"
            )
        lines.append(
            f"base loss {self.base_loss:.4f}; radius {self.radius:g} ({self.normalization}-"
            f"normalised directions); {self.losses[next(iter(self.losses))].shape[0]} direction(s)"
        )
        return "\n".join(lines)


def split_sites(profile: SensitivityProfile) -> dict[str, list[str]]:
    """Site names of the top and bottom halves by Fisher score (the middle site of an odd count
    is in neither), and all sites.

    Example:
        >>> import numpy as np
        >>> from gd_core import Site
        >>> prof = SensitivityProfile.from_fisher({"a": np.ones(1), "b": np.full(1, 5.0),
        ...     "c": np.full(1, 3.0)}, [Site("A", ("a",)), Site("B", ("b",)), Site("C", ("c",))])
        >>> split_sites(prof)
        {'top': ['B'], 'bottom': ['A'], 'all': ['A', 'B', 'C']}
    """
    scores = np.nan_to_num(np.asarray(profile.scores, dtype=np.float64), nan=-np.inf)
    order = list(np.argsort(-scores, kind="stable"))
    half = len(order) // 2
    if half == 0:
        raise ArgumentError(
            f"profile: expected at least two sites to compare, received {len(order)}; fix: use a "
            "profile of a model with several dropout sites"
        )
    names = profile.site_names
    top = {names[i] for i in order[:half]}
    bottom = {names[i] for i in order[len(order) - half :]}
    return {
        "top": [n for n in names if n in top],
        "bottom": [n for n in names if n in bottom],
        "all": list(names),
    }


def _group_params(
    profile: SensitivityProfile, groups: Mapping[str, list[str]]
) -> dict[str, list[str]]:
    out = {}
    for g, site_names in groups.items():
        seen: dict[str, None] = {}
        for s in site_names:
            for p in profile.site(s).params:
                seen[p] = None
        out[g] = list(seen)
    return out


def random_direction(
    params: Mapping[str, Any], names: Sequence[str], generator: Any, normalization: str = "filter"
) -> dict[str, Any]:
    """A Gaussian direction over ``names``, normalised per filter or as a whole.

    Example:
        >>> import torch
        >>> w = {"w": torch.ones(2, 3)}
        >>> d = random_direction(w, ["w"], torch.Generator().manual_seed(0))
        >>> torch.allclose(d["w"].norm(dim=1), w["w"].norm(dim=1))
        True
    """
    torch = require("torch")
    draw = {n: torch.randn(params[n].shape, generator=generator) for n in names}
    return normalise(draw, params, names, normalization)


def normalise(
    draw: Mapping[str, Any],
    params: Mapping[str, Any],
    names: Sequence[str],
    normalization: str = "filter",
) -> dict[str, Any]:
    """Restrict a raw direction to ``names`` and scale it to the parameters' norms.

    ``"filter"``: every row of a matrix (every vector parameter as a whole) gets the norm of the
    same slice of the parameters. ``"plain"``: the whole restricted direction gets the norm of the
    restricted parameters.

    Example:
        >>> import torch
        >>> p = {"w": torch.full((2, 2), 3.0), "b": torch.ones(2)}
        >>> d = normalise({"w": torch.ones(2, 2), "b": torch.ones(2)}, p, ["w"], "plain")
        >>> sorted(d), round(float(d["w"].norm()), 4)
        (['w'], 6.0)
    """
    if normalization not in NORMALIZATIONS:
        raise ArgumentError(
            f"normalization: expected one of {NORMALIZATIONS}, received {normalization!r}; fix: "
            "pass 'filter' (relative steps per row) or 'plain'"
        )
    out = {}
    for n in names:
        p = params[n].detach()
        d = draw[n].to(p.device, p.dtype)
        if normalization == "filter":
            if p.dim() >= 2:
                rows_p = p.reshape(p.shape[0], -1).norm(dim=1, keepdim=True)
                rows_d = d.reshape(d.shape[0], -1).norm(dim=1, keepdim=True).clamp_min(1e-12)
                d = (d.reshape(d.shape[0], -1) * rows_p / rows_d).reshape(p.shape)
            else:
                d = d * p.norm() / d.norm().clamp_min(1e-12)
        out[n] = d
    if normalization == "plain" and out:
        norm_p = math.sqrt(sum(float(params[n].detach().double().pow(2).sum()) for n in names))
        norm_d = math.sqrt(sum(float(d.double().pow(2).sum()) for d in out.values()))
        scale = norm_p / max(norm_d, 1e-12)
        out = {n: d * scale for n, d in out.items()}
    return out


def mean_loss(model: Any, loss_fn: Callable[..., Any], batches: Sequence[Any]) -> float:
    """The mean per-sample loss over ``batches`` (no gradient).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> isinstance(mean_loss(net, lambda m, b: m(b).squeeze(-1) ** 2, [torch.randn(3, 2)]), float)
        True
    """
    torch = require("torch")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            losses = torch.as_tensor(loss_fn(model, batch)).reshape(-1).double()
            total += float(losses.sum())
            count += int(losses.numel())
    if count == 0:
        raise ArgumentError("batches: expected at least one sample, received none; fix: pass data")
    return total / count


class FrozenTargets:
    """A contrastive loss whose positives stay at their values at the unperturbed parameters.

    :class:`adapters.torch.ContrastiveLoss` computes each sample's positive (the
    embedding of the full sample) under ``no_grad`` with the *current* parameters. Its gradient at
    the pretrained parameters -- what the Fisher is made of -- is therefore that of a loss whose
    positives are constants. Along a perturbation the two differ: recomputing the positives with
    the perturbed model moves the target with the anchor and hides the damage. This wrapper
    caches each batch's positives the first time it sees the batch (call it at the unperturbed
    parameters first, as :func:`loss_landscape` does), so the landscape is that of the function
    whose Fisher the profile holds. Other losses are passed through unchanged.

    Example:
        >>> FrozenTargets(lambda m, b: b)(None, 3)
        3
    """

    def __init__(self, loss: Callable[..., Any]) -> None:
        self.loss = loss
        self._cache: dict[int, Any] = {}
        inner = getattr(loss, "inner", loss)
        self._contrastive = inner if type(inner).__name__ == "ContrastiveLoss" else None

    def __call__(self, model: Any, batch: Any) -> Any:
        inner = self._contrastive
        if inner is None:
            return self.loss(model, batch)
        original = inner.embed
        key = id(batch)

        def embed(m: Any, b: Any) -> Any:
            if b is not batch:  # the token-dropout view or the reference bank
                return original(m, b)
            if key not in self._cache:  # the positive: frozen at the first evaluation
                self._cache[key] = (batch, original(m, b))
            return self._cache[key][1]

        inner.embed = embed
        try:
            return self.loss(model, batch)
        finally:
            del inner.embed  # back to the class's method


def loss_landscape(
    model: Any,
    loss_fn: Callable[..., Any],
    batches: Iterable[Any],
    profile: SensitivityProfile,
    *,
    directions: int = 3,
    radius: float = 0.5,
    points: int = 11,
    normalization: str = "filter",
    seed: int = 0,
    progress: bool = True,
    strict: bool = True,
) -> LandscapeResult:
    """Evaluate the loss along random directions restricted to high-, low- and all-Fisher
    parameters (see the module docstring). The model's parameters are restored afterwards.

    ``loss_fn(model, batch)`` returns per-sample losses; random draws inside it should depend on
    the batch only (e.g. :func:`gd_cli.corpus.objective_loss`) so that every point sees the
    same masks. The profile is aligned to the model's names (a profile of the bare encoder works
    on a model with a head).

    Example:
        >>> import torch  # see the module docstring for a complete example
    """
    torch = require("torch")
    import adapters.torch as gdt

    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ArgumentError(
            f"directions: expected an int >= 1, received {directions!r}; fix: pass e.g. 3"
        )
    if isinstance(points, bool) or not isinstance(points, int) or points < 3 or points % 2 == 0:
        raise ArgumentError(
            f"points: expected an odd int >= 3 (so that step 0 is included), received {points!r}; "
            "fix: pass e.g. 11"
        )
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ArgumentError(
            f"radius: expected a number > 0, received {radius!r}; fix: pass e.g. 0.5"
        )
    if normalization not in NORMALIZATIONS:
        raise ArgumentError(
            f"normalization: expected one of {NORMALIZATIONS}, received {normalization!r}; fix: "
            "pass 'filter' or 'plain'"
        )
    batches = list(batches)
    loss_fn = FrozenTargets(loss_fn)
    aligned = _align.align(
        profile, [s.name for s in gdt.sites(model)], gdt.fingerprint(model), strict=strict
    )
    params = dict(model.named_parameters())
    groups = split_sites(aligned)
    gparams = _group_params(aligned, groups)
    missing = [p for names in gparams.values() for p in names if p not in params]
    if missing:
        raise ProfileMismatchError(
            f"profile: expected sites guarding this model's parameters, received sites guarding "
            f"{missing[:3]}, which the model lacks; fix: use a profile computed on this model"
        )
    names_all = gparams["all"]
    saved = {n: params[n].detach().clone() for n in names_all}
    steps = np.linspace(-radius, radius, points)
    losses = {g: np.zeros((directions, points)) for g in GROUPS}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=directions * len(GROUPS) * (points - 1), desc="landscape", unit="eval")
        except ImportError:
            bar = None
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, loss_fn, batches)
        for k in range(directions):
            gen = torch.Generator().manual_seed(seed * 7919 + k)
            # one draw over all guarded parameters, masked per group (shared between groups)
            draw = {
                n: torch.randn(params[n].shape, generator=gen, dtype=torch.float32)
                for n in names_all
            }
            for g in GROUPS:
                dirn = normalise(draw, params, gparams[g], normalization)
                for j, a in enumerate(steps):
                    if a == 0:
                        losses[g][k, j] = base
                        continue
                    with torch.no_grad():
                        for n, d in dirn.items():
                            params[n].copy_(saved[n] + float(a) * d)
                    losses[g][k, j] = mean_loss(model, loss_fn, batches)
                    if bar is not None:
                        bar.update(1)
                with torch.no_grad():
                    for n in dirn:
                        params[n].copy_(saved[n])
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
        model.train(was_training)
        if bar is not None:
            bar.close()
    return LandscapeResult(
        steps=steps,
        losses=losses,
        base_loss=base,
        group_sites=groups,
        group_params=gparams,
        group_sizes={g: int(sum(params[n].numel() for n in ns)) for g, ns in gparams.items()},
        normalization=normalization,
        radius=float(radius),
        seed=seed,
    )


def plot_landscape(
    result: LandscapeResult, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Loss against step size, one colour per group: thin lines are single directions, the
    thick line their mean. Written atomically as a PNG.

    Example:
        >>> import tempfile, os
        >>> r = LandscapeResult(np.array([-1.0, 0.0, 1.0]), {"top": np.array([[3.0, 1.0, 5.0]])},
        ...     1.0, {"top": ["s"]}, {"top": ["w"]}, {"top": 4}, "plain", 1.0, 0)
        >>> plot_landscape(r, os.path.join(tempfile.mkdtemp(), "l.png")).suffix
        '.png'
    """
    matplotlib = require("matplotlib", "gd landscape")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "gd landscape")
    summ = result.summary()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for g, arr in result.losses.items():
        color = _COLORS.get(g, None)
        for row in arr:
            ax.plot(result.steps, row, color=color, lw=0.7, alpha=0.35)
        label = (
            f"{_LABELS.get(g, g)} ({len(result.group_sites.get(g, []))} sites, "
            f"{result.group_sizes.get(g, 0):,} params): "
            f"+{summ[g]['increase_at_radius']:.3g} at |a|={result.radius:g}"
        )
        ax.plot(result.steps, arr.mean(axis=0), color=color, lw=2.2, label=label)
    ax.axhline(result.base_loss, color="k", lw=0.6, ls=":")
    unit = "relative to each row's norm" if result.normalization == "filter" else "x ||theta||"
    ax.set_xlabel(f"step a along a random direction ({result.normalization}-normalised, {unit})")
    ax.set_ylabel("pretraining loss (mean per sample)")
    ax.legend(fontsize=7.5, loc="upper center")
    ax.set_title(title or "Loss landscape: high- vs low-Fisher parameters", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)
