"""The package metadata, the conda environment and the README agree."""

import re

import pytest
import yaml

from rlcourse.config import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_lists_every_runtime_dependency():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = _name(requirement)
        assert CONDA_NAMES.get(name, name) in conda, f"environment.yml lacks {name}"


def test_torch_is_a_range_not_a_pin():
    torch = [r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch"]
    assert torch and "==" not in torch[0]


def test_ci_installs_pinned_torch_first_then_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b).strip()
    assert test_command in ci
    assert ci.index("torch==2.13.0") < ci.index(test_command)


def test_readme_lists_every_chapter():
    readme = (REPO_ROOT / "README.md").read_text()
    for notebook in sorted((REPO_ROOT / "book").glob("[0-9][0-9]_*.ipynb")):
        assert f"book/{notebook.name}" in readme, f"README chapter table lacks {notebook.name}"
