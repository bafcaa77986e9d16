"""Typing is part of the API: mypy checks tests/typing/ against the package."""

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent


# With the project's mypy cache (as test_docs.py's mypy run): ``mypy --strict`` of src
# (scripts/check) has already checked iambus itself, and a cached module's errors are
# reported again, so only the files here are checked anew (7 s less, twice, per run).
def test_assert_type_checks_pass():
    stdout, stderr, status = api.run(["--strict", str(HERE / "typing")])
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
    stdout, _, status = api.run(["--strict", str(bad)])
    assert status == 1
    assert 'Incompatible return value type (got "int", expected "str")' in stdout
