"""The FastAPI integration: lifespan, the dispatcher dependency, units of work per request.

Requests go through ``httpx.ASGITransport``, which sends requests only; the lifespan is
run by ``serving()`` below, which speaks the ASGI lifespan protocol to the app as a
server does (startup, then shutdown), so that what a server would see — a startup that
fails, the order of shutdown — is what the tests see. (Starlette's ``TestClient`` runs the
lifespan too, but in a thread of its own: the dispatcher would live on another loop than
the tests' PostgreSQL and broker connections.) Units of work run on the real PostgreSQL;
the example app runs against every broker.
"""

# No `from __future__ import annotations`: the endpoints below are defined inside the
# tests, and FastAPI resolves their annotations (local aliases) at runtime.

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from examples import fastapi_app
from fastapi import Depends, FastAPI, HTTPException, WebSocket
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iambus import Dispatcher, DispatcherStopped, ImproperlyConfigured, Query, Timeouts
from iambus.database import Database
from iambus.fastapi import STATE, DispatcherDep, get_dispatcher, lifespan, unit_of_work
from iambus.transports.memory import MemoryTransport
from iambus.unit_of_work import UnitOfWork

from .conftest import Bus

Message = MutableMapping[str, Any]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[None]:
    """Run the app's lifespan as an ASGI server does; a failed startup raises its error."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    running = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] == "lifespan.startup.failed":
        await running  # raises what failed the startup
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        stopped = await from_app.get()
        await running
        assert stopped["type"] == "lifespan.shutdown.complete", stopped


def client(app: FastAPI, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


@dataclass(frozen=True, slots=True)
class Ping(Query[str]):
    pass


@dataclass(frozen=True, slots=True)
class Slow:
    pass


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class Noted:  # in-process: nobody routes it
    order_id: int


def pinging(**options: Any) -> Dispatcher:
    dp = Dispatcher(**options)

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> str:
        return "pong"

    return dp


def ping_app(dp: Dispatcher) -> FastAPI:
    app = FastAPI(lifespan=lifespan(dp))

    @app.get("/ping")
    async def ping(got: DispatcherDep) -> dict[str, Any]:
        return {"answer": await got.query(Ping()), "same": got is dp}

    return app


def test_import_iambus_imports_no_fastapi() -> None:
    code = "import sys, iambus\nprint(sorted({'fastapi', 'starlette'} & set(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- lifespan --------------------------------------------------------------------------


async def test_the_dispatcher_starts_with_the_app_and_stops_with_it() -> None:
    dp = pinging()
    app = ping_app(dp)
    assert not dp.started
    async with serving(app):
        assert dp.started
        assert getattr(app.state, STATE) is dp
        async with client(app) as http:
            response = await http.get("/ping")
        assert response.json() == {"answer": "pong", "same": True}
    assert not hasattr(app.state, STATE)
    with pytest.raises(DispatcherStopped):
        await dp.query(Ping())


async def test_shutdown_lets_background_work_finish() -> None:
    dp = Dispatcher()
    finished: list[str] = []
    release = asyncio.Event()

    @dp.events.register(Slow)
    async def slow(event: Slow) -> None:
        await release.wait()
        finished.append("slow")

    app = FastAPI(lifespan=lifespan(dp))

    @app.post("/slow")
    async def queue_slow(got: DispatcherDep) -> None:
        await got.handle(Slow())  # queued for the background workers; returns at once

    async with serving(app):
        async with client(app) as http:
            assert (await http.post("/slow")).status_code == 200
        assert finished == []
        asyncio.get_running_loop().call_soon(release.set)
    assert finished == ["slow"]  # the shutdown drained it


async def test_shutdown_is_bounded_by_the_dispatchers_shutdown_timeout() -> None:
    dp = Dispatcher(timeouts=Timeouts(shutdown=0.2))
    began = asyncio.Event()
    cancelled: list[bool] = []

    @dp.events.register(Slow)
    async def forever(event: Slow) -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    app = FastAPI(lifespan=lifespan(dp))
    async with serving(app):
        await dp.handle(Slow())
        await began.wait()
    assert cancelled == [True]  # the stop gave up on it after 0.2 s


async def test_a_lifespan_of_ones_own_around_the_dispatchers() -> None:
    dp = pinging()
    seen: list[str] = []
    bus = lifespan(dp)

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        seen.append("pool opened")
        async with bus(app):
            seen.append(f"dispatcher started: {dp.started}")
            yield {"name": "shop"}  # lifespan state of one's own still works
            seen.append("dispatcher stopping")
        seen.append("pool closed")

    app = FastAPI(lifespan=own)

    @app.get("/ping")
    async def ping(got: DispatcherDep) -> str:
        return await got.query(Ping())

    async with serving(app), client(app) as http:
        assert (await http.get("/ping")).json() == "pong"
    assert seen == ["pool opened", "dispatcher started: True", "dispatcher stopping", "pool closed"]
    with pytest.raises(DispatcherStopped):
        await dp.query(Ping())


async def test_a_dispatcher_that_fails_to_start_fails_the_startup() -> None:
    dp = Dispatcher()  # a unit of work needs a database, and there is none

    @dp.events.register(Slow, unit_of_work=True)
    async def needs_a_database(event: Slow) -> None:
        pass

    app = FastAPI(lifespan=lifespan(dp))
    with pytest.raises(ImproperlyConfigured, match="database"):
        async with serving(app):
            pass
    assert not hasattr(app.state, STATE)


async def test_the_lifespan_refuses_a_dispatcher_listening_for_signals() -> None:
    app = ping_app(pinging(listen_for_signals=True))
    with pytest.raises(ImproperlyConfigured, match="listen_for_signals=False"):
        async with serving(app):
            pass


async def test_one_app_runs_one_dispatcher() -> None:
    first, second = lifespan(pinging()), lifespan(pinging())

    @asynccontextmanager
    async def both(app: FastAPI) -> AsyncIterator[None]:
        async with first(app), second(app):
            yield

    with pytest.raises(ImproperlyConfigured, match="runs a dispatcher already"):
        async with serving(FastAPI(lifespan=both)):
            pass


def test_lifespan_takes_a_dispatcher() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"lifespan\(dp\) must be an iambus.Dispatcher"):
        lifespan("redis://127.0.0.1:6379/0")  # type: ignore[arg-type]


# -- the dispatcher dependency ---------------------------------------------------------


async def test_an_endpoint_without_the_lifespan_is_told_how_to_fix_it() -> None:
    dp = pinging()
    app = ping_app(dp)
    async with client(app) as http:  # the lifespan never ran: the server skipped it
        with pytest.raises(ImproperlyConfigured, match=r"lifespan_context\(app\)"):
            await http.get("/ping")
    async with serving(app):
        pass
    async with client(app) as http:  # and after the shutdown
        with pytest.raises(ImproperlyConfigured, match="no iambus dispatcher is running"):
            await http.get("/ping")


async def test_a_websocket_endpoint_gets_the_dispatcher_too() -> None:
    dp = pinging()
    app = FastAPI(lifespan=lifespan(dp))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, got: DispatcherDep) -> None:
        await websocket.accept()
        await websocket.send_text(await got.query(Ping()))
        await websocket.close()

    # httpx speaks no WebSocket: the ASGI messages a server would exchange, by hand.
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    async with serving(app):
        await to_app.put({"type": "websocket.connect"})
        await app(scope, to_app.get, from_app.put)
    sent = [from_app.get_nowait() for _ in range(from_app.qsize())]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "pong"


async def test_tests_can_override_the_dispatcher() -> None:
    app = ping_app(pinging())
    other = pinging()
    app.dependency_overrides[get_dispatcher] = lambda: other
    async with other, client(app) as http:
        assert (await http.get("/ping")).json() == {"answer": "pong", "same": False}


# -- a unit of work per request (PostgreSQL) ---------------------------------------------


@pytest.fixture
async def orders(database: Database) -> Database:
    async with database.connection() as conn:
        await conn.execute(f'CREATE TABLE "{database.schema}".orders (id int PRIMARY KEY)')
    return database


async def order_ids(database: Database) -> list[int]:
    async with database.connection() as conn:
        rows = await conn.fetch(f'SELECT id FROM "{database.schema}".orders ORDER BY id')
    return [row["id"] for row in rows]


async def outbox_names(database: Database) -> list[str]:
    async with database.connection() as conn:
        rows = await conn.fetch(f"SELECT name FROM {database.outbox} ORDER BY position")
    return [row["name"] for row in rows]


def shop(database: Database, noted: list[int]) -> Dispatcher:
    """Routed OrderPlaced goes to the outbox (no relay: the rows stay to be read);
    in-process Noted runs after the commit."""
    dp = Dispatcher(
        transport=MemoryTransport(),
        service="shop",
        routes={OrderPlaced: "shop"},
        database=database,
        relay=False,
    )

    @dp.events.register(Noted)
    async def note(event: Noted) -> None:
        noted.append(event.order_id)

    return dp


def order_app(
    dp: Dispatcher,
    table: str,
    unit: Any,
    *,
    insert: Callable[[Any, int], Awaitable[Any]],
) -> FastAPI:
    """POST /orders/{id}: inserts the order, publishes OrderPlaced and Noted; fails after
    them all when ``fail`` is set."""
    Unit = Annotated[UnitOfWork, unit]
    app = FastAPI(lifespan=lifespan(dp))

    @app.post("/orders/{order_id}", status_code=201)
    async def place(order_id: int, unit: Unit, got: DispatcherDep, fail: str = "") -> int:
        await insert(unit.session, order_id)
        await got.publish(OrderPlaced(order_id))
        await got.publish(Noted(order_id))
        if fail == "http":
            raise HTTPException(409, "taken")
        if fail == "error":
            raise RuntimeError("card declined")
        return order_id

    return app


def sqlalchemy_insert(table: str) -> Callable[[Any, int], Awaitable[Any]]:
    async def insert(session: AsyncSession, order_id: int) -> None:
        await session.execute(text(f"INSERT INTO {table} VALUES (:id)"), {"id": order_id})

    return insert


def asyncpg_insert(table: str) -> Callable[[Any, int], Awaitable[Any]]:
    async def insert(conn: asyncpg.Connection, order_id: int) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES ($1)", order_id)

    return insert


@pytest.mark.parametrize("driver", ["sqlalchemy", "asyncpg", "dispatchers"])
async def test_an_endpoints_writes_and_messages_commit_together_or_not_at_all(
    orders: Database, engine: AsyncEngine, driver: str
) -> None:
    table = f'"{orders.schema}".orders'
    noted: list[int] = []
    if driver == "sqlalchemy":

        async def get_session() -> AsyncIterator[AsyncSession]:
            async with AsyncSession(engine) as session:
                yield session

        dp = shop(Database(engine, schema=orders.schema), noted)
        app = order_app(dp, table, unit_of_work(get_session), insert=sqlalchemy_insert(table))
    elif driver == "asyncpg":

        async def get_connection() -> AsyncIterator[asyncpg.Connection]:
            async with orders.connection() as conn:
                yield conn

        dp = shop(orders, noted)
        app = order_app(dp, table, unit_of_work(get_connection), insert=asyncpg_insert(table))
    else:  # no session dependency: a connection of the dispatcher's database
        dp = shop(orders, noted)
        app = order_app(dp, table, unit_of_work(), insert=asyncpg_insert(table))

    async with serving(app), client(app) as http:
        assert (await http.post("/orders/1")).status_code == 201
        # Committed before the response was sent: visible as soon as it arrives.
        assert await order_ids(orders) == [1]
        assert await outbox_names(orders) == ["OrderPlaced"]
        await dp.join()
        assert noted == [1]

        refused = await http.post("/orders/2", params={"fail": "http"})
        assert refused.status_code == 409
        with pytest.raises(RuntimeError, match="card declined"):
            await http.post("/orders/3", params={"fail": "error"})
        await dp.join()
    # Nothing of orders 2 and 3: no row, no outbox row, no in-process event.
    assert await order_ids(orders) == [1]
    assert await outbox_names(orders) == ["OrderPlaced"]
    assert noted == [1]


async def test_the_endpoint_shares_the_units_session(orders: Database, engine: AsyncEngine) -> None:
    opened: list[AsyncSession] = []

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            opened.append(session)
            yield session

    dp = shop(Database(engine, schema=orders.schema), [])
    app = FastAPI(lifespan=lifespan(dp))

    @app.post("/orders/{order_id}")
    async def place(
        order_id: int,
        unit: Annotated[UnitOfWork, unit_of_work(get_session)],
        session: Annotated[AsyncSession, Depends(get_session)],
    ) -> bool:
        await session.execute(
            text(f'INSERT INTO "{orders.schema}".orders VALUES (:id)'), {"id": order_id}
        )
        return unit.session is session

    async with serving(app), client(app) as http:
        assert (await http.post("/orders/5")).json() is True
    assert len(opened) == 1
    assert await order_ids(orders) == [5]  # written on the session, committed by the unit


async def test_a_unit_joins_the_transaction_the_session_dependency_began(
    orders: Database, engine: AsyncEngine
) -> None:
    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session, session.begin():  # commits: ours
            yield session

    table = f'"{orders.schema}".orders'
    noted: list[int] = []
    dp = shop(Database(engine, schema=orders.schema), noted)
    app = order_app(dp, table, unit_of_work(get_session), insert=sqlalchemy_insert(table))
    async with serving(app), client(app) as http:
        assert (await http.post("/orders/1")).status_code == 201
        with pytest.raises(RuntimeError, match="card declined"):
            await http.post("/orders/2", params={"fail": "error"})
        await dp.join()
    # The dependency's commit took the outbox row with it; its rollback, order 2's.
    assert await order_ids(orders) == [1]
    assert await outbox_names(orders) == ["OrderPlaced"]
    assert noted == [1]  # in-process work waited for that commit


async def test_a_failed_commit_is_an_error_response_not_a_success(engine: AsyncEngine) -> None:
    # iambus's tables are missing: writing the outbox row fails when the unit ends, which
    # FastAPI runs before the response is sent.
    schema = f"test_{uuid.uuid4().hex[:10]}"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        dp = shop(Database(engine, schema=schema), [])

        async def get_session() -> AsyncIterator[AsyncSession]:
            async with AsyncSession(engine) as session:
                yield session

        async def nothing(session: Any, order_id: int) -> None:
            pass

        app = order_app(dp, "", unit_of_work(get_session), insert=nothing)
        async with serving(app), client(app, raise_app_exceptions=False) as http:
            response = await http.post("/orders/1")
        assert response.status_code == 500
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


async def test_a_unit_needs_the_dispatcher_to_have_a_database() -> None:
    dp = pinging()
    app = FastAPI(lifespan=lifespan(dp))

    @app.post("/")
    async def place(unit: Annotated[UnitOfWork, unit_of_work()]) -> None:
        pass

    async with serving(app), client(app) as http:
        with pytest.raises(ImproperlyConfigured, match=r"Dispatcher\(database=Database"):
            await http.post("/")


async def test_a_session_dependency_must_give_a_session(orders: Database) -> None:
    dp = shop(orders, [])
    app = FastAPI(lifespan=lifespan(dp))

    async def get_session() -> str:
        return "not a session"

    @app.post("/")
    async def place(unit: Annotated[UnitOfWork, unit_of_work(get_session)]) -> None:
        pass

    async with serving(app), client(app) as http:
        with pytest.raises(ImproperlyConfigured, match="AsyncSession or an asyncpg connection"):
            await http.post("/")


def test_unit_of_work_takes_a_dependency() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"unit_of_work\(session\) must be a dependency"):
        unit_of_work("get_session")  # type: ignore[arg-type]


# -- the example app, on every broker ------------------------------------------------------


async def test_the_example_app_on_a_broker(bus: Bus, engine: AsyncEngine) -> None:
    schema = f"test_{uuid.uuid4().hex[:10]}"
    await fastapi_app.create_tables(engine, schema)
    try:
        app = fastapi_app.create_app(bus.transport(), engine, schema)
        billing = fastapi_app.billing_service(bus.transport())
        async with billing, serving(app), client(app) as http:
            placed = await http.post("/orders", json={"order_id": 1, "amount_cents": 4200})
            assert placed.status_code == 201
            # The event went through the outbox and the broker to billing's worker;
            # the query comes back through the broker.
            assert await fastapi_app.invoice_of(http, 1) == "INV-1 for 42.00 EUR"
            refused = await http.post("/orders", json={"order_id": 2, "amount_cents": 0})
            assert refused.status_code == 422
            await http.post("/orders", json={"order_id": 3, "amount_cents": 1500})
            # Order 2's event, had it been sent, would have reached billing before 3's
            # (one key: commit order).
            assert await fastapi_app.invoice_of(http, 3) == "INV-3 for 15.00 EUR"
            assert (await http.get("/orders/2/invoice")).status_code == 404
        async with engine.connect() as conn:
            rows = await conn.execute(text(f"SELECT order_id FROM {schema}.orders ORDER BY 1"))
            assert [row[0] for row in rows] == [1, 3]
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
