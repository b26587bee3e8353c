"""The book in Jupyter Lab, as a reader studying it sees it (the README's ``jupyter lab book/``).

Starts ``jupyter lab`` headless on a free local port once for the module (its own settings,
workspaces and runtime folders in a temporary folder; notebook windowing off, so every cell is
rendered; the app exposed as ``window.jupyterapp`` so the tests can run Lab commands), serving a
copy of ``book/``, and drives it from headless Chromium (``rlcourse.book.browser.Chromium``):

- chapters 9 and 13 show their citations and glossary links as links, no raw MyST (a role, a
  directive, a colon fence or a label); screenshots ``screenshots/jupyterlab-NN_name.png`` (the
  citations of chapter 9's "Further reading", a paragraph of glossary links of chapter 13);
- every Markdown page (glossary, bibliography, notation, intro) in Lab's Markdown preview holds
  no raw MyST either, and clicking a citation or a glossary link in a chapter opens its page
  scrolled to the entry;
- Run All on chapter 1 (quick mode) finishes without an error, and its slider renders: the
  controls and the plot in the ``Output`` widget, redrawn when the slider moves.

Skips without Chromium or Jupyter Lab, unless ``RLCOURSE_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rlcourse.book.browser import Chromium, find_chromium
from rlcourse.book.build import BOOK_DIR
from rlcourse.book.citations import load_bibliography
from rlcourse.book.pages import book_pages
from rlcourse.config import REPO_ROOT

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(os.environ.get("RLCOURSE_SCREENSHOTS", REPO_ROOT / "screenshots"))
#: Chapters whose rendered markdown is read, and the links their screenshots show.
CHAPTERS = {"09_dpo.ipynb": "bibliography.md", "13_side_by_side.ipynb": "glossary.md"}
#: The chapter Run All executes (quick mode takes seconds) and whose slider is moved.
RUN_ALL_CHAPTER = "01_why_rl.ipynb"

# The rendered markdown under ROOT: its text (code elements and typeset maths skipped, as the
# HTML book's page check does), its links, and the info strings of its fenced code blocks (a
# MyST directive renders as a code block whose language is "{name}").
_READ_RENDERED = r"""
(root) => {
  const skip = 'pre, code, script, style, mjx-container, .MathJax, svg';
  const parts = [];
  for (const block of root.querySelectorAll('.jp-RenderedMarkdown')) {
    const walker = document.createTreeWalker(block, NodeFilter.SHOW_TEXT, {
      acceptNode: n => (n.parentElement && n.parentElement.closest(skip))
          ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
    while (walker.nextNode()) parts.push(walker.currentNode.textContent);
  }
  const links = Array.from(root.querySelectorAll('.jp-RenderedMarkdown a'))
      .map(a => ({text: a.textContent, href: a.getAttribute('href') || ''}));
  const fences = Array.from(root.querySelectorAll('.jp-RenderedMarkdown pre code'))
      .map(c => c.className);
  return {text: parts.join(' '), links, fences};
}
"""

# Opens PATH (in FACTORY, or Lab's default) and waits until WANTED markdown blocks are rendered.
_OPEN = r"""
(async (path, factory, wanted, timeoutMs) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const app = window.jupyterapp;
  const args = factory ? {path, factory} : {path};
  const widget = await app.commands.execute('docmanager:open', args);
  await widget.context.ready;
  const deadline = Date.now() + timeoutMs;
  const blocks = () => widget.node.querySelectorAll('.jp-RenderedMarkdown').length;
  while (blocks() < wanted && Date.now() < deadline) await sleep(200);
  await sleep(1500);  // MathJax typesets after the markdown is in the page
  return blocks();
})
"""

#: MyST that a renderer left as text: a role's name in braces (its target is a code element, so
#: skipped), a colon fence, a target label. TeX is typeset (skipped); a brace group of TeX that
#: was not would follow a letter, a backslash, ``_``, ``^`` or ``}``.
_RAW_IN_TEXT = re.compile(r"(?<![A-Za-z\\_^}])\{[a-z][\w:+-]*\}(?![\w{])|(?:^|\s):::|"
                          r"\([\w-]+\)=(?=\s|$)")


def _missing(message: str) -> None:
    if os.environ.get("RLCOURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (RLCOURSE_REQUIRE_BROWSER=1)")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _jupyter_lab(root: Path, home: Path):
    """``jupyter lab`` serving ``root`` on 127.0.0.1; yields its base URL and token."""
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Lab 4 renders only the cells near the viewport by default; render them all.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "OMP_NUM_THREADS": "1"}
    log = open(home / "lab.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.port_retries=0", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("jupyter lab did not start:\n"
                                + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Jupyter Lab serving a copy of ``book/`` (Lab writes checkpoints and kernels write files
    where they run) and one Chromium page on it: ``(evaluate, screenshot)``."""
    if find_chromium() is None:
        _missing("Chromium not found: apt-get install chromium (or set RLCOURSE_CHROMIUM)")
    for module in ("websocket", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed")
    home = tmp_path_factory.mktemp("lab")
    root = home / "book"
    shutil.copytree(BOOK_DIR, root, ignore=shutil.ignore_patterns("_build", "_static", "_ext",
                                                                  ".ipynb_checkpoints"))
    with _jupyter_lab(root, home) as (base, token), Chromium(timeout=300) as browser:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": f"{base}/lab?token={token}"}, session=session)
        browser.wait_for("Page.loadEventFired", session, 120)

        def evaluate(expression: str):
            reply = browser.send("Runtime.evaluate", {
                "expression": expression, "awaitPromise": True, "returnByValue": True},
                session=session)
            if "exceptionDetails" in reply:
                raise AssertionError(f"in the page: {reply['exceptionDetails']}")
            return reply.get("result", {}).get("value")

        def screenshot(name: str) -> Path:
            shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            path = SCREENSHOTS / name
            path.write_bytes(base64.b64decode(shot["data"]))
            print(f"screenshot {path}")
            return path

        deadline = time.monotonic() + 120
        while not evaluate("!!(window.jupyterapp && window.jupyterapp.shell)"):
            assert time.monotonic() < deadline, "Jupyter Lab's app did not start in the page"
            time.sleep(0.5)
        evaluate("window.jupyterapp.started")
        yield evaluate, screenshot


def _open(evaluate, path: str, wanted: int, factory: str | None = None) -> int:
    return evaluate(f"{_OPEN}({json.dumps(path)}, {json.dumps(factory)}, {wanted}, 90000)")


def _current(evaluate) -> dict:
    return evaluate(f"({_READ_RENDERED})(window.jupyterapp.shell.currentWidget.node)")


def _raw_myst(facts: dict) -> list[str]:
    """Raw MyST a reader sees in the rendered text, and directives rendered as code blocks."""
    raw = [m.group(0).strip() for m in _RAW_IN_TEXT.finditer(facts["text"])]
    return raw + [f"code block {c}" for c in facts["fences"] if "{" in c]


def _links_to(facts: dict, page: str) -> list[tuple[str, str]]:
    # Lab resolves a relative link against the server (/files/bibliography.md?_xsrf=...#key).
    found = [(a["text"], urlsplit(a["href"])) for a in facts["links"]]
    return [(text, url.fragment) for text, url in found if url.path.endswith(f"/{page}")]


def test_raw_myst_in_rendered_text_is_seen_but_not_typeset_tex():
    assert _raw_myst({"text": "DPO ({cite:t} ) and the {term} win rate; (glossary-x)= ::: "
                              "{note}", "fences": ["language-{glossary}"]}) == [
        "{cite:t}", "{term}", "(glossary-x)=", ":::", "{note}", "code block language-{glossary}"]
    tex = r"\mathrm{ref} and \frac{1}{n} and e^{x} and a_{t} in the text, {x}y"
    assert _raw_myst({"text": tex, "fences": ["language-python"]}) == []


@pytest.mark.parametrize(("chapter", "shown"), CHAPTERS.items())
def test_a_chapter_in_jupyter_lab_shows_citations_and_links_not_myst(lab, chapter, shown):
    evaluate, screenshot = lab
    notebook = json.loads((BOOK_DIR / chapter).read_text(encoding="utf-8"))
    markdown = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown"]
    rendered = _open(evaluate, chapter, len(markdown))
    facts = _current(evaluate)
    assert rendered >= len(markdown), (rendered, len(markdown))
    assert _raw_myst(facts) == []
    source = "\n".join(markdown)
    citations, terms = _links_to(facts, "bibliography.md"), _links_to(facts, "glossary.md")
    assert len(citations) == source.count("](bibliography.md#")
    assert len(terms) == source.count("](glossary.md#")
    # the text a reader sees is the bibliography's author-year text
    references = load_bibliography()
    assert all(text in (references[key].textual(), references[key].parenthetical())
               for text, key in citations), citations
    if chapter == "09_dpo.ipynb":
        assert ("Rafailov et al. (2023)", "rafailov2023direct") in citations
        assert ("win rate", "term-win-rate") in terms
    # the screenshot: the paragraph or list with the most links to SHOWN (citations in one
    # chapter, glossary links in the other: no screen of either chapter holds both), outlined
    evaluate(f"""((shown) => {{
      const node = window.jupyterapp.shell.currentWidget.node;
      const to = (root, page) => Array.from(root.querySelectorAll('a')).filter(
          a => (a.getAttribute('href') || '').includes(page));
      for (const page of ['bibliography.md', 'glossary.md'])
        to(node, page).forEach(a => {{ a.style.outline = '2px solid red'; }});
      const blocks = Array.from(node.querySelectorAll(
          '.jp-RenderedMarkdown p, .jp-RenderedMarkdown ul, .jp-RenderedMarkdown ol'));
      const block = blocks.reduce((a, b) => to(b, shown).length > to(a, shown).length ? b : a);
      block.scrollIntoView({{block: 'center'}});
    }})({json.dumps(shown)})""")
    time.sleep(0.5)
    screenshot(f"jupyterlab-{Path(chapter).stem}.png")


@pytest.mark.parametrize("page", [p.name for p in book_pages()])
def test_a_page_in_lab_markdown_preview_shows_no_myst(lab, page):
    evaluate, _ = lab
    assert _open(evaluate, page, 1, factory="Markdown Preview") >= 1
    facts = _current(evaluate)
    assert len(facts["text"]) > 500, facts["text"][:200]
    assert _raw_myst(facts) == []
    if page == "glossary.md":
        assert "win rate" in facts["text"] and "{glossary}" not in facts["text"]
    if page == "bibliography.md":
        assert "Rafailov et al. (2023)" in facts["text"] and "Direct preference optimization" \
            in facts["text"]


@pytest.mark.parametrize(("page", "anchor", "title"), [
    ("bibliography.md", "rafailov2023direct", "Rafael Rafailov"),
    ("glossary.md", "term-win-rate", "win rate"),
])
def test_a_link_in_a_chapter_opens_its_page_at_the_entry(lab, page, anchor, title):
    """What a reader does with a citation: click it. Lab opens the page in its Markdown preview
    and scrolls to the element carrying the anchor (Lab keeps an id as ``data-jupyter-id``)."""
    evaluate, screenshot = lab
    _open(evaluate, "09_dpo.ipynb", 1)
    opened = evaluate(f"""(async () => {{
      const sleep = ms => new Promise(r => setTimeout(r, ms));
      const nb = window.jupyterapp.shell.currentWidget;
      const link = Array.from(nb.node.querySelectorAll('.jp-RenderedMarkdown a')).find(
          a => (a.getAttribute('href') || '').includes('{page}')
               && a.getAttribute('href').endsWith('#{anchor}'));
      link.click();
      const deadline = Date.now() + 60000;
      let entry = null, widget = null;
      while (Date.now() < deadline) {{
        widget = window.jupyterapp.shell.currentWidget;
        entry = widget && widget.title.label === '{page}' && widget.node.querySelector(
            '.jp-RenderedMarkdown [data-jupyter-id="{anchor}"], .jp-RenderedMarkdown #{anchor}');
        if (entry) break;
        await sleep(200);
      }}
      if (!entry) return {{title: widget && widget.title.label}};
      await sleep(1500);  // the preview scrolls once rendered
      const box = widget.node.getBoundingClientRect(), at = entry.getBoundingClientRect();
      const item = entry.closest('li, p');
      return {{title: widget.title.label, preview: !!widget.node.querySelector(
                   '.jp-MarkdownViewer, .jp-RenderedMarkdown'),
               visible: at.top >= box.top && at.top <= box.bottom,
               text: (item ? item.textContent : entry.textContent).slice(0, 200)}};
    }})()""")
    assert opened.get("title") == page, opened
    assert opened["preview"] and opened["visible"], opened
    assert title in opened["text"], opened
    screenshot(f"jupyterlab-{Path(page).stem}-from-a-link.png")


def test_run_all_in_jupyter_lab_finishes_and_draws_the_slider(lab):
    """Run All as a reader would (quick mode, the server's environment), then move the slider:
    the plot in the Output widget is redrawn by the kernel."""
    evaluate, screenshot = lab
    _open(evaluate, RUN_ALL_CHAPTER, 1)
    result = evaluate("""(async () => {
      const app = window.jupyterapp, nb = app.shell.currentWidget;
      await nb.sessionContext.ready;
      await app.commands.execute('notebook:clear-all-cell-outputs');
      const ok = await app.commands.execute('notebook:run-all-cells');
      const prompts = Array.from(nb.node.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
          .map(p => p.textContent.trim());
      return {ok, prompts,
              errors: nb.node.querySelectorAll('.jp-OutputArea-output[data-mime-type='
                  + '"application/vnd.jupyter.stderr"]').length};
    })()""")
    assert result["ok"] is True, result
    assert all(re.fullmatch(r"\[\d+\]:", p) for p in result["prompts"]), result["prompts"]
    assert result["errors"] == 0
    widget = evaluate("""(() => {
      const w = window.jupyterapp.shell.currentWidget.node.querySelector('.widget-interact');
      if (!w) return null;
      w.scrollIntoView({block: 'start'});
      const img = w.querySelector('.widget-output img');
      return {sliders: w.querySelectorAll('.widget-slider').length, image: img ? img.src : '',
              readout: (w.querySelector('.widget-readout') || {}).textContent};
    })()""")
    assert widget is not None, "no interact widget rendered"
    assert widget["sliders"] >= 1 and widget["image"].startswith("data:image/png"), widget
    screenshot(f"jupyterlab-{Path(RUN_ALL_CHAPTER).stem}-widget.png")
    moved = evaluate("""(async () => {
      const sleep = ms => new Promise(r => setTimeout(r, ms));
      const w = window.jupyterapp.shell.currentWidget.node.querySelector('.widget-interact');
      const before = w.querySelector('.widget-output img').src;
      const handle = w.querySelector('.noUi-handle');
      handle.focus();
      handle.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true}));
      const deadline = Date.now() + 60000;
      while (Date.now() < deadline) {
        const img = w.querySelector('.widget-output img');
        if (img && img.src !== before) break;
        await sleep(200);
      }
      const img = w.querySelector('.widget-output img');
      return {redrawn: !!img && img.src !== before,
              readout: w.querySelector('.widget-readout').textContent};
    })()""")
    assert moved["redrawn"], moved
    assert moved["readout"] != widget["readout"], (widget["readout"], moved)
