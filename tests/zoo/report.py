"""Run the zoo sweep and regenerate ``docs/zoo.md`` (and ``tests/zoo/sweep.json``, the state the
full-sweep test compares against).

    OMP_NUM_THREADS=1 python -m tests.zoo.report              # every class, 2 processes
    python -m tests.zoo.report --jobs 4 --only BertForMaskedLM  # a few classes, print only
    python -m tests.zoo.report --check                        # CI: differ from sweep.json -> exit 1

Each class runs in a worker process with a time limit (``--timeout``, seconds); a class that
runs out of time is recorded as such. ``--check`` writes nothing in the repository: it runs the
sweep and exits 1 when any class's outcome (built or not; each of invariants a, b, c, d passing or
not) differs from the committed ``sweep.json``, naming the classes: a fix flips an outcome and
forces the table's regeneration, a regression is caught.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.zoo import onnx_column

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "zoo.md"
STATE = Path(__file__).resolve().parent / "sweep.json"
ENFORCED = ("a", "b", "c", "d")
NAMES = {
    "a": "no internal error",
    "b": "every call at an installed p, every site reaches a call",
    "c": "repeated-block parameters guarded, or listed unguarded with a reason that holds",
    "d": "no structural fallback without a warning",
}
NAMES.update(onnx_column.COLUMNS)  # e-train, e-eval, e-dynamo (reported, not enforced)


class _Timeout(BaseException):
    """A class over its time limit (not an ``Exception``: the invariants' handlers let it pass)."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def run_one(cls_name: str, timeout: int = 120) -> dict[str, Any]:
    """Build and check one class; a JSON-able outcome (never raises)."""
    import warnings

    from tests.zoo import invariants, registry
    from tests.zoo.sample import ONNX_SUBSET

    start = time.perf_counter()
    out: dict[str, Any] = {"class": cls_name}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        entry = registry.by_class(cls_name)
        out["type"], out["task"] = entry.model_type, entry.task
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = registry.build(entry)
        if isinstance(built, registry.BuildFailure):
            out["built"] = False
            out["why"] = f"{built.category}: {built.message}"
        else:
            out["built"] = True
            res = invariants.check(built, onnx=True, dynamo=cls_name in ONNX_SUBSET)
            out["verdicts"] = {k: [v.status, v.reason] for k, v in res.verdicts.items()}
            out["sites"] = res.details.get("sites")
            out["raised"] = res.details.get("raised", [])
            out["error_kind"] = res.details.get("error_kind", "")
            if res.details.get("expected_error"):
                out["expected_error"] = True
    except _Timeout:
        out.setdefault("built", True)
        out["verdicts"] = {"a": ["fail", f"timeout: over {timeout} s"]}
        out["timeout"] = True
        out["error_kind"] = "timeout"
    except Exception as exc:  # noqa: BLE001 - the harness records, never stops the sweep
        out.setdefault("built", False)
        out["why"] = f"harness error: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()


def _run(args: tuple[str, int]) -> dict[str, Any]:
    return run_one(*args)


def sweep(classes: list[str], jobs: int, timeout: int, grace: int = 120) -> list[dict[str, Any]]:
    """Every class's outcome, in ``classes`` order, from ``jobs`` worker processes.

    A worker that dies in a class (killed by the kernel's out-of-memory killer, a crash in native
    code) loses its task without a word from ``multiprocessing.Pool``; each result is therefore
    awaited at most ``timeout`` + ``grace`` s after the previous one arrived (the class started by
    then: every earlier class is done) and a class whose result never comes is recorded as a
    timeout naming the likely cause, and the sweep goes on."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(jobs, initializer=_init_worker, maxtasksperchild=40) as pool:
        pending = [(c, pool.apply_async(_run, ((c, timeout),))) for c in classes]
        results = []
        for cls_name, job in pending:
            try:
                row = job.get(timeout=timeout + grace)
            except multiprocessing.TimeoutError:
                row = _lost(cls_name, timeout + grace)
                print(f"zoo sweep: {cls_name}: {row['verdicts']['a'][1]}", file=sys.stderr)
            results.append(row)
            if len(results) % 25 == 0 or len(results) == len(classes):
                print(f"zoo sweep: {len(results)}/{len(classes)} classes", file=sys.stderr)
    return results


def _lost(cls_name: str, waited: int) -> dict[str, Any]:
    """The outcome of a class whose worker never answered."""
    why = (
        f"timeout: no result {waited} s after the previous class's: the worker died "
        "(killed by the out-of-memory killer, or a crash in native code)"
    )
    return {
        "class": cls_name,
        "built": True,
        "verdicts": {"a": ["fail", why]},
        "timeout": True,
        "error_kind": "timeout",
        "seconds": float(waited),
    }


def outcome(row: dict[str, Any]) -> dict[str, Any]:
    """What ``--check`` compares: built or not, and each enforced invariant passing or not."""
    if not row.get("built"):
        return {"built": False}
    if row.get("timeout"):
        return {"built": True, "timeout": True}
    if row.get("expected_error"):  # a clear NoSitesError for a model without dropout
        return {"built": True, "expected_error": True}
    v = row.get("verdicts", {})
    return {"built": True, **{k: v.get(k, ["skip"])[0] == "pass" for k in ENFORCED}}


def passes(row: dict[str, Any]) -> bool:
    o = outcome(row)
    return o["built"] and (o.get("expected_error") or all(o.get(k, False) for k in ENFORCED))


def render(rows: list[dict[str, Any]], command: str, seconds: float, jobs: int) -> str:
    """docs/zoo.md from the outcomes."""
    import torch
    import transformers

    import gd_core

    built = [r for r in rows if r.get("built")]
    expected = [r for r in built if r.get("expected_error")]
    failed_build = [r for r in rows if not r.get("built")]
    lines = [
        "# The model zoo sweep",
        "",
        "<!-- generated by `python -m tests.zoo.report`; do not edit by hand -->",
        "",
        "Every transformers model class named by the auto mappings for sequence classification,",
        "masked LM, causal LM, seq-to-seq LM, image and audio classification, built from a tiny",
        "random config offline (`tests/zoo/registry.py`), is checked against the library's",
        "invariants (`tests/zoo/invariants.py`). `make test` runs a fixed sample",
        "(`tests/zoo/sample.py`, today's failures marked `xfail(strict=True)` with the reason);",
        "`make zoo` (a step of `.ci/run`) runs the whole sweep and fails when any class's outcome",
        "differs from this table's (`tests/zoo/sweep.json`): after a fix, regenerate it.",
        "",
        "Invariant c: every parameter of the repeated blocks (a `ModuleList` of 2+ same-type",
        "blocks, or a block called 2+ times: ALBERT's shared layer) is guarded by a site or listed",
        "in `sites(model).unguarded`, never both, never neither, with a reason that agrees with",
        "facts measured apart from the library's trace (`tests/zoo/coverage_check.py`: autograd",
        "paths to the outputs and to every dropout call's input, and what each call drops directly).",
        "",
        "Expected errors: a model whose training forward makes no dropout call and that has no",
        "residual branch or LayerNorm to insert sites after (RegNet, TextNet: convolutions with",
        "BatchNorm) gets a clear `NoSitesError` from `sites()` naming the fix (`add_sites=[module",
        "names]`); the sweep counts that as the expected outcome, checks that the forward really",
        "makes no dropout call, and lists the classes below.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"{seconds / 60:.1f} min with {jobs} processes",
        f"- Versions: transformers {transformers.__version__}, torch {torch.__version__}, "
        f"guided-dropout {getattr(gd_core, '__version__', '?')}, Python {sys.version.split()[0]}",
        "",
        "## Summary",
        "",
        f"- Classes in the mappings: {len(rows)}; built: {len(built)}; not built: "
        f"{len(failed_build)}",
        "- Not built, by reason: "
        + ", ".join(
            f"{k} {n}"
            for k, n in Counter(r.get("why", "").split(":")[0] for r in failed_build).most_common()
        ),
        f"- Pass every enforced invariant (a, b, c, d): {sum(passes(r) for r in built) - len(expected)}"
        f" of {len(built)} built; the expected error of a model without dropout: {len(expected)}"
        f" ({', '.join(r['class'] for r in expected) or 'none'}); together "
        f"{sum(passes(r) for r in built)} ({100 * sum(passes(r) for r in built) / max(len(built), 1):.1f}%)",
        "",
        "| invariant | what it checks | pass | fail | info | skip |",
        "|---|---|---|---|---|---|",
    ]
    for k, what in NAMES.items():
        c = Counter(r.get("verdicts", {}).get(k, ["skip"])[0] for r in built)
        lines.append(f"| {k} | {what} | {c['pass']} | {c['fail']} | {c['info']} | {c['skip']} |")
    kinds = Counter(r.get("error_kind") for r in built if r.get("error_kind"))
    if kinds:
        lines += [
            "",
            "Invariant a's failures by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.items()),
        ]
    lines += ["", "## Failures", "", "| class | task | invariant | reason |", "|---|---|---|---|"]
    for r in built:
        for k, (status, reason) in r.get("verdicts", {}).items():
            if status == "fail":
                lines.append(f"| {r['class']} | {r.get('task', '')} | {k} | {_cell(reason)} |")
    lines += [
        "",
        *onnx_column.summary_lines(built),
        "",
        "## Reported, not enforced (e)",
        "",
        "| class | invariant | result |",
        "|---|---|---|",
    ]
    for r in built:
        for k in onnx_column.COLUMNS:
            status, reason = r.get("verdicts", {}).get(k, ["skip", ""])
            if status in ("info", "fail") or (
                status == "skip"
                and reason.startswith((onnx_column.NOT_EXPORTABLE, onnx_column.TIME_CAP))
            ):
                lines.append(f"| {r['class']} | {k} | {status}: {_cell(reason)} |")
    lines += ["", "## Not built", "", "| class | task | why |", "|---|---|---|"]
    for r in failed_build:
        lines.append(f"| {r['class']} | {r.get('task', '')} | {_cell(r.get('why', ''))} |")
    raised = [r for r in built if r.get("raised")]
    lines += [
        "",
        "## Config rates changed",
        "",
        "A rate the config keeps at 0 is set to 0.1 so that its dropout site exists; LayerDrop is",
        "switched off (`name=0`) so that one forward reaches every layer.",
        "",
        "| class | fields |",
        "|---|---|",
    ]
    lines += [f"| {r['class']} | {', '.join(r['raised'])} |" for r in raised]
    return "\n".join(lines) + "\n"


def state_text(outcomes: dict[str, Any]) -> str:
    """sweep.json's text: one class a line, sorted, so a regeneration's diff reads class by class."""
    body = ",\n".join(
        f" {json.dumps(c)}: {json.dumps(o, sort_keys=True)}" for c, o in sorted(outcomes.items())
    )
    return "{\n" + body + "\n}\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:400]


def _write(path: Path, text: str) -> None:
    """Write through a temp file in the same folder, then rename (atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo.report", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per class")
    parser.add_argument("--only", nargs="*", help="these classes only; prints, writes nothing")
    parser.add_argument(
        "--check", action="store_true", help="compare with sweep.json, write nothing"
    )
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"zoo sweep skipped: it needs torch and transformers ({exc})")
        return 0
    from tests.zoo import registry

    classes = args.only or [e.cls_name for e in registry.entries()]
    start = time.perf_counter()
    rows = sweep(classes, args.jobs, args.timeout)
    seconds = time.perf_counter() - start
    if args.only:
        for r in rows:
            print(json.dumps(r, indent=1))
        return 0
    if args.check:
        return _compare(rows)
    command = "OMP_NUM_THREADS=1 python -m tests.zoo.report" + (
        f" --jobs {args.jobs}" if args.jobs != 2 else ""
    )
    _write(STATE, state_text({r["class"]: outcome(r) for r in rows}))
    _write(DOC, render(rows, command, seconds, args.jobs))
    print(f"wrote {DOC} and {STATE}: {len(rows)} classes in {seconds / 60:.1f} min")
    return 0


def _compare(rows: list[dict[str, Any]]) -> int:
    expected = json.loads(STATE.read_text(encoding="utf-8"))
    diff = []
    for r in rows:
        want = expected.get(r["class"])
        got = outcome(r)
        if want != got and (got.get("timeout") or (want or {}).get("timeout")):
            print(
                f"zoo sweep: {r['class']}: timed out (recorded {want}, now {got}); not compared",
                file=sys.stderr,
            )
        elif want != got:
            why = [f"{k}: {v}" for k, v in r.get("verdicts", {}).items() if v[0] == "fail"]
            diff.append(f"{r['class']}: recorded {want}, now {got} {why or r.get('why', '')}")
    gone = sorted(set(expected) - {r["class"] for r in rows})
    diff += [f"{c}: recorded in sweep.json, no longer in the mappings" for c in gone]
    if diff:
        print(
            "zoo sweep: outcomes differ from tests/zoo/sweep.json (a fix: regenerate with "
            "`OMP_NUM_THREADS=1 python -m tests.zoo.report` and commit docs/zoo.md; a "
            "regression: fix it):",
            file=sys.stderr,
        )
        print("\n".join(diff), file=sys.stderr)
        return 1
    print(f"zoo sweep: {len(rows)} classes, every outcome as recorded in tests/zoo/sweep.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
