"""The HTML book: table of contents, offline assets, reference pages and the built site.

The built-site tests share one Jupyter Book build per test session (``rlcourse.site.build_once``
serialises pytest-xdist workers on a lock). The browser checks are in ``test_browser.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from rlcourse.config import REPO_ROOT
from rlcourse.site import (
    BOOK_DIR,
    SiteBuildError,
    build_once,
    make_toc,
    missing_site_tools,
    part_of,
    remote_assets,
    toc_pages,
)

CONFIG = yaml.safe_load((BOOK_DIR / "_config.yml").read_text(encoding="utf-8"))


def require_site_tools() -> None:
    """Skip (or fail, under RLCOURSE_REQUIRE_BROWSER=1 as in CI) when the site cannot be built:
    no Jupyter Book, or no npm to install the JavaScript the site serves."""
    message = missing_site_tools()
    if message is None:
        return
    if os.environ.get("RLCOURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(f"cannot build the HTML book: {message}")


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The real book built once for the whole test session (shared between xdist workers)."""
    require_site_tools()
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder all workers of this run share
    try:
        result = build_once(root / "rlcourse-site")
    except SiteBuildError as error:
        pytest.fail(str(error))
    print(f"HTML book in {result.html}")
    return result


# --------------------------------------------------------------------------- table of contents


def _touch(folder, *names):
    for name in names:
        (folder / name).write_text("{}" if name.endswith(".ipynb") else "# x\n", encoding="utf-8")


def test_toc_groups_chapters_into_the_four_parts_in_chapter_order(tmp_path):
    _touch(
        tmp_path,
        "intro.md", "notation.md", "glossary.md", "bibliography.md",
        "10_orpo.ipynb", "02_markov.ipynb", "01_why.ipynb", "15_beyond.ipynb", "04_pg.ipynb",
        "16_own.ipynb",
        "08_ppo.ipynb", "09_dpo.ipynb", "13_side.ipynb", "14_real.ipynb", "03_values.ipynb",
        "scratch.ipynb", "1_not_a_chapter.ipynb", "05-dash.ipynb",
    )
    toc = make_toc(tmp_path)
    assert toc == {
        "format": "jb-book",
        "root": "intro",
        "parts": [
            {"caption": "Part I: Foundations", "numbered": 1,
             "chapters": [{"file": "01_why"}, {"file": "02_markov"}, {"file": "03_values"}]},
            {"caption": "Part II: Policies, rewards and PPO", "numbered": 1,
             "chapters": [{"file": "04_pg"}, {"file": "08_ppo"}]},
            {"caption": "Part III: Preference optimisation", "numbered": 1,
             "chapters": [{"file": "09_dpo"}, {"file": "10_orpo"}, {"file": "13_side"}]},
            {"caption": "Part IV: Scaling up and beyond", "numbered": 1,
             "chapters": [{"file": "14_real"}, {"file": "15_beyond"}, {"file": "16_own"}]},
            {"caption": "Reference",
             "chapters": [{"file": "notation"}, {"file": "glossary"}, {"file": "bibliography"}]},
        ],
    }


def test_toc_leaves_out_parts_without_chapters(tmp_path):
    _touch(tmp_path, "intro.md", "notation.md", "11_kto.ipynb")
    toc = make_toc(tmp_path)
    assert [p["caption"] for p in toc["parts"]] == [
        "Part III: Preference optimisation", "Reference"]
    assert toc_pages(toc) == ["intro", "11_kto", "notation"]


@pytest.mark.parametrize(
    "number, part", [(1, 0), (3, 0), (4, 1), (8, 1), (9, 2), (13, 2), (14, 3), (15, 3), (16, 3),
                     (17, 3)]
)
def test_part_of_follows_design_md(number, part):
    assert part_of(number) == part


@pytest.mark.parametrize("number", [0, 18, 99])
def test_part_of_rejects_numbers_outside_the_book(number):
    with pytest.raises(ValueError, match="outside every part"):
        part_of(number)


def test_toc_of_the_real_book_lists_every_chapter_notebook_in_order():
    chapters = sorted(p.stem for p in BOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert toc_pages(make_toc(BOOK_DIR)) == [
        "intro", *chapters, "notation", "glossary", "bibliography"]


# --------------------------------------------------------------------------- offline assets


def test_npm_packages_are_pinned_exactly_and_locked():
    package = json.loads((REPO_ROOT / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((REPO_ROOT / "package-lock.json").read_text(encoding="utf-8"))
    deps = package["dependencies"]
    assert set(deps) == {"mathjax", "@jupyter-widgets/html-manager"}
    for name, version in deps.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} is not pinned: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert deps["mathjax"].startswith("3.")
    assert lock["packages"][""]["dependencies"] == deps


def test_installed_and_copied_javascript_is_not_committed():
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["node_modules/mathjax/package.json", "book/_static/vendor/mathjax/tex-chtml.js",
             "screenshots/intro.png"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert done.stdout.split() == paths
    tracked = subprocess.run(["git", "ls-files", "node_modules", "book/_static/vendor"],
                             cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert tracked == ""


def test_config_serves_mathjax_and_widgets_locally_and_never_executes():
    assert CONFIG["execute"]["execute_notebooks"] == "off"
    sphinx = CONFIG["sphinx"]["config"]
    assert sphinx["mathjax_path"] == "vendor/mathjax/tex-chtml.js"
    assert list(sphinx["nb_ipywidgets_js"]) == ["vendor/jupyter-widgets/embed.js"]
    assert "rlcourse_offline" in CONFIG["sphinx"]["local_extensions"]


# --------------------------------------------------------------------------- reference pages

METRICS = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "kl", "objective/kl",
    "approx_kl", "clip_fraction", "explained_variance", "entropy", "value_loss", "policy_loss",
    "returns/score", "win rate", "LC win rate", "KL to reference", "perplexity", "tokens/s",
    "peak memory", "grad norm", "lr", "step",
]


def _glossary_terms() -> list[str]:
    # the page's entries (plain Markdown that Jupyter Lab renders; rlcourse.book.pages)
    from rlcourse.book.citations import glossary_terms

    return glossary_terms(BOOK_DIR / "glossary.md")


def test_glossary_defines_every_logged_metric_once():
    terms = _glossary_terms()
    assert len(terms) == len(set(terms)), "a glossary term is defined twice"
    missing = [m for m in METRICS if m not in terms]
    assert not missing, f"glossary lacks {missing}"


def test_glossary_names_the_keys_rlcourse_logs():
    text = (BOOK_DIR / "glossary.md").read_text(encoding="utf-8")
    # Keys of the metric dictionaries of rlcourse.ppo, rlcourse.engine and rlcourse.evaluation.
    for key in ["clip_frac", "vf_clip_frac", "kl_k3", "kl_coef", "score", "return",
                "response_length", "grad_norm", "tokens_per_s", "peak_mem_mb", "ppl",
                "win_rate_stderr", "lc_win_rate", "kl_stderr", "ceiling", "share_of_gain",
                "share_of_gain_stderr"]:
        assert f"`{key}`" in text, key


PAPERS = {  # first author, year: the works the slides cite (and a few the book adds)
    "Ouyang": "2022", "Christiano": "2017", "Ziegler": "2019", "Schulman": "2017",
    "Rafailov": "2023", "Azar": "2023", "Park": "2024", "Ethayarajh": "2024", "Hong": "2024",
    "Meng": "2024", "Kahneman": "1979", "Tversky": "1992", "Sutton": "2018", "Bradley": "1952",
    "Dubois": "2024", "Yao": "2023", "Shao": "2024", "Ahmadian": "2024", "Williams": "1992",
}


def _bib_entries() -> dict[str, tuple[str, str]]:
    text = (BOOK_DIR / "references.bib").read_text(encoding="utf-8")
    entries = {}
    for key, body in re.findall(r"@\w+\{(\w+),(.*?)\n\}", text, flags=re.S):
        author = re.search(r"author\s*=\s*\{([^,}]+)", body).group(1).strip()
        year = re.search(r"year\s*=\s*\{(\d{4})\}", body).group(1)
        entries[key] = (author, year)
    return entries


def test_bibliography_holds_every_paper_the_slides_cite():
    entries = set(_bib_entries().values())
    assert ("Schulman", "2015") in entries, "GAE"
    missing = [f"{a} {y}" for a, y in PAPERS.items() if (a, y) not in entries]
    assert not missing, f"references.bib lacks {missing}"


def test_every_bib_entry_has_a_title_and_a_unique_key():
    text = (BOOK_DIR / "references.bib").read_text(encoding="utf-8")
    keys = re.findall(r"@\w+\{(\w+),", text)
    assert len(keys) == len(set(keys)) == len(_bib_entries())
    assert text.count("title") - text.count("booktitle") >= len(keys)


def test_notation_page_covers_the_symbols_of_the_book():
    text = (BOOK_DIR / "notation.md").read_text(encoding="utf-8")
    for symbol in ["$s, s'", r"$a \in", r"$r \in", r"\gamma", r"$\pi(a \mid s)$", r"$V_\pi(s)$",
                   r"$q_\pi(s, a)$", "$G_t$", r"$p(s', r \mid s, a)$", r"$\lambda$ (GAE)",
                   r"$\beta$ (DPO)", r"$\Delta(y)$", "$h$", r"$\bar\ell(y)$", "$z_0$",
                   r"$\tau$ (IPO)", r"$\alpha$ (R-DPO)", r"$\epsilon$ (PPO)", "$k_1", "$k_2",
                   "$k_3", r"$\delta_t$", r"$\rho_t$", "$A_t$", r"$\pi_{\mathrm{ref}}$"]:
        assert symbol in text, symbol


# --------------------------------------------------------------------------- the built site


@pytest.mark.slow
def test_every_page_of_the_toc_is_built(built_book):
    assert built_book.pages == toc_pages(make_toc(BOOK_DIR))
    for page in built_book.pages:
        assert (built_book.html / f"{page}.html").is_file(), page
    assert (built_book.html / "index.html").is_file()


@pytest.mark.slow
def test_no_page_loads_a_script_or_style_sheet_from_the_internet(built_book):
    assert remote_assets(built_book.html) == {}


@pytest.mark.slow
def test_pages_use_the_vendored_mathjax_and_widgets_manager(built_book):
    static = built_book.html / "_static" / "vendor"
    for relative in ["mathjax/tex-chtml.js",
                     "mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff",
                     "mathjax/input/tex/extensions/boldsymbol.js", "jupyter-widgets/embed.js"]:
        assert (static / relative).is_file(), relative
    notation = (built_book.html / "notation.html").read_text(encoding="utf-8")
    assert re.search(r'<script[^>]+src="_static/vendor/mathjax/tex-chtml\.js', notation)
    for page in built_book.pages:
        html = (built_book.html / f"{page}.html").read_text(encoding="utf-8")
        vendor_scripts = re.findall(r'<script[^>]+src="[^"]*_static/vendor/([^"?]+)', html)
        # Only the two entry points; MathJax loads its components itself.
        assert set(vendor_scripts) <= {"mathjax/tex-chtml.js", "jupyter-widgets/embed.js"}, page
        assert "require.min.js" not in html and "embed-amd.js" not in html, page


@pytest.mark.slow
def test_notebooks_with_saved_widgets_embed_their_state(built_book):
    for page in built_book.pages:
        notebook = BOOK_DIR / f"{page}.ipynb"
        if not notebook.is_file():
            continue
        metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
        state = metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        html = (built_book.html / f"{page}.html").read_text(encoding="utf-8")
        if state.get("state"):
            assert 'type="application/vnd.jupyter.widget-state+json"' in html, page
            assert "_static/vendor/jupyter-widgets/embed.js" in html, page


@pytest.mark.slow
def test_build_reports_no_offline_toc_or_citation_warning(built_book):
    for warning in built_book.warnings:
        print(warning)
    serious = [w for w in built_book.warnings
               if re.search(r"rlcourse_offline|toctree|toc\.|bibtex|citation|not found", w)]
    assert not serious, "\n".join(serious)


@pytest.mark.slow
def test_chapters_citations_and_glossary_links_render_as_roles(built_book):
    """The chapters' Markdown links (what Jupyter Lab shows) are roles in the HTML book: every
    cited key is a sphinxcontrib-bibtex link into the bibliography page, every glossary link a
    term reference to an anchor the glossary page has, and no Markdown link or role is left."""
    from rlcourse.book.citations import glossary_terms, notebook_json_with_roles

    terms = glossary_terms()
    glossary = (built_book.html / "glossary.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="(term-[^"]+)"', glossary))
    bibliography = (built_book.html / "bibliography.html").read_text(encoding="utf-8")
    total = {"cite": 0, "term": 0}
    for page in built_book.pages:
        notebook = BOOK_DIR / f"{page}.ipynb"
        if not notebook.is_file():
            continue
        cells = json.loads(notebook_json_with_roles(notebook.read_text("utf-8"), terms))["cells"]
        markdown = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        keys = sum(len(k.split(",")) for k in re.findall(r"\{cite:[tp]\}`([^`]*)`", markdown))
        html = (built_book.html / f"{page}.html").read_text(encoding="utf-8")
        cited = re.findall(r'href="bibliography\.html#(id\d+)"', html)
        linked = re.findall(r'href="glossary\.html#(term-[^"]+)"', html)
        assert len(cited) == keys, page
        assert len(linked) == markdown.count("{term}"), page
        assert all(f'id="{i}"' in bibliography for i in cited), page
        assert set(linked) <= anchors, page
        assert "bibliography.md" not in html and "glossary.md" not in html, page
        assert not re.search(r"\{(cite:[tp]|term)\}", html), page
        total["cite"] += keys
        total["term"] += len(linked)
    assert total["cite"] >= 53 and total["term"] >= 47, total
