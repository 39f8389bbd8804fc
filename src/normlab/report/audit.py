"""An :class:`~normlab.audit.AuditReport` as HTML (a section, or a whole page) and as a rich
table for the terminal."""

from __future__ import annotations

import html
import json

from normlab.audit import AuditReport
from normlab.report.render import STYLE

__all__ = ["audit_html_page", "audit_html_section", "audit_table"]

_COLOURS = {"error": "#b3261e", "warning": "#b26a00", "info": "#3c6e9f"}


def audit_html_section(report: AuditReport, title: str = "Audit") -> str:
    """One ``<section>``: a summary line and a table of the findings with evidence and fix."""
    e = html.escape
    head = (
        f"<section id=audit><h2>{e(title)}</h2><p class=meta>{len(report.findings)} finding(s) "
        f"from {len(report.checks)} checks on {report.samples} samples in "
        f"{report.seconds:.1f} s.</p>"
    )
    if report.skipped:
        head += (
            "<p class=meta>Skipped: "
            + "; ".join(f"{e(k)} ({e(v)})" for k, v in report.skipped.items())
            + "</p>"
        )
    if not report.findings:
        return head + "<p>No findings.</p></section>"
    rows = [
        "<table><tr><th>severity</th><th>check</th><th>finding</th><th>modules</th>"
        "<th>cost</th><th>fix</th><th>evidence</th></tr>"
    ]
    for f in report.findings:
        modules = ", ".join(m or "<input>" for m in f.modules)
        evidence = json.dumps(report.to_dict()["findings"][report.findings.index(f)]["evidence"])
        rows.append(
            f'<tr><td><span class="badge" style="background:{_COLOURS[f.severity]}">'
            f"{e(f.severity)}</span></td><td>{e(f.check)}</td><td>{e(f.title)}</td>"
            f"<td>{e(modules)}</td><td>{e(f.cost)}</td><td>{e(f.fix)}"
            + (" <b>(apply_fixes)</b>" if f.fixable else "")
            + f"</td><td><code>{e(evidence)}</code></td></tr>"
        )
    return head + "".join(rows) + "</table></section>"


def audit_html_page(report: AuditReport, title: str = "normlab audit") -> str:
    """A self-contained HTML page with :func:`audit_html_section`."""
    e = html.escape
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
        + audit_html_section(report, "Findings")
        + "</body></html>\n"
    )


def audit_table(report: AuditReport) -> object:
    """A ``rich.table.Table`` of the findings (print it with ``rich.console.Console``)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"normlab audit: {len(report.findings)} finding(s), {report.samples} samples",
        show_lines=True,
    )
    for column in ("severity", "check", "finding", "cost", "fix"):
        table.add_column(column, overflow="fold")
    styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    for f in report.findings:
        modules = ", ".join(m or "<input>" for m in f.modules[:6])
        table.add_row(
            f"[{styles[f.severity]}]{f.severity}[/]",
            f.check,
            escape(f.title + (f"\n{modules}" if modules else "")),
            escape(f.cost),
            escape(f.fix) + (" [bold](apply_fixes)[/]" if f.fixable else ""),
        )
    return table
