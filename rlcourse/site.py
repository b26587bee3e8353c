"""Build the HTML book and check it in a headless browser: the command line of
:mod:`rlcourse.book` (build in :mod:`rlcourse.book.build`, server and browser in
:mod:`rlcourse.book.browser`, page checks in :mod:`rlcourse.book.checks`), whose names it
re-exports.

    python -m rlcourse.site build                 # -> book/_build/html (prints index.html)
    python -m rlcourse.site build --source DIR --output OUT --all --strict
    python -m rlcourse.site check                 # serve book/_build/html, open every page

What a build does, step by step, is in :mod:`rlcourse.book.build`'s docstring; what the
browser check looks for (console errors, untypeset formulas, widgets that did not render,
images that did not load, requests that left the machine) in :mod:`rlcourse.book.checks`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlcourse.book.browser import (
    CHROMIUM_CANDIDATES,
    CHROMIUM_FLAGS,
    Chromium,
    find_chromium,
    serve,
)
from rlcourse.book.build import (
    BOOK_DIR,
    CHAPTER_PATTERN,
    LANDING_PAGE,
    NODE_MODULES,
    PARTS,
    REFERENCE_CAPTION,
    REFERENCE_PAGES,
    VENDOR,
    WIDGET_STATE_MIME,
    WIDGET_VIEW_MIME,
    BuildResult,
    SiteBuildError,
    build,
    build_once,
    chapter_notebooks,
    ensure_node_modules,
    make_toc,
    missing_site_tools,
    part_of,
    remote_assets,
    toc_pages,
    vendor_assets,
    write_toc,
)
from rlcourse.book.checks import (
    PageReport,
    check_page,
    check_site,
    inspect_page,
    page_expectations,
)
from rlcourse.config import REPO_ROOT

__all__ = [
    "BOOK_DIR", "CHAPTER_PATTERN", "CHROMIUM_CANDIDATES", "CHROMIUM_FLAGS", "LANDING_PAGE",
    "NODE_MODULES", "PARTS", "REFERENCE_CAPTION", "REFERENCE_PAGES", "VENDOR",
    "WIDGET_STATE_MIME", "WIDGET_VIEW_MIME", "BuildResult", "Chromium", "PageReport",
    "SiteBuildError", "build", "build_once", "chapter_notebooks", "check_page", "check_site",
    "ensure_node_modules", "find_chromium", "inspect_page", "main", "make_toc",
    "missing_site_tools", "page_expectations", "part_of", "remote_assets", "serve", "toc_pages",
    "vendor_assets", "write_toc",
]


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
