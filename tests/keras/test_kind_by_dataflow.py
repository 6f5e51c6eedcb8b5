"""Issue 23, item 3: no name decides a Keras site's kind. A dropout on a softmax output drops
attention probabilities (one rate at unit granularity: its last axis is key positions) whatever
it is called, and one on a Dense output is a hidden dropout even when named for attention."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
gdk = pytest.importorskip("adapters.keras")
import gd_core  # noqa: E402


def _misnamed():
    inp = keras.Input((4, 4))
    h = keras.layers.Softmax(name="attention_scores")(keras.layers.Dense(4, name="query")(inp))
    h = keras.layers.Dropout(0.1, name="hidden_dropout")(h)  # drops probabilities
    h = keras.layers.Dense(3, name="output_dense")(h)
    h = keras.layers.Dropout(0.1, name="attention_probs_dropout")(h)  # drops features
    return keras.Model(inp, keras.layers.Dense(2, name="head")(h))


def test_the_dataflow_not_the_name_decides_attention_probabilities():
    model = _misnamed()
    found = gdk.sites(model)
    rng = np.random.default_rng(0)
    prof = gd_core.SensitivityProfile(
        sites=tuple(found),
        scores=np.array([2.0, 1.0]),
        unit_scores={s.name: rng.uniform(0.5, 2.0, size=s.units) for s in found},
        fingerprint=gdk.fingerprint(model),
    )
    rows = {r.site: r for r in gdk.apply(model, prof, granularity="unit").rows}
    assert rows["hidden_dropout"].units is None
    assert "attention probabilities" in (rows["hidden_dropout"].note or "")
    assert rows["attention_probs_dropout"].units == 3
