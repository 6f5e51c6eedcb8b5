"""Summarise benchmark JSONL files into the markdown tables of docs/benchmarks.md.

Reads every record of the given files (default: ``bench/results/*.jsonl``) and prints, per kind:

* **glue**: per task / setting / method, mean +- std of each metric over seeds, the paired
  difference of the primary metric to standard dropout (and to the method's own baseline:
  ``guided`` for the random-order and depth controls, ``uniform_0.15`` for ``guided_0.3``) with a
  95% t-interval over seeds, a verdict against the last of them (win / loss when the interval
  excludes 0, else tie), and
  the cells whose baseline has not learned (flagged instead of reported as ties);
* **fisher**: per method and N, seconds per 16 samples, samples/s, cost relative to a training
  step and to the authors' approach, peak memory growth, agreement with ``gd``;
* **overhead**: per framework / model / granularity, the median step-time ratio guided/standard,
  its distribution-free 95% interval, quartiles and IQR, and the target verdict from the
  interval (meets / misses only when the whole interval is on one side of the target).

Examples::

    python bench/report.py
    python bench/report.py bench/results/glue-quick.jsonl --only glue
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile (scipy when present, else a table).

    Example:
        >>> round(t975(4), 3)
        2.776
    """
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy is optional
        for k in sorted(_T975):
            if df <= k:
                return _T975[k]
        return 1.96


def paired_ci(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t-interval ``(mean, low, high)``.

    Example:
        >>> m, lo, hi = paired_ci([0.01, 0.02, 0.03])
        >>> round(m, 3), lo < m < hi
        (0.02, True)
    """
    d = np.asarray(diffs, dtype=np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return m, m - half, m + half


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of the files, each tagged with ``_file`` (where it came from)."""
    out = []
    for p in paths:
        for rec in C.Results(p).records():
            try:
                rec["_file"] = str(Path(p).resolve().relative_to(C.ROOT))
            except ValueError:
                rec["_file"] = str(p)
            out.append(rec)
    return out


def kind(rec: dict[str, Any]) -> str:
    if rec.get("bench"):
        return str(rec["bench"])
    if "task" in rec:
        return "glue"
    return "?"


def _short(rec: dict[str, Any], width: int = 110) -> str:
    """``status: message`` cut to ``width``, keeping a trailing ``[at file:line ...]`` part."""
    text = str(rec.get("error") or rec.get("reason") or "")
    loc = ""
    if " [at " in text:
        text, loc = text.split(" [at ", 1)
        loc = " [at " + loc
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"{rec.get('status')}: {text}{loc}".replace("|", "/")


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


# --------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------


#: the questions a user asks of guided dropout, as paired differences (method minus reference)
QUESTIONS = (
    ("guided", "standard", "does it beat standard dropout 0.1?"),
    ("guided", "uniform_mean", "beyond the same mean rate on every site?"),
    ("guided", "random_order", "beyond a random order of the same rates?"),
    ("guided", "none", "against no dropout at all?"),
    ("guided_rescaled", "standard", "at standard's budget (mean 0.1)?"),
)


def question_rows(
    by_method: dict[str, dict[int, dict[str, Any]]], primary: str
) -> list[tuple[str, str, str, int, float, float, float]]:
    """The paired differences of :data:`QUESTIONS` present in one cell: ``(method, reference,
    question, pairs, mean, low, high)`` with a 95% t-interval over the seeds both have.

    Example:
        >>> runs = lambda vals: {s: {"metrics": {"pearson": v}} for s, v in enumerate(vals)}
        >>> cell = {"guided": runs([0.80, 0.81, 0.82]), "standard": runs([0.77, 0.78, 0.80])}
        >>> [(m, r, n, round(d, 3)) for m, r, _, n, d, _, _ in question_rows(cell, "pearson")]
        [('guided', 'standard', 3, 0.027)]
    """
    out = []
    for m, ref, question in QUESTIONS:
        a, b = by_method.get(m, {}), by_method.get(ref, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        d = [a[s]["metrics"][primary] - b[s]["metrics"][primary] for s in seeds]
        mean, lo, hi = paired_ci(d)
        out.append((m, ref, question, len(seeds), mean, lo, hi))
    return out


def glue_tables(records: list[dict[str, Any]]) -> str:
    import glue

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("metrics") is None:
            continue
        g = (r["model"], r["setting"], r["protocol"], r["epochs"], r["lr"], str(r["train_size"]))
        groups[g].append(r)
    lines: list[str] = []
    flagged: list[str] = []
    verdicts: dict[str, int] = defaultdict(int)
    for (model, setting, protocol, epochs, lr, size), recs in sorted(groups.items()):
        lines.append(
            f"### {setting} (train size {size}, {epochs} epochs, lr {lr:g}, {protocol}, "
            f"model {model})\n"
        )
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            by_task[r["task"]].append(r)
        for task_name in [t for t in glue.TASKS if t in by_task]:
            task = glue.TASKS[task_name]
            trs = by_task[task_name]
            by_method: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
            for r in trs:
                by_method[r["method"]][int(r["seed"])] = r
            metrics = list(task.metrics)
            base = by_method.get("standard", {})
            base_learned = [bool(r["learned"]) for r in base.values()]
            not_learned = bool(base_learned) and sum(base_learned) < len(base_learned) / 2
            majority = [
                r["majority_rate"] for r in base.values() if r.get("majority_rate") is not None
            ]
            head = (
                "| method | n | "
                + " | ".join(metrics)
                + f" | Δ {task.primary} vs standard [95% CI] | verdict | not learned |"
            )
            lines.append(
                f"**{task_name}** (primary: {task.primary}"
                + (f"; majority-class accuracy {np.mean(majority):.3f}" if majority else "")
                + ")\n"
            )
            lines.append(head)
            lines.append("|" + "---|" * (head.count("|") - 1))
            order = [m for m in glue.METHODS if m in by_method] + [
                m for m in by_method if m not in glue.METHODS
            ]
            for m in order:
                runs = by_method[m]
                cells = []
                for met in metrics:
                    vals = np.array([r["metrics"][met] for r in runs.values()])
                    sd = vals.std(ddof=1) if len(vals) > 1 else float("nan")
                    cells.append(f"{vals.mean():.4f} ± {_fmt(sd)}")
                nl = sum(1 for r in runs.values() if not r["learned"])
                diff_txt, verdict = "–", "baseline" if m == "standard" else "–"
                baselines = ["standard"]
                own = glue.METHODS[m].baseline if m in glue.METHODS else "standard"
                if own != "standard":
                    baselines.append(own)
                if m != "standard":
                    parts = []
                    for b in baselines:
                        ref = by_method.get(b, {})
                        seeds = sorted(set(runs) & set(ref))
                        if not seeds:
                            continue
                        d = [
                            runs[s]["metrics"][task.primary] - ref[s]["metrics"][task.primary]
                            for s in seeds
                        ]
                        mean, lo, hi = paired_ci(d)
                        label = "" if b == "standard" else f" (vs {b})"
                        parts.append(f"{mean:+.4f} [{_fmt(lo)}, {_fmt(hi)}] n={len(seeds)}{label}")
                        if b == baselines[-1]:
                            if not_learned:
                                verdict = "FLAG: baseline not learned"
                            elif len(seeds) < 2 or math.isnan(lo):
                                verdict = "too few pairs"
                            elif lo > 0:
                                verdict = "win"
                            elif hi < 0:
                                verdict = "loss"
                            else:
                                verdict = "tie"
                            verdicts[verdict + label] += 1
                            verdict += label
                    diff_txt = "; ".join(parts) or "no paired seeds"
                lines.append(
                    f"| {m} | {len(runs)} | "
                    + " | ".join(cells)
                    + f" | {diff_txt} | {verdict} | {nl}/{len(runs)} |"
                )
            lines.append("")
            qs = question_rows(by_method, task.primary)
            if len(qs) > 1:
                lines.append(f"Paired differences of {task.primary} (95% t-interval over seeds):\n")
                lines.append("| question | difference | pairs | Δ [95% CI] |")
                lines.append("|---|---|---|---|")
                for m, ref, question, n, mean, lo, hi in qs:
                    lines.append(
                        f"| {question} | {m} − {ref} | {n} | {mean:+.4f} [{_fmt(lo)}, {_fmt(hi)}] |"
                    )
                lines.append("")
            if not_learned:
                flagged.append(
                    f"- {setting} / {task_name}: standard dropout did not learn in "
                    f"{len(base_learned) - sum(base_learned)}/{len(base_learned)} seeds "
                    f"({task.primary} at the trivial level); differences there are not evidence"
                )
    if flagged:
        lines.append("**Flagged cells (baseline has not learned):**\n")
        lines.extend(flagged)
        lines.append("")
    if verdicts:
        lines.append(
            "Verdicts over all (task, setting, method) cells: "
            + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
            + "\n"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------------------------


def fisher_tables(records: list[dict[str, Any]]) -> str:
    import fisher

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        g = (r["model"], r["batch_size"], r["seq_len"], r.get("threads"), r.get("chunk_size"))
        groups[g].append(r)
    lines = []
    for (model, bs, t, threads, chunk), recs in sorted(groups.items(), key=str):
        lines.append(
            f"### model {model}, batch {bs}, length {t}"
            + (f", {threads} threads" if threads else "")
            + (f", chunk_size {chunk}" if chunk else "")
            + "\n"
        )
        cell: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            cell[(r["method"], int(r["n_samples"]))].append(r)
        sizes = sorted({n for _, n in cell})

        def med(method: str, n: int, field: str, cell: Any = cell) -> float | None:
            vals = [r[field] for r in cell.get((method, n), []) if r.get("status") == "ok"]
            return float(np.median(vals)) if vals else None

        lines.append(
            "| method | N | runs | s / 16 samples | samples/s | × train step | authors ÷ this "
            "| peak RSS growth MB | peak RSS MB | agrees with gd (rtol 1e-5) | status |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        methods = [m for m in fisher.METHODS if any(k[0] == m for k in cell)]
        for m in methods:
            for n in sizes:
                rs = cell.get((m, n))
                if not rs:
                    continue
                ok = [r for r in rs if r.get("status") == "ok"]
                s16 = med(m, n, "s_per_16")
                # ORT rows against ORT's own batched step (their model and loss differ)
                ts = med(
                    "ort_train_step" if m in fisher.ORT_METHODS else "train_step", n, "s_per_16"
                )
                au = med("authors", n, "s_per_16")
                agree = [r.get("agreement", {}).get("agree") for r in ok if r.get("agreement")]
                if m in ("train_step", "ort_train_step"):
                    agree_txt = "(no Fisher)"
                elif agree:
                    agree_txt = "yes" if all(agree) else f"NO ({agree.count(False)}/{len(agree)})"
                    errs = [
                        r["agreement"].get("max_rel_err_above_atol")
                        for r in ok
                        if r.get("agreement")
                    ]
                    errs = [e for e in errs if e is not None]
                    if errs:
                        agree_txt += f", max rel err {max(errs):.1e}"
                elif m == "gd":
                    agree_txt = "reference"
                else:
                    agree_txt = "–"
                status = "ok" if ok else _short(rs[0])
                lines.append(
                    f"| {m} | {n} | {len(ok)}/{len(rs)} | {_fmt(s16, 3)} | {_fmt(med(m, n, 'samples_per_s'), 2)} "
                    f"| {_fmt(s16 / ts if s16 and ts else None, 2)} | {_fmt(au / s16 if s16 and au else None, 2)} "
                    f"| {_fmt(med(m, n, 'peak_growth_mb'), 0)} | {_fmt(med(m, n, 'peak_rss_mb'), 0)} "
                    f"| {agree_txt} | {status} |"
                )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# overhead
# --------------------------------------------------------------------------------------------


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median: order statistics ``x_(k)`` and
    ``x_(n-k+1)`` with the largest ``k`` whose binomial tail keeps coverage >= ``level``.

    Example:
        >>> median_ci(list(range(1, 31)))  # n = 30: x_(10), x_(21), coverage 95.7%
        (10.0, 21.0)
        >>> median_ci([1.0, 2.0, 3.0])  # too few values for 95%: the full range
        (1.0, 3.0)
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    alpha = (1.0 - level) / 2.0
    k, tail = 0, 0.0  # tail = P(Bin(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2.0**n
        if nxt > alpha:
            break
        tail, k = nxt, k + 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def overhead_verdict(median: float, lo: float, hi: float, target: float) -> str:
    """Verdict of one overhead cell from the median ratio and its 95% interval.

    Example:
        >>> overhead_verdict(0.99, 0.97, 1.00, 1.01)
        'meets (95% CI below the target)'
        >>> overhead_verdict(1.02, 1.015, 1.03, 1.01)
        'misses (95% CI above the target)'
        >>> overhead_verdict(1.0, 0.98, 1.02, 1.01)
        'median meets; not resolved (target inside the 95% CI)'
    """
    if hi <= target:
        return "meets (95% CI below the target)"
    if lo > target:
        return "misses (95% CI above the target)"
    side = "meets" if median <= target else "misses"
    return f"median {side}; not resolved (target inside the 95% CI)"


def overhead_tables(records: list[dict[str, Any]]) -> str:
    lines = [
        "| framework | model | granularity | batch × len | pairs | median t_B/t_A | 95% CI of the "
        "median | IQR [q25, q75] | t_A median ms | t_B median ms | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["model"], r["framework"], r["granularity"])):
        if r.get("status") != "ok":
            lines.append(
                f"| {r['framework']} | {r['model']} | {r['granularity']} | {r['batch_size']} × {r['seq_len']} "
                f"| – | – | – | – | – | – | {_short(r)} |"
            )
            continue
        ratios = np.asarray(r["t_b_s"], dtype=np.float64) / np.asarray(r["t_a_s"], dtype=np.float64)
        lo, hi = median_ci(ratios)
        verdict = overhead_verdict(r["ratio_median"], lo, hi, r["target"])
        lines.append(
            f"| {r['framework']} | {r['model']} | {r['granularity']} | {r['batch_size']} × {r['seq_len']} "
            f"| {r['pairs']} | {r['ratio_median']:.4f} | [{lo:.4f}, {hi:.4f}] | {r['ratio_iqr']:.4f} "
            f"[{r['ratio_q25']:.4f}, {r['ratio_q75']:.4f}] | {r['t_a_median_s'] * 1e3:.1f} "
            f"| {r['t_b_median_s'] * 1e3:.1f} | ≤ {r['target']} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="JSONL files (default: bench/results/*.jsonl)")
    ap.add_argument("--only", choices=("glue", "fisher", "overhead"), default=None)
    args = ap.parse_args(argv)
    paths = [Path(f) for f in args.files] or sorted(C.RESULTS_DIR.glob("*.jsonl"))
    records = load(paths)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_kind[kind(r)].append(r)
    sections = [
        ("overhead", "Fine-tuning overhead", overhead_tables),
        ("fisher", "Fisher estimation", fisher_tables),
        ("glue", "GLUE quality", glue_tables),
    ]
    printed = False
    for name, title, fn in sections:
        if args.only not in (None, name) or not by_kind.get(name):
            continue
        print(f"## {title}\n")
        files = sorted({r["_file"] for r in by_kind[name]})
        print(f"_{len(by_kind[name])} records from {', '.join(files)}_\n")
        print(fn(by_kind[name]))
        printed = True
    if not printed:
        print("no records found in " + ", ".join(str(p) for p in paths), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
