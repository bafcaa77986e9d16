"""Outbox rows: what a unit of work writes, per-key commit order, and reading a row back."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from iambus import Dispatcher, SerializationError
from iambus.database import Database
from iambus.envelope import Envelope
from iambus.outbox import LANES, ROW_COLUMNS, Outgoing, envelope_of, lane_of, write
from iambus.relay import Relay
from iambus.transports.memory import MemoryTransport


def test_one_key_one_lane() -> None:
    assert lane_of("order-7") == lane_of("order-7")
    assert {lane_of(f"k{n}") for n in range(200)} == set(range(LANES))
    assert {lane_of(None) for _ in range(500)} == set(range(LANES))


async def test_a_row_gives_back_its_envelope(database: Database) -> None:
    sent = Envelope(
        name="OrderPlaced",
        payload=b'{"order_id":1}',
        key="o-1",
        correlation_id="c",
        causation_id="p",
        headers={"h": "v"},
    )
    async with database.connection() as conn:
        async with conn.transaction():
            await write(conn, database, [Outgoing("event.OrderPlaced", sent)])
        row = await conn.fetchrow(f"SELECT {ROW_COLUMNS} FROM {database.outbox}")
    assert row["address"] == "event.OrderPlaced"
    assert envelope_of(row) == sent


async def test_a_row_that_holds_no_envelope_is_named(database: Database) -> None:
    async with database.connection() as conn:
        await conn.execute(
            f"INSERT INTO {database.outbox} (lane, address, message_id, name, payload, "
            f"content_type, headers, created_at) VALUES (0, 'a', 'm', 'n', '', 'x', "
            f"""'{json.dumps({"h": 1})}', 0)"""
        )
        row = await conn.fetchrow(f"SELECT {ROW_COLUMNS} FROM {database.outbox}")
    with pytest.raises(SerializationError, match=r"outbox row \d+ does not hold an envelope"):
        envelope_of(row)


async def test_writers_of_one_key_take_positions_in_commit_order(database: Database) -> None:
    """B writes key K while A, which wrote K first, is still open: B waits for A's commit,
    so B's row comes after A's in position order as it does in commit order."""

    def out(n: int) -> list[Outgoing]:
        return [Outgoing("event.E", Envelope(name="E", payload=str(n).encode(), key="K"))]

    async with database.connection() as a, database.connection() as b:
        tx_a = a.transaction()
        await tx_a.start()
        await write(a, database, out(1))
        b_pid = b.get_server_pid()

        async def write_b() -> None:
            async with b.transaction():
                await write(b, database, out(2))

        writing = asyncio.create_task(write_b())
        async with database.connection() as watch:
            while not await watch.fetchval(
                "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1", b_pid
            ):
                assert not writing.done(), "B did not wait for A's lock"
                await asyncio.sleep(0.01)
        await tx_a.commit()
        await writing
        rows = await a.fetch(f"SELECT payload FROM {database.outbox} ORDER BY position")
    assert [bytes(r["payload"]) for r in rows] == [b"1", b"2"]


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


async def test_a_row_whose_payload_no_longer_decodes_ends_in_the_dead_letters(
    database: Database,
) -> None:
    """The relay sends a row as it is (it does not decode payloads); the consumer that
    cannot decode it dead-letters it with the reason: nothing is lost, nothing loops."""
    transport = MemoryTransport()
    dp = Dispatcher(
        transport=transport,
        service="billing",
        routes={OrderPlaced: "shop"},
        database=database,
        relay=False,
    )
    handled: list[OrderPlaced] = []

    @dp.events.register(OrderPlaced)
    async def invoice(event: OrderPlaced) -> None:
        handled.append(event)

    async with dp:
        bad = Envelope(name="OrderPlaced", payload=b'{"order_id": "seven"}')
        good = Envelope(name="OrderPlaced", payload=b'{"order_id": 7}')
        async with database.connection() as conn, conn.transaction():
            outgoing = [Outgoing("event.OrderPlaced", e) for e in (bad, good)]
            await write(conn, database, outgoing)
        assert await Relay(database, transport).run_once() == 2
        await dp.join()
    assert handled == [OrderPlaced(7)]
    [letter] = await transport.dead_letters()
    assert letter.envelope.id == bad.id
    assert "order_id" in letter.failure.message
