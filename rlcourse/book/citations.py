"""Citations and glossary links that read in Jupyter Lab and in the HTML book (book tooling).

Jupyter Lab renders a notebook's markdown as CommonMark: Jupyter Book's MyST roles
(``{cite:t}`key```, ``{cite:p}`key```, ``{term}`win rate```) would show as raw source there.
So the committed chapters hold plain Markdown links that both renderers understand, and the HTML
build turns them back into roles (``book/_ext/rlcourse_links.py`` calls :func:`links_to_roles`
on every chapter before myst-nb parses it), so the HTML book keeps sphinxcontrib-bibtex's
citations and bibliography and the glossary's term links:

- ``{cite:t}`key``` is ``[Rafailov et al. (2023)](bibliography.md#key)``;
- ``{cite:p}`a,b``` is ``([Rafailov et al., 2023](bibliography.md#a); [Hong et al.,
  2024](bibliography.md#b))`` (one line in a notebook);
- ``{term}`win rate``` is ``[win rate](glossary.md#term-win-rate)`` and ``{term}`x <T>``` is
  ``[x](glossary.md#term-t)`` (the anchor names the glossary term T).

The author-year text comes from ``book/references.bib`` (:func:`load_bibliography`: one author
"Sutton (2018)", two "Sutton and Barto (2018)", more "Rafailov et al. (2023)"); a glossary
anchor is ``term-`` and the term as Sphinx makes ids (lower case, runs of other characters as
one hyphen), so it is the glossary page's own anchor. :func:`roles_to_links` converts a chapter
written with roles (:func:`convert_notebook` rewrites a notebook's markdown cells, nothing else);
:func:`markdown_problems` is the check that no raw role is left and that every link's text and
target agree with the bibliography and the glossary.

    python -m rlcourse.book.citations book/NN_name.ipynb ...   # convert roles to links
    python -m rlcourse.book.citations --check                  # raw MyST, bad links (all)
    python -m rlcourse.book.citations --references             # bibliography.md's list
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlcourse.files import atomic_write_text

BOOK_DIR = Path(__file__).resolve().parents[2] / "book"
BIBLIOGRAPHY_PAGE = "bibliography.md"
GLOSSARY_PAGE = "glossary.md"

#: A MyST role as the chapters used them: ``{cite:t}`key```, ``{cite:p}`a,b```, ``{term}`x```.
ROLE = re.compile(r"\{(cite(?::[a-z]+)?|term)\}`([^`]+)`")
#: Any role whose name would mean nothing to Jupyter Lab (what :func:`raw_roles` reports).
RAW_ROLE = re.compile(r"\{(?:cite(?::[a-z]+)?|term|doc|ref|numref|eq|glossary)\}`[^`]*`")
_LINK = r"\[([^\]\n]+)\]\(" + re.escape(BIBLIOGRAPHY_PAGE) + r"#([\w:.-]+)\)"
#: One item of a parenthetical citation: its text has no parentheses ("Hong et al., 2024"),
#: unlike a textual one's ("Hong et al. (2024)", which may itself stand in parentheses).
_ITEM = r"\[([^\]\n()]+)\]\(" + re.escape(BIBLIOGRAPHY_PAGE) + r"#([\w:.-]+)\)"
#: A parenthetical citation: items separated by "; " inside parentheses.
_CITE_P = re.compile(r"\((" + _ITEM + r"(?:; " + _ITEM + r")*)\)")
_CITE_LINK = re.compile(_LINK)
_TERM_LINK = re.compile(r"\[([^\]\n]+)\]\(" + re.escape(GLOSSARY_PAGE) + r"#(term-[\w-]+)\)")


@dataclass(frozen=True)
class Reference:
    """What a citation shows: the authors as the text cites them and the year."""

    authors: str
    year: str

    def textual(self) -> str:
        """``{cite:t}``'s text: "Rafailov et al. (2023)"."""
        return f"{self.authors} ({self.year})"

    def parenthetical(self) -> str:
        """One item of ``{cite:p}``: "Rafailov et al., 2023"."""
        return f"{self.authors}, {self.year}"


def _plain(latex: str) -> str:
    """BibTeX name text as Unicode: accents decoded (``M{\\"a}chler`` -> Mächler), braces gone."""
    from pybtex.richtext import Text

    return Text.from_latex(latex).render_as("text")


def load_bibliography(path: Path = BOOK_DIR / "references.bib") -> dict[str, Reference]:
    """Every entry of a BibTeX file as its citation text (needs ``pybtex``, which Jupyter Book's
    sphinxcontrib-bibtex installs): last names of one or two authors joined by "and", the first
    author's and "et al." for three or more (or for a list ending in "others")."""
    from pybtex.database import parse_file

    references = {}
    for key, entry in parse_file(str(path), bib_format="bibtex").entries.items():
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_plain(" ".join(p.prelast_names + p.last_names)) for p in people]
        others = bool(names) and names[-1] == "others"
        names = [n for n in names if n != "others"]
        if not names:
            authors = _plain(entry.fields.get("organization", key))
        elif len(names) >= 3 or others:
            authors = f"{names[0]} et al."
        else:
            authors = " and ".join(names)
        references[key] = Reference(authors, str(entry.fields.get("year", "n.d.")))
    return references


#: A glossary entry of ``glossary.md``: the term's anchor, the term in bold, a line break
#: (``rlcourse.book.pages`` describes the format; the HTML build makes it a ``{glossary}`` item).
GLOSSARY_ENTRY = re.compile(r'^<a id="(term-[\w-]+)"></a>\*\*(.+?)\*\*\\$')


def glossary_entries(text: str) -> list[tuple[str, str]]:
    """``(anchor, term)`` of every glossary entry of a page, in order."""
    return [m.groups() for m in map(GLOSSARY_ENTRY.match, text.split("\n")) if m]


def glossary_terms(path: Path = BOOK_DIR / GLOSSARY_PAGE) -> list[str]:
    """The terms the glossary page defines (its entries, :data:`GLOSSARY_ENTRY`)."""
    return [term for _, term in glossary_entries(Path(path).read_text(encoding="utf-8"))]


def term_anchor(term: str) -> str:
    """The glossary's anchor of ``term`` as Sphinx makes it: ``win rate`` -> ``term-win-rate``."""
    return "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def roles_to_links(markdown: str, bibliography: dict[str, Reference]) -> str:
    """Rewrite the ``{cite:t}``, ``{cite:p}`` and ``{term}`` roles of ``markdown`` as links.

    Raises ``KeyError`` for a key not in ``bibliography``, ``ValueError`` for a role this module
    has no link form for (``{cite}`` alone, several keys in ``{cite:t}``).
    """

    def replace(match: re.Match[str]) -> str:
        role, body = match.group(1), match.group(2)
        if role == "term":
            found = re.fullmatch(r"(.*\S)\s*<([^<>]+)>", body)
            text, term = (found.group(1), found.group(2)) if found else (body, body)
            return f"[{text}]({GLOSSARY_PAGE}#{term_anchor(term)})"
        keys = _keys(body)
        for key in keys:
            if key not in bibliography:
                raise KeyError(f"{match.group(0)}: {key!r} is not in the bibliography")
        link = f"({BIBLIOGRAPHY_PAGE}#{{}})"
        if role == "cite:t" and len(keys) == 1:
            return f"[{bibliography[keys[0]].textual()}]" + link.format(keys[0])
        if role == "cite:p":
            items = [f"[{bibliography[k].parenthetical()}]" + link.format(k) for k in keys]
            return "(" + "; ".join(items) + ")"
        raise ValueError(f"{match.group(0)}: no plain-Markdown form for this role")

    return ROLE.sub(replace, markdown)


def links_to_roles(markdown: str, terms: Iterable[str]) -> str:
    """The inverse of :func:`roles_to_links`: bibliography and glossary links back to roles.

    ``terms`` are the glossary's terms (:func:`glossary_terms`); a link whose text is not its
    term becomes ``{term}`text <term>```. Raises ``KeyError`` for a glossary anchor no term has.
    """
    by_anchor = {term_anchor(t): t for t in terms}

    def cite_p(match: re.Match[str]) -> str:
        return "{cite:p}`" + ",".join(m.group(2) for m in _CITE_LINK.finditer(match.group(1))) + "`"

    def term(match: re.Match[str]) -> str:
        text, anchor = match.group(1), match.group(2)
        if anchor not in by_anchor:
            raise KeyError(f"{match.group(0)}: no glossary term has the anchor {anchor!r}")
        name = by_anchor[anchor]
        return "{term}`" + (text if text == name else f"{text} <{name}>") + "`"

    markdown = _CITE_P.sub(cite_p, markdown)
    markdown = _CITE_LINK.sub(lambda m: "{cite:t}`" + m.group(2) + "`", markdown)
    return _TERM_LINK.sub(term, markdown)


def raw_roles(markdown: str) -> list[str]:
    """The MyST roles left in ``markdown`` (Jupyter Lab shows them as raw source)."""
    return [m.group(0) for m in RAW_ROLE.finditer(markdown)]


def markdown_problems(
    markdown: str, bibliography: dict[str, Reference], terms: Iterable[str]
) -> list[str]:
    """What is wrong with one markdown cell for Jupyter Lab and the HTML build: a raw role, a
    citation link whose key is unknown or whose text is not the bibliography's, a glossary link
    to an anchor no term has."""
    problems = [f"raw MyST role {role}" for role in raw_roles(markdown)]
    cited = set()
    for match in _CITE_P.finditer(markdown):
        for link in _CITE_LINK.finditer(match.group(1)):
            cited.add(link.start() + match.start(1))
            problems += _cite_problems(link, bibliography, parenthetical=True)
    for link in _CITE_LINK.finditer(markdown):
        if link.start() not in cited:
            problems += _cite_problems(link, bibliography, parenthetical=False)
    anchors = {term_anchor(t) for t in terms}
    problems += [f"glossary link {m.group(0)}: no term has this anchor"
                 for m in _TERM_LINK.finditer(markdown) if m.group(2) not in anchors]
    return problems


def _cite_problems(
    link: re.Match[str], bibliography: dict[str, Reference], parenthetical: bool
) -> list[str]:
    text, key = link.group(1), link.group(2)
    if key not in bibliography:
        return [f"citation {link.group(0)}: {key!r} is not in the bibliography"]
    reference = bibliography[key]
    wanted = reference.parenthetical() if parenthetical else reference.textual()
    if text != wanted:
        return [f"citation {link.group(0)}: the text should be {wanted!r}"]
    return []


# --------------------------------------------------------------------------- notebooks


def convert_notebook(path: Path, bibliography: dict[str, Reference] | None = None) -> int:
    """Rewrite the roles of a notebook's markdown cells as links (:func:`roles_to_links`), in
    place; outputs, ids and metadata are kept. Returns the number of roles converted."""
    import nbformat

    bibliography = bibliography if bibliography is not None else load_bibliography()
    notebook = nbformat.read(path, as_version=4)
    converted = 0
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and ROLE.search(cell.source):
            converted += len(ROLE.findall(cell.source))
            cell.source = roles_to_links(cell.source, bibliography)
    if converted:
        nbformat.write(notebook, path)
    return converted


def notebook_problems(
    path: Path,
    bibliography: dict[str, Reference] | None = None,
    terms: Iterable[str] | None = None,
) -> list[str]:
    """:func:`markdown_problems` of every markdown cell of a notebook, and the raw roles of the
    Markdown its code cells display (``text/markdown`` outputs, which Jupyter Lab renders too),
    as ``name cell N: ...``."""
    bibliography = bibliography if bibliography is not None else load_bibliography()
    terms = list(terms) if terms is not None else glossary_terms()
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    problems = []
    for index, cell in enumerate(cells):
        where = f"{Path(path).name} cell {index}"
        if cell["cell_type"] == "markdown":
            found = markdown_problems("".join(cell["source"]), bibliography, terms)
            problems += [f"{where}: {problem}" for problem in found]
        for output in cell.get("outputs", []):
            shown = output.get("data", {}).get("text/markdown")
            if shown is not None:
                text = "".join(shown) if isinstance(shown, list) else shown
                problems += [f"{where} output: raw MyST role {r}" for r in raw_roles(text)]
    return problems


def notebook_json_with_roles(text: str, terms: Iterable[str]) -> str:
    """A notebook's JSON text with its markdown cells' links turned back into roles (what the
    HTML build parses); the text unchanged when no cell has such a link."""
    notebook = json.loads(text)
    terms = list(terms)
    changed = False
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        converted = links_to_roles(source, terms)
        if converted != source:
            cell["source"] = converted
            changed = True
    return json.dumps(notebook) if changed else text


def main(argv: list[str] | None = None) -> int:
    from rlcourse.book import pages

    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--references"]:
        path = BOOK_DIR / BIBLIOGRAPHY_PAGE
        text = pages.with_reference_list(path.read_text(encoding="utf-8"), pages.reference_list())
        atomic_write_text(path, text)
        print(f"{path}: reference list written from references.bib")
        return 0
    check = "--check" in args
    paths = [Path(a) for a in args if a != "--check"] or sorted(BOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    bibliography, terms = load_bibliography(), glossary_terms()
    if check:
        problems = [p for path in paths for p in notebook_problems(path, bibliography, terms)]
        problems += [p for page in pages.book_pages() for p in pages.page_problems(page, terms)]
        print("\n".join(problems) or f"{len(paths)} notebooks and the pages: no raw MyST, every "
              "link agrees")
        return 1 if problems else 0
    for path in paths:
        print(f"{path}: {convert_notebook(path, bibliography)} roles converted")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
