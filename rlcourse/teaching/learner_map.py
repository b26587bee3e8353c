"""The learner's map on the book's landing page: chapters with prerequisites and measured times,
and every slide of the lecture with the chapter section and cell that covers it.

    python -m rlcourse.teaching.learner_map            # print the two tables
    python -m rlcourse.teaching.learner_map --write    # refresh them in book/intro.md

Times are measured, never estimated by hand: the full-mode run time of a chapter is the span
of the execution timestamps its committed notebook carries (first cell started to last cell
done), the quick-mode run time comes from ``benchmarks/results/chapter_runtimes.json``
(``benchmarks/chapter_runtimes.py``), and the reading time counts the words of the chapter's
text at 200 words a minute. ``tests/test_learner_map.py`` fails when intro.md's map lacks a
chapter or a slide, or when a slide's section is missing from its chapter; the times and cell
numbers it shows are refreshed with ``--write`` (they move when a chapter is re-run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rlcourse.config import REPO_ROOT
from rlcourse.files import atomic_write_text

BOOK_DIR = REPO_ROOT / "book"
RUNTIMES = REPO_ROOT / "benchmarks" / "results" / "chapter_runtimes.json"
START, END = "<!-- learner-map:start -->", "<!-- learner-map:end -->"
WORDS_PER_MINUTE = 200

#: Chapter stem -> (chapters to read first, what you should bring).
PREREQUISITES: dict[str, tuple[tuple[int, ...], str]] = {
    "01_why_rl": ((), "Python, NumPy; softmax and the chain rule"),
    "02_markov_processes": ((1,), "probability: conditional distributions, expectations"),
    "03_value_functions": ((2,), "linear systems ($Ax = b$), fixed points"),
    "04_policy_gradients": ((3,), "PyTorch autograd; expectations of sampled quantities"),
    "05_lm_as_policy": ((4,), "what a causal language model's logits are"),
    "06_small_gpt": ((5,), "tokenisation, cross-entropy training"),
    "07_reward_models": ((6,), "logistic regression"),
    "08_ppo": ((4, 5, 7), "the advantage and the critic of chapter 4"),
    "09_dpo": ((7, 8), "KL divergence; the Bradley-Terry model of chapter 7"),
    "10_orpo": ((9,), "odds and log odds"),
    "11_kto": ((9,), "none beyond chapter 9"),
    "12_simpo": ((9,), "none beyond chapter 9"),
    "13_side_by_side": ((9, 10, 11, 12), "the four method chapters"),
    "14_real_model": ((9,), "a GPU and Hugging Face models help, but are not needed"),
    "15_beyond": ((4, 8), "REINFORCE with a baseline (chapter 4), PPO (chapter 8)"),
    "16_learning_from_own_samples": ((4, 6, 7, 8, 9, 15),
                                     "win rate and ceiling (6), reward models (7), PPO (8), "
                                     "DPO (9), GRPO and RLOO (15)"),
    "17_learning_from_a_verifier": ((4, 5, 8, 15),
                                    "the KL estimators of PPO (8), GRPO, Dr. GRPO and RLOO "
                                    "(15); binomial coefficients"),
}


@dataclass(frozen=True)
class Slide:
    """One slide of the lecture (titles as in the slides) and where the book covers it."""

    title: str
    topic: str
    chapter: str
    section: str  # the start of a heading of that chapter


#: The lecture, slide by slide, in its order (the title slide and "thank you" left out).
SLIDES: tuple[Slide, ...] = (
    Slide("动机", "why RL: goals hard to state, SFT cannot say what is bad, control",
          "01_why_rl", "## 1. Goals that are hard to write down"),
    Slide("强化学习基础 (1)", "Markov chain, MRP, MDP; $p(s', r \\mid s, a)$; graphical model",
          "02_markov_processes", "## 3. Markov decision processes"),
    Slide("强化学习基础 (2)", "what is solved: the policy; deterministic and stochastic",
          "04_policy_gradients", "## 1. What is solved: the policy"),
    Slide("强化学习基础 (2)", "the goal: the return $G_t$, not one reward",
          "02_markov_processes", "## 2. Markov reward processes and returns"),
    Slide("强化学习基础 (3)", "value functions $V_\\pi$, $q_\\pi$ and their two relations",
          "03_value_functions", "## 1. Two value functions and their two relations"),
    Slide("LLM和强化学习", "state = text, action = token, reward = judgement",
          "05_lm_as_policy", "## 1. Text generation as a decision process"),
    Slide("LLM和强化学习", "a model that maps text to a reward, learnt from labels",
          "07_reward_models", "## 1. From preference pairs to a scalar"),
    Slide("PPO (1)", "actor, critic, reward model, reference model",
          "08_ppo", "## 2. The four models"),
    Slide("PPO (2)", "the KL-shaped reward; the score only at the last token",
          "08_ppo", "## 3. A reward for every token"),
    Slide("PPO (2)", "advantage $R_t + \\gamma V_{t+1} - V_t$ and the actor loss",
          "08_ppo", "## 4. The slides' advantage, actor loss and critic loss"),
    Slide("PPO (3)", "the critic loss; one update per finished response",
          "08_ppo", "## 4. The slides' advantage, actor loss and critic loss"),
    Slide("DPO (1)", "the costs of PPO; the DPO loss",
          "09_dpo", "## 1. The case against PPO"),
    Slide("DPO (2)", "the data: prompt, chosen, reject, sampled from the SFT model",
          "09_dpo", "## 4. The data"),
    Slide("ORPO (1)", "alignment inside SFT, no reference model",
          "10_orpo", "## 1. What cross-entropy does not do"),
    Slide("ORPO (2)", "odds, odds ratio, $\\mathcal{L}_{SFT} + \\lambda \\mathcal{L}_{OR}$",
          "10_orpo", "## 2. Odds and the odds ratio"),
    Slide("ORPO (3)", "experiments: AlpacaEval of ORPO models",
          "10_orpo", "## 6. Results"),
    Slide("KTO (1)", "prospect theory: loss aversion, the gamble",
          "11_kto", "## 1. Prospect theory"),
    Slide("KTO (2)", "splitting the pairs; unpaired and imbalanced data",
          "11_kto", "## 2. Splitting the pairs"),
    Slide("KTO (3)", "the value function $v(z; \\lambda, \\alpha, z_0)$",
          "11_kto", "## 1. Prospect theory"),
    Slide("KTO (4)", "the KTO loss and the reference point $z_0$",
          "11_kto", "## 3. KTO's loss"),
    Slide("KTO (5)", "experiments: benchmarks, win rates, 90 % fewer desirable examples",
          "11_kto", "## 5. The paper's experiments in miniature"),
    Slide("SimPO (1)", "DPO's reward is not the generation metric",
          "12_simpo", "## 1. The reward DPO trains"),
    Slide("SimPO (1)", "a higher implicit reward is not a higher likelihood",
          "09_dpo", "## 8. The pitfall"),
    Slide("SimPO (2)", "length normalisation, target margin, no reference",
          "12_simpo", "## 2. Length normalisation"),
    Slide("SimPO (3)", "the ablation table (w/o LN, $\\gamma = 0$)",
          "12_simpo", "### The ablations, in miniature"),
    Slide("SimPO (4)", "the main table: AlpacaEval 2, Arena-Hard, MT-Bench",
          "12_simpo", "### The slides' big table, in miniature"),
    Slide("著名方法对比", "the objectives of DPO, IPO, KTO, ORPO, R-DPO, SimPO",
          "13_side_by_side", "## 1. Six objectives, one table"),
)


def _notebook(stem: str, book_dir: Path) -> dict[str, Any] | None:
    path = book_dir / f"{stem}.ipynb"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _source(cell: dict[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def find_section(notebook: dict[str, Any], heading: str) -> tuple[int, int] | None:
    """``(cell number, code cell number)`` of the heading that starts with ``heading``.

    Cells count from 1 over all cells; the code cell number is that of the first code cell
    after the heading (the cell the section's experiment starts in).
    """
    cells = notebook["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        if any(line.startswith(heading) for line in _source(cell).splitlines()):
            code_before = sum(c["cell_type"] == "code" for c in cells[:i])
            return i + 1, code_before + 1
    return None


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def full_run_seconds(notebook: dict[str, Any]) -> float | None:
    """Seconds from the first code cell's start to the last one's end, from the execution
    timestamps nbclient stores in cell metadata; ``None`` unless every code cell has them."""
    times = [c.get("metadata", {}).get("execution", {}) for c in notebook["cells"]
             if c["cell_type"] == "code"]
    if not times or not all("iopub.execute_input" in t and "shell.execute_reply" in t
                            for t in times):
        return None  # a cell added without a run: the span would not be one run's
    starts = [t["iopub.execute_input"] for t in times]
    ends = [t["shell.execute_reply"] for t in times]
    return (_timestamp(max(ends)) - _timestamp(min(starts))).total_seconds()


def reading_minutes(notebook: dict[str, Any]) -> int:
    """Words of the markdown cells at :data:`WORDS_PER_MINUTE` (maths counted as words)."""
    words = sum(len(_source(c).split()) for c in notebook["cells"] if c["cell_type"] == "markdown")
    return max(1, round(words / WORDS_PER_MINUTE))


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _title(notebook: dict[str, Any]) -> str:
    for cell in notebook["cells"]:
        for line in _source(cell).splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return "?"


def chapter_stems(book_dir: Path = BOOK_DIR) -> list[str]:
    return sorted(p.stem for p in book_dir.glob("*.ipynb") if p.name[:2].isdigit())


def quick_runtimes(path: Path = RUNTIMES) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"chapters": {}}


def chapter_table(book_dir: Path = BOOK_DIR, runtimes: dict[str, Any] | None = None) -> str:
    """Markdown table: chapter, prerequisites, reading time, full and quick run time."""
    quick = (runtimes or quick_runtimes())["chapters"]
    rows = ["| chapter | read first | you should bring | reading | full run | quick run |",
            "|---|---|---|---|---|---|"]
    for stem in chapter_stems(book_dir):
        nb = _notebook(stem, book_dir)
        before, bring = PREREQUISITES.get(stem, ((), ""))
        first = ", ".join(str(n) for n in before) or "nothing"
        q = quick.get(stem, {}).get("quick_seconds")
        rows.append(f"| {int(stem[:2])}. [{_title(nb)}]({stem}.ipynb) | {first} | {bring} | "
                    f"{reading_minutes(nb)} min | {_minutes(full_run_seconds(nb))} | "
                    f"{_minutes(q)} |")
    return "\n".join(rows)


def slide_table(book_dir: Path = BOOK_DIR) -> str:
    """Markdown table: each slide, its topic, and the chapter, section and cells covering it."""
    rows = ["| slide | what it shows | chapter | section | cell (code cell) |",
            "|---|---|---|---|---|"]
    for slide in SLIDES:
        nb = _notebook(slide.chapter, book_dir)
        where = find_section(nb, slide.section) if nb else None
        cell = f"{where[0]} ({where[1]})" if where else "missing"
        heading = slide.section.lstrip("# ").strip()
        rows.append(f"| {slide.title} | {slide.topic} | [{int(slide.chapter[:2])}]"
                    f"({slide.chapter}.ipynb) | {heading} | {cell} |")
    return "\n".join(rows)


def render(book_dir: Path = BOOK_DIR, runtimes: dict[str, Any] | None = None) -> str:
    """The block between the markers in intro.md."""
    quick = runtimes or quick_runtimes()
    machine = quick.get("machine", "one CPU thread")
    return "\n".join([
        START,
        "### Chapters: what to read first and how long it takes",
        "",
        "Run times are measured, from the cells' execution timestamps: *full* is the committed "
        "run (the outputs you see), *quick* a run with `RLCOURSE_QUICK=1` (starting the kernel "
        f"adds a few seconds to both). Machine: {machine}. Reading time counts the words at "
        f"{WORDS_PER_MINUTE} a minute (exercises not included).",
        "",
        chapter_table(book_dir, quick),
        "",
        "### The slides, one by one",
        "",
        "Each slide of the lecture and where the book covers it: the chapter, the section, and "
        "the section's cell number in the notebook (the first code cell after it in brackets).",
        "",
        slide_table(book_dir),
        END,
    ])


def refresh(intro: Path, block: str) -> str:
    """``intro``'s text with the block between the markers replaced (appended if absent)."""
    text = intro.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n## A map for the learner\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcourse.teaching.learner_map")
    parser.add_argument("--write", action="store_true", help="refresh book/intro.md")
    args = parser.parse_args(argv)
    block = render()
    if args.write:
        intro = BOOK_DIR / "intro.md"
        atomic_write_text(intro, refresh(intro, block))
        print(f"wrote {intro}")
    else:
        print(block)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
