"""The zoo sweep: the library's invariants on tiny random transformers models (docs/zoo.md).

``make test`` runs the fixed sample of :mod:`tests.zoo.sample`; today's failures are
``xfail(strict=True)`` with the reason, so a fix flips them and forces the marker's removal.
With ``GD_ZOO=all`` every class of the registry runs too, each compared with its outcome
recorded in ``tests/zoo/sweep.json`` (``make zoo`` runs the same comparison in parallel
processes: ``python -m tests.zoo.report --check``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

pytest.importorskip("torch", reason="the zoo sweep builds torch models")
pytest.importorskip("transformers", reason="the zoo sweep builds transformers models")

from tests.zoo import invariants, registry  # noqa: E402
from tests.zoo.sample import SAMPLE  # noqa: E402

# today's failures of the sample (issue 23), each with the invariant and reason it fails on
KNOWN: dict[str, str] = {}  # none left in the sample (DeBERTa-v2 and Whisper: fixed)


def _built(cls_name: str) -> registry.Built:
    try:
        entry = registry.by_class(cls_name)
    except KeyError as exc:
        pytest.skip(f"{cls_name}: not in this transformers version's auto mappings ({exc})")
    built = registry.build(entry)
    if isinstance(built, registry.BuildFailure):
        if built.category == "missing optional dependency":
            pytest.skip(f"{cls_name}: {built.message}")
        pytest.fail(f"{cls_name} does not build from a tiny config: {built.message}")
    return built


def _assert_enforced(res: invariants.Result) -> None:
    failures = res.failures()
    enforced = [f for f in failures if f[0] in "abcd"]
    assert not enforced, f"{res.cls_name}: " + " | ".join(enforced)


def _params(names: Any, known: dict[str, str]) -> list[Any]:
    return [
        pytest.param(
            c,
            marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=known[c])
            if c in known
            else (),
        )
        for c in names
    ]


@pytest.mark.parametrize("cls_name", _params(SAMPLE, KNOWN))
def test_sample(cls_name: str) -> None:
    """(a) no internal error, (b) every dropout call at an installed p and every site reaches a
    call, (c) every repeated-block parameter guarded or listed unguarded with a reason that holds,
    (d) no structural fallback without a warning."""
    res = invariants.check(_built(cls_name))
    _assert_enforced(res)


def test_known_failures_are_in_the_sample() -> None:
    assert set(KNOWN) <= set(SAMPLE)


def _all_classes() -> list[str]:
    if os.environ.get("GD_ZOO") != "all":
        return []
    return [e.cls_name for e in registry.entries()]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GD_ZOO") != "all", reason="the full sweep runs with GD_ZOO=all")
@pytest.mark.parametrize("cls_name", _all_classes())
def test_full_sweep(cls_name: str) -> None:
    """Every class's outcome is the one recorded in sweep.json (see tests/zoo/report.py)."""
    from tests.zoo import report

    recorded = json.loads(report.STATE.read_text(encoding="utf-8")).get(cls_name)
    row = report.run_one(cls_name, timeout=180)
    got = report.outcome(row)
    if got.get("timeout") or (recorded or {}).get("timeout"):
        pytest.skip(f"{cls_name}: over the time limit (recorded {recorded}, now {got})")
    assert got == recorded, (
        f"{cls_name}: recorded {recorded}, now {got}: {row.get('verdicts') or row.get('why')}; "
        "after a fix regenerate docs/zoo.md with `python -m tests.zoo.report`"
    )


class _Net:
    """A tiny torch model whose forward calls dropout three ways (module, functional with a
    hard-coded rate, functional with a rate attribute)."""

    @staticmethod
    def make(hardcoded: float | None) -> Any:
        import torch
        import torch.nn.functional as F

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = torch.nn.Linear(4, 4)
                self.drop = torch.nn.Dropout(0.1)
                self.out = torch.nn.Linear(4, 2)

            def forward(self, x: Any) -> Any:
                h = self.drop(self.fc(x))
                if hardcoded is not None:
                    h = F.dropout(h, p=hardcoded, training=self.training)
                return self.out(h)

        return Net()


def test_rate_check_flags_a_call_no_site_set() -> None:
    """The instrument sees a functional dropout at a rate no site installed (the check can fail)."""
    import torch

    import adapters.torch as gdt

    net = _Net.make(hardcoded=0.1)
    names = [s.name for s in gdt.sites(net)]
    rates = invariants.distinct_rates(names, [0.1])
    report = gdt.apply(net, rates)
    verdict = invariants._check_rates(net, {"x": torch.randn(3, 4)}, rates, report)
    assert verdict.status == "fail" and "dropout(p=0.1) 1" in verdict.reason, verdict


def test_rate_check_passes_when_every_call_is_a_site() -> None:
    import torch

    import adapters.torch as gdt

    net = _Net.make(hardcoded=None)
    rates = invariants.distinct_rates([s.name for s in gdt.sites(net)], [0.1])
    report = gdt.apply(net, rates)
    verdict = invariants._check_rates(net, {"x": torch.randn(3, 4)}, rates, report)
    assert verdict.status == "pass", verdict


def test_distinct_rates_avoid_old_rates() -> None:
    rates = invariants.distinct_rates([f"s{i}" for i in range(40)], [0.1, 0.0244])
    values = sorted(rates.values())
    assert len(set(values)) == 40
    assert min(b - a for a, b in zip(values, values[1:], strict=False)) > 100 * invariants.TOL
    assert all(abs(v - 0.1) > 1e-4 and abs(v - 0.0244) > 1e-4 for v in values)


def test_rate_check_sees_the_dropout_inside_multi_head_attention() -> None:
    """SigLIP's pooling head and WavLM call ``F.multi_head_attention_forward``, whose dropout runs
    inside the function (unseen by a mode): the instrument reads its ``dropout_p`` (their sites
    were reported as reaching no call)."""
    import torch

    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)

        def forward(self, x: Any) -> Any:
            return self.attention(x, x, x)[0]

    calls = invariants._record_calls(Pool(), {"x": torch.randn(2, 3, 4)})
    assert ("multi_head_attention_forward", 0.1) in [(f, round(p, 6)) for f, p in calls], calls


def test_a_model_without_dropout_gets_the_expected_clear_error() -> None:
    """RegNet (convolutions + BatchNorm, no dropout, nothing to insert after): sites() raises a
    clear NoSitesError naming add_sites, which the sweep counts as the expected outcome."""
    res = invariants.check(_built("RegNetForImageClassification"))
    assert res.details.get("expected_error"), res.verdicts
    assert res.verdicts["a"].status == "pass" and "NoSitesError" in res.verdicts["a"].reason
    assert res.verdicts["b"].status == "skip"


def test_a_no_sites_error_is_not_expected_when_the_forward_drops() -> None:
    """The instrument does not take the library's word: a forward that does call dropout (here a
    hard-coded F.dropout no site holds) makes a NoSitesError a failure."""
    import torch

    from gd_core.errors import no_sites

    exc = no_sites("pass add_sites=['<module name>', ...]", detail="Net")
    net = _Net.make(hardcoded=0.1)
    assert invariants._expected_no_sites(exc, "sites", net, {"x": torch.randn(3, 4)}) is False
    plain = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert invariants._expected_no_sites(exc, "sites", plain, {"input": torch.randn(3, 4)})


def test_a_class_whose_worker_never_answers_is_recorded_and_the_sweep_goes_on():
    # a worker killed by the out-of-memory killer loses its task without a word from the pool;
    # the sweep hung for good in CI: now a missing result becomes a timeout row naming the cause
    from tests.zoo import report

    rows = report.sweep(["BertForMaskedLM"], 1, timeout=60, grace=-59)  # waits 1 s: too short
    assert [r["class"] for r in rows] == ["BertForMaskedLM"]
    assert rows[0]["timeout"] and "the worker died" in rows[0]["verdicts"]["a"][1]
    assert report.outcome(rows[0]) == {"built": True, "timeout": True}
