"""The producers and workers scripts/outbox_chaos runs (see scripts/outbox_chaos.py).

Both read their settings as JSON from the environment variable ``IAMBUS_CHAOS``: the
broker ``url`` (with the run's namespace), the PostgreSQL ``dsn`` (whose
``application_name`` marks the run's connections, the ones the run terminates), the
run's ``schema``, and the rest below.

* ``python outbox_chaos_app.py produce``: a producer. Until every key has its ``target``
  steps, it picks a key and runs one unit of work that takes the key's next number
  (``UPDATE counters ... RETURNING seq``: the row lock, held to the commit, makes numbers
  follow commit order), inserts ``produced(key, seq, unit)`` and publishes
  ``Step(key, seq, unit)`` with ``key=key``: an outbox row in the same transaction. Half
  the units are ``async with dp.unit_of_work(conn)`` on a connection of its own, half an
  in-process command whose handler takes the unit's connection. A few units raise on
  purpose after publishing: they must leave nothing. It exits 0 when every key is full.
* ``iambus worker outbox_chaos_app:create``: a worker (which also runs a relay). Its
  handler of ``Step`` runs in a unit of work: it inserts ``effects(key, seq, unit)`` (no
  unique constraint: a double would show) and, if the key's highest number applied so
  far is not ``seq - 1``, a ``violations`` row. A middleware around it appends a line to
  the file ``skipped`` for each delivery the inbox acked without running the handler (a
  redelivery: broker or relay duplicates), with one ``os.write`` on an ``O_APPEND``
  descriptor, which survives a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import random
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import asyncpg

from iambus import CallNext, Command, Context, Dispatcher, Retry
from iambus.database import Database
from iambus.transports import connect


@dataclass(frozen=True, slots=True)
class Step:
    """The event each unit of work publishes, with ``key=key``; ``unit`` names the unit
    (a unit that rolled back reuses the number, never the name)."""

    key: str
    seq: int
    unit: str


@dataclass(frozen=True, slots=True)
class Produce(Command[bool]):
    """In-process: the next step of ``key`` in a unit of work; True once the key is full."""

    key: str


ROUTES: dict[type | str, str] = {Step: "outbox-chaos"}
# A terminated database connection fails the handler: many quick attempts, so that a
# message is never dead-lettered for it (the run would count it lost).
STEP_RETRY = Retry(attempts=100, backoff=0.05, max_backoff=0.5)


class RolledBack(Exception):
    """Raised on purpose in a unit of work, after its writes and its publish."""


_config: dict[str, Any] = {}
_dp: Dispatcher | None = None
_ran: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("ran", default=None)
_skipped: int | None = None  # the file of skipped deliveries, opened by create()


def settings() -> dict[str, Any]:
    if not _config:
        _config.update(json.loads(os.environ["IAMBUS_CHAOS"]))
    return _config


def table(name: str) -> str:
    return f'"{settings()["schema"]}".{name}'


def dispatcher(service: str, **options: Any) -> Dispatcher:
    global _dp
    config = settings()
    database = Database(config["dsn"], schema=config["schema"])
    transport = connect(config["url"], claim_after=config["claim_after"])
    _dp = Dispatcher(
        transport=transport, service=service, routes=ROUTES, database=database, **options
    )
    return _dp


async def busy() -> None:
    # A little work inside the transaction, so that a SIGKILL or a terminated connection
    # lands mid-unit.
    await asyncio.sleep(random.uniform(0, 0.005))


# -- producers ------------------------------------------------------------------------------


async def step(conn: Any, key: str) -> bool:
    """The next step of ``key`` in the unit of work open on ``conn``; True if it is full."""
    assert _dp is not None
    seq = await conn.fetchval(
        f"UPDATE {table('counters')} SET seq = seq + 1 WHERE key = $1 AND seq < target "
        f"RETURNING seq",
        key,
    )
    if seq is None:
        return True
    unit = os.urandom(8).hex()
    await conn.execute(
        f"INSERT INTO {table('produced')} (key, seq, unit) VALUES ($1, $2, $3)", key, seq, unit
    )
    await _dp.publish(Step(key, seq, unit), key=key)
    await busy()
    if random.random() < settings()["rollback"]:
        raise RolledBack(f"{key} #{seq}: rolled back on purpose")
    return False


async def on_produce(command: Produce, conn: asyncpg.Connection) -> bool:
    return await step(conn, command.key)


async def produce() -> None:
    config = settings()
    dp = dispatcher("outbox-chaos-producer", relay=False)
    dp.commands.register(Produce)(on_produce)
    keys = [f"k{k:03d}" for k in range(config["keys"])]
    pause = 1 / config["rate"]
    assert dp.database is not None
    async with dp:
        print("producer ready", flush=True)
        while keys:
            key = random.choice(keys)
            try:
                if random.random() < 0.5:
                    full = await dp.execute(Produce(key))
                else:
                    async with dp.database.connection() as conn, dp.unit_of_work(conn):
                        full = await step(conn, key)
            except RolledBack:
                print("unit rolled back on purpose", flush=True)
                full = False
            except Exception as exc:
                # A terminated connection: the unit rolled back (or, cut off in its
                # commit, committed: what counts is what the database holds).
                print(f"unit failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                await asyncio.sleep(0.05)
                continue
            if full:
                keys.remove(key)
            await asyncio.sleep(random.uniform(0, 2 * pause))
    print("producer done", flush=True)


# -- workers --------------------------------------------------------------------------------


async def on_step(event: Step, conn: asyncpg.Connection) -> None:
    ran = _ran.get()
    if ran is not None:
        ran.append(True)
    top = await conn.fetchval(
        f"SELECT coalesce(max(seq), 0) FROM {table('effects')} WHERE key = $1", event.key
    )
    if top != event.seq - 1:
        await conn.execute(
            f"INSERT INTO {table('violations')} (key, seq, top) VALUES ($1, $2, $3)",
            event.key,
            event.seq,
            top,
        )
    await conn.execute(
        f"INSERT INTO {table('effects')} (key, seq, unit, pid) VALUES ($1, $2, $3, $4)",
        event.key,
        event.seq,
        event.unit,
        os.getpid(),
    )
    await busy()


async def watch(message: Any, call_next: CallNext, context: Context) -> Any:
    """Note a delivery of a ``Step`` the inbox acked without running the handler."""
    ran: list[bool] = []
    token = _ran.set(ran)
    try:
        result = await call_next(message)
    finally:
        _ran.reset(token)
    if isinstance(message, Step) and not ran:
        assert _skipped is not None
        line = f"{message.key} {message.seq} {message.unit} {os.getpid()}\n"
        os.write(_skipped, line.encode())
    return result


def create() -> Dispatcher:
    """The worker's dispatcher, on the settings in ``IAMBUS_CHAOS``."""
    global _skipped
    _skipped = os.open("skipped", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    dp = dispatcher("outbox-chaos")
    dp.add_middleware(watch)
    dp.events.register(Step, retry=STEP_RETRY)(on_step)
    return dp


if __name__ == "__main__":
    # Run as a script, this file is __main__: the producer works with the module of the
    # same file imported by its name, as the workers import it (the same message names).
    import outbox_chaos_app

    if sys.argv[1:] != ["produce"]:
        sys.exit("usage: outbox_chaos_app.py produce (settings in IAMBUS_CHAOS)")
    asyncio.run(outbox_chaos_app.produce())
