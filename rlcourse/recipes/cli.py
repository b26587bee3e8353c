"""The command line: ``python -m rlcourse.recipes RECIPE.yaml [--model P] [--data P] [--output D]
[key=value ...]`` (also under ``accelerate launch`` / ``torchrun``), and
``--write-reference``. Bad input is one line ``error: file:line: ...`` with exit code 2; a
diverged run exits with 1."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rlcourse.data import DataError
from rlcourse.engine import NonFiniteError
from rlcourse.guards import RewardError
from rlcourse.recipes import reference
from rlcourse.recipes.load import load_recipe, parse_overrides
from rlcourse.recipes.registry import methods
from rlcourse.recipes.run import run_recipe
from rlcourse.recipes.typed import RecipeError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlcourse.recipes RECIPE.yaml [--model P] [--data P] [--output D] [k=v ...]``."""
    rows = methods()
    parser = argparse.ArgumentParser(
        prog="python -m rlcourse.recipes",
        description="Train a model with a recipe (a YAML file); key=value pairs override it, "
                    "e.g. train.lr=1e-4 loss.beta=0.5. Methods: " + ", ".join(rows) + ".")
    parser.add_argument("recipe", nargs="?", help="the recipe YAML, e.g. recipes/dpo.yaml")
    parser.add_argument("--write-reference", action="store_true",
                        help="regenerate recipes/REFERENCE.md from the field docs")
    parser.add_argument("--model", help="local model directory (overrides 'model')")
    parser.add_argument("--data", help="JSONL data (overrides 'data'; for the methods that "
                                       "sample, PPO, GRPO, RLOO, online DPO and RSFT, 'prompts')")
    parser.add_argument("--prompts", help="JSONL of {\"prompt\"} rows (overrides 'prompts')")
    parser.add_argument("--reward-model", help="PPO, GRPO, RLOO, online DPO, RSFT: reward "
                                               "model directory")
    parser.add_argument("--output", help="output directory (overrides 'output')")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved recipe, train nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if the output folder holds another run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.write_reference:
        print(f"wrote {reference.write_reference()}")
        return 0
    if args.recipe is None:
        parser.error("the recipe YAML is required")
    try:
        overrides = parse_overrides(args.overrides)
        for key in ("model", "output", "reward_model", "prompts"):
            if getattr(args, key):
                overrides[key] = getattr(args, key)
        if args.data:
            import yaml

            name = (yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}).get(
                "method", "")
            row = rows.get(str(name).lower())
            overrides[row.data_key if row is not None else "data"] = args.data
        recipe = load_recipe(args.recipe, overrides)
        if args.dry_run:
            print(json.dumps(recipe.to_dict(), indent=1, default=str))
            return 0
        result = run_recipe(recipe, overwrite=args.overwrite)
    except (RecipeError, DataError, RewardError, FileNotFoundError) as err:  # bad input: one
        # line, code 2 (a reward function returning NaN, None or strings is bad input too)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # training diverged: nothing saved, the checkpoints kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.finished_before:
        return 0
    if result.saved_to is not None:
        print(f"saved the trained model to {result.saved_to}")
    return 0
