"""Issue 28: a saved ``Guided<Name>`` layer config is checked before it is used: an empty
``sites`` list warns (a count mismatch), a non-dropout layer in ``sites`` and an unknown
``version`` are refused, naming the layer and field."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

from keras_saving_models import BUILDERS, example_input  # noqa: E402

import adapters.keras as gdk  # noqa: E402
from gd_core import ProfileError  # noqa: E402


def guided_encoder():
    model = BUILDERS["custom_layer"]()
    model(example_input("custom_layer"))
    names = [s.name for s in gdk.sites(model)]
    report = gdk.apply(model, {n: 0.05 for n in names})
    return report.model.get_layer("enc0")


def test_an_empty_sites_list_warns_as_a_count_mismatch():
    layer = guided_encoder()
    config = layer.get_config()
    config["guided_dropout"]["sites"] = []
    rebuilt = type(layer).from_config(config)
    with pytest.warns(RuntimeWarning, match=r"holds 0 guided dropout layers .* made 2.*apply"):
        rebuilt.build((None, 6))


def test_a_layer_that_is_not_dropout_is_refused_naming_it():
    layer = guided_encoder()
    config = layer.get_config()
    noise = keras.saving.serialize_keras_object(keras.layers.GaussianNoise(0.9))
    config["guided_dropout"]["sites"][0] = noise
    with pytest.raises(ProfileError, match=r"'enc0'.*sites\[0\].*received 'GaussianNoise'"):
        type(layer).from_config(config)


def test_an_unknown_version_is_refused():
    layer = guided_encoder()
    config = layer.get_config()
    config["guided_dropout"]["version"] = 99
    with pytest.raises(ProfileError, match=r"guided_dropout.version.*expected 1.*received 99"):
        type(layer).from_config(config)


def test_a_keras_file_with_a_bad_entry_is_refused_at_load(tmp_path):
    import json
    import zipfile

    model = BUILDERS["custom_layer"]()
    model(example_input("custom_layer"))
    guided = gdk.apply(model, {s.name: 0.05 for s in gdk.sites(model)}).model
    path = tmp_path / "m.keras"
    guided.save(path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    enc = next(x for x in config["config"]["layers"] if x["config"]["name"] == "enc0")
    enc["config"]["guided_dropout"]["version"] = 99
    files["config.json"] = json.dumps(config).encode()
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    with pytest.raises(Exception, match=r"guided_dropout.version.*received 99"):
        keras.saving.load_model(bad)
