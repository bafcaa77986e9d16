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
