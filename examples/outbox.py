"""Orders and billing on PostgreSQL and Redis: nothing lost between the database and the broker.

    python examples/outbox.py

Needs PostgreSQL (IAMBUS_POSTGRES_DSN, default postgresql://postgres@127.0.0.1:5432/test)
and Redis (IAMBUS_REDIS_URL, default redis://127.0.0.1:6379/0). Each run makes a schema
and a Redis namespace of its own, and drops both at the end. (Both services keep their
tables in that one schema, sharing iambus's outbox and inbox; in production each
service has its own database, and runs `iambus db init` on it once.)

* orders (SQLAlchemy): ``PlaceOrder`` inserts the order and publishes ``OrderPlaced`` in
  one unit of work: the event is an outbox row of the same transaction, which the
  dispatcher's relay sends to Redis once committed. ``main`` opens a unit of work of its
  own too, which fails: it leaves neither the order nor its event.
* billing (asyncpg): ``OrderPlaced`` is invoiced in a unit of work too, whose inbox
  record makes a redelivered event an ack without a second invoice.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from iambus import Command, Dispatcher
from iambus.database import Database
from iambus.transports.redis import RedisTransport

DSN = os.environ.get("IAMBUS_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
SCHEMA = f"example_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class PlaceOrder(Command[None]):
    order_id: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int
    amount_cents: int


ROUTES = {PlaceOrder: "orders", OrderPlaced: "orders"}
CUSTOMER = "customer-7"


def orders_service(transport: RedisTransport, database: Database) -> Dispatcher:
    dp = Dispatcher(transport=transport, service="orders", routes=ROUTES, database=database)

    @dp.commands.register(PlaceOrder)
    async def place_order(command: PlaceOrder, session: AsyncSession) -> None:
        await session.execute(
            text(f"INSERT INTO {SCHEMA}.orders VALUES (:id, :amount)"),
            {"id": command.order_id, "amount": command.amount_cents},
        )
        event = OrderPlaced(command.order_id, command.amount_cents)
        await dp.publish(event, key=CUSTOMER)  # per customer, in the order committed
        print(f"orders: placed order {command.order_id}")

    return dp


def billing_service(transport: RedisTransport, database: Database) -> Dispatcher:
    dp = Dispatcher(transport=transport, service="billing", routes=ROUTES, database=database)

    @dp.events.register(OrderPlaced)
    async def invoice(event: OrderPlaced, conn: asyncpg.Connection) -> None:
        await conn.execute(
            f"INSERT INTO {SCHEMA}.invoices VALUES ($1, $2)", event.order_id, event.amount_cents
        )
        print(f"billing: invoiced order {event.order_id}: {event.amount_cents / 100:.2f} EUR")

    return dp


async def rows(database: Database, table: str) -> list[int]:
    async with database.connection() as conn:
        query = f"SELECT order_id FROM {SCHEMA}.{table} ORDER BY order_id"
        return [row[0] for row in await conn.fetch(query)]


async def main() -> None:
    engine = create_async_engine(DSN.replace("postgresql://", "postgresql+asyncpg://"))
    orders_db = Database(engine, schema=SCHEMA)
    billing_db = Database(DSN, schema=SCHEMA)
    await billing_db.create()  # iambus's tables: `iambus db init` in a real deployment
    async with billing_db.connection() as conn:
        await conn.execute(f"CREATE TABLE {SCHEMA}.orders (order_id int, amount int)")
        await conn.execute(f"CREATE TABLE {SCHEMA}.invoices (order_id int, amount int)")
    namespace = f"outbox-{uuid.uuid4().hex[:8]}"
    transport = RedisTransport(REDIS_URL, namespace=namespace)
    try:
        async with (
            orders_service(transport, orders_db) as orders,
            billing_service(transport, billing_db),
        ):
            await orders.execute(PlaceOrder(1, 4200))
            await invoiced(billing_db, 1)
            try:  # a unit of work of its own, outside any handler, that fails
                async with AsyncSession(engine) as session, orders.unit_of_work(session):
                    await session.execute(text(f"INSERT INTO {SCHEMA}.orders VALUES (2, 0)"))
                    await orders.publish(OrderPlaced(2, 0), key=CUSTOMER)
                    raise ValueError("order 2: nothing to pay")
            except ValueError as exc:
                print(f"main: {exc}; rolled back, its event with it")
            # The broker delivers at least once. Send order 1's event again, as a
            # redelivery would: same envelope id (the one in billing's inbox), same key.
            # Billing finds its inbox record and acks it without a second invoice; order
            # 3's event, of the same key, is handled after it.
            async with billing_db.connection() as conn:
                first = await conn.fetchval(
                    f"SELECT message_id FROM {billing_db.inbox} WHERE handler LIKE '%invoice'"
                )
            await orders.send(OrderPlaced(1, 4200), key=CUSTOMER, id=first)
            await orders.execute(PlaceOrder(3, 1500))
            await invoiced(billing_db, 3)
        print(f"main: orders {await rows(billing_db, 'orders')}")
        print(f"main: invoices {await rows(billing_db, 'invoices')}")
    finally:
        await transport.close()
        cleaner = RedisTransport(REDIS_URL, namespace=namespace)
        await cleaner.open()
        await cleaner.destroy()
        await cleaner.close()
        async with billing_db.connection() as conn:
            await conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
        await billing_db.close()
        await engine.dispose()
    print("main: done; the schema and the namespace are gone")


async def invoiced(database: Database, order_id: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while order_id not in await rows(database, "invoices"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"billing did not invoice order {order_id} in {timeout}s")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
