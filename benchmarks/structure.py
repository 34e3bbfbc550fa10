"""Structure metrics of the ``dgh`` package: lines per package, import cycles, function-local imports.

Run from the repository root: ``python benchmarks/structure.py`` (reads the source with ``ast``; imports nothing of
dgh). Prints one JSON object. Compare two commits by running it in a checkout of each.
"""

from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.import_graph import cycles, import_sites, module_files  # noqa: E402


def local_imports(repo: Path = REPO) -> tuple[int, int]:
    """(all import statements inside a function body, those importing a ``dgh`` module)."""
    total = own = 0
    for path in module_files(repo).values():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    total += 1
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    own += bool(name and (name == "dgh" or name.startswith("dgh.")) or getattr(node, "level", 0))
    return total, own


def line_counts(repo: Path = REPO) -> dict[str, int]:
    """Lines per package (``dgh`` = the top-level modules)."""
    out: Counter[str] = Counter()
    for module, path in module_files(repo).items():
        parts = module.split(".")
        is_subpackage = len(parts) > 2 or (len(parts) == 2 and path.name == "__init__.py")
        key = ".".join(parts[:2]) if is_subpackage else "dgh (top-level modules)"
        out[key] += len(path.read_text().splitlines())
    out["total"] = sum(v for k, v in out.items())
    return dict(sorted(out.items()))


def main() -> None:
    total, own = local_imports()
    sites = import_sites()
    report = {
        "lines": line_counts(),
        "import_cycles": cycles(),
        "function_local_imports": total,
        "function_local_imports_of_dgh": own,
        "dgh_import_statements_local_listed": sorted({f"{s.importer}:{s.line}" for s in sites if s.local}),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
