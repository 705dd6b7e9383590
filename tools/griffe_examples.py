"""A griffe extension for the documentation site (mkdocs.yml loads it): fastmerge's
docstrings title their doctests ``Example:`` (the house rule; ``tests/test_docstrings.py``
runs them), which griffe's Google parser reads as an admonition; renamed ``Examples:``
before parsing, they render as code blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Render ``Example:`` sections as doctest code blocks."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rename the object's ``Example:`` section ``Examples:`` before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
