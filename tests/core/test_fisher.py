import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gd_core import FisherAccumulator, NonFiniteGradientError, ProfileError
from gd_core.errors import ArgumentError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def _grads(rng, n):
    return [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=3)} for _ in range(n)]


def test_mean_is_mean_of_squared_per_sample_gradients():
    rng = np.random.default_rng(0)
    samples = _grads(rng, 7)
    acc = FisherAccumulator()
    for g in samples:
        acc.add_sample(g)
    expected = np.mean([g["w"] ** 2 for g in samples], axis=0)
    np.testing.assert_allclose(acc.mean()["w"], expected, rtol=1e-12)
    assert acc.count == 7


def test_sums_equal_samples():
    rng = np.random.default_rng(1)
    samples = _grads(rng, 5)
    a, b = FisherAccumulator(), FisherAccumulator()
    for g in samples:
        a.add_sample(g)
    b.add({k: sum(g[k] ** 2 for g in samples) for k in ("w", "b")}, n=5)
    np.testing.assert_allclose(a.mean()["b"], b.mean()["b"])
    assert a.sums["w"].dtype == np.float64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(finite, min_size=4, max_size=4), min_size=1, max_size=12), st.data())
def test_merge_of_any_split_equals_one_accumulator(rows, data):
    cut = data.draw(st.integers(0, len(rows)))
    whole, left, right = FisherAccumulator(), FisherAccumulator(), FisherAccumulator()
    for i, r in enumerate(rows):
        g = {"p": np.array(r)}
        whole.add_sample(g)
        (left if i < cut else right).add_sample(g)
    merged = left.merge(right)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.sums["p"], whole.sums["p"], rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=10))
def test_save_resume_loses_nothing(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("acc") / "state.npz"
    half = len(rows) // 2
    whole, first = FisherAccumulator(), FisherAccumulator()
    for r in rows:
        whole.add_sample({"p": np.array(r)})
    for r in rows[:half]:
        first.add_sample({"p": np.array(r)})
    first.save(path)
    resumed = FisherAccumulator.load(path)
    for r in rows[half:]:
        resumed.add_sample({"p": np.array(r)})
    assert resumed.count == whole.count
    np.testing.assert_array_equal(resumed.sums["p"], whole.sums["p"])


def test_nonfinite_raises_naming_parameter():
    acc = FisherAccumulator()
    with pytest.raises(NonFiniteGradientError, match="'layer.weight'") as info:
        acc.add_sample({"layer.weight": np.array([1.0, np.nan])})
    assert info.value.parameter == "layer.weight"
    assert acc.count == 0


def test_nonfinite_skip_counts_sample():
    acc = FisherAccumulator(on_nonfinite="skip")
    assert acc.add_sample({"w": np.array([np.inf])}) is False
    assert acc.add_sample({"w": np.array([2.0])}) is True
    assert (acc.count, acc.skipped) == (1, 1)
    assert acc.mean()["w"].tolist() == [4.0]


def test_bad_inputs():
    with pytest.raises(ArgumentError, match="on_nonfinite"):
        FisherAccumulator(on_nonfinite="ignore")  # type: ignore[arg-type]
    acc = FisherAccumulator()
    with pytest.raises(ArgumentError, match="at least one sample"):
        acc.mean()
    with pytest.raises(ArgumentError, match="square the per-sample"):
        acc.add({"w": np.array([-1.0])}, n=1)
    acc.add({"w": np.array([1.0])}, n=1)
    with pytest.raises(ArgumentError, match="shape"):
        acc.add({"w": np.array([1.0, 2.0])}, n=1)


def test_load_errors(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        FisherAccumulator.load(tmp_path / "nope.npz")
    acc = FisherAccumulator()
    acc.add_sample({"w": np.ones(100)})
    path = acc.save(tmp_path / "a.npz")
    data = path.read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProfileError, match="truncated or corrupt"):
        FisherAccumulator.load(tmp_path / "t.npz")


def test_settings_live_in_the_accumulator_file(tmp_path):
    """Issue 14.1: the run settings are saved with the sums and checked on resume."""
    from gd_core import ResumeMismatchError

    acc = FisherAccumulator()
    acc.add_sample({"w": np.array([1.0, 2.0])})
    acc.settings = {"seq_len": 32, "seed": 0}
    back = FisherAccumulator.load(acc.save(tmp_path / "a.npz"))
    assert back.settings == {"seq_len": 32, "seed": 0}
    back.check_settings({"seq_len": 32, "seed": 0})
    with pytest.raises(ResumeMismatchError, match="seq_len 32 -> 16"):
        back.check_settings({"seq_len": 16, "seed": 0})
    bare = FisherAccumulator.load(FisherAccumulator().save(tmp_path / "b.npz"))
    assert bare.settings is None
    with pytest.raises(ResumeMismatchError, match="without them"):
        bare.check_settings({"seq_len": 32})
    other = FisherAccumulator()
    other.settings = {"seq_len": 16, "seed": 0}
    with pytest.raises(ArgumentError, match="same run settings"):
        back.merge(other)
