"""ONNX Runtime Training side of the ONNX adapter: artifacts, feeds and per-sample gradients.

Private: :mod:`adapters.onnx` is the public surface. ``onnxruntime.training`` is imported only
inside functions (its package ``__init__`` imports torch when torch is installed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gd_core._io import atomic_write_bytes
from gd_core.errors import NonFiniteGradientError, bad_argument
from gd_core.fisher import FisherAccumulator

from ._lazy import require
from ._onnx_graph import DEFAULT_DOMAINS, GraphIndex, Param

META_FILE = "gd_artifacts.json"
META_FORMAT = "guided-dropout-ort-artifacts"
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "bce", "l1")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: ORT's training graphs may fuse Dropout into these contrib ops
DROPOUT_OPS = frozenset({"Dropout", "BiasDropout", "BitmaskDropout", "BitmaskBiasDropout"})


def _ort_training() -> tuple[Any, Any]:
    artifacts = require("onnxruntime.training.artifacts", "adapters.onnx training")
    api = require("onnxruntime.training.api", "adapters.onnx training")
    return artifacts, api


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

    @property
    def training_model(self) -> Path:
        return self.directory / "training_model.onnx"

    @property
    def eval_model(self) -> Path:
        return self.directory / "eval_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        return self.directory / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint"

    def open(self, device: str = "cpu", optimizer: bool = True) -> tuple[Any, Any, Any]:
        """``(Module, Optimizer or None, CheckpointState)`` ready to train on ``device``."""
        _, api = _ort_training()
        state = api.CheckpointState.load_checkpoint(str(self.checkpoint))
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
            return cls(folder)
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
        return cls(
            folder,
            list(meta.get("requires_grad", [])),
            {str(k): list(v) for k, v in dict(meta.get("params", {})).items()},
            {str(k): str(v) for k, v in dict(meta.get("ratio_inputs", {})).items()},
            str(meta.get("loss", "")),
            str(meta.get("dropout", "unknown")),
        )


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
    """Run ``generate_artifacts`` into a temporary folder, then move each file into place."""
    artifacts, _ = _ort_training()
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    outputs = [o.name for o in model.graph.output]
    if output is not None and output not in outputs:
        raise bad_argument("output", f"one of the graph outputs {outputs}", output, "name one")
    kwargs: dict[str, Any] = {}
    if output is not None or len(outputs) > 1:
        kwargs["loss_input_names"] = [output or outputs[0]]
    tmp = Path(tempfile.mkdtemp(prefix=".gd-artifacts-", dir=target))
    try:
        artifacts.generate_artifacts(
            model,
            requires_grad=requires_grad,
            frozen_params=frozen,
            loss=loss_block(loss),
            optimizer=optimizer_block(optimizer),
            artifact_directory=str(tmp),
            **kwargs,
        )
        stale = target / "optimizer_model.onnx"
        if optimizer is None and stale.exists():
            stale.unlink()
        for item in sorted(tmp.iterdir()):
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta.directory = target
    atomic_write_bytes(target / META_FILE, meta.to_json().encode())
    return meta


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


def samples(
    arrays: Mapping[str, np.ndarray], names: Sequence[str], size: int
) -> Iterator[list[np.ndarray]]:
    """Batch-of-one slices in ``names`` order."""
    for i in range(size):
        yield [np.ascontiguousarray(arrays[n][i : i + 1]) for n in names]


def per_sample_fisher(
    art: Artifacts,
    batches: Iterable[Any],
    *,
    params: Mapping[str, Param],
    max_samples: int | None,
    on_nonfinite: str,
    device: str = "cpu",
) -> FisherAccumulator:
    """Squared per-sample gradients through ``onnxruntime.training.api``, summed in float64.

    For every sample: ``module.lazy_reset_grad()``, one ``module(...)`` train step on a batch of
    one, then each gradient from ``state.parameters[name].grad``. The sums go to a
    :class:`FisherAccumulator` (keys: canonical names, arrays in canonical layout).
    """
    acc = FisherAccumulator(on_nonfinite)  # type: ignore[arg-type]  # validates the policy
    module, _, state = art.open(device, optimizer=False)
    module.train()
    names = list(module.input_names())
    zero = np.zeros((), dtype=np.float32)
    fixed = {n: zero for n in art.ratio_inputs.values() if n in names}
    user = [n for n in names if n not in fixed]
    aliases = _label_aliases(user)
    trained = [n for n in art.requires_grad if n in params]
    sums = {n: np.zeros(state.parameters[n].data.shape, dtype=np.float64) for n in trained}
    count = skipped = 0
    for batch in batches:
        if max_samples is not None and count + skipped >= max_samples:
            break
        arrays, size = split_batch(batch, user, aliases)
        for sample in samples(arrays, user, size):
            if max_samples is not None and count + skipped >= max_samples:
                break
            feeds = dict(zip(user, sample, strict=True))
            feeds.update(fixed)
            module.lazy_reset_grad()
            loss = np.asarray(module(*module_inputs(names, feeds, "batches")))
            grads = {n: state.parameters[n].grad for n in trained}
            bad = _first_nonfinite(loss, grads)
            if bad is not None:
                if on_nonfinite == "raise":
                    where = "the loss" if bad == "" else f"gradient of {params[bad].name!r}"
                    raise NonFiniteGradientError(
                        f"{where} is NaN or Inf for sample {count + skipped}; fix: check that "
                        "sample's inputs and labels, or pass on_nonfinite='skip' to skip and "
                        "count such samples",
                        parameter=None if bad == "" else params[bad].name,
                    )
                skipped += 1
                continue
            for n in trained:
                if grads[n] is not None:  # None: the loss does not reach this parameter
                    g = np.asarray(grads[n], dtype=np.float64)
                    sums[n] += g * g
            count += 1
    canonical = {}
    for n in trained:
        p = params[n]
        canonical[p.name] = sums[n].T if p.transposed else sums[n]
    acc.add(canonical, count, skipped=skipped)
    return acc


def _label_aliases(user: Sequence[str]) -> dict[str, str]:
    """Let batches call the loss target ``labels`` or ``target`` whichever the graph uses."""
    out = {}
    if "labels" in user and "target" not in user:
        out["target"] = "labels"
    if "target" in user and "labels" not in user:
        out["labels"] = "target"
    return out


def _first_nonfinite(loss: np.ndarray, grads: Mapping[str, Any]) -> str | None:
    if not np.all(np.isfinite(loss)):
        return ""
    for n, g in grads.items():
        if g is not None and not np.all(np.isfinite(g)):
            return n
    return None
