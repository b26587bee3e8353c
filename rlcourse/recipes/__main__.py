"""``python -m rlcourse.recipes``: :func:`rlcourse.recipes.cli.main`."""

import sys

from rlcourse.recipes.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
