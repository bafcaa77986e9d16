"""The relay, on the real PostgreSQL: outbox rows reach the transport, once in normal
operation, per key in commit order, and nothing is lost when the broker, the database or
the relay itself fails.

The transport is a ``MemoryTransport`` (a real transport; ``received`` reads what the
relay sent through a group declared from the start), and Redis in one test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from iambus import Envelope, ImproperlyConfigured, SerializationError, TransportError
from iambus.database import Database
from iambus.outbox import Outgoing, lane_of, write
from iambus.relay import (
    FAILED_SENDS,
    STOP_GRACE,
    OutboxStatus,
    Relay,
    outbox_status,
    parked,
    release,
)
from iambus.transports import Transport
from iambus.transports.memory import MemoryTransport

from .conftest import POSTGRES_DSN, require

ADDRESS = "event.Thing"
GROUP = "readers"


def envelope(n: int, key: str | None = None, **fields: Any) -> Envelope:
    return Envelope(name="Thing", payload=json.dumps({"n": n}).encode(), key=key, **fields)


def n_of(e: Envelope) -> int:
    return int(json.loads(e.payload)["n"])


async def commit(database: Database, *envelopes: Envelope) -> None:
    async with database.connection() as conn, conn.transaction():
        await write(conn, database, [Outgoing(ADDRESS, e) for e in envelopes])


async def count_rows(database: Database) -> int:
    async with database.connection() as conn:
        return int(await conn.fetchval(f"SELECT count(*) FROM {database.outbox}"))


async def received(transport: Transport, count: int, *, wait: float = 5.0) -> list[Envelope]:
    """The next ``count`` envelopes sent to ADDRESS, acked, in the order they came."""
    got: list[Envelope] = []
    deadline = time.monotonic() + wait
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"expected {count} envelopes, got {len(got)}: {got}"
        for delivery in await transport.receive(
            ADDRESS, GROUP, consumer="test", limit=count - len(got), wait=min(left, 0.5)
        ):
            got.append(delivery.envelope)
            await delivery.ack()
    return got


async def rest(transport: Transport) -> list[Envelope]:
    """Whatever else was sent (the relays are done: nothing more is on its way)."""
    got: list[Envelope] = []
    while batch := await transport.receive(ADDRESS, GROUP, consumer="test", limit=100, wait=0):
        for delivery in batch:
            got.append(delivery.envelope)
            await delivery.ack()
    return got


async def until(holds: Callable[[], Any], what: str, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while not await holds():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def transport() -> MemoryTransport:
    made = MemoryTransport()
    await made.declare(ADDRESS, GROUP, from_start=True)
    return made


@pytest.fixture
async def relays() -> AsyncIterator[list[Relay]]:
    """Relays a test starts; each is stopped at the end."""
    made: list[Relay] = []
    yield made
    for relay in made:
        await relay.stop(asyncio.get_running_loop().time() + 2)


class Failing:
    """A transport whose sends fail (``TransportError``) from the ``after``-th one on,
    ``times`` times in a row; or raise ``error`` for the envelopes ``reject`` picks."""

    def __init__(
        self,
        transport: Transport,
        *,
        after: int = 0,
        times: int = 0,
        reject: Callable[[Envelope], bool] = lambda _: False,
        error: Exception | None = None,
    ) -> None:
        self.transport, self.after, self.times = transport, after, times
        self.reject, self.error = reject, error
        self.url = "failing+" + transport.url
        self.calls = 0

    async def send(self, address: str, envelope: Envelope) -> None:
        self.calls += 1
        if self.calls > self.after and self.times > 0:
            self.times -= 1
            raise TransportError("the broker is down (a test's doing)")
        if self.reject(envelope):
            assert self.error is not None
            raise self.error
        await self.transport.send(address, envelope)


class Slow:
    """A transport that takes a millisecond per send, as a broker across a network does
    (so that two relays' batches overlap in time)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.url = "slow+" + transport.url

    async def send(self, address: str, envelope: Envelope) -> None:
        await asyncio.sleep(0.001)
        await self.transport.send(address, envelope)


class Stalling:
    """A transport that sends ``through`` envelopes, then hangs on the next send until
    ``go`` is set (and sends it)."""

    def __init__(self, transport: Transport, through: int) -> None:
        self.transport, self.through = transport, through
        self.url = "stalling+" + transport.url
        self.stalled = asyncio.Event()
        self.go = asyncio.Event()
        self.calls = 0

    async def send(self, address: str, envelope: Envelope) -> None:
        self.calls += 1
        if self.calls > self.through and not self.go.is_set():
            self.stalled.set()
            await self.go.wait()
        await self.transport.send(address, envelope)


class Overlapping:
    """A transport whose sends take a random few milliseconds (so that they return in
    another order than they went out), counting how many are outstanding at once."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.url = "overlapping+" + transport.url
        self.now = self.most = 0
        self.keys_now: Counter[str | None] = Counter()

    async def send(self, address: str, envelope: Envelope) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        self.keys_now[envelope.key] += 1
        if envelope.key is not None:
            assert self.keys_now[envelope.key] == 1, f"two sends of {envelope.key} at once"
        try:
            await asyncio.sleep(random.uniform(0, 0.003))
            await self.transport.send(address, envelope)
        finally:
            self.now -= 1
            self.keys_now[envelope.key] -= 1


def relay_on(database: Database, transport: Any, relays: list[Relay], **options: Any) -> Relay:
    relay = Relay(database, transport, **options)
    relays.append(relay)
    return relay


def keys_in_one_lane(count: int) -> list[str]:
    """``count`` distinct keys that share a lane."""
    lane = lane_of("key-0")
    return [k for k in (f"key-{i}" for i in range(1000)) if lane_of(k) == lane][:count]


# -- sending ------------------------------------------------------------------------------


async def test_rows_are_sent_with_their_envelope_then_deleted(
    database: Database, transport: MemoryTransport
) -> None:
    keyed = envelope(
        1,
        key="order-7",
        correlation_id="corr-1",
        causation_id="cause-1",
        headers={"tenant": "acme", "trace": "abc"},
    )
    plain = envelope(2, content_type="application/x-test")
    await commit(database, keyed, plain)
    relay = Relay(database, transport)

    assert await relay.run_once() == 2

    got = sorted(await received(transport, 2), key=n_of)
    assert got == [keyed, plain]  # every field: id, name, payload, key, headers, created_at...
    assert await count_rows(database) == 0
    assert await relay.run_once() == 0
    assert await rest(transport) == []


async def test_a_row_committed_late_with_a_lower_position_is_not_skipped(
    database: Database, transport: MemoryTransport
) -> None:
    early_key, late_key = keys_in_one_lane(2)  # one lane: the relay reads it twice
    relay = Relay(database, transport)
    async with database.connection() as long:
        transaction = long.transaction()
        await transaction.start()
        await write(long, database, [Outgoing(ADDRESS, envelope(1, key=early_key))])
        [first] = await long.fetch(f"SELECT position FROM {database.outbox}")
        await commit(database, envelope(2, key=late_key))  # a higher position, committed first

        assert await relay.run_once() == 1
        assert [n_of(e) for e in await received(transport, 1)] == [2]
        await transaction.commit()
    async with database.connection() as conn:
        assert await conn.fetchval(f"SELECT position FROM {database.outbox}") == first[0]

    assert await relay.run_once() == 1
    assert [n_of(e) for e in await received(transport, 1)] == [1]


async def test_two_relays_send_every_row_once_and_each_key_in_commit_order(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    keys = [f"order-{i}" for i in range(24)]
    per_key = 8
    for _ in range(2):
        await relay_on(database, Slow(transport), relays, batch=4, poll=0.05).start()

    async def writer(key: str) -> None:  # one transaction per row, as handlers would
        for n in range(per_key):
            await commit(database, envelope(n, key=key))

    async def plain_writer() -> None:
        for n in range(20):
            await commit(database, envelope(1000 + n), envelope(2000 + n))

    async with asyncio.TaskGroup() as writers:
        for key in keys:
            writers.create_task(writer(key))
        writers.create_task(plain_writer())
    total = len(keys) * per_key + 40
    got = await received(transport, total, wait=10)
    await until(lambda: _empty(database), "the outbox emptied")
    for relay in relays:
        await relay.stop()
    got += await rest(transport)

    duplicates = [i for i, seen in Counter(e.id for e in got).items() if seen > 1]
    assert duplicates == []
    assert len(got) == total
    for key in keys:
        assert [n_of(e) for e in got if e.key == key] == list(range(per_key)), key


async def test_a_batch_sends_different_keys_at_once_and_each_key_in_order(
    database: Database, transport: MemoryTransport
) -> None:
    keys = keys_in_one_lane(4)  # one lane, so one batch holds them all
    await commit(database, *(envelope(n, key=key) for n in range(6) for key in keys))
    overlapping = Overlapping(transport)

    assert await Relay(database, overlapping).run_once() == 24

    assert overlapping.most == len(keys)  # a send per key outstanding, never two of one key
    got = await rest(transport)
    for key in keys:
        assert [n_of(e) for e in got if e.key == key] == list(range(6)), key

    await commit(database, *(envelope(n, key=key) for n in range(2) for key in keys))
    one_at_a_time = Overlapping(transport)
    assert await Relay(database, one_at_a_time, in_flight=1).run_once() == 8
    assert one_at_a_time.most == 1


def keys_in_lanes(count: int) -> list[str]:
    """``count`` keys, each in a lane of its own."""
    by_lane: dict[int, str] = {}
    for key in (f"key-{i}" for i in range(1000)):
        by_lane.setdefault(lane_of(key), key)
    return list(by_lane.values())[:count]


async def test_a_batch_takes_every_free_lane_and_skips_those_another_relay_holds(
    database: Database, transport: MemoryTransport
) -> None:
    held, *free = keys_in_lanes(5)
    await commit(database, *(envelope(n, key=key) for n in range(3) for key in [held, *free]))
    overlapping = Overlapping(transport)
    async with database.connection() as other, other.transaction():  # another relay's lane
        await other.execute(
            "SELECT pg_advisory_xact_lock($1::int, $2::int)", database.lock_space, lane_of(held)
        )
        assert await Relay(database, overlapping).run_once() == 12

        assert overlapping.most == 4  # the four free lanes' keys, in one batch
        got = await rest(transport)
        assert {e.key for e in got} == set(free)
    assert await Relay(database, transport).run_once() == 3  # released: its rows now
    assert [n_of(e) for e in await rest(transport)] == [0, 1, 2]


async def test_a_batch_reads_its_rows_in_position_order_not_the_whole_backlog(
    database: Database,
) -> None:
    # A backlog in a table whose statistics say it is empty (never analyzed, as after a
    # quiet spell): the batch's select must walk the primary key and stop after `batch`
    # rows, not read and sort the whole backlog for every batch.
    async with database.connection() as conn, conn.transaction():
        await write(conn, database, [Outgoing(ADDRESS, envelope(n)) for n in range(3000)])
    relay = Relay(database, MemoryTransport())
    async with database.connection() as conn, conn.transaction():
        busy = await conn.fetchval(relay._busy_sql)
        lanes, _ = await conn.fetchrow(relay._lock_sql, database.lock_space, busy)
        await conn.execute(relay._plan_sql)
        plan = [
            row[0]
            for row in await conn.fetch(
                "EXPLAIN " + relay._select_sql, lanes, 200, 1 << 24, [1, 2, 3], 3
            )
        ]
    assert sorted(lanes) == list(range(16))
    assert not any("Sort" in line for line in plan), plan
    assert any("Index Scan using" in line for line in plan), plan


async def test_rows_without_a_key_are_sent_at_once_up_to_in_flight(
    database: Database, transport: MemoryTransport
) -> None:
    async with database.connection() as conn, conn.transaction():  # all in one lane
        await write(conn, database, [Outgoing(ADDRESS, envelope(n)) for n in range(30)])
        await conn.execute(f"UPDATE {database.outbox} SET lane = 0")
    overlapping = Overlapping(transport)

    assert await Relay(database, overlapping, in_flight=10).run_once() == 30

    assert overlapping.most == 10
    assert sorted(n_of(e) for e in await rest(transport)) == list(range(30))


async def test_a_send_that_fails_stops_its_key_only_and_keeps_its_order(
    database: Database, transport: MemoryTransport
) -> None:
    first, second = keys_in_one_lane(2)
    await commit(database, *(envelope(n, key=key) for n in range(5) for key in (first, second)))
    failing = Failing(  # the first key's third row meets a broker that refuses it
        Overlapping(transport),
        reject=lambda e: e.key == first and n_of(e) == 2,
        error=TransportError("maximum payload exceeded (a test's doing)"),
    )

    assert await Relay(database, failing).run_once() == 7  # the other key goes on
    before = await rest(transport)
    assert [n_of(e) for e in before if e.key == first] == [0, 1]
    assert [n_of(e) for e in before if e.key == second] == list(range(5))
    assert await count_rows(database) == 3  # the sent ones were deleted

    assert await Relay(database, transport).run_once() == 3
    after = await rest(transport)
    assert [n_of(e) for e in before + after if e.key == first] == list(range(5))


async def two_keys_one_refused(
    database: Database, transport: Transport, refused: int
) -> tuple[str, str, Failing]:
    """Rows 0 to 5 of two keys of one lane, committed; and a transport that refuses the
    first key's row ``refused``."""
    first, second = keys_in_one_lane(2)
    await commit(database, *(envelope(n, key=key) for n in range(6) for key in (first, second)))
    failing = Failing(
        transport,
        reject=lambda e: e.key == first and n_of(e) == refused,
        error=TransportError("refused (a test's doing)"),
    )
    return first, second, failing


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches read 3 rows at a time and delete every 2 sent: a batch of a few rows
    spans chunks."""
    monkeypatch.setattr("iambus.relay.CHUNK", 3)
    monkeypatch.setattr("iambus.relay.DELETE_CHUNK", 2)


@pytest.mark.usefixtures("small_chunks")
async def test_a_batch_read_in_chunks_sends_each_row_once_and_each_key_in_order(
    database: Database, transport: MemoryTransport
) -> None:
    keys = keys_in_one_lane(3)
    await commit(database, *(envelope(n, key=key) for n in range(7) for key in keys))
    await commit(database, *(envelope(100 + n) for n in range(5)))
    overlapping = Overlapping(transport)

    assert await Relay(database, overlapping, batch=1000).run_once() == 26

    got = await rest(transport)
    assert len(got) == len({e.id for e in got}) == 26
    for key in keys:
        assert [n_of(e) for e in got if e.key == key] == list(range(7)), key
    assert await count_rows(database) == 0


@pytest.mark.usefixtures("small_chunks")
async def test_a_key_that_fails_in_one_chunk_keeps_its_later_chunks_back(
    database: Database, transport: MemoryTransport
) -> None:
    first, second, failing = await two_keys_one_refused(database, transport, 1)

    assert await Relay(database, failing).run_once() == 7  # first: 0; second: all six
    before = await rest(transport)
    assert [n_of(e) for e in before if e.key == first] == [0]
    assert [n_of(e) for e in before if e.key == second] == list(range(6))
    assert await count_rows(database) == 5

    assert await Relay(database, transport).run_once() == 5
    after = await rest(transport)
    assert [n_of(e) for e in after] == [1, 2, 3, 4, 5]


@pytest.mark.usefixtures("small_chunks")
async def test_a_batch_cut_off_after_its_deletes_began_loses_nothing(
    database: Database, transport: MemoryTransport
) -> None:
    await commit(database, *(envelope(n, key="order-1") for n in range(10)))
    stalling = Stalling(transport, through=5)  # 2 deletes made, in the open transaction
    killed = asyncio.create_task(Relay(database, stalling).run_once())
    await stalling.stalled.wait()
    killed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killed

    assert await count_rows(database) == 10  # rolled back, its deletes with it
    assert await Relay(database, transport).run_once() == 10
    assert [n_of(e) for e in await rest(transport)] == [*range(5), *range(10)]


async def test_a_key_whose_row_commits_late_between_chunks_keeps_its_order(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's row with a low position commits while a pass reads its chunks, and the
    key's next row right after it: the chunks come from one snapshot, so the pass sees
    neither, and the next pass sends both, in order. (Each chunk a query of its own
    would see the second, not the first, and send them the wrong way round.)"""
    import iambus.relay as relay_module

    monkeypatch.setattr("iambus.relay.CHUNK", 2)
    late, other = keys_in_one_lane(2)
    async with database.connection() as held:
        tx = held.transaction()
        await tx.start()
        await write(held, database, [Outgoing(ADDRESS, envelope(0, key=late))])  # lowest
        await commit(database, envelope(1, key=other), envelope(2, key=other), envelope(3))
        read = relay_module._Pass._read
        reads = 0

        async def read_then_commit(batch: Any) -> None:
            nonlocal reads
            await read(batch)
            reads += 1
            if reads == 1:  # between the pass's first chunk and its second
                await tx.commit()
                await commit(database, envelope(1, key=late))

        monkeypatch.setattr(relay_module._Pass, "_read", read_then_commit)
        assert await Relay(database, transport).run_once() == 3  # neither of the late key
    assert await Relay(database, transport).run_once() == 2
    got = await rest(transport)
    assert [n_of(e) for e in got if e.key == late] == [0, 1]


# -- a pass of several batches ------------------------------------------------------------


@pytest.fixture
def long_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass goes on from batch to batch however slow the machine (a test that counts
    on one pass for all its rows must not see it end at PASS_SECONDS)."""
    monkeypatch.setattr("iambus.relay.PASS_SECONDS", 60.0)


async def lanes_free(database: Database) -> bool:
    """Whether another session can take every lane's lock now."""
    async with database.connection() as other, other.transaction():
        taken = await other.fetchval(
            "SELECT count(*) FILTER (WHERE pg_try_advisory_xact_lock($1::int, lane)) "
            "FROM generate_series(0, 15) AS lane",
            database.lock_space,
        )
    return bool(taken == 16)


@pytest.mark.usefixtures("long_passes")
async def test_a_full_batch_commits_while_its_last_sends_are_under_way(
    database: Database, transport: MemoryTransport
) -> None:
    await commit(database, *(envelope(n) for n in range(40)))

    class Holding:  # its third send waits until another connection sees a batch committed
        url = "holding+memory://"
        calls = 0

        async def send(self, address: str, envelope: Envelope) -> None:
            Holding.calls += 1
            if Holding.calls == 3:
                await until(lambda: _fewer_than(database, 40), "a commit while this send waited")
            await transport.send(address, envelope)

    relay = Relay(database, Holding(), batch=10, in_flight=4)
    assert await relay._pass() == (40, False)  # one pass, batch after batch

    got = await rest(transport)
    assert sorted(n_of(e) for e in got) == list(range(40))  # each once
    assert await count_rows(database) == 0
    assert await lanes_free(database)


async def _fewer_than(database: Database, count: int) -> bool:
    return await count_rows(database) < count


@pytest.mark.usefixtures("long_passes")
async def test_a_pass_sends_each_row_once_and_each_key_in_order_across_its_batches(
    database: Database, transport: MemoryTransport
) -> None:
    keys = keys_in_one_lane(3)
    await commit(database, *(envelope(n, key=key) for n in range(20) for key in keys))
    await commit(database, *(envelope(100 + n) for n in range(20)))
    overlapping = Overlapping(transport)

    assert await Relay(database, overlapping, batch=7, in_flight=5)._pass() == (80, False)

    got = await rest(transport)
    assert len(got) == len({e.id for e in got}) == 80
    for key in keys:
        assert [n_of(e) for e in got if e.key == key] == list(range(20)), key
    assert overlapping.most == 5
    assert await count_rows(database) == 0


@pytest.mark.usefixtures("long_passes")
async def test_a_key_whose_row_commits_late_between_batches_of_a_pass_keeps_its_order(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's row with a position below rows the pass has in hand commits between two
    of its batches, and the key's next row after it: the next batch reads both, in
    order (it leaves out only the rows in hand, not every position below them)."""
    import iambus.relay as relay_module

    late, other = keys_in_one_lane(2)
    async with database.connection() as held:
        tx = held.transaction()
        await tx.start()
        await write(held, database, [Outgoing(ADDRESS, envelope(0, key=late))])  # lowest
        await commit(database, *(envelope(n, key=other) for n in range(1, 7)))
        handed = relay_module._Pass._batch
        batches = 0

        async def batch_then_commit(run: Any) -> bool:
            nonlocal batches
            handing = await handed(run)
            batches += 1
            if batches == 1:  # the first batch hands over; then the late rows commit
                assert handing
                await tx.commit()
                await commit(database, envelope(1, key=late))
            return handing

        monkeypatch.setattr(relay_module._Pass, "_batch", batch_then_commit)
        assert await Relay(database, transport, batch=2)._pass() == (8, False)
    got = await rest(transport)
    assert len(got) == len({e.id for e in got}) == 8
    assert [n_of(e) for e in got if e.key == late] == [0, 1]
    assert [n_of(e) for e in got if e.key == other] == list(range(1, 7))


@pytest.mark.usefixtures("long_passes")
async def test_a_key_that_fails_in_a_later_batch_of_a_pass_keeps_its_rows_back(
    database: Database, transport: MemoryTransport
) -> None:
    first, second, failing = await two_keys_one_refused(database, transport, 3)

    sent, more = await Relay(database, failing, batch=2)._pass()  # ends at the failure
    before = await rest(transport)
    assert [n_of(e) for e in before if e.key == first] == [0, 1, 2]
    assert [n_of(e) for e in before if e.key == second] == list(range(len(before) - 3))
    assert (sent, more) == (len(before), True)
    async with database.connection() as conn:
        charged = await conn.fetch(f"SELECT attempts FROM {database.outbox} WHERE attempts > 0")
    assert [row["attempts"] for row in charged] == [1]  # the broker took other rows

    assert await Relay(database, transport).run_once() == 12 - sent
    after = await rest(transport)
    for key in (first, second):
        assert [n_of(e) for e in before + after if e.key == key] == list(range(6)), key


async def test_a_pass_unlocks_its_lanes_when_it_ends_or_is_cancelled(
    database: Database, transport: MemoryTransport, own_pool: Callable[..., Any]
) -> None:
    pool = await own_pool(max_size=2)  # the pass's connections go back to this pool
    own = Database(pool, schema=database.schema)
    await commit(database, *(envelope(n, key=f"k{n % 5}") for n in range(30)))
    assert await Relay(own, transport, batch=4).run_once() == 30
    assert await lanes_free(database)
    assert len(await rest(transport)) == 30

    await commit(database, *(envelope(n, key="k") for n in range(10)))
    stalling = Stalling(transport, through=3)
    killed = asyncio.create_task(Relay(own, stalling, batch=2).run_once())
    await stalling.stalled.wait()  # in a later batch of its pass
    assert not await lanes_free(database)
    killed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killed
    assert await lanes_free(database)  # (its connection was closed)
    left = await count_rows(database)  # its batches committed before the stall are done
    assert await Relay(own, transport).run_once() == left
    assert [n_of(e) for e in await rest(transport)] == [0, 1, 2, *range(10 - left, 10)]


async def test_a_pass_whose_lanes_are_let_go_starts_no_more_sends_and_loses_nothing(
    database: Database, transport: MemoryTransport, own_pool: Callable[..., Any]
) -> None:
    name = f"iambus-relay-test-{uuid.uuid4().hex[:8]}"
    pool = await own_pool(max_size=2, server_settings={"application_name": name})
    await commit(database, *(envelope(n, key="k") for n in range(6)))
    stalling = Stalling(transport, through=2)
    relay = Relay(Database(pool, schema=database.schema), stalling)
    passing = asyncio.create_task(relay.run_once())
    await stalling.stalled.wait()
    async with database.connection() as admin:  # the connection whose transaction holds them
        assert await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND query LIKE '%pg_try_advisory_xact_lock%'",
            name,
        )
    await until(_true(lambda: any(_closed(c) for c in relay._held)), "the holder closed")
    stalling.go.set()

    with pytest.raises(ConnectionError, match="closed a connection of the relay"):
        await passing
    assert stalling.calls == 3  # the send under way returned; no other started
    assert await count_rows(database) == 3  # and the sent rows were deleted
    assert await Relay(database, transport).run_once() == 3
    assert [n_of(e) for e in await rest(transport)] == list(range(6))


async def test_a_pass_cancelled_mid_batch_leaves_no_task_behind(
    database: Database, transport: MemoryTransport
) -> None:
    await commit(database, *(envelope(n, key="order-1") for n in range(10)))
    stalling = Stalling(transport, through=5)
    before = asyncio.all_tasks()
    killed = asyncio.create_task(Relay(database, stalling).run_once())
    await stalling.stalled.wait()  # the pass waits for its senders
    killed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killed

    def stray() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() - before if not task.done()]

    await until(_true(lambda: not stray()), "the pass's tasks ended")
    assert await count_rows(database) == 10


async def test_a_row_the_broker_keeps_refusing_is_parked_and_the_others_go_on(
    database: Database, transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    poison, healthy = keys_in_lanes(2)  # other lanes: a lane is not held up either
    refused = envelope(0, key=poison)
    await commit(database, refused, envelope(1, key=poison))
    failing = Failing(
        transport,
        reject=lambda e: e.id == refused.id,
        error=TransportError("nats: maximum payload exceeded"),
    )
    relay = Relay(database, failing)
    for n in range(FAILED_SENDS):
        await commit(database, envelope(100 + n, key=healthy))
        assert await relay.run_once() == 1
        assert [n_of(e) for e in await rest(transport)] == [100 + n]
    [row] = await parked(database)
    assert (row.message_id, row.attempts) == (refused.id, FAILED_SENDS)
    assert row.error == "TransportError: nats: maximum payload exceeded"
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert f"outbox row {row.position}" in error.getMessage()
    assert await relay.run_once() == 1  # the key's next row, behind it until it was parked
    assert [n_of(e) for e in await rest(transport)] == [1]


async def test_a_broker_that_takes_nothing_parks_nothing(
    database: Database, transport: MemoryTransport
) -> None:
    await commit(database, envelope(0, key="a"), envelope(1, key="b"))
    down = Failing(transport, times=10**9)
    relay = Relay(database, down)
    for _ in range(FAILED_SENDS + 1):
        with pytest.raises(TransportError, match="broker is down"):
            await relay.run_once()
    assert await parked(database) == []
    async with database.connection() as conn:
        assert await conn.fetchval(f"SELECT max(attempts) FROM {database.outbox}") == 0
    assert await Relay(database, transport).run_once() == 2


async def test_a_refused_row_deleted_by_hand_meanwhile_keeps_the_sent_rows_deleted(
    database: Database, transport: MemoryTransport
) -> None:
    refused, other = envelope(0, key="a"), envelope(1, key="b")
    await commit(database, refused, other)

    class DeletedThenRefused:
        """Refuses ``refused`` once an operator has deleted its row (SQL, as the docs
        say to drop a row for good) while the relay had it in hand."""

        url = "deleting+" + transport.url

        async def send(self, address: str, e: Envelope) -> None:
            if e.id == refused.id:
                async with database.connection() as conn:
                    await conn.execute(f"DELETE FROM {database.outbox} WHERE message_id = $1", e.id)
                raise TransportError("the broker refused it (a test's doing)")
            await transport.send(address, e)

    assert await Relay(database, DeletedThenRefused()).run_once() == 1
    assert [n_of(e) for e in await rest(transport)] == [1]
    assert await count_rows(database) == 0  # the row sent was deleted: not sent again


async def _empty(database: Database) -> bool:
    return await count_rows(database) == 0


# -- waking up ----------------------------------------------------------------------------


async def test_a_commit_wakes_a_listening_relay_at_once(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    relay = relay_on(database, transport, relays, poll=3600)  # no polling in this test
    await relay.start()
    assert relay.listening
    await relay._idle.wait()  # its first pass is over: only a notification wakes it now

    await commit(database, envelope(1, key="k"))
    assert [n_of(e) for e in await received(transport, 1)] == [1]
    await commit(database, envelope(2))
    assert [n_of(e) for e in await received(transport, 1)] == [2]


async def test_polling_finds_rows_without_notifications(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    relay = relay_on(database, transport, relays, poll=0.05, listen=False)
    await relay.start()
    assert not relay.listening
    await relay._idle.wait()

    await commit(database, envelope(1, key="k"), envelope(2))
    assert sorted(n_of(e) for e in await received(transport, 2)) == [1, 2]


async def test_a_relay_on_a_sqlalchemy_engine_listens_and_sends(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(POSTGRES_DSN.replace("postgresql:", "postgresql+asyncpg:"))
    try:
        relay = relay_on(Database(engine, schema=database.schema), transport, relays, poll=3600)
        await relay.start()
        assert relay.listening
        await relay._idle.wait()
        await commit(database, envelope(1))
        assert [n_of(e) for e in await received(transport, 1)] == [1]
        await relay.stop()
    finally:
        await engine.dispose()


# -- failures -----------------------------------------------------------------------------


async def test_a_broker_failure_keeps_the_unsent_rows_in_order(
    database: Database,
    transport: MemoryTransport,
    relays: list[Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await commit(database, *(envelope(n, key="order-1") for n in range(8)))
    failing = Failing(transport, after=2, times=4)
    relay = relay_on(database, failing, relays, poll=3600)

    assert await relay.run_once() == 2  # the broker took some: the pass is no outage
    assert [n_of(e) for e in await rest(transport)] == [0, 1]  # sent, and deleted
    assert await count_rows(database) == 6
    with pytest.raises(TransportError, match="broker is down"):  # it takes nothing
        await relay.run_once()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="iambus.relay")
    await relay.start()  # it fails twice more, backs off, then gets through
    assert [n_of(e) for e in await received(transport, 6)] == [2, 3, 4, 5, 6, 7]
    await until(lambda: _empty(database), "the outbox emptied")
    await relay.stop()
    assert await rest(transport) == []
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "iambus.relay"]
    warnings = [m for level, m in logged if level == "WARNING"]
    assert len(warnings) == 1, logged  # once per outage, not once per attempt
    assert "a pass failed: TransportError: the broker is down" in warnings[0]
    assert any("relaying again, after 2 failed attempt(s)" in m for _, m in logged), logged


async def test_an_outage_is_logged_once_while_another_relay_holds_the_failing_lane(
    database: Database,
    transport: MemoryTransport,
    relays: list[Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iambus.relay")
    await commit(database, envelope(1, key="k"))
    down = Failing(transport, times=10**9)
    relay = relay_on(database, down, relays, poll=0.02, listen=False)
    await relay.start()
    await until(_true(lambda: down.calls > 0), "a failed pass")
    async with database.connection() as other, other.transaction():  # another relay's lane
        await other.execute(
            "SELECT pg_advisory_xact_lock($1::int, $2::int)", database.lock_space, lane_of("k")
        )
        await relay._idle.wait()  # a pass that found nothing it could take: no success
    calls = down.calls
    await until(_true(lambda: down.calls > calls), "a failed pass after the lane came free")
    await relay.stop()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "iambus.relay"]
    assert [level for level, _ in logged] == ["WARNING"], logged


async def test_a_row_that_does_not_decode_is_parked_and_can_be_released(
    database: Database, transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    bad = envelope(2, key="k")
    await commit(database, envelope(1, key="k"), bad, envelope(3, key="k"))
    async with database.connection() as conn:
        await conn.execute(
            f"""UPDATE {database.outbox} SET headers = '{{"tenant": 7}}' WHERE message_id = $1""",
            bad.id,
        )
        position = await conn.fetchval(
            f"SELECT position FROM {database.outbox} WHERE message_id = $1", bad.id
        )
    relay = Relay(database, transport)

    assert await relay.run_once() == 2
    assert [n_of(e) for e in await received(transport, 2)] == [1, 3]
    [error] = [r for r in caplog.records if r.name == "iambus.relay"]
    assert error.levelname == "ERROR"
    assert f"outbox row {position} (message {bad.id}" in error.getMessage()
    assert f"iambus outbox retry --database DSN {position}" in error.getMessage()
    assert await outbox_status(database) == OutboxStatus(backlog=0, oldest_age=None, parked=1)
    [row] = await parked(database)
    assert (row.position, row.message_id, row.key, row.attempts) == (position, bad.id, "k", 1)
    assert "headers must be a JSON object of strings" in row.error

    assert await release(database, [position, position + 1000]) == [position]
    assert (await outbox_status(database)).backlog == 1
    assert await relay.run_once() == 0  # still corrupt: parked again
    assert [row.attempts for row in await parked(database)] == [2]

    async with database.connection() as conn:  # the fix: headers as this version writes them
        await conn.execute(f"""UPDATE {database.outbox} SET headers = '{{"tenant": "7"}}'""")
    assert await release(database) == [position]
    assert await relay.run_once() == 1
    [sent] = await received(transport, 1)
    assert (sent.id, sent.headers) == (bad.id, {"tenant": "7"})
    assert await count_rows(database) == 0


@pytest.mark.parametrize(
    "error",
    [SerializationError("too large for the broker"), ImproperlyConfigured("no such stream")],
    ids=["SerializationError", "ImproperlyConfigured"],
)
async def test_a_row_the_transport_rejects_is_parked(
    database: Database, transport: MemoryTransport, error: Exception
) -> None:
    await commit(database, envelope(1), envelope(2), envelope(3))
    rejecting = Failing(transport, reject=lambda e: n_of(e) == 2, error=error)

    assert await Relay(database, rejecting).run_once() == 2
    assert sorted(n_of(e) for e in await received(transport, 2)) == [1, 3]
    [row] = await parked(database)
    assert row.error == f"{type(error).__name__}: {error}"


async def test_a_relay_cancelled_mid_batch_loses_nothing(
    database: Database, transport: MemoryTransport
) -> None:
    await commit(database, *(envelope(n, key="order-1") for n in range(10)))
    stalling = Stalling(transport, through=3)
    killed = asyncio.create_task(Relay(database, stalling).run_once())
    await stalling.stalled.wait()
    killed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killed

    assert await count_rows(database) == 10  # its transaction rolled back: nothing deleted
    assert await Relay(database, transport).run_once() == 10
    got = [n_of(e) for e in await rest(transport)]
    assert got == [0, 1, 2, *range(10)]  # at least once: the 3 sent before are duplicates


async def test_a_send_that_never_returns_does_not_hold_its_lanes_for_ever(
    database: Database,
    transport: MemoryTransport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker gone silent (a connection the network lost without a word) leaves a send
    hanging: the pass gives it up instead of holding its lanes, and its transaction open,
    for as long, and another relay (or the next pass) sends the row."""
    monkeypatch.setattr("iambus.relay.SEND_TIMEOUT", 0.2)
    await commit(database, envelope(1, key="k"), envelope(2, key="k"))
    silent = Stalling(transport, through=0)
    async with asyncio.timeout(10):  # (for ever, before)
        with pytest.raises(TransportError, match=r"did not return within 0\.2 s"):
            await Relay(database, silent).run_once()
    assert "did not return within 0.2 s" in caplog.text
    assert await count_rows(database) == 2
    assert await Relay(database, transport).run_once() == 2
    assert [n_of(e) for e in await rest(transport)] == [1, 2]


class HangingOn:
    """Sends with ``transport``, except ``hangs``, whose send never returns."""

    def __init__(self, hangs: Envelope, transport: Transport) -> None:
        self.hangs, self.transport = hangs, transport
        self.url = "hanging+" + transport.url

    async def send(self, address: str, e: Envelope) -> None:
        if e.id == self.hangs.id:
            await asyncio.Event().wait()  # no answer, ever
        await self.transport.send(address, e)


async def test_a_row_whose_send_always_hangs_is_parked_and_its_key_goes_on(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send given up (no answer within SEND_TIMEOUT) while the broker takes other rows
    is a failed attempt of its row, as a refusal is: parked after FAILED_SENDS, its key's
    next rows go on. (It was never charged: its key waited behind it for good.)"""
    monkeypatch.setattr("iambus.relay.SEND_TIMEOUT", 0.2)
    poison, healthy = keys_in_lanes(2)
    hangs = envelope(0, key=poison)
    await commit(database, hangs, envelope(1, key=poison))

    relay = Relay(database, HangingOn(hangs, transport))
    for n in range(FAILED_SENDS):
        await commit(database, envelope(100 + n, key=healthy))
        async with asyncio.timeout(10):
            with contextlib.suppress(TransportError):  # (the pass says what it gave up)
                await relay.run_once()
        assert [n_of(e) for e in await rest(transport)] == [100 + n]
    [row] = await parked(database)
    assert (row.message_id, row.attempts) == (hangs.id, FAILED_SENDS)
    assert "did not return within 0.2 s" in row.error
    assert await relay.run_once() == 1  # the key's next row, behind it until it was parked
    assert [n_of(e) for e in await rest(transport)] == [1]


async def test_a_send_given_up_after_a_handover_is_charged_once_and_holds_its_key(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send started by a batch and given up in a later one (the batch handed over
    meanwhile) is charged once, in the batch that gave it up; its key's next row, behind
    it, is not sent in that pass, and the other rows are."""
    monkeypatch.setattr("iambus.relay.SEND_TIMEOUT", 0.2)
    [key] = keys_in_lanes(1)
    hangs, behind = envelope(0, key=key), envelope(1, key=key)
    await commit(database, hangs, behind, *(envelope(10 + n) for n in range(9)))

    async with asyncio.timeout(10):
        with contextlib.suppress(TransportError):
            await Relay(database, HangingOn(hangs, transport), batch=2, in_flight=2).run_once()
    assert sorted(n_of(e) for e in await rest(transport)) == list(range(10, 19))
    async with database.connection() as conn:
        rows = await conn.fetch(f"SELECT message_id, attempts FROM {database.outbox}")
    assert {row["message_id"]: row["attempts"] for row in rows} == {hangs.id: 1, behind.id: 0}


async def test_the_sends_under_way_as_the_broker_goes_silent_are_not_charged(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker took rows, then went silent (a connection lost without a word): the
    sends under way then are given up, and charged nothing, as an outage's are (the
    broker took no send begun after them). They were charged an attempt each."""
    monkeypatch.setattr("iambus.relay.SEND_TIMEOUT", 0.2)
    await commit(database, *(envelope(n) for n in range(4)))

    class GoesSilent:
        url = "silent+" + transport.url
        calls = 0

        async def send(self, address: str, e: Envelope) -> None:
            self.calls += 1
            if self.calls > 2:
                await asyncio.Event().wait()  # silent from the 3rd send on
            await transport.send(address, e)

    async with asyncio.timeout(10):
        with contextlib.suppress(TransportError):
            await Relay(database, GoesSilent()).run_once()
    assert len(await rest(transport)) == 2
    async with database.connection() as conn:
        attempts = await conn.fetch(f"SELECT attempts FROM {database.outbox}")
    assert [row["attempts"] for row in attempts] == [0, 0]


async def test_a_stop_cut_short_after_a_send_was_given_up_charges_nothing(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A given-up send still unwinding when a stop is cut short: the batch rolls back,
    its charge with it (the row is not charged for the stop)."""
    monkeypatch.setattr("iambus.relay.SEND_TIMEOUT", 0.2)
    poison, healthy = keys_in_lanes(2)
    hangs = envelope(0, key=poison)
    await commit(database, hangs, envelope(1, key=poison), envelope(2, key=healthy))
    unwinding = asyncio.Event()

    class Lingering:
        url = "lingering+" + transport.url

        async def send(self, address: str, e: Envelope) -> None:
            if e.id == hangs.id:
                try:
                    await asyncio.Event().wait()  # no answer, ever
                except asyncio.CancelledError:
                    unwinding.set()
                    await asyncio.Event().wait()  # and slow to give up
            await transport.send(address, e)

    relay = Relay(database, Lingering(), listen=False)
    await relay.start()
    await unwinding.wait()
    await relay.stop(deadline=asyncio.get_running_loop().time())
    async with database.connection() as conn:
        assert await conn.fetchval(f"SELECT max(attempts) FROM {database.outbox}") == 0
        assert await conn.fetchval(f"SELECT count(*) FROM {database.outbox}") == 3


async def test_a_stop_cut_short_by_its_deadline_does_not_hang_and_loses_nothing(
    database: Database, transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    await commit(database, *(envelope(n, key="order-1") for n in range(5)))
    stalling = Stalling(transport, through=2)
    relay = Relay(database, stalling, poll=3600)
    await relay.start()
    await stalling.stalled.wait()
    loop = asyncio.get_running_loop()

    began = loop.time()
    await relay.stop(began + 0.2)
    assert loop.time() - began < 0.2 + STOP_GRACE + 1  # (+ 1: a loaded machine's lag)
    assert not relay.running
    # One warning, the stop's: not a pass failing on the connections the stop closed.
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "cut short at its stop deadline" in warning
    assert await count_rows(database) == 5
    stalling.go.set()
    assert await relay.run_once() == 5  # a stopped relay's pass by hand, as after any stop


async def test_a_relay_whose_connections_are_terminated_carries_on(
    database: Database,
    transport: MemoryTransport,
    relays: list[Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncpg

    # A pool of its own, named, so that only this relay's connections are terminated.
    name = f"iambus-relay-test-{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(
        POSTGRES_DSN, min_size=1, max_size=4, server_settings={"application_name": name}
    )
    own = Database(pool, schema=database.schema)
    caplog.set_level(logging.INFO, logger="iambus.relay")
    try:
        await commit(database, *(envelope(n, key="order-1") for n in range(4)))
        stalling = Stalling(transport, through=2)
        relay = relay_on(own, stalling, relays, poll=3600)
        await relay.start()
        assert relay.listening
        await stalling.stalled.wait()  # mid-batch, in its transaction

        async with database.connection() as admin:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                name,
            )
        assert killed >= 2  # the listening connection and the sending one
        stalling.go.set()

        # Rows were sent, but the batch's transaction is gone (they were not deleted):
        # after a back-off, the rows are sent again, in order. (The pass starts no send
        # once it has seen that the connection holding its lanes was closed; the send
        # of row 3 may start before it has.)
        await until(lambda: _empty(database), "the outbox emptied", wait=10)
        got = [n_of(e) for e in await rest(transport)]
        assert got in ([0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3])
        await until(_true(lambda: relay.listening), "the relay listened again")

        await relay._idle.wait()
        await commit(database, envelope(9))  # woken by a notification again (no polling)
        assert [n_of(e) for e in await received(transport, 1)] == [9]
    finally:
        for relay in relays:
            await relay.stop()
        await pool.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if "listening on" in w]) == 1, warnings
    assert len([w for w in warnings if "a pass failed" in w]) == 1, warnings
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any("listening again, after 1 failed attempt(s)" in i for i in infos), infos


def _closed(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except Exception:  # a pool's proxy of a closed connection is detached
        return True


def _true(check: Callable[[], bool]) -> Callable[[], Any]:
    async def holds() -> bool:
        return check()

    return holds


async def test_an_idle_relay_stopped_past_its_deadline_is_not_cut_short(
    database: Database, transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(database, transport, poll=3600)
    await relay.start()
    await relay._idle.wait()
    await relay.stop(asyncio.get_running_loop().time() - 1)
    assert not relay.running
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.fixture
async def own_pool() -> AsyncIterator[Callable[..., Any]]:
    """Makes asyncpg pools of the test's own (closed at the end)."""
    import asyncpg

    made: list[Any] = []

    async def make(**options: Any) -> Any:
        made.append(await asyncpg.create_pool(POSTGRES_DSN, min_size=1, **options))
        return made[-1]

    yield make
    for pool in made:
        pool.terminate()


async def test_an_idle_pass_is_one_statement(
    database: Database, transport: MemoryTransport, own_pool: Callable[..., Any]
) -> None:
    statements: list[str] = []

    async def init(conn: Any) -> None:
        conn.add_query_logger(lambda record: statements.append(record.query))

    pool = await own_pool(max_size=2, init=init)
    relay = Relay(Database(pool, schema=database.schema), transport)
    await relay.run_once()
    statements.clear()
    assert await relay.run_once() == 0
    assert len([s for s in statements if database.outbox in s]) == 1, statements
    assert not any("BEGIN" in s for s in statements), statements


async def test_a_pass_reads_committed_rows_whatever_the_default_isolation(
    database: Database, transport: MemoryTransport, own_pool: Callable[..., Any]
) -> None:
    # Under REPEATABLE READ a pass's snapshot would be taken before it took its lanes: it
    # could read rows that the relay which held them until then had sent and deleted.
    pool = await own_pool(
        max_size=2, server_settings={"default_transaction_isolation": "repeatable read"}
    )
    relay = Relay(Database(pool, schema=database.schema), transport)
    seen: list[str] = []

    class Watching:
        url = "watching+memory://"

        async def send(self, address: str, envelope: Envelope) -> None:
            for conn in relay._held:  # the lanes' holder and the batch's connection
                seen.append(await conn.fetchval("SHOW transaction_isolation"))
            await transport.send(address, envelope)

    relay.transport = Watching()  # type: ignore[assignment]
    await commit(database, envelope(1))
    assert await relay.run_once() == 1
    assert seen == ["read committed"] * 2


async def test_a_slow_batch_commits_within_the_servers_idle_in_transaction_timeout(
    database: Database, transport: MemoryTransport, own_pool: Callable[..., Any]
) -> None:
    pool = await own_pool(
        max_size=2, server_settings={"idle_in_transaction_session_timeout": "300"}
    )
    own = Database(pool, schema=database.schema)
    pause = 0.03

    class Slowish:
        url = "slowish+memory://"
        calls = 0

        async def send(self, address: str, envelope: Envelope) -> None:
            Slowish.calls += 1
            await asyncio.sleep(pause)
            await transport.send(address, envelope)

    await commit(database, *(envelope(n, key="k") for n in range(12)))  # 0.36 s of sends
    assert await Relay(own, Slowish()).run_once() == 12  # in passes of ~0.15 s each
    assert Slowish.calls == 12  # none sent twice
    assert [n_of(e) for e in await rest(transport)] == list(range(12))

    pause = 0.5  # one send longer than the timeout: the error says what closed it
    await commit(database, envelope(0))
    with pytest.raises(ConnectionError, match="idle_in_transaction_session_timeout"):
        await Relay(own, Slowish()).run_once()


async def test_a_batch_reads_a_bounded_number_of_payload_bytes(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("iambus.relay.BATCH_BYTES", 50)
    monkeypatch.setattr("iambus.relay.PASS_SECONDS", 0)  # a pass of one batch
    await commit(database, *(envelope(n, key="k") for n in range(10)))  # 8 bytes each
    relay = Relay(database, transport)
    assert await relay._pass() == (7, True)  # 0 to 48 bytes before it: the 7th starts at 48
    assert await relay.run_once() == 3
    async with database.connection() as conn, conn.transaction():
        large = [
            Envelope(name="Thing", payload=json.dumps({"n": n, "x": "x" * 90}).encode())
            for n in (1, 2)
        ]
        await write(conn, database, [Outgoing(ADDRESS, e) for e in large])
    assert await relay._pass() == (1, True)  # a row larger than the bound goes on its own
    assert await relay.run_once() == 1
    got = await rest(transport)
    assert [n_of(e) for e in got if e.key == "k"] == list(range(10))
    assert sorted(n_of(e) for e in got if e.key is None) == [1, 2]


async def test_a_relay_on_a_pool_too_small_says_so_once(
    database: Database,
    transport: MemoryTransport,
    own_pool: Callable[..., Any],
    relays: list[Relay],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("iambus.relay.ACQUIRE_TIMEOUT", 0.05)
    pool = await own_pool(max_size=1)  # the listening connection takes it
    relay = relay_on(Database(pool, schema=database.schema), transport, relays, poll=0.02)
    await relay.start()
    assert relay.listening

    caplog.set_level(logging.DEBUG, logger="iambus.relay")

    def logged(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    await until(_true(lambda: len(logged(logging.DEBUG)) >= 2), "passes failing again")
    [warning] = [m for m in logged(logging.WARNING) if "a pass failed" in m]
    assert "no connection of <Database asyncpg-pool" in warning
    assert "came free within 0.05 s: its pool is too small" in warning


async def test_a_start_cancelled_while_it_waits_to_listen_leaves_no_task(
    database: Database,
    transport: MemoryTransport,
    own_pool: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """start() waits for the first LISTEN; cancelled meanwhile (a dispatcher's start cut
    short), it leaves no listening task behind, which nothing would ever stop."""
    monkeypatch.setattr("iambus.relay.ACQUIRE_TIMEOUT", 60)
    pool = await own_pool(max_size=1)
    on_pool = Database(pool, schema=database.schema)
    await on_pool.check()

    async def checked() -> None:
        pass

    monkeypatch.setattr(on_pool, "check", checked)  # (it needs the connection held below)
    relay = Relay(on_pool, transport)
    async with on_pool.connection():  # the listener waits for it
        starting = asyncio.create_task(relay.start())
        await until(_true(lambda: relay._listener is not None), "the listener started")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        listening = [t for t in asyncio.all_tasks() if t.get_name() == "iambus-relay-listen"]
        assert all(task.done() for task in listening), listening
    assert not relay.running
    await relay.stop()


# -- housekeeping -------------------------------------------------------------------------


async def test_the_relay_purges_old_inbox_records(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    kept = Database(POSTGRES_DSN, schema=database.schema, inbox_retention=60)
    try:

        async def insert(message_id: str, age: float) -> None:
            async with kept.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {kept.inbox} (message_id, handler, handled_at) "
                    f"VALUES ($1, 'h', now() - make_interval(secs => $2))",
                    message_id,
                    age,
                )

        async def ids() -> set[str]:
            async with kept.connection() as conn:
                return {r[0] for r in await conn.fetch(f"SELECT message_id FROM {kept.inbox}")}

        await insert("old-1", 120)
        await insert("fresh", 1)
        await relay_on(kept, transport, relays, purge_every=0.05, listen=False).start()
        await until(lambda: _is(ids, {"fresh"}), "the first purge")
        await insert("old-2", 120)  # the next purge takes it
        await until(lambda: _is(ids, {"fresh"}), "a later purge")
    finally:
        for relay in relays:
            await relay.stop()
        await kept.close()


async def test_relaying_goes_on_while_the_inbox_purge_waits(
    database: Database, transport: MemoryTransport, relays: list[Relay]
) -> None:
    async with database.connection() as conn:
        await conn.execute(
            f"INSERT INTO {database.inbox} (message_id, handler, handled_at) "
            f"VALUES ('old', 'h', now() - interval '8 days')"
        )
    async with database.connection() as holder, holder.transaction():  # a row lock
        await holder.execute(f"SELECT * FROM {database.inbox} FOR UPDATE")
        relay = relay_on(database, transport, relays, poll=3600)
        await relay.start()  # its purge waits for the lock
        await commit(database, envelope(1))
        assert [n_of(e) for e in await received(transport, 1)] == [1]
    await until(lambda: _no_inbox(database), "the purge, once the lock was released")


async def _no_inbox(database: Database) -> bool:
    async with database.connection() as conn:
        return not await conn.fetchval(f"SELECT count(*) FROM {database.inbox}")


async def _is(read: Callable[[], Any], expected: set[str]) -> bool:
    return bool(await read() == expected)


async def test_outbox_status_counts_the_backlog_its_age_and_the_parked_rows(
    database: Database,
) -> None:
    assert await outbox_status(database) == OutboxStatus(backlog=0, oldest_age=None, parked=0)
    old, stuck = envelope(1), envelope(2)
    await commit(database, old, stuck, envelope(3))
    async with database.connection() as conn:
        await conn.execute(
            f"UPDATE {database.outbox} SET stored_at = now() - interval '90 seconds' "
            f"WHERE message_id = $1",
            old.id,
        )
        await conn.execute(
            f"UPDATE {database.outbox} SET parked_at = now(), "
            f"stored_at = now() - interval '1 hour' WHERE message_id = $1",
            stuck.id,
        )

    found = await outbox_status(database)
    assert (found.backlog, found.parked) == (2, 1)
    assert found.oldest_age is not None
    assert 90 <= found.oldest_age < 120  # the parked row, older still, does not count


# -- set-up -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch": 0}, "batch must be an int of at least 1, got 0"),
        ({"poll": 0}, "poll must be seconds (a number > 0), got 0"),
        ({"listen": "yes"}, "listen must be True or False, got 'yes'"),
        ({"purge_every": float("inf")}, "purge_every must be seconds (a number > 0), got inf"),
        ({"in_flight": 0}, "in_flight must be an int of at least 1, got 0"),
    ],
)
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        Relay(Database(POSTGRES_DSN), MemoryTransport(), **options)
    assert str(caught.value) == message


def test_the_database_must_be_a_database() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"iambus\.database\.Database"):
        Relay(POSTGRES_DSN, MemoryTransport())  # type: ignore[arg-type]


async def test_start_names_missing_tables_and_the_command_that_makes_them(
    database: Database,
) -> None:
    elsewhere = Database(POSTGRES_DSN, schema=database.schema, prefix="other_")
    relay = Relay(elsewhere, MemoryTransport())
    try:
        with pytest.raises(ImproperlyConfigured, match="iambus db init --database DSN"):
            await relay.start()
        assert not relay.running
    finally:
        await elsewhere.close()


async def test_start_twice_is_an_error_and_stop_is_idempotent(
    database: Database, transport: MemoryTransport
) -> None:
    async with Relay(database, transport, poll=3600) as relay:
        assert relay.running
        with pytest.raises(ImproperlyConfigured, match="already running"):
            await relay.start()
    assert not relay.running
    await relay.stop()
    await commit(database, envelope(0))
    assert await relay.run_once() == 1  # a stopped relay still runs passes by hand
    assert len(await received(transport, 1)) == 1
    await relay.start()  # and starts again
    await commit(database, envelope(1))
    assert len(await received(transport, 1)) == 1
    await relay.stop()


# -- a real broker ------------------------------------------------------------------------


async def test_the_relay_sends_to_redis(database: Database) -> None:
    require("redis")
    from iambus.transports.redis import RedisTransport

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    redis = RedisTransport("redis://127.0.0.1:6379/0", namespace=namespace)
    await redis.open()
    try:
        await redis.declare(ADDRESS, GROUP, from_start=True)
        sent = [envelope(n, key=f"order-{n % 3}", headers={"n": str(n)}) for n in range(30)]
        await commit(database, *sent)
        assert await Relay(database, redis).run_once() == 30

        got = await received(redis, 30)
        assert sorted(got, key=n_of) == sent
        for key in ("order-0", "order-1", "order-2"):
            order = [n_of(e) for e in got if e.key == key]
            assert order == sorted(order)
    finally:
        await redis.destroy()
        await redis.close()


async def test_a_row_too_large_for_nats_is_parked_at_once_even_alone(database: Database) -> None:
    # Alone in its pass, a refused row looked like an outage (the broker took nothing)
    # and was retried for ever, holding its key. The client refuses it by its size:
    # MessageRefused, parked at once, and its key's next row goes on.
    require("nats")
    from iambus.transports.nats import NatsTransport

    nats = NatsTransport(f"nats://127.0.0.1:4222?namespace=test-{uuid.uuid4().hex[:10]}")
    await nats.open()
    try:
        await nats.declare(ADDRESS, GROUP, from_start=True)
        pad = "x" * 2_000_000  # over the server's max_payload (1 MB by default)
        huge = Envelope(name="Thing", payload=json.dumps({"n": 0, "pad": pad}).encode(), key="k")
        await commit(database, huge)
        relay = Relay(database, nats)
        assert await relay.run_once() == 0
        [row] = await parked(database)
        assert row.message_id == huge.id
        assert row.error.startswith("MessageRefused: ")
        assert "larger than the server's max_payload (1,048,576 bytes)" in row.error
        await commit(database, envelope(1, key="k"))
        assert await relay.run_once() == 1
        assert [n_of(e) for e in await received(nats, 1)] == [1]
    finally:
        await nats.destroy()
        await nats.close()


async def test_a_send_the_driver_cancels_is_a_failed_send_not_the_relays_end(
    database: Database, transport: MemoryTransport
) -> None:
    """A client library may cancel its own pending futures when its connection closes:
    the row stays for the next pass, and the relay goes on."""

    class Cancelling:
        url = "cancelling+memory://"
        cancelled = False

        async def send(self, address: str, envelope: Envelope) -> None:
            if not Cancelling.cancelled:
                Cancelling.cancelled = True
                raise asyncio.CancelledError  # not the relay's: its task is not cancelling
            await transport.send(address, envelope)

    await commit(database, envelope(1, key="k"), envelope(2, key="k"))
    relay = Relay(database, Cancelling())
    with pytest.raises(TransportError, match="the send was cancelled"):
        await relay.run_once()  # nothing went out: an outage, the rows stay
    assert await count_rows(database) == 2
    assert await relay.run_once() == 2
    assert [n_of(e) for e in await received(transport, 2)] == [1, 2]


async def test_rows_in_hand_stay_within_about_a_batchs_bytes(
    database: Database, transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch full by bytes has few rows: it hands over only once half its bytes are
    under way, so the rows read and not yet sent stay within BATCH_BYTES or so."""
    import iambus.relay

    limit = 64 * 1024
    monkeypatch.setattr(iambus.relay, "BATCH_BYTES", limit)
    size = 8 * 1024
    rows = [Envelope(name="Big", payload=bytes([n % 256]) * size) for n in range(60)]
    await commit(database, *rows)
    most = 0

    class Watching:
        url = "watching+memory://"

        async def send(self, address: str, envelope: Envelope) -> None:
            nonlocal most
            most = max(most, waiting.unstarted_bytes) if waiting is not None else most
            await asyncio.sleep(0.002)
            await transport.send(address, envelope)

    waiting: Any = None
    original = iambus.relay._Pass.__init__

    def seen(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal waiting
        original(self, *args, **kwargs)
        waiting = self

    monkeypatch.setattr(iambus.relay._Pass, "__init__", seen)
    assert await Relay(database, Watching(), in_flight=4).run_once() == 60
    assert len(await received(transport, 60)) == 60
    assert 0 < most <= limit + size  # one batch's bytes (its last row may cross the line)


async def test_a_relay_waiting_for_a_connection_holds_no_lane(
    database: Database, transport: MemoryTransport
) -> None:
    """A pass takes its second connection before its lanes: a relay whose pool is busy
    keeps no other relay from the rows meanwhile."""
    await commit(database, *(envelope(n, key=f"k{n % 3}") for n in range(9)))
    small = Database(POSTGRES_DSN, schema=database.schema, pool={"min_size": 1, "max_size": 2})
    waiting = asyncio.Event()
    starved = Relay(small, transport)
    original = starved._connection
    calls = 0

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            waiting.set()  # the pass's second connection: the pool has none to give
        async with original() as conn:
            yield conn

    starved._connection = connection  # type: ignore[method-assign]
    try:
        async with small.connection():  # one of its two connections taken
            pending = asyncio.create_task(starved.run_once())
            await asyncio.wait_for(waiting.wait(), 5)
            assert await Relay(database, transport).run_once() == 9  # every lane free
        assert await asyncio.wait_for(pending, 15) == 0  # nothing left for it
    finally:
        await small.close()
    assert sorted(n_of(e) for e in await received(transport, 9)) == list(range(9))
