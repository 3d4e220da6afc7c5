"""No module of the package imports another that imports it back (module-level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import splitveil

ROOT = Path(splitveil.__file__).parent


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("splitveil",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(stem + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges[name] |= {target for target in targets if target in modules and target != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: the layer order of docs/architecture.md, highest first: a package imports only packages after it (and `metrics`)
LAYERS = ["cli", "experiments", "harness", "attack", "protect", "diffusion", "edge", "tee", "serve", "transport", "wire",
          "plan", "train", "data", "models", "metrics", "core"]


def test_every_import_follows_the_layer_order():
    against = set()
    for module, targets in import_graph().items():
        package = module.split(".")[1] if "." in module else None
        for target in targets:
            other = target.split(".")[1] if "." in target else None
            if package in LAYERS and other in LAYERS and other != package and other != "metrics" \
                    and LAYERS.index(other) < LAYERS.index(package):
                against.add(f"{module} -> {target}")
    assert sorted(against) == []
    assert set(LAYERS) == {path.name for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
