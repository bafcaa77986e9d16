"""The benchmark scripts keep working (smoke runs; speed is never asserted in tests)."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "inprocess.py"
# The Kafka broker the smoke run of benchmarks/broker.py uses (host:port).
KAFKA = os.environ.get("IAMBUS_BENCH_KAFKA", "127.0.0.1:9092")
RATE = r"[\d.]+[kMG]? \([\d.]+x\)"


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


def _kafka_missing() -> str | None:
    if importlib.util.find_spec("aiokafka") is None:
        return "aiokafka is not installed"
    host, _, port = KAFKA.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return None
    except OSError as exc:
        return f"no Kafka broker at {KAFKA} ({exc}); set IAMBUS_BENCH_KAFKA=host:port"


@pytest.mark.timeout(240)  # consumer groups join slowly on the test broker (docs/kafka.md)
def test_kafka_broker_benchmark_runs_raw_and_iambus() -> None:
    if (missing := _kafka_missing()) is not None:
        pytest.skip(missing)
    script = SCRIPT.parent / "broker.py"
    only = "raw,iambus-keyed"  # (both measurements; the unkeyed column works the same way)
    if importlib.util.find_spec("faststream") is not None:
        only += ",faststream"
    options = ["--broker", "kafka", "--kafka-url", KAFKA, "--quick", "--only", only]
    result = subprocess.run(
        [sys.executable, str(script), *options, "--messages", "300", "--slow-messages", "100"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        line.split("|")[1].strip().split(",")[0]: [c.strip() for c in line.strip("|").split("|")]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "msgs/s" in line
    }
    header = next(line for line in result.stdout.splitlines() if line.startswith("| measurement"))
    names = [c.strip() for c in header.strip("|").split("|")[1:]]
    throughput, slow = rows["end-to-end acked throughput"][1:], rows["handler waits 1 ms"][1:]
    cells = dict(zip(names, zip(throughput, slow, strict=True), strict=True))
    assert re.fullmatch(r"[\d.]+[kMG]? \(1\.00x\)", cells["raw"][0]), cells
    assert re.fullmatch(r"[\d.]+[kMG]? \(1\.00x\)", cells["raw"][1]), cells
    if "faststream" in cells:
        assert re.fullmatch(RATE, cells["faststream"][0]), cells
        assert re.fullmatch(RATE, cells["faststream"][1]), cells
    for cell in cells["iambus-keyed"]:  # measured and checked (handled, committed, in order)
        assert re.fullmatch(RATE, cell), cells
