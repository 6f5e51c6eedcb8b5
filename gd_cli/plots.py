"""Plots of a sensitivity profile (matplotlib, imported lazily), and the atomic save every plot of
the application goes through (the format is the file's suffix: ``.png``, ``.jpg``, ``.svg``,
``.pdf``...; an unknown suffix is refused naming the supported ones)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapters import require
from gd_core import SensitivityProfile
from gd_core.errors import bad_argument


def save_png(fig: Any, path: str | os.PathLike[str], argument: str = "--plot") -> Path:
    """Write a matplotlib figure atomically (a temporary file, then a rename) in the format its
    suffix names (PNG for ``.png``, JPEG for ``.jpg``...), creating the folder, and close the
    figure. Returns the path; a suffix matplotlib cannot write is refused (``argument`` names
    the option the path came from).

    Example:
        >>> import tempfile, os
        >>> require("matplotlib").use("Agg")
        >>> plt = require("matplotlib.pyplot")
        >>> fig = plt.figure()
        >>> save_png(fig, os.path.join(tempfile.mkdtemp(), "sub", "f.png")).name
        'f.png'
    """
    plt = require("matplotlib.pyplot", "writing a plot")
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        plt.close(fig)
        raise bad_argument(
            argument,
            "a file name ending in one of " + ", ".join(f".{k}" for k in sorted(supported)),
            str(path),
            f"name the file e.g. {out.stem or 'profile'}.png (or .jpg, .svg, .pdf)",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_profile(
    profile: SensitivityProfile,
    path: str | os.PathLike[str],
    *,
    mapping: str | Mapping[str, Any] | None = None,
) -> Path:
    """Per-site Fisher (log scale) beside the dropout probabilities, one row per site.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from gd_core import Site
        >>> prof = SensitivityProfile.from_fisher(
        ...     {"a": np.ones(2), "b": np.full(2, 3.0)}, [Site("a.drop", ("a",)), Site("b.drop", ("b",))])
        >>> plot_profile(prof, os.path.join(tempfile.mkdtemp(), "p.png")).suffix
        '.png'
    """
    matplotlib = require("matplotlib", "gd show --plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "gd show --plot")
    probs = profile.probability_array(mapping)
    names = profile.site_names
    y = np.arange(len(names))
    height = max(3.0, 0.28 * len(names) + 1.2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    scores = np.where(profile.scores > 0, profile.scores, np.nan)
    ax1.barh(y, scores, color="#4477aa")
    ax1.set_xscale("log")
    ax1.set_xlabel("site Fisher score (log scale; higher = more important)")
    ax1.set_yticks(y, names, fontsize=7)
    ax1.invert_yaxis()
    ax2.barh(y, probs, color="#cc6677")
    order = np.argsort(-profile.scores, kind="stable")
    rank = np.empty(len(names), dtype=int)
    rank[order] = np.arange(1, len(names) + 1)
    for yi, r, p in zip(y, rank, probs, strict=True):
        ax2.text(p, yi, f" {p:.3f} (#{r})", va="center", fontsize=6.5, color="#444444")
    ax2.set_xlim(0, max(float(np.max(probs)), 1e-9) * 1.3)
    ax2.set_xlabel("dropout probability")
    ax2.axvline(
        float(np.mean(probs)), color="k", lw=0.8, ls="--", label=f"mean {np.mean(probs):.3f}"
    )
    ax2.legend(loc="lower right", fontsize=8)
    m = profile.mapping if mapping is None else mapping
    name = m if isinstance(m, str) else m.get("name")
    fig.suptitle(f"Guided dropout profile: {len(names)} sites, mapping {name}")
    fig.tight_layout()
    return save_png(fig, path)
