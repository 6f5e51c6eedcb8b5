"""Where a warm ORT ``estimate_fisher`` batch goes (issue 27): ORT's plain train step, the SGD
update, the tapped train step the engine runs, and the engine's host-side rules and accumulation.

One process, one batch (MiniLM config, random weights, the ``ort_public`` cell's model and
data: ``bench/_fisher_public.py``), after one warm ``estimate_fisher`` call; every repeat times
the parts back to back (interleaved), with the 1-minute load average. ``plain + sgd`` is what
``bench/fisher.py --methods ort_public`` divides by; ``tapped + host`` is what the public call
spends per batch (plus the loop's bookkeeping).

    PYTHONPATH=. python bench/ort_fisher_split.py --repeats 4 \\
        --out bench/results/ort-fisher-split-2026-12-07-s23.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import _common as C
import _fisher_public as P
import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--model", default="minilm", choices=("minilm", "tiny", "smoke"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from adapters.onnx import estimate_fisher
    from adapters.onnx import fisher as F
    from adapters.onnx.train import module_inputs

    torch.manual_seed(0)
    cfg = C.bert_config(args.model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.num_labels = 2
    net = transformers.BertForSequenceClassification(cfg)
    bs, t = args.batch_size, args.seq_len
    ids, att, labels = P._texts(bs, t, np.int64)
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    with tempfile.TemporaryDirectory(prefix="gd-bench-ort-split-") as tmp:
        path, module, opt, names, fixed = P.ort_training(net, t, tmp)
        feeds = {**batch, **fixed}
        estimate_fisher(path, [batch], "cross_entropy", progress=False)  # builds, checks, warms
        engine = list(F._ENGINES.values())[-1]
        arrays, size = engine._arrays(batch)

        def plain() -> None:
            module.lazy_reset_grad()
            module(*module_inputs(names, feeds))

        def tapped() -> Any:
            return engine._run(arrays)[1]

        def host(values: Any) -> None:
            sums, _ = engine._fast_sums(values, size, engine.fast)
            engine.add(engine._result(sums, size, None).sums, size)
            engine.pending = {}

        rows = []
        for _ in range(args.repeats):
            row: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
            t0 = time.perf_counter()
            plain()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            values = tapped()
            t3 = time.perf_counter()
            host(values)
            t4 = time.perf_counter()
            row.update(plain_s=t1 - t0, sgd_s=t2 - t1, tapped_s=t3 - t2, host_s=t4 - t3)
            rows.append({k: round(v, 3) for k, v in row.items()})
            C.log(rows[-1])
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    out = {
        "rows": rows,
        "median": {k: round(v, 3) for k, v in med.items()},
        "tapped_over_plain": round(med["tapped_s"] / med["plain_s"], 3),
        "batch_over_step": round(
            (med["tapped_s"] + med["host_s"]) / (med["plain_s"] + med["sgd_s"]), 3
        ),
        "batch_size": bs,
        "seq_len": t,
        "model": args.model,
        "fallback": len(engine.fallback),
    }
    C.log(
        out["median"],
        "tapped/plain",
        out["tapped_over_plain"],
        "batch/step",
        out["batch_over_step"],
    )
    if args.out:
        C.Results(args.out).append(
            {"bench": "ort_fisher_split", "model": args.model, "batch_size": bs, "seq_len": t},
            {**out, "machine": C.machine_info()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
