"""The house rules of the code, checked on the source (see docs/ARCHITECTURE.md).

Three rooms and the pages above them; nothing imports upward:

    pages/N_*.py  → core.stages, pages._ui
    pages/_ui     → core.stages, core.lab, core.gpt
    core.stages   → core.stages, core.lab, core.gpt
    core.lab      → core.lab, core.gpt          (never streamlit)
    core.gpt      → core.gpt, the standard library, torch (and `regex`, for GPT-2's split pattern)

A function-local import is allowed only for a heavy optional dependency, with a comment on that
line saying why; imports of our own modules always sit at the top of the file, so the dependency
graph can be read from the file headers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
TEXTBOOK_THIRD_PARTY = {"torch", "regex"}
MAX_TEXTBOOK_FILE_LINES = 450
MAX_TEXTBOOK_FUNCTION_LINES = 60
MAX_PAGE_LINES = 200


def room_of(path: Path) -> str:
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith("core/gpt/"):
        return "gpt"
    if rel.startswith("core/lab/"):
        return "lab"
    if rel.startswith("core/stages/"):
        return "stages"
    if rel.startswith("pages/_ui/"):
        return "ui"
    if rel.startswith("pages/"):
        return "page"
    if rel == "app.py":
        return "app"
    return "core" if rel.startswith("core/") else "other"


ALLOWED_OWN = {  # room -> our packages it may import
    "gpt": ("core.gpt",),
    "lab": ("core.gpt", "core.lab"),
    "stages": ("core.gpt", "core.lab", "core.stages"),
    "ui": ("core.gpt", "core.lab", "core.stages", "pages._ui"),
    "page": ("core.stages", "pages._ui"),
    "app": ("core.stages", "pages._ui"),
    "core": ("core",),  # core/__main__.py, the dispatcher
}


def python_files() -> list[Path]:
    files = [REPO / "app.py"]
    for folder in ("core", "pages"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def imports_of(tree: ast.AST) -> list[tuple[ast.AST, str, bool]]:
    """(node, module name, is function-local) for every import in the file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child, child.module or "", in_function))
            visit(child, local)

    visit(tree, False)
    return found


def violations_of(path: Path, source: str) -> list[str]:
    room = room_of(path)
    tree = ast.parse(source)
    lines = source.splitlines()
    problems = []
    for node, module, local in imports_of(tree):
        top = module.split(".")[0]
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        own = top in ("core", "pages")
        if local and (own or "#" not in lines[node.lineno - 1]):
            problems.append(f"{where}: function-local import of {module} (move it to the top"
                            + ("" if own else ", or say why on that line") + ")")
        if own and room in ALLOWED_OWN and not module.startswith(ALLOWED_OWN[room]):
            problems.append(f"{where}: {room} imports {module} (allowed: {', '.join(ALLOWED_OWN[room])})")
        if room == "gpt" and not own and top not in STDLIB and top not in TEXTBOOK_THIRD_PARTY:
            problems.append(f"{where}: the textbook imports {module} (only stdlib, torch and regex)")
        if room in ("gpt", "lab", "stages", "core") and top == "streamlit":
            problems.append(f"{where}: core imports streamlit")
    return problems


def test_every_import_follows_the_house_rule():
    problems = []
    for path in python_files():
        problems += violations_of(path, path.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("room, source, expected", [
    ("core/gpt/x.py", "from core.lab import runs\n", "gpt imports core.lab"),
    ("core/gpt/x.py", "import numpy\n", "the textbook imports numpy"),
    ("core/lab/x.py", "from core.stages import pretrain\n", "lab imports core.stages"),
    ("pages/9_X.py", "from core.lab import jobs\n", "page imports core.lab"),
    ("core/stages/x.py", "def f():\n    from core.gpt import model\n", "function-local import of core.gpt"),
    ("core/stages/x.py", "def f():\n    import transformers\n", "say why on that line"),
    ("core/lab/x.py", "import streamlit as st\n", "core imports streamlit"),
])
def test_the_rule_catches_each_kind_of_violation(room, source, expected):
    problems = violations_of(REPO / room, source)
    assert any(expected in p for p in problems), problems


def test_a_commented_heavy_optional_import_is_allowed():
    source = "def f():\n    import transformers  # heavy and optional: only the export test needs it\n"
    assert violations_of(REPO / "core/lab/x.py", source) == []


def _function_lengths(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_the_textbook_reads_in_short_files_and_short_functions():
    problems = []
    for path in sorted((REPO / "core" / "gpt").glob("*.py")):
        source = path.read_text()
        n = len(source.splitlines())
        if n > MAX_TEXTBOOK_FILE_LINES:
            problems.append(f"{path.name}: {n} lines (at most {MAX_TEXTBOOK_FILE_LINES})")
        for name, length in _function_lengths(ast.parse(source)):
            if length >= MAX_TEXTBOOK_FUNCTION_LINES:
                problems.append(f"{path.name}: {name}() is {length} lines (under {MAX_TEXTBOOK_FUNCTION_LINES})")
    assert not problems, "\n".join(problems)


def test_pages_stay_thin():
    long_pages = {p.name: len(p.read_text().splitlines()) for p in (REPO / "pages").glob("*.py")}
    assert all(n <= MAX_PAGE_LINES for n in long_pages.values()), long_pages
