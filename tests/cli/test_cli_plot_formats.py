"""Issue 25: `gd show --plot x.jpg` wrote PNG bytes into a .jpg; the suffix now picks the format,
and a suffix matplotlib cannot write is refused in one line naming the supported ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gd_core import SensitivityProfile, Site


def _profile(path: Path) -> Path:
    sites = [Site(f"layer.{i}.dropout", (f"layer.{i}.weight",)) for i in range(3)]
    fisher = {f"layer.{i}.weight": np.full(3, 10.0**-i) for i in range(3)}
    SensitivityProfile.from_fisher(fisher, sites, metadata={"model": "toy"}).save(path)
    return path


def _one_line_error(rc: int, err: str) -> str:
    assert rc != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("name", "magic"),
    [("p.jpg", b"\xff\xd8\xff"), ("p.jpeg", b"\xff\xd8\xff"), ("p.png", b"\x89PNG"),
     ("p.pdf", b"%PDF"), ("p.svg", b"<?xml")],
)  # fmt: skip
def test_plot_format_follows_the_suffix(gd, tmp_path: Path, name: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    path = _profile(tmp_path / "toy.profile.npz")
    rc, out, _ = gd("show", path, "--plot", tmp_path / name)
    assert rc == 0 and "plot written" in out
    assert (tmp_path / name).read_bytes()[: len(magic)] == magic
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_unknown_suffix_is_refused_naming_the_supported_ones(gd, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = _profile(tmp_path / "toy.profile.npz")
    rc, _, err = gd("show", path, "--plot", tmp_path / "p.xyz")
    line = _one_line_error(rc, err)
    assert "--plot" in line and ".png" in line and ".jpg" in line and "p.xyz" in line
    assert not (tmp_path / "p.xyz").exists()
