"""Check the built book in a browser: what each page should show and what it does show.

:func:`check_page` opens one page in headless Chromium (:class:`rlcourse.book.browser.Chromium`)
and returns the list of problems it sees (console errors, untypeset formulas, widgets that did
not render, images that did not load, requests that left the machine); :func:`check_site`
serves a built site and inspects every page; the tests call them on every page.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcourse.book.browser import Chromium, serve
from rlcourse.book.build import BOOK_DIR, WIDGET_STATE_MIME

# JavaScript run in the page after the load event: waits for MathJax's first typesetting and
# for the widgets manager, then describes what it sees. Text inside code, preformatted output
# and typeset math is skipped when looking for raw TeX.
_INSPECT_PAGE = r"""
(async (timeoutMs) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const deadline = Date.now() + timeoutMs;
  const report = {title: document.title};
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    const done = await Promise.race([MathJax.startup.promise.then(() => 'ok'),
                                     sleep(timeoutMs).then(() => 'timeout')]);
    report.mathjax = done;
  } else {
    report.mathjax = 'absent';
  }
  const main = document.querySelector('main') || document.querySelector('article') || document.body;
  const views = Array.from(document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"]'));
  const states = document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-state+json"]');
  const rendered = () => Array.from(document.querySelectorAll('.widget-subarea'))
      .filter(e => e.querySelector('.jupyter-widgets, .lm-Widget')).length;
  // embed.js marks the window when it loads; without it nothing will render, so do not wait.
  report.widgetManager = Boolean(window._jupyter_widget_embedder);
  while (report.widgetManager && views.length && rendered() < views.length
         && Date.now() < deadline) await sleep(100);
  report.widgetViews = views.length;
  report.widgetStates = states.length;
  report.widgetsRendered = rendered();
  const math = Array.from(main.querySelectorAll('.math'));
  report.mathElements = math.length;
  report.typeset = main.querySelectorAll('mjx-container').length;
  report.untypeset = math.filter(e => !e.querySelector('mjx-container'))
      .map(e => e.textContent.trim().slice(0, 120));
  report.mathErrors = Array.from(main.querySelectorAll('mjx-merror'))
      .map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 120));
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, .cell_input, '
             + '.widget-subarea, svg';
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT, {
    acceptNode: n => (n.parentElement && n.parentElement.closest(skip))
        ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  const parts = [];
  while (walker.nextNode()) parts.push(walker.currentNode.textContent);
  report.text = parts.join(' ');
  const images = Array.from(main.querySelectorAll('img'));
  for (const img of images) {
    if (img.loading === 'lazy') img.loading = 'eager';
    if (!img.complete) {
      await Promise.race([new Promise(r => { img.addEventListener('load', r);
                                             img.addEventListener('error', r); }),
                          sleep(Math.max(0, deadline - Date.now()))]);
    }
  }
  report.images = images.map(img => ({src: (img.getAttribute('src') || '').slice(0, 100),
                                      ok: img.complete && img.naturalWidth > 0}));
  return report;
})
"""

# Raw TeX that MathJax should have consumed: display/inline delimiters, environments, and
# $...$ spans that contain a macro.
_RAW_TEX = re.compile(
    r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{|\$[^$\n]{0,80}\\[A-Za-z]+[^$\n]{0,80}\$"
)

# A MyST role left as text: Jupyter Book did not parse it (or Jupyter Lab shows the source; its
# `key` part is then a code element, which the text skips). Not TeX such as \mathrm{ref}.
_RAW_ROLE = re.compile(r"(?<![A-Za-z\\])\{(?:cite(?::[a-z]+)?|term|doc|ref|numref|eq)\}")


@dataclass
class PageReport:
    """What :func:`inspect_page` saw: the problems and the raw facts behind them."""

    url: str
    problems: list[str]
    facts: dict[str, Any] = field(default_factory=dict)
    screenshots: list[Path] = field(default_factory=list)


def inspect_page(
    url: str,
    browser: Chromium,
    *,
    expect_math: bool = False,
    expect_widgets: bool = False,
    screenshot: Path | None = None,
    timeout: float = 30.0,
) -> PageReport:
    """Open ``url`` in a new tab of ``browser`` and report its problems.

    A problem is: a navigation error or an HTTP status >= 400; a console error, an uncaught
    exception or a failed resource; a request to anything but the serving host; a formula
    MathJax did not typeset (a ``.math`` element with no ``mjx-container``, an ``mjx-merror``,
    raw TeX delimiters left in the text); a MyST role left as text (``{cite:t}``, ``{term}``);
    a widget view that did not render, or no rendered
    widget where ``expect_widgets``; an image with ``naturalWidth == 0``; no typeset formula at
    all where ``expect_math``. ``screenshot`` (a ``.png`` path) saves the top of the page and,
    when there are widgets, ``<stem>-widget.png`` scrolled to the first one.
    """
    origin = re.match(r"^[a-z]+://[^/]+", url)
    origin_prefix = origin.group(0) if origin else url
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    problems: list[str] = []
    facts: dict[str, Any] = {}
    shots: list[Path] = []
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.events = [e for e in browser.events if e.get("sessionId") != session]
        navigation = browser.send("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            return PageReport(url, [f"navigation failed: {navigation['errorText']}"])
        if browser.wait_for("Page.loadEventFired", session, timeout) is None:
            problems.append(f"page did not finish loading within {timeout:.0f} s")
        result = browser.send(
            "Runtime.evaluate",
            {
                "expression": f"{_INSPECT_PAGE}({int(timeout * 1000)})",
                "awaitPromise": True,
                "returnByValue": True,
            },
            session=session,
        )
        if "exceptionDetails" in result:
            problems.append(f"page inspection failed: {result['exceptionDetails'].get('text')}")
        facts = result.get("result", {}).get("value") or {}
        # Let late console messages (e.g. from widget rendering) arrive.
        browser.wait_for("__never__", session, 0.3)
        if screenshot is not None:
            has_widget = bool(facts.get("widgetsRendered"))
            shots = _screenshots(browser, session, Path(screenshot), has_widget)
        problems += _problems_from_events(browser.events, session, url, origin_prefix)
        problems += _problems_from_facts(facts, expect_math, expect_widgets)
    finally:
        with contextlib.suppress(Exception):
            browser.send("Target.closeTarget", {"targetId": target})
        browser.events = [e for e in browser.events if e.get("sessionId") != session]
    return PageReport(url, problems, facts, shots)


def check_page(url: str, browser: Chromium | None = None, **options: Any) -> list[str]:
    """The problems :func:`inspect_page` finds on ``url`` (empty when the page is fine).

    Starts (and ends) a headless Chromium when ``browser`` is None.
    """
    if browser is None:
        with Chromium() as own:
            return inspect_page(url, own, **options).problems
    return inspect_page(url, browser, **options).problems


def _problems_from_events(
    events: list[dict[str, Any]], session: str, url: str, origin: str
) -> list[str]:
    problems: list[str] = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.responseReceived" and params.get("type") == "Document":
            status = params["response"].get("status", 0)
            if status >= 400 and params["response"].get("url", "").split("#")[0] == url:
                problems.append(f"page missing: HTTP {status} for {url}")
        elif method == "Network.requestWillBeSent":
            requested = params.get("request", {}).get("url", "")
            if not requested.startswith((origin, "data:", "blob:", "about:")):
                problems.append(f"external request: {requested[:150]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught exception: {str(text)[:300]}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            problems.append(f"console error: {args[:300]}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            problems.append(f"console error: {entry.get('text', '')[:300]}{where}")
    # The same failure often arrives both as a network log entry and a console message.
    return list(dict.fromkeys(problems))


def _problems_from_facts(
    facts: dict[str, Any], expect_math: bool, expect_widgets: bool
) -> list[str]:
    problems: list[str] = []
    if not facts:
        return problems
    if facts.get("mathElements") and facts.get("mathjax") != "ok":
        problems.append(f"MathJax did not typeset the page (MathJax {facts.get('mathjax')})")
    for text in facts.get("untypeset", []):
        problems.append(f"formula not typeset: {text}")
    for error in facts.get("mathErrors", []):
        problems.append(f"MathJax error: {error}")
    if expect_math and not facts.get("typeset"):
        problems.append("no typeset formula on a page that has formulas")
    for match in _RAW_TEX.finditer(facts.get("text", "")):
        text = facts["text"]
        snippet = text[max(0, match.start() - 40) : match.end() + 40].replace("\n", " ")
        problems.append(f"raw TeX left in the text: ...{' '.join(snippet.split())}...")
        break
    for match in _RAW_ROLE.finditer(facts.get("text", "")):
        text = facts["text"]
        snippet = text[max(0, match.start() - 40) : match.end() + 40]
        problems.append(f"raw MyST role left in the text: ...{' '.join(snippet.split())}...")
        break
    views, rendered = facts.get("widgetViews", 0), facts.get("widgetsRendered", 0)
    if rendered < views:
        problems.append(f"widgets not rendered: {rendered} of {views} widget views")
    if expect_widgets and not rendered:
        problems.append("no widget rendered, but the notebook has saved widget state")
    for image in facts.get("images", []):
        if not image["ok"]:
            problems.append(f"image did not load: {image['src']}")
    return problems


def _screenshots(browser: Chromium, session: str, path: Path, has_widget: bool) -> list[Path]:
    """Save the top of the page to ``path`` and, with widgets, ``<stem>-widget.png`` scrolled
    to the first one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = []
    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
    path.write_bytes(base64.b64decode(shot["data"]))
    saved.append(path)
    if has_widget:
        browser.send(
            "Runtime.evaluate",
            {
                "expression": "document.querySelector('.widget-subarea')"
                ".scrollIntoView({block: 'center'}); "
                "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))",
                "awaitPromise": True,
            },
            session=session,
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        widget_path = path.with_name(f"{path.stem}-widget.png")
        widget_path.write_bytes(base64.b64decode(shot["data"]))
        saved.append(widget_path)
    return saved


# --------------------------------------------------------------------------- what to expect


def page_expectations(source: Path, page: str) -> dict[str, bool]:
    """``expect_math``/``expect_widgets`` for ``page`` of the book in ``source``.

    A notebook expects typeset math when a markdown cell holds TeX (``$`` or ``\\begin``) and a
    widget when its metadata carries saved widget state with at least one model.
    """
    notebook = Path(source) / f"{page}.ipynb"
    markdown = Path(source) / f"{page}.md"
    if notebook.is_file():
        data = json.loads(notebook.read_text(encoding="utf-8"))
        text = "".join(
            "".join(c.get("source", "")) for c in data["cells"] if c["cell_type"] == "markdown"
        )
        state = data.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE_MIME, {})
        return {
            "expect_math": "$" in text or "\\begin{" in text,
            "expect_widgets": bool(state.get("state")),
        }
    if markdown.is_file():
        text = markdown.read_text(encoding="utf-8")
        return {"expect_math": "$" in text or "{math}" in text, "expect_widgets": False}
    return {"expect_math": False, "expect_widgets": False}


def check_site(
    html_dir: Path,
    pages: list[str],
    source: Path = BOOK_DIR,
    screenshots: Path | None = None,
    browser: Chromium | None = None,
) -> dict[str, PageReport]:
    """Serve ``html_dir`` and inspect every page (documents of the toc, e.g. ``intro``)."""
    reports: dict[str, PageReport] = {}
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(serve(html_dir))
        browser = browser or stack.enter_context(Chromium())
        for page in pages:
            shot = Path(screenshots) / f"{page}.png" if screenshots else None
            reports[page] = inspect_page(
                f"{base}{page}.html", browser, screenshot=shot, **page_expectations(source, page)
            )
    return reports
