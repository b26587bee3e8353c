"""The HTML book in headless Chromium: every page loads offline without console errors, its
formulas are typeset, its saved widgets render and its images load.

Driven through the DevTools protocol (``rlcourse.site.Chromium``, on ``websocket-client``).
Without Chromium these tests skip, unless ``RLCOURSE_REQUIRE_BROWSER=1`` (set by ``.ci/run``).
Screenshots go to ``screenshots/`` (or ``$RLCOURSE_SCREENSHOTS``).

``test_checker_*`` build a small book on purpose broken in known ways (a formula MathJax cannot
parse, MathJax removed from a page, the widgets manager removed, a missing image, a CDN script,
a missing page) and assert that the checker reports exactly those problems.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from rlcourse.config import REPO_ROOT
from rlcourse.site import (
    BOOK_DIR,
    Chromium,
    SiteBuildError,
    build,
    build_once,
    find_chromium,
    inspect_page,
    make_toc,
    missing_site_tools,
    page_expectations,
    remote_assets,
    serve,
    toc_pages,
)

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(os.environ.get("RLCOURSE_SCREENSHOTS", REPO_ROOT / "screenshots"))
PAGES = toc_pages(make_toc(BOOK_DIR))


def _missing(message: str) -> None:
    if os.environ.get("RLCOURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (RLCOURSE_REQUIRE_BROWSER=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    if find_chromium() is None:
        _missing("Chromium not found: apt-get install chromium (or set RLCOURSE_CHROMIUM)")
    try:
        import websocket  # noqa: F401  (websocket-client)
    except ImportError:
        _missing("websocket-client is not installed")
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The real book, built once per session (shared with test_site.py and xdist workers)."""
    if (message := missing_site_tools()) is not None:
        _missing(f"cannot build the HTML book: {message}")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    try:
        return build_once(root / "rlcourse-site")
    except SiteBuildError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def site_url(built_book):
    with serve(built_book.html) as url:
        yield url


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline_without_errors(page, browser, site_url):
    shot = SCREENSHOTS / f"{page}.png"
    report = inspect_page(
        f"{site_url}{page}.html", browser, screenshot=shot, **page_expectations(BOOK_DIR, page)
    )
    print(f"{page}: screenshots {', '.join(str(p) for p in report.screenshots)}")
    facts = {k: v for k, v in report.facts.items() if k != "text"}
    assert report.problems == [], f"{page} ({facts}):\n" + "\n".join(report.problems)


# --------------------------------------------------------------------------- the checker fails


MATH = r"The return $G_t = \sum_{k \ge 0} \gamma^k R_{t+k+1}$ and" "\n\n" r"$$V = \mathbb{E}[G]$$"


def _demo_notebook():
    """A chapter-like notebook, executed: a formula, a matplotlib figure, an IntSlider with
    its widget state saved (as ``rlcourse.notebooks`` saves it)."""
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    notebook = new_notebook(cells=[
        new_markdown_cell("# Demo chapter\n\n" + MATH),
        new_code_cell(
            "import matplotlib.pyplot as plt\nplt.rcParams['figure.dpi'] = 40\n"
            "fig, ax = plt.subplots(figsize=(2, 1.5))\nax.plot([0, 1, 2], [0, 1, 4])\nplt.show()"
        ),
        new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3, max=10, description='n')"),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    env = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=120, kernel_name="python3",
                       store_widget_state=True).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


BROKEN = {  # chapter -> what is wrong with it
    "01_good": "nothing",
    "02_bad_math": "a formula MathJax cannot parse and an undefined macro",
    "03_no_mathjax": "MathJax removed from the page",
    "04_no_widget_manager": "the widgets manager removed from the page",
    "05_broken_image": "an image pointing at a missing file",
    "06_cdn_script": "a script from a CDN",
    "07_missing": "the page deleted",
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory, browser):
    """A temporary copy of book/ (configuration and reference pages, no real chapter) with the
    chapters of BROKEN, built, then damaged as BROKEN says. Yields (url, source folder)."""
    import nbformat

    if (message := missing_site_tools()) is not None:
        _missing(f"cannot build the HTML book: {message}")
    source = tmp_path_factory.mktemp("broken-book")
    for item in BOOK_DIR.iterdir():
        if item.name in ("_build",) or item.suffix == ".ipynb":
            continue
        if item.is_dir():
            shutil.copytree(item, source / item.name, ignore=shutil.ignore_patterns("vendor"))
        else:
            shutil.copy2(item, source / item.name)
    demo = _demo_notebook()
    for name in BROKEN:
        notebook = nbformat.from_dict(demo)
        notebook.cells[0].source = f"# {name}\n\n{MATH}"
        if name == "02_bad_math":
            notebook.cells[0].source += "\n\nBroken: $\\frac{1}{$ and $\\notamacro{x}$."
        nbformat.write(notebook, source / f"{name}.ipynb")
    html = build(source).html

    def edit(page, pattern, replacement, count=1):
        path = html / f"{page}.html"
        text, n = re.subn(pattern, replacement, path.read_text(encoding="utf-8"), count=count)
        assert n == count, f"{page}: {pattern} not found"
        path.write_text(text, encoding="utf-8")

    mathjax = r'<script[^>]*src="_static/vendor/mathjax/tex-chtml\.js[^"]*"></script>'
    edit("03_no_mathjax", mathjax, "")
    manager = r'<script[^>]*src="_static/vendor/jupyter-widgets/embed\.js[^"]*"></script>'
    edit("04_no_widget_manager", manager, "")
    edit("05_broken_image", r'(<img[^>]*src=")_images/[^"]+\.png', r"\1_images/missing.png")
    edit("06_cdn_script", r"</head>",
         '<script src="https://cdn.jsdelivr.net/npm/nothing@1.0.0/x.js"></script></head>')
    (html / "07_missing.html").unlink()
    with serve(html) as url:
        yield url, source, html


def _problems(broken_site, browser, page):
    url, source, _ = broken_site
    report = inspect_page(f"{url}{page}.html", browser, screenshot=SCREENSHOTS / "checker" /
                          f"{page}.png", **page_expectations(source, page))
    return report


def test_checker_passes_a_good_page_with_math_figure_and_widget(broken_site, browser):
    report = _problems(broken_site, browser, "01_good")
    assert report.problems == []
    assert report.facts["typeset"] == 2 and report.facts["mathjax"] == "ok"
    assert report.facts["widgetsRendered"] == report.facts["widgetViews"] == 1
    assert [image["ok"] for image in report.facts["images"]] == [True]


def test_checker_reports_formulas_mathjax_cannot_parse(broken_site, browser):
    problems = _problems(broken_site, browser, "02_bad_math").problems
    # An unbalanced brace hides the closing delimiter: MathJax leaves the formula as raw text.
    assert problems[0] == r"formula not typeset: \(\frac{1}{\)"
    # An undefined macro is a TeX error (the configuration drops MathJax's noundefined).
    assert problems[1] == r"MathJax error: Undefined control sequence \notamacro"
    assert problems[2].startswith("raw TeX left in the text: ")
    assert r"Broken: \(\frac{1}{\) and" in problems[2]
    assert len(problems) == 3, problems


def test_checker_reports_a_page_whose_mathjax_did_not_load(broken_site, browser):
    problems = _problems(broken_site, browser, "03_no_mathjax").problems
    assert "MathJax did not typeset the page (MathJax absent)" in problems
    assert sum(p.startswith("formula not typeset:") for p in problems) == 2
    assert any(p.startswith("raw TeX left in the text:") for p in problems)
    assert "no typeset formula on a page that has formulas" in problems


def test_checker_reports_widgets_that_did_not_render(broken_site, browser):
    problems = _problems(broken_site, browser, "04_no_widget_manager").problems
    assert problems == ["widgets not rendered: 0 of 1 widget views",
                        "no widget rendered, but the notebook has saved widget state"]


def test_checker_reports_an_image_that_did_not_load(broken_site, browser):
    problems = _problems(broken_site, browser, "05_broken_image").problems
    assert "image did not load: _images/missing.png" in problems
    assert any(p.startswith("console error: Failed to load resource") and "missing.png" in p
               for p in problems)


def test_checker_reports_requests_that_leave_the_machine(broken_site, browser):
    _, _, html = broken_site
    assert list(remote_assets(html)) == ["06_cdn_script.html"]
    problems = _problems(broken_site, browser, "06_cdn_script").problems
    assert "external request: https://cdn.jsdelivr.net/npm/nothing@1.0.0/x.js" in problems
    assert any(p.startswith("console error:") for p in problems)


def test_checker_reports_a_missing_page(broken_site, browser):
    problems = _problems(broken_site, browser, "07_missing").problems
    url, _, _ = broken_site
    assert f"page missing: HTTP 404 for {url}07_missing.html" in problems
