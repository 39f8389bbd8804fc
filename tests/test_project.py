"""The project's promises about itself: the README commands, CI, and the set-up pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```")
    assert "## " not in text[:first_block]  # nothing but the title and a line before them
    main_job, tests = _readme_commands()
    assert main_job.endswith("normlab study")
    assert tests.endswith("python -m pytest -n 2")  # CI has 2 cores
    for command in (main_job, tests):
        assert "\n" not in command
        assert "-c constraints.txt" in command


def test_ci_runs_the_readme_test_command_and_lints() -> None:
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    _, tests = _readme_commands()
    body = [line for line in script if line and not line.startswith(("#", "set ", "cd "))]
    assert body[0] == tests
    assert any(line.startswith(".venv/bin/ruff check") for line in body)
    assert ".venv/bin/mypy" in body


def test_torch_is_pinned_for_set_up_and_loose_in_the_package() -> None:
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    assert torch_dep.startswith("torch>=")


def test_package_ships_py_typed() -> None:
    assert (ROOT / "src" / "normlab" / "py.typed").exists()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["normlab"]
    assert config["project"]["scripts"]["normlab"] == "normlab.cli:main"
