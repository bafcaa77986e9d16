"""Redis Streams, end to end: real Redis, no mocks — what only Redis has.

The scenarios every broker shares (worker processes killed or stopped, two services of
two instances, queries across processes, per-key order across processes) are in
``tests/test_worker_processes.py``. Here: connections killed under a running worker and
requester (``CLIENT KILL``), and the Redis layout of per-key ordering. Each test gets a
namespace of its own (``test-<uuid>``) whose keys are deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import (
    Dispatcher,
    Limits,
    Query,
    RemoteError,
    RequestTimeout,
    TransportError,
    TransportRefused,
)

from .conftest import require, service_up
from .processes import until

REDIS = "redis://127.0.0.1:6379/0"
CLAIM_AFTER = 1.0  # the workers' RedisTransport(claim_after=...)


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str]):
    order_id: int


ROUTES: dict[type | str, str] = {OrderPlaced: "orders", GetInvoice: "billing"}
EVENTS = "event.OrderPlaced"


@dataclass
class Services:
    """One test's namespace, and a plain redis-py client to look at it and kill clients."""

    namespace: str
    _admin: Any = None

    @property
    def url(self) -> str:
        return f"{REDIS}?namespace={self.namespace}"

    @property
    def admin(self) -> Any:
        if self._admin is None:
            import redis.asyncio

            self._admin = redis.asyncio.Redis.from_url(REDIS)
        return self._admin

    def client_name(self, role: str) -> str:
        return f"{self.namespace}-{role}"

    async def connections(self, name: str) -> list[dict[str, Any]]:
        """The Redis connections named ``name`` (the URL's ``client_name``)."""
        return [c for c in await self.admin.client_list() if c.get("name") == name]

    async def kill_connections(self, name: str) -> int:
        """``CLIENT KILL`` the connections named ``name``; how many there were."""
        connections = await self.connections(name)
        for connection in connections:
            await self.admin.client_kill_filter(_id=connection["id"])
        return len(connections)

    async def settled(self, address: str, group: str) -> bool:
        summary = await self.admin.xpending(f"{self.namespace}:{address}", group)
        return int(summary["pending"]) == 0

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.aclose()
        if service_up("redis"):
            from iambus.transports.redis import RedisTransport

            cleaner = RedisTransport(self.url)
            await cleaner.open()
            await cleaner.destroy()
            await cleaner.close()


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    made = Services(f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield made
    finally:
        await made.close()


def dispatcher(services: Services, role: str, service: str, **options: Any) -> Dispatcher:
    """A dispatcher whose Redis connections carry the name of ``role``."""
    url = f"{services.url}&client_name={services.client_name(role)}"
    return Dispatcher(transport=url, service=service, routes=ROUTES, **options)


def sender(services: Services) -> Dispatcher:
    """The test's own dispatcher: service orders, publishing and asking."""
    return dispatcher(services, "orders", "orders")


async def test_redis_wrong_credentials_are_refused_not_retried() -> None:
    require("redis")
    from iambus.transports.redis import RedisTransport

    wrong = RedisTransport(f"redis://nobody-{uuid.uuid4().hex[:8]}:wrong@127.0.0.1:6379/0")
    with pytest.raises(TransportRefused, match="connect refused") as info:
        await wrong.open()
    assert "check the user and password" in str(info.value)


async def test_redis_a_worker_whose_permissions_are_revoked_stops(services: Services) -> None:
    require("redis")
    user, password = f"iambus-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = services.admin
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        url = f"redis://{user}:{password}@127.0.0.1:6379/0?namespace={services.namespace}"
        billing = Dispatcher(transport=url, service="billing", routes=ROUTES)

        @billing.events.register(OrderPlaced)
        async def charge(event: OrderPlaced) -> None: ...

        async with billing:
            serving = asyncio.ensure_future(billing.wait_for_shutdown())
            await admin.execute_command("ACL", "SETUSER", user, "-@all")  # revoked
            # The worker stops by itself and says why, instead of retrying for ever.
            with pytest.raises(TransportRefused, match=r"NOPERM|no permissions"):
                await asyncio.wait_for(serving, 10)
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


async def test_a_worker_whose_connections_are_killed_reconnects(services: Services) -> None:
    require("redis")
    from iambus.transports.redis import RedisTransport

    # How it recovers. redis-py (8.x) does not retry by itself here: the transport builds
    # its pool from the URL without a ``retry``, so its connections get
    # Retry(NoBackoff(), 0). A killed connection fails the command on it (ConnectionError,
    # raised as TransportError): the worker logs it and receives again after 1 s, on a
    # new connection. An idle killed connection is reopened by the pool's
    # ensure_connection() if the loop has already seen its EOF; otherwise the first
    # command on it fails the same way. A delivery whose reply or ack was lost stays
    # pending and is claimed again after claim_after: handled twice only if its handler
    # had run, i.e. only for messages in flight at a kill (at most `concurrency` each).
    concurrency = 8
    name = services.client_name("worker")
    transport = RedisTransport(
        f"{services.url}&client_name={name}", claim_after=CLAIM_AFTER, block=0.2
    )
    worker = Dispatcher(
        transport=transport,
        service="billing",
        routes=ROUTES,
        limits=Limits(concurrency=concurrency),
    )
    seen: Counter[int] = Counter()

    @worker.events.register(OrderPlaced)
    async def count(event: OrderPlaced) -> None:
        await asyncio.sleep(0.005)  # a few are always in flight
        seen[event.order_id] += 1

    total, sent = 300, 0
    killed: list[int] = []

    async def kill() -> None:
        killed.append(await services.kill_connections(name))

    async def steady_stream(orders: Dispatcher, first: int, last: int) -> None:
        nonlocal sent
        for n in range(first, last):
            await orders.publish(OrderPlaced(n))
            sent = n + 1
            await asyncio.sleep(0.005)

    group = f"billing.{count.__module__}.{count.__qualname__}"
    try:
        async with worker, sender(services) as orders:
            stream = asyncio.create_task(steady_stream(orders, 0, total))
            try:
                await until(lambda: sent >= 60, 10, "60 events sent")
                await kill()
                after_first = sent
                # it reconnected: events sent after the kill are handled
                await until(lambda: after_first + 5 in seen, 10, "the worker to reconnect")
                await kill()
                await asyncio.wait_for(stream, 20)
            finally:
                stream.cancel()
            await until(lambda: set(seen) == set(range(total)), 15, "every event handled")
            await until(lambda: services.settled(EVENTS, group), 10, "every delivery acked")
            # the worker is still running: a new event is handled
            await orders.publish(OrderPlaced(total))
            await until(lambda: total in seen, 5, "an event after the kills")
    finally:
        await transport.close()
    assert killed[0] >= 1, "the worker had no connection to kill"
    duplicates = {n: count - 1 for n, count in seen.items() if count > 1}
    assert set(seen) == set(range(total + 1))  # at least once, each
    assert sum(duplicates.values()) <= concurrency * len(killed), (killed, duplicates)


async def test_a_requester_whose_connections_are_killed_reconnects(
    services: Services,
) -> None:
    require("redis")
    billing = dispatcher(services, "billing", "billing")

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        if query.order_id < 0:
            raise LookupError(f"no order {query.order_id}")
        return f"INV-{query.order_id}"

    async with billing, sender(services) as orders:
        assert await orders.query(GetInvoice(7), timeout=5) == "INV-7"
        with pytest.raises(RemoteError, match=r"GetInvoice failed in service 'billing'"):
            await orders.query(GetInvoice(-1), timeout=5)

        # The requester's connections dropped (its reply subscription too), it reconnects:
        # the request in flight at that moment may fail (TransportError: redis-py does not
        # retry here) or lose its reply (RequestTimeout); the ones after are answered.
        killed = await services.kill_connections(services.client_name("orders"))
        assert killed >= 2  # the pool's, and the reply listener's

        async def answered() -> bool:
            try:
                return await orders.query(GetInvoice(3), timeout=0.5) == "INV-3"
            except (TransportError, RequestTimeout):
                return False

        await until(answered, 5, "an answer after the requester reconnected")
        assert await orders.query(GetInvoice(4), timeout=5) == "INV-4"


async def test_redis_sixty_retries_due_together_all_come_back_on_time(services: Services) -> None:
    # 60 events fail at once on one worker, each retried after 2 s: all come back about
    # 2 s later, not one per due-retry check (a quiet subscription fetches one at a time,
    # and the due retries were looked for once per `block`: 60 s for the last).
    require("redis")
    from iambus.retry import Retry

    retry = Retry(attempts=2, backoff=2, jitter=False)
    worker = dispatcher(services, "billing", "billing", retry=retry)
    failed: dict[int, float] = {}
    retried: dict[int, float] = {}

    @worker.events.register(OrderPlaced)
    async def flaky(event: OrderPlaced) -> None:
        if event.order_id not in failed:
            failed[event.order_id] = time.monotonic()
            raise RuntimeError("fails the first time")
        retried.setdefault(event.order_id, time.monotonic())

    total = 60
    async with worker, sender(services) as orders:
        await asyncio.gather(*(orders.publish(OrderPlaced(n)) for n in range(total)))
        await until(lambda: len(failed) == total, 10, "every event to fail once")
        await until(
            lambda: len(retried) == total,
            retry.backoff + 6,
            "every event to be retried",
            detail=lambda: f"{len(retried)} of {total} retried",
        )
    late = max(retried[n] - failed[n] for n in range(total))
    assert late <= retry.backoff + 2, f"the last retry came {late:.1f}s after its failure"


# -- per-key ordering: partition streams, pointers, hand-overs --------------------------


def transport_for(namespace: str, **options: Any) -> Any:
    from iambus.transports.redis import RedisTransport

    options.setdefault("claim_after", 1.0)
    options.setdefault("block", 0.1)
    return RedisTransport(f"{REDIS}?namespace={namespace}", **options)


@contextlib.asynccontextmanager
async def opened(**options: Any) -> AsyncIterator[Any]:
    """An open RedisTransport on a namespace of its own, destroyed at the end."""
    require("redis")
    made = transport_for(f"test-{uuid.uuid4().hex[:12]}", **options)
    await made.open()
    try:
        yield made
    finally:
        await made.destroy()
        await made.close()


@pytest.fixture
async def keyed() -> AsyncIterator[Any]:
    """An open RedisTransport with 4 partitions and claim_after 1 s (no hand-over by
    accident on a loaded machine: the tests that want one wait for it)."""
    async with opened(partitions=4) as made:
        yield made


async def test_redis_a_dead_consumers_whole_batch_is_reclaimed_at_once() -> None:
    # A consumer took 20 and died. A consumer asking for one at a time (a quiet
    # subscription does) gets them all soon after claim_after, not one per reclaim
    # interval (20 x 1 s here; 20 x 5 s with the default claim_after).
    async with opened(claim_after=2.0, block=0.2) as made:
        await made.declare("a", "g", from_start=False)
        for n in range(20):
            await made.send("a", ping(n))
        taken = await made.receive("a", "g", consumer="dead", limit=20, wait=2)
        assert len(taken) == 20
        died = time.monotonic()
        got: set[int] = set()
        while len(got) < 20 and time.monotonic() < died + 15:
            for delivery in await made.receive("a", "g", consumer="live", limit=1, wait=0.2):
                assert delivery.attempt == 2
                got.add(number(delivery))
                await delivery.ack()
        took = time.monotonic() - died
        assert got == set(range(20)), f"reclaimed {len(got)} of 20 in {took:.1f}s"
        assert took < 2.0 + 4, f"the 20 were reclaimed {took:.1f}s after the death"


def ping(n: int, key: str | None = None) -> Any:
    from iambus.envelope import Envelope

    return Envelope(name="Ping", payload=json.dumps({"n": n}).encode(), key=key)


def number(delivery: Any) -> int:
    return int(json.loads(delivery.envelope.payload)["n"])


def key_in(transport: Any, lane: int) -> str:
    """A key of partition ``lane`` of ``transport``."""
    from iambus.partitions import partition

    return next(f"k{n}" for n in range(10_000) if partition(f"k{n}", transport.partitions) == lane)


async def receive_some(transport: Any, consumer: str, *, wait: float = 5) -> list[Any]:
    """What one consumer gets within ``wait`` seconds (returns at the first non-empty receive)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        got = await transport.receive("a", "g", consumer=consumer, limit=10, wait=0.2)
        if got:
            return list(got)
    return []


async def nothing_for(transport: Any, consumer: str, seconds: float, group: str = "g") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = await transport.receive("a", group, consumer=consumer, limit=10, wait=0.1)
        assert not got, f"expected nothing for {group}, got {got!r}"


def test_redis_partitions_come_from_the_constructor_or_the_url_and_are_checked() -> None:
    from iambus.errors import ImproperlyConfigured
    from iambus.partitions import PARTITIONS
    from iambus.transports.redis import RedisTransport

    assert RedisTransport(REDIS).partitions == PARTITIONS
    assert RedisTransport(f"{REDIS}?partitions=4").partitions == 4
    assert RedisTransport(f"{REDIS}?partitions=4", partitions=8).partitions == 8  # like namespace
    for bad in ("0", "1025", "four", " "):
        with pytest.raises(ImproperlyConfigured, match=r"partitions must be a whole number from 1"):
            RedisTransport(f"{REDIS}?partitions={bad}")
    with pytest.raises(ImproperlyConfigured, match=r"got True; every process of a namespace"):
        RedisTransport(REDIS, partitions=True)


async def test_redis_the_partitions_option_does_not_reach_the_driver() -> None:
    require("redis")
    from iambus.transports.redis import RedisTransport

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    transport = RedisTransport(f"{REDIS}?partitions=2&namespace={namespace}", block=0.1)
    await transport.open()  # redis-py would refuse an option it does not know
    try:
        assert transport.partitions == 2
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", ping(1, key="k"))
        [got] = await receive_some(transport, "c")
        assert (number(got), got.envelope.key) == (1, "k")
        await got.ack()
    finally:
        await transport.destroy()
        await transport.close()


async def test_redis_declare_makes_each_partition_stream_and_destroy_removes_them(
    keyed: Any,
) -> None:
    client = keyed._client()
    await keyed.declare("a", "g", from_start=False)
    await keyed.declare("a", "g", from_start=False)  # again: harmless
    await keyed.declare("a", "h", from_start=True)
    for lane in range(4):
        groups = await client.xinfo_groups(f"{keyed.namespace}:a#{lane}")
        assert sorted(g["name"] for g in groups) == [b"g", b"h"]
    assert not await client.exists(f"{keyed.namespace}:a#4")
    assert await keyed.destroy() >= 7  # the stream, 2 direct streams, 4 partition streams
    assert [k async for k in client.scan_iter(match=f"{keyed.namespace}:*")] == []


async def test_redis_a_group_without_keyed_traffic_leaves_the_partitions_alone(
    keyed: Any,
) -> None:
    client = keyed._client()
    await keyed.declare("a", "g", from_start=False)
    for n in range(3):
        await keyed.send("a", ping(n))
    got = await receive_some(keyed, "c")
    assert [number(d) for d in got] == [0, 1, 2]
    for delivery in got:
        await delivery.ack()
    await nothing_for(keyed, "c", 0.5)  # a few sweeps of the partitions
    for lane in range(4):
        stream = f"{keyed.namespace}:a#{lane}"
        assert await client.xlen(stream) == 0
        # nothing was read from them: not even the consumer was registered there
        assert await client.xinfo_consumers(stream, "g") == []


async def test_redis_sends_keyed_and_unkeyed_envelopes_together(keyed: Any) -> None:
    await keyed.declare("a", "g", from_start=False)
    keys = [key_in(keyed, lane) for lane in range(3)]
    sent = [ping(n, key=keys[n % 4] if n % 4 < 3 else None) for n in range(40)]
    # all at once: they go out in coalesced pipelines, pointers beside the keyed ones
    await asyncio.gather(*(keyed.send("a", envelope) for envelope in sent))
    seen: dict[str | None, list[int]] = {}
    deadline = time.monotonic() + 10
    while sum(map(len, seen.values())) < len(sent):
        assert time.monotonic() < deadline, seen
        for delivery in await keyed.receive("a", "g", consumer="c", limit=10, wait=0.2):
            seen.setdefault(delivery.envelope.key, []).append(number(delivery))
            await delivery.ack()
    for key in keys:
        assert seen[key] == [n for n, e in enumerate(sent) if e.key == key]
    assert sorted(seen[None]) == [n for n, e in enumerate(sent) if e.key is None]


async def test_redis_a_late_settle_of_a_handed_over_key_is_ignored(
    keyed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from iambus.transports import Failure

    await keyed.declare("a", "g", from_start=False)
    key = key_in(keyed, 1)
    for n in range(2):
        await keyed.send("a", ping(n, key=key))
    [slow] = await receive_some(keyed, "slow")
    [taken] = await receive_some(keyed, "other", wait=8)  # after claim_after
    assert (number(taken), taken.attempt) == (0, 2)
    # the slow handler finishes now: its settling must not release the partition,
    # which would let n=1 out while the other consumer still runs n=0
    with caplog.at_level("WARNING", logger="iambus.transports.redis"):
        await slow.ack()
        await slow.retry(0)
        await slow.dead_letter(Failure("builtins.ValueError", "late", "", 1))
    ignored = [r.message for r in caplog.records if "handed to another consumer" in r.message]
    what = [m.removeprefix("iambus: ").split(" of ")[0] for m in ignored]
    assert what == ["ack", "retry", "dead-letter"]
    assert all("claim_after=1.0s" in m for m in ignored), ignored
    assert await keyed.dead_letters() == []
    await nothing_for(keyed, "third", 0.2)
    await taken.ack()
    [after] = await receive_some(keyed, "third")
    assert (number(after), after.attempt) == (1, 1)
    await after.ack()
    await nothing_for(keyed, "third", 0.5)


async def test_redis_a_keyed_entry_whose_pointer_was_lost_is_swept_up(keyed: Any) -> None:
    await keyed.declare("a", "g", from_start=False)
    client = keyed._client()
    # as if the connection dropped between the entry's XADD and its pointer's
    await client.xadd(f"{keyed.namespace}:a#2", ping(7, key=key_in(keyed, 2)).to_fields())
    [got] = await receive_some(keyed, "c")
    assert (number(got), got.attempt) == (7, 1)
    await got.ack()
    await nothing_for(keyed, "c", 0.5)


async def test_redis_a_lost_partition_group_is_declared_again(keyed: Any) -> None:
    await keyed.declare("a", "g", from_start=False)
    await keyed._client().delete(f"{keyed.namespace}:a#3")  # as after a FLUSHDB
    await keyed.send("a", ping(8, key=key_in(keyed, 3)))
    [got] = await receive_some(keyed, "c")
    assert number(got) == 8
    await got.ack()


async def test_redis_replays_a_keyed_dead_letter_to_its_group_behind_its_partition(
    keyed: Any,
) -> None:
    from iambus.transports import Failure

    client = keyed._client()
    await keyed.declare("a", "g", from_start=False)
    await keyed.declare("a", "h", from_start=False)
    key = key_in(keyed, 0)
    for n in range(2):
        await keyed.send("a", ping(n, key=key))
    [first] = await receive_some(keyed, "c")
    await first.dead_letter(Failure("builtins.ValueError", "bad", "", 1))
    [second] = await receive_some(keyed, "c")
    assert number(second) == 1
    [letter] = await keyed.dead_letters()
    assert await keyed.replay([letter.id]) == 1
    await nothing_for(keyed, "c", 0.2)  # n=1 is still out: the replay waits behind it
    await second.ack()
    [replayed] = await receive_some(keyed, "c")
    assert (number(replayed), replayed.attempt) == (0, 1)
    await replayed.ack()
    # the other group gets the key's envelopes once each, and skips the replay
    got: list[Any] = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        for delivery in await keyed.receive("a", "h", consumer="c", limit=10, wait=0.2):
            got.append(delivery)
            await delivery.ack()
    assert [number(d) for d in got] == [0, 1]
    await nothing_for(keyed, "c", 0.5, group="h")
    for group in ("g", "h"):  # every pointer and entry settled, the skipped ones too
        for stream in (f"{keyed.namespace}:a", f"{keyed.namespace}:a#0"):
            assert (await client.xpending(stream, group))["pending"] == 0, (stream, group)


async def test_redis_a_pointer_to_a_partition_this_process_lacks_is_reported(
    keyed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await keyed.declare("a", "g", from_start=False)
    wider = transport_for(keyed.namespace, partitions=16)  # a misconfigured sender
    await wider.open()
    try:
        beyond = next(f"k{n}" for n in range(1000) if partition_of(f"k{n}", 16) >= 4)
        with caplog.at_level("ERROR", logger="iambus.transports.redis"):
            await wider.send("a", ping(1, key=beyond))
            await wider.send("a", ping(2, key=beyond))
            started = time.monotonic()
            await nothing_for(keyed, "c", 0.5)  # no loop re-declaring a missing group
            assert time.monotonic() - started < 3
        [error] = [r for r in caplog.records if "names partition" in r.message]
        assert "partitions=4" in error.message
        assert "the same partitions" in error.message
    finally:
        await wider.close()


def partition_of(key: str, count: int) -> int:
    from iambus.partitions import partition

    return partition(key, count)


async def test_redis_a_lost_key_passes_on_while_unkeyed_envelopes_keep_every_receive_full(
    keyed: Any,
) -> None:
    # The sweep that claims an abandoned keyed delivery ran only in a receive that still had
    # room after reading the stream: under a backlog of unkeyed envelopes every receive came
    # back full, and the key stayed stuck until the backlog was gone.
    await keyed.declare("a", "g", from_start=False)
    key = key_in(keyed, 1)
    for n in range(2):
        await keyed.send("a", ping(n, key=key))
    [lost] = await receive_some(keyed, "crashed")  # never settled
    assert number(lost) == 0
    backlog = 400
    await asyncio.gather(*(keyed.send("a", ping(1000 + n)) for n in range(backlog)))
    unkeyed = 0
    keyed_seen: list[tuple[int, int, int]] = []  # (n, attempt, unkeyed seen before it)
    deadline = time.monotonic() + 60
    while unkeyed < backlog or len(keyed_seen) < 2:
        assert time.monotonic() < deadline, (unkeyed, keyed_seen)
        for delivery in await keyed.receive("a", "g", consumer="alive", limit=2, wait=0.2):
            if delivery.envelope.key is None:
                unkeyed += 1
            else:
                keyed_seen.append((number(delivery), delivery.attempt, unkeyed))
            await delivery.ack()
        await asyncio.sleep(0.03)  # a worker busy with its handlers
    assert [(n, attempt) for n, attempt, _ in keyed_seen] == [(0, 2), (1, 1)]
    assert keyed_seen[0][2] < backlog, "the key waited for the whole unkeyed backlog"


async def test_redis_a_closing_transport_hands_its_unsettled_keyed_deliveries_on_at_once() -> None:
    # A worker that stops cancels the handlers that outlive its shutdown timeout and
    # closes its transport: their keyed deliveries held their partitions (every key in
    # them) for claim_after more, as if the process had crashed.
    async with opened(partitions=4, claim_after=30) as stopping:
        await stopping.declare("a", "g", from_start=False)
        key = key_in(stopping, 2)
        for n in range(2):
            await stopping.send("a", ping(n, key=key))
        [cancelled] = await receive_some(stopping, "stopping")
        assert number(cancelled) == 0
        other = transport_for(stopping.namespace, partitions=4, claim_after=30)
        await other.open()
        try:
            await stopping.close()  # the handler of n=0 was cancelled: never settled
            seen: list[tuple[int, int]] = []
            deadline = time.monotonic() + 10  # far below claim_after
            while len(seen) < 2 and time.monotonic() < deadline:
                for delivery in await other.receive("a", "g", consumer="c", limit=10, wait=0.2):
                    seen.append((number(delivery), delivery.attempt))
                    await delivery.ack()
            assert seen == [(0, 2), (1, 1)]
        finally:
            await other.close()
            await stopping.open()  # for the tear-down


async def test_redis_a_keyed_dead_letter_replays_into_the_partition_it_came_from(
    keyed: Any,
) -> None:
    # `iambus dlq replay --transport redis://...` without the workers' ?partitions= (they
    # set it in code): the replay took the partition from its own count, and put the
    # envelope in a partition stream the workers never read; the dead letter was gone.
    from iambus.transports import Failure

    await keyed.declare("a", "g", from_start=False)
    key = next(f"k{n}" for n in range(1000) if partition_of(f"k{n}", 16) >= 4)
    await keyed.send("a", ping(0, key=key))
    [failed] = await receive_some(keyed, "c")
    await failed.dead_letter(Failure("builtins.ValueError", "bad", "", 1))
    replayer = transport_for(keyed.namespace)  # the default 16 partitions
    await replayer.open()
    try:
        [letter] = await replayer.dead_letters()
        assert await replayer.replay([letter.id]) == 1
    finally:
        await replayer.close()
    [replayed] = await receive_some(keyed, "c")
    assert (number(replayed), replayed.envelope.key) == (0, key)
    await replayed.ack()


# -- configuration, lifecycle and failures ----------------------------------------------


def test_redis_a_namespace_with_a_colon_is_refused_naming_it() -> None:
    from iambus.errors import ImproperlyConfigured
    from iambus.transports.redis import RedisTransport

    with pytest.raises(ImproperlyConfigured, match=r"may not contain ':': 'shop:eu'"):
        RedisTransport(REDIS, namespace="shop:eu")


def test_redis_a_namespace_with_a_colon_in_the_url_is_refused_naming_it() -> None:
    from iambus.errors import ImproperlyConfigured
    from iambus.transports.redis import RedisTransport

    with pytest.raises(ImproperlyConfigured, match=r"'shop:eu'"):
        RedisTransport(f"{REDIS}?namespace=shop:eu")


async def test_redis_a_transport_not_open_says_so_and_opening_twice_is_harmless() -> None:
    require("redis")
    made = transport_for(f"test-{uuid.uuid4().hex[:12]}")
    with pytest.raises(TransportError, match=r"not open; await transport\.open\(\)"):
        await made.dead_letters()
    await made.open()
    client = made._redis
    await made.open()
    assert made._redis is client, "a second open() replaced the connection pool"
    await made.close()
    with pytest.raises(TransportError, match="not open"):
        await made.purge()


async def test_redis_closing_fails_a_request_still_waiting_for_its_answer() -> None:
    async with opened() as made:
        waiting = asyncio.create_task(made.request("nobody.listens", ping(0), timeout=5))

        async def sent() -> bool:  # the request is in its stream: it waits for the answer
            return bool(await made._client().xlen(made._stream("nobody.listens")))

        await until(sent, 10, "the request to be sent")
        assert not waiting.done()
        await made.close()
        started = time.monotonic()
        with pytest.raises(TransportError, match="closed while waiting"):
            await waiting
        assert time.monotonic() - started < 1, "the request waited for its timeout"
        await made.open()  # for the tear-down's destroy()


async def test_redis_a_reply_that_is_no_envelope_is_skipped_and_the_next_reply_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Junk on the reply channel (another program, an older version) is logged once each
    # and skipped: the listener stays subscribed, so the real answer right behind it is
    # not lost while it would resubscribe.
    import logging

    from iambus.envelope import Envelope

    junk = [
        b"junk",  # no line of JSON
        b"[1, 2]\n",  # JSON, not an object
        b"\xff\n",  # not UTF-8
        b'{"id": "x", "name": "Pong", "at": "1", "corr": ["a list"]}\npayload',
    ]
    async with opened() as made:
        await made.declare("a", "g", from_start=False)
        question = ping(1)
        asking = asyncio.create_task(made.request("a", question, timeout=5))
        [delivery] = await receive_some(made, "c")
        to = delivery.envelope.reply_to
        assert to is not None
        with caplog.at_level(logging.WARNING, logger="iambus"):
            for body in junk:
                await made._client().publish(to, body)
            await made.reply(to, Envelope(name="Pong", payload=b"ok", correlation_id=question.id))
            assert (await asking).payload == b"ok"
            await delivery.ack()
            # Still listening: a second request is answered too.
            again = ping(2)
            asking = asyncio.create_task(made.request("a", again, timeout=5))
            [delivery] = await receive_some(made, "c")
            await made.reply(to, Envelope(name="Pong", payload=b"2", correlation_id=again.id))
            assert (await asking).payload == b"2"
        skipped = [r for r in caplog.records if "a reply on" in r.getMessage()]
        assert [r.levelno for r in skipped] == [logging.WARNING] * len(junk), caplog.text
        assert "no envelope" in skipped[0].getMessage()
        assert "a list" in skipped[-1].getMessage()  # names what was wrong
        assert "resubscribing" not in caplog.text


async def test_redis_purging_nothing_keeps_the_dead_letters_and_purging_all_counts_them() -> None:
    from iambus.transports import Failure

    async with opened() as made:
        await made.declare("a", "g", from_start=False)
        for n in range(2):
            await made.send("a", ping(n))
        deliveries = await receive_some(made, "c")
        assert len(deliveries) == 2
        for delivery in deliveries:
            await delivery.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
        assert len(await made.dead_letters()) == 2
        assert await made.purge([]) == 0
        assert len(await made.dead_letters()) == 2
        assert await made.purge() == 2
        assert await made.dead_letters() == []
        assert await made.purge() == 0


async def test_redis_every_send_of_a_failed_batch_fails_and_later_sends_flow() -> None:
    # Sends made at once go out in one pipeline: one that fails (here the address's key
    # holds a string, WRONGTYPE) must fail each of its senders, not leave one waiting.
    async with opened() as made:
        assert made._redis is not None
        await made._redis.set(made._stream("broken"), "not a stream")
        outcomes = await asyncio.gather(
            *(made.send("broken", ping(n)) for n in range(6)), return_exceptions=True
        )
        assert all(isinstance(o, TransportError) for o in outcomes), outcomes
        assert all("XADD failed" in str(o) and "WRONGTYPE" in str(o) for o in outcomes)
        await made.declare("a", "g", from_start=False)
        async with asyncio.timeout(3):
            await asyncio.gather(*(made.send("a", ping(n)) for n in range(6)))
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 6 and time.monotonic() < deadline:
            got += await made.receive("a", "g", consumer="c", limit=10, wait=0.2)
        assert sorted(number(d) for d in got) == list(range(6))


async def test_backlog_counts_a_keyed_message_once_not_with_its_pointer(
    services: Services,
) -> None:
    from iambus.envelope import Envelope
    from iambus.transports.redis import RedisTransport

    transport = RedisTransport(services.url)
    await transport.open()
    try:
        await transport.declare(EVENTS, "billing.charge", from_start=False)
        for n in range(4):  # two keyed: each is its partition's entry plus a pointer
            key = f"order-{n}" if n % 2 else None
            await transport.send(EVENTS, Envelope(name="OrderPlaced", payload=b"{}", key=key))
        backlog = await transport.backlog(EVENTS, "billing.charge")
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (4, 0, 0)
        deliveries = await transport.receive(
            EVENTS, "billing.charge", consumer="c", limit=10, wait=1
        )
        assert len(deliveries) == 4  # the pointers were read: the keyed entries taken
        backlog = await transport.backlog(EVENTS, "billing.charge")
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (0, 4, 0)
        await deliveries[0].retry(30)
        backlog = await transport.backlog(EVENTS, "billing.charge")
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (0, 3, 1)
    finally:
        await transport.close()


async def test_redis_close_sends_what_was_sent_before_it_and_leaves_no_task_behind() -> None:
    # Sends made at once: the first goes out alone, the rest queue behind it for a
    # flush of their own (a task of the transport). close() in the middle waits for both:
    # every send issued before it is stored, and no flush is left running after it.
    async with opened() as made:
        before = asyncio.all_tasks()
        await made.declare("a", "g", from_start=False)
        sends = [asyncio.create_task(made.send("a", ping(n))) for n in range(50)]
        await asyncio.sleep(0)  # one loop turn: the sends start
        assert len(made._sends._items) == 49, "expected one send in flight, 49 queued"
        await made.close()
        left = asyncio.all_tasks() - before - set(sends)
        assert not left, f"tasks still running after close(): {left}"
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        assert outcomes == [None] * 50, outcomes
        await made.open()
        assert await made._client().xlen(made._stream("a")) == 50


async def test_redis_a_flush_that_outlasts_close_fails_its_senders_and_ends() -> None:
    # close() waits CLOSE_WAIT for a flush in flight at most: then its senders, and those
    # queued behind it, get close()'s TransportError, and its task is gone.
    from iambus.transports.redis import _Coalescer

    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        if len(items) > 1:
            await asyncio.Event().wait()  # a batch hangs (a broker that stopped answering)
        return items

    sends = _Coalescer(flush)
    before = asyncio.all_tasks()
    first = asyncio.ensure_future(sends.add(1))
    queued = [asyncio.ensure_future(sends.add(n)) for n in (2, 3)]
    assert await first == 1  # alone, in its sender's task
    await until(lambda: flushed == [[1], [2, 3]], 5, "the batch behind it to start")
    late = asyncio.ensure_future(sends.add(4))  # queued behind the hanging batch
    closed = TransportError("closed before it could send or ack")
    await sends.drain(0.1, closed)
    assert asyncio.all_tasks() - before - {first, late, *queued} == set()
    for send in (*queued, late):
        with pytest.raises(TransportError, match="closed before"):
            await send
    assert await sends.add(5) == 5  # and it works again (a transport opened again)
    assert flushed[-1] == [5]


async def test_redis_a_reply_is_out_once_reply_returns_before_an_ack_or_close() -> None:
    # reply() returns once its PUBLISH is done: before the ack that follows it (keyed or
    # not), with no ack behind it, and just before close().
    from iambus.envelope import Envelope

    async with opened(partitions=4) as asker:
        answering = transport_for(asker.namespace, partitions=4)
        await answering.open()
        try:
            await answering.declare("a", "g", from_start=False)
            for key in (None, "k"):  # a keyed delivery is settled by a script of its own
                question = ping(1, key=key)
                asking = asyncio.create_task(asker.request("a", question, timeout=5))
                [delivery] = await receive_some(answering, "c")
                to = delivery.envelope.reply_to
                assert to is not None
                answer = Envelope(name="Pong", payload=b"ok", correlation_id=question.id)
                await answering.reply(to, answer)
                await delivery.ack()
                assert (await asking).payload == b"ok"
            question = ping(2)
            asking = asyncio.create_task(asker.request("a", question, timeout=5))
            [delivery] = await receive_some(answering, "c")
            answer = Envelope(name="Pong", payload=b"alone", correlation_id=question.id)
            await answering.reply(delivery.envelope.reply_to or "", answer)  # no ack follows
            assert (await asking).payload == b"alone"
            await delivery.ack()
            question = ping(3)
            asking = asyncio.create_task(asker.request("a", question, timeout=5))
            [delivery] = await receive_some(answering, "c")
            answer = Envelope(name="Pong", payload=b"last", correlation_id=question.id)
            await answering.reply(delivery.envelope.reply_to or "", answer)
        finally:
            await answering.close()
        assert (await asking).payload == b"last"


@contextlib.asynccontextmanager
async def acl_user(*rules: str) -> AsyncIterator[str]:
    """The URL of a Redis user of its own with ACL ``rules``, deleted at the end."""
    import redis.asyncio

    user, password = f"iambus-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with redis.asyncio.Redis.from_url(REDIS) as admin:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules)
        try:
            yield f"redis://{user}:{password}@127.0.0.1:6379/0"
        finally:
            await admin.execute_command("ACL", "DELUSER", user)


async def pending(transport: Any, stream: str | None = None) -> int:
    """How many entries group "g" has pending on ``stream`` (default: address "a"'s)."""
    summary = await transport._client().xpending(stream or transport._stream("a"), "g")
    return int(summary["pending"])


async def test_redis_a_reply_that_cannot_be_published_raises_and_its_delivery_stays_unacked() -> (
    None
):
    # A user without channel rights (Redis 7's default for a new user: resetchannels)
    # cannot publish a reply: reply() says so, and the worker, which acks only once the
    # reply is out, leaves the query's delivery unacked instead of losing its answer.
    from iambus.envelope import Envelope

    async with opened() as asker, acl_user("~*", "+@all", "resetchannels") as url:
        answering = type(asker)(url, namespace=asker.namespace, block=0.1)
        await answering.open()
        try:
            await answering.declare("a", "g", from_start=False)
            question = ping(1)
            asking = asyncio.create_task(asker.request("a", question, timeout=5))
            [delivery] = await receive_some(answering, "c")
            answer = Envelope(name="Pong", payload=b"ok", correlation_id=question.id)
            with pytest.raises(TransportRefused, match="PUBLISH reply refused"):
                await answering.reply(delivery.envelope.reply_to or "", answer)
            assert await pending(asker) == 1
            asking.cancel()
        finally:
            await answering.close()


async def test_redis_a_reply_that_fails_fails_no_other_deliverys_settle() -> None:
    # Replies and acks issued together share a pipeline: a reply that cannot be
    # published (to a channel this user may not use) fails its own sender only, not a
    # keyed ack or an unkeyed one made meanwhile.
    from iambus.envelope import Envelope

    async with opened(partitions=4) as made:
        rules = ("~*", "+@all", "resetchannels", f"&{made.namespace}:*")
        async with acl_user(*rules) as url:
            worker = type(made)(url, namespace=made.namespace, partitions=4, block=0.1)
            await worker.open()
            try:
                await worker.declare("a", "g", from_start=False)
                await worker.send("a", ping(1))
                await worker.send("a", ping(2, key="k"))
                got: list[Any] = []
                while len(got) < 2:
                    more = await receive_some(worker, "c")
                    assert more, f"got {got} of 2"
                    got += more
                foreign = Envelope(name="Pong", payload=b"1")
                replying = asyncio.ensure_future(worker.reply("elsewhere:reply:x", foreign))
                await asyncio.gather(*(delivery.ack() for delivery in got))
                with pytest.raises(TransportRefused, match=r"NOPERM|no permissions"):
                    await replying
                assert await pending(made) == 0
                assert await pending(made, made._lane("a", partition_of("k", 4))) == 0
            finally:
                await worker.close()


async def test_redis_close_refuses_a_reply_or_send_once_it_drained() -> None:
    # While close() hands on what it held, its sends and acks are drained: a reply or a
    # send issued then would start a flush nobody waits for (a reply lost, a task that
    # outlives close()). They are refused, and close() leaves no task behind.
    from iambus.envelope import Envelope

    async with opened(partitions=4) as made:
        await made.declare("a", "g", from_start=False)
        await made.send("a", ping(1, key="k"))
        [held] = await receive_some(made, "c")
        late: list[BaseException | None] = []
        handing_on = made._hand_on

        async def hand_on(holding: Any) -> None:
            for attempt in (
                made.reply(made._reply_channel, Envelope(name="Pong", payload=b"1")),
                made.send("a", ping(2)),
            ):
                try:
                    await attempt
                    late.append(None)
                except TransportError as exc:
                    late.append(exc)
            await handing_on(holding)

        made._hand_on = hand_on
        before = asyncio.all_tasks()
        await made.close()
        assert asyncio.all_tasks() - before == set()
        assert [str(exc) for exc in late if exc] == [
            f"{made.url}: closing, cannot {what} any more; {what} before close()"
            for what in ("reply", "send")
        ], late
        await made.open()  # for the tear-down, and it sends again
        await made.send("a", ping(3))
        assert await pending(made, made._lane("a", partition_of("k", 4))) == 1, held


@pytest.mark.parametrize("how", ["leave", "close"])
async def test_redis_leave_or_close_hands_on_an_unkeyed_delivery_at_once(how: str) -> None:
    # A stopping worker's consumer held one of 6: after leave() (or close()), another
    # consumer gets all 6 long before claim_after, the one given back as a further attempt.
    async with opened(claim_after=30) as made:
        stopping = transport_for(made.namespace, claim_after=30)
        await stopping.open()
        try:
            await made.declare("a", "g", from_start=False)
            for n in range(6):
                await made.send("a", ping(n))
            [left] = await stopping.receive("a", "g", consumer="leaving", limit=1, wait=5)
            await (stopping.leave("leaving") if how == "leave" else stopping.close())
            seen: dict[int, int] = {}
            deadline = time.monotonic() + 10
            while len(seen) < 6 and time.monotonic() < deadline:
                for delivery in await made.receive(
                    "a", "g", consumer="staying", limit=10, wait=0.2
                ):
                    seen[number(delivery)] = delivery.attempt
                    await delivery.ack()
            assert seen == {n: 2 if n == number(left) else 1 for n in range(6)}
        finally:
            await stopping.close()


# -- connections that die silently --------------------------------------------------------


class BlackHole:
    """A TCP forwarder to Redis that ``cut()`` turns into a black hole, as a NAT or a
    firewall that dropped its state (or a host gone without a RST) does: its connections
    stay open, but no byte passes any more (or, ``cut("answers")``, none from Redis: the
    commands arrive, their answers are lost). A cut connection stays cut, as a dropped NAT
    mapping does; those made after ``restore()`` forward again. Only this test's own
    connections are affected, not the other clients of the shared Redis."""

    def __init__(self) -> None:
        self.cut_off: str | None = None  # None, "both" or "answers"
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut: list[list[str | None]] = []  # each connection's own cut

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aenter__(self) -> BlackHole:
        require("redis")
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    def cut(self, lost: str = "both") -> None:
        """From now on, the open connections (and new ones) pass nothing (or no answer)."""
        self.cut_off = lost
        for state in self._cut:
            state[0] = lost

    def restore(self) -> None:
        """Connections made from now on forward again; the cut ones stay cut."""
        self.cut_off = None

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._writers += [writer, redis_writer]
        state: list[str | None] = [self.cut_off]
        self._cut.append(state)
        for source, sink, answers in ((reader, redis_writer, False), (redis_reader, writer, True)):
            task = asyncio.get_running_loop().create_task(self._pass(source, sink, state, answers))
            self._tasks.add(task)

    @staticmethod
    async def _pass(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        state: list[str | None],
        answers: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if state[0] == "both" or (state[0] == "answers" and answers):
                    continue  # swallowed: the peer never hears of it
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def through(hole: BlackHole, **options: Any) -> AsyncIterator[Any]:
    """An open RedisTransport connected through ``hole``, on a namespace of its own,
    destroyed at the end (over a direct connection: the hole may be cut)."""
    from iambus.transports.redis import RedisTransport

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    made = RedisTransport(f"{hole.url}?namespace={namespace}", claim_after=1.0, **options)
    await made.open()
    try:
        yield made
    finally:
        hole.restore()
        await made.close()
        cleaner = RedisTransport(f"{REDIS}?namespace={namespace}")
        await cleaner.open()
        await cleaner.destroy()
        await cleaner.close()


async def fails_within(seconds: float, command: Awaitable[Any]) -> TransportError:
    """The TransportError ``command`` raised, within ``seconds`` (the test's own bound:
    without one the command would wait as long as TCP retransmits, ~15 min)."""
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        async with asyncio.timeout(seconds * 3):  # hung: TimeoutError, not TransportError
            await command
    took = time.monotonic() - started
    assert took < seconds, f"it failed, but after {took:.1f} s, not within {seconds} s"
    return caught.value


@pytest.mark.parametrize("lost", ["both", "answers"])
async def test_redis_a_send_on_a_silently_dead_connection_fails_within_the_timeout(
    lost: str,
) -> None:
    # timeout=1.5 + block=0.2: no answer for 1.7 s fails the command (redis-py 8's own
    # default would take 5 s; redis-py 5-7 have none and wait for TCP, ~15 min).
    async with BlackHole() as hole, through(hole, timeout=1.5, block=0.2) as made:
        await made.declare("a", "g", from_start=False)
        await made.send("a", ping(1))
        hole.cut(lost)
        error = await fails_within(4, made.send("a", ping(2)))
        assert str(error).startswith(f"{made.url}: XADD failed: no answer within 1.7 s")
        assert "raise the transport's timeout (?timeout=)" in str(error)
        # The connection that timed out was dropped: the next send connects again.
        hole.restore()
        async with asyncio.timeout(5):
            await made.send("a", ping(3))
        got = []
        async with asyncio.timeout(10):
            while len(got) < (3 if lost == "answers" else 2):
                got += await made.receive("a", "g", consumer="c", limit=10, wait=0.2)
        # At least once: a send that raised may still have been stored (its answer was
        # lost, not its command); a sender that sends it again makes a duplicate.
        assert sorted(number(d) for d in got) == ([1, 2, 3] if lost == "answers" else [1, 3])


async def test_redis_a_receive_or_ack_on_a_silently_dead_connection_fails_within_the_timeout() -> (
    None
):
    async with BlackHole() as hole, through(hole, timeout=1.5, block=0.2) as made:
        await made.declare("a", "g", from_start=False)
        await made.send("a", ping(1))
        [held] = await receive_some(made, "c")
        hole.cut()
        await fails_within(4, made.receive("a", "g", consumer="c", limit=10, wait=0.5))
        await fails_within(4, held.ack())
        hole.restore()
        # The ack that failed left the delivery pending: another consumer gets it again
        # after claim_after (attempt 2), over a connection made anew.
        [again] = await receive_some(made, "c2")
        assert (number(again), again.attempt) == (1, 2)
        await again.ack()
        assert await pending(made) == 0


async def test_redis_a_receive_may_block_longer_than_the_drivers_default_socket_timeout() -> None:
    # redis-py 8 gives each connection a 5 s socket timeout unless told otherwise: an
    # XREADGROUP blocking longer than that failed every quiet receive.
    async with opened(block=5.5) as made:
        await made.declare("a", "g", from_start=False)
        started = time.monotonic()
        assert await made.receive("a", "g", consumer="c", limit=10, wait=5.5) == []
        assert time.monotonic() - started >= 5.5
        await made.send("a", ping(1))
        [got] = await receive_some(made, "c")
        assert number(got) == 1


def test_redis_timeout_comes_from_the_constructor_or_the_url_and_is_checked() -> None:
    from iambus.errors import ImproperlyConfigured
    from iambus.transports.redis import RedisTransport

    assert RedisTransport(REDIS).timeout == 10.0
    assert RedisTransport(f"{REDIS}?timeout=2.5").timeout == 2.5
    assert RedisTransport(f"{REDIS}?timeout=2.5", timeout=4).timeout == 4  # like partitions
    for bad in ("0", "-1", "inf", "nan", "soon", " "):
        with pytest.raises(ImproperlyConfigured, match=r"timeout in 'redis://.*' must be a pos"):
            RedisTransport(f"{REDIS}?timeout={bad}")
    for wrong in (0, -1.0, float("inf"), "10", True):
        with pytest.raises(ImproperlyConfigured, match=r"timeout must be seconds \(a number > 0"):
            RedisTransport(REDIS, timeout=wrong)
    for derived in ("socket_timeout", "socket_connect_timeout"):
        with pytest.raises(ImproperlyConfigured, match=rf"{derived} is set by the transport"):
            RedisTransport(f"{REDIS}?{derived}=5")


async def test_redis_a_requester_whose_reply_subscription_died_silently_subscribes_again() -> None:
    # The reply listener only reads: on a connection that died silently it heard nothing
    # for ever, and every request timed out although the network was fine again.
    from iambus.envelope import Envelope
    from iambus.transports.redis import RedisTransport

    async with BlackHole() as hole, through(hole, timeout=1.5, block=0.2) as asker:
        replier = RedisTransport(f"{REDIS}?namespace={asker.namespace}", block=0.1)
        await replier.open()
        await replier.declare("a", "g", from_start=False)
        done = asyncio.Event()

        async def answer() -> None:
            # Stopped by the flag, not by cancel(): on Python 3.11 redis-py can swallow
            # a cancellation (asyncio.wait_for around its socket write).
            while not done.is_set():
                for delivery in await replier.receive("a", "g", consumer="c", limit=10, wait=0.2):
                    to = delivery.envelope.reply_to
                    assert to is not None
                    pong = Envelope(name="Pong", payload=b"ok", correlation_id=delivery.envelope.id)
                    await replier.reply(to, pong)
                    await delivery.ack()

        async def answered() -> bool:
            try:
                return (await asker.request("a", ping(0), timeout=2)).payload == b"ok"
            except (TimeoutError, TransportError):  # its send, or its answer, was lost
                return False

        answering = asyncio.create_task(answer())
        try:
            # A loaded machine may miss one answer's 2 s: the path is shown working when
            # any is answered.
            await until(answered, 10, "an answer before the cut")
            hole.cut()
            assert not await answered()
            hole.restore()
            await until(answered, 18, "an answer once the network is back")
        finally:
            done.set()
            await answering
            await replier.close()


@pytest.mark.parametrize("timeout", [32767, 40_000, 1e9])
async def test_redis_a_long_timeout_still_connects(timeout: float) -> None:
    # The keepalive derived from timeout: Linux refuses TCP_KEEPIDLE/KEEPINTVL above
    # 32767 s (EINVAL), which failed every connect of a transport with a long timeout.
    async with opened(timeout=timeout) as made:
        await made.declare("a", "g", from_start=False)
        await made.send("a", ping(1))
        [got] = await receive_some(made, "c")
        assert number(got) == 1


async def test_redis_close_ends_a_reply_listener_that_swallowed_its_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On Python 3.11 redis-py wraps each socket write in asyncio.wait_for, which returns
    # the write's result (and drops the cancellation) when the cancel comes as the write
    # ends: a listener cancelled in its PING went on listening, and close() waited for it
    # for ever. Here the first PING drops the cancel, deterministically.
    from redis.asyncio.client import PubSub

    pinging = asyncio.Event()
    real_ping = PubSub.ping

    async def ping_dropping_a_cancel(self: Any, *args: Any) -> Any:
        if not pinging.is_set():
            pinging.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # as wait_for on 3.11 when the write was done
        return await real_ping(self, *args)

    monkeypatch.setattr(PubSub, "ping", ping_dropping_a_cancel)
    async with opened(timeout=1.0, block=1.0) as made:
        asking = asyncio.create_task(made.request("a", ping(0), timeout=25))
        async with asyncio.timeout(15):
            await pinging.wait()  # a quiet subscription: pinged after timeout s
        async with asyncio.timeout(10):  # hung: TimeoutError
            await made.close()
        with pytest.raises(TransportError, match="closed while waiting"):
            await asking
        await made.open()  # for opened()'s destroy


async def test_redis_a_request_as_close_begins_fails_instead_of_hanging() -> None:
    # close() cancelled the reply listener before it had subscribed: the request waiting
    # for the subscription waited for ever (its timeout counts only once it has sent).
    async with opened() as made:
        asking = asyncio.create_task(made.request("a", ping(1), timeout=5))
        closing = asyncio.create_task(made.close())
        async with asyncio.timeout(10):  # hung: TimeoutError
            with pytest.raises(TransportError, match="clos"):
                await asking
            await closing
        await made.open()  # for opened()'s destroy


async def test_redis_a_request_while_close_drains_leaves_no_reply_listener_behind() -> None:
    # close() stopped the reply listener first, then waited for the sends in flight: a
    # request made meanwhile started a new listener, which close() left running.
    def listeners() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "_receive_replies" in repr(t.get_coro())]

    async with BlackHole() as hole, through(hole, timeout=2, block=0.2) as made:
        await made.declare("a", "g", from_start=False)
        hole.cut("answers")  # the connections open now get no answer any more
        sending = asyncio.create_task(made.send("a", ping(1)))  # in flight for 2.2 s
        await asyncio.sleep(0)
        hole.restore()  # those made from now on answer
        closing = asyncio.create_task(made.close())  # waits for the send in flight
        await asyncio.sleep(0)
        async with asyncio.timeout(15):
            with pytest.raises(TransportError, match="clos"):
                await made.request("a", ping(2), timeout=10)
            await closing
        with pytest.raises(TransportError):
            await sending
        assert listeners() == []
        await made.open()  # for through()'s close


async def test_redis_a_request_on_a_transport_not_open_raises() -> None:
    # Its reply listener died on the closed client before it had subscribed, and the
    # request waited for that subscription for ever.
    made = transport_for(f"test-{uuid.uuid4().hex[:12]}")
    async with asyncio.timeout(10):  # hung: TimeoutError
        with pytest.raises(TransportError, match=r"is not open; await transport\.open"):
            await made.request("a", ping(1), timeout=5)
