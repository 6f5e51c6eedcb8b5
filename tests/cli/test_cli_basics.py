"""`gd --version`, `--help` of every command, `gd show`, and one-line errors that need no model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gd_core import SensitivityProfile, Site, __version__

COMMANDS = ["show", "profile", "apply-onnx", "landscape", "demo"]


def _profile(path: Path) -> Path:
    sites = [Site(f"layer.{i}.dropout", (f"layer.{i}.weight",)) for i in range(4)]
    fisher = {f"layer.{i}.weight": np.full(3, 10.0**-i) for i in range(4)}
    prof = SensitivityProfile.from_fisher(fisher, sites, metadata={"model": "toy", "samples": 5})
    prof.save(path)
    return path


def test_version_is_printed_without_importing_a_framework() -> None:
    code = (
        "import sys; from gd_cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'onnx') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == [f"guided-dropout {__version__}", "[]"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(gd, command: str) -> None:
    rc, out, err = gd(command, "--help")
    assert rc == 0 and err == ""
    assert "examples:" in out
    examples = out.split("examples:", 1)[1]
    assert f"gd {command}" in examples


def test_top_level_help_lists_every_command(gd) -> None:
    rc, out, _ = gd("--help")
    assert rc == 0
    for command in COMMANDS:
        assert command in out


def test_no_command_prints_help_and_fails(gd) -> None:
    rc, out, _ = gd()
    assert rc == 2 and "COMMAND" in out


def test_show_prints_sites_scores_and_probabilities(gd, tmp_path: Path) -> None:
    path = _profile(tmp_path / "toy.profile.npz")
    rc, out, err = gd("show", path)
    assert rc == 0 and err == ""
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "dropout" in line}
    assert set(rows) == {f"layer.{i}.dropout" for i in range(4)}
    # highest Fisher (layer.0) -> rank 1, p 0; lowest -> rank 4, p 0.1
    assert rows["layer.0.dropout"][1:] == ["1", "0.0000"]
    assert rows["layer.3.dropout"][1:] == ["4", "0.1000"]
    assert float(rows["layer.2.dropout"][0]) == pytest.approx(1e-2)
    assert "model=toy" in out and "samples=5" in out


def test_show_applies_mapping_overrides(gd, tmp_path: Path) -> None:
    path = _profile(tmp_path / "toy.profile.npz")
    rc, out, _ = gd("show", path, "--p-upper", "0.3", "--p-lower", "0.1")
    assert rc == 0
    ps = [float(line.split()[-1]) for line in out.splitlines() if "dropout" in line]
    assert ps == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3], abs=1e-4)


def test_show_writes_a_png(gd, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = _profile(tmp_path / "toy.profile.npz")
    rc, out, _ = gd("show", path, "--plot", tmp_path / "p.png")
    assert rc == 0 and "plot written" in out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(rc: int, err: str) -> str:
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_show_missing_profile_is_one_line(gd, tmp_path: Path) -> None:
    rc, _, err = gd("show", tmp_path / "nope.npz")
    line = _one_line_error(rc, err)
    assert line.startswith("gd show: error:") and "nope.npz" in line and "gd profile" in line


def test_show_corrupt_profile_is_one_line(gd, tmp_path: Path) -> None:
    bad = tmp_path / "bad.profile.npz"
    bad.write_bytes(b"not a zip at all")
    rc, _, err = gd("show", bad)
    assert "corrupt" in _one_line_error(rc, err)


def test_show_tampered_profile_is_a_clean_error(gd, tmp_path: Path) -> None:
    """Issue 14.4: byte flips in the zip directory (NotImplementedError inside zipfile) and a
    profile with a negative score are one line and exit status 2, never "internal error"."""
    good = _profile(tmp_path / "good.profile.npz").read_bytes()
    directory = good.find(b"PK\x01\x02")
    for field, value in ((10, 0x63), (6, 0xFF), (8, 0x20)):
        bad = bytearray(good)
        bad[directory + field] = value
        path = tmp_path / f"bad{field}.profile.npz"
        path.write_bytes(bytes(bad))
        rc, _, err = gd("show", path)
        line = _one_line_error(rc, err)
        assert rc == 2
        assert "internal error" not in line and "corrupt" in line and str(path) in line
    prof = SensitivityProfile.load(tmp_path / "good.profile.npz")
    negative = tmp_path / "negative.profile.npz"
    SensitivityProfile(**{**prof.__dict__, "scores": -prof.scores}).save(negative)
    rc, _, err = gd("show", negative)
    line = _one_line_error(rc, err)
    assert rc == 2
    assert "internal error" not in line and "negative" in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["profile", "--model", "m", "--corpus", "c", "--samples", "0"], ["--samples", ">= 1"]),
        (["profile", "--model", "m", "--corpus", "c", "--seq-len", "x"], ["--seq-len", "'x'"]),
        (["profile", "--corpus", "c"], ["--model"]),
        (["landscape", "--model", "m", "--profile", "p", "--corpus", "c"], ["--out"]),
        (
            [
                "landscape",
                "--model",
                "m",
                "--profile",
                "p",
                "--corpus",
                "c",
                "--out",
                "x.png",
                "--radius",
                "-1",
            ],
            ["--radius"],
        ),
        (["apply-onnx", "a.onnx"], ["PROFILE"]),
        (["show", "p", "--mapping", "nonsense"], ["--mapping"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_arguments_are_one_line(gd, args: list[str], words: list[str]) -> None:
    rc, _, err = gd(*args)
    line = _one_line_error(rc, err)
    assert rc == 2 and "error:" in line and "--help" in line
    for w in words:
        assert w in line


def test_bad_argument_from_the_console_is_one_line() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gd_cli",
            "profile",
            "--model",
            "m",
            "--corpus",
            "c",
            "--batch-size",
            "-3",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "--batch-size" in res.stderr


@pytest.mark.parametrize("content", [b"", b"\n\n = Only A Heading = \n  \n", b"\x00\x01\x02binary"])
def test_unusable_corpus_is_one_line(gd, tmp_path: Path, content: bytes) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    # the corpus is read before any model is loaded, so a bogus model name is never reached
    rc, _, err = gd("profile", "--model", tmp_path / "no-model", "--corpus", corpus)
    line = _one_line_error(rc, err)
    assert line.startswith("gd profile: error: corpus:") and str(corpus) in line


def test_missing_corpus_is_one_line(gd, tmp_path: Path) -> None:
    rc, _, err = gd("profile", "--model", "minilm", "--corpus", tmp_path / "missing.txt")
    line = _one_line_error(rc, err)
    assert "does not exist" in line and "missing.txt" in line


def test_apply_onnx_missing_input_is_one_line(gd, tmp_path: Path) -> None:
    prof = _profile(tmp_path / "toy.profile.npz")
    rc, _, err = gd("apply-onnx", tmp_path / "in.onnx", prof, tmp_path / "out.onnx")
    assert "in.onnx" in _one_line_error(rc, err)
    assert not (tmp_path / "out.onnx").exists()


def test_apply_onnx_garbage_input_is_one_line(gd, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    prof = _profile(tmp_path / "toy.profile.npz")
    bad = tmp_path / "in.onnx"
    bad.write_bytes(b"\xff\xfe garbage")
    rc, _, err = gd("apply-onnx", bad, prof, tmp_path / "out.onnx")
    assert "cannot read" in _one_line_error(rc, err)


def test_landscape_wants_a_png_name(gd, tmp_path: Path) -> None:
    prof = _profile(tmp_path / "toy.profile.npz")
    rc, _, err = gd(
        "landscape", "--model", "m", "--profile", prof, "--corpus", "c", "--out", tmp_path / "l.jpg"
    )
    assert ".png" in _one_line_error(rc, err)
