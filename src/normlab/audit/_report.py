"""What an audit returns: findings with evidence, cost and fix, as data (rendering is elsewhere)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CHECKS", "AuditReport", "Finding", "Severity"]

Severity = Literal["error", "warning", "info"]

#: The checks, in the order they run and are reported (``audit(checks=...)`` picks a subset).
CHECKS = (
    "input-scale",
    "bias-before-norm",
    "stale-statistics",
    "dropout-before-norm",
    "small-batch",
    "self-normalizing",
    "activations",
    "modes",
    "fusion",
)

_RANK = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One problem the audit found.

    ``check``: which check (one of :data:`CHECKS`); ``modules``: the model's module names
    involved (``""`` is the model input); ``evidence``: the measured numbers behind it;
    ``cost``: what it costs, in words with numbers; ``fix``: what to do; ``fixable``: whether
    :func:`normlab.audit.apply_fixes` repairs it mechanically in a copy.
    """

    check: str
    severity: Severity
    title: str
    modules: tuple[str, ...]
    evidence: dict[str, Any]
    cost: str
    fix: str
    fixable: bool = False


@dataclass(frozen=True)
class AuditReport:
    """All findings of one audit, most severe first, with what was measured.

    ``checks``: the checks that ran; ``skipped``: ``{check: reason}`` for those that could not
    (e.g. no loss function for the loss comparison); ``samples``: inputs measured;
    ``seconds``: wall time.
    """

    findings: tuple[Finding, ...]
    checks: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No finding at all."""
        return not self.findings

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "normlab.audit",
            "version": 1,
            "checks": list(self.checks),
            "skipped": dict(self.skipped),
            "samples": self.samples,
            "seconds": self.seconds,
            "findings": [
                {**asdict(f), "modules": list(f.modules), "evidence": _plain(f.evidence)}
                for f in self.findings
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (schema ``normlab.audit`` v1)."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        if not self.findings:
            return f"normlab audit: no findings ({len(self.checks)} checks, {self.samples} samples)"
        lines = [f"normlab audit: {len(self.findings)} finding(s), {self.samples} samples"]
        for f in self.findings:
            where = ", ".join(m or "<input>" for m in f.modules[:4])
            lines.append(f"[{f.severity}] {f.check}: {f.title}" + (f" ({where})" if where else ""))
            lines.append(f"    cost: {f.cost}")
            lines.append(f"    fix:  {f.fix}" + ("  [apply_fixes]" if f.fixable else ""))
        return "\n".join(lines)


def sort_findings(findings: list[Finding]) -> tuple[Finding, ...]:
    order = {c: i for i, c in enumerate(CHECKS)}
    return tuple(sorted(findings, key=lambda f: (_RANK[f.severity], order.get(f.check, 99))))


def _plain(value: Any) -> Any:
    """Evidence as JSON-able values (floats rounded to 6 significant digits)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)
