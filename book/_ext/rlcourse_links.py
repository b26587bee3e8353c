"""Sphinx extension: the chapters' plain-Markdown citations and glossary links become MyST roles.

The committed chapters cite as ``[Rafailov et al. (2023)](bibliography.md#rafailov2023direct)``
and link a metric as ``[win rate](glossary.md#term-win-rate)``, which Jupyter Lab renders (it
shows a role such as ``{cite:t}`key``` as raw source). Before myst-nb parses a chapter, this
``source-read`` handler turns those links back into ``{cite:t}``, ``{cite:p}`` and ``{term}``
roles (:func:`rlcourse.book.citations.links_to_roles`), so the HTML book keeps
sphinxcontrib-bibtex's author-year citations, linked to the bibliography page, and the
glossary's term links. The committed notebooks are not changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

from rlcourse.book.citations import GLOSSARY_PAGE, glossary_terms, notebook_json_with_roles


def restore_roles(app: Sphinx, docname: str, source: list[str]) -> None:
    """``source-read`` handler: rewrite a notebook's markdown links as roles."""
    if Path(app.env.doc2path(docname)).suffix != ".ipynb":
        return
    glossary = Path(app.srcdir) / GLOSSARY_PAGE
    terms = glossary_terms(glossary) if glossary.is_file() else []
    source[0] = notebook_json_with_roles(source[0], terms)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", restore_roles)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
