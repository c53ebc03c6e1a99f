"""Print the figures docs/ARCHITECTURE.md records about the house: textbook lines per file, the
longest textbook function, page lengths, and function-local imports left (each must say why).

    python scripts/structure_report.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_structure import imports_of, python_files  # noqa: E402  (the same rules the test checks)


def functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def main() -> None:
    print("| textbook file | lines | longest function |")
    print("| --- | ---: | --- |")
    total = 0
    for path in sorted((REPO / "core" / "gpt").glob("*.py")):
        source = path.read_text()
        n = len(source.splitlines())
        total += n
        longest = max(functions(ast.parse(source)), key=lambda f: f[1], default=("—", 0))
        print(f"| `{path.name}` | {n} | `{longest[0]}` ({longest[1]}) |")
    print(f"| **all** | **{total}** | |\n")
    print("| page | lines |")
    print("| --- | ---: |")
    for path in sorted((REPO / "pages").glob("*.py")):
        print(f"| `{path.name}` | {len(path.read_text().splitlines())} |")
    local = []
    for path in python_files():
        for node, module, is_local in imports_of(ast.parse(path.read_text())):
            if is_local:
                local.append(f"{path.relative_to(REPO)}:{node.lineno} {module}")
    print(f"\nfunction-local imports (heavy optional dependencies, each with its reason): {len(local)}")
    for line in local:
        print("-", line)


if __name__ == "__main__":
    main()
