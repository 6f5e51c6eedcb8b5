"""torch.compile under a schedule: how many times a compiled MiniLM compiles, and its step time.

One training step = forward of the pretrained MiniLM (``BertModel``, sdpa attention), a
mean-pooled squared-norm loss, backward, AdamW step, then ``report.scheduler.step()`` of a
``Schedule("linear_warmup", steps=STEPS)`` (the rates change every step). Arms, each in this
process after ``torch._dynamo.reset()``:

* ``standard``: the model as loaded (p = 0.1 everywhere), no schedule;
* ``guided``: ``apply`` at p = 0.1 on every site (``--granularity``), with the schedule.

Recorded per arm: graphs compiled (calls of the counting backend wrapper), the median step time
after the first (compile) step, the first step's time. Appends one JSON line per arm to
``--out`` (default bench/results/compile_schedule.jsonl).

Examples::

    python bench/compile_schedule.py --steps 20 --backend inductor
    python bench/compile_schedule.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common as C


def run_arm(arm: str, args: Any) -> dict[str, Any]:
    import torch

    import adapters.torch as gdt
    from gd_core import Schedule

    torch._dynamo.reset()
    model = C.load_model(args.model, attn_implementation="sdpa").train()
    compiles = {"n": 0}

    def counting(gm: Any, example_inputs: Any) -> Any:
        compiles["n"] += 1
        if args.backend == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(args.backend)(gm, example_inputs)

    report = None
    if arm == "guided":
        plan = {s.name: 0.1 for s in gdt.sites(model)}
        report = gdt.apply(
            model,
            plan,
            granularity=args.granularity,
            schedule=Schedule("linear_warmup", steps=args.steps),
        )
    compiled = torch.compile(model, backend=counting)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq_len), generator=g)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = compiled(input_ids=ids).last_hidden_state
        loss = out.mean(dim=1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if report is not None:
            report.scheduler.step()
        times.append(time.perf_counter() - t0)
    return {
        "graphs_compiled": compiles["n"],
        "first_step_s": round(times[0], 3),
        "median_step_s": round(statistics.median(times[1:]), 4),
        "attn_implementation": model.config._attn_implementation,
        "notes": list(report.notes) if report is not None else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--granularity", default="site", choices=("site", "unit"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, eager backend")
    ap.add_argument("--label", default="", help="recorded in each line (e.g. 'before: 096da2b')")
    ap.add_argument("--arms", default="standard,guided")
    ap.add_argument("--out", default=str(C.RESULTS_DIR / "compile_schedule.jsonl"))
    args = ap.parse_args()
    if args.smoke:
        args.model, args.steps, args.backend, args.seq_len = "smoke", 4, "eager", 16
    C.set_threads(args.threads)
    res = C.Results(args.out)
    for arm in args.arms.split(","):
        key = {"arm": arm, "model": args.model, "backend": args.backend, "steps": args.steps,
               "granularity": args.granularity, "batch": args.batch, "seq_len": args.seq_len,
               "label": args.label}  # fmt: skip
        if res.done(key):
            continue
        row = res.append(key, {**run_arm(arm, args), "machine": C.machine_info()})
        C.log(arm, row["graphs_compiled"], row["median_step_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
