import subprocess
import sys

import numpy as np
import pytest

from gd_core import Schedule, binomial_halfwidth, mean_halfwidth, reference_dropout, reference_mask
from gd_core.errors import ArgumentError


@pytest.mark.parametrize(
    "kind, steps, expected",
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("linear_warmup", 4, [0.0, 0.5, 1.0, 1.0]),
        ("early", 3, [1.0, 1.0, 0.0, 0.0]),
        ("cosine", 4, [1.0, 0.5, 0.0, 0.0]),
    ],
)
def test_schedules(kind, steps, expected):
    s = Schedule(kind, steps)
    got = [s.multiplier(t) for t in (0, 2, 4, 9)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert Schedule.from_config(s.get_config()) == s


def test_schedule_errors():
    with pytest.raises(ArgumentError, match="kind: expected one of"):
        Schedule("exp", 3)
    with pytest.raises(ArgumentError, match="steps: expected an int >= 1"):
        Schedule("early", 0)
    with pytest.raises(ArgumentError, match="step: expected an int >= 0"):
        Schedule().multiplier(-1)


def test_reference_mask_statistics():
    n = 200_000
    m = reference_mask((n,), 0.3, rng=0)
    dropped = np.mean(m == 0)
    assert abs(dropped - 0.3) <= binomial_halfwidth(n, 0.3)
    assert abs(m.mean() - 1.0) <= mean_halfwidth(n, 0.3)
    np.testing.assert_allclose(np.unique(m), [0.0, 1 / 0.7])


def test_reference_mask_per_unit_rates_and_seed():
    p = np.array([0.0, 0.1, 0.5, 0.9])
    m = reference_mask((50_000, 4), p, rng=np.random.default_rng(1))
    for j, pj in enumerate(p):
        assert abs(np.mean(m[:, j] == 0) - pj) <= binomial_halfwidth(50_000, pj)
    np.testing.assert_array_equal(reference_mask((5, 4), p, 7), reference_mask((5, 4), p, 7))
    assert not np.array_equal(reference_mask((50, 4), p, 7), reference_mask((50, 4), p, 8))


def test_reference_dropout_identity_in_eval():
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(reference_dropout(x, 0.5, 0, training=False), x)


def test_mask_errors():
    with pytest.raises(ArgumentError, match="p: expected probabilities in \\[0, 1\\)"):
        reference_mask((3,), 1.0, 0)
    with pytest.raises(ArgumentError, match="per-unit probabilities"):
        reference_mask((3, 4), [0.1, 0.2], 0)


def test_core_imports_no_framework():
    code = (
        "import sys, gd_core, gd_core.align, gd_core.cache;"
        "bad=[m for m in ('torch','tensorflow','keras','onnx','onnxruntime') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
