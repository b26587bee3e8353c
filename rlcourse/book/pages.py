"""The book's Markdown pages read in Jupyter Lab, and become MyST for the HTML build (tooling).

The README sends readers to ``jupyter lab book/``, where ``glossary.md``, ``bibliography.md``,
``intro.md`` and ``notation.md`` open as Markdown (a chapter's citation or glossary link opens
its page in Lab's Markdown preview, scrolled to the entry). Lab renders CommonMark: a MyST role,
directive or label would show as source. So the committed pages are plain Markdown, and the HTML
build turns a few plain forms back into MyST (:func:`page_to_myst`, called by
``book/_ext/rlcourse_links.py`` on every page; a chapter's markdown cells get
:func:`rlcourse.book.citations.links_to_roles`):

==========================================================  ====================================
plain Markdown (what Lab shows)                             MyST (what the HTML build parses)
==========================================================  ====================================
``[Hong et al. (2024)](bibliography.md#hong2024orpo)``      ``{cite:t}`hong2024orpo```
``[win rate](glossary.md#term-win-rate)``                   ``{term}`win rate```
a glossary entry (below)                                    an item of a ``{glossary}`` block
the reference list between :data:`REFERENCES_BEGIN` and     ``{bibliography}`` with ``:all:``
:data:`REFERENCES_END`
``<a id="glossary-concepts"></a>`` alone on a line          the label ``(glossary-concepts)=``
``[Concepts](#glossary-concepts)`` (an anchor of the page)  ``{ref}`Concepts <glossary-concepts>```
``[the notation](notation.md)``, ``[1](01_why_rl.ipynb)``   ``{doc}`the notation <notation>```
:data:`TOC_MARKER` alone on a line                          ``{tableofcontents}``
==========================================================  ====================================

A glossary entry is the term in bold after its anchor (the id Sphinx gives the term), a
backslash (a line break), then the definition indented by two spaces; entries are separated
by blank lines, and consecutive entries make one ``{glossary}`` block::

    <a id="term-win-rate"></a>**win rate**\\
      The fraction of held-out prompts on which a judge prefers the model's answer ...
      ... (further lines indented by two spaces; a blank line and an indented line continue it)

:func:`raw_myst` is the check: the MyST syntax a page or cell still holds that Lab would show
as source. The reference list is written from ``references.bib`` by :func:`reference_list`
(``python -m rlcourse.book.citations --references`` refreshes it in ``bibliography.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from rlcourse.book.citations import (
    BOOK_DIR,
    GLOSSARY_ENTRY,
    links_to_roles,
    term_anchor,
)

REFERENCES_BEGIN = "<!-- references: begin"
REFERENCES_END = "<!-- references: end -->"
#: Where the HTML book's table of contents goes (Lab hides the comment).
TOC_MARKER = "<!-- tableofcontents -->"

_ANCHOR_LINE = re.compile(r'^<a id="([\w-]+)"></a>[ \t]*$', re.M)
_PAGE_LINK = re.compile(r"\[([^\]\n]+)\]\(([\w-]+)\.(?:md|ipynb)\)")


# --------------------------------------------------------------------------- what Lab shows raw

#: MyST syntax CommonMark renderers show as source: roles, directives (backtick, tilde and colon
#: fences), target labels, MyST comments and block breaks.
_RAW_MYST = (
    ("role", re.compile(r"(?<![`\\])\{[a-z][\w:+-]*\}`[^`\n]*`")),
    ("directive", re.compile(r"^[ \t]*(?:`{3,}|~{3,})[ \t]*\{[a-z][\w:-]*\}.*$", re.M)),
    ("colon fence", re.compile(r"^[ \t]*:{3,}.*$", re.M)),
    ("target label", re.compile(r"^[ \t]*\([\w-]+\)=[ \t]*$", re.M)),
    ("MyST comment", re.compile(r"^%.*$", re.M)),
    ("block break", re.compile(r"^\+{3}.*$", re.M)),
)
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)


def _without_code(markdown: str) -> str:
    """``markdown`` with the lines of fenced code blocks blanked (a directive's fence, whose
    info string starts with ``{``, and its content are kept)."""
    out, fence, code = [], "", False
    for line in markdown.split("\n"):
        match = _FENCE.match(line)
        if not fence and match:
            fence, code = match.group(1), not match.group(2).strip().startswith("{")
        elif fence and match and match.group(1).startswith(fence) and not match.group(2).strip():
            fence, line = "", "" if code else line
        out.append("" if fence and code else line)
    return "\n".join(out)


def raw_myst(markdown: str) -> list[str]:
    """The MyST syntax in ``markdown`` that Jupyter Lab would show as source, as
    ``"role {cite:t}`key`"``, ``"directive ```{glossary}"``...; code blocks (a fence without a
    ``{name}``) and maths are left out."""
    text = _MATH.sub(" ", _without_code(markdown))
    return [f"{kind} {m.group(0).strip()[:60]}" for kind, pattern in _RAW_MYST
            for m in pattern.finditer(text)]


# --------------------------------------------------------------------------- glossary


def glossary_to_myst(markdown: str) -> str:
    """The glossary entries of ``markdown`` as ``{glossary}`` blocks (one per run of entries).

    Raises ``ValueError`` naming the line of an entry whose anchor is not its term's, or
    whose definition is not indented.
    """
    lines = markdown.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not GLOSSARY_ENTRY.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        out.append("```{glossary}")
        while i < len(lines) and GLOSSARY_ENTRY.match(lines[i]):
            anchor, term = GLOSSARY_ENTRY.match(lines[i]).groups()
            if anchor != term_anchor(term):
                raise ValueError(f"line {i + 1}: the anchor of {term!r} must be "
                                 f"{term_anchor(term)!r}, not {anchor!r}")
            out.append(term)
            i += 1
            if i >= len(lines) or not lines[i].startswith("  "):
                raise ValueError(f"line {i}: {term!r} needs a definition indented by two spaces")
            # the definition: indented lines, and blank lines followed by an indented one
            while i < len(lines) and (lines[i].startswith("  ") or (
                    not lines[i].strip() and i + 1 < len(lines)
                    and lines[i + 1].startswith("  "))):
                out.append(lines[i])
                i += 1
            # blank lines between two entries stay inside the block
            j = i
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and GLOSSARY_ENTRY.match(lines[j]):
                out.extend(lines[i:j])
                i = j
        out.append("```")
    return "\n".join(out)


# --------------------------------------------------------------------------- bibliography


def reference_list(bib: Path = BOOK_DIR / "references.bib") -> str:
    """Every entry of ``bib`` as a Markdown list item with its key as anchor, in the order and
    style of the HTML book's bibliography (pybtex's ``plain`` style), between the markers."""
    from pybtex.database import parse_file
    from pybtex.plugin import find_plugin

    style = find_plugin("pybtex.style.formatting", "plain")()
    backend = find_plugin("pybtex.backends", "markdown")()
    entries = style.format_bibliography(parse_file(str(bib), bib_format="bibtex"))
    items = [f'- <a id="{e.key}"></a>' + " ".join(e.text.render(backend).split("\n"))
             for e in entries]
    return "\n".join([
        f"{REFERENCES_BEGIN} (written from references.bib by `python -m rlcourse.book.citations "
        "--references`; the HTML book shows its bibliography directive here) -->",
        *items, REFERENCES_END])


def _reference_block(markdown: str) -> tuple[int, int] | None:
    start = markdown.find(REFERENCES_BEGIN)
    if start < 0:
        return None
    end = markdown.find(REFERENCES_END, start)
    if end < 0:
        raise ValueError(f"{REFERENCES_BEGIN} ... without {REFERENCES_END}")
    return start, end + len(REFERENCES_END)


def with_reference_list(markdown: str, references: str) -> str:
    """``markdown`` with the block between the markers replaced by ``references``."""
    block = _reference_block(markdown)
    if block is None:
        raise ValueError(f"no {REFERENCES_BEGIN} ... {REFERENCES_END} block")
    return markdown[: block[0]] + references + markdown[block[1]:]


def references_to_myst(markdown: str) -> str:
    """The reference list replaced by the ``{bibliography}`` directive (all entries)."""
    block = _reference_block(markdown)
    if block is None:
        return markdown
    return markdown[: block[0]] + "```{bibliography}\n:all:\n```" + markdown[block[1]:]


# --------------------------------------------------------------------------- a whole page


def page_to_myst(markdown: str, terms: Iterable[str]) -> str:
    """A committed page (plain Markdown, what Lab shows) as the MyST the HTML build parses."""
    text = references_to_myst(markdown)
    text = glossary_to_myst(text)
    text = links_to_roles(text, terms)
    anchors = set(_ANCHOR_LINE.findall(text))
    text = _ANCHOR_LINE.sub(lambda m: f"({m.group(1)})=", text)
    text = re.sub(r"\[([^\]\n]+)\]\(#([\w-]+)\)",
                  lambda m: ("{ref}`" + f"{m.group(1)} <{m.group(2)}>`" if m.group(2) in anchors
                             else m.group(0)), text)
    text = _PAGE_LINK.sub(lambda m: "{doc}`" + (m.group(1) if m.group(1) == m.group(2) else
                                                 f"{m.group(1)} <{m.group(2)}>") + "`", text)
    return re.sub(rf"^{re.escape(TOC_MARKER)}[ \t]*$", "```{tableofcontents}\n```", text,
                  flags=re.M)


def book_pages(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The Markdown pages of the book (``intro.md``, ``glossary.md``...)."""
    return sorted(book_dir.glob("*.md"))


def page_problems(path: Path, terms: Iterable[str] | None = None) -> list[str]:
    """What a reader of ``path`` in Jupyter Lab would see wrong, as ``"NAME: ..."``: raw MyST,
    a citation whose text is not the bibliography's, a glossary link to no term (``terms``: the
    glossary's, by default), a glossary entry the HTML build cannot read."""
    from rlcourse.book.citations import glossary_terms, load_bibliography, markdown_problems

    name, text = Path(path).name, Path(path).read_text(encoding="utf-8")
    terms = glossary_terms() if terms is None else list(terms)
    problems = [f"{name}: raw MyST {p}" for p in raw_myst(text)]
    # citation links whose text or key disagrees with references.bib, links to no term
    problems += [f"{name}: {p}" for p in markdown_problems(text, load_bibliography(), terms)
                 if not p.startswith("raw MyST role")]
    try:
        myst = page_to_myst(text, terms)
    except (KeyError, ValueError) as error:
        return [*problems, f"{name}: {error}"]
    # an entry written in another form (no bold, no backslash) is left as plain text
    problems += [f"{name}: line {text[: text.find(a)].count(chr(10)) + 1}: {a} starts no "
                 "glossary entry (write <a id=\"term-...\"></a>**term**\\)"
                 for a in re.findall(r'<a id="term-[^"]*"></a>', myst)]
    return problems
