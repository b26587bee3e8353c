"""Every chapter of the book executes top to bottom in quick mode.

A failure names the notebook and the cell (see ``rlcourse.notebooks.NotebookError``). The
committed notebooks must also carry outputs of a full run and no error outputs, and the cells
tagged ``mode-independent`` must print in the quick run what the committed notebook shows.
"""

import json
import time

import pytest

from rlcourse.notebooks import (
    NotebookError,
    chapters,
    execute_notebook,
    front_end_replies,
    mode_independent_mismatches,
)

CHAPTERS = chapters()


def test_the_book_has_chapters():
    assert len(CHAPTERS) >= 3


@pytest.mark.notebook
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_executes_in_quick_mode(path):
    start = time.perf_counter()
    # Single-threaded kernels: the suite runs notebooks two at a time on two cores.
    # A quick-mode chapter takes well under a minute; a cell still running after 4 minutes is a
    # hang, and failing then (naming the cell) beats waiting for the 10-minute default.
    executed = execute_notebook(path, quick=True, cell_timeout=240,
                                extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    print(f"{path.name} executed in {time.perf_counter() - start:.1f} s")
    # Cells tagged mode-independent print the same in quick mode as in the committed (full)
    # run; a difference means the committed outputs are stale (see rlcourse.notebooks).
    committed = json.loads(path.read_text(encoding="utf-8"))
    problems = mode_independent_mismatches(committed, executed, path.name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_chapter_has_outputs_and_no_errors(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code"
    errors = [
        i for i, c in enumerate(code_cells, 1)
        if any(o.get("output_type") == "error" for o in c.get("outputs", []))
    ]
    assert not errors, f"{path.name}: code cells {errors} hold error outputs"
    executed = [c for c in code_cells if c.get("execution_count")]
    assert len(executed) == len(code_cells), f"{path.name}: some cells were never executed"
    markdown = "".join("".join(c["source"]) for c in notebook["cells"]
                       if c["cell_type"] == "markdown")
    assert "Exercise" in markdown, f"{path.name} has no exercises section"


def test_front_end_replies_name_the_cell_and_the_message():
    notebook = {"cells": [{"cell_type": "markdown"}, {"cell_type": "code"},
                          {"cell_type": "code"}]}
    sent = [(2, "comm_msg"), (2, "comm_msg"), (None, "comm_info_request")]
    problems = front_end_replies(notebook, sent, "13_demo.ipynb")
    assert [p.split(" (an ipywidgets")[0] for p in problems] == [
        "13_demo.ipynb: code cell 2 made the client send the kernel 2 comm_msg message(s) while "
        "it ran",
        "13_demo.ipynb: code cell ? made the client send the kernel 1 comm_info_request "
        "message(s) while it ran"]
    assert front_end_replies(notebook, [], "x") == []


@pytest.mark.notebook
def test_runner_fails_a_cell_whose_output_widget_the_client_fills(tmp_path):
    """A cell printing inside ``with Output():`` makes nbclient send the widget's state back on
    the shell channel, the message that can hang plain nbconvert (``rlcourse.teaching.widgets``):
    the runner refuses it. The same output set from the kernel (``interact_or_call``) passes."""
    nbformat = pytest.importorskip("nbformat")
    from nbformat.v4 import new_code_cell, new_notebook

    # the sleep keeps the execute_reply well after nbclient's send: this run cannot hang
    captured = ("import time\nfrom ipywidgets import Output\nout = Output()\ndisplay(out)\n"
                "with out:\n    print('inside')\ntime.sleep(1)")
    path = tmp_path / "widget.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell(captured)]), path)
    with pytest.raises(NotebookError, match=r"code cell 2 made the client send the kernel \d+ "
                                             r"comm_msg"):
        execute_notebook(path, cell_timeout=60, extra_env={"OMP_NUM_THREADS": "1"})
    kernel_side = ("from ipywidgets import IntSlider\n"
                   "from rlcourse.teaching.widgets import interact_or_call\n"
                   "interact_or_call(lambda n: print('n =', n), n=IntSlider(3))")
    nbformat.write(new_notebook(cells=[new_code_cell(kernel_side)]), path)
    executed = execute_notebook(path, cell_timeout=60, extra_env={"OMP_NUM_THREADS": "1"})
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [m["state"]["outputs"] for m in state.values() if m["model_name"] == "OutputModel"]
    assert outputs == [[{"output_type": "stream", "name": "stdout", "text": "n = 3\n"}]]


@pytest.mark.notebook
def test_a_chapter_finishes_under_plain_nbconvert(tmp_path):
    """What a reader runs: ``jupyter nbconvert --execute`` (nbclient without this project's
    runner) on the chapter with the most sliders, in quick mode. The limit only guards against
    a hang (the chapter takes about 10 s; it hung before its Output widgets were filled from the
    kernel)."""
    import os
    import subprocess
    import sys

    chapter = next(p for p in CHAPTERS if p.name.startswith("13_"))
    out = tmp_path / "executed.ipynb"
    env = {**os.environ, "RLCOURSE_QUICK": "1", "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute",
             "--output", str(out), str(chapter)],
            env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"jupyter nbconvert --execute {chapter.name} still running after 240 s")
    assert run.returncode == 0, run.stderr[-3000:]
    executed = json.loads(out.read_text(encoding="utf-8"))
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "a cell was not executed"
