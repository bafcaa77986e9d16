"""An orders API on FastAPI: the order row and its event commit together, or neither does.

    python examples/fastapi_app.py

Needs PostgreSQL (IAMBUS_POSTGRES_DSN, default postgresql://postgres@127.0.0.1:5432/test)
and a broker, chosen by URL (IAMBUS_BROKER_URL: redis://, amqp:// or nats://; default
redis://127.0.0.1:6379/0). Each run uses a schema and a broker namespace of its own, and
drops both at the end.

* orders, the app: ``POST /orders`` inserts the order through the request's SQLAlchemy
  ``AsyncSession`` and publishes ``OrderPlaced`` in one unit of work (the event is an
  outbox row of the same transaction; the app's dispatcher relays it once committed). An
  order of nothing raises ``HTTPException`` after publishing: the unit rolls back, and
  neither the row nor the event is left. ``GET /orders/{id}/invoice`` asks billing
  through the broker (``dp.query``).
* billing, a worker: invoices each ``OrderPlaced``, and answers ``GetInvoice``.

In production the app runs under an ASGI server (``uvicorn examples.fastapi_app:app``
with a module-level ``app = create_app(...)``), which runs the lifespan; here ``main``
plays the server, running the lifespan and sending requests with HTTPX.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at
# runtime, and those in create_app() name its locals (Unit), which a string cannot reach.

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from iambus import Dispatcher, Query
from iambus.database import Database
from iambus.fastapi import DispatcherDep, lifespan, unit_of_work
from iambus.transports import Transport, connect
from iambus.unit_of_work import UnitOfWork

DSN = os.environ.get("IAMBUS_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("IAMBUS_BROKER_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str | None]):
    order_id: int


ROUTES = {OrderPlaced: "billing", GetInvoice: "billing"}
CUSTOMER = "customer-7"  # one key: billing gets this customer's orders in commit order


class NewOrder(BaseModel):
    order_id: int
    amount_cents: int


def create_app(transport: Transport | str, engine: AsyncEngine, schema: str) -> FastAPI:
    """The orders API; its tables (and iambus's) are in ``schema``."""
    dp = Dispatcher(
        transport=transport,
        service="orders",
        routes=ROUTES,
        database=Database(engine, schema=schema),
    )

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            yield session

    Unit = Annotated[UnitOfWork, unit_of_work(get_session)]
    app = FastAPI(lifespan=lifespan(dp))

    @app.post("/orders", status_code=201)
    async def place_order(order: NewOrder, unit: Unit, dp: DispatcherDep) -> NewOrder:
        await unit.session.execute(
            text(f"INSERT INTO {schema}.orders VALUES (:id, :amount)"),
            {"id": order.order_id, "amount": order.amount_cents},
        )
        await dp.publish(OrderPlaced(order.order_id, order.amount_cents), key=CUSTOMER)
        if order.amount_cents <= 0:  # after the insert and the publish: both roll back
            raise HTTPException(422, f"order {order.order_id}: nothing to pay")
        return order

    @app.get("/orders/{order_id}/invoice")
    async def get_invoice(order_id: int, dp: DispatcherDep) -> str:
        invoice = await dp.query(GetInvoice(order_id))
        if invoice is None:
            raise HTTPException(404, f"order {order_id} has no invoice yet")
        return invoice

    return app


def billing_service(transport: Transport | str) -> Dispatcher:
    dp = Dispatcher(transport=transport, service="billing", routes=ROUTES)
    invoices: dict[int, str] = {}

    @dp.events.register(OrderPlaced)
    async def invoice(event: OrderPlaced) -> None:
        invoices[event.order_id] = f"INV-{event.order_id} for {event.amount_cents / 100:.2f} EUR"
        print(f"billing: invoiced order {event.order_id}")

    @dp.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str | None:
        return invoices.get(query.order_id)

    return dp


async def create_tables(engine: AsyncEngine, schema: str) -> None:
    """iambus's tables (``iambus db init`` in a real deployment) and the app's."""
    await Database(engine, schema=schema).create()
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {schema}.orders (order_id int, amount int)"))


async def invoice_of(client: httpx.AsyncClient, order_id: int, timeout: float = 10.0) -> str:
    """Ask for the invoice until billing has one (it comes once OrderPlaced arrives)."""
    deadline = time.monotonic() + timeout
    while (response := await client.get(f"/orders/{order_id}/invoice")).status_code == 404:
        if time.monotonic() > deadline:
            raise TimeoutError(f"billing did not invoice order {order_id} in {timeout}s")
        await asyncio.sleep(0.05)
    response.raise_for_status()
    invoice: str = response.json()
    return invoice


class Destroyable(Protocol):
    """The broker transports' ``destroy()``: Redis and NATS delete the namespace, RabbitMQ
    the queues that transport declared."""

    async def destroy(self) -> int: ...


def with_namespace(url: str, namespace: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query), namespace=namespace)
    return parts._replace(query=urlencode(query)).geturl()


async def main() -> None:
    engine = create_async_engine(DSN.replace("postgresql://", "postgresql+asyncpg://"))
    schema = f"example_{uuid.uuid4().hex[:8]}"
    url = with_namespace(BROKER_URL, f"fastapi-{uuid.uuid4().hex[:8]}")
    await create_tables(engine, schema)
    transports = [connect(url), connect(url)]  # the app's, billing's
    app = create_app(transports[0], engine, schema)
    billing = billing_service(transports[1])
    try:
        # What an ASGI server does at startup and shutdown (httpx's ASGITransport sends
        # requests only): the app's lifespan starts the orders dispatcher, and stops it.
        async with (
            billing,
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client,
        ):
            placed = await client.post("/orders", json={"order_id": 1, "amount_cents": 4200})
            print(f"main: POST /orders -> {placed.status_code}")
            print(f"main: GET /orders/1/invoice -> {await invoice_of(client, 1)}")
            refused = await client.post("/orders", json={"order_id": 2, "amount_cents": 0})
            print(f"main: POST /orders -> {refused.status_code} {refused.json()['detail']}")
            await client.post("/orders", json={"order_id": 3, "amount_cents": 1500})
            # Same key as order 2: had its event been sent, billing would have had it first.
            print(f"main: GET /orders/3/invoice -> {await invoice_of(client, 3)}")
            missing = await client.get("/orders/2/invoice")
            print(f"main: GET /orders/2/invoice -> {missing.status_code}")
        async with engine.connect() as conn:
            rows = await conn.execute(text(f"SELECT order_id FROM {schema}.orders ORDER BY 1"))
            print(f"main: orders in the database {[row[0] for row in rows]}")
    finally:
        for transport in transports:  # delete what the run left on the broker
            await transport.open()
            await cast(Destroyable, transport).destroy()
            await transport.close()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()
    print("main: done; the schema and the namespace are gone")


if __name__ == "__main__":
    asyncio.run(main())
