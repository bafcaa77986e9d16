"""Typing is part of the API: mypy checks tests/typing/ against the package."""

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent


def test_assert_type_checks_pass():
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir=/dev/null", str(HERE / "typing")]
    )
    assert status == 0, stdout + stderr


def test_a_wrong_result_type_is_caught(tmp_path: Path):
    # the checks above can fail: a query typed as returning int is not a str
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from iambus import Dispatcher, Query\n"
        "class Q(Query[int]): ...\n"
        "async def f(dp: Dispatcher) -> str:\n"
        "    result = await dp.query(Q())\n"
        "    return result\n"
    )
    stdout, _, status = api.run(["--strict", "--no-incremental", "--cache-dir=/dev/null", str(bad)])
    assert status == 1
    assert 'Incompatible return value type (got "int", expected "str")' in stdout
