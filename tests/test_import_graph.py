"""No import cycles among fusedgrad's modules.

A cycle means two modules each hold something the other needs, so neither can be read, tested or
moved on its own (``fusedgrad.torch`` and ``fusedgrad.distributed`` were one such pair, and
``cuda/_arrays.py`` and ``cuda/_reduce.py`` another). The graph is read from the source with
``ast``, so nothing is imported: every ``import`` and ``from ... import`` statement counts, at
module level and inside functions alike (a function-level import is a cycle that merely waits
for its first call). Imports through ``importlib`` (the lazy attribute access of
``fusedgrad/__init__.py``, ``fusedgrad._device.backend``) are not statements and are not counted.
"""
from __future__ import annotations

import ast
import pathlib

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src" / "fusedgrad"


def _module_names(root: pathlib.Path) -> dict:
    """``{dotted module name: path}`` for every ``.py`` file of the package under ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("fusedgrad",) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: pathlib.Path, modules: dict) -> set:
    """The package's modules that ``module`` (at ``path``) imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # "from package import name" imports the submodule package.name when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = SOURCE) -> dict:
    """``{module: set of the package's modules it imports}``."""
    modules = _module_names(root)
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict) -> list:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict, component: set) -> list:
    """A closed path through ``component``, found by walking its edges from its first module."""
    start = min(component)
    path, seen = [start], {start: 0}
    while True:
        succ = min(s for s in graph[path[-1]] if s in component)
        if succ in seen:
            return path[seen[succ]:] + [succ]
        seen[succ] = len(path)
        path.append(succ)


def test_no_import_cycles_among_fusedgrad_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, written relatively,
    is found; the same modules without it are not a cycle."""
    package = tmp_path / "fusedgrad"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    graph = import_graph(package)
    assert graph["fusedgrad.a"] == {"fusedgrad.sub.b"}
    assert graph["fusedgrad.sub.b"] == {"fusedgrad.a"}
    assert find_cycles(graph) == [["fusedgrad.a", "fusedgrad.sub.b", "fusedgrad.a"]]
    (package / "sub" / "b.py").write_text("import numpy\n")
    assert find_cycles(import_graph(package)) == []
