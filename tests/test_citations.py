"""Citations, glossary links and pages that Jupyter Lab renders and the HTML build turns into MyST.

The chapters hold plain Markdown links (``rlcourse.book.citations``) and the pages plain glossary
entries, a reference list, anchors and page links (``rlcourse.book.pages``);
``book/_ext/rlcourse_links`` turns them back into roles and directives when the HTML book is
built. The built pages' citations and term links are checked in ``test_site.py`` and, in a
browser, by ``test_browser.py``; Jupyter Lab's rendering in ``test_jupyterlab.py``.
"""

from __future__ import annotations

import json
import re

import pytest

from rlcourse.book import pages
from rlcourse.book.build import chapter_notebooks
from rlcourse.book.citations import (
    BOOK_DIR,
    Reference,
    convert_notebook,
    glossary_terms,
    links_to_roles,
    load_bibliography,
    markdown_problems,
    notebook_json_with_roles,
    notebook_problems,
    raw_roles,
    roles_to_links,
    term_anchor,
)
from rlcourse.book.pages import (
    book_pages,
    glossary_to_myst,
    page_problems,
    page_to_myst,
    raw_myst,
    reference_list,
)

BIB = {
    "rafailov2023direct": Reference("Rafailov et al.", "2023"),
    "hong2024orpo": Reference("Hong et al.", "2024"),
    "bradley1952rank": Reference("Bradley and Terry", "1952"),
}
TERMS = ["win rate", "rewards/chosen", "KL to reference", "kl"]

ROLES = (
    "DPO ({cite:t}`rafailov2023direct`) and ORPO {cite:p}`hong2024orpo` differ;\n"
    "both {cite:p}`rafailov2023direct, bradley1952rank` log {term}`rewards/chosen` and the\n"
    "{term}`win rate`, with {term}`the KL <KL to reference>`. {cite:t}`bradley1952rank`."
)
LINKS = (
    "DPO ([Rafailov et al. (2023)](bibliography.md#rafailov2023direct)) and ORPO "
    "([Hong et al., 2024](bibliography.md#hong2024orpo)) differ;\n"
    "both ([Rafailov et al., 2023](bibliography.md#rafailov2023direct); "
    "[Bradley and Terry, 1952](bibliography.md#bradley1952rank)) log "
    "[rewards/chosen](glossary.md#term-rewards-chosen) and the\n"
    "[win rate](glossary.md#term-win-rate), with "
    "[the KL](glossary.md#term-kl-to-reference). "
    "[Bradley and Terry (1952)](bibliography.md#bradley1952rank)."
)


def test_roles_become_links_lab_renders():
    assert roles_to_links(ROLES, BIB) == LINKS
    assert raw_roles(LINKS) == []
    assert markdown_problems(LINKS, BIB, TERMS) == []


def test_links_become_roles_again_for_the_html_build():
    # Keys of a several-key citation come back without the space the author typed.
    assert links_to_roles(LINKS, TERMS) == ROLES.replace(", bradley", ",bradley")
    assert links_to_roles("no link, [a page](notation.md) and `{x}`", TERMS) == (
        "no link, [a page](notation.md) and `{x}`")


def test_a_textual_citation_in_parentheses_stays_textual():
    cell = "(see {cite:t}`hong2024orpo`)"
    links = roles_to_links(cell, BIB)
    assert links == "(see [Hong et al. (2024)](bibliography.md#hong2024orpo))"
    assert links_to_roles(links, TERMS) == cell
    alone = "({cite:t}`hong2024orpo`)"
    assert links_to_roles(roles_to_links(alone, BIB), TERMS) == alone


def test_glossary_anchors_are_sphinx_ids():
    assert term_anchor("win rate") == "term-win-rate"
    assert term_anchor("rewards/chosen") == "term-rewards-chosen"
    assert term_anchor("LC win rate") == "term-lc-win-rate"
    assert term_anchor("tokens/s") == "term-tokens-s"


def test_unknown_keys_terms_and_forms_are_errors():
    with pytest.raises(KeyError, match="nobody2020"):
        roles_to_links("{cite:t}`nobody2020`", BIB)
    with pytest.raises(ValueError, match="no plain-Markdown form"):
        roles_to_links("{cite:t}`hong2024orpo,bradley1952rank`", BIB)
    with pytest.raises(KeyError, match="term-no-such-metric"):
        links_to_roles("[x](glossary.md#term-no-such-metric)", TERMS)


def test_problems_name_raw_roles_wrong_text_and_unknown_anchors():
    cell = ("{cite:t}`hong2024orpo` and {term}`kl`; [Hong (2024)](bibliography.md#hong2024orpo), "
            "([Hong et al. (2024)](bibliography.md#hong2024orpo)), "
            "([Hong et al., 2025](bibliography.md#hong2024orpo)), "
            "[X (1)](bibliography.md#x1), [y](glossary.md#term-y)")
    assert markdown_problems(cell, BIB, TERMS) == [
        "raw MyST role {cite:t}`hong2024orpo`",
        "raw MyST role {term}`kl`",
        "citation [Hong et al., 2025](bibliography.md#hong2024orpo): the text should be "
        "'Hong et al., 2024'",
        "citation [Hong (2024)](bibliography.md#hong2024orpo): the text should be "
        "'Hong et al. (2024)'",
        "citation [X (1)](bibliography.md#x1): 'x1' is not in the bibliography",
        "glossary link [y](glossary.md#term-y): no term has this anchor",
    ]


def test_author_year_text_comes_from_the_bib_file(tmp_path):
    pytest.importorskip("pybtex")
    bib = tmp_path / "refs.bib"
    bib.write_text(
        "@article{one2001, author = {M{\\\"a}chler, Martin}, title = {T}, year = {2001}}\n"
        "@article{two2002, author = {Kahneman, Daniel and Tversky, Amos}, title = {T},"
        " year = {2002}}\n"
        "@article{three2003, author = {Kool, Wouter and van Hoof, Herke and Welling, Max},"
        " title = {T}, year = {2003}}\n"
        "@article{etal2004, author = {Guo, Shangmin and Zhang, Biao and others}, title = {T},"
        " year = {2004}}\n"
        "@article{von2005, author = {van Hoof, Herke and Welling, Max}, title = {T},"
        " year = {2005}}\n",
        encoding="utf-8",
    )
    found = load_bibliography(bib)
    assert {k: r.textual() for k, r in found.items()} == {
        "one2001": "Mächler (2001)",
        "two2002": "Kahneman and Tversky (2002)",
        "three2003": "Kool et al. (2003)",
        "etal2004": "Guo et al. (2004)",
        "von2005": "van Hoof and Welling (2005)",
    }
    assert found["two2002"].parenthetical() == "Kahneman and Tversky, 2002"


def test_convert_notebook_rewrites_markdown_cells_only(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    code = new_code_cell("print('{cite:t}`rafailov2023direct`')", execution_count=1,
                         outputs=[new_output("stream", name="stdout", text="{term}`kl`\n")])
    notebook = new_notebook(cells=[new_markdown_cell(ROLES), code])
    notebook.cells[0].metadata["tags"] = ["keep"]
    path = tmp_path / "09_demo.ipynb"
    nbformat.write(notebook, path)
    assert convert_notebook(path, BIB) == 7
    after = nbformat.read(path, as_version=4)
    assert after.cells[0].source == LINKS
    assert after.cells[0].id == notebook.cells[0].id
    assert after.cells[0].metadata == {"tags": ["keep"]}
    assert after.cells[1] == notebook.cells[1]
    assert convert_notebook(path, BIB) == 0
    assert notebook_problems(path, BIB, TERMS) == []
    shown = new_output("display_data", data={"text/markdown": "see {term}`kl`"})
    after.cells[1].outputs.append(shown)
    nbformat.write(after, path)
    assert notebook_problems(path, BIB, TERMS) == [
        "09_demo.ipynb cell 1 output: raw MyST role {term}`kl`"]
    restored = json.loads(notebook_json_with_roles(path.read_text(encoding="utf-8"), TERMS))
    assert "".join(restored["cells"][0]["source"]) == ROLES.replace(", bradley", ",bradley")


# --------------------------------------------------------------------------- the chapters


@pytest.fixture(scope="module")
def book_references():
    pytest.importorskip("pybtex")
    return load_bibliography(), glossary_terms()


@pytest.mark.parametrize("notebook", chapter_notebooks(), ids=lambda p: p.stem)
def test_chapter_markdown_has_no_raw_role_and_its_links_agree(notebook, book_references):
    """Jupyter Lab shows a MyST role as source: chapters cite and link with plain Markdown."""
    assert notebook_problems(notebook, *book_references) == []
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    raw = [(i, p) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
           for p in raw_myst("".join(c["source"]))]
    assert raw == [], f"{notebook.name}: MyST Jupyter Lab shows as source (cell, what): {raw}"


@pytest.mark.parametrize("page", book_pages(), ids=lambda p: p.name)
def test_book_page_reads_cleanly_in_jupyter_lab(page, book_references):
    """``jupyter lab book/`` opens the pages too: no role, directive or label as source, and
    every citation and glossary link agrees with the bibliography and the glossary."""
    assert page_problems(page, book_references[1]) == []


def test_every_glossary_link_of_the_chapters_becomes_a_role():
    terms = glossary_terms()
    assert len({term_anchor(t) for t in terms}) == len(terms), "two terms share an anchor"
    cited = linked = 0
    for notebook in chapter_notebooks():
        text = notebook.read_text(encoding="utf-8")
        restored = json.loads(notebook_json_with_roles(text, terms))
        markdown = "".join("".join(c["source"]) for c in restored["cells"]
                           if c["cell_type"] == "markdown")
        assert "bibliography.md#" not in markdown and "glossary.md#" not in markdown, notebook
        cited += markdown.count("{cite:")
        linked += markdown.count("{term}")
    # The chapters as converted (issue 21): 53 citations and 47 glossary links.
    assert cited >= 53 and linked >= 47
    assert (BOOK_DIR / "glossary.md").is_file()


def test_page_check_reports_a_role_left_as_text_but_not_tex():
    from rlcourse.book.checks import _problems_from_facts

    seen = _problems_from_facts({"text": "DPO (DPO, {cite:t} ) was"}, False, False)
    assert seen == ["raw MyST role left in the text: ...DPO (DPO, {cite:t} ) was..."]
    tex = r"a typeset formula leaves \pi_{\mathrm{ref}}(a \mid s) and {\rm x} in the text"
    assert _problems_from_facts({"text": tex}, False, False) == []


# --------------------------------------------------------------------------- the pages

PLAIN_GLOSSARY = """# Glossary

<a id="term-win-rate"></a>**win rate**\\
  How often the judge prefers the model,
  ties counted as one half.

  A second paragraph of the same entry.

<a id="term-kl"></a>**kl**\\
  See [win rate](glossary.md#term-win-rate).

<a id="concepts"></a>
## Concepts

<a id="term-policy"></a>**policy**\\
  A rule for choosing actions ([Hong et al., 2024](bibliography.md#hong2024orpo)).
"""

MYST_GLOSSARY = """# Glossary

```{glossary}
win rate
  How often the judge prefers the model,
  ties counted as one half.

  A second paragraph of the same entry.

kl
  See {term}`win rate`.
```

(concepts)=
## Concepts

```{glossary}
policy
  A rule for choosing actions {cite:p}`hong2024orpo`.
```
"""


def test_glossary_entries_become_glossary_blocks():
    assert glossary_to_myst(PLAIN_GLOSSARY).count("```{glossary}") == 2
    assert page_to_myst(PLAIN_GLOSSARY, ["win rate", "kl", "policy"]) == MYST_GLOSSARY
    assert raw_myst(PLAIN_GLOSSARY) == []
    assert raw_myst(MYST_GLOSSARY) == [
        "role {term}`win rate`", "role {cite:p}`hong2024orpo`", "directive ```{glossary}",
        "directive ```{glossary}", "target label (concepts)="]


def test_a_glossary_entry_the_build_cannot_read_is_an_error():
    with pytest.raises(ValueError, match="line 1: the anchor of 'win rate' must be "
                                         "'term-win-rate', not 'term-winrate'"):
        glossary_to_myst('<a id="term-winrate"></a>**win rate**\\\n  text\n')
    with pytest.raises(ValueError, match="'kl' needs a definition indented by two spaces"):
        glossary_to_myst('<a id="term-kl"></a>**kl**\\\ntext\n')


def test_page_links_anchors_and_the_table_of_contents_become_myst():
    page = ("See [the notation](notation.md), [notation](notation.md), chapter "
            "[9](09_dpo.ipynb) and [below](#more), not [out](https://x.org/a.md) nor "
            "[elsewhere](#nowhere).\n\n<!-- tableofcontents -->\n\n<a id=\"more\"></a>\n## More\n")
    assert page_to_myst(page, []) == (
        "See {doc}`the notation <notation>`, {doc}`notation`, chapter {doc}`9 <09_dpo>` and "
        "{ref}`below <more>`, not [out](https://x.org/a.md) nor [elsewhere](#nowhere).\n\n"
        "```{tableofcontents}\n```\n\n(more)=\n## More\n")


def test_raw_myst_skips_code_and_maths_but_not_directives():
    text = ("```python\n{cite:t}`x` inside code\n```\n`{term}` in inline code, $\\{a\\}`$,\n"
            ":::{note}\nhi\n:::\n% a MyST comment\n+++\n~~~{math}\nx\n~~~\n{doc}`intro`")
    assert raw_myst(text) == [
        "role {doc}`intro`", "directive ~~~{math}", "colon fence :::{note}", "colon fence :::",
        "MyST comment % a MyST comment", "block break +++"]


def test_reference_list_is_the_bib_file_with_anchors(tmp_path):
    pytest.importorskip("pybtex")
    bib = tmp_path / "refs.bib"
    bib.write_text("@article{zed2001, author = {Zed, Ann}, title = {Last}, journal = {J},"
                   " year = {2001}}\n@book{abe1999, author = {Abe, Bo}, title = {First},"
                   " publisher = {P}, year = {1999}}\n", encoding="utf-8")
    listed = reference_list(bib).split("\n")
    assert listed[0].startswith(pages.REFERENCES_BEGIN) and listed[-1] == pages.REFERENCES_END
    assert [line[:24] for line in listed[1:-1]] == ['- <a id="abe1999"></a>Bo',
                                                    '- <a id="zed2001"></a>An']
    page = f"# Bibliography\n\n## References\n\n{reference_list(bib)}\n"
    assert page_to_myst(page, []) == (
        "# Bibliography\n\n## References\n\n```{bibliography}\n:all:\n```\n")
    assert pages.with_reference_list(page.replace("Zed", "Old"), reference_list(bib)) == page


def test_committed_pages_become_the_myst_the_html_book_needs(book_references):
    terms = book_references[1]
    bibliography = (BOOK_DIR / "bibliography.md").read_text(encoding="utf-8")
    # the list is refreshed from references.bib: `python -m rlcourse.book.citations --references`
    assert pages.with_reference_list(bibliography, reference_list()) == bibliography
    myst = page_to_myst(bibliography, terms)
    assert myst.count("```{bibliography}\n:all:\n```") == 1 and "<a id=" not in myst
    assert myst.count("{cite:t}`") >= 30
    glossary = page_to_myst((BOOK_DIR / "glossary.md").read_text(encoding="utf-8"), terms)
    blocks = re.findall(r"```\{glossary\}\n(.*?)```", glossary, flags=re.S)
    defined = [line for b in blocks for line in b.splitlines() if line and not line[0].isspace()]
    assert defined == terms and len(terms) >= 60 and len(set(terms)) == len(terms)
    assert "<a id=" not in glossary and "(glossary-concepts)=" in glossary
    intro = page_to_myst((BOOK_DIR / "intro.md").read_text(encoding="utf-8"), terms)
    assert "```{tableofcontents}" in intro
    for chapter in chapter_notebooks():
        assert f"<{chapter.stem}>`" in intro, chapter.stem
