"""Build the HTML book and check it in a headless browser.

    python -m rlcourse.site build                 # -> book/_build/html (prints index.html)
    python -m rlcourse.site build --source DIR --output OUT --all --strict
    python -m rlcourse.site check                 # serve book/_build/html, open every page

The build is offline and never executes a notebook (``execute_notebooks: "off"``): the
committed notebooks carry their outputs. Steps of :func:`build`:

1. ``npm ci`` in the repository root when ``node_modules`` is missing (``package.json`` pins
   ``mathjax`` and ``@jupyter-widgets/html-manager``; ``package-lock.json`` fixes the rest);
2. copy the files the pages load (MathJax's ``tex-chtml.js`` with the components and fonts it
   loads on demand; the widgets manager's standalone ``embed.js`` with its fonts) into
   ``<source>/_static/vendor/`` (ignored by git);
3. write the table of contents from the chapters present (:func:`make_toc`): the landing page,
   the ``NN_*.ipynb`` chapters sorted by number and grouped into Parts I-IV, then the notation,
   glossary and bibliography pages;
4. run ``jupyter-book build`` (Jupyter Book 1, Sphinx 7); ``book/_ext/rlcourse_offline.py``
   keeps every script and style sheet local (see its docstring).

:func:`build_once` lets several test processes share one build. :func:`check_page` opens one
page in headless Chromium through the DevTools protocol and returns the list of problems it
sees (console errors, untypeset formulas, widgets that did not render, images that did not
load, requests that left the machine); the tests call it on every page.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rlcourse.config import REPO_ROOT
from rlcourse.files import atomic_write_text

try:  # POSIX: lets concurrent test workers share one build (see build_once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

BOOK_DIR = REPO_ROOT / "book"
NODE_MODULES = REPO_ROOT / "node_modules"
VENDOR = Path("_static") / "vendor"

#: Parts of the book by chapter number (DESIGN.md): (first, last, caption).
PARTS: tuple[tuple[int, int, str], ...] = (
    (1, 3, "Part I: Foundations"),
    (4, 8, "Part II: Policies, rewards and PPO"),
    (9, 13, "Part III: Preference optimisation"),
    (14, 16, "Part IV: Scaling up and beyond"),
)
#: The pages around the chapters: the landing page (root of the toc) and the reference part.
LANDING_PAGE = "intro"
REFERENCE_PAGES = ("notation", "glossary", "bibliography")
REFERENCE_CAPTION = "Reference"

CHAPTER_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


class SiteBuildError(RuntimeError):
    """The HTML book could not be built; the message carries the end of the tool's output."""


# --------------------------------------------------------------------------- table of contents


def chapter_notebooks(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The chapter notebooks ``NN_name.ipynb`` of ``book_dir``, sorted by chapter number."""
    found = [p for p in Path(book_dir).glob("*.ipynb") if CHAPTER_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: (int(p.name[:2]), p.name))


def part_of(number: int) -> int:
    """The part (0-based index into :data:`PARTS`) that chapter ``number`` belongs to."""
    for index, (first, last, _) in enumerate(PARTS):
        if first <= number <= last:
            return index
    raise ValueError(f"chapter number {number} is outside every part of the book {PARTS}")


def make_toc(book_dir: Path = BOOK_DIR) -> dict[str, Any]:
    """The Jupyter Book table of contents (``jb-book`` format) for the chapters present.

    Parts I-IV hold the chapters by number (01-03, 04-08, 09-13, 14-16), numbered continuously
    (chapter titles only: a chapter's own headings stay as its author wrote them); a part with
    no chapter yet is left out. The reference part (notation, glossary,
    bibliography) comes last and is not numbered.
    """
    book_dir = Path(book_dir)
    grouped: dict[int, list[str]] = {}
    for notebook in chapter_notebooks(book_dir):
        grouped.setdefault(part_of(int(notebook.name[:2])), []).append(notebook.stem)
    parts: list[dict[str, Any]] = [
        {"caption": PARTS[i][2], "numbered": 1, "chapters": [{"file": s} for s in stems]}
        for i, stems in sorted(grouped.items())
    ]
    reference = [p for p in REFERENCE_PAGES if (book_dir / f"{p}.md").is_file()]
    if reference:
        parts.append({"caption": REFERENCE_CAPTION, "chapters": [{"file": p} for p in reference]})
    toc: dict[str, Any] = {"format": "jb-book", "root": LANDING_PAGE}
    if parts:
        toc["parts"] = parts
    return toc


def write_toc(book_dir: Path, path: Path) -> Path:
    """Write :func:`make_toc` of ``book_dir`` to ``path`` as YAML and return ``path``."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `python -m rlcourse.site build` from the chapters present; do not edit\n"
    atomic_write_text(path, header + yaml.safe_dump(make_toc(book_dir), sort_keys=False))
    return path


def toc_pages(toc: dict[str, Any]) -> list[str]:
    """Every document of a ``jb-book`` toc in reading order (root first)."""
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part["chapters"]]
    return pages


# --------------------------------------------------------------------------- vendored JavaScript


def ensure_node_modules(root: Path = REPO_ROOT, npm: str | None = None) -> Path:
    """Install the npm packages of ``root/package.json`` unless ``root/node_modules`` has them.

    Runs ``npm ci`` (exact versions from ``package-lock.json``) or, without a lock file,
    ``npm install``; install scripts are not run (the packages need none).
    """
    root = Path(root)
    node_modules = root / "node_modules"
    wanted = json.loads((root / "package.json").read_text(encoding="utf-8"))["dependencies"]
    if all((node_modules / name / "package.json").is_file() for name in wanted):
        return node_modules
    npm = npm or shutil.which("npm")
    if npm is None:
        raise SiteBuildError(
            "npm is needed once to install MathJax and the Jupyter widgets manager "
            f"({', '.join(wanted)}) into {node_modules}; install Node.js (e.g. apt-get install npm)"
        )
    verb = "ci" if (root / "package-lock.json").is_file() else "install"
    command = [npm, verb, "--ignore-scripts", "--no-audit", "--no-fund"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SiteBuildError(f"`{' '.join(command)}` failed in {root}:\n{done.stderr[-3000:]}")
    return node_modules


def missing_site_tools(root: Path = REPO_ROOT) -> str | None:
    """Why the site cannot be built here (no Jupyter Book, or neither ``node_modules`` nor
    ``npm``), or None when it can."""
    import importlib.util

    if importlib.util.find_spec("jupyter_book") is None:
        return "jupyter-book is not installed (pip install -e '.[book]')"
    if not (Path(root) / "node_modules").is_dir() and shutil.which("npm") is None:
        return "npm is missing and node_modules/ is not installed (apt-get install npm)"
    return None


#: What the pages load, as (folder under node_modules, glob patterns, folder under vendor/).
VENDOR_FILES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # MathJax loads its components (TeX extensions via autoload, the menu, accessibility, the
    # speech-rule engine) and its fonts from paths relative to tex-chtml.js.
    (
        "mathjax/es5",
        (
            "tex-chtml.js",
            "input/**/*",
            "output/chtml.js",
            "output/chtml/**/*",
            "a11y/**/*",
            "ui/**/*",
            "adaptors/**/*",
            "sre/**/*",
        ),
        "mathjax",
    ),
    ("mathjax", ("LICENSE",), "mathjax"),
    # The standalone widgets manager (no require.js) and the fonts its CSS refers to.
    (
        "@jupyter-widgets/html-manager",
        ("dist/embed.js", "dist/embed.js.LICENSE.txt", "dist/*.woff2", "dist/*.woff",
         "dist/*.ttf", "dist/*.eot", "dist/*.svg"),
        "jupyter-widgets",
    ),
)


def vendor_assets(node_modules: Path, destination: Path) -> list[Path]:
    """Copy the files listed in :data:`VENDOR_FILES` into ``destination``; return the copies.

    ``dist/`` prefixes are dropped, so ``embed.js`` sits next to its fonts as webpack expects.
    Files already there with the same size and modification time are not copied again.
    """
    node_modules, destination = Path(node_modules), Path(destination)
    copied: list[Path] = []
    for package, patterns, target in VENDOR_FILES:
        base = node_modules / package
        if not base.is_dir():
            raise SiteBuildError(f"{base} is missing; run `npm ci` in {node_modules.parent}")
        for pattern in patterns:
            sources = [p for p in base.glob(pattern) if p.is_file()]
            if not sources:
                raise SiteBuildError(f"{base} has no file matching {pattern!r}")
            for src in sources:
                relative = src.relative_to(base)
                if relative.parts[0] == "dist":
                    relative = Path(*relative.parts[1:])
                dst = destination / target / relative
                stat = src.stat()
                if dst.is_file() and dst.stat().st_size == stat.st_size and (
                    int(dst.stat().st_mtime) == int(stat.st_mtime)
                ):
                    copied.append(dst)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                copied.append(dst)
    return copied


# --------------------------------------------------------------------------- build


@dataclass
class BuildResult:
    """What :func:`build` made: the HTML folder, the pages in reading order and the warnings."""

    html: Path
    pages: list[str]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def index(self) -> Path:
        return self.html / "index.html"


def build(
    source: Path = BOOK_DIR,
    output: Path | None = None,
    *,
    all_pages: bool = True,
    strict: bool = False,
    node_root: Path = REPO_ROOT,
) -> BuildResult:
    """Build the book in ``source`` into ``output/_build/html`` (``output`` defaults to ``source``).

    Installs the npm packages if needed, vendors them into ``source/_static/vendor``, writes the
    table of contents to ``output/_build/_toc.yml`` and runs ``jupyter-book build`` without
    executing notebooks. ``strict`` turns Sphinx warnings into errors. Raises
    :class:`SiteBuildError` with the end of Jupyter Book's output when the build fails.
    """
    start = time.perf_counter()
    source = Path(source).resolve()
    output = Path(output).resolve() if output is not None else source
    node_modules = ensure_node_modules(node_root)
    vendor_assets(node_modules, source / VENDOR)
    toc_path = write_toc(source, output / "_build" / "_toc.yml")
    command = [
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
        "build", str(source), "--path-output", str(output), "--toc", str(toc_path),
    ]
    if all_pages:
        command.append("--all")
    if strict:
        command += ["-W", "--keep-going"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SiteBuildError(f"jupyter-book build {source} failed:\n{log[-6000:]}")
    html = output / "_build" / "html"
    import yaml

    pages = toc_pages(yaml.safe_load(toc_path.read_text(encoding="utf-8")))
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    return BuildResult(html, pages, warnings, time.perf_counter() - start)


def build_once(output: Path, source: Path = BOOK_DIR, **options: Any) -> BuildResult:
    """:func:`build` into ``output`` once, however many processes ask at the same time.

    The first caller takes a lock on ``output/build.lock`` and builds; later callers (other
    pytest-xdist workers, or other test modules of the same session) wait for the lock and reuse
    the recorded result, or re-raise the recorded :class:`SiteBuildError`.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    record = output / "build.json"
    with open(output / "build.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if record.is_file():
                done = json.loads(record.read_text(encoding="utf-8"))
                if "error" in done:
                    raise SiteBuildError(done["error"])
                return BuildResult(Path(done["html"]), done["pages"], done["warnings"], 0.0)
            try:
                result = build(source, output, **options)
            except SiteBuildError as error:
                atomic_write_text(record, json.dumps({"error": str(error)}))
                raise
            atomic_write_text(record,
                json.dumps(
                    {"html": str(result.html), "pages": result.pages, "warnings": result.warnings,
                     "seconds": result.seconds}
                ),
                encoding="utf-8",
            )
            return result
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def remote_assets(html_dir: Path) -> dict[str, list[str]]:
    """Pages of ``html_dir`` whose ``<script src>`` or ``<link href>`` (other than plain
    hyperlinks such as ``rel="canonical"``) point at ``http(s)://`` or ``//`` addresses."""
    pattern = re.compile(
        r"<script[^>]*\ssrc=[\"']((?:https?:)?//[^\"']+)"
        r"|<link[^>]*rel=[\"'](?:stylesheet|preload|modulepreload|icon)[\"'][^>]*"
        r"href=[\"']((?:https?:)?//[^\"']+)"
        r"|<link[^>]*href=[\"']((?:https?:)?//[^\"']+)[\"'][^>]*rel=[\"']"
        r"(?:stylesheet|preload|modulepreload|icon)[\"']",
        re.I,
    )
    found: dict[str, list[str]] = {}
    for page in sorted(Path(html_dir).rglob("*.html")):
        urls = [next(g for g in m.groups() if g) for m in pattern.finditer(page.read_text("utf-8"))]
        if urls:
            found[page.relative_to(html_dir).as_posix()] = urls
    return found


# --------------------------------------------------------------------------- serving


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on ``http://127.0.0.1:<free port>/`` in a thread; yield that URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1280,900",
    # Nothing but this machine resolves: a page that reaches for a CDN fails at once, visibly.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


def find_chromium() -> str | None:
    """The Chromium executable: ``$RLCOURSE_CHROMIUM``, ``/usr/bin/chromium`` or one on PATH."""
    explicit = os.environ.get("RLCOURSE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    for name in CHROMIUM_CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one websocket, flat sessions).

    ``with Chromium() as browser: problems = check_page(url, browser)``. Uses a fresh
    profile in a temporary folder, removed on exit.
    """

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        import websocket  # websocket-client

        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("Chromium not found (apt-get install chromium)")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="rlcourse-chromium-")
        self._process = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so close() ends every child
        )
        try:
            port_file = Path(self._profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    code = self._process.poll()
                    raise RuntimeError(f"{self.executable} did not start (exit code {code})")
                time.sleep(0.05)
            port, path = port_file.read_text().split()[:2]
            self._ws = websocket.create_connection(
                f"ws://127.0.0.1:{port}{path}", timeout=timeout, suppress_origin=True,
                enable_multithread=False,
            )
        except BaseException:
            self.close()
            raise
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # -- protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one DevTools command and return its result (events meanwhile go to ``events``)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply is None:
                raise TimeoutError(f"no reply to {method} within {self.timeout} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float) -> dict | None:
        """Wait for the event ``method`` of ``session``; None when it does not come in time."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            reply = self._receive(deadline)
            if reply is None:
                return None
            self.events.append(reply)

    def _receive(self, deadline: float) -> dict | None:
        import websocket

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self._ws.settimeout(remaining)
        try:
            return json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            return None

    def close(self) -> None:
        """End the browser (its whole process group) and remove the temporary profile."""
        with contextlib.suppress(Exception):
            self._ws.close()
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    raw TeX delimiters left in the text); a widget view that did not render, or no rendered
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


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcourse.site")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the HTML book (offline, no execution)")
    b.add_argument("--source", type=Path, default=BOOK_DIR, help="book folder (default book/)")
    b.add_argument("--output", type=Path, default=None, help="folder for _build (default: source)")
    b.add_argument("--all", action="store_true", help="rebuild every page, not only changed ones")
    b.add_argument("--strict", action="store_true", help="treat Sphinx warnings as errors")
    c = sub.add_parser("check", help="open every built page in headless Chromium")
    c.add_argument("--source", type=Path, default=BOOK_DIR)
    c.add_argument("--html", type=Path, default=None, help="built site (source/_build/html)")
    c.add_argument("--screenshots", type=Path, default=REPO_ROOT / "screenshots")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            result = build(args.source, args.output, all_pages=args.all, strict=args.strict)
        except SiteBuildError as error:
            print(error, file=sys.stderr)
            return 1
        for warning in result.warnings:
            print(warning)
        print(f"built {len(result.pages)} pages in {result.seconds:.1f} s: {result.index}")
        return 0
    html = args.html or args.source / "_build" / "html"
    toc = args.source.resolve() / "_build" / "_toc.yml"
    import yaml

    pages = toc_pages(yaml.safe_load(toc.read_text())) if toc.is_file() else toc_pages(
        make_toc(args.source)
    )
    reports = check_site(html, pages, args.source, args.screenshots)
    failed = 0
    for page, report in reports.items():
        print(f"{'ok  ' if not report.problems else 'FAIL'}  {page}")
        for problem in report.problems:
            print(f"      {problem}")
        failed += bool(report.problems)
    print(f"screenshots in {args.screenshots}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
