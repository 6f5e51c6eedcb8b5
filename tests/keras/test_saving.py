"""Issue 14.8: after `apply`, a model still takes the original's weights (`set_weights`,
`.weights.h5`), and a `.keras` file saved after `apply` loads in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from keras_saving_models import BUILDERS, example_input  # noqa: E402

import adapters.keras as gdk  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _applied(model, probs, **kwargs):
    out = gdk.apply(model, probs, **kwargs)
    return out[0] if isinstance(out, tuple) else out.model


def _site_probs(model) -> dict[str, float]:
    names = [s.name for s in gdk.sites(model)]
    return {n: 0.05 + 0.05 * i for i, n in enumerate(names)}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_applied_model_takes_the_original_weights(tmp_path, kind):
    original = BUILDERS[kind]()
    x = example_input(kind)
    original(x)
    weights = original.get_weights()
    original.save_weights(tmp_path / "original.weights.h5")
    guided = BUILDERS[kind]()
    guided = _applied(guided, _site_probs(guided))
    guided(x)
    assert len(guided.get_weights()) == len(weights)
    guided.set_weights(weights)
    np.testing.assert_allclose(guided(x, training=False), original(x, training=False), atol=1e-6)
    fresh = BUILDERS[kind]()
    fresh = _applied(fresh, _site_probs(fresh))
    fresh(x)
    fresh.load_weights(tmp_path / "original.weights.h5")
    np.testing.assert_allclose(fresh(x, training=False), original(x, training=False), atol=1e-6)


# The fresh process that loads the saved files: ONE interpreter (one TensorFlow import) loads
# every kind's file, each in its own try, and reports per kind; each kind stays its own test.
_LOADER = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import numpy as np, keras
import adapters.keras as gdk
import keras_saving_models
out = {}
for kind, folder in json.loads(sys.argv[2]).items():
    try:
        m = keras.models.load_model(folder + "/guided.keras")
        x = np.load(folder + "/x.npy")
        np.save(folder + "/got.npy", np.asarray(m(x, training=False)))
        out[kind] = {"rates": sorted(round(float(l.rate), 6) for l in m._flatten_layers()
                     if isinstance(l, (gdk.GuidedDropout, keras.layers.Dropout)))}
    except Exception:
        out[kind] = {"error": traceback.format_exc()[-3000:]}
print(json.dumps(out))
"""


def _rates(model) -> list[float]:
    return sorted(
        round(float(layer.rate), 6)
        for layer in model._flatten_layers()
        if isinstance(layer, (gdk.GuidedDropout, keras.layers.Dropout))
    )


@pytest.fixture
def fresh_loads(once, tmp_path_factory, warm_python):
    """Every kind saved after ``apply`` (here) and loaded in one fresh process, once per run:
    ``{kind: {"folder", "rates" (here), "loaded": {"rates"} or {"error"}}}``."""

    def produce():
        made = {}
        for kind in sorted(BUILDERS):
            folder = tmp_path_factory.mktemp(f"saved-{kind}")
            model = BUILDERS[kind]()
            x = example_input(kind)
            model(x)
            guided = _applied(model, _site_probs(model))
            np.save(folder / "expected.npy", np.asarray(guided(x, training=False)))
            guided.save(folder / "guided.keras")
            np.save(folder / "x.npy", x)
            made[kind] = {"folder": str(folder), "rates": _rates(guided)}
        folders = json.dumps({kind: m["folder"] for kind, m in made.items()})
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(  # a process of its own, forked warm (tests/_warm.py)
            [warm_python, "-c", _LOADER, str(HERE), folders],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
        return {kind: {**m, "loaded": loaded[kind]} for kind, m in made.items()}

    return lambda: once("keras-saving-fresh-loads", produce)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_keras_file_saved_after_apply_loads_in_a_fresh_process(fresh_loads, kind):
    made = fresh_loads()[kind]
    assert "error" not in made["loaded"], made["loaded"].get("error")
    assert made["loaded"]["rates"] == made["rates"]
    folder = Path(made["folder"])
    np.testing.assert_allclose(
        np.load(folder / "got.npy"), np.load(folder / "expected.npy"), atol=1e-6
    )


def _guided_encoder():
    model = BUILDERS["custom_layer"]()
    model(example_input("custom_layer"))
    guided = _applied(model, _site_probs(model))
    return guided.get_layer("enc0")


def test_a_layer_making_other_dropout_layers_than_saved_warns_with_the_fix():
    layer = _guided_encoder()
    assert type(layer).__qualname__ == "GuidedEncoder" and type(layer).__name__ == "Encoder"
    config = layer.get_config()
    assert [s["config"]["rate"] for s in config["guided_dropout"]["sites"]] == [0.05, 0.1]
    config["guided_dropout"]["sites"] = config["guided_dropout"]["sites"][:1]  # code changed
    rebuilt = type(layer).from_config(config)
    with pytest.warns(RuntimeWarning, match=r"holds 1 guided dropout layers .* made 2.*apply"):
        rebuilt.build((None, 6))
    assert [float(rebuilt.inner_dropout.rate), float(rebuilt.outer_dropout.rate)] == [0.1, 0.1]


def test_a_guided_layer_config_names_what_is_missing():
    from adapters.keras.holders import GuidedSites

    config = _guided_encoder().get_config()
    config["guided_dropout"]["base"] = {"module": "mine", "class_name": "Gone"}
    with pytest.raises(TypeError, match=r"mine\.Gone .*fix: import the module defining Gone"):
        GuidedSites.from_config(config)
    del config["guided_dropout"]
    with pytest.raises(TypeError, match=r"expected a config with 'guided_dropout'"):
        GuidedSites.from_config(config)
