"""The zoo sweep's ONNX column (invariant e, issue 24): one torch profile, every export.

For a zoo model and the torch profile the sweep built for it (re-scored so that every site gets
its own distinct p, the sweep's :func:`tests.zoo.invariants.distinct_rates`), each export

- ``e-train``: TorchScript exporter (``dynamo=False``), training mode, no constant folding;
- ``e-eval``: TorchScript exporter, eval mode (no Dropout node: ``adapters.onnx`` inserts them);
- ``e-dynamo``: torch's default exporter (``dynamo=True``, needs onnxscript), eval mode, on the
  representative subset of :data:`tests.zoo.sample.ONNX_SUBSET`

is given ``adapters.onnx.apply(graph, torch_profile)`` and checked site by site: every torch site's
p (what ``adapters.torch.apply`` installs with the same profile) is carried by the ONNX Dropout
nodes guarding the same parameters (``report.matched``; a pair the library placed by largest overlap passes with a
note, one placed by name alone on a site guarding other parameters fails), no ONNX site is left
over, and nothing but Dropout nodes (and the constants that fed their old ratios) changed.

A model the exporter cannot export is ``not exportable`` with the exporter's reason (a verdict
``skip``: not a failure of the library); the column's pass rate is over the exportable classes.
Exports are capped in time per class (:data:`CAP`); a column over the cap says so (``skip``,
``time cap``) and is listed apart in the summary.
"""

from __future__ import annotations

import copy
import io
import re
import signal
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

COLUMNS = {
    "e-train": "ONNX training-mode export (TorchScript) carries torch's p site by site",
    "e-eval": "ONNX eval-mode export (TorchScript) carries torch's p site by site",
    "e-dynamo": "ONNX default (dynamo) export carries torch's p site by site (subset)",
}
#: seconds the three exports, applies and checks of one class may take together
CAP = 60
NOT_EXPORTABLE = "not exportable"
TIME_CAP = "time cap"
TOL = 1e-6


class _OverCap(BaseException):
    """The column of one class ran past :data:`CAP` (a ``BaseException``: nothing catches it)."""


@contextmanager
def _cap(seconds: float) -> Iterator[None]:
    """Raise :class:`_OverCap` after ``seconds``; an outer ``signal.alarm`` (the sweep's per-class
    limit) is kept: it fires when it would have, whichever comes first."""
    outer_left = signal.alarm(0)
    started = time.monotonic()
    if outer_left and outer_left <= seconds:
        signal.alarm(outer_left)  # the outer limit comes first: leave its handler in charge
        yield
        return

    def over(signum: int, frame: Any) -> None:
        raise _OverCap

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.alarm(max(1, int(outer_left - (time.monotonic() - started))))


def distinct_profile(prof: Any, rates: dict[str, float]) -> Any:
    """``prof`` re-scored so that its mapping gives each site exactly ``rates[site]`` (distinct
    rates, none equal to an old one): ``linear_score`` between the smallest and largest rate of
    scores ``largest - rate`` (Fisher scores are non-negative)."""
    import numpy as np

    wanted = np.array([rates[s.name] for s in prof.sites], dtype=np.float64)
    mapping = {
        "name": "linear_score",
        "p_lower": float(wanted.min()),
        "p_upper": float(wanted.max()),
        "target_mean": None,
    }
    return replace(prof, scores=wanted.max() - wanted).with_mapping(mapping)


def distinct_weights(model: Any, seed: int = 0) -> Any:
    """A copy of ``model`` whose float parameters and buffers all differ: a tiny random model
    starts every LayerNorm at ones and zeros and many biases at zeros, and the TorchScript
    exporter's eval mode merges equal initializers into one (named after the first), which a
    pretrained model never has. Tied parameters stay tied (one tensor)."""
    import torch

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return out


def _short(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc))
    return f"{type(exc).__name__}: {text[:240]}"


@contextmanager
def _no_exporter_log() -> Iterator[None]:
    """Keep the TorchScript exporter's C++ log off: its ``setup_onnx_logging`` tests the function
    object ``_jit_is_onnx_log_enabled`` (always true), so every export turns the log on, and an
    export that fails then prints its whole IR graph (megabytes over the sweep)."""
    import torch

    switch = torch._C._jit_set_onnx_log_enabled
    torch._C._jit_set_onnx_log_enabled = lambda on: switch(False)
    try:
        yield
    finally:
        torch._C._jit_set_onnx_log_enabled = switch
        switch(False)


def _export(model: Any, batch: Any, how: str) -> Any:
    import onnx
    import torch

    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "e-dynamo":
            model.eval()
            prog = torch.onnx.export(model, (), kwargs=dict(batch), dynamo=True, verbose=False)
            return prog.model_proto
        buf = io.BytesIO()
        mode = (
            torch.onnx.TrainingMode.TRAINING if how == "e-train" else torch.onnx.TrainingMode.EVAL
        )
        if how == "e-train":
            model.train()
        else:
            model.eval()
        with _no_exporter_log():
            torch.onnx.export(
                model,
                (),
                buf,
                kwargs=dict(batch),
                training=mode,
                do_constant_folding=False,
                dynamo=False,
            )
        return onnx.load_from_string(buf.getvalue())


def _others(graph: Any) -> Counter[str]:
    """Op types of the nodes ``apply`` must not change (all but Dropout and Constant)."""
    return Counter(n.op_type for n in graph.graph.node if n.op_type not in ("Dropout", "Constant"))


def compare(torch_p: dict[str, float], graph: Any, placed: Any) -> Any:
    """The verdict of one export: ``placed`` is ``adapters.onnx.apply(graph, profile)``'s report."""
    from tests.zoo.invariants import Verdict, _few

    matched = dict(placed.matched or {})
    onnx_p = {matched.get(s, s): p for s, p in placed.probabilities().items()}
    absent = [s for s in torch_p if s not in onnx_p]
    differ = {
        s: (p, onnx_p[s]) for s, p in torch_p.items() if s in onnx_p and abs(onnx_p[s] - p) > TOL
    }
    extra = [s for s in onnx_p if s not in torch_p]
    # a pair placed by name only must guard what the torch site guards; one placed by largest
    # overlap is the site guarding the same parameters, up to what the exporter moved (a note)
    loose = {
        pair.profile_site: f"{len(pair.missing)} not guarded, {len(pair.extra)} more"
        for pair in getattr(placed, "pairs", [])
        if pair.how == "name" and (pair.missing or pair.extra)
    }
    overlap = [p.profile_site for p in getattr(placed, "pairs", []) if p.how == "overlap"]
    before, after = _others(graph), _others(placed.model)
    changed = {k: (before[k], after[k]) for k in before | after if before[k] != after[k]}
    agree = len(torch_p) - len(absent) - len(differ)
    if not absent and not differ and not extra and not changed and not loose:
        more = f"; {len(overlap)} by overlap: {_few(overlap, 2)}" if overlap else ""
        return Verdict("pass", f"{agree}/{len(torch_p)} sites agree{more}")
    parts = [f"{agree}/{len(torch_p)} torch sites agree"]
    if absent:
        why = placed.absent_reasons or {}
        shown = [f"{s} ({why[s]})" if s in why else s for s in absent]
        parts.append(f"absent in ONNX: {_few(shown)}")
    if differ:
        parts.append(f"other p: {_few(differ)}")
    if extra:
        parts.append(f"ONNX-only sites: {_few(extra)}")
    if loose:
        parts.append(f"placed by name on a site guarding other parameters: {_few(loose)}")
    if changed:
        parts.append(f"other nodes changed (op: before, after): {_few(changed)}")
    return Verdict("fail", "; ".join(parts))


def check(
    model: Any, batch: Any, prof: Any, rates: dict[str, float], *, dynamo: bool, cap: float = CAP
) -> dict[str, Any]:
    """``{column: Verdict}`` for ``model`` (not changed) and the sweep's torch profile ``prof``."""
    from tests.zoo.invariants import Verdict

    try:
        import onnx  # noqa: F401

        import adapters.onnx as gdo
    except ImportError as exc:
        return {
            k: Verdict("skip", f"the ONNX column needs the onnx extra ({exc})") for k in COLUMNS
        }
    import adapters.torch as gdt

    out: dict[str, Any] = {}
    wanted = ["e-train", "e-eval"] + (["e-dynamo"] if dynamo else [])
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            wanted.remove("e-dynamo")
            out["e-dynamo"] = Verdict("skip", f"the dynamo exporter needs onnxscript ({exc})")
    else:
        out["e-dynamo"] = Verdict("skip", "not in the dynamo subset")
    start = time.monotonic()
    current = ""
    model = distinct_weights(model)
    try:
        with _cap(cap):
            prof_d = distinct_profile(prof, rates)
            with warnings.catch_warnings():  # what these warn is recorded by invariants a-d
                warnings.simplefilter("ignore")
                torch_p = gdt.apply(copy.deepcopy(model), prof_d).probabilities()
            for how in wanted:
                current = how
                try:
                    graph = _export(model, batch, how)
                except Exception as exc:  # noqa: BLE001 - a model the exporter cannot export
                    out[how] = Verdict("skip", f"{NOT_EXPORTABLE}: {_short(exc)}")
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        placed = gdo.apply(graph, prof_d)
                except Exception as exc:  # noqa: BLE001 - the column records it
                    out[how] = Verdict("fail", f"adapters.onnx.apply: {_short(exc)}")
                    continue
                out[how] = compare(torch_p, graph, placed)
    except _OverCap:
        spent = time.monotonic() - start
        for how in wanted:
            if how not in out:
                at = " (in this export)" if how == current else ""
                out[how] = Verdict("skip", f"{TIME_CAP}: the column's {cap:g} s ran out{at}")
        out["_seconds"] = round(spent, 1)
    return out


def tally(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per column: passes, failures, not exportable, over the time cap, not run."""
    out: dict[str, dict[str, int]] = {}
    for k in COLUMNS:
        c: Counter[str] = Counter()
        for r in rows:
            status, reason = r.get("verdicts", {}).get(k, ["skip", ""])
            if status in ("pass", "fail"):
                c[status] += 1
            elif reason.startswith(NOT_EXPORTABLE):
                c["not exportable"] += 1
            elif reason.startswith(TIME_CAP):
                c["time cap"] += 1
            else:
                c["not run"] += 1
        out[k] = dict(c)
    return out


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """docs/zoo.md's ONNX column table: pass rate over the exportable classes."""
    lines = [
        "## The ONNX column (e)",
        "",
        "`tests/zoo/onnx_column.py`: each export of a built class, given "
        "`adapters.onnx.apply(graph, torch_profile)` with the sweep's torch profile (a distinct p "
        "per site), must carry every torch site's p on the Dropout nodes guarding the same "
        "parameters, with no ONNX site left over and no other node changed. A class the exporter "
        f"cannot export is *not exportable* (the exporter's reason below); {CAP} s per class "
        "for the column (*time cap*).",
        "",
        "| column | what | pass | fail | pass rate (exportable) | not exportable | time cap | "
        "not run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, c in tally(rows).items():
        done = c.get("pass", 0) + c.get("fail", 0)
        rate = f"{100 * c.get('pass', 0) / done:.1f}%" if done else "-"
        lines.append(
            f"| {k} | {COLUMNS[k]} | {c.get('pass', 0)} | {c.get('fail', 0)} | {rate} | "
            f"{c.get('not exportable', 0)} | {c.get('time cap', 0)} | {c.get('not run', 0)} |"
        )
    why: Counter[str] = Counter()
    for r in rows:
        for k in COLUMNS:
            status, reason = r.get("verdicts", {}).get(k, ["skip", ""])
            if status == "skip" and reason.startswith(NOT_EXPORTABLE):
                why[_exporter_reason(reason)] += 1
    if why:
        lines += ["", "Not exportable, by the exporter's reason (exports, all columns):", ""]
        lines += [f"- {n} × {text}" for text, n in why.most_common(12)]
    return lines


def _exporter_reason(reason: str) -> str:
    text = reason[len(NOT_EXPORTABLE) + 2 :]
    return re.sub(r"\d+", "N", text)[:140]


__all__ = ["CAP", "COLUMNS", "check", "compare", "distinct_profile", "summary_lines", "tally"]
