"""Sphinx extension: the HTML book loads every script from its own ``_static/vendor/`` folder.

``python -m rlcourse.site build`` copies MathJax 3 and the Jupyter widgets HTML manager from
``node_modules`` into ``book/_static/vendor/``; ``_config.yml`` points ``mathjax_path`` and
``nb_ipywidgets_js`` at those copies. This extension does the rest:

* Jupyter Book adds *every* ``.js``/``.css`` file under ``_static/`` to every page. The vendored
  packages hold hundreds of MathJax components that MathJax loads itself on demand, so the
  ``vendor/`` entries are removed from ``html_js_files``/``html_css_files`` again (the files
  are still copied into the site).
* Any script or style sheet that would still come from ``http(s)://`` (a theme or extension
  default such as the require.js and ``embed-amd.js`` CDN URLs of myst-nb) is dropped from the
  page and reported as a Sphinx warning, so the page never waits on a CDN. Inline scripts that
  extensions add twice are kept once (a repeated ``const`` is a console error).
* After the build, it warns when the vendored files are missing from the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)

VENDOR_PREFIX = "vendor/"
#: Files the pages load; ``rlcourse.site`` copies them, the build checks they arrived.
REQUIRED_VENDOR_FILES = (
    "vendor/mathjax/tex-chtml.js",
    "vendor/jupyter-widgets/embed.js",
)


def _name(entry: Any) -> str:
    """The file name of an ``html_js_files`` entry: a string or a ``(name, attributes)`` pair."""
    return entry[0] if isinstance(entry, (tuple, list)) else str(entry)


def _is_remote(filename: str | None) -> bool:
    """True for ``https://…``, ``http://…`` and protocol-relative ``//host/…`` addresses."""
    return bool(filename) and ("://" in filename or filename.startswith("//"))


def drop_vendor_assets(app: Sphinx, config: Config) -> None:
    """Remove the files Jupyter Book found under ``_static/vendor/`` from every page's head."""
    for key in ("html_js_files", "html_css_files"):
        entries = list(getattr(config, key, []) or [])
        kept = [e for e in entries if not _name(e).startswith(VENDOR_PREFIX)]
        setattr(config, key, kept)


def clean_page_assets(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any
) -> None:
    """Drop ``http(s)://`` scripts and style sheets from a page (with a warning naming them)
    and repeated inline scripts.

    sphinx-thebe and sphinx-togglebutton add their inline configuration script once per page
    *and* once globally; the repeated ``const THEBE_JS_URL = ...`` is a SyntaxError in the
    browser console.
    """
    for key in ("script_files", "css_files"):
        files = context.get(key)
        if not files:
            continue
        remote = [f for f in files if _is_remote(getattr(f, "filename", str(f)))]
        for asset in remote:
            logger.warning(
                "rlcourse_offline: %s would load %s from the internet; dropped it",
                pagename,
                getattr(asset, "filename", asset),
                type="rlcourse",
                subtype="remote",
            )
            files.remove(asset)
    scripts = context.get("script_files")
    if scripts:
        seen: set[str] = set()
        for asset in list(scripts):
            body = getattr(asset, "attributes", {}).get("body")
            if not body or getattr(asset, "filename", None):
                continue
            if body in seen:
                scripts.remove(asset)
            seen.add(body)


def check_vendor_files(app: Sphinx, exception: Exception | None) -> None:
    """Warn when the pages reference vendored files the output does not contain."""
    if exception is not None or app.builder is None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    for relative in REQUIRED_VENDOR_FILES:
        if not (static / relative).is_file():
            logger.warning(
                "rlcourse_offline: _static/%s is missing; build with `python -m rlcourse.site "
                "build`, which installs it from npm",
                relative,
                type="rlcourse",
                subtype="vendor",
            )


def setup(app: Sphinx) -> dict[str, Any]:
    # Priority 900: after jupyter-book's own config handling has filled html_js_files.
    app.connect("config-inited", drop_vendor_assets, priority=900)
    # Priority 900: after myst-nb added its per-page widget scripts (default priority 500).
    app.connect("html-page-context", clean_page_assets, priority=900)
    app.connect("build-finished", check_vendor_files)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
