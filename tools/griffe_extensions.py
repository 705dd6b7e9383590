"""Griffe extensions for the documentation site (mkdocs.yml loads them).

* ``ExampleSections``: fastmerge's docstrings title their doctests ``Example:`` (the house
  rule; ``tests/test_docstrings.py`` runs them), which griffe's Google parser reads as an
  admonition; renamed ``Examples:`` before parsing, they render as code blocks.
* ``ShadowedSubmodules``: ``fastmerge.ops.gram`` is the function ``gram`` at run time (the
  package's ``from .gram import gram`` shadows the submodule of the same name), but griffe's
  static tree keeps the submodule there. Where the imported object shadows its submodule,
  the object takes the submodule's place, so ``::: fastmerge.ops`` documents every op under
  its public path and cross-references such as ``[gram][fastmerge.ops.gram]`` resolve.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Render ``Example:`` sections as doctest code blocks."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rename the object's ``Example:`` section ``Examples:`` before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)


class ShadowedSubmodules(griffe.Extension):
    """Put the run-time object in place of a submodule that it shadows."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Find every shadowed submodule of the loaded package, then replace them all."""
        found: list[tuple[griffe.Module, str, griffe.Object]] = []
        self._find(pkg, pkg, found)
        for module, name, obj in found:
            module.set_member(name, obj)

    def _find(self, pkg: griffe.Module, module: griffe.Module, found: list) -> None:
        for name, member in list(module.members.items()):
            if member.is_alias or not member.is_module:
                continue
            self._find(pkg, member, found)
            try:
                live = getattr(importlib.import_module(module.path), name)
            except (ImportError, AttributeError):
                continue
            if isinstance(live, types.ModuleType):
                continue
            path = f"{getattr(live, '__module__', '')}.{getattr(live, '__qualname__', '')}"
            if not path.startswith(pkg.path + "."):
                continue
            obj: Any = pkg
            for part in path.split(".")[1:]:
                obj = obj.members.get(part) if not obj.is_alias else None
                if obj is None:
                    break
            if obj is not None and not obj.is_alias:
                found.append((module, name, obj))
