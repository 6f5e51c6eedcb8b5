"""Shared helpers of the benchmark scripts (not part of the library).

* :class:`Results`: an append-only JSONL results file. Each finished run/cell is one line,
  flushed and fsynced as soon as it is known, so a run cut short loses nothing; a rerun skips
  the cells already present (``Results.done(key)``).
* machine and load information recorded with every run;
* peak-memory helpers (``VmHWM`` from ``/proc/self/status``, reset through ``clear_refs``);
* model, tokenizer and corpus loaders (offline; the packaged MiniLM, tiny random BERTs), over
  :mod:`gd_cli.models` and :mod:`gd_cli.corpus`.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
    >>> res = Results(path)
    >>> res.done({"method": "a", "seed": 0})
    False
    >>> res.append({"method": "a", "seed": 0}, {"score": 1.0})["score"]
    1.0
    >>> Results(path).done({"seed": 0, "method": "a"})
    True
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# $GD_DATA_DIR: a copy made by bench/gpu_carry.py on a machine without ../shared
DATA_DIR = Path(os.environ.get("GD_DATA_DIR") or ROOT.parent / "shared" / "data")
GLUE_DIR = DATA_DIR / "glue"
CORPUS = DATA_DIR / "corpus" / "wikitext-2-raw-test.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gd_cli.corpus import read_paragraphs  # noqa: E402  (the checkout, not an installed copy)
from gd_cli.models import minilm_path as _packaged_minilm_path  # noqa: E402

# --------------------------------------------------------------------------------------------
# results files
# --------------------------------------------------------------------------------------------


def cell_key(key: Mapping[str, Any]) -> str:
    """Canonical string of a cell's identifying fields (order-independent).

    Example:
        >>> cell_key({"b": 1, "a": "x"}) == cell_key({"a": "x", "b": 1})
        True
    """
    return json.dumps(dict(key), sort_keys=True, default=str)


class Results:
    """Append-only JSONL results file with resume support.

    Every record holds ``key`` (the identifying fields of its cell), the measured fields, and
    ``machine``/``time`` stamps. A truncated last line (a run killed mid-write) is ignored.

    Example:
        >>> import tempfile, os
        >>> r = Results(os.path.join(tempfile.mkdtemp(), "x.jsonl"))
        >>> _ = r.append({"n": 1}, {"t": 0.5})
        >>> [rec["t"] for rec in r.records()]
        [0.5]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keys: set[str] = set()
        for rec in self.records():
            if isinstance(rec.get("key"), dict):
                self._keys.add(cell_key(rec["key"]))

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record in the file (unparseable lines are skipped)."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    yield rec

    def done(self, key: Mapping[str, Any]) -> bool:
        """Whether a record with these identifying fields is already in the file."""
        return cell_key(key) in self._keys

    def append(self, key: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record (key + fields + stamps) as one line, flushed and fsynced."""
        rec = {
            "key": dict(key),
            **dict(key),
            **dict(fields),
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(rec, default=_json_default, allow_nan=True)
        with self.path.open("a", encoding="utf-8") as fh:
            _lock(fh)  # several worker processes (``glue.py --jobs``) append to one file
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._keys.add(cell_key(key))
        return rec


def _lock(fh: Any) -> None:
    """Exclusive advisory lock on an open file until it is closed (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


# --------------------------------------------------------------------------------------------
# machine, load, memory
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The checked-out commit (read-only ``git rev-parse``), plus ``+dirty`` if files differ."""

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(ROOT), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return (head + ("+dirty" if dirty else "")) or os.environ.get("GD_COMMIT")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GD_COMMIT")  # a copied tree without .git (the GPU machine)


def machine_info() -> dict[str, Any]:
    """CPU model and count, load average, library versions, commit: stamped on every record."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def device_info(device: str) -> dict[str, Any]:
    """The accelerator a run used (name, count), stamped on records of ``--device cuda`` runs."""
    if not device.startswith("cuda"):
        return {"device": device}
    import torch

    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)),
        "gpus": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in kB, from ``/proc/self/status``."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mem_available_gb() -> float | None:
    """``MemAvailable`` of the machine in GB (None where /proc/meminfo is absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


class Timer:
    """Context manager measuring wall time with ``perf_counter``.

    Example:
        >>> with Timer() as t:
        ...     _ = sum(range(1000))
        >>> t.seconds >= 0
        True
    """

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------
# models, tokenizer, corpus
# --------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 (BERT architecture): ``$GD_MINILM_PATH`` when set (a
    copy made by ``bench/gpu_carry.py`` for a machine without the package), else the packaged
    one."""
    override = os.environ.get("GD_MINILM_PATH")
    if override:
        if not Path(override, "config.json").exists():
            raise FileNotFoundError(
                f"GD_MINILM_PATH: expected a model folder with config.json, received {override!r}; "
                "fix: run bench/gpu_carry.py or unset GD_MINILM_PATH"
            )
        return override
    return _packaged_minilm_path()


def tokenizer() -> Any:
    """The MiniLM WordPiece tokenizer (also used for the tiny random BERTs)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_path())


TINY_BERT = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 512,
}
SMOKE_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}


def bert_config(model: str, **overrides: Any) -> Any:
    """Config of ``minilm`` (the packaged one), ``tiny`` (2x128) or ``smoke`` (1x32).

    The random configs use MiniLM's vocabulary so the same tokenizer serves every model.
    """
    import transformers

    if model == "minilm":
        cfg = transformers.BertConfig.from_pretrained(minilm_path())
    elif model in ("tiny", "smoke"):
        base = TINY_BERT if model == "tiny" else SMOKE_BERT
        cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **base)
    else:
        raise ValueError(f"model: expected 'minilm', 'tiny' or 'smoke', received {model!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def load_model(
    model: str,
    cls_name: str = "BertModel",
    init_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """``transformers.<cls_name>`` of the packaged MiniLM (pretrained) or a random tiny BERT.

    ``overrides`` set config fields; ``init_kwargs`` go to the model's constructor (e.g.
    ``add_pooling_layer=False``). Random models are initialised from seed 0 (the same weights
    on every call).
    """
    import transformers

    cls = getattr(transformers, cls_name)
    cfg = bert_config(model, **overrides)
    kwargs = dict(init_kwargs or {})
    if model == "minilm":
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import torch

        # float32 whatever the stored dtype (the GPU carry stores float16 to stay small)
        return cls.from_pretrained(minilm_path(), config=cfg, dtype=torch.float32, **kwargs)
    import torch

    torch.manual_seed(0)
    return cls(cfg, **kwargs)


def corpus_paragraphs(min_words: int = 8) -> list[str]:
    """Paragraphs of the WikiText-2 test split with at least ``min_words`` words, in order
    (read by :func:`gd_cli.corpus.read_paragraphs`: headings and blank lines skipped)."""
    if not CORPUS.exists():
        raise FileNotFoundError(
            f"corpus: expected {CORPUS} (see ../shared/data/README.md), received no file; "
            "fix: run from the repository checkout next to ../shared/data"
        )
    return read_paragraphs(CORPUS, min_words=min_words)


def encode(tok: Any, texts: list[str], seq_len: int, pad_to_max: bool = True) -> dict[str, Any]:
    """Tokenise ``texts`` to tensors of length ``seq_len`` (truncated, padded)."""
    enc = tok(
        texts,
        truncation=True,
        max_length=seq_len,
        padding="max_length" if pad_to_max else True,
        return_tensors="pt",
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (default: leave torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def log(*parts: object) -> None:
    """Progress line on stderr (results go to the JSONL file)."""
    print(*parts, file=sys.stderr, flush=True)


def add_worker_args(ap: Any) -> None:
    """The options of a script whose cells run through :func:`spawn_worker`."""
    import argparse

    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by spawn_worker
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run cells in this process (no fresh interpreter; peaks not separable; --smoke)",
    )


def answer_worker(spec_json: str, fn: Any) -> int:
    """The worker side of :func:`spawn_worker`: run ``fn(spec)``, print its ``RESULT`` line."""
    print(_RESULT + json.dumps(fn(json.loads(spec_json))), flush=True)
    return 0


_RESULT = "RESULT "


def spawn_worker(script: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh interpreter; its last ``RESULT {json}`` stdout line
    is the result (a fresh process per cell keeps peak-memory readings and imports separate)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"worker exceeded {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-4:]
        return {
            "status": "crashed",
            "returncode": proc.returncode,
            "reason": " | ".join(tail)[:800] or "no output (killed, e.g. out of memory?)",
        }
    return json.loads(lines[-1][len(_RESULT) :])
