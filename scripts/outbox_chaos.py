"""A crash run of the unit of work, the outbox and the inbox on each broker; see
docs/guarantees.md and scripts/outbox_chaos.

Per broker: producer processes commit units of work that each insert a row and publish a
keyed event (an outbox row); ``iambus relay`` processes and ``iambus worker`` processes
(each with a relay of its own) send and handle them, the handler writing its effect in a
unit of work (inbox). Producers, relays and workers are SIGKILLed and restarted at random,
and the run's PostgreSQL connections are terminated (``pg_terminate_backend``). Then it
waits for the drain and prints one row per broker. It exits 1 if a committed message had
no effect (lost), an effect was applied twice, a key's effects came out of order, a
rolled-back unit's message had an effect, the outbox was left with rows, or a process
exited by itself.

Everything is on 127.0.0.1: a schema and a broker namespace of the run's own, both dropped
at the end; every wait is bounded, and every process still alive at the end is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from chaos import HERE, Workers, broker_url, clean, each_broker  # shared with the broker run

from iambus.database import Database
from iambus.transports import connect

DSN = "postgresql://postgres@127.0.0.1:5432/test"
CLAIM_AFTER = 2.0  # a worker that died leaves its deliveries to the others after this
WORKER = ("-m", "iambus", "worker", "outbox_chaos_app:create")
PRODUCER = (str(HERE / "outbox_chaos_app.py"), "produce")
RELAY_READY = "stop it with SIGINT"  # what `iambus relay` logs once it relays
# What a process that could not start says when the run terminated its database
# connection (or the broker was down) as it started: a start refused, not a crash.
REFUSALS = ("connect failed", "failed: ", "terminating connection", "ConnectionDoesNotExist")
KINDS = ("producer", "relay", "worker")

TABLES = """
CREATE TABLE {s}.counters (key text PRIMARY KEY, seq int NOT NULL, target int NOT NULL);
CREATE TABLE {s}.produced (key text NOT NULL, seq int NOT NULL, unit text NOT NULL);
CREATE TABLE {s}.effects (key text NOT NULL, seq int NOT NULL, unit text NOT NULL, pid int);
CREATE INDEX ON {s}.effects (key, seq);
CREATE INDEX ON {s}.effects (unit);
CREATE TABLE {s}.violations (key text NOT NULL, seq int NOT NULL, top int NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Plan:
    keys: int
    per_key: int
    producers: int
    relays: int
    workers: int
    rate: float  # units per second each producer aims at
    rollback: float  # the share of units that raise on purpose after publishing
    every: float  # seconds between two SIGKILLs
    terminate_every: float  # seconds between two terminated backends
    drain: float  # at most this long to wait for the drain
    settle: float  # seconds to wait after the drain for late redeliveries


SHORT = Plan(
    keys=50,
    per_key=20,
    producers=2,
    relays=1,
    workers=2,
    rate=200,
    rollback=0.05,
    every=1.5,
    terminate_every=0.3,
    drain=30,
    settle=0.5,
)
FULL = Plan(
    keys=100,
    per_key=100,
    producers=3,
    relays=2,
    workers=3,
    rate=200,
    rollback=0.05,
    every=1.5,
    terminate_every=0.3,
    drain=120,
    settle=5.0,
)


@dataclass
class Row:
    broker: str
    committed: int = 0
    rolled_back: int = 0
    applied: int = 0
    lost: int = 0
    twice: int = 0
    phantom: int = 0
    order: int = 0
    skipped: int = 0
    left: int = 0
    parked: int = 0
    dead: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    terminated: int = 0
    unexpected: int = 0
    drain: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.committed > 0 and not (
            self.lost
            or self.twice
            or self.phantom
            or self.order
            or self.left
            or self.parked
            or self.dead
            or self.unexpected
            or self.drain is None
        )


# -- chaos --------------------------------------------------------------------------------


def reap(groups: dict[str, Workers]) -> None:
    for group in groups.values():
        group.reap()


async def kill_at_random(groups: dict[str, Workers], plan: Plan, row: Row) -> None:
    """Until cancelled: every ``plan.every`` s, SIGKILL a producer, a relay or a worker
    (in turn, one at random of the kind), and start it again."""
    rng = random.Random()
    for n in range(1_000_000):
        await asyncio.sleep(plan.every * rng.uniform(0.5, 1.5))
        reap(groups)
        kind = KINDS[n % len(KINDS)]
        group = groups[kind]
        if not group.procs:
            continue  # the producers have all finished
        role = rng.choice(sorted(group.procs))
        group.kill(role)
        row.kills[kind] += 1
        try:
            await asyncio.sleep(0.2)
        finally:  # (cancelled meanwhile, as the producers finish: started all the same)
            group.start(role)


async def terminate_at_random(checker: Any, pattern: str, plan: Plan, row: Row) -> None:
    """Until cancelled: every ``plan.terminate_every`` s, terminate one of the run's
    database connections (every other time one that is busy: in a query or a
    transaction), never the checker's own."""
    rng = random.Random()
    for n in range(1_000_000):
        await asyncio.sleep(plan.terminate_every * rng.uniform(0.5, 1.5))
        with contextlib.suppress(asyncpg.PostgresError):
            if await checker.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE $1 "
                "AND pid <> pg_backend_pid() AND ($2 OR state <> 'idle') "
                "ORDER BY random() LIMIT 1",
                pattern,
                n % 2 == 1,
            ):
                row.terminated += 1


# -- one broker ---------------------------------------------------------------------------


async def waiting(checker: Any, schema: str, database: Database) -> tuple[int, int]:
    """(rows in the outbox, committed steps without an effect)."""
    row = await checker.fetchrow(
        f"SELECT (SELECT count(*) FROM {database.outbox}) AS outbox, "
        f"(SELECT count(*) FROM {schema}.produced p WHERE NOT EXISTS "
        f"(SELECT 1 FROM {schema}.effects e WHERE e.unit = p.unit)) AS unapplied"
    )
    return row["outbox"], row["unapplied"]


async def tally(checker: Any, schema: str, database: Database, row: Row) -> None:
    s = schema
    row.committed = await checker.fetchval(f"SELECT count(*) FROM {s}.produced")
    row.applied = await checker.fetchval(
        f"SELECT count(DISTINCT e.unit) FROM {s}.effects e JOIN {s}.produced p USING (unit)"
    )
    row.lost = row.committed - row.applied
    row.twice = await checker.fetchval(
        f"SELECT coalesce(sum(n - 1), 0) FROM "
        f"(SELECT count(*) AS n FROM {s}.effects GROUP BY unit) AS per_unit"
    )
    row.phantom = await checker.fetchval(
        f"SELECT count(*) FROM {s}.effects e WHERE NOT EXISTS "
        f"(SELECT 1 FROM {s}.produced p WHERE p.unit = e.unit)"
    )
    row.order = await checker.fetchval(f"SELECT count(*) FROM {s}.violations")
    status = await checker.fetchrow(
        f"SELECT count(*) FILTER (WHERE parked_at IS NULL) AS left, "
        f"count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked FROM {database.outbox}"
    )
    row.left, row.parked = status["left"], status["parked"]
    if row.lost:
        lost = await checker.fetch(
            f"SELECT key, seq FROM {s}.produced p WHERE NOT EXISTS "
            f"(SELECT 1 FROM {s}.effects e WHERE e.unit = p.unit) ORDER BY key, seq LIMIT 10"
        )
        row.notes.append(f"lost: {[(r['key'], r['seq']) for r in lost]}")
    if row.phantom:
        row.notes.append(f"{row.phantom} effect(s) of steps no committed unit published")
    if row.order:
        bad = await checker.fetch(f"SELECT * FROM {s}.violations ORDER BY key, seq LIMIT 5")
        row.notes.append(f"out of order: {[tuple(r) for r in bad]}")


def lines(run_dir: Path, pattern: str, text: str) -> int:
    """How many lines holding ``text`` the files ``pattern`` of the run hold."""
    return sum(path.read_text(errors="replace").count(text) for path in run_dir.glob(pattern))


async def one_broker(broker: str, plan: Plan, keep: bool) -> Row:
    row = Row(broker)
    run_id = uuid.uuid4().hex[:10]
    namespace = f"ochaos-{run_id}"
    schema = f"outbox_chaos_{run_id}"
    url = broker_url(broker, namespace)
    name = f"iambus-chaos-{run_id}"  # the application_name of the run's connections
    dsn = f"{DSN}?application_name={name}"
    start = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix=f"iambus-outbox-chaos-{broker}-"))
    settings = {
        "url": url,
        "dsn": dsn,
        "schema": schema,
        "claim_after": CLAIM_AFTER,
        "keys": plan.keys,
        "rate": plan.rate,
        "rollback": plan.rollback,
    }
    relay = (
        *("-m", "iambus", "relay", "--transport", url, "--database", dsn, "--schema", schema),
        *("--log-level", "INFO"),
    )
    groups = {
        "producer": Workers(
            run_dir, settings, PRODUCER, ready="producer ready", finish=True, refusals=REFUSALS
        ),
        "relay": Workers(run_dir, settings, relay, ready=RELAY_READY, refusals=REFUSALS),
        "worker": Workers(run_dir, settings, WORKER, refusals=REFUSALS),
    }
    counts = {"producer": plan.producers, "relay": plan.relays, "worker": plan.workers}
    print(
        f"== {broker}: {plan.producers} producers, {plan.relays} relays, {plan.workers} "
        f"workers; schema {schema}, namespace {namespace}, files in {run_dir}",
        flush=True,
    )
    checker = await asyncpg.connect(DSN, server_settings={"application_name": "outbox-chaos"})
    database = Database(DSN, schema=schema)
    transport = connect(url)
    try:
        await database.create()
        await checker.execute(TABLES.format(s=schema))
        await checker.executemany(
            f"INSERT INTO {schema}.counters VALUES ($1, 0, $2)",
            [(f"k{k:03d}", plan.per_key) for k in range(plan.keys)],
        )
        # The producers start once the workers are ready: a group gets the events sent
        # after it was declared (on NATS and RabbitMQ, not those sent before).
        for kind in ("relay", "worker", "producer"):
            group = groups[kind]
            for n in range(counts[kind]):
                group.start(f"{kind[0]}{n + 1}")
            if kind == "worker":
                await group.ready()
        for group in groups.values():
            await group.ready()
        began = time.monotonic()
        row.notes.append(f"ready in {began - start:.1f} s")
        chaotic = [
            asyncio.ensure_future(kill_at_random(groups, plan, row)),
            asyncio.ensure_future(terminate_at_random(checker, f"{name}%", plan, row)),
        ]
        producers = groups["producer"]
        expected = plan.keys * plan.per_key / (plan.rate * plan.producers)
        try:
            while len(producers.finished) < plan.producers:
                if time.monotonic() - began > expected * 4 + 60:
                    raise RuntimeError(f"the producers did not finish; see {run_dir}")
                reap(groups)
                await asyncio.sleep(0.1)
        finally:
            for task in chaotic:
                task.cancel()
            await asyncio.gather(*chaotic, return_exceptions=True)
        produced = time.monotonic() - began
        print(f"== {broker}: produced in {produced:.1f} s; draining", flush=True)
        # The drain: from the last commit until the outbox is empty and every step has
        # its effect. It begins with one more SIGKILL of a relay and of a worker, with
        # messages in flight, to be taken over by the others.
        began = time.monotonic()
        for kind in ("relay", "worker"):
            reap(groups)
            role = random.choice(sorted(groups[kind].procs))
            groups[kind].kill(role)
            row.kills[kind] += 1
            groups[kind].start(role)
        while time.monotonic() - began < plan.drain:
            reap(groups)
            if await waiting(checker, schema, database) == (0, 0):
                row.drain = time.monotonic() - began
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(plan.settle)  # a late redelivery, if any, would show now
        for kind in ("relay", "worker"):
            await groups[kind].ready()  # a SIGTERM before then finds no handler installed
        stopping = time.monotonic()
        codes = await asyncio.gather(*(group.stop() for group in groups.values()))
        row.notes.append(f"stopped in {time.monotonic() - stopping:.1f} s")
        bad = {role: code for stopped in codes for role, code in stopped.items() if code}
        if bad:
            row.notes.append(f"exit codes on SIGTERM: {bad}")
            row.unexpected += len(bad)
        await tally(checker, schema, database, row)
        await transport.open()
        row.dead = len(await transport.dead_letters(limit=100_000))
    finally:
        for group in groups.values():
            for proc in group.procs.values():
                proc.kill()
                proc.wait(timeout=10)
        await clean(broker, namespace, transport)
        with contextlib.suppress(Exception):
            await transport.close()
        await checker.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await checker.close()
        await database.close()
    row.rolled_back = lines(run_dir, "p*.out", "rolled back on purpose")
    failed = lines(run_dir, "p*.out", "unit failed")
    row.skipped = lines(run_dir, "skipped", "\n")
    row.notes.append(
        f"{row.rolled_back} units rolled back on purpose, {failed} failed on a terminated "
        f"connection"
    )
    for kind, group in groups.items():
        row.unexpected += len(group.unexpected)
        row.notes += group.unexpected
        if group.refused:
            row.notes.append(
                f"{group.refused} {kind} start(s) refused (their database connection was "
                f"terminated as they started); started again"
            )
    if row.dead:
        row.notes.append(f"{row.dead} dead letter(s): a step failed every attempt")
    if row.ok and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


# -- the report ---------------------------------------------------------------------------


HEAD = (
    "broker",
    "committed / rolled back",
    "effects applied (unique)",
    "lost",
    "applied twice",
    "order violations",
    "redeliveries skipped by the inbox",
    "left in the outbox / parked",
    "SIGKILLs: producers / relays / workers",
    "backends terminated",
)


def cells(r: Row) -> tuple[object, ...]:
    kills = " / ".join(str(r.kills[kind]) for kind in KINDS)
    committed, left = f"{r.committed} / {r.rolled_back}", f"{r.left} / {r.parked}"
    return (
        r.broker,
        committed,
        r.applied,
        r.lost,
        r.twice,
        r.order,
        r.skipped,
        left,
        kills,
        r.terminated,
    )


async def main(argv: list[str]) -> int:
    short = "about 15 s per broker"
    return await each_broker(
        argv, "scripts/outbox_chaos", __doc__, one_broker, (SHORT, FULL), (HEAD, cells), Row, short
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
