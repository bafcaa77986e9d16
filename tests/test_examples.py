"""Every example under examples/ runs and does what it says."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"

EXPECTED = {
    "books.py": [
        "on startup: library service ready",
        "storage: created",
        'create_book: stored "Philosopher\'s Stone"',
        'announce: new book "Philosopher\'s Stone" by J. K. Rowling',
        "query: found [Book(title=\"Philosopher's Stone\", author='J. K. Rowling', year=1997)]",
    ],
}


def test_every_example_is_checked():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED[name]
    assert result.stderr == ""
