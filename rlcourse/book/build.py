"""Build the HTML book (book tooling, layer 5): table of contents, vendored JS, Jupyter Book.

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

:func:`build_once` lets several test processes share one build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
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

#: Parts of the book by chapter number: (first, last, caption).
PARTS: tuple[tuple[int, int, str], ...] = (
    (1, 3, "Part I: Foundations"),
    (4, 8, "Part II: Policies, rewards and PPO"),
    (9, 13, "Part III: Preference optimisation"),
    (14, 17, "Part IV: Scaling up and beyond"),
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

    Parts I-IV hold the chapters by number (01-03, 04-08, 09-13, 14-17), numbered continuously
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
            atomic_write_text(record, json.dumps(
                {"html": str(result.html), "pages": result.pages, "warnings": result.warnings,
                 "seconds": result.seconds}))
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
