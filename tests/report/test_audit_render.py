"""The audit's HTML section/page and rich table."""

from __future__ import annotations

import io

from normlab.audit import AuditReport, Finding
from normlab.report.audit import audit_html_page, audit_html_section, audit_table

FINDING = Finding(
    check="modes",
    severity="warning",
    title="momentum <0.99> looks like [Keras]",
    modules=("", "block.bn"),
    evidence={"momentum": {"block.bn": 0.99}},
    cost="a & b",
    fix="use 0.01",
    fixable=True,
)


def test_html_escapes_and_lists_every_finding() -> None:
    report = AuditReport(findings=(FINDING,), checks=("modes",), samples=10, seconds=0.5)
    section = audit_html_section(report)
    assert "momentum &lt;0.99&gt; looks like [Keras]" in section
    assert "a &amp; b" in section
    assert "&lt;input&gt;, block.bn" in section
    assert "(apply_fixes)" in section
    assert "0.99" in section  # the evidence
    page = audit_html_page(report, "audit of <x>")
    assert page.startswith("<!doctype html>")
    assert "<title>audit of &lt;x&gt;</title>" in page
    empty = AuditReport(findings=(), checks=("modes",), skipped={"small-batch": "no size"})
    assert "No findings." in audit_html_section(empty)
    assert "small-batch (no size)" in audit_html_section(empty)


def test_rich_table_keeps_brackets_literal() -> None:
    from rich.console import Console

    report = AuditReport(findings=(FINDING,), checks=("modes",))
    out = io.StringIO()
    Console(file=out, width=200).print(audit_table(report))
    text = out.getvalue()
    assert "looks like [Keras]" in text  # escaped, not read as markup
    assert "warning" in text
