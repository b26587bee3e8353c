"""Every shipped recipe resolves to the configuration it resolved to before the recipe layer
became a package with a method registry (``tests/data/recipe_snapshots.json``, written by
``load_recipe`` at commit 36a8888, before the refactor; the hinge and robust recipes were added
after it).

The snapshot is ``Recipe.to_dict()`` without ``source`` (the path the file was read from) and
without the sections a method does not have (``None`` before, absent now), plus the class of
each section, so a section parsed into another dataclass fails too."""

from __future__ import annotations

import json

import pytest

from rlcourse import recipes
from rlcourse.config import REPO_ROOT

SNAPSHOTS = json.loads((REPO_ROOT / "tests" / "data" / "recipe_snapshots.json").read_text())
SHIPPED = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
SECTIONS = ("train", "ppo", "rollout", "group", "online", "rsft", "lora")
#: Fields added after the snapshot, with the default that keeps a run what it was: a shipped
#: recipe must resolve to exactly that default (and nothing else may change).
ADDED_FIELDS = {("online", "checkpoint_every"): 0, ("rsft", "checkpoint_every"): 0,
                ("rollout", "eval_every"): 0, ("rollout", "report_to"): "none",
                ("online", "report_to"): "none", ("rsft", "report_to"): "none",
                ("rollout", "warmup_steps"): 0, ("rollout", "lr_multipliers"): {},
                ("rollout", "lr_decay"): "constant"}


def _resolved(path):
    recipe = recipes.load_recipe(path)
    config = json.loads(json.dumps(recipe.to_dict()))
    config.pop("source")
    config = {k: v for k, v in config.items() if not (k in SECTIONS and v is None)}
    types = {k: type(getattr(recipe, k)).__name__ for k in SECTIONS
             if getattr(recipe, k) is not None}
    return {"config": config, "section_types": types}


def test_every_shipped_recipe_has_a_snapshot():
    assert sorted(SNAPSHOTS) == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_resolves_to_its_snapshot(path):
    assert _without_added_defaults(_resolved(path)) == \
        _without_added_defaults(SNAPSHOTS[path.name])


def _without_added_defaults(resolved):
    """The snapshot's view: fields added since, at their default, left out (on both sides, as a
    section may have had the field already)."""
    config = json.loads(json.dumps(resolved["config"]))
    for (section, key), default in ADDED_FIELDS.items():
        if section in config and config[section].get(key, default) == default:
            config[section].pop(key, None)
    return {**resolved, "config": config}
