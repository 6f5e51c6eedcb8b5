"""Issue 25: AdapterHub's `adapters` (PyPI `adapters`) shares our import name: a foreign
`adapters` package makes `import adapters.torch` fail naming it and the fix, and its distribution
installed beside ours is reported at `import adapters`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fake_site(tmp_path: Path, foreign_init: bool) -> Path:
    site = tmp_path / "site"
    shutil.copytree(ROOT / "adapters", site / "adapters",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    if foreign_init:  # AdapterHub's __init__ written over ours (both installed in one folder)
        (site / "adapters" / "__init__.py").write_text('__version__ = "1.2.0"\n')
    info = site / "adapters-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adapters\nVersion: 1.2.0\n")
    return site


def run(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=site
    )  # fmt: skip (cwd: not the repository root)


def test_foreign_package_makes_the_adapter_import_fail_with_the_fix(tmp_path):
    site = fake_site(tmp_path, foreign_init=True)
    done = run(site, "import adapters.torch")
    assert done.returncode != 0, done.stderr[:1500]
    err = done.stderr
    assert "ImportError" in err and "AdapterHub" in err, err[-2000:]
    assert str(site / "adapters") in err and "virtual environment" in err


def test_foreign_distribution_beside_ours_warns_at_import(tmp_path):
    site = fake_site(tmp_path, foreign_init=False)
    done = run(site, "import adapters, gd_core")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RuntimeWarning" in done.stderr and "AdapterHub's `adapters` 1.2.0" in done.stderr
