"""The house rules the import graph must keep (docs/architecture.md): no module imports itself back
through others, and the car's runtime/ imports nothing from the workstation side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "calib", "jetson", "bench", "miniature")


def module_imports() -> dict[str, set[str]]:
    """{module: project modules it imports}, function-level (lazy) imports included."""
    modules = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = f
    edges = {}
    for name, f in modules.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        edges[name] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def test_no_module_imports_itself_back():
    assert cycles(module_imports()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_the_cars_runtime_imports_nothing_from_the_workstation_side():
    """runtime/ runs on the Jetson without torch: no export/, calib/, bench/, jetson/ or miniature/ module.
    The PyTorch backend (export.torch_backend) is a plugin the runtime finds through an entry point."""
    outside = {m: sorted(t for t in ts if t.split(".")[0] != "runtime")
               for m, ts in module_imports().items() if m.split(".")[0] == "runtime"}
    assert {m: ts for m, ts in outside.items() if ts} == {}


def test_an_unregistered_plugin_backend_is_a_clear_error(monkeypatch):
    import importlib.metadata

    from runtime.backends import plugin
    from runtime.errors import LladaVError

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(LladaVError, match="backend pytorch: no plugin registered under the entry point group "
                                          "'lladav_edge.backends'.*reinstall it with pip install -e ."):
        plugin("pytorch")


def test_no_function_is_longer_than_fifty_lines():
    """Short functions (the house style): every function of the packages, nested ones included."""
    long = []
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_no_module_shadows_the_standard_library():
    """`python jetson/latency.py` puts jetson/ first on sys.path: a module there named like a standard
    library one (profile, once) would replace it for everything the script imports."""
    import sys

    shadows = [str(f.relative_to(ROOT)) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")
               if f.stem in sys.stdlib_module_names]
    assert shadows == []
