"""Each adapter imports only its own framework, and a missing one names the extra to install;
the application (``gd_cli``) imports no framework until a command runs; the package code has no
import circle, and the library never imports the application."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK = "import sys; sys.modules[{mod!r}] = None\n"
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gd_core", "adapters", "gd_cli")
FRAMEWORKS = ("torch", "tensorflow", "keras", "onnx", "onnxruntime", "transformers", "matplotlib")


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "module, blocked, extra",
    [
        ("adapters.torch", "torch", "torch"),
        ("adapters.keras", "keras", "keras"),
        ("adapters.onnx", "onnx", "onnx"),
    ],
)
def test_missing_framework_names_the_extra(module, blocked, extra):
    code = BLOCK.format(mod=blocked) + (
        f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\nelse:\n"
        "    print('imported')\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert f"pip install './guided-dropout[{extra}]'" in out.stdout, out.stdout


def test_torch_adapter_imports_no_other_framework():
    pytest.importorskip("torch")
    out = run(
        "import sys, adapters.torch\n"
        "print([m for m in ('tensorflow', 'keras', 'onnxruntime') if m in sys.modules])"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_version_imports_no_framework():
    out = run(
        "import sys\nfrom gd_cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'tensorflow', 'keras', 'onnx') if m in sys.modules])"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_importing_every_gd_cli_module_imports_no_framework():
    names = sorted(m for m in _modules(REPO) if m.startswith("gd_cli") and m != "gd_cli.__main__")
    assert "gd_cli.main" in names and "gd_cli.commands.profile" in names, names
    out = run(
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "import gd_cli.main\ngd_cli.main.build_parser().format_help()\n"
        f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_command_without_its_framework_names_the_extra(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one paragraph\n", encoding="utf-8")
    out = run(
        BLOCK.format(mod="torch")
        + "from gd_cli.main import main\n"
        + f"print(main(['profile', '--model', 'm', '--corpus', {str(corpus)!r}]))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2", out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pip install './guided-dropout[torch]'" in out.stderr, out.stderr


# --------------------------------------------------------------------------------------------
# the import graph of the package code
# --------------------------------------------------------------------------------------------


def _modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skip.update(id(n) for sub in node.body for n in ast.walk(sub))
    return skip


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (also inside functions: a lazy
    import closes a circle as surely as a top-level one), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_only(tree)
    out: set[str] = set()

    def add(module: str) -> None:
        while module and module not in known:  # `import a.b.func` -> the module a.b
            module = module.rpartition(".")[0]
        if module and module != name:
            out.add(module)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                full = f"{module}.{alias.name}"  # `from pkg import submodule`
                add(full if full in known else module)
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``{module: modules of the packages it imports}``."""
    known = _modules(root, packages)
    return {m: _imports(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*path[path.index(v) :], v]
            if v not in state and (cycle := visit(v)):
                return cycle
        state[u] = 2
        path.pop()
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_package_code_has_no_import_circle():
    graph = import_graph(REPO)
    assert {"gd_core", "adapters", "gd_cli.main", "gd_cli.corpus"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_application():
    graph = import_graph(REPO)
    bad = {m: sorted(v for v in deps if v.split(".")[0] == "gd_cli") for m, deps in graph.items()}
    bad = {m: v for m, v in bad.items() if v and m.split(".")[0] in ("gd_core", "adapters")}
    assert not bad, f"gd_core/adapters import the application: {bad}"


def test_the_circle_check_finds_a_circle(tmp_path):
    pkg = tmp_path / "app"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from app import c\n")
    (pkg / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import app.d\n")
    (pkg / "d.py").write_text("")
    graph = import_graph(tmp_path, ("app",))
    assert graph["app.a"] == {"app.sub.b"} and graph["app.c"] == set()
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("from . import a\n")  # a -> sub.b -> c -> a, through a lazy import
    cycle = find_cycle(import_graph(tmp_path, ("app",)))
    assert cycle == ["app.a", "app.sub.b", "app.c", "app.a"]
