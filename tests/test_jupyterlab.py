"""A chapter in Jupyter Lab, as a reader studying the book sees it: no raw MyST role.

Starts ``jupyter lab`` headless on a free local port (its own settings, workspaces and runtime
folders in a temporary folder; notebook windowing off, so every cell is rendered), opens chapter
9 in headless Chromium (``rlcourse.book.browser.Chromium``) and reads the text of its rendered
markdown cells. Skips without Chromium or Jupyter Lab, unless ``RLCOURSE_REQUIRE_BROWSER=1``.
The screenshot (``screenshots/jupyterlab-09_dpo.png``) shows the chapter's first citation.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
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
from rlcourse.book.checks import _problems_from_facts
from rlcourse.config import REPO_ROOT

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(os.environ.get("RLCOURSE_SCREENSHOTS", REPO_ROOT / "screenshots"))
CHAPTER = "09_dpo.ipynb"

# Waits until every markdown cell is rendered, then returns its text (code elements and typeset
# maths skipped, as the HTML book's page check does) and its links.
_READ_MARKDOWN = r"""
(async (wanted, timeoutMs) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const deadline = Date.now() + timeoutMs;
  const cells = () => document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown');
  while (cells().length < wanted && Date.now() < deadline) await sleep(200);
  await sleep(500);
  const skip = 'pre, code, script, style, mjx-container, .MathJax, svg';
  const parts = [];
  for (const cell of cells()) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT, {
      acceptNode: n => (n.parentElement && n.parentElement.closest(skip))
          ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
    while (walker.nextNode()) parts.push(walker.currentNode.textContent);
  }
  const links = Array.from(document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown a'))
      .map(a => ({text: a.textContent, href: a.getAttribute('href') || ''}));
  const first = Array.from(document.querySelectorAll('.jp-RenderedMarkdown a'))
      .find(a => (a.getAttribute('href') || '').includes('bibliography.md'));
  if (first) { first.scrollIntoView({block: 'center'}); first.style.outline = '3px solid red'; }
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return {rendered: cells().length, text: parts.join(' '), links};
})
"""


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
         "--ServerApp.port_retries=0", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
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


def test_a_chapter_in_jupyter_lab_shows_citations_and_terms_not_roles(tmp_path):
    if find_chromium() is None:
        _missing("Chromium not found: apt-get install chromium (or set RLCOURSE_CHROMIUM)")
    for module in ("websocket", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed")
    notebook = json.loads((BOOK_DIR / CHAPTER).read_text(encoding="utf-8"))
    markdown_cells = sum(c["cell_type"] == "markdown" for c in notebook["cells"])
    # Lab writes a checkpoint of a notebook it opens: serve a copy, not the working tree.
    root = tmp_path / "book"
    root.mkdir()
    for name in (CHAPTER, "bibliography.md", "glossary.md"):
        shutil.copy2(BOOK_DIR / name, root / name)
    with _jupyter_lab(root, tmp_path) as (base, token), Chromium() as browser:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": f"{base}/lab/tree/{CHAPTER}?token={token}"},
                     session=session)
        browser.wait_for("Page.loadEventFired", session, 60)
        result = browser.send("Runtime.evaluate", {
            "expression": f"{_READ_MARKDOWN}({markdown_cells}, 90000)",
            "awaitPromise": True, "returnByValue": True}, session=session)
        facts = result.get("result", {}).get("value") or {}
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"jupyterlab-{Path(CHAPTER).stem}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot {path}")
    assert facts.get("rendered") == markdown_cells, facts.get("rendered")
    problems = [p for p in _problems_from_facts({"text": facts["text"]}, False, False)
                if p.startswith("raw MyST role")]
    assert problems == []
    assert "{cite" not in facts["text"] and "{term}" not in facts["text"]
    # Lab resolves a relative link against the server (/files/bibliography.md?_xsrf=...#key).
    links = [(a["text"], urlsplit(a["href"])) for a in facts["links"]]
    citations = [(t, u.fragment) for t, u in links if u.path.endswith("/bibliography.md")]
    terms = [(t, u.fragment) for t, u in links if u.path.endswith("/glossary.md")]
    assert ("Rafailov et al. (2023)", "rafailov2023direct") in citations
    assert ("win rate", "term-win-rate") in terms
    assert len(citations) == 11 and len(terms) == 9, (citations, terms)
