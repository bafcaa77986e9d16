"""In-process throughput of iambus next to a direct call and other libraries.

    bash benchmarks/setup.sh                         # once: venv, peers, seed
    .venv-bench/bin/python benchmarks/inprocess.py   # full run, about a minute
    .venv-bench/bin/python benchmarks/inprocess.py --quick   # smoke run, seconds

Prints a markdown table: for every scenario (rows) and implementation
(columns) the median throughput over several rounds and its ratio to the
direct call measured in the same run.  Everything runs in one process on one
event loop; within a round the implementations take turns (in rotating order),
so drifts of the machine hit them alike.  The scenarios and the way each
library is driven are described in benchmarks/peers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import peers
from peers import ANSWER, BATCH, FANOUT, Op, Peer, Tally
from report import cpu_model, format_ratio, humanize, short_error

SCENARIOS: list[tuple[str, str, int]] = [
    # (key, description, messages per operation)
    ("S1", "query round trip", 1),
    ("S2", f"event to {FANOUT} handlers", 1),
    ("S3", "command -> event -> handler", 1),
    ("S4", f"{BATCH:,} concurrent queries (gather), queries/s", BATCH),
    ("S1+mw", "S1 through 1 no-op middleware", 1),
]
UNITS = {key: per_op for key, _, per_op in SCENARIOS}


@dataclass
class Settings:
    rounds: int
    round_seconds: float  # time spent per cell and round
    calibrate_seconds: float  # minimum length of the warm-up batch


@dataclass
class Cell:
    op: Op | None = None
    status: str = "ok"  # ok | n/a | error
    note: str = ""  # footnote explaining n/a or error
    per_round: int = 0  # operations per timed round
    rates: list[float] = field(default_factory=list)  # operations per second

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


async def check(key: str, op: Op, tally: Tally) -> None:
    """Run op once and make sure it reached its handlers."""
    before = tally.n
    result = await asyncio.wait_for(op(), timeout=10)  # a mis-wired peer must not hang
    grew = tally.n - before

    def is_answer(value: object) -> bool:
        return value == ANSWER or getattr(value, "value", None) == ANSWER

    if key == "S1" and not is_answer(result):
        raise AssertionError(f"S1 returned {result!r}, expected {ANSWER}")
    if key == "S2" and grew != FANOUT:
        raise AssertionError(f"S2 ran {grew} of {FANOUT} event handlers")
    if key == "S3" and grew != 1:
        raise AssertionError(f"S3: event handler ran {grew} times, expected once")
    if key == "S4" and not (len(result) == BATCH and all(map(is_answer, result))):
        raise AssertionError("S4 did not return the answer for every query")
    if key == "S1+mw" and not (is_answer(result) and grew == 1):
        raise AssertionError(f"S1+mw returned {result!r}, middleware ran {grew} times")


async def settle() -> None:
    """Let stray background tasks (e.g. queue workers) finish between runs."""
    for _ in range(3):
        await asyncio.sleep(0)


async def timed(op: Op, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await op()
    return time.perf_counter() - start


async def calibrate(op: Op, settings: Settings) -> int:
    """Warm up with growing batches; return the batch size for one round."""
    n = 1
    while True:
        elapsed = await timed(op, n)
        if elapsed >= settings.calibrate_seconds:
            break
        n *= 2
    await settle()
    return max(1, round(n / elapsed * settings.round_seconds))


async def run(
    settings: Settings, only: set[str] | None = None
) -> tuple[list[Peer], dict[tuple[str, str], Cell]]:
    tally = Tally()
    built: list[Peer] = []
    cells: dict[tuple[str, str], Cell] = {}
    for name, build in peers.BUILDERS:
        if only is not None and name not in only:
            continue
        try:
            peer = await build(tally)
        except Exception as exc:  # a broken peer must not stop the others
            peer = Peer(name=name, version="?")
            for key, _, _ in SCENARIOS:
                note = f"{name} could not be set up: {short_error(exc)}"
                cells[key, name] = Cell(status="error", note=note)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        else:
            for key, _, _ in SCENARIOS:
                if key in peer.na:
                    cells[key, name] = Cell(status="n/a", note=f"{name}, {key}: {peer.na[key]}")
                elif key not in peer.ops:
                    cells[key, name] = Cell(status="n/a", note=f"{name}, {key}: not wired")
                else:
                    cells[key, name] = Cell(op=peer.ops[key])
        built.append(peer)

    # Check every cell once, then warm it up and size its rounds.
    for (key, name), cell in cells.items():
        if cell.op is None:
            continue
        try:
            await check(key, cell.op, tally)
            await settle()
            cell.per_round = await calibrate(cell.op, settings)
        except Exception as exc:
            cell.status, cell.note, cell.op = "error", f"{name}, {key}: {short_error(exc)}", None
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        await settle()

    names = [peer.name for peer in built]
    for round_no in range(settings.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for key, _, _ in SCENARIOS:
            for name in order:
                cell = cells[key, name]
                if cell.op is None:
                    continue
                gc.collect()
                try:
                    elapsed = await timed(cell.op, cell.per_round)
                except Exception as exc:
                    cell.status, cell.op = "error", None
                    cell.note = f"{name}, {key}: {short_error(exc)}"
                    continue
                cell.rates.append(cell.per_round / elapsed)
                await settle()

    for peer in built:
        if peer.close is not None:
            try:
                await peer.close()
            except Exception as exc:
                print(f"warning: closing {peer.name} failed: {short_error(exc)}", file=sys.stderr)
    return built, cells


def render(
    built: list[Peer], cells: dict[tuple[str, str], Cell], settings: Settings, loop_name: str
) -> str:
    lines = [
        "# iambus in-process benchmark",
        "",
        f"- Python {platform.python_version()} ({platform.python_implementation()}) "
        f"on {platform.platform()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)",
        f"- event loop: asyncio, {loop_name}",
        "- versions: " + ", ".join(f"{p.name} {p.version}" for p in built if p.name != "direct"),
        f"- median of {settings.rounds} rounds of ~{settings.round_seconds * 1000:.0f} ms per cell;"
        " cell = operations/s (ratio to direct in the same row; 1.00x = as fast as direct)",
        "",
    ]
    footnotes: list[str] = []

    def footnote(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    header = ["scenario", *[p.name for p in built]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(built)) + "|")
    for key, description, per_op in SCENARIOS:
        direct = cells.get((key, "direct"))
        base = direct.median * per_op if direct and direct.status == "ok" else None
        row = [f"{key}: {description}"]
        for peer in built:
            cell = cells[key, peer.name]
            if cell.status != "ok" or not cell.rates:
                row.append(f"{cell.status} {footnote(cell.note)}")
                continue
            rate = cell.median * per_op
            ratio = f" ({format_ratio(rate / base)})" if base else ""
            row.append(f"{humanize(rate)}{ratio}")
        lines.append("| " + " | ".join(row) + " |")

    notes = [note for peer in built for note in peer.notes]
    notes.append(
        f"S4 counts queries: each operation gathers {BATCH:,} queries. Handlers are async "
        "and trivial (return a constant / bump a counter); messages are built once and reused."
    )
    lines.append("")
    lines += [f"{i}. {text}" for i, text in enumerate(footnotes, 1)]
    if footnotes:
        lines.append("")
    lines.append("Notes:")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few, short rounds")
    parser.add_argument("--rounds", type=int, help="number of timed rounds")
    names = [name for name, _ in peers.BUILDERS]
    parser.add_argument(
        "--only",
        help=f"comma-separated implementations to run (default: all of {','.join(names)})",
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= set(names):
        parser.error(f"--only: unknown {sorted(only - set(names))}; choose from {names}")
    if args.quick:
        settings = Settings(rounds=3, round_seconds=0.01, calibrate_seconds=0.002)
    else:
        settings = Settings(rounds=9, round_seconds=0.15, calibrate_seconds=0.05)
    if args.rounds:
        settings.rounds = args.rounds

    async def go() -> str:
        loop = asyncio.get_running_loop()
        loop_name = f"{type(loop).__module__}.{type(loop).__qualname__}"
        built, cells = await run(settings, only)
        return render(built, cells, settings, loop_name)

    print(asyncio.run(go()))


if __name__ == "__main__":
    main()
