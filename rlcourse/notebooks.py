"""Execute the book's notebooks: headless, in quick mode for tests, in full mode for the outputs.

    python -m rlcourse.notebooks execute            # re-run every chapter in full mode, in place
    python -m rlcourse.notebooks execute --quick book/02_markov_processes.ipynb

Uses ``nbclient`` (the engine behind ``jupyter nbconvert --execute``). Widget state is stored
in the notebook so the HTML book can show widgets without a kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rlcourse.config import REPO_ROOT

BOOK_DIR = REPO_ROOT / "book"


class NotebookError(RuntimeError):
    """A cell of a chapter failed; the message names the notebook and the cell."""


def chapters(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The chapter notebooks in reading order (their file names start with the chapter number)."""
    return sorted(p for p in book_dir.glob("*.ipynb") if p.name[:2].isdigit())


#: Longest single wait on a kernel socket; see :func:`_poll_in_slices`.
POLL_SLICE_S = 0.5


def _poll_in_slices(channel) -> None:
    """Make ``channel.get_msg(timeout)`` wait in slices of at most :data:`POLL_SLICE_S`.

    Why: jupyter_client waits for a kernel message with one ``socket.poll(timeout)``. Now and
    then the wake-up for a message that has arrived is lost (a ZeroMQ socket signals readiness
    edge-triggered), and the poll sleeps until its timeout, then finds the message waiting: a
    quick chapter took 47 s instead of 7 (cell timeout 40 s) and 608 s instead of 8 (600 s),
    and a wait with no timeout (the IOPub channel) can hang for good. Polling in short slices
    bounds each lost wake-up to half a second; the total timeout is unchanged.
    """
    from queue import Empty
    from time import monotonic

    original = channel.get_msg

    async def get_msg(timeout: float | None = None):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, deadline - monotonic())
            try:
                return await original(timeout=min(POLL_SLICE_S, left))
            except Empty:
                if deadline is not None and monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def _client_class(base):
    """``base`` (nbclient's ``NotebookClient``) whose kernel channels poll in slices."""

    class SlicedPollClient(base):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                _poll_in_slices(channel)
            return kc

    return SlicedPollClient


def execute_notebook(
    path: str | Path,
    quick: bool = True,
    cell_timeout: int = 600,
    write: bool = False,
    extra_env: dict[str, str] | None = None,
):
    """Execute ``path`` top to bottom in a fresh kernel, with the book folder as working directory.

    Returns the executed ``nbformat`` notebook. Raises :class:`NotebookError` naming the notebook,
    the cell number and the start of the failing cell's source.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in ("RLCOURSE_QUICK", *(extra_env or {}))}
    os.environ["RLCOURSE_QUICK"] = "1" if quick else "0"
    os.environ.update(extra_env or {})
    client = _client_class(NotebookClient)(
        notebook,
        timeout=cell_timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as error:
        index, source = _failing_cell(notebook)
        raise NotebookError(
            f"{path.name}: code cell {index} failed"
            f" ({'quick' if quick else 'full'} mode).\n--- cell source ---\n{source}\n"
            f"--- error ---\n{error}"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if write:
        nbformat.write(notebook, path)
    return notebook


def _failing_cell(notebook) -> tuple[int, str]:
    """The 1-based number (among code cells) and source head of the first cell with an error."""
    number = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        number += 1
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return number, "\n".join(cell.source.splitlines()[:12])
    return number, "(cell interrupted by the timeout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcourse.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="execute chapters in place (full mode unless --quick)")
    run.add_argument("notebooks", nargs="*", type=Path)
    run.add_argument("--quick", action="store_true", help="quick mode (RLCOURSE_QUICK=1)")
    run.add_argument("--no-write", action="store_true", help="execute without saving outputs")
    args = parser.parse_args(argv)
    paths = args.notebooks or chapters()
    failures = 0
    for path in paths:
        start = time.perf_counter()
        try:
            execute_notebook(path, quick=args.quick, write=not args.no_write)
            print(f"ok    {path.name}  {time.perf_counter() - start:6.1f} s", flush=True)
        except NotebookError as error:
            failures += 1
            print(f"FAIL  {error}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
