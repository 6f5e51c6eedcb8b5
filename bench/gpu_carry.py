"""Prepare what the GLUE grid needs on a machine without this project's packages (a lent GPU).

Writes ``bench/carry/`` (git-ignored, about 46 MB, under the 64 MiB a device call can carry):

* ``minilm-fp16/``: the packaged MiniLM-L6 as float16 safetensors (loaded back as float32 by
  ``bench/_common.py load_model``), its config and its tokenizer files;
* the MiniLM profile the grid uses (computed here on WikiText-2 if it is not there yet);
* ``data/glue/``: a copy of the four GLUE tasks from ``../shared/data`` (which a device call does
  not send), read there through ``$GD_DATA_DIR``.

Examples::

    python bench/gpu_carry.py                 # then: bench/gpu_grid.sh OUTDIR on the GPU machine
    python bench/gpu_carry.py --check         # also load the copy and compare it with the original

The float16 copy rounds every weight to 11 significant bits (relative error <= 2**-11): a GPU
run starts from weights within that rounding of a CPU run's, which the records note
(``weights: float16 copy``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import _common as C

CARRY = C.ROOT / "bench" / "carry"
MODEL_DIR = CARRY / "minilm-fp16"
PROFILE = "minilm-wikitext2-contrastive-512x128.profile.npz"
#: files of the packaged model a BertModel + fast tokenizer need
KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
KEEP_OPTIONAL = ("special_tokens_map.json",)


def write_fp16_copy(src: Path, dst: Path) -> int:
    """Copy config and tokenizer files and a float16 ``model.safetensors``; returns its bytes.

    Written to a temporary folder first, then renamed, so a half-written copy never exists.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEEP + KEEP_OPTIONAL:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
        elif name in KEEP:
            raise FileNotFoundError(f"model: expected {src / name}, received no file")
    tensors = load_file(str(src / "model.safetensors"))
    half = {
        k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    save_file(half, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return (dst / "model.safetensors").stat().st_size


def check_copy(dst: Path) -> float:
    """Largest relative difference between the float16 copy (loaded as float32) and the model."""
    import os

    import torch

    original = C.load_model("minilm", "BertModel")
    os.environ["GD_MINILM_PATH"] = str(dst)
    try:
        copy = C.load_model("minilm", "BertModel")
    finally:
        del os.environ["GD_MINILM_PATH"]
    worst = 0.0
    for (name, a), (_, b) in zip(
        original.state_dict().items(), copy.state_dict().items(), strict=True
    ):
        assert b.dtype == torch.float32, (name, b.dtype)
        scale = a.abs().clamp_min(1e-3)
        worst = max(worst, float(((a - b).abs() / scale).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare the copy with the original")
    args = ap.parse_args(argv)
    size = write_fp16_copy(Path(C.minilm_path()), MODEL_DIR)
    C.log(f"wrote {MODEL_DIR} (weights {size / 2**20:.1f} MiB)")
    src = C.RESULTS_DIR / PROFILE
    if not src.exists():
        import glue

        glue.ensure_profile(src, "minilm", 512, 128)
    shutil.copy2(src, CARRY / PROFILE)
    # the GLUE files travel too (../shared is not sent); never committed: bench/carry is ignored
    for task in ("CoLA", "MRPC", "RTE", "STS-B"):
        (CARRY / "data" / "glue" / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev"):
            shutil.copy2(C.GLUE_DIR / task / f"{split}.tsv", CARRY / "data" / "glue" / task)
    total = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    C.log(f"bench/carry holds {total / 2**20:.1f} MiB (a device call carries at most 64 MiB)")
    if total > 60 * 2**20:
        C.log("too large to carry")
        return 1
    if args.check:
        C.log(
            f"largest relative weight difference of the float16 copy: {check_copy(MODEL_DIR):.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
