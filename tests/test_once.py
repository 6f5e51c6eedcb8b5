"""The ``once`` fixture (tests/conftest.py) that shares an expensive subprocess between tests."""

from __future__ import annotations

import pytest


def test_once_runs_produce_once_and_every_caller_gets_its_result(once):
    calls = []

    def produce():
        calls.append(1)
        return {"runs": len(calls), "items": [1, "a"]}

    first = once("selftest-shared", produce)
    assert first == {"runs": 1, "items": [1, "a"]}
    assert once("selftest-shared", produce) == first  # read back, not run again
    assert calls == [1]
    assert once("selftest-other", produce) == {"runs": 2, "items": [1, "a"]}  # names are apart


def test_once_stores_nothing_when_produce_raises(once):
    def broken():
        raise RuntimeError("the subprocess could not start")

    with pytest.raises(RuntimeError, match="could not start"):
        once("selftest-broken", broken)
    assert once("selftest-broken", lambda: 7) == 7  # the next caller tries again
