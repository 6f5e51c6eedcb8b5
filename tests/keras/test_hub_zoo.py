"""The keras_hub sweep (``tests/keras/hub_zoo.py``): a fixed sample in the normal run, every
Backbone class with ``GD_ZOO=all``. A class the generic tiny arguments cannot build is skipped
with the reason (``docs/zoo-keras.md`` lists them); a built one must pass every check, except
that one whose only problems are clear library errors (an error with its fix, for a model the
library does not handle yet) is an expected failure, listed in the docs too."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")
pytest.importorskip("adapters.keras")

import hub_zoo  # noqa: E402  (tests/keras is on sys.path: conftest)

ALL = os.environ.get("GD_ZOO", "") == "all"
CLASSES = [c for c in hub_zoo.backbone_classes() if ALL or c.__name__ in hub_zoo.SAMPLE]
#: each class, and again at its own default rates where they are 0 (dropout-free presets,
#: Gemma's: the sites are inserted)
CASES = [(c, False) for c in CLASSES] + [(c, True) for c in CLASSES if hub_zoo.zero_default(c)]


@pytest.mark.parametrize(
    ("cls", "defaults"), CASES, ids=[c.__name__ + ("-defaults" * d) for c, d in CASES]
)
def test_keras_hub_backbone_invariants(cls, defaults):
    out = hub_zoo.sweep_one(cls, defaults)
    if not out.built:
        pytest.skip(out.note)
    if out.note.startswith(hub_zoo.NOT_CHECKED) and not out.problems:
        pytest.skip(out.note)
    if out.only_clear_errors and cls.__name__ not in hub_zoo.SAMPLE:
        pytest.xfail("; ".join(out.problems))  # listed in docs/zoo-keras.md with the reason
    assert out.problems == [], out.problems
    if cls.__name__ in hub_zoo.SAMPLE:
        assert out.sites > 0, out.note  # the sample has dropout at 0.1: sites to check


def test_the_sample_is_in_the_registry():
    names = {c.__name__ for c in hub_zoo.backbone_classes()}
    assert set(hub_zoo.SAMPLE) <= names
