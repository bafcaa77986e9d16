"""Units of work on the real PostgreSQL: a handler's writes and its messages commit together.

Every test has a schema of its own (the ``database`` fixture) with iambus's tables and an
``orders`` table standing for the application's own. Routed messages go to a
``MemoryTransport``; nothing relays here (``relay=False``), so what a unit sent is read
from the outbox table itself (the relay has tests of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from iambus import (
    AbstractHandler,
    Command,
    Dispatcher,
    Envelope,
    HandlerDoesNotExist,
    ImproperlyConfigured,
    Query,
    TransactionFailed,
    WouldDeadlock,
    unit_of_work,
)
from iambus.database import Database
from iambus.relay import Relay
from iambus.transports.memory import MemoryTransport
from iambus.unit_of_work import Connection, Session

from .conftest import POSTGRES_DSN
from .processes import until


@dataclass(frozen=True, slots=True)
class PlaceOrder(Command[int]):
    order_id: int
    fail: bool = False


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class ShipOrder(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class CancelOrder(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class CountOrders(Query[int]):
    pass


@dataclass(frozen=True, slots=True)
class Noted:  # an in-process event: nobody routes it
    order_id: int


@dataclass(frozen=True, slots=True)
class Unbound:  # nobody handles it
    pass


ROUTES: dict[Any, str] = {OrderPlaced: "shop", ShipOrder: "shipping"}


@pytest.fixture
async def orders(database: Database) -> Database:
    async with database.connection() as conn:
        await conn.execute(f'CREATE TABLE "{database.schema}".orders (id int PRIMARY KEY)')
    return database


def shop(database: Database, **options: Any) -> Dispatcher:
    return Dispatcher(
        **{
            "transport": MemoryTransport(),
            "service": "shop",
            "routes": ROUTES,
            "database": database,
            "relay": False,
            **options,
        }
    )


async def outbox(database: Database) -> list[asyncpg.Record]:
    async with database.connection() as conn:
        return list(await conn.fetch(f"SELECT * FROM {database.outbox} ORDER BY position"))


async def order_ids(database: Database) -> list[int]:
    async with database.connection() as conn:
        rows = await conn.fetch(f'SELECT id FROM "{database.schema}".orders ORDER BY id')
    return [row["id"] for row in rows]


# -- a handler's unit of work ----------------------------------------------------------------


@pytest.mark.parametrize("driver", ["asyncpg", "sqlalchemy"])
async def test_a_handlers_writes_and_its_events_commit_together(
    orders: Database, engine: AsyncEngine, driver: str
) -> None:
    database = orders if driver == "asyncpg" else Database(engine, schema=orders.schema)
    dp = shop(database)
    table = f'"{orders.schema}".orders'
    if driver == "asyncpg":

        @dp.commands.register(PlaceOrder)
        async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", command.order_id)
            await dp.publish(OrderPlaced(command.order_id))
            if command.fail:
                raise RuntimeError("card declined")
            return command.order_id

    else:

        @dp.commands.register(PlaceOrder)
        async def place(command: PlaceOrder, session: AsyncSession) -> int:
            await session.execute(
                text(f"INSERT INTO {table} VALUES (:id)"), {"id": command.order_id}
            )
            await dp.publish(OrderPlaced(command.order_id))
            if command.fail:
                raise RuntimeError("card declined")
            return command.order_id

    async with dp:
        assert await dp.execute(PlaceOrder(1)) == 1
        with pytest.raises(RuntimeError, match="card declined"):
            await dp.execute(PlaceOrder(2, fail=True))
    assert await order_ids(orders) == [1]  # the failed one left nothing behind
    rows = await outbox(orders)
    assert [(r["address"], r["name"], json.loads(r["payload"])) for r in rows] == [
        ("event.OrderPlaced", "OrderPlaced", {"order_id": 1})
    ]
    # Nothing reached the transport: the relay sends it, once committed.
    assert dp.remote is not None


async def test_orm_writes_flushed_at_the_commit_and_the_events_commit_together(
    orders: Database, engine: AsyncEngine
) -> None:
    """The handler of the module's example: it adds an ORM object (flushed by the
    commit, the session's first statement) and publishes an event (an outbox row written
    before it, on the driver connection). The row is in the session's transaction: when
    the commit fails, no event of it stays to be sent."""

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        __table_args__: ClassVar[dict[str, Any]] = {"schema": orders.schema}
        id: Mapped[int] = mapped_column(primary_key=True)

    dp = shop(Database(engine, schema=orders.schema))

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, session: AsyncSession) -> int:
        session.add(Order(id=command.order_id))
        await dp.publish(OrderPlaced(command.order_id))
        return command.order_id

    async with dp:
        assert await dp.execute(PlaceOrder(1)) == 1
        with pytest.raises(IntegrityError):  # order 1 again: its commit fails
            await dp.execute(PlaceOrder(1))
    assert await order_ids(orders) == [1]
    assert [json.loads(r["payload"]) for r in await outbox(orders)] == [{"order_id": 1}]


async def test_a_routed_message_in_a_unit_goes_to_the_outbox_not_the_broker(
    orders: Database,
) -> None:
    transport = MemoryTransport()
    dp = Dispatcher(
        transport=transport, service="shop", routes=ROUTES, database=orders, relay=False
    )
    seen: list[Envelope] = []

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await dp.publish(OrderPlaced(command.order_id), key="o-1")
        await dp.send(ShipOrder(command.order_id), key="o-1")
        return 0

    async with dp:
        await transport.declare("event.OrderPlaced", "audit", from_start=True)
        await dp.execute(PlaceOrder(5))
        got = await transport.receive(
            "event.OrderPlaced", "audit", consumer="t", limit=10, wait=0.05
        )
        seen.extend(d.envelope for d in got)
    assert seen == []
    rows = await outbox(orders)
    assert [(r["address"], r["message_key"]) for r in rows] == [
        ("event.OrderPlaced", "o-1"),
        ("command.ShipOrder", "o-1"),
    ]
    assert rows[0]["lane"] == rows[1]["lane"]  # one key, one lane: sent in this order


async def test_returned_and_collected_events_go_into_the_unit(orders: Database) -> None:
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    class Place(AbstractHandler):
        def __init__(self, conn: asyncpg.Connection) -> None:
            self.conn = conn

        async def handle(self, command: PlaceOrder) -> int:
            await self.conn.execute(
                f'INSERT INTO "{orders.schema}".orders VALUES ($1)', command.order_id
            )
            await self.add_event(OrderPlaced(command.order_id))
            return command.order_id

    @dp.commands.register(CancelOrder, unit_of_work=True)
    async def cancel(command: CancelOrder) -> OrderPlaced:
        return OrderPlaced(-command.order_id)  # a returned event

    async with dp:
        await dp.execute(PlaceOrder(3))
        await dp.execute(CancelOrder(4))
    rows = await outbox(orders)
    assert [json.loads(r["payload"]) for r in rows] == [{"order_id": 3}, {"order_id": -4}]


async def test_in_process_events_run_after_the_commit_and_never_after_a_rollback(
    orders: Database,
) -> None:
    dp = shop(orders)
    seen: list[tuple[int, list[int]]] = []

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES ($1)', command.order_id)
        await dp.publish(Noted(command.order_id))  # handled after the commit
        await dp.handle(Noted(-command.order_id))  # queued after the commit
        if command.fail:
            raise RuntimeError("no")
        return command.order_id

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        # What it sees is committed: read on another connection.
        seen.append((event.order_id, await order_ids(orders)))

    async with dp:
        await dp.execute(PlaceOrder(7))
        with pytest.raises(RuntimeError):
            await dp.execute(PlaceOrder(8, fail=True))
        await dp.join()
    assert sorted(seen) == [(-7, [7]), (7, [7])]


# -- the caller's own unit of work ---------------------------------------------------------


async def test_dp_unit_of_work_commits_what_it_began(orders: Database, engine: AsyncEngine) -> None:
    dp = shop(Database(engine, schema=orders.schema))
    async with dp:
        async with AsyncSession(engine) as session:
            async with dp.unit_of_work(session):
                await session.execute(text(f'INSERT INTO "{orders.schema}".orders VALUES (1)'))
                await dp.publish(OrderPlaced(1))
            assert not session.in_transaction()
        async with AsyncSession(engine) as session:
            with pytest.raises(ZeroDivisionError):  # noqa: PT012 - raised at the end of the unit
                async with dp.unit_of_work(session):
                    await session.execute(text(f'INSERT INTO "{orders.schema}".orders VALUES (2)'))
                    await dp.publish(OrderPlaced(2))
                    1 / 0  # noqa: B018
    assert await order_ids(orders) == [1]
    assert [json.loads(r["payload"])["order_id"] for r in await outbox(orders)] == [1]


async def test_dp_unit_of_work_joins_a_transaction_already_open(orders: Database) -> None:
    dp = shop(orders)
    async with dp, orders.connection() as conn:
        async with conn.transaction():
            async with dp.unit_of_work(conn):
                await dp.publish(OrderPlaced(1))
            # Written into the caller's transaction, which is not committed yet.
            assert conn.is_in_transaction()
            assert len(await conn.fetch(f"SELECT * FROM {orders.outbox}")) == 1
            assert await outbox(orders) == []  # invisible elsewhere until the commit
        assert len(await outbox(orders)) == 1


@pytest.mark.parametrize("joined", [False, True], ids=["its-own-commit", "the-callers-commit"])
async def test_a_committed_unit_wakes_a_listening_relay(orders: Database, joined: bool) -> None:
    # A relay of another process (a Database of its own) that only a notification wakes.
    transport = MemoryTransport()
    await transport.declare("event.OrderPlaced", "readers", from_start=True)
    other = Database(POSTGRES_DSN, schema=orders.schema)
    relay = Relay(other, transport, poll=3600)
    dp = shop(orders)
    try:
        await relay.start()
        assert relay.listening
        await relay._idle.wait()  # its first pass is over
        async with dp, orders.connection() as conn:
            if joined:
                async with conn.transaction(), dp.unit_of_work(conn):
                    await dp.publish(OrderPlaced(1))
            else:
                async with dp.unit_of_work(conn):
                    await dp.publish(OrderPlaced(1))
        [delivery] = await transport.receive(
            "event.OrderPlaced", "readers", consumer="test", limit=1, wait=5
        )
        assert json.loads(delivery.envelope.payload) == {"order_id": 1}
    finally:
        await relay.stop()
        await other.close()


async def test_a_middleware_opening_a_unit_gets_the_emitted_events_before_its_commit(
    orders: Database,
) -> None:
    dp = shop(orders)
    committed: list[int] = []

    async def in_transaction(message: Any, call_next: Any, context: Any) -> Any:
        async with orders.connection() as conn, dp.unit_of_work(conn) as unit:
            result = await call_next(message)
            # The handler returned an event: it is in this unit already.
            committed.append(len(unit.outgoing))
            return result

    dp.commands.add_middleware(in_transaction)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        return OrderPlaced(command.order_id)

    async with dp:
        await dp.execute(PlaceOrder(9))
    assert committed == [1]
    assert [json.loads(r["payload"]) for r in await outbox(orders)] == [{"order_id": 9}]


# -- what cannot work, said clearly ----------------------------------------------------------


async def test_awaiting_a_routed_command_inside_a_unit_would_deadlock(orders: Database) -> None:
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await dp.execute(ShipOrder(command.order_id), timeout=1)
        return 0

    async with dp:
        with pytest.raises(WouldDeadlock, match=r"execute\(.*ShipOrder\) inside a unit of work"):
            await dp.execute(PlaceOrder(1))
    assert await outbox(orders) == []


async def test_a_handler_taking_a_session_needs_a_database() -> None:
    dp = Dispatcher()

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, session: AsyncSession) -> int:  # pragma: no cover
        return 0

    with pytest.raises(
        ImproperlyConfigured,
        match=r"place takes the unit of work's session.*"
        r"Dispatcher\(database=Database",
    ):
        dp.start()


async def test_a_session_parameter_and_unit_of_work_false_contradict() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match="unit_of_work=False; drop one"):

        @dp.commands.register(PlaceOrder, unit_of_work=False)
        async def place(command: PlaceOrder, session: AsyncSession) -> int:  # pragma: no cover
            return 0


async def test_the_outbox_table_missing_says_how_to_create_it(database: Database) -> None:
    async with database.connection() as conn:
        await conn.execute(f"DROP TABLE {database.outbox}")
    dp = shop(database)

    @dp.commands.register(PlaceOrder, conn=Connection)
    async def place(command: PlaceOrder, conn: Any) -> int:
        await dp.publish(OrderPlaced(1))
        return 0

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="iambus db init"):
            await dp.execute(PlaceOrder(1))


async def test_a_failed_transaction_is_named_and_rolled_back(orders: Database) -> None:
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES (1)')
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1/0")  # caught: the transaction is aborted all the same
        await dp.publish(OrderPlaced(1))
        return 0

    async with dp:
        with pytest.raises(TransactionFailed, match="had failed already"):
            await dp.execute(PlaceOrder(1))
    assert await order_ids(orders) == []


async def test_a_failed_transaction_that_sends_nothing_is_named_too(orders: Database) -> None:
    """A handler that caught a statement's error and sends nothing: PostgreSQL answers
    the commit of its aborted transaction with a rollback, and no error. The unit says
    so instead of returning as if its writes were committed (a delivery would be acked,
    and its writes lost)."""
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES (1)')
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1/0")
        return 0

    await fails_to_commit(dp, orders)


RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"


async def test_an_asyncpg_unit_finds_an_aborted_transaction_without_a_statement_more(
    orders: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On asyncpg the COMMIT's own answer tells an aborted transaction (PostgreSQL
    answers it with ROLLBACK): a unit sends its handler's statements and the COMMIT,
    nothing more. Where asyncpg's transaction is not as iambus knows it (a later
    asyncpg), a SELECT 1 before the commit finds it out instead."""
    dp = shop(orders)
    sent: list[str] = []

    def log(query: Any) -> None:  # what the unit sends after its handler's INSERT
        if query.query.startswith("INSERT"):
            sent.clear()
        elif RESET not in sent:
            sent.append(query.query)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        conn.add_query_logger(log)  # (one logger however often added: a pool may lend it again)
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES ($1)', command.order_id)
        return command.order_id

    async with dp:
        assert await dp.execute(PlaceOrder(1)) == 1
        await asyncio.sleep(0)  # (the logger is called soon after each statement)
        assert sent == ["COMMIT;", RESET]  # (RESET: the pool's, as the connection goes back)
        assert await order_ids(orders) == [1]
        monkeypatch.setattr(unit_of_work, "_commit_reader", lambda tx: None)
        assert await dp.execute(PlaceOrder(2)) == 2
        await asyncio.sleep(0)
        assert sent == ["SELECT 1", "COMMIT;", RESET]
    assert await order_ids(orders) == [1, 2]


async def test_an_aborted_transaction_is_found_where_asyncpg_is_not_as_iambus_knows_it(
    orders: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unit_of_work, "_commit_reader", lambda tx: None)
    await test_a_failed_transaction_that_sends_nothing_is_named_too(orders)


@contextlib.asynccontextmanager
async def one_connection(orders: Database) -> AsyncIterator[tuple[Database, list[Any]]]:
    """``orders`` with a pool of one connection (what a unit gives back is what the next
    one gets), and what asyncpg tells its event loop's exception handler meanwhile
    ("Resetting connection with an active transaction", as a connection in a transaction
    goes back to the pool)."""
    database = Database(POSTGRES_DSN, schema=orders.schema, pool={"max_size": 1})
    told: list[Any] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: told.append(context))
    try:
        yield database, told
    finally:
        loop.set_exception_handler(handler)
        await database.close()


def resets(told: list[Any]) -> list[str]:
    """What asyncpg told of connections going back to the pool in a transaction (not its
    other news: a COMMIT cancelled in flight, say, has it open a connection to send the
    server a cancel request, whose end it may report as a future never retrieved)."""
    return [str(c.get("message")) for c in told if "transaction" in str(c.get("message"))]


async def test_an_asyncpg_units_own_commit_keeps_savepoints_and_leaves_its_connection_clean(
    orders: Database,
) -> None:
    """The COMMIT iambus sends for asyncpg (see _commit_reader) behaves as asyncpg's own:
    a handler's savepoints (released, or rolled back to after an error) commit with the
    unit, and a connection whose COMMIT PostgreSQL answered with ROLLBACK goes back to
    the pool out of any transaction, asyncpg's as well as the server's."""
    table = f'"{orders.schema}".orders'
    async with one_connection(orders) as (database, told):
        dp = shop(database)

        @dp.commands.register(PlaceOrder)
        async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
            async with conn.transaction():  # a savepoint, released
                await conn.execute(f"INSERT INTO {table} VALUES ($1)", command.order_id)
            with contextlib.suppress(asyncpg.UniqueViolationError):
                async with conn.transaction():  # a savepoint, rolled back to
                    await conn.execute(f"INSERT INTO {table} VALUES ($1)", command.order_id)
            if command.fail:  # the transaction aborted, the error caught
                with contextlib.suppress(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1/0")
            return command.order_id

        async with dp:
            assert await dp.execute(PlaceOrder(1)) == 1
            with pytest.raises(TransactionFailed, match="rolled it back at the commit"):
                await dp.execute(PlaceOrder(2, fail=True))
            async with database.connection() as conn:  # the pool's only connection
                assert not conn.is_in_transaction()
                async with conn.transaction():  # (top-level: asyncpg knows of no other)
                    await conn.execute(f"INSERT INTO {table} VALUES (3)")
            assert await dp.execute(PlaceOrder(4)) == 4
    assert await order_ids(orders) == [1, 3, 4]
    assert resets(told) == []


async def test_an_asyncpg_unit_cancelled_while_its_commit_waits_leaves_no_transaction(
    orders: Database,
) -> None:
    """Cancelled while its COMMIT is in flight (here: a deferred trigger waits for a
    lock), a unit leaves the transaction as asyncpg's own commit would: its connection
    goes back to the pool once the server has answered, out of any transaction."""
    table = f'"{orders.schema}".orders'
    async with orders.connection() as conn:
        await conn.execute(
            f'CREATE FUNCTION "{orders.schema}".waits() RETURNS trigger LANGUAGE plpgsql '
            f"AS $$ BEGIN PERFORM pg_advisory_xact_lock(7171); RETURN NULL; END $$; "
            f"CREATE CONSTRAINT TRIGGER waits AFTER INSERT ON {table} DEFERRABLE "
            f'INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{orders.schema}".waits()'
        )
    waiting = "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    async with one_connection(orders) as (database, told):
        dp = shop(database)

        @dp.commands.register(PlaceOrder)
        async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", command.order_id)
            return command.order_id

        async with dp, orders.connection() as holder:
            await holder.execute("SELECT pg_advisory_lock(7171)")
            placing = asyncio.create_task(dp.execute(PlaceOrder(1)))
            await until(lambda: holder.fetchval(waiting), 10, "the COMMIT to wait for the lock")
            placing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await placing  # (its connection went back once the COMMIT was cancelled)
            await holder.execute("SELECT pg_advisory_unlock(7171)")
            async with database.connection() as conn:  # the pool's only connection
                assert not conn.is_in_transaction()
            assert await dp.execute(PlaceOrder(2)) == 2
    assert await order_ids(orders) == [2]
    assert resets(told) == []


async def test_a_failed_sqlalchemy_transaction_that_sends_nothing_is_named_too(
    orders: Database, engine: AsyncEngine
) -> None:
    dp = shop(Database(engine, schema=orders.schema))

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, session: AsyncSession) -> int:
        await session.execute(text(f'INSERT INTO "{orders.schema}".orders VALUES (1)'))
        with contextlib.suppress(DBAPIError):
            await session.execute(text("SELECT 1/0"))
        return 0

    await fails_to_commit(dp, orders)


async def test_a_sqlalchemy_unit_that_never_used_its_session_takes_no_connection(
    orders: Database,
) -> None:
    """A unit on a SQLAlchemy session its handler never used has nothing to commit, and
    needs none of the pool's connections: it does not wait for one (while every one is
    busy: the pool's timeout, and the handler's success turned into a failure)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    small = create_async_engine(
        POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=1,
    )
    dp = shop(Database(small, schema=orders.schema))

    @dp.commands.register(PlaceOrder, unit_of_work=True)
    async def place(command: PlaceOrder) -> int:
        return command.order_id  # (in-process work only: no statement)

    try:
        async with dp, small.connect() as busy:
            await busy.execute(text("SELECT 1"))  # the pool's one connection, in use
            assert await dp.execute(PlaceOrder(7)) == 7
    finally:
        await small.dispose()


async def fails_to_commit(dp: Dispatcher, orders: Database) -> None:
    async with dp:
        with pytest.raises(TransactionFailed, match=r"cannot commit.*had failed already"):
            await dp.execute(PlaceOrder(1))
    assert await order_ids(orders) == []


@pytest.mark.parametrize("driver", ["asyncpg", "sqlalchemy"])
async def test_a_handlers_error_keeps_its_traceback(
    orders: Database, engine: AsyncEngine, driver: str
) -> None:
    # The unit's session is given back on the way out with the error: its traceback must
    # still say where the handler raised it (what the worker logs of a failed delivery).
    dp = shop(orders if driver == "asyncpg" else Database(engine, schema=orders.schema))

    @dp.commands.register(PlaceOrder, unit_of_work=True)
    async def declined(command: PlaceOrder) -> int:
        raise RuntimeError("card declined")

    async with dp:
        with pytest.raises(RuntimeError, match="card declined") as raised:
            await dp.execute(PlaceOrder(1))
    assert "declined" in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]


# -- joining, nesting, providers --------------------------------------------------------------


async def test_a_nested_execute_joins_the_unit_and_shares_its_session(
    orders: Database, engine: AsyncEngine
) -> None:
    dp = shop(Database(engine, schema=orders.schema))
    sessions: list[AsyncSession] = []

    @dp.commands.register(PlaceOrder, session=Session)
    async def place(command: PlaceOrder, session: Any) -> int:
        sessions.append(session)
        await session.execute(text(f'INSERT INTO "{orders.schema}".orders VALUES (1)'))
        return await dp.query(CountOrders())

    @dp.queries.register(CountOrders)
    async def count(query: CountOrders, session: AsyncSession) -> int:
        sessions.append(session)
        result = await session.execute(text(f'SELECT count(*) FROM "{orders.schema}".orders'))
        return int(result.scalar_one())

    async with dp:
        assert await dp.execute(PlaceOrder(1)) == 1  # sees the uncommitted row: one session
    assert sessions[0] is sessions[1]


async def test_concurrent_units_keep_apart(orders: Database) -> None:
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES ($1)', command.order_id)
        await asyncio.sleep(0)  # interleave with the others
        await dp.publish(OrderPlaced(command.order_id))
        if command.order_id % 3 == 0:
            raise ValueError(command.order_id)
        return command.order_id

    async with dp:
        results = await asyncio.gather(
            *(dp.execute(PlaceOrder(n)) for n in range(1, 10)), return_exceptions=True
        )
    kept = [n for n in range(1, 10) if n % 3]
    assert [r for r in results if not isinstance(r, BaseException)] == kept
    assert await order_ids(orders) == kept
    assert sorted(json.loads(r["payload"])["order_id"] for r in await outbox(orders)) == kept


async def test_a_shared_database_outlives_a_dispatcher_that_stops(orders: Database) -> None:
    """A Database passed in may serve several dispatchers (a modular monolith): stopping
    one neither closes it under the other nor waits for the other's connections."""
    first, second = shop(orders, relay=True), shop(orders, relay=True)
    async with first:
        async with second:
            pass
        async with orders.connection() as conn:  # still open for the first
            assert await conn.fetchval("SELECT 1") == 1
    async with orders.connection() as conn:
        assert await conn.fetchval("SELECT 1") == 1  # and for its owner


async def test_a_dispatcher_given_a_dsn_owns_its_database(orders: Database) -> None:
    assert orders.schema is not None
    dp = Dispatcher(
        transport=MemoryTransport(),
        service="shop",
        routes=ROUTES,
        database=POSTGRES_DSN,
        relay=False,  # (its tables are not made: the relay would refuse to start)
    )
    assert isinstance(dp.database, Database)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT $1::int", command.order_id))

    async with dp:
        assert await dp.execute(PlaceOrder(4)) == 4
    assert dp.database._pool is None  # closed at the stop


# -- review fixes: the unit's lifetime, rollback, nesting, joining ---------------------------


class Recording(MemoryTransport):
    """A memory transport that keeps what was sent to it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Envelope] = []

    async def send(self, address: str, envelope: Envelope) -> None:
        self.sent.append(envelope)
        await super().send(address, envelope)


def order_ids_of(envelopes: list[Envelope]) -> list[int]:
    return [json.loads(envelope.payload)["order_id"] for envelope in envelopes]


async def test_an_engine_started_inside_a_unit_does_not_keep_it(orders: Database) -> None:
    transport = Recording()
    dp = shop(orders, transport=transport)
    done = asyncio.Event()

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> int:
        await dp.send(ShipOrder(command.order_id))
        if command.order_id == 2:
            done.set()
        return command.order_id

    async with dp:
        async with dp.unit_of_work():
            await dp.execute(PlaceOrder(1), key="order-1")  # the engine's first use
        await dp.handle(PlaceOrder(2))  # background, no unit open anywhere
        await asyncio.wait_for(done.wait(), 2)
        await dp.join()
    assert order_ids_of(transport.sent) == [2]  # straight to the broker: no unit is open
    assert [json.loads(r["payload"])["order_id"] for r in await outbox(orders)] == [1]


async def test_a_unit_kept_after_its_block_refuses_sends(orders: Database) -> None:
    dp = shop(orders)
    dp.start()
    async with dp.unit_of_work() as unit:
        pass
    assert dp.open_unit() is None
    envelope = dp.remote.envelope(OrderPlaced(1), None)  # type: ignore[union-attr]
    with pytest.raises(TransactionFailed, match="has ended"):
        unit.send("event.OrderPlaced", envelope)
    await dp.stop()


async def test_a_retried_unit_runs_the_in_process_work_of_its_last_attempt_only(
    orders: Database,
) -> None:
    dp = shop(orders)
    seen: list[int] = []
    attempts = 0

    async def retry_once(message: Any, call_next: Any, context: Any) -> Any:
        try:
            return await call_next(message)
        except RuntimeError:
            return await call_next(message)

    dp.commands.add_middleware(retry_once)

    @dp.commands.register(PlaceOrder, unit_of_work=True)
    async def place(command: PlaceOrder) -> int:
        nonlocal attempts
        attempts += 1
        await dp.publish(Noted(attempts))
        if attempts == 1:
            raise RuntimeError("the first attempt rolls back")
        return command.order_id

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        seen.append(event.order_id)

    async with dp:
        assert await dp.execute(PlaceOrder(1)) == 1
    assert seen == [2]


async def test_committed_in_process_work_runs_when_a_middleware_fails_afterwards(
    orders: Database,
) -> None:
    dp = shop(orders)
    seen: list[int] = []

    async def fails_after(message: Any, call_next: Any, context: Any) -> Any:
        await call_next(message)  # the unit has committed here
        raise ConnectionError("an audit middleware failing")

    dp.commands.add_middleware(fails_after)

    @dp.commands.register(PlaceOrder, unit_of_work=True)
    async def place(command: PlaceOrder) -> int:
        await dp.publish(Noted(command.order_id))
        return command.order_id

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        seen.append(event.order_id)

    async with dp:
        with pytest.raises(ConnectionError):
            await dp.execute(PlaceOrder(5))
    assert seen == [5]


async def test_a_keyed_execute_in_a_unit_runs_inside_it(orders: Database) -> None:
    transport = Recording()
    dp = shop(orders, transport=transport)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> int:
        await dp.send(ShipOrder(command.order_id))  # an outbox row of the open unit
        return command.order_id

    async with dp:
        await dp.execute(PlaceOrder(0), key="warm-up")  # the engine starts outside a unit
        transport.sent.clear()
        with pytest.raises(ZeroDivisionError):  # noqa: PT012 - raised at the end of the unit
            async with dp.unit_of_work():
                assert await dp.execute(PlaceOrder(1), key="order-1") == 1
                assert await dp.handle(PlaceOrder(2), key="order-2", wait_for_response=True) == 2
                1 / 0  # noqa: B018
    assert transport.sent == []
    assert await outbox(orders) == []  # rolled back with the unit


async def test_a_nested_unit_of_work_is_part_of_the_outer_one(orders: Database) -> None:
    dp = shop(orders)
    seen: list[int] = []

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        seen.append(event.order_id)

    async with dp:
        with pytest.raises(ZeroDivisionError):  # noqa: PT012 - raised at the end of the unit
            async with dp.unit_of_work() as outer:
                async with dp.unit_of_work() as inner:  # a service function's own block
                    assert inner is outer
                    await dp.publish(OrderPlaced(1))
                    await dp.publish(Noted(1))
                assert seen == []  # waits for the outer commit
                1 / 0  # noqa: B018
        await dp.join()
        assert seen == []  # the outer one rolled back: its in-process work never runs
        assert await outbox(orders) == []
        async with dp.unit_of_work() as outer, dp.unit_of_work(outer.session):
            await dp.publish(Noted(2))
        assert seen == [2]
    assert dp._table.units == 0


async def test_a_unit_joined_to_a_sqlalchemy_transaction_runs_its_work_after_that_commit(
    orders: Database, engine: AsyncEngine
) -> None:
    dp = shop(Database(engine, schema=orders.schema))
    seen: list[tuple[int, list[int]]] = []
    ran = asyncio.Event()

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        seen.append((event.order_id, await order_ids(orders)))  # another connection
        ran.set()

    insert = f'INSERT INTO "{orders.schema}".orders VALUES (:id)'
    async with dp:
        async with AsyncSession(engine) as session:
            await session.begin()
            async with dp.unit_of_work(session):  # joins
                await session.execute(text(insert), {"id": 1})
                await dp.publish(Noted(1))
            async with session.begin_nested():  # a savepoint's release is no commit
                await session.execute(text(insert), {"id": 2})
            assert seen == []  # not before the caller's commit
            await session.commit()
        await asyncio.wait_for(ran.wait(), 2)
        async with AsyncSession(engine) as session:
            await session.begin()
            async with dp.unit_of_work(session):
                await dp.publish(Noted(3))
            await session.rollback()  # never after a rollback
        async with AsyncSession(engine) as session:
            await session.begin()
            async with dp.unit_of_work(session):
                await dp.publish(Noted(4))
            # closed without a commit: rolled back
        async with AsyncSession(engine) as session, session.begin():
            pass  # a later commit of a session does not run the dropped work
        await dp.join()
    assert seen == [(1, [1, 2])]


async def test_join_and_stop_wait_for_the_work_a_joined_sqlalchemy_commit_set_running(
    orders: Database, engine: AsyncEngine
) -> None:
    dp = shop(Database(engine, schema=orders.schema))
    seen: list[int] = []
    started = asyncio.Event()

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:
        started.set()
        await asyncio.sleep(0.2)  # a handler that takes a while, after the commit
        seen.append(event.order_id)

    async with dp:
        async with AsyncSession(engine) as session:
            await session.begin()
            async with dp.unit_of_work(session):  # joins: its work waits for the commit
                await dp.publish(Noted(1))
            await session.commit()
        await started.wait()
        await dp.join()
        assert seen == [1]  # join() waited for it
        started.clear()
        async with AsyncSession(engine) as session:
            await session.begin()
            async with dp.unit_of_work(session):
                await dp.publish(Noted(2))
            await session.commit()
        await started.wait()
    assert seen == [1, 2]  # the stop at the block's end drained it


async def test_a_unit_joined_to_an_asyncpg_transaction_refuses_in_process_work(
    orders: Database,
) -> None:
    dp = shop(orders)

    @dp.events.register(Noted)
    async def on_noted(event: Noted) -> None:  # pragma: no cover - refused
        pass

    async with dp, orders.connection() as conn, conn.transaction():
        with pytest.raises(ImproperlyConfigured, match="cannot wait for the commit"):
            async with dp.unit_of_work(conn):
                await dp.publish(Noted(1))


async def test_handle_of_an_unbound_message_in_a_unit_fails_before_the_commit(
    orders: Database,
) -> None:
    dp = shop(orders)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection) -> int:
        await conn.execute(f'INSERT INTO "{orders.schema}".orders VALUES ($1)', command.order_id)
        await dp.handle(Unbound())
        return command.order_id

    async with dp:
        with pytest.raises(HandlerDoesNotExist, match="Unbound"):
            await dp.execute(PlaceOrder(1))
    assert await order_ids(orders) == []


async def test_an_async_session_parameter_on_an_asyncpg_database_fails_the_start(
    database: Database,
) -> None:
    dp = shop(database)

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, session: AsyncSession) -> int:  # pragma: no cover
        return 1

    with pytest.raises(ImproperlyConfigured, match=r"place takes a SQLAlchemy AsyncSession"):
        dp.start()


async def test_an_optional_session_parameter_gets_the_units(orders: Database) -> None:
    dp = shop(orders)
    got: list[Any] = []

    @dp.commands.register(PlaceOrder)
    async def place(command: PlaceOrder, conn: asyncpg.Connection | None = None) -> int:
        got.append(conn)
        return 1

    @dp.commands.register(CancelOrder)
    async def cancel(command: CancelOrder, conn: Optional[asyncpg.Connection] = None) -> None:  # noqa: UP045
        got.append(conn)

    async with dp:
        await dp.execute(PlaceOrder(1))
        await dp.execute(CancelOrder(1))
    assert [type(conn).__module__.split(".")[0] for conn in got] == ["asyncpg", "asyncpg"]


class NoDeclare(MemoryTransport):
    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        raise ConnectionError("the broker went away")


async def test_a_start_that_fails_after_the_relay_started_stops_it(database: Database) -> None:
    dp = Dispatcher(
        transport=NoDeclare(), service="shop", routes={OrderPlaced: "shop"}, database=database
    )

    @dp.events.register(OrderPlaced)
    async def on(event: OrderPlaced) -> None:  # pragma: no cover - never started
        pass

    before = asyncio.all_tasks()
    with pytest.raises(ConnectionError):
        async with dp:
            pass
    assert dp._relay is None
    assert [t.get_name() for t in asyncio.all_tasks() - before if not t.done()] == []


async def test_a_unit_exited_in_another_context_still_rolls_back_and_releases(
    orders: Database,
) -> None:
    dp = shop(orders)
    dp.start()
    scope = dp.unit_of_work()
    await scope.__aenter__()
    with pytest.raises(ValueError, match="different Context"):  # set in another context
        await asyncio.create_task(scope.__aexit__(None, None, None))
    pool = orders._pool
    assert pool is not None
    assert dp._table.units == 0
    assert pool.get_idle_size() == pool.get_size()
    await dp.stop()
