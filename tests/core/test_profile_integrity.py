"""Issue 14.4: a tampered, corrupted or inconsistent profile is one ProfileError at load time."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gd_core import Fingerprint, ProfileError, SensitivityProfile, Site, map_scores
from gd_core.errors import ArgumentError
from gd_core.mappings import unit_probabilities


def small_profile() -> SensitivityProfile:
    rng = np.random.default_rng(0)
    fisher = {
        "emb.weight": rng.gamma(1.0, size=(6, 4)),
        "l0.weight": rng.gamma(1.0, size=(4, 4)) * 2,
        "l1.weight": rng.gamma(1.0, size=(4, 4)) * 3,
    }
    sites = [
        Site("emb.dropout", ("emb.weight",), 4, {"emb.weight": 1}),
        Site("l0.dropout", ("l0.weight",), 4, {"l0.weight": 0}),
        Site("l1.dropout", ("l1.weight",), None),
    ]
    fp = Fingerprint.from_shapes([(k, v.shape) for k, v in fisher.items()])
    return SensitivityProfile.from_fisher(
        fisher, sites, fingerprint=fp, metadata={"model": "toy", "samples": 3}
    )


def same(a: SensitivityProfile, b: SensitivityProfile) -> bool:
    return (
        a.sites == b.sites
        and np.array_equal(a.scores, b.scores)
        and dict(a.tensor_means) == dict(b.tensor_means)
        and dict(a.tensor_sizes) == dict(b.tensor_sizes)
        and sorted(a.unit_scores) == sorted(b.unit_scores)
        and all(np.array_equal(a.unit_scores[k], b.unit_scores[k]) for k in a.unit_scores)
        and dict(a.mapping) == dict(b.mapping)
        and a.fingerprint == b.fingerprint
        and dict(a.metadata) == dict(b.metadata)
    )


def _rewrite(src: Path, dst: Path, edit_header=None, edit_arrays=None) -> Path:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: np.array(data[k]) for k in data.files}
    header = json.loads(arrays.pop("__meta_json__").tobytes().decode())
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    raw = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(dst, __meta_json__=raw, **arrays)
    return dst


@pytest.mark.parametrize("flip", [0xFF, 0x01, 0x20])
def test_byte_flip_fuzz_gives_profile_error_or_the_same_profile(tmp_path, flip):
    """Every byte position of a small profile, flipped: ProfileError, or exactly the original."""
    path = small_profile().save(tmp_path / "p.profile.npz")
    original = SensitivityProfile.load(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.profile.npz"
    outcomes = {"error": 0, "same": 0}
    for i in range(len(data)):
        bad.write_bytes(data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :])
        try:
            loaded = SensitivityProfile.load(bad)
        except ProfileError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
            continue
        assert same(loaded, original), f"byte {i} ^ {flip:#x} loaded a different profile"
        loaded.probabilities()
        outcomes["same"] += 1
    assert outcomes["error"] > 0 and outcomes["same"] > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [(10, 0x63), (6, 0xFF), (8, 0x20)],
    ids=["compression-method-99", "version-needed", "flag-bit-5"],
)
def test_zip_directory_tampering_is_a_profile_error(tmp_path, field, value):
    """Fields of the zip's central directory that made zipfile raise NotImplementedError."""
    path = small_profile().save(tmp_path / "p.profile.npz")
    data = bytearray(path.read_bytes())
    data[data.find(b"PK\x01\x02") + field] = value
    path.write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="truncated or corrupt"):
        SensitivityProfile.load(path)


def test_deflate_corruption_is_a_profile_error(tmp_path):
    """A damaged compressed member (zlib.error at some positions) is a ProfileError too."""
    path = small_profile().save(tmp_path / "p.profile.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.array(data[k]) for k in data.files}
    packed = tmp_path / "packed.profile.npz"
    np.savez_compressed(packed, **arrays)
    original = SensitivityProfile.load(packed)
    assert same(original, SensitivityProfile.load(path))
    raw = packed.read_bytes()
    with zipfile.ZipFile(packed) as zf:
        info = zf.getinfo("scores.npy")
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    causes = set()
    for k in range(start, start + info.compress_size):
        packed.write_bytes(raw[:k] + bytes([raw[k] ^ 0xFF]) + raw[k + 1 :])
        try:
            assert same(SensitivityProfile.load(packed), original)
        except ProfileError as exc:
            causes.add(type(exc.__cause__).__name__)
    assert "error" in causes  # zlib.error was among them


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("negative score", lambda a: a.__setitem__("scores", -a["scores"])),
        ("NaN score", lambda a: a["scores"].__setitem__(0, np.nan)),
        ("Inf score", lambda a: a["scores"].__setitem__(1, np.inf)),
        ("units too short", lambda a: a.__setitem__("units_0", a["units_0"][:3])),
        ("units too long", lambda a: a.__setitem__("units_1", np.ones(7))),
        ("negative unit score", lambda a: a["units_0"].__setitem__(0, -1.0)),
        ("NaN tensor mean", lambda a: a["tensor_means"].__setitem__(0, np.nan)),
        ("negative tensor size", lambda a: a["tensor_sizes"].__setitem__(0, -5)),
        ("2-D scores", lambda a: a.__setitem__("scores", a["scores"][None, :])),
        ("integer scores", lambda a: a.__setitem__("scores", np.array([1, 2, 3]))),
    ],
)
def test_inconsistent_arrays_are_refused_at_load(tmp_path, what, edit):
    src = small_profile().save(tmp_path / "p.profile.npz")
    bad = _rewrite(src, tmp_path / "bad.profile.npz", edit_arrays=edit)
    with pytest.raises(ProfileError) as info:
        SensitivityProfile.load(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def _dup_site(h):
    h["sites"][1]["name"] = h["sites"][0]["name"]


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("unknown unit site", lambda h: h["unit_sites"].__setitem__(0, "nosuch.dropout")),
        ("duplicate site", _dup_site),
        ("no sites", lambda h: h.update(sites=[])),
        ("bad mapping", lambda h: h["mapping"].update(p_upper=3.0)),
        ("unknown mapping", lambda h: h["mapping"].update(name="bogus")),
        ("unknown aggregation", lambda h: h.update(aggregation="bogus")),
        ("metadata list", lambda h: h.update(metadata=[1, 2])),
        ("site not an object", lambda h: h["sites"].__setitem__(0, 5)),
        ("fingerprint shape", lambda h: h["fingerprint"][0].__setitem__(1, "x")),
        ("units negative", lambda h: h["sites"][0].update(units=-4)),
        ("unit axes string", lambda h: h["sites"][0].update(unit_axes="x")),
    ],
)
def test_inconsistent_headers_are_refused_at_load(tmp_path, what, edit):
    src = small_profile().save(tmp_path / "p.profile.npz")
    bad = _rewrite(src, tmp_path / "bad.profile.npz", edit_header=edit)
    with pytest.raises(ProfileError) as info:
        SensitivityProfile.load(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


@pytest.mark.parametrize("scores", [[1.0, -0.5, 2.0], [1.0, np.nan, 2.0], [np.inf, 1.0, 2.0]])
def test_linear_rank_rejects_negative_and_non_finite_scores(scores):
    with pytest.raises(ArgumentError, match="scores"):
        map_scores(scores, "linear_rank")
    with pytest.raises(ArgumentError, match="scores"):
        unit_probabilities(scores, 0.1)
