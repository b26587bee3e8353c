"""The command line: ``python -m rlcourse.recipes RECIPE [--model P] [--data P] [--output D]
[key=value ...]`` (also under ``accelerate launch`` / ``torchrun``), the console command
``rlcourse-train`` (the same), and ``--write-reference``. ``RECIPE`` is a YAML file or the name
of a method, whose recipe ships with the package (:data:`RECIPES_DIR`, :func:`find_recipe`):
``rlcourse-train dpo --model DIR --data FILE --output DIR`` works from any directory. Bad
input is one line ``error: file:line: ...`` with exit code 2; a diverged run exits with 1.

Where the shipped recipes live: ``recipes/`` at the repository's root is the one copy in git;
``rlcourse/recipes/recipe_files`` links to it, and ``pyproject.toml`` installs its YAML files
and ``REFERENCE.md`` as package data, so a wheel carries the files themselves. Chosen over
moving them into the package because the documentation, the tests and every command shown
name ``recipes/NAME.yaml``, and GitHub shows a real folder there.
"""

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

__all__ = ["RECIPES_DIR", "find_recipe", "main"]


def _recipes_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "recipe_files"
    if packaged.is_dir():
        return packaged.resolve()  # in a checkout, the repository's recipes/
    from rlcourse.config import REPO_ROOT  # a checkout whose link did not survive (Windows)

    return REPO_ROOT / "recipes"


#: The folder of the shipped recipes (``<method>.yaml``) and ``REFERENCE.md``.
RECIPES_DIR = _recipes_dir()


def find_recipe(spec: str) -> Path:
    """The recipe file ``spec`` names: a YAML file that exists, else the shipped recipe of the
    method called ``spec`` (``dpo`` or ``dpo.yaml`` -> ``RECIPES_DIR/dpo.yaml``); a
    :class:`RecipeError` naming the methods otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = RECIPES_DIR / f"{name.lower()}.yaml"
    if not path.parent.parts and name.lower() in methods() and shipped.is_file():
        return shipped
    raise RecipeError(f"{spec}: no such recipe file, and not the name of a method with a shipped "
                      f"recipe ({', '.join(methods())}; in {RECIPES_DIR})")


def _epilog(rows: dict) -> str:
    width = max(len(name) for name in rows)
    lines = ["methods (RECIPE may be one of these names: its shipped recipe is used):"]
    lines += [f"  {name:<{width}}  {row.summary}" for name, row in rows.items()]
    lines += ["", f"shipped recipes: {RECIPES_DIR}",
              f"every recipe key, its type, default and meaning: {RECIPES_DIR / 'REFERENCE.md'}"
              " (recipes/REFERENCE.md in the repository)",
              "", "example: rlcourse-train dpo --model runs/sft/model --data pairs.jsonl "
              "--output runs/dpo train.lr=5e-7 loss.beta=0.1"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``rlcourse-train RECIPE [--model P] [--data P] [--output D] [k=v ...]`` (= ``python -m
    rlcourse.recipes``); ``RECIPE``: a YAML file or a method's name (:func:`find_recipe`)."""
    rows = methods()
    parser = argparse.ArgumentParser(
        prog="rlcourse-train (python -m rlcourse.recipes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with a recipe (a YAML file, or a method's name for its "
                    "shipped recipe); key=value pairs override it, e.g. train.lr=1e-4 "
                    "loss.beta=0.5.",
        epilog=_epilog(rows))
    parser.add_argument("recipe", nargs="?", help="the recipe: a YAML file (e.g. "
                        "recipes/dpo.yaml) or a method's name (e.g. dpo)")
    parser.add_argument("--recipe", dest="recipe_option", metavar="RECIPE",
                        help="the same as the positional RECIPE")
    parser.add_argument("--write-reference", action="store_true",
                        help="regenerate recipes/REFERENCE.md from the field docs")
    parser.add_argument("--model", help="local model directory (overrides 'model'); a LoRA "
                                        "adapter folder is merged into its base first")
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
    if args.recipe is not None and args.recipe_option is not None:
        if "=" in args.recipe:  # the first key=value, taken for the positional recipe
            args.overrides.insert(0, args.recipe)
        else:
            parser.error("give the recipe once: as RECIPE or as --recipe RECIPE")
        args.recipe = None
    spec = args.recipe if args.recipe is not None else args.recipe_option
    if spec is None:
        parser.error("the recipe is required: a YAML file or a method's name "
                     f"({', '.join(rows)})")
    try:
        args.recipe = str(find_recipe(spec))
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
