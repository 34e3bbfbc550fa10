"""The import graph of the ``dgh`` package, read from the source with :mod:`ast` (nothing is imported).

Used by ``tests/test_dvc_deps.py`` (the code deps of every DVC stage) and ``benchmarks/structure.py`` (import
cycles, function-local imports, line counts).

An edge ``a -> b`` means that executing module ``a`` can execute module ``b``: every ``import`` / ``from ... import``
of a ``dgh`` module anywhere in ``a`` (module level or inside a function, except under ``if TYPE_CHECKING:``), plus
the ``__init__`` of every package on the way (``import dgh.x.y`` runs ``dgh/__init__.py`` and ``dgh/x/__init__.py``).
``from dgh.x import y`` adds ``dgh.x.y`` when ``y`` is a submodule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dgh"


@dataclass(frozen=True)
class ImportSite:
    """One ``import`` statement of a ``dgh`` module: who imports what, and whether it sits inside a function."""

    importer: str
    imported: str
    line: int
    local: bool


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """``{"dgh.x.y": path}`` for every ``.py`` file of the package (packages map to their ``__init__.py``)."""
    out: dict[str, Path] = {}
    for path in sorted((repo / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_sites(repo: Path = REPO) -> list[ImportSite]:
    """Every import of a ``dgh`` module in the package, resolved to module names that exist."""
    files = module_files(repo)
    sites: list[ImportSite] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for sub in child.orelse:
                        visit(sub, local)
                    continue
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        pkg = _package_of(module, path).split(".")
                        pkg = pkg[: len(pkg) - (child.level - 1)]
                        base = ".".join(pkg + ([base] if base else []))
                    names = [base] + [f"{base}.{a.name}" for a in child.names]
                for name in names:
                    if name in files and (name == PACKAGE or name.startswith(PACKAGE + ".")):
                        sites.append(ImportSite(module, name, child.lineno, local))
                visit(child, inner)

        visit(tree, False)
    return sites


def graph(repo: Path = REPO) -> dict[str, set[str]]:
    """``{module: modules it executes directly}``, parent packages' ``__init__`` included."""
    files = module_files(repo)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for s in import_sites(repo):
        parts = s.imported.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in files and target != s.importer:
                edges[s.importer].add(target)
    for m in files:  # running dgh.x.y first runs its parent packages
        parts = m.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in files:
                edges[m].add(parent)
    return edges


def closure(start: str, repo: Path = REPO) -> set[str]:
    """Every module that running ``start`` (``python -m start``) executes, ``start`` included."""
    edges = graph(repo)
    seen = {start}
    todo = [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def closure_files(start: str, repo: Path = REPO) -> set[str]:
    """:func:`closure` as repo-relative POSIX file paths (``dgh/io.py``)."""
    files = module_files(repo)
    return {files[m].relative_to(repo).as_posix() for m in closure(start, repo)}


def cycles(repo: Path = REPO) -> list[list[str]]:
    """The import cycles between modules: strongly connected components of more than one module (Tarjan), from
    the explicit imports only (a parent package's ``__init__`` importing its own children is not counted)."""
    files = module_files(repo)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for s in import_sites(repo):
        if s.imported != s.importer:
            edges[s.importer].add(s.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out
