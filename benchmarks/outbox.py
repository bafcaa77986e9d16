"""Units of work, the outbox's relay and the inbox, next to the same work done without iambus.

    .venv/bin/python benchmarks/outbox.py                     # full run, relay to Redis
    .venv/bin/python benchmarks/outbox.py --quick             # smoke run, well under a minute
    .venv/bin/python benchmarks/outbox.py --broker all        # relay to Redis, RabbitMQ, NATS
    .venv/bin/python benchmarks/outbox.py --only relay --rounds 5

Needs PostgreSQL (``--dsn``, default postgresql://postgres@127.0.0.1:5432/test; a schema of
its own, dropped at the end) and, for the relay, the broker(s) on loopback. Only the dev
venv's packages (asyncpg, SQLAlchemy, redis, aio-pika, nats-py) are used.

Three tables, each measured in one run with the columns taking turns in every round
(rotating order) and the median of the rounds reported, with its ratio to the column
without iambus in the same row:

1. **unit of work**: the cost of one command whose handler inserts one row and publishes
   one routed event, through ``dp.execute(command)`` in a unit of work (its event an
   outbox row), against the same handler called directly in a transaction of its own;
   sequential, µs per command, on asyncpg and on a SQLAlchemy ``AsyncSession``.
2. **relay**: N committed outbox rows (written by units of work before the clock starts)
   sent by ``Relay(...).run_once()``, against the same N envelopes sent with
   ``transport.send`` one after the other and with 100 sends in flight; messages/s.
3. **inbox**: a worker fed from a ``MemoryTransport`` runs a handler in a unit of work:
   µs per handled message with the inbox record (one ``INSERT ... ON CONFLICT`` in the
   transaction) and with the record left out (``UnitOfWork.claim`` replaced, in this
   process only, by one that says "not handled yet" without SQL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import secrets
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from broker import check_loopback
from broker_common import PAYLOAD_BYTES, PageViewed, event_fields, version
from report import cpu_model, format_ratio, humanize, short_error
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from iambus import Command, Dispatcher, Envelope
from iambus.database import Database
from iambus.outbox import ROW_COLUMNS, envelope_of
from iambus.relay import Relay
from iambus.transports import connect
from iambus.transports.memory import MemoryTransport
from iambus.unit_of_work import UnitOfWork

DSN = "postgresql://postgres@127.0.0.1:5432/test"
BROKER_URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
}
TITLES = {"redis": "Redis Streams", "rabbitmq": "RabbitMQ", "nats": "NATS JetStream"}
PARTS = ("uow", "relay", "inbox")
IN_FLIGHT = 100  # the direct publisher's window
BATCHES = (100, 200, 1000)
CONCURRENT = 10  # commands in flight in the unit of work's concurrent row (the pool's size)
KEYS = 50  # keyed rows: key user-<seq % KEYS>
WRITE_CHUNK = 1000  # outbox rows written per unit of work when preparing a relay run
LOAD_BEFORE = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


@dataclass(frozen=True, slots=True)
class PlaceOrder(Command[None]):
    order_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class RecordOrder(Command[None]):  # the same write, no event
    order_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class Charge(Command[None]):
    order_id: int
    amount: int


class VerificationError(AssertionError):
    """A run did not do what it claims to measure: its cell has no valid number."""


# -- the harness ------------------------------------------------------------------------

Measure = Callable[[int], Awaitable[float]]
"""Do ``n`` operations; return the figure of the cell (µs per operation, or messages/s)."""


@dataclass
class Column:
    name: str
    measure: Measure | None
    samples: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Row:
    label: str
    columns: list[Column]
    baseline: str  # the column the ratios are against
    # Measures every column at once, taking turns operation by operation (the figure of
    # each column by name); then the columns' own ``measure`` are None.
    together: Callable[[int], Awaitable[dict[str, float]]] | None = None


async def interleave(rows: list[Row], n: int, warmup: int, rounds: int) -> None:
    """Warm every cell up once, then ``rounds`` rounds with the columns of each row in
    rotating order; a failing cell keeps its error and drops out."""

    async def one(column: Column, count: int) -> float | None:
        if column.measure is None:
            return None
        gc.collect()
        try:
            return await column.measure(count)
        except Exception as exc:
            column.error, column.measure = short_error(exc), None
            if os.environ.get("BENCH_TRACEBACK") or isinstance(exc, VerificationError):
                traceback.print_exc()
            return None

    async def all_of(row: Row, count: int) -> None:
        assert row.together is not None
        gc.collect()
        try:
            figures = await row.together(count)
        except Exception as exc:
            for column in row.columns:
                column.error = short_error(exc)
            row.together = None
            if os.environ.get("BENCH_TRACEBACK") or isinstance(exc, VerificationError):
                traceback.print_exc()
            return
        for column in row.columns:
            column.samples.append(figures[column.name])

    for row in rows:
        if row.together is not None:
            await all_of(row, warmup)
            for column in row.columns:
                column.samples.clear()
        for column in row.columns:
            await one(column, warmup)
    for round_no in range(rounds):
        for row in rows:
            if row.together is not None:
                await all_of(row, n)
                continue
            shift = round_no % len(row.columns)
            for column in row.columns[shift:] + row.columns[:shift]:
                value = await one(column, n)
                if value is not None:
                    column.samples.append(value)


def table(first: str, rows: list[Row], kind: str) -> list[str]:
    """A markdown table: a row per ``Row``, a column per ``Column`` (medians and ratios)."""
    names = [column.name for column in rows[0].columns]
    lines = [
        f"| {first} | " + " | ".join(names) + " |",
        "|---|" + "|".join(["---:"] * len(names)) + "|",
    ]
    for row in rows:
        medians = {c.name: statistics.median(c.samples) for c in row.columns if c.samples}
        base = medians.get(row.baseline)
        cells = []
        for column in row.columns:
            if column.error:
                cells.append(f"error: {column.error}")
                continue
            value = medians.get(column.name)
            if value is None:
                cells.append("-")
                continue
            shown = f"{value:,.0f}" if kind == "time" else humanize(value)
            ratio = f" ({format_ratio(value / base)})" if base else ""
            cells.append(shown + ratio)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def _figure(value: float) -> str:
    """3 significant digits, but never an exponent: 1,034 rather than 1.03e+03."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def spread(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        parts = [
            f"{c.name} {_figure(min(c.samples))}-{_figure(max(c.samples))}"
            for c in row.columns
            if len(c.samples) > 1
        ]
        if parts:
            out.append(f"- rounds of {row.label}: " + "; ".join(parts))
    return out


@dataclass
class Settings:
    rounds: int
    uow_ops: int  # commands of each column per round of the unit of work's table
    uow_rounds: int  # its rounds: many short ones, as its columns take turns per command
    relay_rows: int
    inbox_messages: int


FULL = Settings(rounds=5, uow_ops=250, uow_rounds=20, relay_rows=20_000, inbox_messages=2_000)
QUICK = Settings(rounds=1, uow_ops=100, uow_rounds=2, relay_rows=2_000, inbox_messages=200)


# -- 1. the unit of work ----------------------------------------------------------------


async def bench_unit_of_work(
    settings: Settings, pool: Any, engine: AsyncEngine, schema: str
) -> list[str]:
    table_name = f'"{schema}".orders'
    insert = f"INSERT INTO {table_name} (id, amount) VALUES ($1, $2)"
    insert_sa = text(f"INSERT INTO {table_name} (id, amount) VALUES (:id, :amount)")
    ids = itertools.count(1)
    database = Database(pool, schema=schema)
    sa_database = Database(engine, schema=schema)

    # (a) no iambus: the handler, called directly, in a transaction of its own.
    async def place_direct(command: PlaceOrder) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(insert, command.order_id, command.amount)

    async def place_direct_sa(command: PlaceOrder) -> None:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(insert_sa, {"id": command.order_id, "amount": command.amount})

    # (a') no iambus, with an outbox written by hand: the same transaction also inserts the
    # event as a row of iambus's outbox table, its payload and id made by the handler.
    # What an outbox costs before any library: the reference for the unit of work's event.
    outbox_sql = (
        f"INSERT INTO {database.outbox} (lane, address, message_id, name, payload, "
        f"content_type, created_at) VALUES (0, 'shop', $1, 'OrderPlaced', $2, "
        f"'application/json', $3)"
    )

    def event_row(command: PlaceOrder) -> tuple[str, bytes, float]:
        payload = {"order_id": command.order_id, "amount": command.amount}
        return str(uuid.uuid4()), json.dumps(payload).encode(), time.time()

    async def place_by_hand(command: PlaceOrder) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(insert, command.order_id, command.amount)
            await conn.execute(outbox_sql, *event_row(command))

    outbox_sa = text(
        outbox_sql.replace("$1", ":id").replace("$2", ":payload").replace("$3", ":created")
    )

    async def place_by_hand_sa(command: PlaceOrder) -> None:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(insert_sa, {"id": command.order_id, "amount": command.amount})
            message_id, payload, created = event_row(command)
            await session.execute(
                outbox_sa, {"id": message_id, "payload": payload, "created": created}
            )

    # (b) the same handler through iambus, in a unit of work, with one routed event.
    def shop(db: Database) -> Dispatcher:
        return Dispatcher(
            transport=MemoryTransport(),
            service="shop",
            routes={OrderPlaced: "shop"},
            database=db,
            relay=False,
        )

    dp = shop(database)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> None:
        await conn.execute(insert, command.order_id, command.amount)
        await dp.publish(OrderPlaced(command.order_id, command.amount))

    @dp.commands.register(RecordOrder)
    async def record(command: RecordOrder, conn: asyncpg.Connection) -> None:
        await conn.execute(insert, command.order_id, command.amount)

    sa_dp = shop(sa_database)

    @sa_dp.commands.register(PlaceOrder)
    async def place_sa(command: PlaceOrder, session: AsyncSession) -> None:
        await session.execute(insert_sa, {"id": command.order_id, "amount": command.amount})
        await sa_dp.publish(OrderPlaced(command.order_id, command.amount))

    @sa_dp.commands.register(RecordOrder)
    async def record_sa(command: RecordOrder, session: AsyncSession) -> None:
        await session.execute(insert_sa, {"id": command.order_id, "amount": command.amount})

    async def counts() -> tuple[int, int]:
        async with pool.acquire() as conn:
            orders = await conn.fetchval(f"SELECT count(*) FROM {table_name}")
            events = await conn.fetchval(f"SELECT count(*) FROM {database.outbox}")
        return orders, events

    Op = Callable[[int], Awaitable[Any]]

    def row(label: str, ops: list[tuple[str, Op, bool]], tasks: int) -> Row:
        """Every round runs ``n`` operations of each column, taking turns operation by
        operation (``tasks`` loops at once), and records each column's mean latency."""
        columns = [Column(name, None) for name, _, _ in ops]

        async def measure(n: int) -> dict[str, float]:
            before = await counts()
            spent = dict.fromkeys(range(len(ops)), 0.0)
            todo = iter(range(n))

            async def loop() -> None:
                for turn in todo:
                    for k in range(len(ops)):
                        index = (turn + k) % len(ops)
                        start = time.perf_counter()
                        await ops[index][1](next(ids))
                        spent[index] += time.perf_counter() - start

            async with asyncio.TaskGroup() as group:
                for _ in range(tasks):
                    group.create_task(loop())
            orders, events = await counts()
            expected = (n * len(ops), n * sum(1 for _, _, emits in ops if emits))
            if (orders - before[0], events - before[1]) != expected:
                raise VerificationError(
                    f"{label}: wrote {orders - before[0]} rows and {events - before[1]} "
                    f"outbox rows, expected {expected}"
                )
            async with pool.acquire() as conn:  # keep the tables small between rounds
                await conn.execute(f"TRUNCATE {table_name}, {database.outbox}")
            return {ops[i][0]: total / n * 1e6 for i, total in spent.items()}

        return Row(label, columns, "direct", together=measure)

    def ops(direct: Any, by_hand: Any, bus: Dispatcher) -> list[tuple[str, Op, bool]]:
        return [
            ("direct", lambda i: direct(PlaceOrder(i, i)), False),
            ("direct + event row by hand", lambda i: by_hand(PlaceOrder(i, i)), True),
            ("iambus, no event", lambda i: bus.execute(RecordOrder(i, i)), False),
            ("iambus + 1 event", lambda i: bus.execute(PlaceOrder(i, i)), True),
        ]

    async with dp, sa_dp:
        rows = [
            row("asyncpg connection", ops(place_direct, place_by_hand, dp), 1),
            row("SQLAlchemy AsyncSession", ops(place_direct_sa, place_by_hand_sa, sa_dp), 1),
            row(
                f"asyncpg, {CONCURRENT} at once",
                ops(place_direct, place_by_hand, dp),
                CONCURRENT,
            ),
        ]
        await interleave(
            rows, settings.uow_ops, max(20, settings.uow_ops // 10), settings.uow_rounds
        )
    return [
        "### Unit of work: µs per command (lower is better)",
        "",
        f"Mean time per command; each round runs {settings.uow_ops:,} commands of each "
        f"column, the columns taking turns command by command (one at a time, or "
        f"{CONCURRENT} loops at once); median of {settings.uow_rounds} rounds; "
        f"ratio = time / direct.",
        "",
        *table("handler on", rows, "time"),
        "",
        "- direct: `async with pool.acquire() as conn, conn.transaction(): await "
        "conn.execute(INSERT ...)` (SQLAlchemy: `async with AsyncSession(engine) as s, "
        "s.begin(): await s.execute(...)`), the handler called by the benchmark.",
        "- direct + event row by hand: the same, and in its transaction a second INSERT of "
        "the event into the outbox table (`json.dumps` payload, `uuid4` id): an outbox "
        "without a library, the floor for the `+ 1 event` column.",
        "- iambus: `await dp.execute(command)`, the handler taking the unit's connection "
        "(`conn: asyncpg.Connection` / `session: AsyncSession`); `+ 1 event`: it also "
        "`await dp.publish(OrderPlaced(...))`, routed to a transport, so one outbox row in "
        "the same transaction (MemoryTransport, relay off: the broker is not involved).",
        *spread(rows),
    ]


# -- 2. the relay -----------------------------------------------------------------------


def row_writer(database: Database) -> Dispatcher:
    """A dispatcher whose units of work write events as outbox rows (for write_rows)."""
    return Dispatcher(
        transport=MemoryTransport(),
        service="bench",
        routes={PageViewed: "bench"},
        database=database,
        relay=False,
    )


async def write_rows(dp: Dispatcher, n: int, keyed: bool, seqs: itertools.count[int]) -> None:
    """``n`` committed outbox rows of ~200-byte events, by units of work (untimed), in
    an outbox emptied first (rows a failed run left must not count in the next)."""
    assert dp.database is not None
    async with dp.database.connection() as conn:
        await conn.execute(f"TRUNCATE {dp.database.outbox}")
    left = n
    while left:
        chunk = min(left, WRITE_CHUNK)
        async with dp.unit_of_work():
            for _ in range(chunk):
                seq = next(seqs)
                key = f"user-{seq % KEYS}" if keyed else None
                await dp.publish(PageViewed(**event_fields(seq)), key=key)
        left -= chunk


async def bench_relay(
    settings: Settings, broker: str, url: str, pool: Any, schema: str
) -> list[str]:
    namespace = f"bench-outbox-{secrets.token_hex(4)}"
    n = settings.relay_rows
    # Capped near n messages per address, so that the rounds do not pile up in the broker.
    transport = connect(url, namespace=namespace, max_length=max(n, 2_000))
    await transport.open()
    database = Database(pool, schema=schema)
    writer = row_writer(database)
    seqs = itertools.count()

    async def outbox_count() -> int:
        async with pool.acquire() as conn:
            count: int = await conn.fetchval(f"SELECT count(*) FROM {database.outbox}")
        return count

    async def taken(count: int, keyed: bool) -> list[tuple[str, Envelope]]:
        """Write ``count`` rows, then take them out of the outbox as envelopes."""
        await write_rows(writer, count, keyed, seqs)
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT {ROW_COLUMNS} FROM {database.outbox} ORDER BY position"
            )
            await conn.execute(f"TRUNCATE {database.outbox}")
        return [(row["address"], envelope_of(row)) for row in rows]

    def direct(keyed: bool) -> Measure:
        async def measure(count: int) -> float:
            items = await taken(count, keyed)
            start = time.perf_counter()
            for address, envelope in items:
                await transport.send(address, envelope)
            return count / (time.perf_counter() - start)

        return measure

    def direct_in_flight(keyed: bool, in_order: bool = False) -> Measure:
        async def measure(count: int) -> float:
            items = await taken(count, keyed)
            if in_order:  # a chain per key, sent one after the other
                chains: dict[str | None, list[tuple[str, Envelope]]] = {}
                for item in items:
                    chains.setdefault(item[1].key, []).append(item)
                todo = iter(list(chains.values()))
            else:
                todo = iter([item] for item in items)
            sent = 0

            async def sender() -> None:
                nonlocal sent
                for chain in todo:
                    for address, envelope in chain:
                        await transport.send(address, envelope)
                        sent += 1

            start = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(IN_FLIGHT):
                    group.create_task(sender())
            elapsed = time.perf_counter() - start
            if sent != count:
                raise VerificationError(f"sent {sent} of {count}")
            return count / elapsed

        return measure

    def relayed(batch: int, keyed: bool) -> Measure:
        relay = Relay(database, transport, batch=batch, listen=False)

        async def measure(count: int) -> float:
            await write_rows(writer, count, keyed, seqs)
            start = time.perf_counter()
            sent = await relay.run_once()
            elapsed = time.perf_counter() - start
            left = await outbox_count()
            if sent != count or left:
                raise VerificationError(f"the relay sent {sent} of {count}; {left} left")
            return count / elapsed

        return measure

    def columns(keyed: bool) -> list[Column]:
        return [
            Column("direct, 1 in flight", direct(keyed)),
            Column(f"direct, {IN_FLIGHT} in flight", direct_in_flight(keyed)),
            Column("direct, keys in order", direct_in_flight(True, True) if keyed else None),
            *[Column(f"relay, batch {b}", relayed(b, keyed)) for b in BATCHES],
        ]

    rows = [
        Row("no key", columns(False), f"direct, {IN_FLIGHT} in flight"),
        Row(f"{KEYS} keys", columns(True), f"direct, {IN_FLIGHT} in flight"),
    ]
    try:
        async with pool.acquire() as conn:
            await conn.execute(f"TRUNCATE {database.outbox}")
        await interleave(rows, n, max(200, n // 10), settings.rounds)
    finally:
        with contextlib.suppress(Exception):
            await transport.destroy()  # type: ignore[attr-defined]
        await transport.close()
    seq_ratios = []
    for row in rows:
        medians = {c.name: statistics.median(c.samples) for c in row.columns if c.samples}
        base = medians.get("direct, 1 in flight")
        if base:
            seq_ratios.append(
                f"{row.label}: "
                + ", ".join(
                    f"batch {b} {format_ratio(medians[f'relay, batch {b}'] / base)}"
                    for b in BATCHES
                    if f"relay, batch {b}" in medians
                )
            )
    return [
        f"### Relay to {TITLES[broker]}: messages/s (higher is better)",
        "",
        f"{n:,} events of ~{PAYLOAD_BYTES} B of JSON per round, median of {settings.rounds} "
        f"rounds; ratio = rate / direct with {IN_FLIGHT} in flight.",
        "",
        *table(f"{TITLES[broker]}", rows, "rate"),
        "",
        f"- direct: the same envelopes (read from the outbox and deleted before the clock "
        f"starts) through the same transport's `send`, awaited one after the other (1 in "
        f"flight), or by {IN_FLIGHT} tasks taking the next envelope in turn ({IN_FLIGHT} in "
        f"flight: what a publisher that wants throughput does; it keeps no per-key order); "
        f"keys in order: the {KEYS} keys' envelopes sent at once, each key's one after the "
        f"other (as the relay does).",
        "- relay: `Relay(database, transport, batch=B, listen=False).run_once()` on the "
        "committed rows (written by units of work of 1,000 events before the clock starts): "
        "the rows read, sent, deleted and committed, lane by lane; the clock stops when the "
        "outbox is empty. Keyed rows: key `user-<seq % 50>`.",
        "- relay against direct with 1 in flight: " + "; ".join(seq_ratios),
        *spread(rows),
    ]


# -- 3. the inbox -----------------------------------------------------------------------

WITHOUT = "worker, unit of work, no inbox record"
WITH = "worker, unit of work + inbox record"


async def bench_inbox(settings: Settings, pool: Any, schema: str) -> list[str]:
    table_name = f'"{schema}".charges'
    insert = f"INSERT INTO {table_name} (order_id, amount) VALUES ($1, $2)"
    database = Database(pool, schema=schema)
    ids = itertools.count(1)
    real_claim = UnitOfWork.claim

    async def no_claim(self: UnitOfWork, message_id: str, handler: str) -> bool:
        return True

    async def handled() -> tuple[int, int]:
        async with pool.acquire() as conn:
            rows = await conn.fetchval(f"SELECT count(*) FROM {table_name}")
            records = await conn.fetchval(f"SELECT count(*) FROM {database.inbox}")
        return rows, records

    async def clean() -> None:
        async with pool.acquire() as conn:
            await conn.execute(f"TRUNCATE {table_name}, {database.inbox}")

    def billing(concurrency: int) -> Dispatcher:
        dp = Dispatcher(
            transport=MemoryTransport(max_length=100_000),
            service="billing",
            routes={Charge: "billing"},
            database=database,
            relay=False,
            concurrency=concurrency,
        )

        @dp.commands.register(Charge)
        async def charge(command: Charge, conn: asyncpg.Connection) -> None:
            await conn.execute(insert, command.order_id, command.amount)

        return dp

    Run = Callable[[int], Awaitable[float]]  # handles ``n`` messages: seconds it took

    def direct(concurrency: int) -> Run:
        async def run(n: int) -> float:
            todo = iter(range(n))

            async def loop() -> None:
                for _ in todo:
                    async with pool.acquire() as conn, conn.transaction():
                        i = next(ids)
                        await conn.execute(insert, i, i)

            start = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(concurrency):
                    group.create_task(loop())
            elapsed = time.perf_counter() - start
            rows, _ = await handled()
            if rows != n:
                raise VerificationError(f"direct: {n} messages, {rows} rows")
            await clean()
            return elapsed

        return run

    def worker(dp: Dispatcher, inbox: bool) -> Run:
        async def run(n: int) -> float:
            UnitOfWork.claim = real_claim if inbox else no_claim  # type: ignore[method-assign]
            try:
                start = time.perf_counter()
                for _ in range(n):
                    i = next(ids)
                    await dp.send(Charge(i, i))
                await dp.join()
                elapsed = time.perf_counter() - start
            finally:
                UnitOfWork.claim = real_claim  # type: ignore[method-assign]
            rows, records = await handled()
            if rows != n or records != (n if inbox else 0):
                raise VerificationError(f"{n} messages: {rows} rows, {records} inbox records")
            await clean()
            return elapsed

        return run

    def row(concurrency: int, dp: Dispatcher) -> Row:
        """Each round: the columns take turns, a chunk of messages at a time."""
        runs = [
            ("direct", direct(concurrency)),
            (WITHOUT, worker(dp, False)),
            (WITH, worker(dp, True)),
        ]
        chunk = max(50, 4 * concurrency)

        async def measure(n: int) -> dict[str, float]:
            spent = dict.fromkeys(range(len(runs)), 0.0)
            chunks = max(1, n // chunk)
            for turn in range(chunks):
                for k in range(len(runs)):
                    index = (turn + k) % len(runs)
                    spent[index] += await runs[index][1](chunk)
            return {runs[i][0]: total / (chunks * chunk) * 1e6 for i, total in spent.items()}

        return Row(
            f"concurrency {concurrency}",
            [Column(name, None) for name, _ in runs],
            "direct",
            together=measure,
        )

    async with pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE {table_name} (order_id bigint, amount int)")
    one, many = billing(1), billing(32)
    async with one, many:
        rows = [row(1, one), row(32, many)]
        await interleave(
            rows, settings.inbox_messages, max(100, settings.inbox_messages // 10), settings.rounds
        )
    costs = []
    for row in rows:
        medians = {c.name: statistics.median(c.samples) for c in row.columns if c.samples}
        without = medians.get(WITHOUT)
        with_inbox = medians.get(WITH)
        if without and with_inbox:
            costs.append(
                f"{row.label}: {with_inbox - without:,.0f} µs per message "
                f"({format_ratio(with_inbox / without)} the time without the record)"
            )
    return [
        "### Inbox: µs per handled message (lower is better)",
        "",
        f"Mean time per message; each round handles {settings.inbox_messages:,} messages in "
        f"each column, the columns taking turns by chunks of 50 (concurrency 1) or 128 "
        f"messages; median of {settings.rounds} rounds; ratio = time / direct.",
        "",
        *table("worker", rows, "time"),
        "",
        "- direct: the handler's INSERT in a transaction of its own on a pooled connection, "
        "by as many tasks as the worker's concurrency, no bus.",
        "- worker: `dp.send(Charge(...))` for every message into a `MemoryTransport`, then "
        "`await dp.join()` (every delivery handled and acked); the handler "
        "(`conn: asyncpg.Connection`) runs in a unit of work. With the inbox record the unit "
        "first INSERTs (envelope id, handler) ON CONFLICT DO NOTHING; without it, "
        "`UnitOfWork.claim` is replaced for that run by one that returns True without SQL.",
        "- what the inbox record costs: " + "; ".join(costs),
        *spread(rows),
    ]


# -- running it -------------------------------------------------------------------------


async def run(args: argparse.Namespace, settings: Settings, brokers: list[str]) -> None:
    schema = f"bench_outbox_{secrets.token_hex(4)}"
    pool = await asyncpg.create_pool(args.dsn, min_size=10, max_size=10)
    engine = create_async_engine(args.dsn.replace("postgresql://", "postgresql+asyncpg://"))
    database = Database(pool, schema=schema)
    server = ""
    out: list[str] = []
    try:
        await database.create()
        async with pool.acquire() as conn:
            await conn.execute(
                f'CREATE TABLE "{schema}".orders (id bigint PRIMARY KEY, amount int)'
            )
            server = await conn.fetchval("SHOW server_version")
            sync = await conn.fetchval("SHOW synchronous_commit")
        out += [
            "# iambus outbox benchmark",
            "",
            f"- Python {platform.python_version()} on {platform.platform()}; "
            f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, shared with the servers); "
            f"load average before the run: {LOAD_BEFORE}",
            f"- PostgreSQL {server} (synchronous_commit {sync}) on loopback; asyncpg "
            f"{version('asyncpg')}, SQLAlchemy {version('sqlalchemy')}; a pool of 10 "
            "connections shared by every column",
            "",
        ]
        if "uow" in args.only:
            out += [*await bench_unit_of_work(settings, pool, engine, schema), ""]
            print("\n".join(out), flush=True)
            out = []
        if "relay" in args.only:
            for broker in brokers:
                try:
                    part = await bench_relay(settings, broker, args.urls[broker], pool, schema)
                except Exception as exc:
                    if os.environ.get("BENCH_TRACEBACK"):
                        traceback.print_exc()
                    part = [f"### Relay to {TITLES[broker]}: {short_error(exc)}"]
                print("\n".join([*part, ""]), flush=True)
        if "inbox" in args.only:
            print("\n".join([*await bench_inbox(settings, pool, schema), ""]), flush=True)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()
        await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 round")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick: 1)")
    parser.add_argument("--rows", type=int, help="outbox rows per relay run (default 20,000)")
    parser.add_argument(
        "--broker",
        choices=[*BROKER_URLS, "all"],
        default="redis",
        help="the broker(s) the relay sends to (default redis)",
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts ({','.join(PARTS)})"
    )
    parser.add_argument("--dsn", default=DSN, help=f"PostgreSQL, loopback only ({DSN})")
    for broker, url in BROKER_URLS.items():
        parser.add_argument(f"--{broker}-url", default=url, help=f"{broker} URL ({url})")
    args = parser.parse_args()
    args.only = args.only.split(",")
    if not set(args.only) <= set(PARTS):
        parser.error(f"--only: unknown {sorted(set(args.only) - set(PARTS))}; choose from {PARTS}")
    brokers = list(BROKER_URLS) if args.broker == "all" else [args.broker]
    args.urls = {broker: getattr(args, f"{broker}_url") for broker in BROKER_URLS}
    check_loopback("--dsn", args.dsn)
    for broker in brokers:
        check_loopback(f"--{broker}-url", args.urls[broker])
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    if args.rounds:
        settings.rounds = args.rounds
        settings.uow_rounds = args.rounds * 4
    if args.rows:
        settings.relay_rows = args.rows
    asyncio.run(run(args, settings, brokers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
