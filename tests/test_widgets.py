"""``interact_or_call`` fills its Output widget from the kernel, in the order things were
printed and displayed, so that no front end has to send the widget's state back while a cell
runs (the message that can hang plain nbconvert; ``rlcourse.teaching.widgets``)."""

from __future__ import annotations

import pytest

ipywidgets = pytest.importorskip("ipywidgets")

from rlcourse.teaching.widgets import _interactive_class, captured_outputs  # noqa: E402


def test_captured_outputs_keep_order_and_join_a_stream():
    with captured_outputs() as outputs:
        print("one")
        print("two")
        import sys

        print("oops", file=sys.stderr)
        print("three")
    assert outputs == [
        {"output_type": "stream", "name": "stdout", "text": "one\ntwo\n"},
        {"output_type": "stream", "name": "stderr", "text": "oops\n"},
        {"output_type": "stream", "name": "stdout", "text": "three\n"},
    ]


def test_the_output_widget_follows_the_controls_without_a_front_end():
    calls = []

    def show(n: int, word: str = "x") -> None:
        calls.append(n)
        if n == 5:
            raise ValueError("five is not allowed")
        print(word * n)

    widget = _interactive_class()(show, n=ipywidgets.IntSlider(2), word=ipywidgets.Text("ab"))
    assert widget.out.outputs == ({"output_type": "stream", "name": "stdout", "text": "abab\n"},)
    slider = widget.children[0]
    slider.value = 3
    assert widget.out.outputs == (
        {"output_type": "stream", "name": "stdout", "text": "ababab\n"},)
    # a control moved to a value that fails: the traceback replaces the output, as interact does
    slider.value = 5
    (error,) = widget.out.outputs
    assert error["output_type"] == "error" and error["ename"] == "ValueError"
    assert error["evalue"] == "five is not allowed"
    assert calls == [2, 3, 5]
    assert repr(widget).startswith("interactive(children=(IntSlider(value=5")
    assert repr(widget).endswith(", Output()))")


def test_a_failing_first_call_fails_the_cell():
    def broken(n: int) -> None:
        raise RuntimeError("bad chapter code")

    with pytest.raises(RuntimeError, match="bad chapter code"):
        _interactive_class()(broken, n=ipywidgets.IntSlider(1))
