"""The house rule: subpackages import downward only, and no module imports itself in a circle.

Every ``import`` counts, those inside functions too (a lazy import is still an arrow). The order,
lowest first, is the flow of ``docs/architecture.md``; ``saediff/__init__.py`` (the lazy facade)
and ``__main__`` stand above it all.
"""

from __future__ import annotations

import ast
from pathlib import Path

from saediff import LAYERS

PACKAGE = Path(__file__).resolve().parents[1] / "saediff"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the saediff modules it imports (a package import counts as its ``__init__``)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in paths] or [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in paths and t != name}
        graph[name] = deps
    return graph


def layer(module: str) -> str | None:
    """The layer a module belongs to; None for the facade and ``__main__``, which stand above all."""
    parts = module.split(".")
    if module in ("saediff", "saediff.__main__"):
        return None
    if len(parts) == 2:
        return "core" if parts[1] not in LAYERS else parts[1]
    return parts[1]


def test_subpackages_import_downward_only():
    upward = []
    for src, deps in import_graph().items():
        if layer(src) is None:
            continue
        for dst in deps:
            if dst == "saediff":
                continue  # ``from saediff import __version__``: the facade's constant, no module
            if layer(dst) is None or LAYERS.index(layer(dst)) > LAYERS.index(layer(src)):
                upward.append(f"{src} -> {dst}")
    assert not upward, "imports against the flow:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v] - {"saediff"}:
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
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_only_cli_and_stories_import_stories():
    offenders = [
        f"{src} -> {dst}"
        for src, deps in import_graph().items()
        for dst in deps
        if layer(dst) == "stories" and layer(src) not in ("stories", "cli", None)
    ]
    assert not offenders, offenders


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"
        if init.parent.name in LAYERS:
            assert "import" in doc, f"{init}: say what the subpackage may import"


def test_the_layering_check_sees_lazy_imports(tmp_path):
    """The check would fail if it missed an import inside a function body."""
    src = "def f():\n    from saediff.stories.organism import world\n    return world\n"
    found = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module)
    assert found == {"saediff.stories.organism"}
    assert layer("saediff.stories.organism.world") == "stories" and layer("saediff.errors") == "core"
