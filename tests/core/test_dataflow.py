"""gd_core.dataflow: the one guarding rule, on framework-free graphs of BERT, torch's
TransformerEncoderLayer, a Llama block and an MLP."""

from __future__ import annotations

from gd_core.dataflow import Op, chain, guarded, shared_groups


def _lin(name: str, x: str, y: str, bias: bool = True) -> Op:
    params = (f"{name}.weight", f"{name}.bias") if bias else (f"{name}.weight",)
    return Op(name, (x,), (y,), params)


def _norm(name: str, x: str, y: str, bias: bool = True) -> Op:
    params = (f"{name}.weight", f"{name}.bias") if bias else (f"{name}.weight",)
    return Op(name, (x,), (y,), params, norm=True)


def bert_layer(i: int, x: str) -> tuple[list[Op], str]:
    p = f"encoder.layer.{i}"
    a = f"{p}.attention"
    ops = [
        _lin(f"{a}.self.query", x, f"q{i}"),
        _lin(f"{a}.self.key", x, f"k{i}"),
        _lin(f"{a}.self.value", x, f"v{i}"),
        Op(f"{a}.self.scores", (f"q{i}", f"k{i}"), (f"s{i}",)),
        Op(f"{a}.self.softmax", (f"s{i}",), (f"pr{i}",)),
        Op(f"{a}.self.dropout", (f"pr{i}",), (f"pd{i}",), site=True),
        Op(f"{a}.self.context", (f"pd{i}", f"v{i}"), (f"c{i}",)),
        Op(f"{a}.self.reshape", (f"c{i}",), (f"cr{i}",)),
        _lin(f"{a}.output.dense", f"cr{i}", f"ao{i}"),
        Op(f"{a}.output.dropout", (f"ao{i}",), (f"aod{i}",), site=True),
        Op(f"{a}.output.add", (f"aod{i}", x), (f"as{i}",)),
        _norm(f"{a}.output.LayerNorm", f"as{i}", f"h{i}"),
        _lin(f"{p}.intermediate.dense", f"h{i}", f"m{i}"),
        Op(f"{p}.intermediate.act", (f"m{i}",), (f"g{i}",)),
        _lin(f"{p}.output.dense", f"g{i}", f"o{i}"),
        Op(f"{p}.output.dropout", (f"o{i}",), (f"od{i}",), site=True),
        Op(f"{p}.output.add", (f"od{i}", f"h{i}"), (f"os{i}",)),
        _norm(f"{p}.output.LayerNorm", f"os{i}", f"y{i}"),
    ]
    return ops, f"y{i}"


def bert() -> list[Op]:
    ops = [
        Op("embeddings.word_embeddings", ("ids",), ("we",), ("embeddings.word_embeddings.weight",)),
        Op(
            "embeddings.position_embeddings",
            ("pos",),
            ("pe",),
            ("embeddings.position_embeddings.weight",),
        ),
        Op("embeddings.add", ("we", "pe"), ("e",)),
        _norm("embeddings.LayerNorm", "e", "en"),
        Op("embeddings.dropout", ("en",), ("ed",), site=True),
    ]
    x = "ed"
    for i in range(2):
        layer, x = bert_layer(i, x)
        ops += layer
    ops.append(_lin("classifier", x, "logits"))
    return ops


def test_bert_gives_the_papers_grouping() -> None:
    g = guarded(bert())
    assert g["embeddings.dropout"] == [
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
    ]
    a = "encoder.layer.1.attention"
    assert sorted(g[f"{a}.self.dropout"]) == sorted(
        f"{a}.self.{m}.{w}" for m in ("query", "key", "value") for w in ("weight", "bias")
    )
    assert g[f"{a}.output.dropout"] == [
        f"{a}.output.dense.weight",
        f"{a}.output.dense.bias",
        f"{a}.output.LayerNorm.weight",
        f"{a}.output.LayerNorm.bias",
    ]
    p = "encoder.layer.1"
    assert g[f"{p}.output.dropout"] == [
        f"{p}.output.dense.weight",
        f"{p}.output.dense.bias",
        f"{p}.intermediate.dense.weight",
        f"{p}.intermediate.dense.bias",
        f"{p}.output.LayerNorm.weight",
        f"{p}.output.LayerNorm.bias",
    ]
    assert shared_groups(g) == []
    # every parameter except the head is guarded exactly once
    every = [p for ps in g.values() for p in ps]
    assert len(every) == len(set(every))


def transformer_encoder_layer(x: str) -> list[Op]:
    """torch.nn.TransformerEncoderLayer (post-norm); MHA's in_proj writes q, k and v."""
    a = "layers.0.self_attn"
    return [
        Op(f"{a}.in_proj", (x,), ("q", "k", "v"), (f"{a}.in_proj_weight", f"{a}.in_proj_bias")),
        Op(f"{a}.scores", ("q", "k"), ("s",)),
        Op(f"{a}.softmax", ("s",), ("pr",)),
        Op(f"{a}.dropout", ("pr",), ("pd",), site=True),
        Op(f"{a}.context", ("pd", "v"), ("c",)),
        _lin(f"{a}.out_proj", "c", "ao"),
        Op("layers.0.dropout1", ("ao",), ("ad",), site=True),
        Op("layers.0.add1", ("ad", x), ("s1",)),
        _norm("layers.0.norm1", "s1", "h"),
        _lin("layers.0.linear1", "h", "m"),
        Op("layers.0.activation", ("m",), ("g",)),
        Op("layers.0.dropout", ("g",), ("gd",), site=True),
        _lin("layers.0.linear2", "gd", "o"),
        Op("layers.0.dropout2", ("o",), ("od",), site=True),
        Op("layers.0.add2", ("od", "h"), ("s2",)),
        _norm("layers.0.norm2", "s2", "y"),
    ]


def test_transformer_encoder_layer_sites_differ() -> None:
    ops = [Op("embed", ("ids",), ("x",), ("embed.weight",))] + transformer_encoder_layer("x")
    g = guarded(ops)
    a = "layers.0.self_attn"
    assert g[f"{a}.dropout"] == [f"{a}.in_proj_weight", f"{a}.in_proj_bias"]
    assert g["layers.0.dropout1"] == [
        f"{a}.out_proj.weight",
        f"{a}.out_proj.bias",
        "layers.0.norm1.weight",
        "layers.0.norm1.bias",
    ]
    assert g["layers.0.dropout"] == ["layers.0.linear1.weight", "layers.0.linear1.bias"]
    assert g["layers.0.dropout2"] == [
        "layers.0.linear2.weight",
        "layers.0.linear2.bias",
        "layers.0.norm2.weight",
        "layers.0.norm2.bias",
    ]
    assert shared_groups(g) == []


def llama_block(i: int, x: str) -> list[Op]:
    """Pre-norm decoder block with sites inserted on the residual branches."""
    p = f"model.layers.{i}"
    a = f"{p}.self_attn"
    m = f"{p}.mlp"
    return [
        _norm(f"{p}.input_layernorm", x, f"n{i}", bias=False),
        _lin(f"{a}.q_proj", f"n{i}", f"q{i}", bias=False),
        _lin(f"{a}.k_proj", f"n{i}", f"k{i}", bias=False),
        _lin(f"{a}.v_proj", f"n{i}", f"v{i}", bias=False),
        Op(f"{a}.scores", (f"q{i}", f"k{i}"), (f"s{i}",)),
        Op(f"{a}.softmax", (f"s{i}",), (f"pr{i}",)),
        Op(f"{a}.context", (f"pr{i}", f"v{i}"), (f"c{i}",)),
        _lin(f"{a}.o_proj", f"c{i}", f"ao{i}", bias=False),
        Op(f"{a}.dropout", (f"ao{i}",), (f"ad{i}",), site=True),
        Op(f"{p}.add1", (x, f"ad{i}"), (f"r{i}",), add=True),
        _norm(f"{p}.post_attention_layernorm", f"r{i}", f"pn{i}", bias=False),
        _lin(f"{m}.gate_proj", f"pn{i}", f"gp{i}", bias=False),
        Op(f"{m}.act", (f"gp{i}",), (f"ga{i}",)),
        _lin(f"{m}.up_proj", f"pn{i}", f"up{i}", bias=False),
        Op(f"{m}.mul", (f"ga{i}", f"up{i}"), (f"gu{i}",)),
        _lin(f"{m}.down_proj", f"gu{i}", f"do{i}", bias=False),
        Op(f"{m}.dropout", (f"do{i}",), (f"dd{i}",), site=True),
        Op(f"{p}.add2", (f"r{i}", f"dd{i}"), (f"y{i}",), add=True),
    ]


def test_llama_block_sites_guard_whole_branches() -> None:
    ops = [
        Op("model.embed_tokens", ("ids",), ("e",), ("model.embed_tokens.weight",)),
        Op("model.embed_tokens.dropout", ("e",), ("ed",), site=True),
    ]
    ops += llama_block(0, "ed") + llama_block(1, "y0")
    ops += [_norm("model.norm", "y1", "fn", bias=False), _lin("lm_head", "fn", "logits", False)]
    g = guarded(ops)
    assert g["model.embed_tokens.dropout"] == ["model.embed_tokens.weight"]
    p = "model.layers.1"
    assert sorted(g[f"{p}.self_attn.dropout"]) == sorted(
        [f"{p}.input_layernorm.weight"] + [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
    )
    # the final norm takes the last residual sum only: rule 3 gives it to the last branch
    assert sorted(g[f"{p}.mlp.dropout"]) == sorted(
        ["model.norm.weight", f"{p}.post_attention_layernorm.weight"]
        + [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    )
    q = "model.layers.0"
    assert sorted(g[f"{q}.mlp.dropout"]) == sorted(
        [f"{q}.post_attention_layernorm.weight"]
        + [f"{q}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    )
    assert shared_groups(g) == []


def test_an_activation_written_as_x_times_f_of_x_is_not_a_residual_join() -> None:
    from gd_core.dataflow import residual_joins

    ops = [
        _lin("fc", "x", "h"),
        Op("erf", ("h",), ("e",)),
        Op("mul", ("h", "e"), ("g",)),  # gelu(h) = h * (1 + erf(h)) / 2, decomposed
        _lin("out", "g", "y"),
    ]
    assert residual_joins(ops) == []


def test_sequential_mlp() -> None:
    g = guarded(
        chain(
            [
                ("0", ["0.weight", "0.bias"], False),
                ("1", [], False),
                ("2", [], True),
                ("3", ["3.weight", "3.bias"], False),
                ("4", [], True),
                ("5", ["5.weight"], False),
            ]
        )
    )
    assert g == {"2": ["0.weight", "0.bias"], "4": ["3.weight", "3.bias"]}


def test_insertion_points_of_a_llama_are_its_residual_branches() -> None:
    from gd_core.dataflow import insertion_points, residual_joins, with_sites

    ops = [Op("model.embed_tokens", ("ids",), ("e",), ("model.embed_tokens.weight",))]
    blocks = llama_block(0, "e") + llama_block(1, "y0")
    plain = [o for o in blocks if not o.site]
    # drop the sites of the test graph, rewiring their readers to the undropped tensors
    rename = {o.outputs[0]: o.inputs[0] for o in blocks if o.site}
    plain = [
        Op(
            o.name,
            [rename.get(t, t) for t in o.inputs],
            o.outputs,
            o.params,
            norm=o.norm,
            add=o.add,
        )
        for o in plain
    ]
    ops += plain
    assert len(residual_joins(ops)) == 4  # not the SwiGLU gate, not q @ k
    pts = insertion_points(ops)
    assert pts == ["e", "ao0", "do0", "ao1", "do1"]
    names = {t: f"site_{t}" for t in pts}
    g = guarded(with_sites(ops, names))
    assert sorted(g["site_ao1"]) == sorted(
        ["model.layers.1.input_layernorm.weight"]
        + [f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkvo"]
    )
    assert g["site_e"] == ["model.embed_tokens.weight"]
    assert shared_groups(g) == []


def test_a_forward_thousands_of_ops_deep_does_not_overflow_the_stack() -> None:
    """HRM (a recurrent forward) crashed ``sites`` with RecursionError: the walks were recursive,
    one Python frame per op on the path. A 5000-op chain between a join and its site."""
    depth = 5000
    ops = [
        Op("lin", ("x",), ("a",), ("lin.weight",)),
        Op("other", ("x",), ("z",), ("other.weight",)),
        Op("join", ("a", "z"), ("j0",), add=True),
    ]
    ops += [Op(f"step{i}", (f"j{i}",), (f"j{i + 1}",), (f"step{i}.weight",)) for i in range(depth)]
    ops.append(Op("drop", (f"j{depth}",), ("out",), site=True))
    got = guarded(ops)["drop"]
    assert len(got) == depth + 2
    assert got[0] == f"step{depth - 1}.weight" and {"lin.weight", "other.weight"} <= set(got)


def test_an_addition_with_no_learned_branch_is_not_a_residual_join() -> None:
    """A tanh GELU written op by op (keras_hub's Gemma: ``keras.activations.gelu(x,
    approximate=True)`` inside the block's call) adds ``x`` and ``0.044715 * x**3``: an addition
    of the stream and a tensor computed from it, but nothing learned lies between them, so it is
    no residual branch (issue 23: Keras sites inserted on it)."""
    from gd_core.dataflow import insertion_points, residual_joins

    ops = [
        _lin("fc", "x", "h"),
        Op("cube", ("h",), ("h3",)),
        Op("scale", ("h3",), ("c",)),
        Op("inner", ("h", "c"), ("u",), add=True),  # h + 0.044715 h^3
        Op("tanh", ("u",), ("t",)),
        Op("gelu", ("h", "t"), ("g",)),
        _lin("out", "g", "y"),
        Op("res", ("x", "y"), ("z",), add=True),  # a real residual: fc and out are learned
    ]
    assert residual_joins(ops) == [(7, "x", "y")]
    assert insertion_points(ops) == ["x", "y"]
