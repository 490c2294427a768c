"""The package's layers, checked from its source (``docs/architecture.md``).

* The import graph of ``captum_legrad`` has no cycle, counting every import: module level,
  function level, ``TYPE_CHECKING`` blocks, and the dynamic ones (the package root's lazy
  exports, the family registry's adapter and loader modules).
* Imports go from the outer tools to the library, never back; the computation
  (``captum_legrad._core``) knows no model family, no adapter and no public surface.
* The tests import no underscored name of the package: they use the public API or the
  documented internals (``captum_legrad.internals``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_legrad"
NAME = "captum_legrad"

#: Outer tools: they may import the library; the library never imports them.
OUTER = ("viz", "insights", "app", "cli", "eval", "data", "baselines")
#: The computation may import only itself, the contract and the errors.
CORE_MAY_IMPORT = ("_core", "spec", "errors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _imports(module: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """The package modules ``module`` imports, with line numbers (every import statement)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(NAME):
                    yield _closest(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not base.startswith(NAME):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else _closest(base, known)), node.lineno


def _closest(name: str, known: Set[str]) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _dynamic_edges(known: Set[str]) -> List[Tuple[str, str]]:
    """Imports made by name at run time."""
    import captum_legrad
    from captum_legrad.families import FAMILIES

    edges = [(NAME, f"{NAME}.{module}") for module in captum_legrad._EXPORTS.values()]
    for row in FAMILIES:
        edges.append((f"{NAME}.discovery", f"{NAME}.adapters.{row.adapter}"))
        if row.loader:
            edges.append((f"{NAME}.eval.models", row.loader.split(":")[0]))
    for _, target in edges:
        assert target in known, target
    return edges


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in _imports(name, path, known):
            if target != name and target in known:
                graph[name].add(target)
    for source, target in _dynamic_edges(known):
        if source != target:
            graph[source].add(target)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of ``graph`` (depth-first search), or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 40 and sum(len(v) for v in graph.values()) > 100  # the parse works
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_can_fail() -> None:
    """The search finds a cycle where there is one: attribution imports maps."""
    graph = _graph()
    graph[f"{NAME}._core.maps"].add(f"{NAME}.attribution")
    cycle = _find_cycle(graph)
    assert cycle is not None and f"{NAME}.attribution" in cycle


def test_imports_go_from_the_outer_tools_to_the_library() -> None:
    modules = _modules()
    known = set(modules)
    wrong = []
    for name, path in modules.items():
        layer = _layer(name)
        for target, line in _imports(name, path, known):
            target_layer = _layer(target)
            if layer not in OUTER and target_layer in OUTER:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if layer == "_core" and target != NAME and target_layer not in CORE_MAY_IMPORT:
                wrong.append(f"{path.relative_to(ROOT)}:{line} (the core) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_imports_inside_functions() -> None:
    source = "def f():\n    from ..viz import overlay\n"
    path = ROOT / "tests" / "_probe_layers.py"
    path.write_text(source)
    try:
        found = list(_imports(f"{NAME}._core.maps", path, set(_modules())))
    finally:
        path.unlink()
    assert (f"{NAME}.viz", 2) in found


def _underscored(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(NAME):
            if any(part.startswith("_") for part in node.module.split(".")):
                yield node.lineno, node.module
            for alias in node.names:
                if alias.name.startswith("_"):
                    yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(NAME) and any(
                    p.startswith("_") for p in alias.name.split(".")
                ):
                    yield node.lineno, alias.name


def test_tests_import_no_underscored_name() -> None:
    found = []
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 30
    for path in files:
        for line, name in _underscored(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not found, "\n".join(found)


def test_the_underscore_check_can_fail() -> None:
    source = "from captum_legrad._core.maps import finish\nfrom captum_legrad.x import _y\n"
    tree = ast.parse(source)
    assert [line for line, _ in _underscored(tree)] == [1, 2]
