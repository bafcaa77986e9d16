"""The benchmark script keeps working (a smoke run; speed is never asserted in tests)."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "inprocess.py"


def test_inprocess_benchmark_runs_every_scenario_for_iambus():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "direct,iambus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| S\d", line)]
    assert [row.split(":")[0] for row in rows] == ["| S1", "| S2", "| S3", "| S4", "| S1+mw"]
    for row in rows:
        direct, ours = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert re.fullmatch(r"[\d.]+[kMG]? \(1\.00x\)", direct), row
        assert re.fullmatch(r"[\d.]+[kMG]? \([\d.]+x\)", ours), row


def test_unknown_implementation_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown ['nope']" in result.stderr


def test_memory_benchmark_prints_every_row() -> None:
    script = SCRIPT.parent / "memory.py"
    result = subprocess.run(
        [sys.executable, str(script), "--n", "2000"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 4, result.stdout
    assert rows[0].split("|")[3].strip() == "1.00x"
