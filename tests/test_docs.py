"""Run the ```python code blocks of README.md and docs/*.md.

Conventions for the documentation (see also docs/index.md, "About the examples"):

* Every block fenced as ```python is run. Blocks in other languages (```text,
  ```console, ...) are not.
* A ```python block whose first line is ``# not run`` (or ``# not run: why``) is skipped:
  use it for snippets that cannot run here (a signal handler for a whole program, code
  that needs a server, ``reveal_type``). Keep them rare; every docs page must have at
  least one block that runs (README.md may have none).
* The blocks of one file run in order, in one shared namespace, like one script: a later
  block may use the names an earlier block defined.
* Top-level ``await`` is allowed. Such a block runs in an event loop that the whole file
  shares; a block without ``await`` runs with no loop running (so it may call
  ``asyncio.run`` itself).
* Each file gets a fresh default dispatcher: ``iambus.dispatcher`` is replaced by a new
  ``Dispatcher()``, so ``from iambus import dispatcher as dp`` is not shared across files.
* The blocks also pass ``mypy --strict`` (``test_code_blocks_pass_mypy_strict``, with
  examples/): the runnable blocks of one file are checked together as one module (top-level
  ``await`` and ``async with`` allowed); a ``# not run`` block is checked as a module of
  its own. A block whose first line is ``# fragment`` (or ``# fragment: why``) is neither
  run nor checked: use it for a signature listing or a few lines that use names defined
  elsewhere, never for code a reader would copy as it is.

A failing block is reported with the file and the line where the block starts; the
traceback's line numbers are those of the Markdown file.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import iambus

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SKIP_MARKER = "# not run"
FRAGMENT_MARKER = "# fragment"

# An opening fence (optionally indented, e.g. inside a list item) with its info string,
# and the matching closing fence: same indentation, same or longer run of backticks.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first code line in the Markdown file
    code: str

    @property
    def skipped(self) -> bool:
        return self._marked(SKIP_MARKER) or self.fragment

    @property
    def fragment(self) -> bool:
        return self._marked(FRAGMENT_MARKER)

    def _marked(self, marker: str) -> bool:
        first = self.code.lstrip("\n").split("\n", 1)[0].strip()
        return first == marker or first.startswith(marker + ":")


def python_blocks(path: Path) -> list[Block]:
    """Every ```python block of ``path``, in order."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        language = opening["info"].strip().split(maxsplit=1)[0] if opening["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing is not None
                and closing["indent"] == indent
                and len(closing["ticks"]) >= len(ticks)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j])
            j += 1
        else:
            raise AssertionError(f"{path.name}:{i + 1}: code fence is never closed")
        if language == "python":
            code = textwrap.dedent("\n".join(body))
            blocks.append(Block(path, i + 2, code))
        i = j + 1
    return blocks


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    if README.exists():
        files.insert(0, README)
    return files


def run_blocks(path: Path, blocks: list[Block], module: types.ModuleType) -> None:
    namespace = module.__dict__
    with asyncio.Runner() as runner:
        for block in blocks:
            if block.skipped:
                continue
            # Pad with blank lines so that tracebacks point at the Markdown file's lines.
            source = "\n" * (block.line - 1) + block.code
            try:
                code = compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError as exc:
                raise AssertionError(f"{path.name}:{block.line}: {exc}") from exc
            try:
                if code.co_flags & inspect.CO_COROUTINE:
                    # With top-level await, eval() returns a coroutine: run it in the
                    # loop that every block of this file shares.
                    runner.run(eval(code, namespace))
                else:
                    exec(code, namespace)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                exc.add_note(f"in the ```python block at {path.name}:{block.line}")
                raise


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_code_blocks_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path)
    runnable = [b for b in blocks if not b.skipped]
    if path != README:
        assert runnable, (
            f"{path.name} has no runnable ```python block; every docs page needs at least "
            f"one, so that it stays tested"
        )

    # A fresh default dispatcher per file (and for the deprecated alias, if imported).
    fresh = iambus.Dispatcher()
    monkeypatch.setattr(iambus, "dispatcher", fresh)
    if "pybus" in sys.modules:
        monkeypatch.setattr(sys.modules["pybus"], "dispatcher", fresh)

    # Run the blocks as a real module, so that dataclasses, pickling and typing
    # introspection find the module of what the examples define.
    name = "iambus_docs_" + re.sub(r"\W", "_", path.stem)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, name, module)
    run_blocks(path, runnable, module)


def test_the_doc_files_are_found() -> None:
    names = {p.name for p in doc_files()}
    expected = {
        "index.md",
        "dispatching.md",
        "routers.md",
        "handlers.md",
        "providers.md",
        "middleware.md",
        "messages.md",
        "engine.md",
        "errors.md",
        "guarantees.md",
    }
    assert expected <= names, f"missing docs pages: {sorted(expected - names)}"


def test_block_parser_follows_the_conventions(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "\n"
        "```text\n"
        "not python\n"
        "```\n"
        "\n"
        "- a list item:\n"
        "\n"
        "  ```python\n"
        "  y = x + 1\n"
        "  ```\n"
        "\n"
        "```python\n"
        "# not run\n"
        "import does_not_exist\n"
        "```\n"
        "\n"
        "```python\n"
        "# not run: needs a server\n"
        "import does_not_exist\n"
        "```\n"
        "\n"
        "```python\n"
        "# not running this would be wrong\n"
        "w = 0\n"
        "```\n"
        "\n"
        "```python\n"
        "import asyncio\n"
        "await asyncio.sleep(0)\n"
        "z = y + 1\n"
        "```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skipped) for b in blocks] == [
        (4, "x = 1", False),
        (14, "y = x + 1", False),
        (18, "# not run\nimport does_not_exist", True),
        (23, "# not run: needs a server\nimport does_not_exist", True),
        (28, "# not running this would be wrong\nw = 0", False),
        (33, "import asyncio\nawait asyncio.sleep(0)\nz = y + 1", False),
    ]
    module = types.ModuleType("page")
    run_blocks(page, [b for b in blocks if not b.skipped], module)
    assert (module.y, module.z) == (2, 3)


# Top-level await and `async with` are how the docs read (the run test allows them).
MYPY = ["--strict", "--disable-error-code", "top-level-await", "--disable-error-code", "syntax"]


def typed_modules(path: Path, into: Path) -> dict[Path, Path]:
    """Write ``path``'s blocks as modules to check into ``into``: {module: Markdown file}.

    Blank lines pad each block to its line in the Markdown file, so that mypy's line
    numbers are the Markdown file's.
    """
    stem = "readme" if path == README else f"docs_{path.stem}"
    together: list[str] = []
    modules: dict[Path, Path] = {}
    for block in python_blocks(path):
        if block.fragment:
            continue
        if block.skipped:  # `# not run`: a module of its own
            alone = into / f"{stem}_line{block.line}.py"
            alone.write_text("\n" * (block.line - 1) + block.code + "\n", encoding="utf-8")
            modules[alone] = path
            continue
        together += [""] * (block.line - 1 - len(together))
        together += block.code.split("\n")
    if together:
        module = into / f"{stem}.py"
        module.write_text("\n".join(together) + "\n", encoding="utf-8")
        modules[module] = path
    return modules


@pytest.mark.timeout(180)  # a cold mypy cache on a loaded machine
def test_code_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    modules: dict[Path, Path] = {}
    for path in doc_files():
        modules.update(typed_modules(path, tmp_path))
    # One run for everything (fast, with the project's cache), examples/ included.
    command = [sys.executable, "-m", "mypy", *MYPY, "--explicit-package-bases"]
    done = subprocess.run(
        [*command, *map(str, modules), "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = done.stdout + done.stderr
    for module, path in modules.items():  # name the Markdown file, not the module
        report = report.replace(str(module), str(path.relative_to(ROOT)))
    assert done.returncode == 0, f"mypy --strict on the docs' code:\n{report}"


def test_a_fragment_is_neither_run_nor_checked(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx: int = 1\n```\n\n"
        "```python\n# fragment: a signature\nDispatcher(routes=...)\n```\n\n"
        "```python\n# not run\ny: int = 2\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    marks = [(b.skipped, b.fragment) for b in blocks]
    assert marks == [(False, False), (True, True), (True, False)]
    into = tmp_path / "typed"
    into.mkdir()
    modules = typed_modules(page, into)
    assert sorted(m.name for m in modules) == ["docs_page.py", "docs_page_line11.py"]
    assert (into / "docs_page.py").read_text() == "\nx: int = 1\n"  # at its Markdown line
