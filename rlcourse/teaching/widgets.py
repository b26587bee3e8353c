"""Sliders over a plotting function that every way of running a chapter finishes: Jupyter Lab,
``python -m rlcourse.notebooks``, and plain ``jupyter nbconvert --execute``, papermill or
``pytest --nbmake`` (all three are nbclient).

:func:`interact_or_call` looks and behaves like ``ipywidgets.interact`` (the same controls, an
``Output`` widget under them that is redrawn when a control moves), with one difference in how
the output reaches the ``Output`` widget:

- ``interact`` prints and plots *inside* ``with output:``. The kernel then tags the messages with
  the cell's id and leaves it to the front end to route them into the widget and to send the
  widget's new ``outputs`` back to the kernel. nbclient plays that front end: for every output
  it sends a ``comm_msg`` on the shell channel while the cell is still running (jupyter_client's
  ``Session.send`` writes it raw on a shadow of the asyncio socket that nbclient is awaiting the
  cell's ``execute_reply`` on). When the reply arrives just before such a send, the send's
  libzmq call consumes the socket's edge-triggered wake-up and the pending poll never returns:
  nbconvert waits forever on a finished cell (nbclient issue 312, jupyter_client pull requests
  1010 and 1059, open upstream). A notebook of 20 ``interact`` cells that print 50 lines each
  hung in 5 runs out of 5 under ``jupyter nbconvert --execute``.
- :func:`interact_or_call` calls the function with its printed text and displays captured in
  the kernel, in order (:func:`captured_outputs`), and sets the ``Output`` widget's ``outputs``
  from the kernel. The front end only receives state; no front end sends anything back while a
  cell runs, so the race above cannot happen, and the saved widget state (what the HTML book
  shows) is the same as ``interact``'s.

An exception in the first call (while the cell runs) propagates, so a broken chapter fails
its run; an exception after a control moved is shown in the widget as a traceback, as
``interact`` does.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

__all__ = ["captured_outputs", "interact_or_call"]


class _OutputList:
    """nbformat outputs in the order they were produced; consecutive text on one stream is
    joined, as a front end joins it."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def stream(self, name: str, text: str) -> None:
        last = self.outputs[-1] if self.outputs else None
        if last is not None and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        elif text:
            self.outputs.append({"output_type": "stream", "name": name, "text": text})

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        self.outputs.append({"output_type": "display_data", "data": dict(data),
                             "metadata": dict(metadata or {})})

    def clear(self) -> None:
        self.outputs.clear()


class _StreamToList(io.TextIOBase):
    """A text stream (``sys.stdout``/``sys.stderr`` while capturing) writing into the list."""

    def __init__(self, sink: _OutputList, name: str) -> None:
        super().__init__()
        self._sink, self.name = sink, name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._sink.stream(self.name, text)
        return len(text)


@contextmanager
def captured_outputs():
    """Capture ``print`` and ``display`` (figures included) into a list of nbformat outputs.

    Yields the list; it is complete when the ``with`` block ends. Outside IPython only the
    streams are captured.
    """
    from IPython import get_ipython

    sink = _OutputList()
    shell = get_ipython()
    saved_streams = sys.stdout, sys.stderr
    saved_publisher = getattr(shell, "display_pub", None)
    if shell is not None:
        from IPython.core.displaypub import DisplayPublisher

        class _Publisher(DisplayPublisher):
            def publish(self, data, metadata=None, *args: Any, **kwargs: Any) -> None:
                sink.display(data, metadata)

            def clear_output(self, wait: bool = False) -> None:
                sink.clear()

        shell.display_pub = _Publisher(shell=shell)
    sys.stdout, sys.stderr = _StreamToList(sink, "stdout"), _StreamToList(sink, "stderr")
    try:
        yield sink.outputs
    finally:
        sys.stdout, sys.stderr = saved_streams
        if shell is not None:
            shell.display_pub = saved_publisher


def _flush_figures() -> None:
    """Display the figures the inline backend holds (what ``interact`` does around a call)."""
    from ipywidgets.widgets.interaction import show_inline_matplotlib_plots

    show_inline_matplotlib_plots()


def _error_output() -> dict[str, Any]:
    """The exception being handled as an nbformat error output (IPython's coloured traceback)."""
    from IPython import get_ipython

    kind, error, trace = sys.exc_info()
    shell = get_ipython()
    lines = (shell.InteractiveTB.structured_traceback(kind, error, trace) if shell is not None
             else [f"{kind.__name__}: {error}"])
    return {"output_type": "error", "ename": kind.__name__, "evalue": str(error),
            "traceback": list(lines)}


def _interactive_class():
    from ipywidgets import interactive

    class KernelOutputInteractive(interactive):
        """``ipywidgets.interactive`` whose ``Output`` widget is filled from the kernel."""

        _called = False

        def update(self, *args: Any) -> None:
            self.kwargs = {w._kwarg: w.get_interact_value() for w in self.kwargs_widgets}
            _flush_figures()  # figures drawn earlier in the cell stay out of the widget
            try:
                with captured_outputs() as outputs:
                    self.result = self.f(**self.kwargs)
                    _flush_figures()
            except Exception:
                if not self._called:
                    raise  # the cell's own call: fail the cell
                outputs.append(_error_output())
            self._called = True
            self.out.outputs = tuple(outputs)

        def __repr__(self) -> str:
            # interact's text form (what a viewer without widgets shows): the controls and an
            # Output, not the outputs it holds
            controls = [repr(c) for c in self.children if c is not self.out]
            return f"interactive(children=({', '.join(controls)}, Output()))"

    return KernelOutputInteractive


def interact_or_call(fn: Callable[..., Any], **widgets: Any) -> None:
    """Controls for ``fn``'s keyword arguments and its output under them, redrawn when a
    control moves (``ipywidgets.interact(fn, **widgets)`` without the front end round trip
    that hangs nbclient; see the module docstring). Without ipywidgets, ``fn`` is called once
    with each widget's value.

    Returns ``None`` so the cell does not echo the function under the slider.
    """
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        display = None
    try:
        widget = _interactive_class()(fn, **widgets)
    except ImportError:  # pragma: no cover - ipywidgets is a dependency
        fn(**{k: getattr(w, "value", w) for k, w in widgets.items()})
        return
    if display is not None:
        display(widget)
