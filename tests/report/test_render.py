"""Reports: rendered from records alone, self-contained HTML, honest about missing runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from normlab.experiments.studies import available_studies, get_study
from normlab.report import render_report, study_reports
from normlab.report.figures import FIGURES
from tests.conftest import TINY


@pytest.fixture
def study_dir(tiny_study_dir: Path) -> Path:
    return tiny_study_dir


def test_every_study_has_a_figure() -> None:
    assert set(FIGURES) == set(available_studies())


def test_report_has_every_study_with_verdict_figure_and_table(study_dir: Path) -> None:
    md_path, html_path = render_report(study_dir)
    md, page = md_path.read_text(), html_path.read_text()
    for name in available_studies():
        assert f"## {name}" in md
        assert (study_dir / "figures" / f"{name}.png").stat().st_size > 5000
        assert f'id="{name}"' in page
    assert len(re.findall(r"\*\*Verdict: (supported|not supported|inconclusive)\.\*\*", md)) == 9
    assert page.count('src="data:image/png;base64,') == 9  # self-contained: no file references
    assert "figures/" not in page
    assert "<table>" in page
    assert "mean (smallest-largest)" in md
    assert "mean (smallest-largest)" in page


def test_re_rendering_reads_records_only_and_reports_missing_runs(
    study_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    (copy / "studies.json").write_text((study_dir / "studies.json").read_text())
    wanted = {cfg.run_id for _, cfg in get_study("dropout").runs(TINY)}
    files = sorted((study_dir / "runs").glob("*.json"))
    kept = [f for f in files if f.stem in wanted][:2]  # 2 of the dropout study's 6 runs
    for f in kept:
        (copy / "runs" / f.name).write_text(f.read_text())
    reports = {r.name: r for r in study_reports(copy)}
    assert reports["dropout"].missing == 4
    assert reports["landscape"].verdict.status == "inconclusive"  # nothing there yet
    md, _ = render_report(copy)
    assert "**4 run(s) missing**: rerun the study to complete it." in md.read_text()


def test_report_errors(tmp_path: Path, study_dir: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"a study output directory \(with studies\.json\), got none found\. Fix: run `normlab study run NAME --out DIR` first",
    ):
        render_report(tmp_path)
    broken = tmp_path / "broken"
    (broken / "runs").mkdir(parents=True)
    (broken / "studies.json").write_text((study_dir / "studies.json").read_text())
    (broken / "runs" / "x.json").write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(
        ValueError, match=r"x\.json must be a record with \"schema\": 'normlab\.run'"
    ):
        render_report(broken)
