"""How long ``adapters.torch.sites`` takes on a 24-layer BERT-large-shaped random model (issue 23).

Builds ``BertForSequenceClassification`` with BERT-large's shape (24 layers, hidden 1024, 16 heads,
FFN 4096, random weights, no download) and times ``sites(model)`` (one traced forward on the
guessed input plus the dataflow rule), best of ``--repeat`` runs after one warm-up, next to a plain
no-grad forward of the model on an input of the same size (the floor the trace cannot beat).

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/sites_speed.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers

import adapters.torch as gdt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=args.layers,
        hidden_size=1024,
        num_attention_heads=16,
        intermediate_size=4096,
    )
    model = transformers.BertForSequenceClassification(config)
    gdt.sites(model)  # warm-up (imports, first-call caches)
    times, plain = [], []
    ids = torch.randint(3, 30, (2, 8))
    for _ in range(args.repeat):  # interleaved with a plain forward on the same-sized input
        t0 = time.perf_counter()
        found = gdt.sites(model)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        plain.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "layers": args.layers,
                "sites": len(found),
                "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS"),
                "seconds_best": round(min(times), 3),
                "seconds_all": [round(t, 3) for t in times],
                "plain_forward_best": round(min(plain), 3),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
