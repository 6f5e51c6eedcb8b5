"""Each adapter imports only its own framework, and a missing one names the extra to install."""

import subprocess
import sys

import pytest

BLOCK = "import sys; sys.modules[{mod!r}] = None\n"


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
    assert f"pip install 'guided-dropout[{extra}]'" in out.stdout, out.stdout


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
        "import sys\nfrom adapters.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'tensorflow', 'keras', 'onnx') if m in sys.modules])"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]"), out.stdout
