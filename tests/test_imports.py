"""The import graph of ``lit_mllm``: no cycle, and nothing below the command line imports it back.

Every module's imports are read with ``ast`` (module level and inside functions; ``if TYPE_CHECKING:`` blocks
are skipped, they never run). An import names the module it loads: ``from . import x`` is resolved against the
importer's package, ``from lit_mllm.a import b`` counts as ``lit_mllm.a.b`` when ``b`` is a submodule, else as
``lit_mllm.a``. Importing ``lit_mllm.a.b`` also runs ``lit_mllm/a/__init__.py`` first, so it adds an edge to
``lit_mllm.a`` unless the importer lives inside ``lit_mllm.a`` (then that package is already being imported). A
package's ``__init__`` importing its own submodules is an ordinary edge; a submodule importing its parent
package back closes a cycle, as it does at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lit_mllm

PACKAGE_DIR = Path(lit_mllm.__file__).resolve().parent
# The only modules allowed to import the command line (lit_mllm.cli / lit_mllm.commands).
COMMAND_LINE = ("lit_mllm.cli", "lit_mllm.commands", "lit_mllm.__main__", "lit_mllm.ablate")
"""The command line and what sits on it: ``lit_mllm.ablate`` checks a study's arms with ``fit``'s own parser and
runs them as ``fit`` processes, so it may import the commands; nothing below may import any of these."""

Edge = tuple[str, int]  # (imported module, line of the import)


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` file of the package at ``root`` (``__init__`` names its package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> list[Edge]:
    """The modules of ``package`` that importing module ``name`` (file ``path``) loads, with line numbers."""
    is_pkg = path.name == "__init__.py"
    own_package = name if is_pkg else name.rpartition(".")[0]
    targets: list[Edge] = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = own_package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            named = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in named:
            if target != package and not target.startswith(package + "."):
                continue
            while target not in modules:  # `import lit_mllm.a.b.C`-like names: the longest module prefix
                target = target.rpartition(".")[0]
            targets.append((target, node.lineno))
    edges: list[Edge] = []
    inside = set(_ancestors(name)) | {name}
    for target, line in targets:
        for mod in [*_ancestors(target), target]:  # parent packages' __init__ run first
            if mod in modules and mod not in inside and mod != name:
                edges.append((mod, line))
    return edges


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """Module -> {imported module: first line importing it}, within ``package``."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        graph[name] = {}
        for target, line in imports_of(name, path, modules, package):
            graph[name][target] = min(line, graph[name].get(target, line))
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component with more than one module."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion depth is bounded by it
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
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
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:  # shortest way back to the component's first module, by breadth-first search
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = paths[v] + [start]
                        break
                    if w in comp and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found)
    return cycles


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


# -- the checker on a made-up package ----------------------------------------------------------------------------
def test_checker_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import f\n")  # package -> child: fine
    (pkg / "sub" / "a.py").write_text("def f():\n    from .. import b\n")
    (pkg / "b.py").write_text("from pkg.sub import a\n")  # `a` is a submodule: an edge to pkg.sub.a
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.a": 1}
    assert graph["pkg.sub.a"] == {"pkg.b": 2}
    assert graph["pkg.b"] == {"pkg.sub": 1, "pkg.sub.a": 1}  # pkg/sub/__init__ runs before pkg.sub.a
    assert graph["pkg.c"] == {}
    assert find_cycles(graph) == [["pkg.b", "pkg.sub.a", "pkg.b"]]


def test_checker_counts_a_child_importing_its_parent_package():
    graph = {"p": {"p.a": 1}, "p.a": {"p": 3}}
    assert find_cycles(graph) == [["p", "p.a", "p"]]


def test_checker_allows_siblings_and_the_package_importing_its_children(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import x\nfrom pkg.b import y\n")
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("from pkg.a import x as y\n")  # its own package is already being imported
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.b"] == {"pkg.a": 1}
    assert find_cycles(graph) == []


# -- lit_mllm ------------------------------------------------------------------------------------------------------
def test_the_graph_is_read():
    graph = import_graph(PACKAGE_DIR, "lit_mllm")
    assert "lit_mllm.nn.connectors" in graph["lit_mllm.lit.prefix"]
    assert "lit_mllm.training.checkpoints" in graph["lit_mllm.lit.staged"]
    assert "lit_mllm.data.layouts" in graph["lit_mllm.training.export"]  # imported inside a function
    assert "lit_mllm.commands.lightning" in graph["lit_mllm.commands.describe"]


def test_no_import_cycle_in_lit_mllm():
    graph = import_graph(PACKAGE_DIR, "lit_mllm")
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_nothing_below_the_command_line_imports_it():
    graph = import_graph(PACKAGE_DIR, "lit_mllm")

    def command_line(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in COMMAND_LINE)

    back = [
        f"{name} (line {line}) imports {target}"
        for name, targets in graph.items()
        if not command_line(name)
        for target, line in targets.items()
        if command_line(target)
    ]
    assert not back, "\n".join(back)


# -- lazy commands -----------------------------------------------------------------------------------------------
def imported_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter running ``code`` (which may exit through --help)."""
    script = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('\\nMODULES', ' '.join(sorted(sys.modules))))\n" + code
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE_DIR.parent
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("MODULES ")]
    assert line, done.stderr
    return set(line[-1].split()[1:])


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """Every module of the graph that importing ``start`` may load (function-level imports included)."""
    seen, todo = {start}, [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_command_table_loads_no_command_and_no_torch():
    loaded = imported_after("from lit_mllm.cli import run\nrun(['--help'])")
    assert "lit_mllm.cli" in loaded
    heavy = {"torch", "lightning", "jsonargparse", "transformers", "lit_mllm.commands"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_the_data_command_never_loads_the_model_families():
    graph = import_graph(PACKAGE_DIR, "lit_mllm")
    assert reachable(graph, "lit_mllm.cli") == {"lit_mllm.cli"}  # commands are imported by name, when run
    loads = reachable(graph, "lit_mllm.commands.data")
    assert "lit_mllm.data.shapesworld" in loads
    assert not {
        m for m in loads if m.startswith(("lit_mllm.lit", "lit_mllm.training", "lit_mllm.commands."))
    } - {"lit_mllm.commands.data"}


def test_checkpoints_import_no_family():
    """safe_globals finds the families' dataclasses from LightningModule subclasses, not by importing them."""
    graph = import_graph(PACKAGE_DIR, "lit_mllm")
    assert not {m for m in reachable(graph, "lit_mllm.training.checkpoints") if m.startswith("lit_mllm.lit")}
