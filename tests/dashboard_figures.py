"""The dashboard's headline figures (``views.figures``) read back from an ``AppTest`` run, as the page shows them.

Each figure is a block holding a Markdown label over a heading; both are Markdown-escaped
(``\\$908.84``), so the text is unescaped here to what a reader sees.
"""

from __future__ import annotations

import re
from typing import Any

from streamlit.testing.v1 import AppTest

__all__ = ["figure", "figures"]

_ESCAPE = re.compile(r"\\(.)")


def _unescaped(text: str) -> str:
    return _ESCAPE.sub(r"\1", text)


def figures(at: AppTest) -> dict[str, str]:
    """Every headline figure on the page's main area: label -> value, in page order."""
    found: dict[str, str] = {}

    def walk(node: Any) -> None:
        children = list(getattr(node, "children", {}).values())
        if [getattr(child, "type", None) for child in children] == ["markdown", "header"]:
            found[_unescaped(children[0].value)] = _unescaped(children[1].value)
            return
        for child in children:
            walk(child)

    walk(at.main)
    return found


def figure(at: AppTest, label: str) -> str:
    """The value of the figure labelled ``label`` (or whose label starts with it, for labels that carry dates)."""
    shown = figures(at)
    for name, value in shown.items():
        if name == label or name.startswith(label):
            return value
    raise AssertionError(f"no figure {label!r}; have {list(shown)}")
