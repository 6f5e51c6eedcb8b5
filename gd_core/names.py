"""Canonical names, and their translation between frameworks' naming conventions.

The canonical form is PyTorch's dotted module path (``bert.encoder.layer.0.output.dropout``), with
parameters as ``<module path>.<weight|bias>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from .errors import bad_argument

#: parameter leaf names of other frameworks and their canonical (torch) counterparts
LEAF_ALIASES: Mapping[str, str] = {
    "kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "embeddings": "weight",
    "scale": "weight",
}


def from_onnx_node(node_name: str) -> str:
    """Canonical site name of a node from a ``torch.onnx`` export.

    Example:
        >>> from_onnx_node("/bert/encoder/layer.0/attention/self/dropout/Dropout")
        'bert.encoder.layer.0.attention.self.dropout'
        >>> from_onnx_node("/dropout/Dropout_1")
        'dropout'
    """
    if not isinstance(node_name, str) or not node_name:
        raise bad_argument("node_name", "a non-empty node name", node_name, "name the node")
    parts = [p for p in node_name.strip("/").split("/") if p]
    if len(parts) > 1 and re.fullmatch(r"[A-Z][A-Za-z]*(_\d+)?", parts[-1]):
        parts = parts[:-1]  # trailing op type like "Dropout" or "Dropout_3"
    return ".".join(parts)


def from_path(path: str, sep: str = "/") -> str:
    """Canonical name from a ``sep``-separated path, translating leaf aliases (``kernel``).

    Example:
        >>> from_path("encoder/layer_0/dense/kernel")
        'encoder.layer_0.dense.weight'
    """
    parts = [p for p in path.split(sep) if p]
    if parts:
        leaf = parts[-1].split(":")[0]
        parts[-1] = LEAF_ALIASES.get(leaf, leaf)
    return ".".join(parts)


def translator(mapping: Mapping[str, str] | Callable[[str], str]) -> Callable[[str], str]:
    """A function renaming names: a dict (unlisted names unchanged) or a callable."""
    if callable(mapping):
        return mapping
    if isinstance(mapping, Mapping):
        table = dict(mapping)
        return lambda name: table.get(name, name)
    raise bad_argument(
        "names",
        "a dict of old -> new names or a function",
        type(mapping).__name__,
        "pass e.g. {'dense/kernel': 'dense.weight'}",
    )


#: Keras layer names cannot contain "." on the torch backend; "__" stands for "." there
KERAS_DOT = "__"


def from_keras_layer(name: str) -> str:
    """Canonical name of a Keras layer: ``__`` stands for ``.`` (dots are not allowed in layer
    names on Keras' torch backend), so ``encoder__layer__0__output__dropout`` mirrors
    ``encoder.layer.0.output.dropout``. Names with dots (TensorFlow backend) pass unchanged.

    Example:
        >>> from_keras_layer("encoder__layer__0__output__dropout")
        'encoder.layer.0.output.dropout'
    """
    return name.replace(KERAS_DOT, ".")


def to_keras_layer(name: str) -> str:
    """A Keras layer name valid on every backend for a canonical name.

    Example:
        >>> to_keras_layer("block1.fc")
        'block1__fc'
    """
    return name.replace(".", KERAS_DOT)
