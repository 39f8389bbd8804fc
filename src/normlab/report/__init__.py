"""Study records -> figures -> ``report.md`` and a self-contained ``report.html``."""

from normlab.report.render import StudyReport, render_report, study_reports

__all__ = ["StudyReport", "render_report", "study_reports"]
