"""What an adapter's ``apply`` changed: one row per dropout site, printable as a table.

Framework-neutral, so the torch, Keras and ONNX adapters share one report type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .sites import BySite

SOURCES: tuple[str, ...] = ("profile", "keep", "upper", "given")


@dataclass(frozen=True)
class ReportRow:
    """One dropout site before and after ``apply``.

    Attributes:
        site: canonical site name.
        old_p: the probability the model had.
        new_p: the site probability installed (the mean of the unit probabilities if per-unit).
        source: where ``new_p`` came from: ``profile``, ``keep`` (a site the profile lacks kept its
            p), ``upper`` (such a site got the mapping's ``p_upper``) or ``given`` (a probability
            the user passed directly).
        units: number of per-unit probabilities installed, ``None`` for one probability.
        note: anything the user should know about this site (e.g. why unit granularity was not
            possible).
        how: what the adapter changed, in its own terms (e.g. ``p``, ``attribute``, ``hook``,
            ``unit rates (384)``); empty if the adapter has one way only.
        kind: the site's kind (``module``, ``attribute``, ``hook``, ``node``).

    Example:
        >>> ReportRow("enc.dropout", 0.1, 0.05, "profile").changed
        True
    """

    site: str
    old_p: float
    new_p: float
    source: str
    units: int | None = None
    note: str = ""
    how: str = ""
    kind: str = ""

    @property
    def changed(self) -> bool:
        return abs(self.old_p - self.new_p) > 1e-12 or self.units is not None


@dataclass
class ApplyReport(BySite[ReportRow]):
    """What every adapter's ``apply`` returns: the rows of the call, report-wide notes, and the
    model to train; ``str()`` gives a table.

    Attributes:
        rows: one :class:`ReportRow` per dropout site, in the model's order.
        framework: ``torch``, ``keras`` or ``onnx``.
        granularity: ``site`` or ``unit``.
        notes: what the user should know about the call as a whole.
        model: the model to train: the same object (torch; a subclassed Keras model) or the
            rewritten model (a Sequential/functional Keras model; an ONNX ``ModelProto``).
        scheduler: what advances a schedule given to ``apply`` (torch: a ``Scheduler``; Keras:
            a ``GuidedDropoutScheduler`` callback for ``fit``), else None.

    Example:
        >>> r = ApplyReport([ReportRow("a.dropout", 0.1, 0.0, "profile"),
        ...                  ReportRow("head.dropout", 0.1, 0.1, "keep")], framework="keras")
        >>> r.probabilities()
        {'a.dropout': 0.0, 'head.dropout': 0.1}
        >>> print(str(r).splitlines()[0])
        site           old p   new p  source
    """

    rows: list[ReportRow] = field(default_factory=list)
    framework: str = ""
    granularity: str = "site"
    notes: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False, compare=False)
    scheduler: Any = field(default=None, repr=False, compare=False)

    def _by_site(self) -> list[ReportRow]:
        return self.rows

    def __getattr__(self, name: str) -> Any:
        """A report used as the model (``model = apply(model)``; ``.to``, ``.train()``, ...)
        fails naming ``report.model``."""
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            f"'ApplyReport' object has no attribute {name!r}: apply() returns a report, not the "
            f"model; fix: use report.model (the model to train), or keep your own variable: "
            f"`report = apply(model, ...)` and go on with `model`"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "'ApplyReport' object is not callable: apply() returns a report, not the model; fix: "
            "call report.model(...) (the model to train), or keep `report = apply(model, ...)` "
            "apart from `model`"
        )

    @property
    def sites(self) -> list[str]:
        return [r.site for r in self.rows]

    def probabilities(self) -> dict[str, float]:
        """``{site: new probability}``."""
        return {r.site: r.new_p for r in self.rows}

    def counts(self) -> dict[str, int]:
        """How many sites came from each source."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.source] = out.get(r.source, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "granularity": self.granularity,
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """Site, old p, new p, how (when given), source, units (when any), then a summary."""
        with_units = any(r.units is not None for r in self.rows)
        with_how = any(r.how for r in self.rows)
        width = max([len("site"), *(len(r.site) for r in self.rows)])
        hw = max([len("how"), *(len(r.how) for r in self.rows)])
        head = f"{'site':<{width}}  {'old p':>6}  {'new p':>6}  "
        head += f"{'how':<{hw}}  source" if with_how else "source"
        if with_units:
            head += "   units"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{r.site:<{width}}  {r.old_p:6.4f}  {r.new_p:6.4f}  "
            line += f"{r.how:<{hw}}  {r.source:<7}" if with_how else f"{r.source:<7}"
            if with_units:
                line += f"  {'' if r.units is None else r.units:>6}"
            if r.note:
                line += f"  ({r.note})"
            lines.append(line.rstrip())
        lines.append(_summary(self.rows, self.framework, self.granularity))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(framework={self.framework!r}, sites={len(self.rows)}, "
            f"granularity={self.granularity!r})"
        )


def _summary(rows: Sequence[ReportRow], framework: str, granularity: str) -> str:
    if not rows:
        return "0 sites"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.source] = counts.get(r.source, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in counts.items())
    old = sum(r.old_p for r in rows) / len(rows)
    new = sum(r.new_p for r in rows) / len(rows)
    where = f" ({framework}, {granularity} granularity)" if framework else ""
    return f"{len(rows)} sites{where}: {parts}; mean p {old:.4f} -> {new:.4f}"
