"""Render library code inside a chapter, so the book never keeps a second copy of it."""

from __future__ import annotations

import inspect
import textwrap
from typing import Any


def source_of(obj: Any) -> str:
    """The source text of a function, class or module, dedented."""
    return textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n"


def show_source(*objs: Any, docstring: bool = True) -> Any:
    """Display the source of one or more ``rlcourse`` objects with syntax highlighting.

    In Jupyter this returns an ``IPython.display.Code`` object (rendered in the notebook and in
    the HTML book); outside IPython it returns the plain text. ``docstring=False`` drops the
    docstring, useful when the chapter has just shown the formula in LaTeX.
    """
    parts = []
    for obj in objs:
        text = source_of(obj)
        if not docstring:
            text = _strip_docstring(text)
        parts.append(text)
    text = "\n\n".join(parts)
    try:
        from IPython.display import Code
    except ImportError:  # pragma: no cover
        return text
    return Code(text, language="python")


def _strip_docstring(text: str) -> str:
    import ast

    tree = ast.parse(text)
    node = tree.body[0] if tree.body else None
    if (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(getattr(node.body[0], "value", None), ast.Constant)
        and isinstance(node.body[0].value.value, str)
    ):
        doc = node.body[0]
        lines = text.splitlines()
        del lines[doc.lineno - 1 : doc.end_lineno]
        return "\n".join(lines) + "\n"
    return text
