"""The inbox on the real PostgreSQL: a redelivered message is not applied twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iambus import Command, Dispatcher, Query, RequestTimeout, Retry
from iambus.database import Database
from iambus.inbox import claim, claim_again, purge
from iambus.transports.memory import MemoryTransport
from iambus.unit_of_work import current_connection


@dataclass(frozen=True, slots=True)
class Charge(Command[None]):
    order_id: int
    fail_first: bool = False


@dataclass(frozen=True, slots=True)
class RefundCharge(Command[int]):
    order_id: int


@dataclass(frozen=True, slots=True)
class MaybeRefund(Command[int | None]):
    order_id: int


def billing(database: Database, runs: list[int], *, relay: bool = False) -> Dispatcher:
    """Service billing: its Charge handler records the charge in its table, and in ``runs``
    each time it runs; it fails on the first run of a ``fail_first`` charge."""
    dp = Dispatcher(
        transport=MemoryTransport(),
        service="billing",
        routes={Charge: "billing", RefundCharge: "billing", MaybeRefund: "billing"},
        database=database,
        relay=relay,
        retry=Retry(attempts=3, backoff=0.01),
    )

    @dp.commands.register(Charge)
    async def charge(command: Charge, conn: asyncpg.Connection) -> None:
        runs.append(command.order_id)
        await conn.execute(f'INSERT INTO "{database.schema}".charges VALUES ($1)', command.order_id)
        if command.fail_first and len(runs) == 1:
            raise RuntimeError("card network down")

    return dp


async def charges(database: Database) -> list[int]:
    async with database.connection() as conn:
        rows = await conn.fetch(f'SELECT order_id FROM "{database.schema}".charges ORDER BY 1')
    return [row["order_id"] for row in rows]


async def inbox(database: Database) -> list[tuple[str, str]]:
    async with database.connection() as conn:
        rows = await conn.fetch(f"SELECT message_id, handler FROM {database.inbox}")
    return sorted((row["message_id"], row["handler"]) for row in rows)  # (Python's order)


async def make_charges(database: Database) -> None:
    async with database.connection() as conn:
        await conn.execute(f'CREATE TABLE "{database.schema}".charges (order_id int)')


async def test_a_redelivery_is_acked_without_running_the_handler_again(database: Database) -> None:
    await make_charges(database)
    runs: list[int] = []
    dp = billing(database, runs)
    async with dp:
        # The broker delivers one message twice (at least once), here at the same time:
        # the second waits on the first's inbox record, then finds it.
        await dp.send(Charge(1), id="m-1")
        await dp.send(Charge(1), id="m-1")
        await dp.send(Charge(2), id="m-2")
        await dp.join()  # every delivery settled: acked
    assert sorted(runs) == [1, 2]
    assert await charges(database) == [1, 2]
    # Recorded under the subscription's group: for a command, its service.
    assert await inbox(database) == [("m-1", "billing"), ("m-2", "billing")]


async def test_a_failed_attempt_leaves_no_record_and_is_retried(database: Database) -> None:
    await make_charges(database)
    runs: list[int] = []
    dp = billing(database, runs)
    async with dp:
        await dp.send(Charge(3, fail_first=True), id="m-3")
        await dp.join()
    assert runs == [3, 3]  # the retry ran: the failed attempt's record rolled back
    assert await charges(database) == [3]
    assert [message for message, _ in await inbox(database)] == ["m-3"]


async def test_a_failed_attempt_on_a_sqlalchemy_session_leaves_no_record(
    database: Database, engine: AsyncEngine
) -> None:
    """The inbox record is written on the driver connection under the session before
    any statement of SQLAlchemy's: it must be in the session's transaction (which the
    driver begins lazily), or it commits alone and the retry of a failed attempt is
    skipped as a redelivery: the message is lost."""
    await make_charges(database)
    dp = Dispatcher(
        transport=MemoryTransport(),
        service="billing",
        routes={Charge: "billing"},
        database=Database(engine, schema=database.schema),
        relay=False,
        retry=Retry(attempts=3, backoff=0.01),
    )
    runs: list[int] = []

    @dp.commands.register(Charge)
    async def charge(command: Charge, session: AsyncSession) -> None:
        runs.append(command.order_id)
        await session.execute(
            text(f'INSERT INTO "{database.schema}".charges VALUES (:id)'),
            {"id": command.order_id},
        )
        if len(runs) == 1:
            raise RuntimeError("card network down")

    async with dp:
        await dp.send(Charge(3), id="m-3")
        await dp.join()
    assert runs == [3, 3]  # the retry ran: the failed attempt's record rolled back
    assert await charges(database) == [3]
    assert [message for message, _ in await inbox(database)] == ["m-3"]


async def test_claim_and_purge(database: Database) -> None:
    async with database.connection() as conn:
        async with conn.transaction():
            assert await claim(conn, database, "m", "h") is True
            assert await claim(conn, database, "m", "h") is False
            assert await claim(conn, database, "m", "other") is True
        await conn.execute(
            f"UPDATE {database.inbox} SET handled_at = now() - interval '8 days' "
            f"WHERE handler = 'h'"
        )
        assert await purge(conn, database) == 1  # older than the week kept by default
        assert [r["handler"] for r in await conn.fetch(f"SELECT * FROM {database.inbox}")] == [
            "other"
        ]


async def test_claim_again_is_true_for_this_transactions_record_only(database: Database) -> None:
    async with (
        database.connection() as conn,
        database.connection() as other,
        conn.transaction(),
    ):
        assert await claim(conn, database, "m", "h") is True
        assert await claim_again(conn, database, "m", "h") is True  # still this one's
        savepoint = conn.transaction()
        await savepoint.start()
        assert await claim_again(conn, database, "m", "h") is True
        await savepoint.rollback()  # (the first record stays: made before it)
        assert await claim_again(conn, database, "m", "h") is True

        savepoint = conn.transaction()
        await savepoint.start()
        assert await claim(conn, database, "n", "h") is True
        await savepoint.rollback()  # the record is gone: a redelivery takes its place
        async with other.transaction():
            assert await claim(other, database, "n", "h") is True
        assert await claim_again(conn, database, "n", "h") is False
        assert await claim_again(conn, database, "p", "h") is True  # (none yet: made)


async def test_claim_again_knows_its_record_whatever_the_columns_default(
    database: Database,
) -> None:
    """An inbox made elsewhere may default handled_at to another clock (Django's
    ``db_default=Now()`` is ``STATEMENT_TIMESTAMP()``): the claim sets it to the
    transaction's time itself, by which claim_again knows this transaction's record (or
    a handler run again in its unit is skipped as a redelivery: the message lost)."""
    async with database.connection() as conn:
        await conn.execute(
            f"ALTER TABLE {database.inbox} "
            f"ALTER COLUMN handled_at SET DEFAULT statement_timestamp()"
        )
        await database.check()
        async with conn.transaction():
            await conn.execute("SELECT pg_sleep(0.001)")  # (a statement after the BEGIN)
            assert await claim(conn, database, "m", "h") is True
            assert await claim_again(conn, database, "m", "h") is True


@dataclass(frozen=True, slots=True)
class Charged:  # a routed event
    order_id: int


@dataclass(frozen=True, slots=True)
class Balance(Query[int]):
    pass


CHARGED = {Charged: "billing"}


async def test_two_handlers_of_one_name_each_have_their_record(database: Database) -> None:
    await make_charges(database)
    dp = Dispatcher(
        transport=MemoryTransport(), service="billing", routes=CHARGED, database=database
    )
    seen: list[str] = []

    class Audit:  # bound twice, with other arguments: one name, two handlers
        def __init__(self, tag: str) -> None:
            self.tag = tag

        async def handle(self, event: Charged) -> None:
            seen.append(self.tag)

    dp.events.register(Charged, unit_of_work=True, tag="a")(Audit)
    dp.events.register(Charged, unit_of_work=True, tag="b")(Audit)
    async with dp:
        await dp.send(Charged(1), id="m-1")
        await dp.send(Charged(1), id="m-1")  # a redelivery: skipped by both
        await dp.join()
    assert sorted(seen) == ["a", "b"]
    name = f"billing.{__name__}.test_two_handlers_of_one_name_each_have_their_record.<locals>.Audit"
    assert await inbox(database) == [("m-1", name), ("m-1", f"{name}#2")]


def billing_in_units(database: Database) -> Dispatcher:
    """Service billing, its events handled in a unit of work a middleware opens."""
    dp = Dispatcher(
        transport=MemoryTransport(), service="billing", routes=CHARGED, database=database
    )

    async def in_transaction(message: Any, call_next: Any, context: Any) -> Any:
        async with database.connection() as conn, dp.unit_of_work(conn):
            return await call_next(message)

    dp.events.add_middleware(in_transaction)
    return dp


async def test_a_unit_opened_by_a_middleware_records_the_delivery(database: Database) -> None:
    await make_charges(database)
    dp = billing_in_units(database)
    runs: list[int] = []

    @dp.events.register(Charged)
    async def apply(event: Charged, conn: asyncpg.Connection) -> None:
        runs.append(event.order_id)
        await conn.execute(f'INSERT INTO "{database.schema}".charges VALUES ($1)', event.order_id)

    async with dp:
        await dp.send(Charged(1), id="m-1")
        await dp.send(Charged(1), id="m-1")
        await dp.join()
    assert runs == [1]
    assert await charges(database) == [1]


async def test_a_run_retried_in_a_savepoint_of_its_unit_keeps_its_record(
    database: Database,
) -> None:
    """A middleware retries the handler inside the unit another opened, each attempt in
    a savepoint (as docs/unit_of_work.md advises around what may fail): the failed
    attempt's savepoint rolls back its inbox record, and the attempt that commits must
    record the message again, or a redelivery applies it twice."""
    await make_charges(database)
    dp = billing_in_units(database)
    runs: list[int] = []

    async def retry_in_a_savepoint(message: Any, call_next: Any, context: Any) -> Any:
        conn = await current_connection()
        try:
            async with conn.transaction():
                return await call_next(message)
        except RuntimeError:
            async with conn.transaction():
                return await call_next(message)

    dp.events.add_middleware(retry_in_a_savepoint)

    @dp.events.register(Charged)
    async def apply(event: Charged, conn: asyncpg.Connection) -> None:
        runs.append(event.order_id)
        await conn.execute(f'INSERT INTO "{database.schema}".charges VALUES ($1)', event.order_id)
        if len(runs) == 1:
            raise RuntimeError("a deadlock, say: worth another try")

    async with dp:
        await dp.send(Charged(1), id="m-1")
        await dp.join()
        assert [message for message, _ in await inbox(database)] == ["m-1"]
        await dp.send(Charged(1), id="m-1")  # a redelivery: skipped
        await dp.join()
    assert runs == [1, 1]
    assert await charges(database) == [1]


def fails_once_after_the_commit() -> Any:
    """A middleware that fails the first message it sees once its unit has committed
    (an audit log down, say): the delivery is retried, and the inbox skips it."""
    failed = False

    async def middleware(message: Any, call_next: Any, context: Any) -> Any:
        nonlocal failed
        result = await call_next(message)  # the unit has committed here
        if not failed:
            failed = True
            raise ConnectionError("an audit middleware failing once")
        return result

    return middleware


async def test_a_skipped_redelivery_of_a_command_without_result_answers_done(
    database: Database,
) -> None:
    """The first delivery committed, then a middleware failed: the retry finds the record,
    runs nothing, and tells the requester the command is done (a Command[None] returns)."""
    await make_charges(database)
    transport = MemoryTransport()
    runs: list[int] = []
    server = billing(database, runs)
    server.remote.transport = transport  # type: ignore[union-attr]
    client = Dispatcher(transport=transport, service="web", routes={Charge: "billing"})
    server.commands.add_middleware(fails_once_after_the_commit())
    async with server, client:
        assert await client.execute(Charge(7), timeout=5) is None
        await server.join()
    assert runs == [7]
    assert await charges(database) == [7]


async def refunds(
    database: Database, runs: list[int], *, relay: bool = False
) -> tuple[MemoryTransport, Dispatcher]:
    """Billing on a transport of its own (returned), with a RefundCharge handler that
    records the refund and answers 42 + the order id."""
    await make_charges(database)
    transport = MemoryTransport()
    server = billing(database, runs, relay=relay)
    server.remote.transport = transport  # type: ignore[union-attr]

    @server.commands.register(RefundCharge)
    async def refund(command: RefundCharge, conn: asyncpg.Connection) -> int:
        runs.append(command.order_id)
        await conn.execute(f'INSERT INTO "{database.schema}".charges VALUES ($1)', command.order_id)
        return 42 + command.order_id

    return transport, server


async def test_a_skipped_redelivery_of_a_command_with_a_result_answers_the_kept_result(
    database: Database,
) -> None:
    """The first run kept its answer in its inbox record, in its transaction; a middleware
    failed after the commit: the retry runs nothing and answers with the kept result."""
    runs: list[int] = []
    transport, server = await refunds(database, runs)
    server.commands.add_middleware(fails_once_after_the_commit())
    client = Dispatcher(transport=transport, service="web", routes={RefundCharge: "billing"})
    async with server, client:
        assert await client.execute(RefundCharge(8), timeout=5) == 50
        await server.join()
    assert runs == [8]
    assert await charges(database) == [8]
    async with database.connection() as conn:
        kept = await conn.fetch(f"SELECT answer, answer_type FROM {database.inbox}")
    assert [(bytes(row["answer"]), row["answer_type"]) for row in kept] == [
        (b"50", "application/json")
    ]


async def test_a_skipped_redelivery_of_a_command_whose_record_kept_no_answer_is_not_answered(
    database: Database,
) -> None:
    """A record without an answer (an older version's, or a result that did not encode):
    no answer, since an error answer could overtake the first run's on its way."""
    runs: list[int] = []
    transport, server = await refunds(database, runs)
    failing = fails_once_after_the_commit()

    async def forget_answers(message: Any, call_next: Any, context: Any) -> Any:
        try:
            return await failing(message, call_next, context)
        finally:  # committed: the record now holds what one of an older version holds
            async with database.connection() as conn:
                await conn.execute(f"UPDATE {database.inbox} SET answer = NULL, answer_type = NULL")

    server.commands.add_middleware(forget_answers)
    client = Dispatcher(transport=transport, service="web", routes={RefundCharge: "billing"})
    async with server, client:
        with pytest.raises(RequestTimeout, match="may still be carried out"):
            await client.execute(RefundCharge(8), timeout=0.5)
        assert await client.execute(RefundCharge(9), timeout=5) == 51  # a fresh one answers
        await server.join()
    assert runs == [8, 9]
    assert await charges(database) == [8, 9]


async def test_a_kept_result_is_returned_through_the_middleware_again(
    database: Database,
) -> None:
    """A middleware outside the unit changes the result (x 2): the first answer says
    100. Answered from the record after the first answer was lost, it says 100 too: the
    kept result is the handler's, and the middleware returns it again."""
    runs: list[int] = []
    transport, server = await refunds(database, runs)

    async def doubles(message: Any, call_next: Any, context: Any) -> Any:
        return 2 * await call_next(message)

    server.commands.add_middleware(fails_once_after_the_commit())
    server.commands.add_middleware(doubles)  # inside the one failing: sees the skip too
    client = Dispatcher(transport=transport, service="web", routes={RefundCharge: "billing"})
    async with server, client:
        assert await client.execute(RefundCharge(8), timeout=5) == 100
        await server.join()
    assert runs == [8]


async def test_a_kept_none_result_is_answered(database: Database) -> None:
    """A Command[int | None] whose handler returned None: None is kept, and answered."""
    await make_charges(database)
    transport = MemoryTransport()
    runs: list[int] = []
    server = billing(database, runs)
    server.remote.transport = transport  # type: ignore[union-attr]

    @server.commands.register(MaybeRefund)
    async def refund(command: MaybeRefund, conn: asyncpg.Connection) -> int | None:
        runs.append(command.order_id)
        await conn.execute(f'INSERT INTO "{database.schema}".charges VALUES ($1)', command.order_id)
        return None

    server.commands.add_middleware(fails_once_after_the_commit())
    client = Dispatcher(transport=transport, service="web", routes={MaybeRefund: "billing"})
    async with server, client:
        assert await client.execute(MaybeRefund(8), timeout=5) is None
        await server.join()
    assert runs == [8]


async def test_an_inbox_of_the_earlier_shape_keeps_no_answers_and_says_so(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Deployed before `iambus db init` added the answer columns: the service starts
    (relay included), commands run and answer as before, and a warning says what to run."""
    runs: list[int] = []
    transport, server = await refunds(database, runs, relay=True)  # its start checks
    async with database.connection() as conn:
        await conn.execute(
            f"ALTER TABLE {database.inbox} DROP COLUMN answer, DROP COLUMN answer_type"
        )
    client = Dispatcher(transport=transport, service="web", routes={RefundCharge: "billing"})
    async with server, client:
        assert await client.execute(RefundCharge(8), timeout=5) == 50
        await server.join()
    assert await charges(database) == [8]
    warned = [r.getMessage() for r in caplog.records if "answer, answer_type" in r.getMessage()]
    assert warned, "no warning named the missing columns"
    assert all("iambus db init" in message for message in warned)


async def test_a_query_writes_no_inbox_record(database: Database) -> None:
    transport = MemoryTransport()
    server = Dispatcher(
        transport=transport, service="billing", routes={Balance: "billing"}, database=database
    )
    client = Dispatcher(transport=transport, service="web", routes={Balance: "billing"})

    @server.queries.register(Balance, unit_of_work=True)
    async def balance(query: Balance) -> int:
        return 5

    async with server, client:
        assert await client.query(Balance(), timeout=5) == 5
    assert await inbox(database) == []


async def test_purge_deletes_in_chunks_and_not_while_another_purges(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("iambus.inbox.PURGE_CHUNK", 2)
    async with database.connection() as conn:
        await conn.execute(
            f"INSERT INTO {database.inbox} (message_id, handler, handled_at) "
            f"SELECT 'm-' || n, 'h', now() - interval '8 days' FROM generate_series(1, 5) AS n"
        )
        async with database.connection() as other, other.transaction():  # another purge
            await other.execute("SELECT pg_advisory_xact_lock($1::int, -1)", database.lock_space)
            assert await purge(conn, database) == 0
        assert await purge(conn, database) == 5  # 2 + 2 + 1
        assert await conn.fetchval(f"SELECT count(*) FROM {database.inbox}") == 0
