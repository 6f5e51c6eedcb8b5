import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gd_core import MAPPINGS, map_scores, rescale_to_mean, shuffled, unit_probabilities
from gd_core.errors import ArgumentError
from gd_core.mappings import rank_fractions

scores_st = st.lists(
    st.floats(1e-12, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=30
)
bounds_st = st.tuples(st.floats(0, 0.5), st.floats(0, 0.49)).map(lambda t: (t[0], t[0] + t[1]))


def test_paper_mapping_endpoints_and_spacing():
    p = map_scores([5.0, 1.0, 3.0, 2.0], "linear_rank", p_lower=0.0, p_upper=0.3)
    np.testing.assert_allclose(p, [0.0, 0.3, 0.1, 0.2])


def test_ties_share_a_probability():
    p = map_scores([2.0, 2.0, 1.0], "linear_rank")
    assert p[0] == p[1] == pytest.approx(0.025)
    assert p[2] == pytest.approx(0.1)


@settings(max_examples=60, deadline=None)
@given(scores_st, bounds_st, st.sampled_from(["linear_rank", "linear_score", "log_score"]))
def test_monotone_and_bounded(scores, bounds, mapping):
    lo, hi = bounds
    s = np.array(scores)
    p = map_scores(s, mapping, p_lower=lo, p_upper=hi)
    assert np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12)
    order = np.argsort(s)
    # higher score -> lower or equal probability
    assert np.all(np.diff(p[order]) <= 1e-12)
    # equal scores -> equal probabilities
    for v in np.unique(s):
        assert np.ptp(p[s == v]) <= 1e-12
    if np.sum(s == s.max()) == 1 and np.sum(s == s.min()) == 1 and len(s) > 1:
        assert p[np.argmax(s)] == pytest.approx(lo) and p[np.argmin(s)] == pytest.approx(hi)


@settings(max_examples=40, deadline=None)
@given(scores_st, st.floats(0.01, 0.3))
def test_rescale_hits_target_mean(scores, target):
    p = map_scores(scores, "linear_rank", p_lower=0.0, p_upper=0.1, target_mean=target)
    assert p.mean() == pytest.approx(target)
    assert np.all(p < 1)


def test_depth_linear_rises_with_depth_and_ignores_scores():
    p = map_scores([9.0, 1.0, 5.0], "depth_linear", p_lower=0.0, p_upper=0.2)
    np.testing.assert_allclose(p, [0.0, 0.1, 0.2])
    q = map_scores([0, 0, 0, 0], "depth_linear", depths=[0, 0, 1, 1])
    np.testing.assert_allclose(q, [0.0, 0.0, 0.1, 0.1])


def test_uniform():
    np.testing.assert_allclose(map_scores([3.0, 1.0], "uniform", p_upper=0.15), [0.15, 0.15])


def test_log_score_uses_log_scale():
    p = map_scores([1.0, 10.0, 100.0], "log_score")
    np.testing.assert_allclose(p, [0.1, 0.05, 0.0])
    q = map_scores([1.0, 10.0, 100.0], "linear_score")
    assert q[1] > 0.09  # on a raw scale 10 sits close to 1


def test_rank_fractions_single_site_is_middle():
    assert rank_fractions(np.array([3.0])).tolist() == [0.5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p_lower=-0.1), "p_lower: expected a float in \\[0, 1\\)"),
        (dict(p_upper=1.0), "p_upper: expected a float in \\[0, 1\\), received 1.0"),
        (dict(p_lower=0.2, p_upper=0.1), "p_lower: expected p_lower <= p_upper"),
        (dict(mapping="nope"), "mapping: expected one of"),
        (dict(target_mean=0.9, p_upper=0.5), "target_mean"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        map_scores([3.0, 2.0, 1.0], **kwargs)


def test_bad_scores():
    with pytest.raises(ArgumentError, match="finite scores"):
        map_scores([1.0, float("nan")])
    with pytest.raises(ArgumentError, match="at least one"):
        map_scores([])


def test_every_mapping_is_tested_here():
    assert set(MAPPINGS) == {"linear_rank", "linear_score", "log_score", "depth_linear", "uniform"}


def test_rescale_zero_mean_gives_uniform():
    np.testing.assert_allclose(rescale_to_mean(np.zeros(3), 0.1), [0.1] * 3)


def test_shuffled_is_a_permutation_and_seeded():
    p = np.linspace(0, 0.1, 7)
    a, b = shuffled(p, 3), shuffled(p, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.sort(a), p)
    assert not np.array_equal(shuffled(p, 4), a) or not np.array_equal(a, p)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=2, max_size=50), st.floats(0.0, 0.4))
def test_unit_probabilities_keep_site_budget(units, site_p):
    p = unit_probabilities(units, site_p)
    assert p.mean() == pytest.approx(site_p, abs=1e-9)
    assert np.all((p >= 0) & (p < 1))
    u = np.array(units)
    assert np.all(np.diff(p[np.argsort(u)]) <= 1e-12)
