r"""The book's prose and outputs agree with each other and with the results files they show.

Three checks over the committed book (the functions live in :mod:`rlcourse.notebooks`), each
also run here on a tiny synthetic input that has the problem, to show it fails:

1. **No results file is newer than a chapter that shows it.** "Newer" is decided by *content*,
   since git keeps no file times: a full-mode execution (``python -m rlcourse.notebooks
   execute``) records in the notebook's metadata (``rlcourse.results``) a SHA-256 of every
   results file (``benchmarks/results/*.json(l)``, ``data/results.json``) whose name a code
   cell of the chapter names, computed from the parsed JSON with sorted keys (indentation, key
   order and line endings do not count). A file whose digest now differs was rewritten after
   the chapter last ran, so the chapter may display old numbers; a file the chapter reads
   without a recorded digest counts as changed. Fix: re-execute the chapter in full mode.
   Chosen over comparing displayed values with the file because a chapter shows a few derived
   values of a large file, in its own formats: the digest is exact and needs no parser per
   table. Its cost: any edit of the file, even of a field no chapter shows, asks for a re-run.
2. **No control characters** (TAB, BEL, backspace, form feed, ...) in a markdown cell, in a
   displayed Markdown or LaTeX output, in ``book/*.md``, and no LaTeX command whose backslash a
   non-raw Python string ate (``"$\tfrac12$"`` without ``r""`` holds a TAB and renders as
   "frac12") in the string literals of ``rlcourse/``, ``benchmarks/``, ``data/`` and ``tests/``.
3. **A number in prose appears in an output or a code cell of its chapter** (rounded to the
   quoted precision; "about 22,000" keeps its significant digits). Small integers (up to 20),
   years, chapter, section, exercise and seed numbers are not results and are skipped. What is
   left and still not shown is listed below in :data:`PROSE_NUMBERS_ALLOWED` with the reason:
   the slides' tables (the papers' numbers), the papers' settings, arithmetic and constants.
   Each entry must still be needed: an entry that excuses nothing fails, so the list only
   shrinks.
"""

import json
import re

import nbformat
import pytest

from rlcourse.config import REPO_ROOT
from rlcourse.notebooks import (
    METADATA_KEY,
    chapters,
    notebook_control_characters,
    prose_numbers,
    python_string_control_characters,
    results_digest,
    results_digests,
    results_read_by,
    stale_results,
    text_control_characters,
    unsupported_prose_numbers,
)

CHAPTERS = chapters()
BOOK_PAGES = sorted((REPO_ROOT / "book").glob("*.md"))
PYTHON_SOURCES = sorted([*(REPO_ROOT / "rlcourse").rglob("*.py"),
                         *(REPO_ROOT / "benchmarks").glob("*.py"),
                         *(REPO_ROOT / "data").glob("*.py"), *(REPO_ROOT / "tests").glob("*.py")])

#: Chapters whose results digests are not recorded yet, with the reason (none now: every
#: chapter that reads a results file was re-executed with the digests).
RESULTS_DIGEST_PENDING: dict[str, str] = {}

#: ``{chapter stem: {markdown cell id: reason, or {number as written: reason}}}``: quoted
#: numbers that are not results of the chapter (see the module docstring, check 3).
PROSE_NUMBERS_ALLOWED: dict[str, dict[str, str | dict[str, str]]] = {
    "04_policy_gradients": {
        "1505ccbb": {"243": "arithmetic: 3 tokens, 5 positions, 3^5 texts"},
    },
    "07_reward_models": {
        "cc79a3e6": {"70": "the exercise's pass mark (rlcourse/exercises/07_reward_models.py)",
                     "120": "the exercise's unit check: equal-length training pairs it trains "
                            "on (rlcourse/exercises/07_reward_models.py)"},
    },
    "09_dpo": {
        "67f1912d": {"320": "the exercise's grading run (rlcourse/exercises: 10 batches of 32)"},
    },
    "10_orpo": {
        "8808bb73": {"0.999": "arithmetic: exp(-10^-3), the probability of a log-prob -10^-3"},
        "eb058f6e": "the slides' table: the ORPO paper's AlpacaEval numbers",
        "6267c2bc": {"2.7": "the ORPO paper's model sizes (2.7B to 7B)",
                     "60,000": "the ORPO paper's training set (UltraFeedback)"},
    },
    "11_kto": {
        "ad0d85f6": "the slides' tables: the KTO paper's benchmarks and win rates",
        "8283c563": {"3,600": "a setting of benchmarks/run_preference_methods.py (prompts drawn "
                              "for the taste pairs; 2,576 labelled pairs are shown)"},
    },
    "12_simpo": {
        "a91aa20f": {"805": "AlpacaEval 2's size, a property of the benchmark"},
    },
    "13_side_by_side": {
        # chapter 7 measures it; 13 cites it
        "e3cd7b8d": {"87": "chapter 7's measured label agreement (07_reward_models prints "
                            "0.873)"},
    },
    "14_real_model": {
        "442ca125": {"896": "Qwen2.5-0.5B's config (rlcourse.memory.QWEN25_05B)",
                     "4864": "Qwen2.5-0.5B's config (rlcourse.memory.QWEN25_05B)"},
        "8cb54531": {"74.5": "unit conversion: 80 GB = 80e9 / 2^30 GiB"},
        "32dde8ff": {"150,000": "a round vocabulary size in an illustration"},
    },
}


def _read(path):
    return nbformat.read(path, as_version=4)


# ------------------------------------------------------------------ 1. results files
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_no_results_file_is_newer_than_the_chapter_that_shows_it(path):
    problems = stale_results(_read(path), path.name)
    if path.stem in RESULTS_DIGEST_PENDING:
        assert problems, f"{path.stem} is up to date: remove it from RESULTS_DIGEST_PENDING"
        pytest.skip(f"{path.stem}: {RESULTS_DIGEST_PENDING[path.stem]}")
    assert not problems, "\n".join(problems)


def _results_root(tmp_path, value=0.65):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "toy.json").write_text(json.dumps({"win_rate": value, "n": 200}, indent=1))
    (results / "other.json").write_text("{}")
    return tmp_path


def _notebook(*cells, metadata=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata.update(metadata or {})
    return nb


def _code(source, *outputs):
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = list(outputs)
    return cell


def _stdout(text):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def _markdown_output(text, mime="text/markdown"):
    return nbformat.v4.new_output("display_data", data={mime: text, "text/plain": "<Markdown>"})


READS_TOY = 'toy = json.loads((RESULTS / "toy.json").read_text())\nprint(toy["win_rate"])'


def test_a_chapter_reads_the_results_files_its_code_names(tmp_path):
    root = _results_root(tmp_path)
    nb = _notebook(_code(READS_TOY), nbformat.v4.new_markdown_cell("see other.json"))
    assert results_read_by(nb, root) == ["benchmarks/results/toy.json"]  # not the markdown's
    assert results_read_by(_notebook(_code('x = "mytoy.json"')), root) == []


def test_stale_results_passes_a_file_unchanged_since_the_run(tmp_path):
    root = _results_root(tmp_path)
    nb = _notebook(_code(READS_TOY, _stdout("0.65\n")))
    nb.metadata[METADATA_KEY] = {"results": results_digests(nb, root)}
    assert stale_results(nb, "ch.ipynb", root) == []
    # the same content written differently (indentation, key order) is not a change
    (root / "benchmarks/results/toy.json").write_text('{"n": 200,\r\n "win_rate": 0.65}')
    assert stale_results(nb, "ch.ipynb", root) == []


def test_stale_results_fails_on_a_file_rewritten_after_the_run(tmp_path):
    root = _results_root(tmp_path)
    nb = _notebook(_code(READS_TOY, _stdout("0.65\n")))
    nb.metadata[METADATA_KEY] = {"results": results_digests(nb, root)}
    _results_root(tmp_path / "new", value=0.71)  # the benchmark was run again: a new number
    (root / "benchmarks/results/toy.json").write_text(
        (tmp_path / "new/benchmarks/results/toy.json").read_text())
    problems = stale_results(nb, "ch.ipynb", root)
    assert len(problems) == 1
    assert problems[0].startswith("ch.ipynb: reads benchmarks/results/toy.json, which changed")


def test_stale_results_fails_on_a_file_read_without_a_recorded_digest(tmp_path):
    root = _results_root(tmp_path)
    nb = _notebook(_code(READS_TOY, _stdout("0.65\n")))
    problems = stale_results(nb, "ch.ipynb", root)
    assert len(problems) == 1 and "no digest of it was recorded" in problems[0]


def test_results_digest_is_of_the_content(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.jsonl"))
    a.write_text('{"x": 1, "y": [1, 2]}')
    b.write_text('{\n "y": [1, 2],\n "x": 1\n}\n')
    c.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert results_digest(a) == results_digest(b)
    b.write_text('{"y": [1, 2], "x": 2}')
    assert results_digest(a) != results_digest(b)
    assert len(results_digest(c)) == 64


def test_a_full_run_records_the_digests_of_the_results_files_it_reads(tmp_path):
    from rlcourse.notebooks import execute_notebook

    path = tmp_path / "ch.ipynb"
    nbformat.write(_notebook(_code('name = "runtime_table.json"\nprint(len(name))')), path)
    executed = execute_notebook(path, quick=True, cell_timeout=120)
    recorded = executed.metadata[METADATA_KEY]["results"]
    assert recorded == {"benchmarks/results/runtime_table.json":
                        results_digest(REPO_ROOT / "benchmarks/results/runtime_table.json")}


# ------------------------------------------------------------------ 2. control characters
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_no_control_characters_in_markdown_cells_and_latex(path):
    problems = notebook_control_characters(_read(path), path.name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", BOOK_PAGES, ids=[p.stem for p in BOOK_PAGES])
def test_no_control_characters_in_the_book_pages(path):
    problems = text_control_characters(path.read_text(encoding="utf-8"), f"book/{path.name}")
    assert not problems, "\n".join(problems)


def test_no_latex_command_lost_its_backslash_in_a_python_string():
    problems = [p for path in PYTHON_SOURCES for p in python_string_control_characters(path)]
    assert not problems, "\n".join(problems)


TAB, BEL, BACKSPACE, FORM_FEED = chr(9), chr(7), chr(8), chr(12)  # not literals: see above


def test_control_characters_in_a_markdown_cell_are_named_by_cell_and_line():
    nb = _notebook(nbformat.v4.new_markdown_cell("fine"),
                   nbformat.v4.new_markdown_cell(f"ok\n$G = (WR - {TAB}frac12)$"))
    nb.cells[1].id = "abc123"
    problems = notebook_control_characters(nb, "ch.ipynb")
    assert len(problems) == 1
    assert problems[0].startswith("ch.ipynb: markdown cell 1 (id abc123) line 2: TAB")


@pytest.mark.parametrize("char", [BEL, BACKSPACE, FORM_FEED], ids=["bel", "backspace", "ff"])
def test_control_characters_in_displayed_latex_and_markdown_fail(char):
    for mime in ("text/markdown", "text/latex"):
        nb = _notebook(_code("display(Markdown(t))", _markdown_output(f"$x = {char}eta$", mime)))
        problems = notebook_control_characters(nb, "ch.ipynb")
        assert len(problems) == 1 and f"code cell 0 (id {nb.cells[0].id}) output {mime}" \
            in problems[0], problems
    # the same characters in a code cell's printed text are not prose: not checked
    assert notebook_control_characters(_notebook(_code("x", _stdout(f"a{TAB}b\n")))) == []


def test_control_characters_in_a_book_page_are_named_by_line(tmp_path):
    page = tmp_path / "glossary.md"
    page.write_text(f"# Glossary\n\nshare of gain\n  $(WR - {TAB}frac12)$\n")
    problems = text_control_characters(page.read_text(), "book/glossary.md")
    assert len(problems) == 1 and problems[0].startswith("book/glossary.md line 4: TAB")
    assert text_control_characters("# Glossary\n\n  $(WR - \\tfrac12)$\n", "x") == []


def test_a_latex_command_eaten_by_a_non_raw_python_string_fails(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('TEXT = "$G = (WR - \\tfrac12)$"\nOK = r"$\\tfrac12$"\nSEP = "\\t".join([])\n'
                   'BETA = "$\\beta$"\n')
    problems = python_string_control_characters(bad)
    assert [p.split(": ")[0] for p in problems] == [f"{bad} line 1", f"{bad} line 4"], problems
    assert "TAB" in problems[0] and "BACKSPACE" in problems[1]


# ------------------------------------------------------------------ 3. numbers in prose
def _allowed(stem):
    return PROSE_NUMBERS_ALLOWED.get(stem, {})


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_numbers_in_prose_appear_in_an_output_of_the_chapter(path):
    problems = unsupported_prose_numbers(_read(path), path.name, _allowed(path.stem))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_allowed_prose_number_is_still_needed(path):
    nb = _read(path)
    ids = {c.get("id") for c in nb.cells if c.cell_type == "markdown"}
    flagged = {m.groups() for p in unsupported_prose_numbers(nb, path.name)
               for m in [re.search(r"\(id (\S+)\) line \d+: (\S+) appears", p)] if m}
    for cell_id, entry in _allowed(path.stem).items():
        assert cell_id in ids, f"{path.stem}: allow-list names cell {cell_id}, which is gone"
        needed = {n for i, n in flagged if i == cell_id}
        assert needed, f"{path.stem}: cell {cell_id} quotes nothing unsupported: remove it"
        for number in ([] if isinstance(entry, str) else entry):
            assert number in needed, (f"{path.stem}: {number} in cell {cell_id} is no longer "
                                      "flagged: remove it from PROSE_NUMBERS_ALLOWED")


SHOWN = _code("print(f'win rate {wr:.3f} ± {se:.3f}; 21844 states; 43.6% kept; x1.25')",
              _stdout("win rate 0.652 ± 0.012; 21844 states; 0.436 kept; x1.25\n"))
DEFINED = _code("config = TrainConfig(lr=3e-4, max_length=1024, beta=0.1)")


def _prose(text, cell_id="p1"):
    cell = nbformat.v4.new_markdown_cell(text)
    cell.id = cell_id
    return cell


@pytest.mark.parametrize("text", [
    "The win rate is 0.65 ± 0.01 against SFT.",            # rounded output
    "It peaked at 1.25 times the prediction.",              # an output glued to a letter
    "About 22,000 decision states.",                        # approximate, significant digits
    "44 % of the answers were kept.",                       # a share shown as a fraction
    "Answers of up to 1,024 tokens at lr $3 \\times 10^{-4}$, β = 0.1.",  # written in code
    "Chapter 16 and section 9.2; chapters 4, 8 and 15 (2024); seed 1001; 7 steps.",
    "Qwen2.5-0.5B, `lr=5e-7`, {cite:p}`rafailov2023dpo`, [link](https://x.org/2305.18290).",
    "### 12.3 A heading with a section number",
])
def test_a_number_shown_or_not_a_result_passes(text):
    assert unsupported_prose_numbers(_notebook(SHOWN, DEFINED, _prose(text))) == []


@pytest.mark.parametrize("text, number", [
    ("The win rate is 0.66 against SFT.", "0.66"),          # no output rounds to it
    ("A reward 2.6 lower than without the flaw.", "2.6"),  # computed by hand
    ("About 25,000 decision states.", "25,000"),
    ("Its accuracy stalls at 73 %.", "73"),
])
def test_a_number_in_no_output_is_flagged_with_its_cell_and_line(text, number):
    nb = _notebook(SHOWN, DEFINED, _prose(f"# Title\n\n{text}", cell_id="md9"))
    problems = unsupported_prose_numbers(nb, "ch.ipynb")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"ch.ipynb: markdown cell 2 (id md9) line 3: {number} appears")


def test_the_allow_list_exempts_a_cell_or_a_number():
    nb = _notebook(SHOWN, _prose("| model | AlpacaEval |\n|---|---|\n| Zephyr | 85.76 |", "tab"),
                   _prose("The paper used 60,000 pairs and got 0.66.", "txt"))
    assert len(unsupported_prose_numbers(nb)) == 3
    allowed = {"tab": "the slides' table", "txt": {"60,000": "the paper's data"}}
    problems = unsupported_prose_numbers(nb, "ch.ipynb", allowed)
    assert len(problems) == 1 and ": 0.66 appears" in problems[0]


def test_prose_numbers_skip_code_links_and_small_integers():
    text = "Use `beta=0.1`, see [DPO](https://arxiv.org/abs/2305.18290); 3 tokens, $R_{t+1}$."
    assert prose_numbers(text) == []
    assert [n for _, n, _ in prose_numbers("0.5 and 1,000 and 2,559 and 2559")] == [
        "0.5", "1,000", "2,559", "2559"]


def test_the_allow_lists_name_existing_chapters():
    stems = {p.stem for p in CHAPTERS}
    assert set(PROSE_NUMBERS_ALLOWED) <= stems and set(RESULTS_DIGEST_PENDING) <= stems
