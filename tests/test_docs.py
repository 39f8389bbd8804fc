"""The documentation site (mkdocs.yml, docs/): every Python example runs, and the site builds.

Each page's ```` ```python ```` blocks run in order in one namespace, fresh for each page, with
one thread, a seeded global RNG (restored afterwards) and the working directory in a temporary
folder (examples may write files). pytest turns warnings into errors, so an example that warns
fails. A block whose info string also holds the word ``no-run`` (spelled ```` ```python {.no-run}
```` so that Markdown still highlights it) is shown but not run: only for what cannot run in a
test, such as a full ``normlab study``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)


def _blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(first code line, code, runs)`` for every Python block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        words = match["info"].replace("{", " ").replace("}", " ").replace(".", " ").split()
        if not words or words[0] != "python":
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, textwrap.dedent(match["code"]), "no-run" not in words))
    return blocks


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


EXAMPLE_PAGES = [page for page in PAGES if any(runs for _, _, runs in _blocks(page))]


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLE_PAGES) >= 10
    skipped = [(_page_id(p), line) for p in PAGES for line, _, runs in _blocks(p) if not runs]
    assert len(skipped) <= 3, f"keep no-run examples rare: {skipped}"


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [_page_id(p) for p in PAGES if f": {_page_id(p)}" not in config]
    assert not missing, f"pages missing from the nav of mkdocs.yml: {missing}"


def test_studies_page_states_every_claim() -> None:
    from normlab.experiments.studies import available_studies, get_study

    text = " ".join((DOCS / "studies.md").read_text(encoding="utf-8").split())
    for name in available_studies():
        claim = " ".join(get_study(name).claim.split())
        fix = f"docs/studies.md is out of date: give study {name!r} a section with its claim"
        assert f"### {name} " in text, fix
        assert claim in text, fix


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{_page_id(page)}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for line, code, runs in _blocks(page):
                if runs:
                    # Padding with newlines makes tracebacks point at the page's own line numbers.
                    source = "\n" * (line - 1) + code
                    exec(compile(source, str(page), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("normlab.nn.BatchNorm2d", "normlab.surgery.recompute_population_stats"):
        assert f'id="{name}"' in api  # mkdocstrings rendered the reference
    # BatchNorm1d's docstring is built at import time (base + shape); only inspection sees it.
    assert "per-activation statistics over the batch" in api
