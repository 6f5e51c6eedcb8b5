"""One fixture class per adapter: everything the conformance suite needs from a framework.

Adding an adapter means adding one class here with the same methods and listing it in
``HARNESSES``. Arrays cross the boundary as NumPy, names canonical; every binding hands out its
weights (fingerprints, Fisher, unit axes) in the canonical PyTorch layout itself, so the
harnesses convert nothing.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
from refmodels import RefSpec, build_keras, build_torch

from gd_core import SensitivityProfile, Site
from gd_core.names import to_keras_layer


def _have(*modules: str) -> str | None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed"
    return None


def site_mapping(spec: RefSpec) -> dict[str, list[str]] | None:
    """The explicit grouping for models where default rules legitimately differ."""
    return None if spec.default_rule_agrees else spec.guards


class Harness:
    name = "base"
    #: why this harness cannot run here (None when it can)
    missing: str | None = None
    #: why the adapter's sites carry no unit axes (its profiles no unit scores); None when they do
    no_unit_axes: str | None = None

    def build(self, spec: RefSpec, dropout: bool = True) -> Any:
        raise NotImplementedError

    def sites(self, model: Any, spec: RefSpec) -> list[Site]:
        raise NotImplementedError

    def fingerprint(self, model: Any) -> Any:
        """The adapter's own ``fingerprint(model)`` (canonical names and layout)."""
        raise NotImplementedError

    def fisher(self, model: Any, spec: RefSpec) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def profile(self, model: Any, spec: RefSpec) -> SensitivityProfile:
        raise NotImplementedError

    def apply(self, model: Any, spec: RefSpec, profile: Any, **kw: Any) -> Any:
        """Apply and return the model that now carries guided dropout."""
        raise NotImplementedError

    def installed(self, model: Any, spec: RefSpec) -> dict[str, np.ndarray]:
        """Per site, the probabilities the framework will actually use (scalar or per unit)."""
        raise NotImplementedError

    def site_io(
        self, model: Any, spec: RefSpec, site: str, x: np.ndarray, seed: int, training: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Input and output of one site's dropout for a forward pass on ``x``."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
class TorchHarness(Harness):
    name = "torch"
    missing = _have("torch")

    def build(self, spec, dropout=True):
        import torch

        model = build_torch(spec, torch.float64)
        if not dropout:
            for name, mod in list(model.named_modules()):
                if isinstance(mod, torch.nn.Dropout):
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, torch.nn.Identity())
        return model

    def _batch(self, spec):
        import torch

        return (torch.tensor(spec.inputs), torch.tensor(spec.labels))

    @staticmethod
    def _loss(model, batch):
        import torch

        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    def sites(self, model, spec):
        import adapters.torch as gdt

        return gdt.sites(model, site_mapping(spec), add_sites=False)

    def fingerprint(self, model):
        import adapters.torch as gdt

        return gdt.fingerprint(model)

    def fisher(self, model, spec):
        import adapters.torch as gdt

        return dict(
            gdt.estimate_fisher(model, [self._batch(spec)], loss=self._loss, progress=False)
        )

    def profile(self, model, spec):
        import adapters.torch as gdt

        return gdt.profile(
            model,
            [self._batch(spec)],
            loss=self._loss,
            progress=False,
            sites=site_mapping(spec),
            add_sites=False,
        )

    def apply(self, model, spec, profile, seed=None, **kw):
        import adapters.torch as gdt

        gdt.apply(model, profile, add_sites=False, sites=site_mapping(spec), **kw)
        return model

    def installed(self, model, spec):
        import adapters.torch as gdt

        out = {}
        for site in spec.sites:
            mod = model.get_submodule(site)
            if isinstance(mod, gdt.GuidedDropout):
                out[site] = mod.rates.detach().cpu().numpy().astype(np.float64)
            else:
                out[site] = np.float64(mod.p)
        return out

    def site_io(self, model, spec, site, x, seed, training):
        import torch

        seen = {}
        mod = model.get_submodule(site)
        handle = mod.register_forward_hook(
            lambda m, a, o: seen.update(i=a[0].detach().numpy(), o=o.detach().numpy())
        )
        model.train(training)
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                model(torch.tensor(x))
        finally:
            handle.remove()
            model.eval()
        return seen["i"], seen["o"]


# ---------------------------------------------------------------------------------------------
class KerasHarness(Harness):
    missing = _have("keras", "tensorflow")

    @property
    def name(self):  # type: ignore[override]
        if self.missing:
            return "keras"
        import keras

        return f"keras-{keras.backend.backend()}"

    def build(self, spec, dropout=True):
        if dropout:
            return build_keras(spec)
        import keras

        return build_keras(
            spec, dropout_cls=lambda rate, name, dtype: keras.layers.Identity(name=name)
        )

    def _x(self, spec, x=None):
        x = spec.inputs if x is None else x
        return x.astype("int32") if spec.name != "mlp" else x.astype("float64")

    def _loss(self, model, batch):
        import keras

        x, y = batch
        return keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)

    def sites(self, model, spec):
        import adapters.keras as gdk

        return gdk.sites(model, site_mapping(spec))

    def fingerprint(self, model):
        import adapters.keras as gdk

        return gdk.fingerprint(model)

    def fisher(self, model, spec):
        import adapters.keras as gdk

        f = gdk.estimate_fisher(
            model, [(self._x(spec), spec.labels)], loss=self._loss, progress=False
        )
        return dict(f)

    def profile(self, model, spec):
        import adapters.keras as gdk

        return gdk.profile(
            model,
            [(self._x(spec), spec.labels)],
            loss=self._loss,
            progress=False,
            sites=site_mapping(spec),
        )

    def apply(self, model, spec, profile, seed=None, **kw):
        import keras

        import adapters.keras as gdk

        if seed is not None:
            keras.utils.set_random_seed(seed)
        return gdk.apply(model, profile, **kw).model

    def installed(self, model, spec):
        out = {}
        for site in spec.sites:
            layer = model.get_layer(to_keras_layer(site))
            rates = getattr(layer, "rates", None)
            out[site] = (
                np.asarray(rates, dtype=np.float64) if rates is not None else np.float64(layer.rate)
            )
        return out

    def site_io(self, model, spec, site, x, seed, training):
        import keras

        layer = model.get_layer(to_keras_layer(site))
        # model.input: the structure the model was built with (a list of one would warn)
        probe = keras.Model(model.input, [layer.input, layer.output])
        i, o = probe(self._x(spec, x), training=training)
        return keras.ops.convert_to_numpy(i), keras.ops.convert_to_numpy(o)


# ---------------------------------------------------------------------------------------------
class OnnxHarness(Harness):
    name = "onnx"
    missing = _have("onnx", "onnxruntime", "torch")
    no_unit_axes = (
        "adapters.onnx sites carry units but no unit axes, so its profiles have no unit scores "
        "(apply takes a torch or Keras profile's unit scores)"
    )

    def build(self, spec, dropout=True):
        import io

        import onnx
        import torch

        model = TorchHarness().build(spec, dropout).float()
        example = (
            torch.tensor(spec.inputs[:2]).float()
            if spec.name == "mlp"
            else torch.tensor(spec.inputs[:2])
        )
        name = "x" if spec.name == "mlp" else "ids"
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[name],
            output_names=["logits"],
            dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}},
            opset_version=16,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamo=False,
        )
        return onnx.load_from_string(buf.getvalue())

    def _feed(self, spec, x=None):
        x = spec.inputs if x is None else x
        if spec.name == "mlp":
            return {"x": x.astype(np.float32)}
        return {"ids": x.astype(np.int64)}

    def sites(self, model, spec):
        import adapters.onnx as gdo

        return gdo.sites(model, site_mapping(spec))

    def fingerprint(self, model):
        import adapters.onnx as gdo

        return gdo.fingerprint(model)

    def fisher(self, model, spec):
        import adapters.onnx as gdo

        batch = {**self._feed(spec), "labels": spec.labels.astype(np.int64)}
        return dict(gdo.estimate_fisher(model, [batch], loss="cross_entropy"))

    def profile(self, model, spec):
        import adapters.onnx as gdo

        batch = {**self._feed(spec), "labels": spec.labels.astype(np.int64)}
        return gdo.profile(model, [batch], loss="cross_entropy", sites=site_mapping(spec))

    def apply(self, model, spec, profile, seed=None, **kw):
        import adapters.onnx as gdo

        new = gdo.apply(model, profile, seed=seed, **kw).model
        self._original = model
        return new

    def _dropout_nodes(self, model):
        from gd_core.names import from_onnx_node

        return {from_onnx_node(n.name): n for n in model.graph.node if n.op_type == "Dropout"}

    def installed(self, model, spec):
        from onnx import numpy_helper

        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        out = {}
        for site in spec.sites:
            rates = f"{site}.rates"
            if rates in inits:
                out[site] = inits[rates].astype(np.float64)
                continue
            node = self._dropout_nodes(model)[site]
            out[site] = np.float64(inits[node.input[1]])
        return out

    def site_io(self, model, spec, site, x, seed, training):
        import onnx
        import onnxruntime as ort

        original = self._dropout_nodes(self._original)[site]
        src, dst = original.input[0], original.output[0]
        graph_model = onnx.ModelProto()
        graph_model.CopyFrom(model if training else self._eval(model))
        graph_model.graph.output.extend(
            [
                onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                for n in (src, dst)
            ]
        )
        sess = ort.InferenceSession(
            graph_model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        i, o = sess.run([src, dst], self._feed(spec, x))[:2]
        return i.astype(np.float64), o.astype(np.float64)

    @staticmethod
    def _eval(model):
        """Inference: every Dropout's training_mode set to False."""
        import onnx
        from onnx import numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(model)
        false = numpy_helper.from_array(np.array(False), "conformance.training_off")
        m.graph.initializer.append(false)
        for node in m.graph.node:
            if node.op_type == "Dropout":
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = false.name
        return m


HARNESSES: list[Harness] = [TorchHarness(), KerasHarness(), OnnxHarness()]
if os.environ.get("GD_CONFORMANCE_ONLY"):
    HARNESSES = [h for h in HARNESSES if h.name.startswith(os.environ["GD_CONFORMANCE_ONLY"])]
