"""Griffe extension for the documentation site (see mkdocs.yml): normlab's docstrings as Markdown.

normlab's docstrings are Google style with a few reStructuredText habits (they are also read by
``help()`` and by doctest). For the site only, this extension rewrites them:

* an ``Example:`` (or ``Example (what it shows):``) section becomes an ``Examples:`` section, which
  mkdocstrings renders as highlighted code -- a plain ``Example:`` would be an admonition whose
  ``>>>`` lines Markdown reads as nested quotes and whose ``['a', 'b']`` outputs as links;
* a doctest outside such a section becomes a fenced code block;
* ``.. math:: formula`` (with its indented continuation lines) becomes a code block;
* the roles ``:class:`x```, ``:func:`x```, ... become plain code spans.

The source docstrings are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLES = re.compile(r"^(\s*)Examples?(?: \((.+)\))?:\s*$")
_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def markdown_docstring(text: str) -> str:
    """``text`` with the rewrites listed in the module docstring."""
    lines = text.splitlines()
    out: list[str] = []
    examples_indent: int | None = None  # indentation of the enclosing "Examples:" header
    i = 0
    while i < len(lines):
        line = lines[i]
        if examples_indent is not None and line.strip() and _indent(line) <= examples_indent:
            examples_indent = None
        header = _EXAMPLES.match(line)
        math = _MATH.match(line)
        if header:
            indent = header.group(1)
            out.append(f"{indent}Examples:")
            if header.group(2):
                out.append(f"{indent}    {header.group(2)}:")
            examples_indent = len(indent)
            i += 1
        elif math:
            indent, formula = math.group(1), [math.group(2).strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(indent):
                formula.append(lines[i].strip())
                i += 1
            out += ["", f"{indent}```text", f"{indent}{' '.join(formula)}", f"{indent}```", ""]
        elif examples_indent is None and line.lstrip().startswith(">>>"):
            indent = line[: _indent(line)]
            block = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(indent):
                block.append(lines[i])
                i += 1
            out += ["", f"{indent}```pycon", *block, f"{indent}```", ""]
        else:
            out.append(_ROLE.sub(r"`\1`", line))
            i += 1
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Apply :func:`markdown_docstring` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
