"""ONNX Runtime Training side of the ONNX adapter: artifacts (:func:`make_artifacts`) and feeds.

``onnxruntime.training`` is imported only inside functions (its package ``__init__`` imports
torch when torch is installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gd_core.errors import ArgumentError, bad_argument

from .._lazy import require
from . import graph as _g
from . import rewrite as _r
from .discovery import ModelLike, _copy, _load, _onnx_names, prepare_for_training
from .graph import DEFAULT_DOMAINS, GraphIndex, SiteHandle

META_FILE = "gd_artifacts.json"
META_FORMAT = "guided-dropout-ort-artifacts"
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "bce", "l1")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: ORT's training graphs may fuse Dropout into these contrib ops
DROPOUT_OPS = frozenset({"Dropout", "BiasDropout", "BitmaskDropout", "BitmaskBiasDropout"})


#: ONNX Runtime's log severity while this adapter drives it: 2 (warnings and errors); its info
#: lines (``[I:onnxruntime...]``, one per graph transformer) only when asked for with
#: ``$GD_ORT_LOG_SEVERITY`` (0 verbose, 1 info, 2 warning, 3 error, 4 fatal)
ORT_LOG_ENV = "GD_ORT_LOG_SEVERITY"


def ort_log_severity() -> int:
    """The severity set on ONNX Runtime's default logger (``$GD_ORT_LOG_SEVERITY``, else 2)."""
    raw = os.environ.get(ORT_LOG_ENV, "").strip()
    if not raw:
        return 2
    if raw not in {"0", "1", "2", "3", "4"}:
        raise bad_argument(
            f"${ORT_LOG_ENV}", "0, 1, 2, 3 or 4 (verbose, info, warning, error, fatal)", raw,
            f"unset {ORT_LOG_ENV} for warnings only, or set it to 1 for ONNX Runtime's info lines",
        )  # fmt: skip
    return int(raw)


def _ort_training() -> tuple[Any, Any]:
    artifacts = require("onnxruntime.training.artifacts", "adapters.onnx training")
    api = require("onnxruntime.training.api", "adapters.onnx training")
    require("onnxruntime").set_default_logger_severity(ort_log_severity())
    return artifacts, api


@contextlib.contextmanager
def _ort_log_level() -> Iterator[None]:
    """While ``generate_artifacts`` runs: its sessions log at :func:`ort_log_severity` (ORT 1.19
    builds them from a fresh ``SessionOptions`` whose info lines, one per graph transformer, go to
    stderr otherwise)."""
    try:
        utils = importlib.import_module("onnxruntime.training.onnxblock._training_graph_utils")
    except ImportError:  # another ORT layout: nothing to set
        yield
        return
    original = getattr(utils, "SessionOptions", None)
    if original is None:
        yield
        return
    level = ort_log_severity()

    def options() -> Any:
        made = original()
        made.log_severity_level = level
        return made

    utils.SessionOptions = options
    try:
        yield
    finally:
        utils.SessionOptions = original


class _InFolder:
    """A read-only attribute: the path of one artifact file inside ``self.directory``."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.directory / self.filename


@dataclass
class Artifacts:
    """Paths of the files ``generate_artifacts`` wrote, plus what the adapter needs to use them.

    Attributes:
        directory: the artifact folder.
        requires_grad: ONNX names of the trained initializers.
        params: ``{onnx name: [canonical name, transposed]}`` for the trained initializers.
        ratio_inputs: ``{site: graph input name}`` when ratios are inputs (else empty).
        loss: the loss the training graph ends with.

    Example:
        >>> a = Artifacts(Path("art"))
        >>> a.training_model.name, a.checkpoint.name
        ('training_model.onnx', 'checkpoint')
    """

    directory: Path
    requires_grad: list[str] = field(default_factory=list)
    params: dict[str, list[Any]] = field(default_factory=dict)
    ratio_inputs: dict[str, str] = field(default_factory=dict)
    loss: str = ""
    dropout: str = "unknown"
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    training_model = _InFolder("training_model.onnx")
    eval_model = _InFolder("eval_model.onnx")
    optimizer_model = _InFolder("optimizer_model.onnx")
    checkpoint = _InFolder("checkpoint")

    def open(self, device: str = "cpu", optimizer: bool = True) -> tuple[Any, Any, Any]:
        """``(Module, Optimizer or None, CheckpointState)`` ready to train on ``device``."""
        _, api = _ort_training()
        state = api.CheckpointState.load_checkpoint(str(self.checkpoint))
        onnx = require("onnx")
        check_state(self, onnx.load(str(self.training_model), load_external_data=False), state)
        eval_model = str(self.eval_model) if self.eval_model.exists() else None
        module = api.Module(str(self.training_model), state, eval_model, device=device)
        opt = None
        if optimizer and self.optimizer_model.exists():
            opt = api.Optimizer(str(self.optimizer_model), module)
        return module, opt, state

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": META_FORMAT,
                "version": 1,
                "requires_grad": self.requires_grad,
                "params": self.params,
                "ratio_inputs": self.ratio_inputs,
                "loss": self.loss,
                "dropout": self.dropout,
                "files": self.files,
            },
            indent=1,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Artifacts:
        """Read an artifact folder (with the adapter's metadata file when present)."""
        folder = Path(directory)
        if not (folder / "training_model.onnx").is_file() or not (folder / "checkpoint").exists():
            raise bad_argument(
                "artifacts",
                "a folder with training_model.onnx and checkpoint (from make_artifacts or "
                "onnxruntime.training.artifacts.generate_artifacts)",
                str(folder),
                "pass the artifact_directory you generated, or the ONNX model itself",
            )
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            art = cls(folder)
            check_files(art)
            return art
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise bad_argument(
                "artifacts",
                f"a readable {META_FILE}",
                f"{meta_path} ({exc})",
                "regenerate the artifacts with adapters.onnx.make_artifacts",
            ) from exc
        if meta.get("format") != META_FORMAT:
            raise bad_argument(
                "artifacts",
                f"{META_FILE} of format {META_FORMAT!r}",
                meta.get("format"),
                "regenerate the artifacts with adapters.onnx.make_artifacts",
            )
        if meta.get("version") != 1:
            raise bad_argument(
                "artifacts",
                f"{META_FILE} of version 1 (the version this library writes)",
                f"version {meta.get('version')!r} in {meta_path}",
                "upgrade guided-dropout, or regenerate the artifacts with "
                "adapters.onnx.make_artifacts",
            )
        art = cls(
            folder,
            list(meta.get("requires_grad", [])),
            {str(k): list(v) for k, v in dict(meta.get("params", {})).items()},
            {str(k): str(v) for k, v in dict(meta.get("ratio_inputs", {})).items()},
            str(meta.get("loss", "")),
            str(meta.get("dropout", "unknown")),
            {str(k): dict(v) for k, v in dict(meta.get("files", {})).items()},
        )
        check_files(art)
        return art


def loss_block(loss: Any) -> Any:
    """The ``generate_artifacts`` loss for a loss name (or a LossType / onnxblock Block as is)."""
    artifacts, _ = _ort_training()
    table = {
        "cross_entropy": artifacts.LossType.CrossEntropyLoss,
        "mse": artifacts.LossType.MSELoss,
        "bce": artifacts.LossType.BCEWithLogitsLoss,
        "l1": artifacts.LossType.L1Loss,
    }
    if isinstance(loss, str):
        if loss not in table:
            raise bad_argument("loss", f"one of {LOSSES}", loss, "use loss='cross_entropy'")
        return table[loss]
    return loss


def optimizer_block(optimizer: Any) -> Any:
    artifacts, _ = _ort_training()
    if optimizer is None:
        return None
    table = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}
    if isinstance(optimizer, str):
        if optimizer not in table:
            raise bad_argument(
                "optimizer", f"one of {OPTIMIZERS} or None", optimizer, "use optimizer='adamw'"
            )
        return table[optimizer]
    return optimizer


def generate(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    requires_grad: list[str],
    frozen: list[str],
    loss: Any,
    optimizer: Any,
    output: str | None,
    meta: Artifacts,
) -> Artifacts:
    """Run ``generate_artifacts`` into a temporary folder beside ``out_dir`` with the metadata
    (each file's size and sha256), then make it ``out_dir`` in one rename. A folder that also
    holds files of its own (not artifacts) gets the files moved one by one, its metadata removed
    first and written last, so that an interrupted rebuild is detected by :func:`check_files`."""
    artifacts, _ = _ort_training()
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    outputs = [o.name for o in model.graph.output]
    if output is not None and output not in outputs:
        raise bad_argument("output", f"one of the graph outputs {outputs}", output, "name one")
    kwargs: dict[str, Any] = {}
    if output is not None or len(outputs) > 1:
        kwargs["loss_input_names"] = [output or outputs[0]]
    foreign = _foreign_files(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.gd-build-", dir=target.parent))
    try:
        with _ort_log_level():
            artifacts.generate_artifacts(
                model,
                requires_grad=requires_grad,
                frozen_params=frozen,
                loss=loss_block(loss),
                optimizer=optimizer_block(optimizer),
                artifact_directory=str(tmp),
                **kwargs,
            )
        meta.directory = target
        meta.files = {
            item.name: _file_record(item) for item in sorted(tmp.iterdir()) if item.is_file()
        }
        (tmp / META_FILE).write_bytes(meta.to_json().encode())
        if not foreign:
            _swap_in(tmp, target)
        else:  # other files live there: moved file by file, the metadata (digests) last
            (target / META_FILE).unlink(missing_ok=True)
            for name in (*ARTIFACT_FILES, *meta.files):
                if name not in meta.files:
                    (target / name).unlink(missing_ok=True)  # e.g. a stale optimizer graph
            for name in meta.files:
                os.replace(tmp / name, target / name)
            os.replace(tmp / META_FILE, target / META_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


#: the files ``generate_artifacts`` writes
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def _is_artifact(name: str) -> bool:
    return name == META_FILE or any(name.startswith(a) for a in ARTIFACT_FILES)


def _foreign_files(target: Path) -> list[str]:
    """Names in an existing ``target`` that are not artifact files (the user's own)."""
    if not target.is_dir():
        return []
    return sorted(p.name for p in target.iterdir() if not _is_artifact(p.name))


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the finished folder ``tmp`` the folder ``target`` in one rename (an existing folder of
    artifacts is first renamed aside and removed after): a reader sees the old folder, none, or
    the new one, never a mixture."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.gd-old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:  # interrupted between the two renames: the old folder goes back
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(folder: Path, why: str) -> Exception:
    return ArgumentError(
        "artifacts: expected an artifact folder whose files belong together (as make_artifacts "
        f"wrote them), received {str(folder)!r}, where {why}; fix: rebuild it with "
        "adapters.onnx.make_artifacts(model, folder) (an interrupted rebuild or files copied "
        "from another model's artifacts leave such a folder), or delete it"
    )


def check_files(art: Artifacts) -> None:
    """Refuse a folder whose files are empty or differ from the digests its metadata records."""
    for name in ARTIFACT_FILES:
        path = art.directory / name
        if path.is_file() and path.stat().st_size == 0:
            raise _mismatch(art.directory, f"{name} is empty (0 bytes)")
    for name, rec in art.files.items():
        path = art.directory / name
        if not path.is_file():
            raise _mismatch(art.directory, f"{name}, listed in {META_FILE}, is missing")
        if path.stat().st_size != rec.get("size") or _sha256(path) != rec.get("sha256"):
            raise _mismatch(
                art.directory, f"{name} is not the file {META_FILE} records (size, sha256)"
            )


def check_state(art: Artifacts, graph: Any, state: Any) -> None:
    """Refuse a checkpoint whose parameters do not fit the training graph's parameter inputs
    (ORT itself would fail with ``INVALID_ARGUMENT : Got invalid dimensions``)."""
    inputs = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in graph.graph.input
    }
    for name, param in state.parameters:
        if not param.requires_grad:
            continue
        want = inputs.get(name)
        have = list(param.data.shape)
        if want is None:
            raise _mismatch(
                art.directory,
                f"the checkpoint's parameter {name!r} is not an input of training_model.onnx",
            )
        if len(want) != len(have) or any(
            w is not None and w != h for w, h in zip(want, have, strict=False)
        ):
            raise _mismatch(
                art.directory,
                f"the checkpoint's parameter {name!r} has shape {have}, training_model.onnx "
                f"expects {want}",
            )


def training_dropout(path: Path, ratio_inputs: Iterable[str]) -> bool:
    """Whether the training graph at ``path`` applies dropout that the ratio inputs don't control."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    index = GraphIndex(model.graph)
    controlled = set(ratio_inputs)
    for node in model.graph.node:
        if node.op_type not in DROPOUT_OPS or node.domain not in (
            *DEFAULT_DOMAINS,
            "com.microsoft",
        ):
            continue
        # Dropout / BitmaskDropout: (data, ratio, mode); the Bias variants: (data, bias,
        # residual, ratio, mode)
        ratio_at = 1 if node.op_type in ("Dropout", "BitmaskDropout") else 3
        ratio = node.input[ratio_at] if len(node.input) > ratio_at else ""
        mode = node.input[ratio_at + 1] if len(node.input) > ratio_at + 1 else ""
        if not mode:
            continue
        value = index.constant(mode)
        if value is not None and not bool(np.asarray(value).reshape(-1)[0]):
            continue
        if ratio in controlled:
            continue
        value = index.constant(ratio)
        if value is not None and float(np.asarray(value).reshape(-1)[0]) == 0.0:
            continue
        return True
    return False


# ---------------------------------------------------------------------------------------------
# feeding the Module
# ---------------------------------------------------------------------------------------------
def module_inputs(names: Sequence[str], feeds: Mapping[str, Any], arg: str = "feeds") -> list[Any]:
    """Order ``feeds`` as the Module's ``input_names()``; name what is missing."""
    missing = [n for n in names if n not in feeds]
    if missing:
        raise bad_argument(
            arg,
            f"a value for every input of the training graph {list(names)}",
            f"no value for {missing}",
            "add them (ratio inputs: adapters.onnx.ratio_feeds(report))",
        )
    return [feeds[n] for n in names]


def split_batch(
    batch: Any, user_inputs: Sequence[str], aliases: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], int]:
    """A batch (dict by input name, or a tuple in ``user_inputs`` order) as arrays + its size."""
    if isinstance(batch, Mapping):
        arrays = {aliases.get(str(k), str(k)): np.asarray(v) for k, v in batch.items()}
    elif isinstance(batch, (tuple, list)):
        if len(batch) != len(user_inputs):
            raise bad_argument(
                "batches",
                f"tuples of {len(user_inputs)} arrays in the order {list(user_inputs)}",
                f"a tuple of {len(batch)}",
                "pass dicts keyed by input name instead",
            )
        arrays = {n: np.asarray(v) for n, v in zip(user_inputs, batch, strict=True)}
    else:
        raise bad_argument(
            "batches",
            "an iterable of dicts {input name: array} (or tuples in input order)",
            type(batch).__name__,
            "yield e.g. {'input_ids': ids, 'attention_mask': mask, 'labels': y}",
        )
    missing = [n for n in user_inputs if n not in arrays]
    if missing:
        raise bad_argument(
            "batches",
            f"a value for every input of the training graph {list(user_inputs)}",
            f"keys {sorted(arrays)} (no {missing})",
            "add the missing arrays (the loss target is called 'labels' or 'target')",
        )
    sizes = {n: int(arrays[n].shape[0]) if arrays[n].ndim else -1 for n in user_inputs}
    size_set = {s for s in sizes.values() if s >= 0}
    if len(size_set) != 1:
        raise bad_argument(
            "batches",
            "arrays that share their first (batch) axis",
            sizes,
            "stack samples along axis 0 in every input",
        )
    return arrays, size_set.pop()


def _label_aliases(user: Sequence[str]) -> dict[str, str]:
    """Let batches call the loss target ``labels`` or ``target`` whichever the graph uses."""
    out = {}
    if "labels" in user and "target" not in user:
        out["target"] = "labels"
    if "target" in user and "labels" not in user:
        out["labels"] = "target"
    return out


def _ratio_inputs(model: Any) -> dict[str, str]:
    """``{site: input}`` for graph inputs used as a Dropout ratio or as per-unit rates."""
    index = GraphIndex(model.graph)
    out = {}
    for info in _g.discover(model)[0]:
        for i in info.nodes:
            node = index.nodes[i]
            if len(node.input) > 1 and node.input[1] in index.inputs:
                out[info.site.name] = node.input[1]
    for unit in _r.unit_dropouts(model):
        if unit.rates in index.inputs:
            out[unit.site] = unit.rates
    return out


def _applies_dropout(model: Any, infos: Sequence[SiteHandle]) -> bool:
    """Whether fixed (non-input) ratios or rates make the training graph drop anything."""
    if any(i.active and (i.ratio or 0) > 0 for i in infos):
        return True
    index = GraphIndex(model.graph)
    for unit in _r.unit_dropouts(model):
        rates = index.constant(unit.rates)
        if unit.rates not in index.inputs and (rates is None or np.any(rates > 0)):
            return True
    return False


def make_artifacts(
    model_proto: ModelLike,
    out_dir: str | os.PathLike[str],
    loss: Any = "cross_entropy",
    requires_grad: Sequence[str] | None = None,
    *,
    optimizer: str | None = "adamw",
    output: str | None = None,
    repair: bool = True,
) -> Artifacts:
    """Training, eval and optimizer graphs plus checkpoint for ``onnxruntime.training.api``.

    Wraps ``onnxruntime.training.artifacts.generate_artifacts``: ``loss`` is ``cross_entropy``
    (``labels``: int64 class ids), ``mse`` / ``l1`` (``target``), ``bce`` or an ORT
    ``LossType``/``onnxblock.Block``; ``requires_grad`` (ONNX or canonical names) defaults to
    every trainable initializer, the rest are frozen; ``optimizer`` is ``adamw``, ``sgd`` or None;
    ``output`` picks the graph output the loss reads (default: the first). The files are written
    to a temporary folder and moved into ``out_dir``; ``gd_artifacts.json`` records the
    parameter names and ratio inputs for :func:`estimate_fisher`.

    Example:
        >>> import tempfile
        >>> from adapters.onnx import apply
        >>> from adapters.onnx.graph import example_model
        >>> m = apply(example_model(), {"dropout": 0.1}).model
        >>> art = make_artifacts(m, tempfile.mkdtemp(), loss="mse")
        >>> sorted(art.requires_grad)[:2], art.optimizer_model.exists()
        (['dense.bias', 'head.bias'], True)
    """
    model = _load(model_proto)
    _g.check_ort_compatible(model)
    if repair:
        model, _ = prepare_for_training(model)
    table = _g.param_table(model)
    if not table:
        raise bad_argument(
            "model_proto", "a graph with float initializers to train", "none", "export weights"
        )
    if requires_grad is None:
        trained = list(table)
    else:
        if isinstance(requires_grad, str):
            raise bad_argument("requires_grad", "a list of names", requires_grad, "wrap in [ ]")
        trained = _onnx_names(requires_grad, table, "requires_grad")
    frozen = [n for n in table if n not in set(trained)]
    ratio_inputs = _ratio_inputs(model)
    infos = _g.discover(model)[0]
    if not infos and not _r.unit_dropouts(model):
        dropout = "none"
    elif ratio_inputs:
        dropout = "inputs"
    else:
        dropout = "constant" if _applies_dropout(model, infos) else "off"
    meta = Artifacts(
        Path(out_dir),
        requires_grad=trained,
        params={n: [table[n].name, table[n].transposed] for n in trained},
        ratio_inputs=ratio_inputs,
        loss=loss if isinstance(loss, str) else type(loss).__name__,
        dropout=dropout,
    )
    return generate(
        model,
        out_dir,
        requires_grad=trained,
        frozen=frozen,
        loss=loss,
        optimizer=optimizer,
        output=output,
        meta=meta,
    )


def _dropout_off(model: Any) -> Any:
    """A copy whose Dropout nodes have no training_mode input (inference semantics: identity).

    :func:`prepare_for_training` then sets their ratios to 0, without which ORT 1.19 would scale
    the gradients through them by ``1 / (1 - ratio)``. Per-unit dropouts are removed (their
    consumers read their input).
    """
    out = _copy(model)
    _r.remove_unit_dropout(out)
    dropped = []
    for node in out.graph.node:
        if node.op_type == "Dropout" and node.domain in _g.DEFAULT_DOMAINS and len(node.input) > 2:
            dropped.append(node.input[2])
            del node.input[2:]
    _r.prune_unused(out, dropped)
    return out


def _drop_unused_inputs(model: Any, names: Iterable[str]) -> None:
    """Remove graph inputs among ``names`` that no node consumes anymore."""
    index = GraphIndex(model.graph)
    dead = {n for n in names if n not in index.consumers}
    if dead:
        keep = [v for v in model.graph.input if v.name not in dead]
        del model.graph.input[:]
        model.graph.input.extend(keep)
