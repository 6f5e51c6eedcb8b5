"""Which parameters a dropout site guards, decided by dataflow: one rule for every framework.

Adapters describe a model as a list of :class:`Op` — one computation each (a torch module call, a
Keras layer call, an ONNX node), with the tensors it reads and writes, the canonical names of the
parameters it owns, and whether it *is* a dropout site or a normalisation. :func:`guarded` applies
the rule below and returns, for every site, the canonical parameter names it guards. The rule
knows nothing about BERT, Llama or any framework; it only sees tensors and who produces and
consumes them.

**The rule.** A site guards the parameters of the computation whose output it drops:

1. *Backward*: walk from the tensor the site receives to the ops that produced it, collecting their
   parameters, and stop at
   - another site's output (a layer reading it, like ``linear2`` after the FFN's inner dropout,
     is still collected), or an op that *joins* another site's output with something else
     (e.g. ``probs_dropped @ V``): that op and its other operands belong to the earlier site;
   - a *residual branch point*: a tensor that is also joined with something else by an op that
     does not lead to this site (the residual stream, read by the skip connection's add);
   - the output of a norm that rule 3 gives to an earlier site;
   - graph inputs.
   A tensor read only by ops that all lead to the site (the hidden state feeding Q, K and V of one
   attention) is inside the computation, so a pre-norm block's input norm belongs to its branch.
2. *Forward, at the join*: when the dropped tensor (possibly reshaped) is read by exactly one op
   that combines it with other tensors, the parameters producing those other operands (walked
   back with the same stops) are guarded too: attention-probability dropout guards V as well as
   Q and K, because V is what the dropped probabilities multiply.
3. *Post-norm*: when that join is a residual add whose sum goes into a normalisation
   (``LayerNorm(x + dropout(branch(x)))``), the norm is guarded by the site. The norm rescales
   exactly the sum the site has just perturbed; its output is a branch point, so no site
   downstream reaches it by rule 1, and without rule 3 it would guard nothing.

For BERT this gives the paper's grouping (embeddings + embedding LayerNorm; Q/K/V for attention
probabilities; attention output dense + its LayerNorm; FFN dense layers + their LayerNorm), for
torch's ``nn.TransformerEncoderLayer`` ``dropout1 -> self_attn.out_proj + norm1`` and
``dropout2 -> linear2 + norm2``, and for a Llama block with inserted sites the whole attention
branch (input norm, Q/K/V/O) and the whole MLP branch (post-attention norm, gate/up/down).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import bad_argument


@dataclass(frozen=True)
class Op:
    """One computation in a model's dataflow graph.

    Attributes:
        name: canonical name (the module path, e.g. ``encoder.layer.0.output.dense``).
        inputs: ids of the tensors it reads (any hashable strings, unique per tensor).
        outputs: ids of the tensors it writes.
        params: canonical names of the parameters it owns.
        site: True when the op is a dropout site (its name is the site name).
        norm: True for a normalisation (LayerNorm, RMSNorm): rule 3 attributes it.
        add: True for an addition (only an addition can be a residual join, so that ``x * f(x)``
            in a decomposed activation is not taken for one).
        softmax: True for a softmax (or an attention kernel's scores, which it normalises): a
            site dropping its output is attention-probability dropout (:func:`attention_sites`).
    """

    name: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    site: bool = False
    norm: bool = False
    add: bool = False
    softmax: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "params", tuple(self.params))


@dataclass
class _Graph:
    ops: list[Op]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, op in enumerate(self.ops):
            for t in op.outputs:
                if t in self.producer:
                    raise bad_argument(
                        "ops",
                        "each tensor written by one op",
                        t,
                        "give every op output a unique tensor id",
                    )
                self.producer[t] = i
            for t in op.inputs:
                self.consumers.setdefault(t, []).append(i)


def _is_view(op: Op) -> bool:
    """A parameter-free, one-input op that is not a site (reshape, transpose, cast...)."""
    return not op.site and not op.params and len(op.inputs) == 1 and not op.norm


def _site_tensors(g: _Graph) -> set[str]:
    """Site outputs, and what param-free one-input ops make of them (views of dropped tensors)."""
    tainted: set[str] = set()
    for op in g.ops:  # ops are in execution order
        if op.site or (_is_view(op) and op.inputs[0] in tainted):
            tainted.update(op.outputs)
    return tainted


def _next_ops(g: _Graph, idx: int, target: int) -> list[int]:
    """The readers of op ``idx``'s outputs that can still lead to ``target`` (ops are in execution
    order, so a reader after ``target`` cannot); none past a site."""
    if g.ops[idx].site:
        return []
    return [c for t in g.ops[idx].outputs for c in g.consumers.get(t, []) if c <= target]


def _leads_to(g: _Graph, start: int, target: int, memo: dict[tuple[int, int], bool]) -> bool:
    """Whether op ``start``'s output reaches op ``target`` without passing through a site.

    Iterative (a long recurrent forward, HRM's, is thousands of ops deep: recursion overflowed);
    every op explored without reaching ``target`` is remembered as not leading there."""
    if start == target:
        return True
    if start > target:
        return False
    key = (start, target)
    if key in memo:
        return memo[key]
    memo[key] = False
    stack = [(start, iter(_next_ops(g, start, target)))]
    while stack:
        for c in stack[-1][1]:
            hit = c == target or memo.get((c, target), False)
            if hit:
                for node, _ in stack:
                    memo[(node, target)] = True
                return True
            if (c, target) in memo:
                continue  # explored: does not lead there
            memo[(c, target)] = False
            stack.append((c, iter(_next_ops(g, c, target))))
            break
        else:
            stack.pop()
    return False


class _Walker:
    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.tainted = _site_tensors(g)
        self.memo: dict[tuple[int, int], bool] = {}
        self.claimed: set[str] = set()  # outputs of norms attributed by rule 3
        for i, op in enumerate(g.ops):
            if op.site:
                norm = self._post_norm(i)
                if norm is not None:
                    self.claimed.update(g.ops[norm].outputs)

    def _join_of(self, idx: int) -> tuple[int, str] | None:
        """(index of the op that joins site ``idx``'s dropped tensor, the tensor it reads)."""
        g = self.g
        op = g.ops[idx]
        if not op.outputs:
            return None
        t = op.outputs[0]
        while True:
            readers = g.consumers.get(t, [])
            if len(readers) != 1:
                return None  # unused, or a branch point: nothing is joined
            nxt = g.ops[readers[0]]
            if _is_view(nxt) and nxt.outputs:
                t = nxt.outputs[0]
                continue
            if len(nxt.inputs) < 2 or nxt.site:
                return None
            return readers[0], t

    def _post_norm(self, idx: int) -> int | None:
        """The norm that takes the output of site ``idx``'s join, if it is that join's only
        reader (rule 3)."""
        j = self._join_of(idx)
        if j is None or not self.g.ops[j[0]].outputs:
            return None
        sums = self.g.consumers.get(self.g.ops[j[0]].outputs[0], [])
        return sums[0] if len(sums) == 1 and self.g.ops[sums[0]].norm else None

    def back(self, tensor: str, target: int, out: list[str], seen: set[str]) -> None:
        """Collect parameters upstream of ``tensor`` for the computation ending at ``target``
        (depth first, inputs in order; iterative, for forwards thousands of ops deep)."""
        g = self.g
        todo = [tensor]
        while todo:
            tensor = todo.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor not in g.producer or tensor in self.tainted:
                continue
            if tensor in self.claimed:
                continue  # the norm after an earlier site's residual add (rule 3) is that site's
            readers = g.consumers.get(tensor, [])
            if any(len(g.ops[r].inputs) > 1 and not self._leads(r, target) for r in readers):
                continue  # a residual branch point: joined with something outside this computation
            op = g.ops[g.producer[tensor]]
            if op.site:
                continue
            if len(op.inputs) > 1 and any(t in self.tainted for t in op.inputs):
                continue  # the join where another site's output is used belongs to that site
            for p in op.params:
                if p not in out:
                    out.append(p)
            todo.extend(reversed(op.inputs))

    def _leads(self, reader: int, target: int) -> bool:
        return _leads_to(self.g, reader, target, self.memo)

    def site_params(self, idx: int) -> list[str]:
        g = self.g
        op = g.ops[idx]
        out: list[str] = []
        seen: set[str] = set()
        for src in op.inputs:  # rule 1
            self.back(src, idx, out, seen)
        j = self._join_of(idx)
        if j is None:
            return out
        join, t = j
        for other in g.ops[join].inputs:  # rule 2
            if other != t and len(g.consumers.get(other, [])) == 1:  # not a residual stream
                self.back(other, join, out, seen)
        norm = self._post_norm(idx)
        for p in g.ops[join].params + (g.ops[norm].params if norm is not None else ()):
            if p not in out:
                out.append(p)
        return out


def guarded(ops: Sequence[Op]) -> dict[str, list[str]]:
    """Apply the rule: ``{site name: [guarded parameter names]}`` for every site, in order.

    ``ops`` must be in execution order (a topological order of the graph). A site may be called
    more than once (several site ops with one name: a dropout module used twice, a layer shared
    across depths): it guards the union of what each call guards.

    Example — ``Linear -> Dropout -> Linear -> Dropout``:
        >>> ops = [
        ...     Op("0", ["x"], ["a"], ["0.weight", "0.bias"]),
        ...     Op("1", ["a"], ["b"], site=True),
        ...     Op("2", ["b"], ["c"], ["2.weight"]),
        ...     Op("3", ["c"], ["d"], site=True),
        ... ]
        >>> guarded(ops)
        {'1': ['0.weight', '0.bias'], '3': ['2.weight']}
    """
    g = _Graph(list(ops))
    w = _Walker(g)
    out: dict[str, list[str]] = {}
    for i, op in enumerate(g.ops):
        if op.site:  # a site is a rate holder: every call of it adds what that call guards
            group = out.setdefault(op.name, [])
            group.extend(p for p in w.site_params(i) if p not in group)
    return out


def shared_groups(groups: dict[str, list[str]]) -> list[tuple[str, ...]]:
    """Sites whose guarded groups are identical (non-empty): the symptom of a rule that failed to
    tell them apart. Each entry lists the sites sharing one group.

    Example:
        >>> shared_groups({"a": ["w"], "b": ["w"], "c": ["v"]})
        [('a', 'b')]
    """
    by: dict[tuple[str, ...], list[str]] = {}
    for site, params in groups.items():
        if params:
            by.setdefault(tuple(sorted(params)), []).append(site)
    return [tuple(v) for v in by.values() if len(v) > 1]


def chain(names: Iterable[tuple[str, Sequence[str], bool]]) -> list[Op]:
    """Ops for a plain feed-forward chain ``(name, params, is_site)``, each reading the previous
    one's output (an ``nn.Sequential``).

    Example:
        >>> [o.inputs for o in chain([("0", ["0.weight"], False), ("1", [], True)])]
        [('t0',), ('t1',)]
    """
    out = []
    for i, (name, params, site) in enumerate(names):
        out.append(Op(name, (f"t{i}",), (f"t{i + 1}",), tuple(params), site=site))
    return out


def residual_joins(ops: Sequence[Op]) -> list[tuple[int, str, str]]:
    """Residual adds: ``(op index, stream tensor, branch tensor)`` for every addition that joins
    a tensor ``s`` read by other ops too (the stream) with a tensor computed from ``s`` (the
    branch), in execution order. Gating (``gate * up``), attention (``q @ k``) and activations
    written as ``x * f(x)`` are not residual: they are not additions; nor is an addition whose
    branch computes nothing learned from the stream (no op with parameters between them: the
    ``x + 0.044715 * x**3`` of a tanh GELU written out op by op).

    Example — ``y = x + f(x)``:
        >>> ops = [Op("f", ["x"], ["b"], ["f.weight"]), Op("add", ["x", "b"], ["y"], add=True)]
        >>> residual_joins(ops)
        [(1, 'x', 'b')]
    """
    g = _Graph(list(ops))
    memo: dict[tuple[int, int], bool] = {}
    out = []
    for i, op in enumerate(g.ops):
        if len(op.inputs) != 2 or op.site or not op.add:
            continue
        for s, b in (op.inputs, op.inputs[::-1]):
            others = [r for r in g.consumers.get(s, []) if r != i]
            if not others or b not in g.producer:
                continue
            if any(_leads_to(g, r, g.producer[b], memo) for r in others) and _learned(
                g, s, b, others, memo
            ):
                out.append((i, s, b))
                break
    return out


def _learned(
    g: _Graph, stream: str, branch: str, readers: list[int], memo: dict[tuple[int, int], bool]
) -> bool:
    """Whether an op with parameters lies between ``stream`` and ``branch`` (walked back from
    the branch, through ops the stream reaches)."""
    todo, seen = [branch], {stream}
    while todo:
        t = todo.pop()
        if t in seen or t not in g.producer:
            continue
        seen.add(t)
        idx = g.producer[t]
        if not any(_leads_to(g, r, idx, memo) for r in readers):
            continue  # not computed from the stream
        if g.ops[idx].params:
            return True
        todo.extend(g.ops[idx].inputs)
    return False


def insertion_points(ops: Sequence[Op]) -> list[str]:
    """Where a dropout-free model gets sites, as tensor ids in execution order: the start of the
    residual stream (the embedding output) and every residual branch before its add (each
    attention and MLP block's output), the places of GPT-2's ``embd_pdrop`` and ``resid_pdrop``.

    Example:
        >>> ops = [
        ...     Op("embed", ["ids"], ["x"], ["embed.weight"]),
        ...     Op("f", ["x"], ["b"], ["f.weight"]),
        ...     Op("add", ["x", "b"], ["y"], add=True),
        ... ]
        >>> insertion_points(ops)
        ['x', 'b']
    """
    joins = residual_joins(ops)
    if not joins:
        return []
    return [joins[0][1], *[b for _, _, b in joins]]


def with_sites(ops: Sequence[Op], at: dict[str, str]) -> list[Op]:
    """``ops`` with a site op ``at[t]`` inserted on each tensor ``t`` (its readers read the
    dropped tensor instead): the graph as it will be once the sites are installed.

    Example:
        >>> ops = with_sites([Op("f", ["x"], ["a"], ["w"]), Op("g", ["a"], ["b"])], {"a": "f.drop"})
        >>> [(o.name, o.inputs, o.site) for o in ops]
        [('f', ('x',), False), ('f.drop', ('a',), True), ('g', ('a#f.drop',), False)]
    """
    renamed = {t: f"{t}#{name}" for t, name in at.items()}
    out: list[Op] = []
    for op in ops:
        ins = tuple(renamed.get(t, t) for t in op.inputs)
        out.append(Op(op.name, ins, op.outputs, op.params, op.site, op.norm, op.add, op.softmax))
        for t in op.outputs:
            if t in at:
                out.append(Op(at[t], (t,), (renamed[t],), site=True))
    return out


def attention_sites(ops: Sequence[Op]) -> set[str]:
    """Sites that drop attention probabilities: every call of them drops a softmax output
    (possibly cast, reshaped or transposed), decided from the dataflow, never from names. Such a
    site drops one entry per (query, key) pair, so it has no hidden units.

    Example:
        >>> ops = [
        ...     Op("s", ["q"], ["a"], softmax=True), Op("drop", ["a"], ["b"], site=True),
        ...     Op("f", ["b"], ["c"], ["f.weight"]), Op("out", ["c"], ["d"], site=True),
        ... ]
        >>> sorted(attention_sites(ops))
        ['drop']
    """
    g = _Graph(list(ops))
    verdict: dict[str, bool] = {}
    for op in g.ops:
        if not op.site:
            continue
        t = op.inputs[0] if op.inputs else None
        probs = False
        while t is not None and t in g.producer:
            src = g.ops[g.producer[t]]
            if src.softmax:
                probs = True
                break
            t = src.inputs[0] if _is_view(src) else None
        verdict[op.name] = verdict.get(op.name, True) and probs
    return {name for name, probs in verdict.items() if probs}
