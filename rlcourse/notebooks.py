"""Execute the book's notebooks: headless, in quick mode for tests, in full mode for the outputs.

    python -m rlcourse.notebooks execute            # re-run every chapter in full mode, in place
    python -m rlcourse.notebooks execute --quick book/02_markov_processes.ipynb

    python -m rlcourse.notebooks check              # the output checks over the committed chapters

Uses ``nbclient`` (the engine behind ``jupyter nbconvert --execute``, papermill and nbmake) as
it comes: a chapter this runner executes, plain nbconvert executes as fast. A run fails when a
cell made nbclient send the kernel a widget front end's reply (:func:`front_end_replies`: the
message that can hang plain nbconvert). Widget state is stored in the notebook so the HTML book
can show widgets without a kernel, and a progress bar's text fallback is rewritten to its final
state (:func:`settle_progress_bars`).

The checks a committed chapter must pass (``tests/test_notebook_outputs.py``):

- :func:`output_problems`: no warning or fallback message in an output, no stray
  ``<function ...>`` repr, no progress bar frozen at 0 %;
- :func:`dropped_displays`: no ``show_source(...)``/``display``-type call whose result is
  thrown away (not the last expression of its cell);
- :func:`mode_independent_mismatches`: the cells tagged ``mode-independent`` (parameter counts,
  exact oracle values, a first loss of ln 2: what quick and full mode both compute) print the
  same text in a fresh quick-mode run as in the committed notebook, so an output left over from
  an older library fails the quick-mode test.

What the prose and the outputs must agree on (``tests/test_book_consistency.py``;
``python -m rlcourse.notebooks consistency`` runs the same scan):

- :func:`stale_results`: a results file (``benchmarks/results/*``, ``data/results.json``) that a
  chapter reads has not changed since the chapter was last executed. A full-mode execution
  records each such file's content digest in the notebook's metadata (:func:`results_digests`);
- :func:`notebook_control_characters`, :func:`text_control_characters`,
  :func:`python_string_control_characters`: no TAB, BEL, backspace, form feed... in a markdown
  cell, in a displayed Markdown or LaTeX output, in ``book/*.md``, or hidden in a Python string
  where a LaTeX command lost its backslash (``"\\tfrac12"`` written without ``r""``);
- :func:`unsupported_prose_numbers`: a number in a markdown cell that appears in no output and
  no code cell of its chapter (small integers, years, chapter and section numbers excepted).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from rlcourse.config import REPO_ROOT
from rlcourse.files import atomic_write_text

BOOK_DIR = REPO_ROOT / "book"


class NotebookError(RuntimeError):
    """A cell of a chapter failed; the message names the notebook and the cell."""


def chapters(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The chapter notebooks in reading order (their file names start with the chapter number)."""
    return sorted(p for p in book_dir.glob("*.ipynb") if p.name[:2].isdigit())


#: What a client sends the kernel on the shell channel to run a chapter; anything else sent
#: while a cell runs is a front end's reply (see :func:`_client_class`).
RUN_MESSAGES = frozenset({"execute_request", "kernel_info_request", "shutdown_request"})


def _client_class(base):
    """``base`` (nbclient's ``NotebookClient``) that records every message it sends the kernel
    on the shell channel other than :data:`RUN_MESSAGES`, with the index of the cell running.

    Why: nbclient plays a widget front end. When a cell prints or plots inside an
    ``ipywidgets.Output`` (``interact``, ``with out:``), nbclient sends the widget's new state
    back to the kernel (a ``comm_msg``) on the shell socket it is awaiting the cell's
    ``execute_reply`` on, and jupyter_client writes it raw on that asyncio socket. A reply that
    arrives just before such a send loses its edge-triggered wake-up and plain ``jupyter
    nbconvert --execute``, papermill and nbmake wait forever on a finished cell (nbclient issue
    312, open upstream; ``rlcourse.teaching.widgets`` explains it). The chapters fill their
    ``Output`` widgets from the kernel (``interact_or_call``), so nbclient sends nothing back;
    :func:`execute_notebook` fails a chapter whose run did send something, so that this stays
    true and the runner needs no workaround of its own.
    """

    class RecordingClient(base):
        running_cell: int | None = None

        async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
            self.running_cell = cell_index
            try:
                return await super().async_execute_cell(cell, cell_index, *args, **kwargs)
            finally:
                self.running_cell = None

        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            self.sent_to_kernel: list[tuple[int | None, str]] = []
            send = kc.shell_channel.send

            def recording_send(msg):
                kind = msg.get("header", {}).get("msg_type", "?")
                if kind not in RUN_MESSAGES:
                    self.sent_to_kernel.append((self.running_cell, kind))
                return send(msg)

            kc.shell_channel.send = recording_send
            return kc

    return RecordingClient


def front_end_replies(notebook: Any, sent: list[tuple[int | None, str]], name: str) -> list[str]:
    """``"NAME: code cell N made the client send the kernel K T message(s) while it ran ..."``
    for each cell and message type the client sent the kernel during the cell's run (``sent``
    as :func:`_client_class` records it: the index of the cell among all cells, or ``None``
    between cells, and the message type)."""
    cells = notebook.get("cells", [])
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
    numbers = {index: number for number, index in enumerate(code, 1)}
    counts: dict[tuple[int | None, str], int] = {}
    for key in sent:
        counts[key] = counts.get(key, 0) + 1
    return [f"{name}: code cell {numbers.get(index, '?')} made the client send the kernel "
            f"{count} {kind} message(s) while it ran (an ipywidgets Output filled by the front "
            "end, e.g. interact or `with out:`): plain nbconvert/papermill can hang on this "
            "(nbclient issue 312); use rlcourse.teaching.widgets.interact_or_call"
            for (index, kind), count in counts.items()]


def execute_notebook(
    path: str | Path,
    quick: bool = True,
    cell_timeout: int = 600,
    write: bool = False,
    extra_env: dict[str, str] | None = None,
):
    """Execute ``path`` top to bottom in a fresh kernel, with the book folder as working directory.

    The notebook's metadata ``rlcourse.results`` records the digest of every results file the
    chapter's code names (:func:`results_digests`), so that :func:`stale_results` can tell
    later whether a file changed after this run. Returns the executed ``nbformat`` notebook.
    Raises :class:`NotebookError` naming the notebook, the cell number and the start of the
    failing cell's source.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    # the results files as the kernel will read them (see stale_results)
    digests = results_digests(notebook)
    if digests or "results" in notebook.metadata.get(METADATA_KEY, {}):
        notebook.metadata.setdefault(METADATA_KEY, {})["results"] = digests
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
        replies = front_end_replies(notebook, getattr(client, "sent_to_kernel", []), path.name)
        if replies:
            raise NotebookError("\n".join(replies))
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
    settle_progress_bars(notebook)
    if write:  # atomically: an interrupted write must not leave a committed chapter truncated
        text = nbformat.writes(notebook)
        atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    return notebook


WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
#: Cells whose printed text must not depend on quick/full mode (see the module docstring).
MODE_INDEPENDENT_TAG = "mode-independent"
#: Cells that show a warning on purpose (e.g. a validator's message); exempt from the scan.
EXPECTED_WARNING_TAG = "expected-warning"


def _widget_states(notebook: Any) -> dict[str, Any]:
    return (notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE_MIME, {})
            .get("state", {}))


def _tqdm_text(model_id: str, states: dict[str, Any]) -> str | None:
    """The text of a tqdm notebook bar (an HBox of HTML, FloatProgress, HTML) in its saved state.

    ``"train: 100% 80/80 [00:13<00:00, 5.58it/s]"``; ``None`` for any other widget.
    """
    box = states.get(model_id, {})
    children = box.get("state", {}).get("children", [])
    if box.get("model_name") != "HBoxModel" or len(children) != 3:
        return None
    parts = [states.get(c.removeprefix("IPY_MODEL_"), {}) for c in children]
    if [p.get("model_name") for p in parts] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (p.get("state", {}) for p in parts)
    width, total, value = 10, bar.get("max") or 0, bar.get("value") or 0
    filled = int(width * value / total) if total else 0
    bar_text = "█" * filled + " " * (width - filled)
    text = f"{left.get('value', '')}|{bar_text}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def settle_progress_bars(notebook: Any) -> int:
    """Rewrite the ``text/plain`` fallback of each tqdm bar to the bar's final (saved) state.

    Why: the fallback is the text of the bar when it was first drawn (``0%``); a reader without
    the widgets manager (a text view, a renderer that skips widgets) saw a bar frozen at 0 %.
    The saved widget state holds the final state. Returns the number of bars rewritten.
    """
    states, changed = _widget_states(notebook), 0
    for cell in notebook.get("cells", []):
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW_MIME)
            if not view:
                continue
            text = _tqdm_text(view.get("model_id", ""), states)
            if text is not None:
                out["data"]["text/plain"] = text
                changed += 1
    return changed


def _text(out: Any) -> str:
    """A stream's text, or a result's ``text/plain`` and ``text/markdown`` joined."""
    if out.get("output_type") == "stream":
        value = out.get("text", "")
        return "".join(value) if isinstance(value, list) else value
    data = out.get("data", {})
    texts = [data.get(k, "") for k in ("text/plain", "text/markdown")]
    return "".join("".join(t) if isinstance(t, list) else t for t in texts)


_WARNING_WORDS = re.compile(r"warn|deprecat", re.IGNORECASE)
_FALLBACK_WORDS = re.compile(
    r"no shipped|untrained model|falling back|fall back to|fallback|not found|using a random",
    re.IGNORECASE,
)
_FUNCTION_REPR = re.compile(r"<(?:function|bound method|built-in function|lambda)\b[^>]*>"
                            r"|<[\w.]+ object at 0x[0-9a-fA-F]+>")
_FROZEN_BAR = re.compile(r"(?<!\d)0%\|")


def _code_cells(notebook: Any) -> list[tuple[int, Any]]:
    """``(number among code cells, 1-based; cell)`` for every code cell."""
    code = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    return list(enumerate(code, 1))


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def output_problems(notebook: Any, name: str = "notebook") -> list[str]:
    """Outputs a reader must not see: ``"NAME: code cell N: what"`` for each.

    A warning on stderr (or any output saying ``Warning``), a fallback message (``no shipped
    ...``, ``untrained model``, ``falling back``), a stray repr such as ``<function f at
    0x...>``, a progress bar whose text still reads ``0%``. A cell tagged ``expected-warning``
    may warn (a chapter that demonstrates a validator's message).
    """
    problems = []
    for number, cell in _code_cells(notebook):
        allowed = EXPECTED_WARNING_TAG in _tags(cell)
        for out in cell.get("outputs", []):
            text = _text(out)
            first = text.strip().splitlines()[0][:100] if text.strip() else ""
            if not allowed and _WARNING_WORDS.search(text) and (
                    out.get("name") == "stderr" or re.search(r"\bwarning\b", text, re.I)):
                problems.append(f"{name}: code cell {number}: a warning in the output: {first}")
            if not allowed and _FALLBACK_WORDS.search(text):
                problems.append(f"{name}: code cell {number}: a fallback message: {first}")
            match = _FUNCTION_REPR.search(text)
            if match:
                problems.append(f"{name}: code cell {number}: a stray repr {match.group(0)[:80]}"
                                " (end the cell with a statement, or assign the result)")
            if _FROZEN_BAR.search(text):
                problems.append(f"{name}: code cell {number}: a progress bar frozen at 0 %")
    return problems


#: Calls whose value is what the reader should see (an ``IPython.display`` object).
DISPLAY_CALLS = frozenset({"show_source", "Markdown", "HTML", "Code", "Latex", "Math"})


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name):
            return func.id
        if isinstance(func, ast.Attribute):
            return func.attr
    return None


def _parse_cell(source: str) -> ast.Module | None:
    # IPython magics and shell escapes are not Python: blank them, keeping line numbers.
    lines = ["" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def dropped_displays(notebook: Any, name: str = "notebook") -> list[str]:
    """Calls such as ``show_source(f)`` whose result never reaches the reader.

    IPython displays only the value of a cell's *last* expression statement; the same call
    anywhere else (earlier in the cell, inside a loop or an ``if``) builds a display object and
    drops it. Wrap it in ``display(...)`` or make it the last statement.
    """
    problems = []
    for number, cell in _code_cells(notebook):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source  # raw JSON: lines
        tree = _parse_cell(source)
        if tree is None:
            continue
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr) and source.rstrip().endswith(";"):
            last = None  # a trailing semicolon suppresses the display
        for node in ast.walk(tree):
            if (isinstance(node, ast.Expr) and node is not last
                    and _call_name(node.value) in DISPLAY_CALLS):
                problems.append(f"{name}: code cell {number} line {node.lineno}: the result of "
                                f"{_call_name(node.value)}(...) is dropped (not the cell's last "
                                "expression): wrap it in display(...) or move it last")
    return problems


def _printed(cell: Any) -> str:
    return "".join(_text(o) for o in cell.get("outputs", [])
                   if o.get("output_type") in ("stream", "execute_result"))


def shows_source(cell: Any) -> bool:
    """Whether the cell's last statement is a ``show_source(...)`` call (its output is the
    library's source, which cannot depend on quick or full mode)."""
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        body = ast.parse("\n".join(lines)).body
    except SyntaxError:
        return False
    return bool(body) and isinstance(body[-1], ast.Expr) and \
        _call_name(body[-1].value) == "show_source"


def tagged_texts(notebook: Any, tag: str = MODE_INDEPENDENT_TAG) -> dict[int, str]:
    """``{code cell number: its text outputs joined}`` for the cells tagged ``tag``.

    For the ``mode-independent`` tag, every cell that ends in ``show_source(...)`` counts as
    tagged: a committed chapter that displays an older version of a library function is stale.
    """
    texts = {}
    for number, cell in _code_cells(notebook):
        if tag in _tags(cell):
            texts[number] = _printed(cell)
        elif tag == MODE_INDEPENDENT_TAG and shows_source(cell):
            texts[number] = _result(cell)  # the source shown, not what the cell printed before
    return texts


def _result(cell: Any) -> str:
    return "".join(_text(o) for o in cell.get("outputs", [])
                   if o.get("output_type") == "execute_result")


#: A printed number: optional sign, digits with an optional fraction (or a bare fraction), an
#: optional exponent. Not preceded by a letter, digit or underscore, so names such as ``k3`` or
#: ``s_0`` stay text.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
#: Relative tolerance for printed floats: a float32 result printed to 7 or 8 digits moves in its
#: 7th digit between CPUs (vector kernels, thread counts reorder sums).
PRINTED_RTOL = 1e-5
#: Below this magnitude a printed float is round-off (the book's quantities are of order one;
#: residuals of exact solves print as 1e-16 on one CPU and 5e-17 on another).
PRINTED_ATOL = 1e-12


def _last_digit(token: str) -> float:
    """One unit in the last printed place of the number ``token`` (``0.873`` -> 0.001,
    ``1.7e-09`` -> 1e-10, ``12`` -> 1)."""
    mantissa, _, exponent = token.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def printed_numbers_agree(a: str, b: str, rtol: float = PRINTED_RTOL,
                          atol: float = PRINTED_ATOL) -> bool:
    """Whether two printed outputs say the same thing, up to floating-point noise.

    The text between numbers must match exactly (runs of spaces count as one: numpy pads array
    columns to the widest entry). Integers must match exactly (counts, sizes, seeds). Floats
    agree when they differ by at most one unit in the last printed digit (of the finer of the
    two: a value near a rounding boundary prints ``0.872`` on one CPU and ``0.873`` on
    another), or by ``rtol``
    relative, or when both are below ``atol`` in magnitude (round-off). Anything more is a real
    change: a stale output, not a different CPU.
    """
    tokens_a, tokens_b = _NUMBER.split(a), _NUMBER.split(b)
    numbers_a, numbers_b = _NUMBER.findall(a), _NUMBER.findall(b)
    if len(numbers_a) != len(numbers_b):
        return False
    if [" ".join(t.split()) for t in tokens_a] != [" ".join(t.split()) for t in tokens_b]:
        return False
    for x, y in zip(numbers_a, numbers_b, strict=True):
        if x == y:
            continue
        is_float = any(c in x + y for c in ".eE")
        if not is_float:
            return False
        u, v = float(x), float(y)
        ulp = min(_last_digit(x), _last_digit(y))  # printed to other precision: the finer
        if not (abs(u - v) <= ulp * (1 + 1e-9) or abs(u - v) <= rtol * max(abs(u), abs(v))
                or max(abs(u), abs(v)) < atol):
            return False
    return True


def mode_independent_mismatches(committed: Any, executed: Any, name: str = "notebook"
                                ) -> list[str]:
    """Cells tagged ``mode-independent`` whose fresh output differs from the committed one.

    Printed numbers are compared with :func:`printed_numbers_agree` (a tolerance that fits what
    they show), never digit for digit: floating-point results differ between CPUs, vector
    instruction sets and thread counts, and the check must pass on a reader's machine.

    ``committed`` is the notebook as stored (full mode), ``executed`` a fresh run (quick mode)
    of it: the cells tagged in ``committed`` compute what does not depend on the mode, so a
    difference means the committed outputs come from an older library or an older chapter.
    """
    old, cells = tagged_texts(committed), dict(_code_cells(executed))
    committed_cells = dict(_code_cells(committed))
    problems = []
    for number in sorted(old):
        tagged = MODE_INDEPENDENT_TAG in _tags(committed_cells[number])
        fresh = _printed if tagged else _result
        a, b = old[number], fresh(cells[number]) if number in cells else None
        # Library source is text and must match exactly; printed results up to FP noise.
        if b is not None and tagged and printed_numbers_agree(a, b):
            continue
        if a != b:
            diff = next(((x, y) for x, y in zip((a or "").splitlines(), (b or "").splitlines(),
                                                strict=False) if x != y), (a, b))
            kind = f"tagged {MODE_INDEPENDENT_TAG}" if tagged else "shows library source"
            problems.append(f"{name}: code cell {number} ({kind}) prints "
                            f"differently now:\n  committed: {str(diff[0])[:160]}\n"
                            f"  fresh run: {str(diff[1])[:160]}")
    return problems


def check_committed(path: Path) -> list[str]:
    """:func:`output_problems` and :func:`dropped_displays` of the notebook at ``path``."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return output_problems(notebook, path.name) + dropped_displays(notebook, path.name)


# --------------------------------------------------------------------------------------------
# Prose against outputs: results files, control characters, numbers (tests/test_book_consistency)
# --------------------------------------------------------------------------------------------

#: Notebook metadata key of what rlcourse records about a run (``{"results": {path: digest}}``).
METADATA_KEY = "rlcourse"
#: Where the measurements behind the chapters live, relative to the repository root.
RESULTS_DIRS = ("benchmarks/results",)
RESULTS_EXTRA = ("data/results.json",)


def results_files(root: Path = REPO_ROOT) -> list[str]:
    """Every results file, as a path relative to ``root``: ``benchmarks/results/*.json(l)`` and
    ``data/results.json``."""
    found = [f"{d}/{p.name}" for d in RESULTS_DIRS for p in sorted((root / d).glob("*.json*"))
             if p.suffix in (".json", ".jsonl")]
    return found + [f for f in RESULTS_EXTRA if (root / f).exists()]


def _source_text(cell: Any) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def results_read_by(notebook: Any, root: Path = REPO_ROOT) -> list[str]:
    """The results files a chapter reads: those whose file name a code cell names.

    A chapter opens a results file by a literal name (``RESULTS / "gpu.json"``); a name that
    only a variable holds would be missed, and the book has none.
    """
    code = "\n".join(_source_text(c) for c in notebook.get("cells", [])
                     if c.get("cell_type") == "code")
    return [f for f in results_files(root)
            if re.search(r"(?<![\w.-])" + re.escape(Path(f).name) + r"(?![\w.-])", code)]


def results_digest(path: Path) -> str:
    """SHA-256 of a results file's *content*: the parsed JSON (JSON Lines: each line) written
    back with sorted keys, so indentation, key order and line endings do not count."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        values: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        values = json.loads(text)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def results_digests(notebook: Any, root: Path = REPO_ROOT) -> dict[str, str]:
    """``{relative path: results_digest}`` of every results file the notebook reads."""
    return {f: results_digest(root / f) for f in results_read_by(notebook, root)}


def stale_results(notebook: Any, name: str = "notebook", root: Path = REPO_ROOT) -> list[str]:
    """Results files that changed since the chapter was executed: ``"NAME: reads F, ..."``.

    "Changed" is decided by content, not by file times (git does not keep them): the digest
    recorded in the notebook's metadata by its last execution (:func:`execute_notebook`)
    against the digest of the file now. A file the chapter reads with no digest recorded (the
    chapter was not executed since it started reading it) counts as changed.
    """
    recorded = notebook.get("metadata", {}).get(METADATA_KEY, {}).get("results", {})
    problems = []
    for f in results_read_by(notebook, root):
        now = results_digest(root / f)
        if f not in recorded:
            problems.append(f"{name}: reads {f}, but no digest of it was recorded when the "
                            "chapter was executed: re-execute the chapter in full mode")
        elif recorded[f] != now:
            problems.append(f"{name}: reads {f}, which changed after the chapter was executed "
                            f"(digest then {recorded[f][:12]}, now {now[:12]}): its outputs may "
                            "show old numbers; re-execute the chapter in full mode")
    return problems


#: Control characters that have no business in prose or LaTeX (everything below U+0020 but the
#: newline, and DEL). A TAB in a formula is almost always ``\t`` of ``\tfrac``, ``\theta``,
#: ``\tau`` eaten by a non-raw Python string; BEL is ``\a`` (``\alpha``), backspace ``\b``
#: (``\beta``), form feed ``\f`` (``\frac``), vertical tab ``\v`` (``\varepsilon``).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_CONTROL_NAMES = {0x07: "BEL (\\a: was it \\alpha?)", 0x08: "BACKSPACE (\\b: was it \\beta?)",
                  0x09: "TAB (\\t: was it \\tfrac, \\theta, \\tau, \\times?)",
                  0x0B: "VERTICAL TAB (\\v: was it \\varepsilon?)",
                  0x0C: "FORM FEED (\\f: was it \\frac?)",
                  0x0D: "CARRIAGE RETURN (\\r: was it \\rho, \\right?)"}


def _control_name(char: str) -> str:
    return _CONTROL_NAMES.get(ord(char), f"U+{ord(char):04X}")


def text_control_characters(text: str, where: str) -> list[str]:
    """``"WHERE line N: TAB (...) in '...'"`` for every control character of ``text``."""
    problems = []
    for number, line in enumerate(text.split("\n"), 1):
        for match in CONTROL_CHARACTERS.finditer(line):
            start = max(0, match.start() - 25)
            context = line[start: match.end() + 25]
            problems.append(f"{where} line {number}: {_control_name(match.group(0))} in "
                            f"{context!r}")
    return problems


def notebook_control_characters(notebook: Any, name: str = "notebook") -> list[str]:
    """Control characters in the markdown cells and in the Markdown and LaTeX outputs
    (``IPython.display.Markdown``/``Latex``) of a notebook; cells are numbered from 0 over all
    cells, as ``notebook.cells[i]``."""
    problems = []
    for index, cell in enumerate(notebook.get("cells", [])):
        cell_id = cell.get("id", "?")
        if cell.get("cell_type") == "markdown":
            problems += text_control_characters(
                _source_text(cell), f"{name}: markdown cell {index} (id {cell_id})")
            continue
        for out in cell.get("outputs", []):
            for mime in ("text/markdown", "text/latex"):
                value = out.get("data", {}).get(mime)
                if value is not None:
                    value = "".join(value) if isinstance(value, list) else value
                    problems += text_control_characters(
                        value, f"{name}: code cell {index} (id {cell_id}) output {mime}")
    return problems


#: A LaTeX command whose backslash a non-raw Python string turned into a control character:
#: BEL, backspace, vertical tab and form feed always; TAB and CR before a command's name.
_EATEN_LATEX = re.compile(
    r"[\x07\x08\x0b\x0c]|[\t\r](?:frac|tfrac|theta|tau|times|text\w*|tilde|top|triangle|"
    r"rho|right\w*|rangle|rm)(?![A-Za-z])")


def python_string_control_characters(path: Path) -> list[str]:
    """String literals of a Python file that hold a LaTeX command with its backslash eaten
    (``"$\\tfrac12$"`` without ``r""``): ``"FILE line N: ..."``."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _EATEN_LATEX.search(node.value)
            if match:
                context = node.value[max(0, match.start() - 20): match.end() + 20]
                problems.append(f"{path} line {node.lineno}: {_control_name(match.group(0)[0])} "
                                f"in a string literal {context!r}: write it as a raw string")
    return problems


# Numbers in prose. A number is a run of digits (thousands may be grouped by commas) with an
# optional decimal part and exponent, not glued to a letter, digit or dot on either side: "0.5B",
# "Qwen2.5", "k3" and "x1.25" are names, not quoted numbers.
_PROSE_NUMBER = re.compile(r"(?<![\w.\\])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                           r"(?![\w]|\.\d)")
# In outputs and code anything that looks like a number counts (a generous match can only
# excuse a prose number, never flag one): "x1.25", "5e-05", "1,024".
_ANY_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?![\d])|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+")
#: Integers up to this are small counts, chapter and step numbers, not results.
SMALL_INTEGER = 20
# Words before a number that make it a name (chapter 7, section 3, seed 1001, exercise 2).
_NAMING_WORD = re.compile(
    r"(?:chapters?|sections?|ch\.|§|exercises?|parts?|slides?|cells?|seeds?|steps?|tables?|"
    r"figures?|problems?|equations?|eq\.|rounds?|items?|lines?|version|v)\s*$", re.IGNORECASE)
# A list after such a word: "chapters 4, 8 and 15", "sections 2 to 5".
_NAMED_LIST = re.compile(r"(?:chapters?|sections?|exercises?|seeds?)\s+\d+(?:\s*(?:,|and|or|to|"
                         r"–|-)\s*\d+)+", re.IGNORECASE)
_STRIP_FROM_PROSE = (
    (re.compile(r"```.*?```", re.S), " "),              # fenced code
    (re.compile(r"`[^`\n]*`"), " "),                    # inline code
    (re.compile(r"<!--.*?-->", re.S), " "),             # HTML comments
    (re.compile(r"\{[a-z:]+\}"), " "),                  # MyST roles ({cite:p}, {doc})
    (re.compile(r"\]\([^)]*\)"), "]"),                  # link targets
    (re.compile(r"<?https?://\S+"), " "),               # URLs
    (re.compile(r"[_^]\{[^{}]*\}|[_^]-?\d+"), " "),     # LaTeX sub- and superscripts
    (re.compile(r"^\s*#+\s+\d+(?:\.\d+)*\.?", re.M), " "),  # section numbers of headings
    (re.compile(r"^\s*(?:\*\*)?\d+\.(?:\*\*)?\s", re.M), " "),  # numbered list items
)


def _blank(match: re.Match) -> str:
    # keep line breaks so that line numbers stay right
    return "".join("\n" if ch == "\n" else " " for ch in match.group(0))


def _number_value(token: str) -> float:
    return float(token.replace(",", ""))


def _decimals(token: str) -> int:
    mantissa = re.split(r"[eE]", token)[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def prose_numbers(markdown: str) -> list[tuple[int, str, str]]:
    """``(line, number, context)`` for each number quoted in ``markdown`` that might be a result.

    Left out: code, links, URLs, citations, LaTeX sub- and superscripts, heading and list
    numbers, integers up to :data:`SMALL_INTEGER`, years (1900-2100), and numbers named by
    the word before them (chapter 7, section 9.2, seed 1001, exercises 2 and 3).
    """
    text = markdown
    for pattern, _ in _STRIP_FROM_PROSE:
        text = pattern.sub(_blank, text)
    named = [m.span() for m in _NAMED_LIST.finditer(text)]
    found = []
    for match in _PROSE_NUMBER.finditer(text):
        token = match.group(0)
        value = _number_value(token)
        is_integer = "." not in token and "e" not in token.lower()
        if is_integer and (value <= SMALL_INTEGER or 1900 <= value <= 2100):
            continue
        # named: "chapter 16", "section 9.2", "seed 1001", "chapters 4, 8 and 15"
        if (_NAMING_WORD.search(text[max(0, match.start() - 12): match.start()])
                or any(a <= match.start() < b for a, b in named)):
            continue
        line = text.count("\n", 0, match.start()) + 1
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        context = " ".join(text[start: end if end >= 0 else None].split())
        found.append((line, token, context))
    return found


def _output_text(cell: Any) -> str:
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            texts.append(out.get("text", ""))
        for mime in ("text/plain", "text/markdown", "text/latex"):
            texts.append(out.get("data", {}).get(mime, ""))
    return "\n".join("".join(t) if isinstance(t, list) else t for t in texts)


def _numbers_in(text: str) -> list[float]:
    return [_number_value(m.group(0)) for m in _ANY_NUMBER.finditer(text)]


def chapter_numbers(notebook: Any) -> tuple[list[float], set[float]]:
    """The numbers a chapter shows (every output of its code cells) and the numbers its code
    cells write (hyperparameters and sizes defined in the chapter)."""
    code = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    shown = _numbers_in("\n".join(_output_text(c) for c in code))
    written = set(_numbers_in("\n".join(_source_text(c) for c in code)))
    return shown, written


#: Words that make a quoted number a rounded one: "about 22,000" is supported by 21,844.
_APPROXIMATE = re.compile(r"(?:about|around|roughly|nearly|almost|approximately|some|~|≈)\s*$",
                          re.IGNORECASE)


def _supported(token: str, percent: bool, shown: list[float], written: set[float],
               approximate: bool = False) -> bool:
    value = _number_value(token)
    candidates = [value, value / 100] if percent else [value, value / 100, value * 100]
    if any(v in written for v in candidates):
        return True
    # a shown number supports a quoted one if it rounds to it at the quoted precision; an
    # approximate round integer (about 22,000) keeps only its significant digits
    digits = token.replace(",", "")
    zeros = len(digits) - len(digits.rstrip("0")) if approximate and digits.isdigit() else 0
    tol = 0.5 * 10 ** (zeros or -_decimals(token)) + 1e-9
    for shown_value in shown:
        if abs(shown_value - value) <= tol:
            return True
        if abs(shown_value * 100 - value) <= tol or abs(shown_value / 100 - value) <= tol / 100:
            return True
    return False


#: An allow-list entry: ``{cell id: reason}`` lets a whole cell quote numbers (the slides'
#: tables), ``{cell id: {number: reason}}`` single numbers of a cell.
AllowList = dict[str, "str | dict[str, str]"]


def unsupported_prose_numbers(notebook: Any, name: str = "notebook",
                              allowed: AllowList | None = None) -> list[str]:
    """Numbers quoted in markdown cells that no output and no code cell of the chapter shows.

    A quoted number is supported when some output of the chapter rounds to it at the quoted
    precision (0.21 by -0.2089, 44 % by 0.436), or a code cell writes it (a hyperparameter).
    What remains was typed by hand, or copied from an output that has changed since:
    ``"NAME: markdown cell I (id X) line N: 2.6 appears in no output of the chapter: ..."``.
    ``allowed`` exempts the slides' tables and numbers that are not results (see
    :data:`AllowList`).
    """
    allowed = allowed or {}
    shown, written = chapter_numbers(notebook)
    problems = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "markdown":
            continue
        cell_id = cell.get("id", "?")
        exempt = allowed.get(cell_id, {})
        if isinstance(exempt, str):
            continue
        for line, token, context in prose_numbers(_source_text(cell)):
            if token in exempt:
                continue
            percent = bool(re.search(re.escape(token) + r"\s?%", context))
            before = context[: context.find(token)] if token in context else ""
            if not _supported(token, percent, shown, written, bool(_APPROXIMATE.search(before))):
                problems.append(f"{name}: markdown cell {index} (id {cell_id}) line {line}: "
                                f"{token} appears in no output or code cell of the chapter: "
                                f"{context[:140]!r}")
    return problems


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


def _consistency(paths: list[Path]) -> int:
    """The scans of ``tests/test_book_consistency.py`` without its allow-list: a prose number
    printed here may be one the test allows (the slides' tables, constants)."""
    import nbformat

    problems, numbers = [], []
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        problems += stale_results(notebook, path.name) + \
            notebook_control_characters(notebook, path.name)
        numbers += unsupported_prose_numbers(notebook, path.name)
    for page in sorted(BOOK_DIR.glob("*.md")):
        problems += text_control_characters(page.read_text(encoding="utf-8"), f"book/{page.name}")
    print("\n".join(problems) or "no stale results file, no control character")
    if numbers:
        print("\nnumbers in prose that no output or code cell shows (the test allows some):")
        print("\n".join(numbers))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcourse.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="execute chapters in place (full mode unless --quick)")
    run.add_argument("notebooks", nargs="*", type=Path)
    run.add_argument("--quick", action="store_true", help="quick mode (RLCOURSE_QUICK=1)")
    run.add_argument("--no-write", action="store_true", help="execute without saving outputs")
    scan = sub.add_parser("check", help="scan committed chapters for warnings, stray reprs, "
                                        "frozen progress bars and dropped displays")
    scan.add_argument("notebooks", nargs="*", type=Path)
    agree = sub.add_parser("consistency", help="stale results files, control characters, and "
                                               "prose numbers that no output shows")
    agree.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "consistency":
        return _consistency(args.notebooks or chapters())
    if args.command == "check":
        problems = [p for path in (args.notebooks or chapters()) for p in check_committed(path)]
        print("\n".join(problems) or "no problems")
        return 1 if problems else 0
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
