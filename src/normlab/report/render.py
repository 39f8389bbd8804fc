"""Records -> ``report.md`` (figures as PNG files next to it) and a self-contained ``report.html``
(figures embedded), for every study in an output directory's manifest."""

from __future__ import annotations

import base64
import datetime
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from normlab._checks import fail
from normlab.experiments.judges import Verdict
from normlab.experiments.records import RunRecord, load_records
from normlab.experiments.runner import read_manifest
from normlab.experiments.studies import Options, get_study
from normlab.report.figures import figure_for

__all__ = ["StudyReport", "render_report", "study_reports"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyReport:
    """One study's section: its verdict, records grouped by label, and what is missing."""

    name: str
    title: str
    claim: str
    refuted_if: str
    options: Options
    verdict: Verdict
    groups: dict[str, list[RunRecord]]
    missing: int
    seconds: float


#: How every "mean (low-high)" in a report reads.
INTERVALS = (
    "Numbers over seeds read 'mean (smallest-largest)': the interval is the full range over the "
    "seeds, and the bands in the figures show the same range."
)


#: The CSS of normlab's HTML pages (study report, audit).
STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:.9em}td,th{border:1px solid #ccc;"
    "padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    ".badge{color:#fff;padding:.1em .5em;border-radius:.3em;font-weight:600}"
    ".meta{color:#666;font-size:.9em}section{margin-top:2.5em}"
)


def study_reports(out: Path) -> list[StudyReport]:
    """Judge every study of ``out``'s manifest on the records found there.

    Raises:
        FileNotFoundError: no manifest or no records (run a study first).
        ValueError: a corrupt or foreign record (the message names the file).
    """
    manifest = read_manifest(out)
    if not manifest:
        fail(
            FileNotFoundError,
            "normlab report",
            f"the directory {out}",
            "a study output directory (with studies.json)",
            "none found",
            "run `normlab study run NAME --out DIR` first, then `normlab report DIR`",
        )
    records = {r["config"].run_id: r for r in load_records(out)}
    reports = []
    for name, options in manifest.items():
        study = get_study(name)
        groups: dict[str, list[RunRecord]] = {}
        missing = 0
        for label, cfg in study.runs(options):
            record = records.get(cfg.run_id)
            if record is None:
                missing += 1
                continue
            groups.setdefault(label, []).append(record)
        verdict = (
            study.judge(groups)
            if groups
            else Verdict("inconclusive", "No run has finished yet.", (("",),))
        )
        seconds = sum(r["seconds"] for rs in groups.values() for r in rs)
        reports.append(
            StudyReport(
                study.name,
                study.title,
                study.claim,
                study.refuted_if,
                options,
                verdict,
                groups,
                missing,
                seconds,
            )
        )
    return reports


_BADGE = {"supported": "#1b7f3b", "not supported": "#b3261e", "inconclusive": "#8a6d00"}


def render_report(out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and ``report.html`` into ``out``; return both
    paths. Re-rendering never retrains."""
    out = Path(out)
    reports = study_reports(out)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = [
        "# normlab study report",
        "",
        f"Generated {stamp} from the records in `{out}`. {INTERVALS}",
        "",
    ]
    md += ["| study | verdict | runs |", "|---|---|---|"]
    md += [
        f"| [{r.name}](#{r.name}) | **{r.verdict.status}** | {sum(len(v) for v in r.groups.values())}"
        + (f" ({r.missing} missing)" if r.missing else "")
        + " |"
        for r in reports
    ]
    body: list[str] = []
    for r in reports:
        png = figures / f"{r.name}.png"
        if r.groups:
            fig = figure_for(r.name, r.groups, r.title)
            fig.savefig(png, dpi=110, bbox_inches="tight")
            plt.close(fig)
        seeds = max((len(v) for v in r.groups.values()), default=0)
        size = "quick" if r.options.quick else ("custom-length" if r.options.steps else "full")
        meta = (
            f"{size} run, data {r.options.data or get_study(r.name).data}, {seeds} seed(s) per "
            f"configuration, {r.seconds:.0f} s of training in all"
        )
        md += [
            "",
            f"## {r.name}",
            "",
            f"### {r.title}",
            "",
            f"**Claim.** {r.claim}",
            "",
            f"**Refuted if.** {r.refuted_if}",
            "",
            f"**Verdict: {r.verdict.status}.** {r.verdict.summary}",
            "",
            f"_{meta}._"
            + (
                f" **{r.missing} run(s) missing**: rerun the study to complete it."
                if r.missing
                else ""
            ),
            "",
        ]
        if png.exists() and r.groups:
            md += [f"![{r.name}](figures/{png.name})", ""]
        md += _md_table(r.verdict.table)
        body.append(_html_section(r, png if r.groups else None, meta))
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(_html_page(reports, body, stamp, out))
    return md_path, html_path


def _md_table(table: tuple[tuple[str, ...], ...]) -> list[str]:
    if len(table) < 2:
        return []
    header, *rows = table
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _html_section(r: StudyReport, png: Path | None, meta: str) -> str:
    e = html.escape
    parts = [
        f'<section id="{e(r.name)}"><h2>{e(r.name)}: {e(r.title)}</h2>',
        f"<p><b>Claim.</b> {e(r.claim)}</p><p><b>Refuted if.</b> {e(r.refuted_if)}</p>",
        f'<p><span class="badge" style="background:{_BADGE[r.verdict.status]}">{e(r.verdict.status)}</span> '
        f"{e(r.verdict.summary)}</p><p class=meta>{e(meta)}"
        + (
            f" &mdash; <b>{r.missing} run(s) missing</b>: rerun the study to complete it."
            if r.missing
            else ""
        )
        + "</p>",
    ]
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<img alt="{e(r.name)} figure" src="data:image/png;base64,{data}">')
    if len(r.verdict.table) > 1:
        header, *rows = r.verdict.table
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    return "\n".join(parts) + "</section>"


def _html_page(reports: list[StudyReport], body: list[str], stamp: str, out: Path) -> str:
    e = html.escape
    rows = "".join(
        f'<tr><td><a href="#{e(r.name)}">{e(r.name)}</a></td><td><span class="badge" '
        f'style="background:{_BADGE[r.verdict.status]}">{e(r.verdict.status)}</span></td>'
        f"<td>{sum(len(v) for v in r.groups.values())}</td></tr>"
        for r in reports
    )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>normlab study report</title>"
        f"<style>{STYLE}</style></head><body><h1>normlab study report</h1>"
        f"<p class=meta>Generated {e(stamp)} from the records in {e(str(out))}. "
        f"{e(INTERVALS)}</p>"
        f"<table><tr><th>study</th><th>verdict</th><th>runs</th></tr>{rows}</table>"
        + "\n".join(body)
        + "</body></html>\n"
    )
