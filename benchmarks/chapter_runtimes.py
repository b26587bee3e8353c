"""Quick-mode run time of every chapter, for the learner's map on the book's landing page.

Executes each chapter with ``RLCOURSE_QUICK=1`` in a fresh single-threaded kernel (as
``tests/test_notebooks.py`` does) and records ``quick_seconds``, the span of the executed
cells' timestamps (the same measure as the full-mode time, which needs no run: the committed
notebooks carry their timestamps; :func:`rlcourse.teaching.learner_map.full_run_seconds`),
and ``wall_seconds``, which adds starting the kernel.

Usage::

    python benchmarks/chapter_runtimes.py [--save-dir DIR] [book/NN_name.ipynb ...]
    python -m rlcourse.teaching.learner_map --write                 # refresh book/intro.md
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from rlcourse.files import atomic_write_text
from rlcourse.notebooks import chapters, execute_notebook
from rlcourse.teaching.learner_map import full_run_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "chapter_runtimes.json"


def main(argv: list[str]) -> int:
    save = None
    if argv[:1] == ["--save-dir"]:  # keep the executed quick-mode notebooks (for comparisons)
        save, argv = Path(argv[1]), argv[2:]
        save.mkdir(parents=True, exist_ok=True)
    paths = [Path(a) for a in argv] or chapters()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault("chapters", {})
    data.setdefault("machine", "one CPU thread (rough timings on a shared machine)")
    data["platform"] = platform.platform()
    for path in paths:
        start = time.perf_counter()
        executed = execute_notebook(path, quick=True, cell_timeout=600,
                                    extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        seconds = round(time.perf_counter() - start, 1)
        if save is not None:
            import nbformat

            nbformat.write(executed, save / path.name)
        data["chapters"][path.stem] = {"quick_seconds": round(full_run_seconds(executed), 1),
                                       "wall_seconds": seconds}
        print(f"{path.name}: {seconds} s", flush=True)
        atomic_write_text(RESULTS, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
