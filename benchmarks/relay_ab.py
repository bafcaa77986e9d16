"""The relay of two trees in one process, taking turns with a direct publisher.

    .venv/bin/python benchmarks/relay_ab.py --before ../main/src                # NATS
    .venv/bin/python benchmarks/relay_ab.py --before ../main/src --broker redis --rounds 10

``outbox.py`` runs one tree; on a machine shared with other work its baseline moves from
run to run as much as a change does. This script imports the ``iambus`` package of
another tree (``--before``: its ``src``) beside this one, under the name
``iambus_before``, and measures in each round, in rotating order: the direct publisher
(the same envelopes through ``transport.send`` with 100 sends in flight), the relay of
the other tree and the relay of this one (``Relay(..., batch=1000).run_once()`` on rows
committed before the clock starts). It prints, per row kind, the medians of the rounds
with their ratios to the direct column, the process's CPU time per message, and the mean
number of sends under way (sampled every 0.5 ms), which shows how well a relay keeps the
broker busy. Needs PostgreSQL and the broker on loopback; a schema and a broker
namespace of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import itertools
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from broker import check_loopback
from outbox import BROKER_URLS, DSN, IN_FLIGHT, row_writer, write_rows

from iambus import Envelope
from iambus.database import Database
from iambus.outbox import ROW_COLUMNS, envelope_of
from iambus.relay import Relay
from iambus.transports import connect


class Counting:
    """A transport's ``send`` that counts the sends under way (every column uses one)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.url = transport.url
        self.now = 0

    async def send(self, address: str, envelope: Envelope) -> None:
        self.now += 1
        try:
            await self.transport.send(address, envelope)
        finally:
            self.now -= 1


Figures = tuple[float, float, float]
"""A round's rate (messages/s), CPU µs per message and mean sends under way."""
Measure = Callable[[], Awaitable[Figures]]


class Window:
    """The timed part of a round: wall and CPU time, and the sends under way (sampled
    every 0.5 ms)."""

    def __init__(self, counting: Counting) -> None:
        self.counting = counting
        self.samples: list[int] = []
        self.wall = self.cpu = 0.0
        self.sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Window:
        self.sampler = asyncio.create_task(self._sample())
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        assert self.sampler is not None
        self.sampler.cancel()

    async def _sample(self) -> None:
        while True:
            self.samples.append(self.counting.now)
            await asyncio.sleep(0.0005)

    def figures(self, count: int) -> Figures:
        mean = sum(self.samples) / max(len(self.samples), 1)
        return count / self.wall, self.cpu / count * 1e6, mean


def load_before(src: Path) -> tuple[Path, Any]:
    """The other tree's ``iambus``, copied under the name ``iambus_before`` (its imports
    within the package are relative)."""
    where = Path(tempfile.mkdtemp(prefix="relay-ab-"))
    shutil.copytree(src / "iambus", where / "iambus_before")
    sys.path.insert(0, str(where))
    return where, importlib.import_module("iambus_before")


async def run(args: argparse.Namespace) -> None:
    where, before = load_before(Path(args.before))
    relay_before = importlib.import_module("iambus_before.relay")
    database_before = importlib.import_module("iambus_before.database")
    transports_before = importlib.import_module("iambus_before.transports")
    schema = f"bench_relay_ab_{secrets.token_hex(4)}"
    namespace = f"bench-relay-ab-{secrets.token_hex(4)}"
    url = args.url or BROKER_URLS[args.broker]
    pool = await asyncpg.create_pool(args.dsn, min_size=4, max_size=10)
    database = Database(pool, schema=schema)
    await database.create()
    mine = connect(url, namespace=namespace, max_length=args.rows)
    theirs = transports_before.connect(url, namespace=namespace, max_length=args.rows)
    await mine.open()
    await theirs.open()
    counting, counting_before = Counting(mine), Counting(theirs)
    writer = row_writer(database)
    seqs = itertools.count()
    relays = {
        "before": relay_before.Relay(
            database_before.Database(pool, schema=schema), counting_before, listen=False
        ),
        "after": Relay(database, counting, listen=False),  # type: ignore[arg-type]
    }

    def direct(keyed: bool) -> Measure:
        async def measure() -> Figures:
            await write_rows(writer, args.rows, keyed, seqs)
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    f"SELECT {ROW_COLUMNS} FROM {database.outbox} ORDER BY position"
                )
                await conn.execute(f"TRUNCATE {database.outbox}")
            todo = iter([(row["address"], envelope_of(row)) for row in rows])

            async def sender() -> None:
                for address, envelope in todo:
                    await counting.send(address, envelope)

            async with Window(counting) as window, asyncio.TaskGroup() as group:
                for _ in range(IN_FLIGHT):
                    group.create_task(sender())
            return window.figures(len(rows))

        return measure

    def relayed(name: str, keyed: bool) -> Measure:
        async def measure() -> Figures:
            await write_rows(writer, args.rows, keyed, seqs)
            async with Window(counting_before if name == "before" else counting) as window:
                sent = await relays[name].run_once()
            if sent != args.rows:
                raise AssertionError(f"the {name} relay sent {sent} of {args.rows}")
            return window.figures(sent)

        return measure

    print(f"relay to {url}: {args.rows:,} rows a round, batch 1000, medians of {args.rounds}")
    print(f"before: {Path(before.__file__).parent} (from {args.before})\n")
    print("| rows | direct, 100 in flight | before | after | CPU µs/msg | in flight |")
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for keyed in (False, True):
            columns = {
                "direct": direct(keyed),
                "before": relayed("before", keyed),
                "after": relayed("after", keyed),
            }
            figures: dict[str, list[Figures]] = {name: [] for name in columns}
            for measure in columns.values():  # warm up
                await measure()
            names = list(columns)
            for round_no in range(args.rounds):
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    gc.collect()
                    figures[name].append(await columns[name]())
            median = {
                name: [statistics.median(f[i] for f in rounds) for i in range(3)]
                for name, rounds in figures.items()
            }
            base = median["direct"][0]
            cells = [f"{median[n][0] / 1000:.1f}k ({median[n][0] / base:.2f}x)" for n in names]
            cpu = " / ".join(f"{median[n][1]:.1f}" for n in names)
            under_way = " / ".join(f"{median[n][2]:.1f}" for n in names)
            label = "50 keys" if keyed else "no key"
            print(f"| {label} | " + " | ".join(cells) + f" | {cpu} | {under_way} |", flush=True)
    finally:
        destroy = getattr(mine, "destroy", None)
        if destroy is not None:
            await destroy()
        await theirs.close()
        await mine.close()
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()
        shutil.rmtree(where, ignore_errors=True)
    print("\nCPU µs/msg and in flight: direct / before / after.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the other tree's src directory")
    parser.add_argument("--broker", choices=list(BROKER_URLS), default="nats")
    parser.add_argument("--url", help="the broker's URL (default: the broker's on loopback)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows a round (10,000)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (10)")
    parser.add_argument("--dsn", default=DSN, help=f"PostgreSQL, loopback only ({DSN})")
    args = parser.parse_args()
    check_loopback("--dsn", args.dsn)
    check_loopback("--url", args.url or BROKER_URLS[args.broker])
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
