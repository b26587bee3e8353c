"""The learner's map on the landing page is current, and every slide points at a real section."""

import json

import pytest

from rlcourse.teaching import learner_map as lm


def test_intro_carries_a_map_of_every_chapter_and_slide():
    # Presence, not equality: the times and cell numbers move whenever a chapter is re-run or
    # edited; `python -m rlcourse.teaching.learner_map --write` refreshes them.
    intro = (lm.BOOK_DIR / "intro.md").read_text(encoding="utf-8")
    assert lm.START in intro and lm.END in intro, "intro.md has no learner's map"
    block = intro[intro.index(lm.START): intro.index(lm.END)]
    # every chapter whose quick time was measured (a new chapter joins the map when
    # benchmarks/chapter_runtimes.py has timed it and --write has run)
    for stem in lm.quick_runtimes()["chapters"]:
        assert f"]({stem}.ipynb)" in block, f"intro.md's map lacks chapter {stem}: refresh it"
    for slide in lm.SLIDES:
        assert f"| {slide.title} | {slide.topic} |" in block, f"map lacks slide {slide.title}"
    assert block.count("| missing |") == 0


@pytest.mark.parametrize("slide", lm.SLIDES, ids=[f"{s.chapter}:{s.section[:30]}"
                                                  for s in lm.SLIDES])
def test_every_slide_points_at_a_section_of_its_chapter(slide):
    path = lm.BOOK_DIR / f"{slide.chapter}.ipynb"
    assert path.exists(), f"slide {slide.title!r}: no chapter {slide.chapter}"
    assert lm.find_section(json.loads(path.read_text()), slide.section), (
        f"slide {slide.title!r}: {slide.chapter} has no heading {slide.section!r}")


def test_every_chapter_has_prerequisites_that_come_before_it():
    for stem in lm.chapter_stems():
        assert stem in lm.PREREQUISITES, f"{stem}: no prerequisites in learner_map"
        assert all(n < int(stem[:2]) for n in lm.PREREQUISITES[stem][0]), stem


def test_quick_times_are_measured_for_the_chapters_of_the_map():
    # a chapter added later shows "not measured" until benchmarks/chapter_runtimes.py runs
    runtimes = lm.quick_runtimes()["chapters"]
    assert len(runtimes) >= 15
    assert all(v["quick_seconds"] > 0 and v["wall_seconds"] >= v["quick_seconds"]
               for v in runtimes.values())


def _notebook(cells):
    return {"cells": cells}


def _code(start, end):
    return {"cell_type": "code", "source": "x = 1",
            "metadata": {"execution": {"iopub.execute_input": start, "shell.execute_reply": end}}}


def test_full_run_time_is_the_span_of_the_execution_timestamps():
    nb = _notebook([_code("2026-01-01T10:00:00.0Z", "2026-01-01T10:00:05.0Z"),
                    {"cell_type": "markdown", "source": "# T\n\none two three", "metadata": {}},
                    _code("2026-01-01T10:00:05.5Z", "2026-01-01T10:02:05.5Z")])
    assert lm.full_run_seconds(nb) == pytest.approx(125.5)
    # a code cell without timestamps (added after the run): no time rather than a wrong one
    nb["cells"].append({"cell_type": "code", "source": "y = 2", "metadata": {}})
    assert lm.full_run_seconds(nb) is None


def test_find_section_counts_cells_and_code_cells():
    nb = _notebook([{"cell_type": "markdown", "source": "# Title", "metadata": {}},
                    _code("2026-01-01T10:00:00Z", "2026-01-01T10:00:01Z"),
                    {"cell_type": "markdown", "source": "text\n## 2. Here", "metadata": {}},
                    _code("2026-01-01T10:00:01Z", "2026-01-01T10:00:02Z")])
    assert lm.find_section(nb, "## 2. Here") == (3, 2)
    assert lm.find_section(nb, "## 3.") is None


def test_refresh_replaces_only_the_block(tmp_path):
    intro = tmp_path / "intro.md"
    intro.write_text(f"# Book\n\nbefore\n\n{lm.START}\nold\n{lm.END}\n\nafter\n")
    text = lm.refresh(intro, f"{lm.START}\nnew\n{lm.END}")
    assert text == f"# Book\n\nbefore\n\n{lm.START}\nnew\n{lm.END}\n\nafter\n"
