"""``load_state_dict`` for Keras 3: canonical (torch-layout) weights into a Keras model, by
canonical name (:mod:`adapters.keras.discovery` names them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gd_core.errors import bad_argument
from gd_core.validate import check_type

from .discovery import ModelIndex


class LoadedKeys(NamedTuple):
    """What :func:`load_state_dict` did not match (as torch's ``load_state_dict`` returns)."""

    missing_keys: list[str]  # weights of the model the state dict lacks (left unchanged)
    unexpected_keys: list[str]  # state dict keys the model has no weight for (not used)


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _some(names: Sequence[str]) -> str:
    return f"{list(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_state_dict(
    model: Any, state_dict: Mapping[str, Any], *, strict: bool = True
) -> LoadedKeys:
    """Set a Keras model's weights from canonical (torch-layout) arrays, by canonical name.

    ``state_dict`` maps canonical names (``<layer name>.weight|bias``, as :func:`fingerprint`
    lists them) to arrays in torch layout (NumPy arrays or torch tensors), e.g. the
    ``state_dict()`` of the torch model a Keras replica mirrors. The binding converts what Keras
    stores in another layout (Dense and convolution kernels, transposed). Like torch's
    ``load_state_dict``, with ``strict`` (the default) every weight of the model must be given and
    every key must name one (a key the model lacks, such as a torch buffer, raises; pass
    ``strict=False`` to load a part and read the returned lists). A mis-shaped array always
    raises. Nothing is assigned unless every given array fits. Returns
    ``LoadedKeys(missing_keys, unexpected_keys)``.

    Example:
        >>> import numpy as np, keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
        >>> w = np.arange(6.0).reshape(2, 3)  # torch Linear layout (out, in)
        >>> load_state_dict(m, {"fc.weight": w, "fc.bias": np.zeros(2)})
        LoadedKeys(missing_keys=[], unexpected_keys=[])
        >>> np.asarray(m.get_layer("fc").kernel).tolist()  # Keras stores (in, out)
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        >>> load_state_dict(m, {"fc.weight": w, "step": 1}, strict=False)
        LoadedKeys(missing_keys=['fc.bias'], unexpected_keys=['step'])
    """
    fix = "pass e.g. torch_model.state_dict() or dict(zip(names, arrays))"
    check_type(state_dict, "state_dict", Mapping, "a mapping {canonical name: array}", fix)
    idx = ModelIndex.build(model)
    missing = [n for n in idx.variables if n not in state_dict]
    unexpected = [str(k) for k in state_dict if k not in idx.variables]
    if strict and (missing or unexpected):
        todo = [f"add arrays for {_some(missing)}"] if missing else []
        todo += [f"drop {_some(unexpected)} (the model has no such weight)"] if unexpected else []
        raise bad_argument(
            "state_dict",
            "one canonical (torch-layout) array for every weight of the model and no other key",
            f"{len(missing)} weight(s) of the model missing, {len(unexpected)} key(s) unexpected",
            "; ".join(todo) + ", or pass strict=False to load a part (it returns the "
            "missing and unexpected keys)",
        )
    values: dict[str, np.ndarray] = {}
    for name in idx.variables:
        if name not in state_dict:
            continue
        value = _as_array(state_dict[name])
        if tuple(value.shape) != idx.shape(name):
            raise bad_argument(
                f"state_dict[{name!r}]",
                f"an array of the canonical (torch-layout) shape {idx.shape(name)}",
                f"shape {tuple(value.shape)}",
                "pass the weights of the model this one mirrors, in torch layout (a Dense "
                "kernel as the Linear weight (out, in))",
            )
        values[name] = idx.from_canonical(name, value)
    for name, value in values.items():
        var = idx.variables[name]
        var.assign(value.astype(var.dtype))
    return LoadedKeys(missing, unexpected)
