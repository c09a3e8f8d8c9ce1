"""Import hygiene of the package: no import cycles (top-level *and* in-function imports
count: an import hidden in a function is still a dependency), and no module reaching into
another's private names.

The graph is read from the source with ``ast``, so it sees every import statement,
wherever it sits, without importing anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package's source lives (pyproject's package-dir).
PACKAGE_DIRS = {"structexport": ROOT / "structexport", "structexport.passes": ROOT / "passes",
                "structexport.targets": ROOT / "targets", "structexport.models": ROOT / "models"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "structexport" and parts and parts[0] in ("passes", "targets", "models"):
                continue  # not a folder of the package
            out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, []))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node, is_package)
            taken = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:        # `from pkg import module`
                    found.append((sub, node.lineno, []))
                else:
                    taken.append(alias.name)
            found.append((target, node.lineno, taken))
    return [(t, line, names) for t, line, names in found if t in known]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: set() for name in known}
    for name, path in known.items():
        for target, _line, _names in imports_of(name, path, known):
            # importing a.b.c runs a and a.b too, but those packages' __init__ are thin
            # re-exports here; the edge that matters is to the module itself.
            if target != name:
                edges[name].add(target)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_scanner_sees_in_function_imports_and_finds_a_cycle():
    # The checker itself must be able to fail: a two-module cycle through an in-function import.
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert find_cycles(edges) == [["a", "b"]]
    tree = ast.parse("def f():\n    from structexport.bench import run_bench\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))


def test_the_package_is_found():
    known = modules()
    for name in ("structexport.cli", "structexport.bench", "structexport.passes.infra",
                 "structexport.targets.base", "structexport.models.zoo"):
        assert name in known, name
    assert len(graph()["structexport.cli"]) > 3


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles (in-function imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_imports_a_private_name_of_another():
    known = modules()
    bad = []
    for name, path in known.items():
        for target, line, names in imports_of(name, path, known):
            for taken in names:
                if taken.startswith("_") and not taken.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {taken}")
        # module._private attribute access on an imported project module
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, path.name == "__init__.py")
                for alias in node.names:
                    if f"{target}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != name):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))
