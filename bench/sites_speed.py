"""How long ``adapters.torch.sites`` takes on a 24-layer BERT-large-shaped random model (issue 23).

Builds ``BertForSequenceClassification`` with BERT-large's shape (24 layers, hidden 1024, 16 heads,
FFN 4096, random weights, no download; not timed) and times ``sites(model)`` (one traced forward on
the guessed input plus the dataflow rule): the median of ``--repeat`` calls after one warm-up,
each next to a plain no-grad forward of the model on an input of the same size (the floor the trace
cannot beat), and the time inside the dataflow rule (``gd_core.dataflow.guarded``). Every call
records the 1-minute load average before it (the machine is shared); the record is appended to
``bench/results/sites_speed.jsonl``.

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/sites_speed.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402

RESULTS = C.RESULTS_DIR / "sites_speed.jsonl"


def _timed_rule() -> tuple[list[float], Any]:
    """Wrap ``guarded`` where the torch adapter imported it; the list collects its seconds."""
    import adapters.torch.discovery as disc

    spent: list[float] = []
    original = disc.guarded

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent.append(time.perf_counter() - t0)

    disc.guarded = timed
    return spent, original


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS), help="JSONL file the record is appended to")
    args = ap.parse_args(argv)
    import torch
    import transformers

    import adapters.torch as gdt
    import adapters.torch.discovery as disc

    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=args.layers, hidden_size=1024, num_attention_heads=16,
        intermediate_size=4096,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    spent, original = _timed_rule()
    try:
        gdt.sites(model)  # warm-up (imports, first-call caches)
        times, plain, rule, loads = [], [], [], []
        ids = torch.randint(3, 30, (2, 8))
        for _ in range(args.repeat):  # interleaved with a plain forward on a same-sized input
            loads.append(round(os.getloadavg()[0], 2))
            spent.clear()
            t0 = time.perf_counter()
            found = gdt.sites(model)
            times.append(time.perf_counter() - t0)
            rule.append(sum(spent))
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids)
            plain.append(time.perf_counter() - t0)
    finally:
        disc.guarded = original
    fields = {
        "sites": len(found),
        "seconds_median": round(statistics.median(times), 3),
        "seconds_all": [round(t, 3) for t in times],
        "rule_seconds_median": round(statistics.median(rule), 3),
        "plain_forward_median": round(statistics.median(plain), 3),
        "loadavg_1m_before_each": loads,
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "machine": C.machine_info(),
    }
    key = {"bench": "sites_speed", "layers": args.layers, "stamp": time.time()}
    rec = C.Results(args.out).append(key, fields)
    print(
        f"sites(): median {rec['seconds_median']} s of {args.repeat} ({rec['seconds_all']}); "
        f"the rule {rec['rule_seconds_median']} s; plain forward {rec['plain_forward_median']} s; "
        f"{rec['sites']} sites; load average {loads}"
    )


if __name__ == "__main__":
    main()
