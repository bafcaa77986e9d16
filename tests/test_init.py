"""The public surface: what `import iambus` gives, and what it does not do."""

import subprocess
import sys
import warnings

import iambus


def test_all_is_sorted_and_complete():
    assert iambus.__all__ == sorted(iambus.__all__)
    public = {
        name
        for name, value in vars(iambus).items()
        if not name.startswith("_") and not isinstance(value, type(iambus))
    }
    assert public == set(iambus.__all__) - {"__version__"}


def test_everything_in_all_is_importable():
    for name in iambus.__all__:
        assert getattr(iambus, name) is not None, name


def test_import_does_no_work_and_imports_no_drivers():
    code = (
        "import sys, threading, iambus\n"
        "heavy = {'redis', 'aio_pika', 'aiormq', 'nats', 'pydantic', 'msgspec', 'asyncpg'}\n"
        "print(sorted(heavy & set(sys.modules)), threading.active_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] 1"


def test_pybus_is_a_deprecated_alias():
    sys.modules.pop("pybus", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import pybus
    assert [w.category for w in caught] == [FutureWarning]
    assert "import 'iambus' instead" in str(caught[0].message)
    assert pybus.Dispatcher is iambus.Dispatcher
    assert pybus.dispatcher is iambus.dispatcher
    assert pybus.Singleton is iambus.Singleton
    import pybus.routers  # a submodule is the very iambus module, not a copy

    assert pybus.routers is sys.modules["iambus.routers"]


def test_every_module_has_its_docs_page_and_test_file():
    from pathlib import Path

    root = Path(__file__).parent.parent
    modules = sorted(
        p.stem for p in (root / "src" / "iambus").glob("*.py") if not p.stem.startswith("__")
    )
    assert "dispatching" in modules
    missing = [
        path
        for name in modules
        for path in (f"docs/{name}.md", f"tests/test_{name}.py")
        if not (root / path).exists()
    ]
    assert missing == []


def _doc_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every ``from iambus... import name`` in README.md and docs/."""
    import ast

    from .test_docs import doc_files, python_blocks

    found = []
    for path in doc_files():
        for block in python_blocks(path):
            flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            try:
                tree = compile(block.code, str(path), "exec", flags=flags)
            except SyntaxError:
                if block.skipped:  # a "# not run" fragment need not be a whole program
                    continue
                raise
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iambus"):
                    found.extend((path.name, node.module or "", alias.name) for alias in node.names)
    return found


def test_the_docs_import_only_exported_names_from_iambus():
    imports = _doc_imports()
    assert len({name for _, module, name in imports if module == "iambus"}) > 10  # found them
    missing = sorted(
        {f"{name} ({file})" for file, module, name in imports if module == "iambus"}
        - {f"{name} ({file})" for file, _, name in imports if name in iambus.__all__}
    )
    assert missing == [], "the docs import these from iambus, which does not export them"


def test_the_docs_import_everyday_names_from_iambus_itself():
    # A name iambus exports is imported from iambus in the docs, not from its module, so
    # the docs show one way (and a name they need from a module is a candidate to export).
    roundabout = sorted(
        f"{file}: from {module} import {name}"
        for file, module, name in _doc_imports()
        if module != "iambus" and name in iambus.__all__
    )
    assert roundabout == []


def _module_imports() -> dict[str, set[str]]:
    """Each module of the package, with the package modules it imports anywhere: at the
    top, inside functions, and under ``if TYPE_CHECKING:`` (a cycle there still ties the
    modules together for a reader and for mypy)."""
    import ast
    from pathlib import Path

    package = Path(iambus.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").exists()
    }
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                imported.update(name.split(".")[0] for name in names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iambus."):
                imported.add((node.module or "").split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(
                    a.name.split(".")[1] for a in node.names if a.name.startswith("iambus.")
                )
        graph[path.stem] = imported & modules - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (its modules in import order, the first repeated), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            found = visit(imported, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


def test_the_modules_import_one_another_without_cycles():
    graph = _module_imports()
    # The modules a message passes through: dependencies point one way, from the
    # dispatcher down (docs/routes.md), never back.
    assert graph["dispatching"] >= {"routes", "routers", "worker", "remote", "unit_of_work"}
    assert "dispatching" not in graph["worker"] | graph["routers"] | graph["routes"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
