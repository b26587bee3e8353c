"""Sphinx extension: the plain Markdown the book is written in (what Jupyter Lab renders) becomes
the MyST the HTML book is built from.

The committed chapters cite as ``[Rafailov et al. (2023)](bibliography.md#rafailov2023direct)``
and link a metric as ``[win rate](glossary.md#term-win-rate)``; the pages (``glossary.md``,
``bibliography.md``, ``intro.md``...) hold glossary entries, a reference list, anchors and page
links in plain Markdown too, since Lab shows a MyST role or directive as source. Before myst-nb
or myst-parser parses a document, this ``source-read`` handler rewrites it: a chapter's markdown
cells get their links back as ``{cite:t}``, ``{cite:p}`` and ``{term}`` roles
(:func:`rlcourse.book.citations.notebook_json_with_roles`), a page gets roles, ``{glossary}``
and ``{bibliography}`` directives, labels, ``{ref}``/``{doc}`` roles and the table of contents
(:func:`rlcourse.book.pages.page_to_myst`). So the HTML book keeps sphinxcontrib-bibtex's
author-year citations and bibliography and the glossary's term links. The committed files are
not changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

from rlcourse.book.citations import GLOSSARY_PAGE, glossary_terms, notebook_json_with_roles
from rlcourse.book.pages import page_to_myst


def restore_myst(app: Sphinx, docname: str, source: list[str]) -> None:
    """``source-read`` handler: a notebook's markdown links as roles, a page as MyST."""
    suffix = Path(app.env.doc2path(docname)).suffix
    if suffix not in (".ipynb", ".md"):
        return
    glossary = Path(app.srcdir) / GLOSSARY_PAGE
    terms = glossary_terms(glossary) if glossary.is_file() else []
    if suffix == ".ipynb":
        source[0] = notebook_json_with_roles(source[0], terms)
    else:
        source[0] = page_to_myst(source[0], terms)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", restore_myst)
    return {"version": "1.1", "parallel_read_safe": True, "parallel_write_safe": True}
