"""Per-sample squared gradient norms without per-sample gradients ("ghost norms").

A profile needs, per guarded tensor, the sum over samples of the squared per-sample gradient
summed over the tensor (site scores), and the same summed over each output unit's slice (unit
scores) -- not the element-level diagonal. For a linear layer whose per-sample gradient is
``W_i = X_i^T Y_i`` (``X_i``: T x p, ``Y_i``: T x q; for ``nn.Linear`` X is the output gradient
and Y the input, for Hugging Face ``Conv1D`` the other way round):

* ``||W_i||_F^2 = sum_{t,s} (x_t . x_s)(y_t . y_s) = <X X^T, Y Y^T>``: two T x T Gram matrices;
* per row ``j`` of ``W_i`` (axis 0): ``x_j^T (Y Y^T) x_j`` (``x_j`` the j-th column of X), i.e.
  ``sum_t ((Y Y^T) X)_{tj} X_{tj}``; per column (axis 1) the same with X and Y swapped.

That costs ``O(T^2 (p + q))`` per sample instead of ``O(T p q)`` (plus the element-wise passes
over ``p x q``) for materialised blocks. :func:`use_gram` picks the cheaper per call shape.
Biases, LayerNorm / RMSNorm weights (per-sample gradients of size d) and embedding rows (a
scatter sum over each sample's token ids, then squared) have cheap exact forms already. A
parameter used by several calls per sample (a module called twice, weight tying) gets its
per-sample gradient summed over the calls *before* squaring: linear-type calls concatenate their
tokens (``W_i = sum_c X_c^T Y_c = [X_1; X_2]^T [Y_1; Y_2]``), anything else (an embedding tied to
a linear head) takes materialised blocks summed over the calls.

Results per parameter (:class:`SqNorm`): ``total`` (0-d float64, the sum over samples of
``||g_i||^2``) and ``marginals[axis]`` (1-D float64: the sum over samples of the squared
per-sample gradient summed over every other axis). The engine is
:mod:`adapters.torch.persample`; this module holds the norm arithmetic and :class:`FisherNorms`,
the result type (the engine that feeds the small sums to the loop is
``adapters.torch.fisher._NormsEngine``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gd_core import FisherAccumulator, SensitivityProfile, Site
from gd_core.errors import bad_argument
from gd_core.sites import check_sites, unit_scores

__all__ = ["FisherNorms", "SqNorm", "use_gram"]

#: Cost, in multiply-adds, of the element-wise work on one element of a materialised block
#: (writing it, squaring it, summing it over samples: memory-bound passes over blocks larger
#: than the caches cost far more than one multiply-add of a matrix product). Rough, from
#: timing on MiniLM (n 16, 2 threads, loaded machine; docs/benchmarks.md): Gram products pay
#: off for the whole model at T = 64 and 128, blocks were 9% faster at T = 256; with 64 the rule
#: switches 384 x 384 weights to blocks from T ~ 240 and 384 x 1536 ones from T ~ 360.
ELEMENTWISE_COST = 64
#: The same for one element of the (T x features) products of the Gram route (cache-friendly).
GRAM_ELEMENTWISE_COST = 4

#: ``"auto"`` (the cost rule), ``"gram"`` or ``"blocks"``: forces one route for every
#: linear-type weight (tests use it to compare both routes); env ``GD_NORMS_ROUTE``.
ROUTE_ENV = "GD_NORMS_ROUTE"


@dataclass
class SqNorm:
    """Sum over samples of a parameter's squared per-sample gradient norm, and its marginals."""

    total: Any  # 0-d float64 tensor
    marginals: dict[int, Any] = field(default_factory=dict)  # axis -> 1-D float64 tensor


# --------------------------------------------------------------------------------------------
# cost rule
# --------------------------------------------------------------------------------------------


def gram_cost(t: int, p: int, q: int, axes: Iterable[int]) -> int:
    """Multiply-adds per sample of the Gram route for ``W = X^T Y`` (X: t x p, Y: t x q)."""
    k = max(1, len(set(axes) & {0, 1}))  # total only or one marginal: 1 pass; both: 2
    return k * t * t * (p + q) + GRAM_ELEMENTWISE_COST * t * (p + q)


def block_cost(t: int, p: int, q: int) -> int:
    """Multiply-adds per sample of materialising ``W_i`` (a batched product) and reducing it."""
    return t * p * q + ELEMENTWISE_COST * p * q


def route(t: int, p: int, q: int, axes: Iterable[int]) -> str:
    """``"gram"`` or ``"blocks"`` for one call shape (``GD_NORMS_ROUTE`` forces one)."""
    forced = os.environ.get(ROUTE_ENV, "auto")
    if forced in ("gram", "blocks"):
        return forced
    return "gram" if gram_cost(t, p, q, axes) < block_cost(t, p, q) else "blocks"


def use_gram(t: int, p: int, q: int, axes: Iterable[int] = (0,)) -> bool:
    """Whether the Gram route is cheaper than materialised blocks for this call shape.

    Example:
        >>> use_gram(64, 384, 1536), use_gram(1024, 384, 384)
        (True, False)
    """
    return route(t, p, q, axes) == "gram"


# --------------------------------------------------------------------------------------------
# accumulation inside the per-sample engine (``sess`` is its ``_Session``, ``st`` a ``_Param``)
# --------------------------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _acc(st: Any) -> SqNorm:
    torch = _torch()
    if not isinstance(st.norms, SqNorm):
        axes = tuple(st.norms or ())
        dev = st.param.device
        f64 = torch.float32 if dev.type == "mps" else torch.float64
        st.norms = SqNorm(
            torch.zeros((), dtype=f64, device=dev),
            {a: torch.zeros(int(st.param.shape[a]), dtype=f64, device=dev) for a in axes},
        )
    return st.norms


def _add_reduced(st: Any, sq: Any, lead: int) -> None:
    """Add ``sq`` (squared per-sample gradients summed over ``lead`` leading dims, then shaped
    like the parameter; consumed) to ``st``'s sums."""
    acc = _acc(st)
    f64 = acc.total.dtype
    if lead:
        sq = sq.sum(tuple(range(lead)))
    if sq.ndim == 0:  # a scalar parameter: no axis, the total only
        acc.total.add_(sq.to(f64))
        return
    total = None
    for a, m in acc.marginals.items():
        others = tuple(d for d in range(sq.ndim) if d != a)
        marg = (sq.sum(others) if others else sq).to(f64)  # (a float64 reduction is slow)
        m.add_(marg)
        total = marg.sum() if total is None else total
    acc.total.add_(sq.sum().to(f64) if total is None else total)


def add_full(st: Any, sq: Any) -> None:
    """Add a parameter-shaped sum of squared per-sample gradients (the exact fallback's)."""
    _add_reduced(st, sq, 0)


def _gram(st: Any, x: Any, y: Any) -> None:
    """Gram route for ``W_i = X_i^T Y_i`` (x: n x T x p, y: n x T x q)."""
    torch = _torch()
    acc = _acc(st)
    f64 = acc.total.dtype
    axes = set(acc.marginals)
    kx = ky = None
    if 0 in axes:
        ky = torch.bmm(y, y.transpose(1, 2))
        m0 = torch.bmm(ky, x).mul_(x).reshape(-1, x.shape[2]).sum(0).to(f64)
        acc.marginals[0].add_(m0)
    if 1 in axes:
        kx = torch.bmm(x, x.transpose(1, 2))
        m1 = torch.bmm(kx, y).mul_(y).reshape(-1, y.shape[2]).sum(0).to(f64)
        acc.marginals[1].add_(m1)
    if 0 in axes:
        acc.total.add_(m0.sum())
    elif 1 in axes:
        acc.total.add_(m1.sum())
    else:
        ky = torch.bmm(y, y.transpose(1, 2))
        kx = torch.bmm(x, x.transpose(1, 2))
        acc.total.add_(kx.mul_(ky).sum().to(f64))


def _blocks_xy(sess: Any, st: Any, x: Any, y: Any) -> None:
    """Materialised route for ``W_i = X_i^T Y_i``, a chunk of samples at a time."""
    torch = _torch()
    n, p, q = x.shape[0], x.shape[2], y.shape[2]
    step = sess._chunk(p * q)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = sess._scratch((hi - lo, p, q), x.dtype, x.device)
        torch.bmm(x[lo:hi].transpose(1, 2), y[lo:hi], out=block)
        _add_reduced(st, block.square_(), 1)


def _xy(sess: Any, call: Any, dtype: Any) -> tuple[Any, Any]:
    a, g = sess._factors(call, dtype)
    return (g, a) if call.kind == "linear" else (a, g)


def _linear_weight(sess: Any, st: Any, x: Any, y: Any) -> None:
    axes = tuple(_acc(st).marginals)
    if route(int(x.shape[1]), int(x.shape[2]), int(y.shape[2]), axes) == "gram":
        _gram(st, x, y)
    else:
        _blocks_xy(sess, st, x, y)


def _embedding(sess: Any, st: Any, call: Any) -> None:
    """Sparse route: each sample's gradient lives on the rows of the tokens it uses."""
    uniq, buf = sess.token_sums(call, st)
    num = st.param.shape[0]
    sq = buf.square_()
    acc = _acc(st)
    f64 = acc.total.dtype
    per_row = sq.sum(1).to(f64)
    if 0 in acc.marginals:
        acc.marginals[0].index_add_(0, uniq % num, per_row)
    if 1 in acc.marginals:
        acc.marginals[1].add_(sq.sum(0).to(f64))
    acc.total.add_(per_row.sum())


def _generic(sess: Any, st: Any, pairs: Sequence[tuple[Any, str]]) -> None:
    """Per-sample gradients materialised a chunk at a time (summed over the calls), reduced."""
    for _, _, block in sess.blocks(st, pairs):
        _add_reduced(st, block.square_(), 1)


def _wsum(sess: Any, st: Any, pairs: Sequence[tuple[Any, str]]) -> None:
    """``sum_i r_i g_i`` for ``verify=True`` (materialised blocks; verification only)."""
    torch = _torch()
    if st.wsum is None:
        st.wsum = torch.zeros(st.param.shape, dtype=st.dtype, device=st.param.device)
    for lo, hi, block in sess.blocks(st, pairs):
        st.wsum.add_(torch.tensordot(sess.r[lo:hi].to(block.dtype), block, dims=1))


def _finish(sess: Any, st: Any, pairs: Sequence[tuple[Any, str]]) -> None:
    if sess.r is not None:
        _wsum(sess, st, pairs)
    # the verification's scale, and what the engine hands back in place of a full-size sum
    # (which it would otherwise allocate zero-filled for every parameter)
    st.sq = _acc(st).total


def process_single(sess: Any, st: Any, call: Any, role: str) -> None:
    """One call of a parameter used once per sample."""
    _acc(st)
    if call.kind in ("linear", "conv1d") and role == "weight":
        _linear_weight(sess, st, *_xy(sess, call, st.dtype))
    elif call.kind == "embedding":
        _embedding(sess, st, call)
    else:
        _generic(sess, st, [(call, role)])
    _finish(sess, st, [(call, role)])


def process_multi(sess: Any, st: Any) -> None:
    """A parameter used by several calls per sample: per-sample gradients summed over the
    calls before squaring."""
    torch = _torch()
    pending, st.pending = st.pending, []
    _acc(st)
    linear = all(c.kind in ("linear", "conv1d") and r == "weight" for c, r in pending)
    if linear:
        xs, ys = zip(*(_xy(sess, c, st.dtype) for c, _ in pending), strict=True)
        _linear_weight(sess, st, torch.cat(xs, 1), torch.cat(ys, 1))
    else:
        _generic(sess, st, pending)
    _finish(sess, st, pending)
    for call, _ in pending:
        call.release()


def result(st: Any) -> SqNorm:
    """The final :class:`SqNorm` of one parameter (the exact fallback's full sums reduced)."""
    if (
        st.fallback is not None
        and st.sq is not None
        and tuple(st.sq.shape) == tuple(st.param.shape)
    ):
        axes = tuple(st.norms.marginals) if isinstance(st.norms, SqNorm) else tuple(st.norms or ())
        st.norms = axes
        add_full(st, st.sq)
    return _acc(st)


def resolve_axes(
    names: Sequence[str], shapes: Mapping[str, Sequence[int]], norms: Any
) -> dict[str, tuple[int, ...]]:
    """``norms=True``: every axis of every parameter; a mapping: the axes it lists."""
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        nd = len(shapes[name])
        if norms is True:
            axes: Iterable[int] = range(nd)
        elif isinstance(norms, Mapping):
            axes = norms.get(name, ())
        else:
            raise bad_argument(
                "norms", "False, True or {parameter name: axes}", type(norms).__name__, "pass True"
            )
        clean = []
        for a in axes:
            a = int(a)
            a2 = a + nd if a < 0 else a
            if not 0 <= a2 < max(nd, 1):
                raise bad_argument(
                    f"norms[{name!r}]", f"axes of a {nd}-d tensor", a, "pass e.g. (0,)"
                )
            if a2 not in clean:
                clean.append(a2)
        out[name] = tuple(sorted(clean))
    return out


# --------------------------------------------------------------------------------------------
# results and the estimator loop
# --------------------------------------------------------------------------------------------

_SEP = ":"


def keys_of(name: str, axes: Sequence[int]) -> list[str]:
    """The accumulator keys of parameter ``name``: its total, then one per axis."""
    return [f"{name}{_SEP}sum"] + [f"{name}{_SEP}axis{a}" for a in axes]


def param_of(key: str) -> str:
    """The parameter an accumulator key (:func:`keys_of`) belongs to."""
    return key.rpartition(_SEP)[0]


def flatten(sums: Mapping[str, SqNorm]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in sums.items():
        out[f"{name}{_SEP}sum"] = s.total
        for a, m in s.marginals.items():
            out[f"{name}{_SEP}axis{a}"] = m
    return out


class FisherNorms(dict):  # type: ignore[type-arg]
    """What ``estimate_fisher(..., output="norms")`` returns: ``{parameter name: the sum of its
    Fisher diagonal}`` (= the mean over samples of the squared per-sample gradient norm), plus

    * ``marginals[name][axis]``: the Fisher diagonal summed over every other axis (float64),
      for the axes computed (by default each parameter's output-unit axis);
    * ``shapes[name]``, ``count``, ``skipped`` and ``accumulator`` (a
      :class:`gd_core.FisherAccumulator` holding these small sums, to save, merge or resume).

    Example:
        >>> import numpy as np
        >>> acc = FisherAccumulator()
        >>> acc.metadata["norm_shapes"] = {"w": [2, 3]}
        >>> acc.add({"w:sum": np.array(12.0), "w:axis0": np.array([4.0, 8.0])}, n=2)
        True
        >>> r = FisherNorms.from_accumulator(acc)
        >>> r["w"], r.marginals["w"][0].tolist(), r.stats()["w"]
        (6.0, [2.0, 4.0], (1.0, 6))
    """

    marginals: dict[str, dict[int, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    count: int
    skipped: int
    accumulator: FisherAccumulator

    @classmethod
    def from_accumulator(cls, acc: FisherAccumulator) -> FisherNorms:
        shapes = {k: tuple(int(d) for d in v) for k, v in acc.metadata["norm_shapes"].items()}
        means = acc.mean()
        out = cls()
        out.marginals = {}
        for name in shapes:
            out[name] = float(means[f"{name}{_SEP}sum"])
            out.marginals[name] = {}
        for key, arr in means.items():
            name, _, what = key.rpartition(_SEP)
            if what.startswith("axis") and name in out.marginals:
                out.marginals[name][int(what[4:])] = np.asarray(arr, dtype=np.float64)
        out.shapes = shapes
        out.count = acc.count
        out.skipped = acc.skipped
        out.accumulator = acc
        return out

    def stats(self) -> dict[str, tuple[float, int]]:
        """Per-tensor (mean Fisher, element count): what site scores aggregate."""
        out = {}
        for name, total in self.items():
            size = int(np.prod(self.shapes[name], dtype=np.int64))
            out[name] = (float(total) / size if size else 0.0, size)
        return out

    def slice_means(self, name: str, axis: int) -> np.ndarray:
        """Mean Fisher of each slice along ``axis`` (what unit scores average)."""
        shape = self.shapes[name]
        m = self.marginals[name].get(axis)
        if m is None:
            raise bad_argument(
                f"unit axis {axis} of {name!r}",
                f"one of the axes computed ({sorted(self.marginals[name])})",
                axis,
                f"pass norm_axes={{{name!r}: ({axis},)}} to estimate_fisher",
            )
        size = int(np.prod(shape, dtype=np.int64))
        return m / (size // int(shape[axis]) if size else 1)

    def __repr__(self) -> str:
        return f"FisherNorms(parameters={len(self)}, count={self.count}, skipped={self.skipped})"


def profile_from_norms(
    norms: FisherNorms,
    sites: Sequence[Site],
    **options: Any,
) -> SensitivityProfile:
    """What ``SensitivityProfile.from_fisher`` builds from a full diagonal, from norms;
    ``options`` are ``SensitivityProfile.from_stats``' keywords (aggregation, mapping,
    fingerprint, metadata)."""
    sites_t = tuple(check_sites(sites))
    all_stats = norms.stats()
    guarded = {p for s in sites_t for p in s.params}
    # every tensor estimated, not only the guarded ones: LoRA rates read the others
    stats = {p: all_stats[p] for p in (*guarded, *all_stats) if p in all_stats}
    units: dict[str, np.ndarray] = {}
    for s in sites_t:
        if not s.unit_axes:
            continue
        shaped = {}  # slice means shaped so that gd_core.unit_scores averages them unchanged
        for p, axis in s.unit_axes.items():
            nd = max(len(norms.shapes[p]), 1)
            shape = [1] * nd
            means = norms.slice_means(p, axis)
            shape[axis] = means.shape[0]
            shaped[p] = means.reshape(shape)
        u = unit_scores(shaped, s)
        if u is not None:
            units[s.name] = u
    return SensitivityProfile.from_stats(stats, sites_t, units, **options)


def default_axes(
    root: Any, names: Sequence[str], features: Callable[[Any], Any], extra: Any = ()
) -> dict[str, tuple[int, ...]]:
    """Each parameter's output-unit axis (the torch adapter's ``_features`` rule), plus the
    ``(name, axis)`` pairs in ``extra`` (unit axes of sites given explicitly)."""
    owner: dict[int, tuple[Any, str]] = {}
    for mod in root.modules():
        for leaf, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod, leaf))
    params = dict(root.named_parameters())
    out: dict[str, set[int]] = {n: set() for n in names}
    for n in names:
        mod, leaf = owner[id(params[n])]
        feats = features(mod)
        if feats is not None and leaf in feats[1]:
            out[n].add(int(feats[1][leaf]))
    for n, a in extra:
        if n in out:
            out[n].add(int(a))
    return {n: tuple(sorted(a)) for n, a in out.items()}
