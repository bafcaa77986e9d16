"""Every example under examples/ runs and does what it says."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

EXAMPLES = Path(__file__).parent.parent / "examples"

EXPECTED = {
    "books.py": [
        "on startup: library service ready",
        "storage: created",
        'create_book: stored "Philosopher\'s Stone"',
        'announce: new book "Philosopher\'s Stone" by J. K. Rowling',
        "query: found [Book(title=\"Philosopher's Stone\", author='J. K. Rowling', year=1997)]",
    ],
    "fastapi_app.py": [
        "main: POST /orders -> 201",
        "billing: invoiced order 1",
        "main: GET /orders/1/invoice -> INV-1 for 42.00 EUR",
        "main: POST /orders -> 422 order 2: nothing to pay",
        "billing: invoiced order 3",
        "main: GET /orders/3/invoice -> INV-3 for 15.00 EUR",
        "main: GET /orders/2/invoice -> 404",
        "main: orders in the database [1, 3]",
        "main: done; the schema and the namespace are gone",
    ],
    "outbox.py": [
        "orders: placed order 1",
        "billing: invoiced order 1: 42.00 EUR",
        "main: order 2: nothing to pay; rolled back, its event with it",
        "orders: placed order 3",
        "billing: invoiced order 3: 15.00 EUR",
        "main: orders [1, 3]",
        "main: invoices [1, 3]",
        "main: done; the schema and the namespace are gone",
    ],
    "two_services/main.py": [
        "main: sending PlaceOrder(order_id=1, amount_cents=4200) to orders",
        "orders: placed order 1; publishing OrderPlaced",
        "billing: invoiced order 1: INV-1 for 42.00 EUR",
        "main: orders answered OrderPlaced(order_id=1, amount_cents=4200)",
        "main: billing answered GetInvoice(order_id=1): INV-1 for 42.00 EUR",
        "main: both services stopped, and the run's keys deleted",
    ],
}
# The services an example needs (see conftest.require).
NEEDS = {
    "two_services/main.py": ("redis",),
    "outbox.py": ("redis", "postgres"),
    "fastapi_app.py": ("redis", "postgres"),
}


def test_every_example_is_checked():
    # single-file examples, and main.py of the examples that are a folder
    found = [*EXAMPLES.glob("*.py"), *EXAMPLES.glob("*/main.py")]
    assert sorted(p.relative_to(EXAMPLES).as_posix() for p in found) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    for service in NEEDS.get(name, ()):
        require(service)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED[name]
    assert result.stderr == ""
