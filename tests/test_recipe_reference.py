"""The recipe key reference: every config field carries a doc (the string literal under it), and
``recipes/REFERENCE.md`` is what :func:`rlcourse.recipes.recipe_reference` generates from them.

Regenerate with ``python -m rlcourse.recipes --write-reference``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import yaml

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.recipes import reference


@dataclass
class _Half:
    """A dataclass with one documented field and one without."""

    a: int = 1
    """The doc of a,
    on two lines."""
    b: str = "x"
    c: float = 0.5  # a comment is not a doc


def test_field_docs_reads_the_string_under_each_field():
    assert recipes.field_docs(_Half) == {"a": "The doc of a,\non two lines."}


def test_an_undocumented_field_is_refused_by_name(monkeypatch):
    path = f"{__name__}:_Half"
    monkeypatch.setattr(reference, "reference_sections", lambda: (("half", path, "none", ""),))
    with pytest.raises(ValueError, match=r"_Half\.b.*_Half\.c"):
        recipes.recipe_reference()


@pytest.mark.parametrize("section", recipes.reference_sections(), ids=lambda s: s[1])
def test_every_config_field_has_a_doc(section):
    cls = reference.import_path(section[1])
    docs = recipes.field_docs(cls)
    assert [f.name for f in fields(cls) if not docs.get(f.name, "").strip()] == []


def test_committed_reference_is_up_to_date():
    committed = recipes.REFERENCE_PATH.read_text(encoding="utf-8")
    assert committed == recipes.recipe_reference(), \
        "recipes/REFERENCE.md is stale: run python -m rlcourse.recipes --write-reference"


def test_reference_rows_carry_type_default_and_doc():
    text = recipes.recipe_reference()
    assert "| `train.lr` | `float` | `0.001` | Peak learning rate" in text
    assert "| `ppo.clip_eps` | `float \\| None` | `0.2` |" in text
    assert "| `train.betas` | `tuple[float, float]` | `[0.9, 0.999]` |" in text
    assert "| `method` | `str` | required | The method" in text
    assert "`lora.extra`" not in text and "| `lines` |" not in text  # set in code, not keys


def test_every_key_of_the_shipped_recipes_is_in_the_reference():
    text = recipes.recipe_reference()
    sections = {s[0] for s in recipes.reference_sections()}
    missing = []
    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        for section, values in raw.items():
            if f"| `{section}` |" not in text:  # a top-level key
                missing.append(f"{path.name}: {section}")
            if section in sections and isinstance(values, dict):
                missing += [f"{path.name}: {section}.{k}" for k in values
                            if f"| `{section}.{k}` |" not in text]
    assert missing == []


def test_command_line_writes_the_reference(tmp_path, monkeypatch):
    target = tmp_path / "REFERENCE.md"
    monkeypatch.setattr(reference, "REFERENCE_PATH", target)
    assert recipes.main(["--write-reference"]) == 0
    assert target.read_text(encoding="utf-8") == recipes.recipe_reference()
