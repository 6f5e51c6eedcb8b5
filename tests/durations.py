"""Merge the per-test durations a run recorded into tests/durations.json.

``make test`` runs on two workers that xdist's ``worksteal`` feeds from the two halves of the
collection, stealing from the end of a queue; a long test that comes last in a worker's share
leaves the other worker idle (it was 24 s of a 254 s run). tests/conftest.py therefore puts the
tests listed in tests/durations.json at the front of each worker's share, longest first. To
refresh the list after tests change (the order affects only the time, never the outcome)::

    GD_TEST_DURATIONS_OUT=/tmp/d.jsonl make test
    python tests/durations.py /tmp/d.jsonl

Only tests of at least MIN_S seconds (setup + call + teardown) are kept.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

MIN_S = 1.0
OUT = Path(__file__).resolve().parent / "durations.json"


def merge(lines: list[str]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for line in lines:
        if line.strip():
            nodeid, _when, seconds = json.loads(line)
            total[nodeid] += float(seconds)
    return {k: round(v, 1) for k, v in sorted(total.items()) if v >= MIN_S}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/durations.py RECORDED.jsonl", file=sys.stderr)
        return 2
    merged = merge(Path(argv[0]).read_text(encoding="utf-8").splitlines())
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, OUT)
    print(f"{OUT}: {len(merged)} tests of at least {MIN_S} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
