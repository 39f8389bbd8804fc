"""Numbers the studies compute from records: running means, steps to a loss threshold, whether a
run trained at all, and summaries over seeds (mean with the min-max range)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from normlab.experiments.records import RunRecord

__all__ = [
    "Spread",
    "geometric_mean",
    "running_mean",
    "spread",
    "steps_to_threshold",
    "trained",
]


def running_mean(values: Sequence[float | None], window: int = 10) -> list[float]:
    """Trailing mean over ``window`` steps (NaN where a value is missing: a diverged step).

    >>> running_mean([4.0, 2.0, 0.0], window=2)
    [4.0, 3.0, 1.0]
    """
    out, acc = [], []
    for v in values:
        acc.append(math.nan if v is None else float(v))
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def steps_to_threshold(record: RunRecord, threshold: float, window: int = 10) -> int | None:
    """First step at which the ``window``-step mean training loss is below ``threshold``
    (``None``: never, within the run).

    >>> steps_to_threshold({"train_loss": [3.0, 1.0, 0.1, 0.1]}, 0.5, window=2)
    4
    """
    for step, value in enumerate(running_mean(record["train_loss"], window), start=1):
        if value < threshold:
            return step
    return None


def trained(record: RunRecord, chance: float = 0.1, margin: float = 0.1) -> bool:
    """The run finished without diverging and its final test accuracy is clearly above chance
    (a dead network has a flat landscape: its probes must not be compared)."""
    final = record.get("final") or {}
    acc = final.get("test_acc_ema")
    return record["status"] == "complete" and acc is not None and acc > chance + margin


@dataclass(frozen=True)
class Spread:
    """Mean over seeds with the smallest and largest value; ``n`` values (``None`` excluded)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1 or self.low == self.high:
            return _fmt(self.mean)
        return f"{_fmt(self.mean)} ({_fmt(self.low)}-{_fmt(self.high)})"

    def percent(self) -> str:
        """The same, as percentages of fractions."""
        if self.n == 0:
            return "n/a"
        if self.n == 1 or self.low == self.high:
            return f"{100 * self.mean:.1f}%"
        return f"{100 * self.mean:.1f}% ({100 * self.low:.1f}-{100 * self.high:.1f})"


def _fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def spread(values: Iterable[float | None]) -> Spread:
    """:class:`Spread` of the non-missing, finite values.

    >>> str(spread([1.0, 2.0, None, 3.0]))
    '2 (1-3)'
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.fmean(kept), min(kept), max(kept), len(kept))


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of positive values (NaN if there are none).

    >>> round(geometric_mean([0.5, 2.0]), 6)
    1.0
    """
    kept = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(math.log(v) for v in kept)) if kept else math.nan


def final(record: RunRecord, key: str) -> Any:
    """``record["final"][key]`` or ``None``."""
    return (record.get("final") or {}).get(key)
