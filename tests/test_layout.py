"""The house stays readable: no function in the project's packages runs over MAX_FUNCTION_LINES lines (from its
``def`` to its last line, docstring and nested functions included). A longer one is cut into named steps."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pathgen", "flows", "tasks", "agents", "deploy", "bench")
MAX_FUNCTION_LINES = 60


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method in a Python file."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return found


def project_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_no_function_is_longer_than_the_limit():
    too_long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for path in project_files()
        for name, line, length in function_lengths(path)
        if length > MAX_FUNCTION_LINES
    ]
    assert not too_long, f"cut these into named steps (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(
        too_long
    )


def test_the_measure_counts_def_to_last_line_and_nested_functions(tmp_path):
    source = tmp_path / "sample.py"
    body = "\n".join(f"        x{i} = {i}" for i in range(3))
    source.write_text(f"class A:\n    def f(self):\n        def g():\n            pass\n{body}\n")
    assert function_lengths(source) == [("A.f", 2, 6), ("A.f.g", 3, 2)]
