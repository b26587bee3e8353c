"""Book tooling (layer 5), kept apart from the library a practitioner imports.

- :mod:`rlcourse.book.build`: the HTML book (table of contents, vendored JavaScript,
  ``jupyter-book build``, one shared build for parallel tests);
- :mod:`rlcourse.book.browser`: a local HTTP server and a headless Chromium (DevTools protocol);
- :mod:`rlcourse.book.checks`: what each page should show and the problems a browser sees;
- :mod:`rlcourse.book.citations`: the chapters' citations and glossary links as Markdown links
  Jupyter Lab renders, converted from and back to MyST roles (the HTML build uses the roles);
- :mod:`rlcourse.book.pages`: the Markdown pages (glossary entries, the reference list, anchors,
  page links) in plain Markdown for Lab, and as MyST for the HTML build; the raw-MyST check.

``python -m rlcourse.site build|check`` is the command line (:mod:`rlcourse.site`).
"""
