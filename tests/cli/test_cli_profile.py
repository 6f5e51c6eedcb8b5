"""`gd profile` on a tiny random BERT: content, metadata, resume, interruption, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import adapters._torch_persample as persample  # noqa: E402

import adapters.torch as gdt  # noqa: E402
from gd_cli import corpus as gdc  # noqa: E402
from gd_core import SensitivityProfile  # noqa: E402


def _args(model: Path, corpus: Path, out: Path, samples: int, *extra: str) -> list[str]:
    return [
        "profile", "--model", str(model), "--corpus", str(corpus), "--samples", str(samples),
        "--seq-len", "16", "--batch-size", "4", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_profile_matches_the_library_on_the_same_batches(tiny_profile, tiny_model, corpus_file):
    prof = SensitivityProfile.load(tiny_profile)
    meta = prof.metadata
    assert meta["samples"] == 8 and meta["seq_len"] == 16 and meta["objective"] == "mlm"
    assert meta["corpus"] == str(corpus_file) and meta["seed"] == 0
    assert meta["corpus_sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    # the same computation through the library API
    tm = gdc.load_text_model(str(tiny_model))
    assert [s.name for s in gdt.sites(tm.model)] == prof.site_names
    texts = gdc.select(gdc.read_paragraphs(corpus_file), 8, seed=0)
    batches = gdc.tokenize(tm.tokenizer, texts, seq_len=16, batch_size=4)
    loss = gdc.objective_loss(tm, seed=0)
    direct = gdt.profile(tm.model, batches, loss=loss, progress=False)
    np.testing.assert_allclose(prof.scores, direct.scores, rtol=1e-12)
    assert np.all(prof.scores > 0)
    model_shapes = dict(gdt.fingerprint(tm.model).params)
    assert all(model_shapes[n] == shape for n, shape in prof.fingerprint.params)
    # nothing but the profile is left behind
    assert sorted(p.name for p in tiny_profile.parent.iterdir()) == [tiny_profile.name]


def test_profile_output_names_the_file_and_next_step(gd, tiny_model, corpus_file, tmp_path):
    out = tmp_path / "p.npz"
    rc, stdout, err = gd(*_args(tiny_model, corpus_file, out, 4))
    assert rc == 0, err
    assert f"profile written to {out}" in stdout and "next: gd show" in stdout
    assert "bert.embeddings.dropout" in stdout


def test_interrupted_run_resumes_to_the_same_profile(
    gd, tiny_model, corpus_file, tmp_path, monkeypatch
):
    direct = tmp_path / "direct.npz"
    assert gd(*_args(tiny_model, corpus_file, direct, 16))[0] == 0

    out = tmp_path / "resumed.npz"
    real = persample.per_sample_sq_grad_sums
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(persample, "per_sample_sq_grad_sums", flaky)
    rc, _, err = gd(*_args(tiny_model, corpus_file, out, 16, "--checkpoint-every", "1"))
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    partial = Path(f"{out}.partial.npz")
    assert partial.exists() and not out.exists()
    monkeypatch.setattr(persample, "per_sample_sq_grad_sums", real)

    rc, stdout, err = gd(*_args(tiny_model, corpus_file, out, 16, "--resume"))
    assert rc == 0, err
    assert "resuming" in stdout
    assert not partial.exists()
    a, b = SensitivityProfile.load(out), SensitivityProfile.load(direct)
    assert a.metadata["samples"] == 16
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)
    np.testing.assert_allclose(
        [a.tensor_means[k] for k in sorted(a.tensor_means)],
        [b.tensor_means[k] for k in sorted(b.tensor_means)],
        rtol=1e-12,
    )


def test_keep_checkpoint_then_resume_extends_a_run(gd, tiny_model, corpus_file, tmp_path):
    direct = tmp_path / "direct.npz"
    assert gd(*_args(tiny_model, corpus_file, direct, 16))[0] == 0
    out = tmp_path / "grown.npz"
    assert gd(*_args(tiny_model, corpus_file, out, 8, "--keep-checkpoint"))[0] == 0
    eight = SensitivityProfile.load(out)
    assert Path(f"{out}.partial.npz").exists()
    assert gd(*_args(tiny_model, corpus_file, out, 16, "--resume"))[0] == 0
    grown = SensitivityProfile.load(out)
    assert eight.metadata["samples"] == 8 and grown.metadata["samples"] == 16
    np.testing.assert_allclose(grown.scores, SensitivityProfile.load(direct).scores, rtol=1e-12)
    assert not np.allclose(grown.scores, eight.scores)


def test_resume_with_other_settings_is_refused(gd, tiny_model, corpus_file, tmp_path):
    out = tmp_path / "p.npz"
    assert gd(*_args(tiny_model, corpus_file, out, 8, "--keep-checkpoint"))[0] == 0
    args = _args(tiny_model, corpus_file, out, 16, "--resume")
    args[args.index("--seq-len") + 1] = "12"
    rc, _, err = gd(*args)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "seq_len 16 -> 12" in err and "partial.npz" in err


def test_objective_and_mapping_options(gd, tiny_model, corpus_file, tmp_path):
    out = tmp_path / "c.npz"
    rc, _, err = gd(
        *_args(tiny_model, corpus_file, out, 4, "--objective", "contrastive", "--p-upper", "0.3")
    )
    assert rc == 0, err
    prof = SensitivityProfile.load(out)
    assert prof.metadata["objective"] == "contrastive" and prof.metadata["loss"] == "contrastive"
    assert max(prof.probabilities().values()) == pytest.approx(0.3)
    assert prof.site_names[0] == "embeddings.dropout"  # the bare encoder's names


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--objective", "clm"], ["objective", "--objective mlm"]),
        (["--seq-len", "64"], ["--seq-len", "at most 32"]),
    ],
)
def test_model_errors_are_one_line(gd, tiny_model, corpus_file, tmp_path, extra, words):
    args = _args(tiny_model, corpus_file, tmp_path / "p.npz", 4)
    if extra[0] in args:
        args[args.index(extra[0]) + 1] = extra[1]
    else:
        args += extra
    rc, _, err = gd(*args)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


def test_folder_without_a_model_is_one_line(gd, corpus_file, tmp_path):
    rc, _, err = gd(*_args(tmp_path, corpus_file, tmp_path / "p.npz", 4))
    assert rc == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_folder_without_a_tokenizer_is_one_line(gd, tiny_model, corpus_file, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model / name).read_bytes())
    rc, _, err = gd(*_args(bare, corpus_file, tmp_path / "p.npz", 4))
    assert rc == 2 and "tokenizer" in err and len(err.strip().splitlines()) == 1


def test_causal_lm_defaults_to_clm(gd, corpus_file, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = corpus_file.read_text().split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<eos>", *words]))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = tmp_path / "gpt"
    transformers = pytest.importorskip("transformers")
    transformers.PreTrainedTokenizerFast(  # no pad token: gd pads with <eos>
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(folder)
    cfg = transformers.GPT2Config(
        vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    out = tmp_path / "gpt.npz"
    rc, _, err = gd(*_args(folder, corpus_file, out, 4))
    assert rc == 0, err
    prof = SensitivityProfile.load(out)
    assert prof.metadata["objective"] == "clm" and prof.metadata["samples"] == 4
    assert "transformer.h.0.attn.resid_dropout" in prof.site_names
    assert np.all(np.isfinite(prof.scores)) and np.all(prof.scores > 0)
