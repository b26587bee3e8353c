"""Run every exercise check of a chapter against the reader's own notebook, from a terminal.

    python -m rlcourse.exercises book/02_markov_processes.ipynb [more.ipynb ...]

The command reads the notebook file (no kernel, no execution of the experiments): it runs the
cells that only import or define functions and classes (the exercise stubs are such cells),
then evaluates every ``check("name", expression)`` call it finds. Exit status 0 means every
check passed, 1 that something failed or is not attempted yet, 2 that a file could not be read.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from rlcourse.exercises import CheckResult, run_check

_DEFINITION_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)


def _code_cells(path: Path) -> list[str]:
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: cannot read notebook: {error}") from None
    cells = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            cells.append("".join(source) if isinstance(source, list) else source)
    return cells


def _parse(source: str) -> ast.Module | None:
    # Drop IPython magics and shell escapes; they are not Python.
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def check_notebook(path: str | Path) -> list[CheckResult]:
    """Load the reader's definitions from ``path`` and run each ``check(...)`` call in it."""
    path = Path(path)
    namespace: dict = {"__name__": "__reader__"}
    calls: list[tuple[str, ast.expr, int]] = []
    for number, source in enumerate(_code_cells(path), start=1):
        tree = _parse(source)
        if tree is None:
            continue
        if tree.body and all(isinstance(node, _DEFINITION_NODES) for node in tree.body):
            try:
                exec(compile(tree, f"{path}:cell {number}", "exec"), namespace)
            except Exception as error:
                print(f"{path}: code cell {number} failed to run: {error!r}", file=sys.stderr)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "check"
                and len(node.args) >= 2
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                calls.append((node.args[0].value, node.args[1], number))
    results = []
    for name, expression, number in calls:
        try:
            code = compile(ast.Expression(expression), f"{path}:cell {number}", "eval")
            fn = eval(code, namespace)
        except Exception as error:
            results.append(
                CheckResult(name, "error", f"✗ {name}: cannot find your function ({error!r}).")
            )
            continue
        results.append(run_check(name, fn))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcourse.exercises", description=__doc__)
    parser.add_argument("notebooks", nargs="+", help="chapter notebooks to check")
    args = parser.parse_args(argv)
    all_results: list[CheckResult] = []
    for notebook in args.notebooks:
        print(f"== {notebook}")
        results = check_notebook(notebook)
        if not results:
            print("   (no check(...) calls found)")
        for result in results:
            print(result.message)
        all_results += results
    passed = sum(r.passed for r in all_results)
    print(f"\n{passed}/{len(all_results)} checks passed.")
    return 0 if passed == len(all_results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
