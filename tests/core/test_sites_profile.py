import json
import zipfile

import numpy as np
import pytest

from gd_core import (
    Fingerprint,
    NoSitesError,
    ProfileError,
    ProfileMismatchError,
    SensitivityProfile,
    Site,
    aggregate,
    unit_scores,
)
from gd_core import cache as gd_cache
from gd_core.align import align, find_renaming, resolve
from gd_core.cache import find_cached
from gd_core.errors import ArgumentError
from gd_core.names import from_onnx_node, from_path


def make_profile(prefix=""):
    rng = np.random.default_rng(0)
    shapes = {
        f"{prefix}emb.weight": (10, 4),
        f"{prefix}l0.q.weight": (4, 4),
        f"{prefix}l0.out.weight": (4, 4),
        f"{prefix}l0.out.bias": (4,),
    }
    fisher = {k: rng.gamma(1.0, size=s) * (i + 1) for i, (k, s) in enumerate(shapes.items())}
    sites = [
        Site(f"{prefix}emb.dropout", (f"{prefix}emb.weight",), 4, {f"{prefix}emb.weight": 1}),
        Site(f"{prefix}l0.attn.dropout", (f"{prefix}l0.q.weight",), None),
        Site(
            f"{prefix}l0.out.dropout",
            (f"{prefix}l0.out.weight", f"{prefix}l0.out.bias"),
            4,
            {f"{prefix}l0.out.weight": 0, f"{prefix}l0.out.bias": 0},
        ),
    ]
    fp = Fingerprint.from_shapes(shapes)
    prof = SensitivityProfile.from_fisher(
        fisher, sites, fingerprint=fp, metadata={"samples": 8, "loss": "mlm"}
    )
    return prof, fisher, fp


def test_tensor_mean_vs_element_mean():
    f = {"a": np.full(100, 1.0), "b": np.full(1, 11.0)}
    s = [Site("s", ("a", "b"))]
    assert aggregate(f, s, "tensor_mean")[0] == pytest.approx(6.0)
    assert aggregate(f, s, "element_mean")[0] == pytest.approx(111 / 101)


def test_aggregation_errors():
    with pytest.raises(NoSitesError, match="at least one dropout site"):
        aggregate({}, [])
    with pytest.raises(ArgumentError, match="aggregation"):
        aggregate({"a": np.ones(2)}, [Site("s", ("a",))], "max")
    with pytest.raises(ArgumentError, match="received none for \\['b'\\]"):
        aggregate({"a": np.ones(2)}, [Site("s", ("a", "b"))])
    with pytest.raises(ArgumentError, match="unique site names"):
        aggregate({"a": np.ones(2)}, [Site("s", ("a",)), Site("s", ("a",))])


def test_unit_scores_use_unit_axis():
    f = {"w": np.arange(6.0).reshape(2, 3), "k": np.arange(6.0).reshape(3, 2)}
    s = Site("d", ("w", "k"), units=2, unit_axes={"w": 0, "k": 1})
    np.testing.assert_allclose(unit_scores(f, s), [(1.0 + 2.0) / 2, (4.0 + 3.0) / 2])
    bad = Site("d", ("w",), units=3, unit_axes={"w": 0})
    with pytest.raises(ArgumentError, match="output-feature axis"):
        unit_scores(f, bad)


def test_profile_probabilities_follow_scores():
    prof, fisher, _ = make_profile()
    means = [np.mean([fisher[p].mean() for p in s.params]) for s in prof.sites]
    np.testing.assert_allclose(prof.scores, means)
    probs = prof.probabilities()
    best = prof.sites[int(np.argmax(means))].name
    worst = prof.sites[int(np.argmin(means))].name
    assert probs[best] == 0.0 and probs[worst] == pytest.approx(0.1)
    assert prof.probabilities("uniform", p_upper=0.2) == {s: 0.2 for s in prof.site_names}


def test_roundtrip(tmp_path):
    prof, _, fp = make_profile()
    path = prof.save(tmp_path / "p.profile.npz")
    back = SensitivityProfile.load(path)
    assert back.site_names == prof.site_names
    np.testing.assert_array_equal(back.scores, prof.scores)
    assert back.fingerprint == fp
    assert back.metadata["samples"] == 8
    assert back.probabilities() == prof.probabilities()
    np.testing.assert_array_equal(back.unit_scores["emb.dropout"], prof.unit_scores["emb.dropout"])
    assert back.reaggregate("element_mean").aggregation == "element_mean"
    assert "rank" in back.table() and "l0.out.dropout" in back.table()
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_bad_files(tmp_path):
    prof, _, _ = make_profile()
    path = prof.save(tmp_path / "p.npz")
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[:200])
    with pytest.raises(ProfileError, match="truncated or corrupt"):
        SensitivityProfile.load(tmp_path / "trunc.npz")
    with pytest.raises(ProfileError, match="does not exist"):
        SensitivityProfile.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ProfileError, match="not an .npz archive") as info:
        SensitivityProfile.load(tmp_path / "text.npz")
    assert "pickle" not in str(info.value)
    np.savez(tmp_path / "foreign.npz", x=np.ones(2))
    with pytest.raises(ProfileError, match="no guided-dropout header"):
        SensitivityProfile.load(tmp_path / "foreign.npz")
    # a newer format version
    with zipfile.ZipFile(path) as z:
        header = json.loads(np.lib.format.read_array(z.open("__meta_json__.npy")).tobytes())
    header["version"] = 99
    arrays = dict(np.load(path))
    arrays["__meta_json__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(ProfileError, match="format version 99"):
        SensitivityProfile.load(tmp_path / "v99.npz")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    prof, _, _ = make_profile()
    target = tmp_path / "p.npz"
    prof.save(target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        prof.with_mapping("uniform").save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


def test_align_adds_prefix_and_checks_shapes():
    prof, _, _ = make_profile()
    _, _, model_fp = make_profile(prefix="bert.")
    head = Fingerprint.from_shapes(list(model_fp.params) + [("classifier.weight", (2, 4))])
    model_sites = [*(f"bert.{s}" for s in prof.site_names), "dropout"]
    assert find_renaming(prof.site_names, model_sites).add == "bert."
    aligned = align(prof, model_sites, head)
    assert aligned.site_names == model_sites[:3]
    wrong = Fingerprint.from_shapes(
        [(n, (5, 5) if n == "bert.l0.q.weight" else s) for n, s in head.params]
    )
    with pytest.raises(ProfileMismatchError, match="bert.l0.q.weight: shape"):
        align(prof, model_sites, wrong)
    align(prof, model_sites, wrong, strict=False)
    with pytest.raises(ProfileMismatchError, match="match this model's dropout sites"):
        align(prof, ["x.dropout"], head)


def test_resolve_missing_policies():
    prof, _, _ = make_profile()
    sites = [*prof.site_names, "classifier.dropout"]
    keep = resolve(prof, sites, {"classifier.dropout": 0.1}, missing="keep")
    assert keep["classifier.dropout"] == (0.1, "keep")
    up = resolve(prof, sites, {}, missing="upper", mapping={"name": "linear_rank", "p_upper": 0.3})
    assert up["classifier.dropout"] == (0.3, "upper")
    with pytest.raises(ProfileMismatchError, match="classifier.dropout"):
        resolve(prof, sites, {}, missing="error")
    with pytest.raises(ArgumentError, match="missing"):
        resolve(prof, sites, {}, missing="drop")


def test_cache_roundtrip_and_compatible_search(tmp_path, monkeypatch):
    monkeypatch.setenv("GD_CACHE_DIR", str(tmp_path))
    prof, _, fp = make_profile()
    assert gd_cache.lookup(fp) is None
    gd_cache.store(prof)
    assert gd_cache.lookup(fp).site_names == prof.site_names
    _, _, model_fp = make_profile(prefix="bert.")
    found = find_cached([f"bert.{s}" for s in prof.site_names], model_fp)
    assert found is not None and found.site_names[0] == "bert.emb.dropout"


def test_translate_and_names():
    prof, _, _ = make_profile()
    t = prof.translate({"emb.dropout": "embeddings.dropout", "emb.weight": "e.weight"})
    assert t.site_names[0] == "embeddings.dropout" and t.sites[0].params == ("e.weight",)
    assert from_onnx_node("/bert/encoder/layer.0/output/dropout/Dropout") == (
        "bert.encoder.layer.0.output.dropout"
    )
    assert from_path("model/dense_1/kernel:0") == "model.dense_1.weight"


def test_site_mapping_validation():
    from gd_core.sites import site_mapping

    names, params = ["a.dropout", "b.dropout"], {"a.weight", "b.weight"}
    assert site_mapping({"b.dropout": ("b.weight",)}, names, params) == {"b.dropout": ["b.weight"]}
    with pytest.raises(ArgumentError, match="keys that are dropout site names.*'x.dropout'"):
        site_mapping({"x.dropout": ["a.weight"]}, names, params)
    with pytest.raises(ArgumentError, match=r"mapping\['a.dropout'\]: expected a list"):
        site_mapping({"a.dropout": "a.weight"}, names, params)
    with pytest.raises(ArgumentError, match="parameter names of this model.*'c.weight'"):
        site_mapping({"a.dropout": ["c.weight"]}, names, params)
    with pytest.raises(ArgumentError, match="None, a dict"):
        site_mapping(3, names, params)
