"""Fixtures shared by several test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from normlab.experiments.runner import execute, update_manifest
from normlab.experiments.studies import Options, available_studies, get_study

#: Every study, as small as it gets: digits, one seed, four steps per run.
TINY = Options(data="digits", seeds=1, steps=4)


@pytest.fixture(scope="session")
def tiny_study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory holding a tiny run of every study (trained once per session)."""
    out = tmp_path_factory.mktemp("study")
    names = list(available_studies())
    update_manifest(out, names, TINY)
    configs = [cfg for name in names for _, cfg in get_study(name).runs(TINY)]
    execute(configs, out, workers=1)
    return out
