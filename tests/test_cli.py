"""The command line: parses, calls, prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

import normlab
from normlab.cli import main


def test_demo_prints_both_accuracies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy, norm=none:" in out
    assert "final test accuracy, norm=batch:" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_option_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--epochs", "many"])
    assert info.value.code == 2


def test_python_dash_m_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"normlab {normlab.__version__}"
