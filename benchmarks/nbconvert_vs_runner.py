"""Every chapter in quick mode under plain ``jupyter nbconvert --execute`` and under the project's
runner, timed one after the other on the same machine (issue 21's acceptance: nbconvert within
twice the runner's time).

For each chapter, in turn, both as a reader would start them from a shell, with
``RLCOURSE_QUICK=1`` and ``OMP_NUM_THREADS=1`` (what ``tests/test_notebooks.py`` uses):

- runner: ``python -m rlcourse.notebooks execute --quick --no-write book/NN_name.ipynb``
  (nbclient as it comes, plus a check that no cell makes the client answer the kernel);
- nbconvert: ``python -m nbconvert --to notebook --execute --output TMP book/NN_name.ipynb``
  (nbclient with nbconvert's defaults: no cell timeout, so a lost wake-up hangs; a run still
  going after :data:`HANG_S` seconds is stopped and recorded as a hang).

Both times are wall-clock seconds of the whole command (Python start, imports, kernel start
included), so the ratio compares like with like. The runner goes first for odd chapter
numbers and second for even ones, so that neither always runs on a warmer cache. The machine
is shared: the ratios, measured minutes apart, are what to read, not the seconds.

Usage::

    python benchmarks/nbconvert_vs_runner.py [book/NN_name.ipynb ...]

writes ``benchmarks/results/nbconvert_vs_runner.json`` (after each chapter, so an interrupted
run keeps what it measured) and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlcourse.config import REPO_ROOT
from rlcourse.files import atomic_write_text
from rlcourse.notebooks import chapters

RESULTS = Path(__file__).resolve().parent / "results" / "nbconvert_vs_runner.json"
#: A run still going after this many seconds is a hang (a quick chapter takes well under one).
HANG_S = 300
#: The acceptance bound: nbconvert's time at most this multiple of the runner's.
BOUND = 2.0
VERSIONS = ("nbclient", "nbconvert", "jupyter_client", "ipykernel", "pyzmq", "tornado",
            "ipywidgets")


def _timed(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; ``{"seconds", "returncode", "hung", "tail"}``."""
    start = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=HANG_S)
    except subprocess.TimeoutExpired:
        return {"seconds": round(time.perf_counter() - start, 2), "returncode": None,
                "hung": True, "tail": ""}
    tail = "" if run.returncode == 0 else (run.stdout + run.stderr)[-2000:]
    return {"seconds": round(time.perf_counter() - start, 2), "returncode": run.returncode,
            "hung": False, "tail": tail}


def measure(path: Path, scratch: Path) -> dict:
    env = {**os.environ, "RLCOURSE_QUICK": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runner = [sys.executable, "-m", "rlcourse.notebooks", "execute", "--quick", "--no-write",
              str(path)]
    nbconvert = [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute",
                 "--output", str(scratch / path.name), str(path)]
    order = [("runner", runner), ("nbconvert", nbconvert)]
    if int(path.name[:2]) % 2 == 0:
        order.reverse()
    row = {name: _timed(command, env) for name, command in order}
    row["first"] = order[0][0]
    ok = all(row[n]["returncode"] == 0 for n in ("runner", "nbconvert"))
    row["ratio"] = round(row["nbconvert"]["seconds"] / row["runner"]["seconds"], 2)
    row["within_bound"] = ok and row["ratio"] <= BOUND
    return row


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in VERSIONS}


def table(data: dict) -> str:
    lines = ["| chapter | runner (s) | nbconvert (s) | ratio | within 2x |",
             "|---|---|---|---|---|"]
    for stem, row in data["chapters"].items():
        hung = " (hung)" if row["nbconvert"]["hung"] else ""
        lines.append(f"| {stem} | {row['runner']['seconds']:.1f} | "
                     f"{row['nbconvert']['seconds']:.1f}{hung} | {row['ratio']:.2f} | "
                     f"{'yes' if row['within_bound'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or chapters()
    data = {"machine": f"{os.cpu_count()} CPU cores, shared with other jobs; "
                       f"{platform.platform()}",
            "bound": BOUND, "hang_seconds": HANG_S, "versions": _versions(),
            "load_average_at_start": list(os.getloadavg()), "chapters": {}}
    with tempfile.TemporaryDirectory(prefix="nbconvert-vs-runner-") as scratch:
        for path in paths:
            row = measure(path, Path(scratch))
            data["chapters"][path.stem] = row
            data["load_average_at_end"] = list(os.getloadavg())
            print(f"{path.stem}: runner {row['runner']['seconds']:.1f} s, nbconvert "
                  f"{row['nbconvert']['seconds']:.1f} s, ratio {row['ratio']:.2f}", flush=True)
            atomic_write_text(RESULTS, json.dumps(data, indent=1) + "\n")
    print(table(data))
    failed = [s for s, r in data["chapters"].items() if not r["within_bound"]]
    if failed:
        print(f"not within {BOUND}x of the runner (or failed): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
