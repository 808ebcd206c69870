"""mkdocs hook: the docstrings cross-reference in Sphinx's spelling (``:func:`~pkg.mod.name```), which Markdown
shows literally; this renders each role as its code span, shortened to the last name where the target starts with
``~`` (as Sphinx does)."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_code, html)
