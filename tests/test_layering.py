"""The import structure, read from the source (AST): no import inside a function hides a cycle; the ``pathgen``
package itself stands on the ground floor; every command module of pathgen/cli/ is registered one way.

An import at module level that closes a cycle fails at once; moved into a function, the same cycle still ties the
two modules together but is only found when that function runs. So: an in-function import of first-party module M
from module N is refused when M, through its own module-level imports (transitively), imports N. Lazy imports of
heavy third-party libraries, and lazy first-party imports that go one way only, are fine. The layers themselves
(pathgen.cli > flows > tasks > agents > the ground floor) are import-linter's contract in pyproject.toml.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pathgen", "flows", "tasks", "agents")


@dataclass(frozen=True)
class LazyImport:
    importer: str
    imported: str
    line: int


def module_files() -> dict[str, Path]:
    """Every first-party module by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``: the first-party ones among them."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def _resolved(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> set[str]:
    """The first-party modules an import statement runs (``from a import b`` runs ``a.b`` when that is a module),
    less the importer's own packages when the statement only passes through them: those ran before the importer."""
    if isinstance(node, ast.Import):
        named = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            anchor = importer.split(".") if is_package else importer.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        named = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    named &= modules.keys()
    passed = set().union(*(_with_parents(name, modules) for name in named)) - named
    return named | (passed - _with_parents(importer, modules))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool):
    """(import node, whether it runs only when a function is called), skipping ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _walk_one(other, in_function)
            continue
        yield from _walk_one(child, in_function)


def _walk_one(node: ast.AST, in_function: bool):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, in_function
        return
    inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    yield from _walk(node, inside)


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[LazyImport]]:
    """Module-level imports per module, and every first-party import made inside a function."""
    top: dict[str, set[str]] = {name: set() for name in modules}
    lazy: list[LazyImport] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, in_function in _walk(ast.parse(path.read_text(), str(path)), False):
            targets = _resolved(node, name, is_package, modules) - {name}
            if in_function:
                lazy += [LazyImport(name, target, node.lineno) for target in targets]
            else:
                top[name] |= targets
    return top, lazy


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def hidden_cycles(modules: dict[str, Path]) -> list[LazyImport]:
    top, lazy = import_graph(modules)
    return [imp for imp in lazy if imp.importer in reachable(imp.imported, top)]


def test_no_import_inside_a_function_hides_a_cycle():
    found = hidden_cycles(module_files())
    shown = [f"{i.importer}:{i.line} imports {i.imported} in a function; {i.imported} imports it back" for i in found]
    assert not shown, "\n".join(shown)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_finds_a_hidden_cycle_and_passes_a_one_way_lazy_import(tmp_path, monkeypatch):
    _write(
        tmp_path,
        {
            "pathgen/__init__.py": "",
            "pathgen/high.py": "from pathgen import low\n\ndef g():\n    from . import other\n",
            "pathgen/low.py": "def f():\n    from pathgen.high import thing\n    import numpy\n",
            "pathgen/other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pathgen import high\n",
            # A package's factory importing its backends lazily: one that takes a name from the package closes a
            # cycle; one that only passes through the package to a sibling module does not.
            "agents/__init__.py": "",
            "agents/backends/__init__.py": "def make():\n    from agents.backends import a, b\n\ndef helper(): ...\n",
            "agents/backends/a.py": "from agents.backends import helper\n",
            "agents/backends/b.py": "from agents.backends import shared\n",
            "agents/backends/shared.py": "",
        },
    )
    monkeypatch.setattr("tests.test_layering.ROOT", tmp_path)
    found = sorted(hidden_cycles(module_files()), key=lambda i: i.importer)
    assert found == [  # other.py's TYPE_CHECKING import runs nothing
        LazyImport("agents.backends", "agents.backends.a", 2),
        LazyImport("pathgen.low", "pathgen.high", 2),
    ]


def test_every_command_module_is_registered_and_every_command_has_a_handler():
    """pathgen/cli/: one module per command group, each listed in app.COMMAND_GROUPS; each subcommand bound to the
    handler ``main`` runs (argparse's set_defaults, through Commands.add)."""
    import argparse

    from pathgen.cli import app

    shared = {"__init__", "app", "args", "runs"}
    modules = {path.stem for path in (ROOT / "pathgen" / "cli").glob("*.py")} - shared
    assert {group.__name__.rsplit(".", 1)[1] for group in app.COMMAND_GROUPS} == modules
    (subcommands,) = [a for a in app.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    unbound = [name for name, parser in subcommands.choices.items() if not callable(parser.get_default("handler"))]
    assert not unbound and len(subcommands.choices) >= 18


def test_the_pathgen_package_itself_stands_on_the_ground_floor():
    """import-linter's layers cannot name ``pathgen/__init__.py`` alone (a layer holds its submodules): every layer
    imports ``pathgen`` (for ``__version__``), so it may import only the ground floor."""
    modules = module_files()
    top, lazy = import_graph(modules)
    ground = {"pathgen.settings", "pathgen.errors", "pathgen.devices", "pathgen.digest", "pathgen.processes"}
    imported = top["pathgen"] | {i.imported for i in lazy if i.importer == "pathgen"}
    assert not {m for m in imported if ".".join(m.split(".")[:2]) not in ground}
