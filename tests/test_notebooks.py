"""Every chapter of the book executes top to bottom in quick mode.

A failure names the notebook and the cell (see ``rlcourse.notebooks.NotebookError``). The
committed notebooks must also carry outputs of a full run and no error outputs, and the cells
tagged ``mode-independent`` must print in the quick run what the committed notebook shows.
"""

import json
import time

import pytest

from rlcourse.notebooks import chapters, execute_notebook, mode_independent_mismatches

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


def test_kernel_channels_poll_in_short_slices():
    """A lost wake-up must cost one slice, not the whole timeout (see ``_poll_in_slices``)."""
    import asyncio
    from queue import Empty

    from rlcourse.notebooks import POLL_SLICE_S, _poll_in_slices

    class FakeChannel:
        def __init__(self, empty_polls):
            self.empty_polls, self.asked = empty_polls, []

        async def get_msg(self, timeout=None):
            self.asked.append(timeout)
            if len(self.asked) <= self.empty_polls:
                raise Empty
            return {"msg": "reply"}

    # the message turns up on the fourth poll: three empty slices, then the reply
    channel = FakeChannel(empty_polls=3)
    _poll_in_slices(channel)
    assert asyncio.run(channel.get_msg(timeout=600)) == {"msg": "reply"}
    assert len(channel.asked) == 4 and all(t <= POLL_SLICE_S for t in channel.asked)
    # no timeout (the IOPub channel): still sliced, never a single unbounded poll
    channel = FakeChannel(empty_polls=2)
    _poll_in_slices(channel)
    assert asyncio.run(channel.get_msg()) == {"msg": "reply"}
    assert channel.asked == [POLL_SLICE_S] * 3
    # nothing ever arrives: Empty once the caller's timeout has passed
    channel = FakeChannel(empty_polls=10**9)
    _poll_in_slices(channel)
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.0))
