"""Add the ceiling and the share of gain next to every win rate vs SFT in the results files.

The writer scripts record these fields themselves from now on
(:meth:`rlcourse.evaluation.Evaluation.summary`: ceiling, share of gain with a *paired*
bootstrap error). The results written before that keep only the win rate, its bootstrap error
and the baseline's statistics, not the per-comparison outcomes, so this script adds, without
rerunning an hour of training:

- ``ceiling``: the perfect assistant's win rate against the *same* baseline answers. It is
  exact, not estimated: the perfect answer beats every baseline answer below the best score and
  ties the rest, so ceiling = 1 − share_best/2, with share_best the share of baseline answers
  that already score the best. Taken from the entry's ``baseline_share_best`` where it was
  recorded; otherwise from ``benchmarks/results/ceiling.json`` (``bench_ceiling.py``), whose
  baseline answers are the same samples (same model, prompts and seed), which is checked
  through the baseline's mean score and mean length;
- ``share_of_gain`` = (win_rate − ½)/(ceiling − ½);
- ``share_of_gain_stderr`` = win_rate_stderr/(ceiling − ½): the win rate's bootstrap error
  propagated, with the ceiling treated as a constant (its own bootstrap error, about 0.008, and
  its correlation with the win rate are ignored; ``share_of_gain_se_method`` says so).

For a summary over seeds the same is done for the mean and the spread (``_min``, ``_max``,
``_seed_std``). It also recovers, where the models allow, the garbled share of the two
side-by-side reference rows (SFT and base against SFT), whose samples can be drawn again
exactly: every recorded statistic is checked to match before the new one is written.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/annotate_ceiling.py   # after bench_ceiling.py; seconds
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FILES = ("preference_methods.json", "side_by_side.json", "rlhf_small_gpt.json")
METHOD = "propagated: win_rate_stderr / (ceiling - 0.5), ceiling as a constant (ceiling_note)"
SPREAD = ("_min", "_max")


def annotate_entry(entry: dict[str, Any], ceiling: float) -> None:
    """Add ceiling, share_of_gain and its propagated error (and the spread over seeds)."""
    gap = ceiling - 0.5
    entry["ceiling"] = ceiling
    entry["share_of_gain"] = (entry["win_rate"] - 0.5) / gap
    entry["share_of_gain_stderr"] = entry["win_rate_stderr"] / gap
    entry["share_of_gain_se_method"] = METHOD
    for suffix in SPREAD:
        if f"win_rate{suffix}" in entry:
            entry[f"share_of_gain{suffix}"] = (entry[f"win_rate{suffix}"] - 0.5) / gap
    if "win_rate_seed_std" in entry:
        entry["share_of_gain_seed_std"] = entry["win_rate_seed_std"] / gap


def ceiling_of(entry: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """1 − share_best/2 of the entry's own baseline, or the reference ceiling when the entry's
    baseline is the reference's (same mean score and mean length); None if unknown."""
    if "baseline_share_best" in entry:
        return 1.0 - entry["baseline_share_best"] / 2
    base = reference["baseline"]
    if ("baseline_mean_score" in entry and "baseline_mean_length" in entry
            and math.isclose(entry["baseline_mean_score"], base["baseline_mean_score"])
            and math.isclose(entry["baseline_mean_length"], base["baseline_mean_length"])):
        return reference["ceiling"]
    return None


def _fresh(entry: dict[str, Any]) -> bool:
    """True for an entry whose share of gain came from Evaluation.summary (paired bootstrap)."""
    return "share_of_gain" in entry and "share_of_gain_se_method" not in entry


def annotate(data: Any, reference: dict[str, Any], path: str = "") -> list[str]:
    """Walk a results file; annotate every entry with a win rate vs SFT. Entries that already
    carry a paired-bootstrap share of gain (written by ``Evaluation.summary``) are left alone.
    Returns the paths annotated."""
    done: list[str] = []
    if isinstance(data, dict):
        children = [(k, v) for k, v in data.items() if isinstance(v, (dict, list))]
        if "win_rate" in data and "win_rate_stderr" in data and not _fresh(data):
            ceiling = ceiling_of(data, reference)  # None for a summary: its runs decide below
            if ceiling is not None:
                annotate_entry(data, ceiling)
                done.append(path or "/")
        # a method's summary over seeds: the ceiling of its runs (all have the same baseline)
        if (isinstance(data.get("summary"), dict) and isinstance(data.get("runs"), list)
                and not _fresh(data["summary"])):
            ceilings = {ceiling_of(r, reference) for r in data["runs"]}
            if len(ceilings) == 1 and None not in ceilings:
                annotate_entry(data["summary"], ceilings.pop())
                done.append(f"{path}/summary")
            children = [(k, v) for k, v in children if k != "summary"]
        for k, v in children:
            done += annotate(v, reference, f"{path}/{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            done += annotate(v, reference, f"{path}[{i}]")
    return done


#: What must match before a statistic of samples drawn again is added to a stored row.
REPRODUCED = ("win_rate", "lc_win_rate", "model_mean_length", "model_mean_score",
              "model_share_flawed", "model_share_repetition", "model_share_false",
              "model_share_rude", "model_share_off_topic", "baseline_mean_score", "wins", "ties")


def mismatches(row: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """The keys of REPRODUCED on which samples drawn again disagree with the stored row."""
    return [k for k in REPRODUCED if k in row
            and not math.isclose(float(again[k]), float(row[k]), abs_tol=1e-9)]


def garbled_of_reference_rows(sbs: dict[str, Any], data_dir: Path) -> None:
    """Draw the side-by-side SFT and base rows' samples again (same models, prompts, seed),
    check that every recorded statistic matches, and add ``model_share_garbled``."""
    import torch

    from rlcourse.data import read_jsonl
    from rlcourse.evaluation import evaluate_against
    from rlcourse.models import load_model

    torch.set_num_threads(1)
    prompts = [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")]
    sft, tok = load_model(data_dir / "checkpoints" / "sft", device="cpu")
    base, _ = load_model(data_dir / "checkpoints" / "base", device="cpu")
    n_samples = sbs["settings"]["eval_samples_per_prompt"]
    for key, model in (("sft", sft), ("base", base)):
        row = sbs[key]
        if "model_share_garbled" in row:
            continue
        ev = evaluate_against(model, sft, tok, prompts, n_samples=n_samples, seed=1000,
                              n_bootstrap=10)
        s = {**ev.summary(), "wins": ev.win.wins, "ties": ev.win.ties}
        differ = mismatches(row, s)
        if differ:
            print(f"side_by_side.json:{key}: samples drawn again differ in {differ}; "
                  "garbled share not added")
            continue
        row["model_share_garbled"] = s["model_share_garbled"]
        print(f"side_by_side.json:{key}: samples reproduced exactly; garbled share "
              f"{s['model_share_garbled']:.3f} added")


def main(argv: list[str] | None = None) -> None:
    from rlcourse.config import DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--no-garbled", action="store_true",
                        help="skip drawing the side-by-side reference rows' samples again")
    args = parser.parse_args(argv)
    reference = json.loads((args.results / "ceiling.json").read_text())
    for name in FILES:
        path = args.results / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        done = annotate(data, reference)
        if name == "side_by_side.json" and not args.no_garbled:
            garbled_of_reference_rows(data, args.data)
        data["ceiling_note"] = (
            "ceiling: the perfect assistant's win rate against the same SFT answers "
            "(1 - share_best/2; benchmarks/results/ceiling.json); share_of_gain = "
            "(win_rate - 0.5)/(ceiling - 0.5). Entries with share_of_gain_se_method were "
            "annotated by benchmarks/annotate_ceiling.py: their error is the win rate's "
            "bootstrap error / (ceiling - 0.5), the ceiling treated as a constant. Entries "
            "without it were written by Evaluation.summary: paired bootstrap.")
        from rlcourse.files import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
        print(f"{name}: {len(done)} entries annotated")


if __name__ == "__main__":
    main()
