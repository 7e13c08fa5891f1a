#!/usr/bin/env python3
"""The code's shape, from the source alone (nothing is imported): the import graph between the
layers and the longest functions.

    python scripts/code_shape.py                 # this checkout
    python scripts/code_shape.py --root OTHER    # another checkout (an older commit, say)

The layers, lowest first: kernels (``opt_core.kernels``), model (the rest of ``opt_core`` that a
trainer touches: functional, layers, model, optim, amp, hf, ...), dist (``opt_core.dist``),
trainer (``opt_core.train``).  A module may import its own layer or a lower one, and no modules
may import each other in a cycle; imports inside functions count (a lazy import hides a cycle, it
does not remove it).  Exit status 1 when a rule is broken.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# folder in the repository -> the import package it is installed as
FOLDERS = {"opt_core": "opt_core", "kernels": "opt_core.kernels", "dist": "opt_core.dist"}
LAYERS = ("kernels", "model", "dist", "trainer")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1][:-3]
    name = ".".join(parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def canonical(name: str) -> str:
    """An import of the old top-level names (``kernels.x``, ``dist.x``) as the package it means."""
    head = name.split(".")[0]
    return f"opt_core.{name}" if head in ("kernels", "dist") else name


def layer(module: str) -> str | None:
    if module.startswith("opt_core.kernels"):
        return "kernels"
    if module.startswith("opt_core.dist"):
        return "dist"
    if module == "opt_core.train" or module.startswith(("opt_core.train.", "opt_core.trainer")):
        return "trainer"
    if module.startswith("opt_core.") or module == "opt_core":
        return "model"
    return None


def sources(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for folder in FOLDERS for p in sorted((root / folder).rglob("*.py"))}


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (``from pkg import name`` counts ``pkg.name`` when that
    is a module of ours, else ``pkg``)."""
    mods = sources(root)
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [canonical(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                base = canonical(node.module)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in mods and n != mod}
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one (``opt_core/__init__``'s lazy exports excluded)."""
    bad = []
    for mod, deps in sorted(graph.items()):
        if mod == "opt_core":
            continue
        for dep in sorted(deps):
            if dep != "opt_core" and LAYERS.index(layer(dep)) > LAYERS.index(layer(mod)):
                bad.append(f"{mod} ({layer(mod)}) -> {dep} ({layer(dep)})")
    return bad


def layer_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    edges: dict[tuple[str, str], int] = {}
    for mod, deps in graph.items():
        if mod == "opt_core":
            continue
        for dep in deps:
            if dep != "opt_core" and layer(dep) != layer(mod):
                key = (layer(mod), layer(dep))
                edges[key] = edges.get(key, 0) + 1
    return edges


def longest_functions(root: Path, top: int) -> list[tuple[int, str]]:
    found = []
    for mod, path in sources(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = parser.parse_args(argv)
    graph = import_graph(args.root)
    print("import graph between layers (module-level and in-function imports; edges = module pairs):")
    for (a, b), n in sorted(layer_edges(graph).items(), key=lambda e: (LAYERS.index(e[0][0]), LAYERS.index(e[0][1]))):
        print(f"  {a:>8} -> {b:<8} {n}")
    found_cycles, upward = cycles(graph), upward_imports(graph)
    for c in found_cycles:
        print("  CYCLE: " + " <-> ".join(c))
    for u in upward:
        print("  UPWARD: " + u)
    print(f"cycles: {len(found_cycles)}, upward imports: {len(upward)}")
    print("\nlongest functions (lines):")
    for n, where in longest_functions(args.root, args.top):
        print(f"  {n:4d}  {where}")
    return 1 if found_cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
