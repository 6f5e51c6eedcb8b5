"""One public face: every adapter exposes the same functions with the same parameters.

The contract (docs/conformance.md, "One public face"): each adapter's ``sites``,
``fingerprint``, ``estimate_fisher``, ``profile`` and ``apply`` start with the parameters listed
in ``FACE``, with the same names, order, kinds (positional or keyword-only) and defaults (the
default of ``loss`` is the framework's own); parameters an adapter adds come after them and are
keyword-only; ``estimate_fisher``, ``profile`` and ``apply`` end in ``**options`` typed with the
one TypedDict of ``gd_core.face`` (the shared options are defined there, once). Changing one
adapter's signature alone fails here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from gd_core import face
from gd_core.report import ApplyReport

ADAPTERS = ("torch", "keras", "onnx")
P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
V = inspect.Parameter.VAR_KEYWORD
FACE: dict[str, list[tuple[str, inspect._ParameterKind]]] = {
    "sites": [("model", P), ("mapping", P)],
    "fingerprint": [("model", P)],
    "estimate_fisher": [("model", P), ("batches", P), ("loss", P), ("params", K)],
    "profile": [("model", P), ("batches", P), ("loss", P), ("sites", K)],
    "apply": [("model", P), ("profile", P), ("sites", K)],
}
# the shared options every adapter takes as ``**options``, typed once in gd_core.face
OPTIONS = {
    "estimate_fisher": (face.FisherOptions, face.FisherSettings),
    "profile": (face.ProfileOptions, face.ProfileSettings),
    "apply": (face.ApplyOptions, face.ApplySettings),
}
FRAMEWORK_DEFAULTS = {"loss"}  # the one parameter whose default each framework chooses


def _adapter(name: str):
    deps = {"torch": ("torch",), "keras": ("keras",), "onnx": ("onnx", "onnxruntime")}[name]
    for dep in deps:
        pytest.importorskip(dep)
    return importlib.import_module(f"adapters.{name}")


def _face(fn) -> list[tuple[str, inspect._ParameterKind, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("function", list(FACE))
def test_every_adapter_has_the_face(function):
    faces = {a: _face(getattr(_adapter(a), function)) for a in ADAPTERS}
    want = FACE[function]
    for adapter, params in faces.items():
        shared = [(n, k) for n, k, _ in params[: len(want)]]
        assert shared == want, f"adapters.{adapter}.{function}: {shared} is not the face {want}"
        extras = params[len(want) :]
        if function in OPTIONS:
            assert extras and extras[-1][:2] == ("options", V), (
                f"adapters.{adapter}.{function} does not end in **options"
            )
            hint = inspect.signature(getattr(_adapter(adapter), function)).parameters["options"]
            typed = OPTIONS[function][0].__name__
            assert f"Unpack[{typed}]" in str(hint.annotation), (
                f"adapters.{adapter}.{function}(**options: {hint.annotation}) is not "
                f"Unpack[{typed}]"
            )
            extras = extras[:-1]
        bad = [n for n, k, _ in extras if k is not K]
        assert not bad, f"adapters.{adapter}.{function}: extra parameters {bad} not keyword-only"
        options = OPTIONS[function][0].__annotations__ if function in OPTIONS else {}
        shared = {n for n, _, _ in params} & set(options)
        assert not shared, f"adapters.{adapter}.{function} redefines shared options {shared}"
    first = next(iter(faces.values()))
    for adapter, params in faces.items():
        for (name, _, default), (_, _, ref) in zip(params[: len(want)], first, strict=False):
            if name not in FRAMEWORK_DEFAULTS:
                assert default == ref, (
                    f"adapters.{adapter}.{function}({name}=...) defaults to {default!r}, "
                    f"adapters.{ADAPTERS[0]} to {ref!r}"
                )


def test_every_adapter_exports_the_face_and_apply_returns_a_report():
    for adapter in ADAPTERS:
        module = _adapter(adapter)
        for name in (*FACE, "ApplyReport", "FisherResult"):
            assert name in module.__all__, f"adapters.{adapter} does not export {name}"
        ret = inspect.signature(module.apply).return_annotation
        assert "ApplyReport" in str(ret), f"adapters.{adapter}.apply returns {ret}"
        assert issubclass(module.ApplyReport, ApplyReport)
    for adapter in ("torch", "keras"):
        assert "GuidedDropout" in _adapter(adapter).__all__


@pytest.mark.parametrize("function", list(OPTIONS))
def test_shared_options_are_typed_and_defaulted_once(function):
    """The TypedDict a signature shows and the settings that fill the defaults name the same
    options; an unknown keyword is refused by every adapter with the function's name."""
    typed, settings = OPTIONS[function]
    fields = [f.name for f in dataclasses.fields(settings)]
    assert sorted(typed.__annotations__) == sorted(fields)
    for adapter in ADAPTERS:
        fn = getattr(_adapter(adapter), function)
        with pytest.raises(TypeError, match=rf"{function}\(\) got an unexpected keyword"):
            fn(None, *([None] * (2 if function != "apply" else 1)), not_an_option=1)
