"""gd_core.dataflow for the shapes the model zoo has beyond BERT's (issue 23): a site called more
than once in one forward guards the union of its calls, and attention-probability dropout is told
from hidden dropout by what it drops (a softmax output), not by names."""

from __future__ import annotations

from gd_core.dataflow import Op, attention_sites, guarded


def _lin(name: str, x: str, y: str) -> Op:
    return Op(name, (x,), (y,), (f"{name}.weight", f"{name}.bias"))


def test_a_site_called_twice_guards_the_union_of_its_calls() -> None:
    # a classification head calling one dropout before and after its dense layer (RoBERTa)
    ops = [
        _lin("pooler", "x", "h"),
        Op("head.dropout", ("h",), ("hd",), site=True),
        _lin("head.dense", "hd", "d"),
        Op("head.act", ("d",), ("a",)),
        Op("head.dropout", ("a",), ("ad",), site=True),
        _lin("head.out_proj", "ad", "y"),
    ]
    assert guarded(ops) == {
        "head.dropout": ["pooler.weight", "pooler.bias", "head.dense.weight", "head.dense.bias"]
    }


def test_a_shared_layer_called_at_every_depth_is_one_site() -> None:
    ops: list[Op] = []
    x = "x0"
    for i in range(3):  # ALBERT: one layer's modules called at every depth
        ops += [
            _lin("layer.ffn", x, f"f{i}"),
            Op("layer.dropout", (f"f{i}",), (f"d{i}",), site=True),
            Op(f"add{i}", (f"d{i}", x), (f"x{i + 1}",), add=True),
        ]
        x = f"x{i + 1}"
    assert guarded(ops) == {"layer.dropout": ["layer.ffn.weight", "layer.ffn.bias"]}


def test_attention_sites_come_from_the_softmax_not_from_names() -> None:
    ops = [
        _lin("attn.q_lin", "x", "q"),
        _lin("attn.k_lin", "x", "k"),
        _lin("attn.v_lin", "x", "v"),
        Op("attn.scores", ("q", "k"), ("s",)),
        Op("attn.softmax", ("s",), ("p",), softmax=True),
        Op("attn.cast", ("p",), ("pc",)),  # a view: still the probabilities
        Op("attn.dropout", ("pc",), ("pd",), site=True),
        Op("attn.context", ("pd", "v"), ("c",)),
        _lin("attn.out_lin", "c", "o"),
        Op("attn.out_dropout", ("o",), ("od",), site=True),  # hidden, whatever its name
    ]
    assert attention_sites(ops) == {"attn.dropout"}
    g = guarded(ops)
    assert sorted(g["attn.dropout"]) == sorted(
        f"attn.{n}_lin.{w}" for n in "qkv" for w in ("weight", "bias")
    )
    assert g["attn.out_dropout"] == ["attn.out_lin.weight", "attn.out_lin.bias"]


def test_a_holder_dropping_probabilities_and_hidden_states_is_not_attention() -> None:
    ops = [
        Op("sm", ("s",), ("p",), softmax=True),
        Op("drop", ("p",), ("pd",), site=True),
        _lin("f", "pd", "h"),
        Op("drop", ("h",), ("hd",), site=True),
    ]
    assert attention_sites(ops) == set()
