"""Sphinx extension: the setup cell of every chapter starts collapsed in the HTML book.

A chapter's first code cell holds its imports and settings (``pick(full=..., quick=...)``);
the reader needs it to run the notebook, not to read the page. When the book is built, the
first code cell of each ``NN_*.ipynb`` gets the Jupyter Book tag ``hide-input`` (the code
behind a "Show code cell source" toggle, its output, if any, shown), unless the chapter
already tagged it ``hide-input``, ``hide-cell``, ``remove-input`` or ``remove-cell``. The
committed notebooks are not changed; chapters may carry the tag themselves as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

HIDING_TAGS = {"hide-input", "hide-cell", "remove-input", "remove-cell"}


def tag_setup_cell(notebook: dict[str, Any]) -> bool:
    """Add ``hide-input`` to the first code cell; ``True`` if the notebook changed."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if HIDING_TAGS & set(tags):
            return False
        tags.append("hide-input")
        return True
    return False


def collapse_setup_cell(app: Sphinx, docname: str, source: list[str]) -> None:
    """``source-read`` handler: rewrite a chapter notebook's JSON before myst-nb parses it."""
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".ipynb" or not path.name[:2].isdigit():
        return
    notebook = json.loads(source[0])
    if tag_setup_cell(notebook):
        source[0] = json.dumps(notebook)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", collapse_setup_cell)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
