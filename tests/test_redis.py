"""Redis Streams, end to end: real Redis, real worker processes, no mocks.

Each test gets a namespace of its own (``test-<uuid>``) whose keys are deleted at the end.
Workers run ``APP`` (written to ``tmp_path``) as subprocesses; their handlers append one
line per step to a shared log file (``<role> <start|done> <kind> <id> <time>``), which the
tests read to see who did what. Every wait is bounded, and every worker still alive at the
end of a test is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iambus import Command, Dispatcher, Query, RemoteError, RequestTimeout, TransportError

from .conftest import require, service_up

REDIS = "redis://127.0.0.1:6379/0"
CLAIM_AFTER = 1.0  # the workers' RedisTransport(claim_after=...)
HANDLER = "__main__.on_order_placed"  # the event handler's qualified name in APP


# The message contracts, as the workers define them too: they travel by name.
@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str]):
    order_id: int


ROUTES: dict[type | str, str] = {
    OrderPlaced: "orders",
    ChargeCard: "billing",
    GetInvoice: "billing",
}

APP = '''
"""A worker process: python app.py '<json config>'."""

import asyncio
import json
import sys
import time
from dataclasses import dataclass

from iambus import Command, Dispatcher, Query
from iambus.transports.redis import RedisTransport

config = json.loads(sys.argv[1])


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str]):
    order_id: int


ROUTES = {OrderPlaced: "orders", ChargeCard: "billing", GetInvoice: "billing"}


def record(step, kind, order_id):
    with open(config["log"], "a") as log:
        log.write(f"{config['role']} {step} {kind} {order_id} {time.time():.4f}\\n")


async def work(kind, order_id):
    record("start", kind, order_id)
    await asyncio.sleep(config["slow"].get(str(order_id), config["pause"]))
    record("done", kind, order_id)


transport = RedisTransport(config["url"], claim_after=config["claim_after"], block=0.2)
dp = Dispatcher(
    transport=transport,
    service=config["service"],
    routes=ROUTES,
    concurrency=config["concurrency"],
)


@dp.events.register(OrderPlaced)
async def on_order_placed(event: OrderPlaced) -> None:
    await work("event", event.order_id)


if config["service"] == "billing":  # the owner of ChargeCard and GetInvoice

    @dp.commands.register(ChargeCard)
    async def charge_card(command: ChargeCard) -> None:
        await work("command", command.order_id)

    @dp.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        if query.order_id < 0:
            raise LookupError(f"no order {query.order_id}")
        return f"INV-{query.order_id}"


asyncio.run(dp.run())
'''


@dataclass(frozen=True)
class Step:
    role: str
    step: str
    kind: str
    order_id: int
    at: float


@dataclass
class Services:
    """Worker processes of one test, on one namespace, logging to one file."""

    tmp: Path
    namespace: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _admin: Any = None

    @property
    def url(self) -> str:
        return f"{REDIS}?namespace={self.namespace}"

    @property
    def log(self) -> Path:
        return self.tmp / "steps.log"

    @property
    def admin(self) -> Any:
        """A plain redis-py client, to look at the namespace's keys."""
        if self._admin is None:
            import redis.asyncio

            self._admin = redis.asyncio.Redis.from_url(REDIS)
        return self._admin

    def key(self, address: str) -> str:
        return f"{self.namespace}:{address}"

    def spawn(
        self,
        role: str,
        service: str,
        *,
        slow: dict[int, float] | None = None,
        pause: float = 0.0,
        concurrency: int = 32,
    ) -> subprocess.Popen[bytes]:
        app = self.tmp / "app.py"
        if not app.exists():
            app.write_text(APP)
        config = {
            # Named connections: the tests can tell whose they are (CLIENT LIST).
            "url": f"{self.url}&client_name={self.client_name(role)}",
            "service": service,
            "role": role,
            "log": str(self.log),
            "slow": {str(k): v for k, v in (slow or {}).items()},
            "pause": pause,
            "concurrency": concurrency,
            "claim_after": CLAIM_AFTER,
        }
        with open(self.tmp / f"{role}.out", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(app), json.dumps(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        self.procs[role] = proc
        return proc

    def output(self, role: str) -> str:
        path = self.tmp / f"{role}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def steps(self) -> list[Step]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().split("\n")[:-1]:  # whole lines only
            role, step, kind, order_id, at = line.split()
            out.append(Step(role, step, kind, int(order_id), float(at)))
        return out

    def done(self, kind: str, role_prefix: str = "") -> Counter[int]:
        return Counter(
            s.order_id
            for s in self.steps()
            if s.step == "done" and s.kind == kind and s.role.startswith(role_prefix)
        )

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

    async def ready(self, role: str) -> None:
        """Wait until ``role``'s worker reads its streams (its groups are all declared then)."""
        proc = self.procs[role]

        async def reading() -> bool:
            assert proc.poll() is None, f"{role} exited early:\n{self.output(role)}"
            connections = await self.connections(self.client_name(role))
            return any(c.get("cmd") == "xreadgroup" for c in connections)

        await until(reading, 10, f"{role} to read its streams")

    async def pending(self, address: str, group: str) -> int:
        summary = await self.admin.xpending(self.key(address), group)
        return int(summary["pending"])

    async def pending_is(self, count: int, address: str, group: str) -> bool:
        return await self.pending(address, group) == count

    async def settled(self, address: str, group: str) -> bool:
        return await self.pending_is(0, address, group)

    async def stop(self, *roles: str, timeout: float = 10) -> dict[str, int]:
        """SIGTERM ``roles`` at once; wait for each to exit; their exit codes."""
        for role in roles:
            self.procs[role].send_signal(signal.SIGTERM)
        codes = {}
        for role in roles:
            proc = self.procs[role]
            await until(lambda p=proc: p.poll() is not None, timeout, f"{role} to exit")
            codes[role] = proc.returncode
        return codes

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        if self._admin is not None:
            await self._admin.aclose()
        if service_up("redis"):
            from iambus.transports.redis import RedisTransport

            cleaner = RedisTransport(self.url)
            await cleaner.open()
            await cleaner.destroy()
            await cleaner.close()


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    made = Services(tmp_path)
    try:
        yield made
    finally:
        await made.close()


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


def sender(services: Services) -> Dispatcher:
    """The test's own dispatcher: service orders, publishing and asking."""
    url = f"{services.url}&client_name={services.client_name('orders')}"
    return Dispatcher(transport=url, service="orders", routes=ROUTES)


EVENTS = "event.OrderPlaced"


async def test_a_worker_killed_mid_handler_loses_nothing(services: Services) -> None:
    require("redis")
    group = f"billing.{HANDLER}"
    services.spawn("A", "billing", slow={5: 5.0})  # 5 s on order 5: it never gets there
    await services.ready("A")
    async with sender(services) as orders:
        for n in range(10):
            await orders.publish(OrderPlaced(n))

        def a_is_stuck_on_5() -> bool:
            steps = services.steps()
            started = {s.order_id for s in steps if s.role == "A" and s.step == "start"}
            finished = {s.order_id for s in steps if s.role == "A" and s.step == "done"}
            return 5 in started and finished == set(range(10)) - {5}

        await until(a_is_stuck_on_5, 10, "A to finish all but order 5")
        # A's acks of the others have reached Redis: only order 5 is pending
        await until(lambda: services.pending_is(1, EVENTS, group), 5, "A's acks")
        services.procs["A"].send_signal(signal.SIGKILL)
        services.procs["A"].wait(timeout=5)
        assert await services.pending(EVENTS, group) == 1  # order 5, still A's

        services.spawn("B", "billing")
        await services.ready("B")
        for n in range(10, 15):
            await orders.publish(OrderPlaced(n))
        await until(
            lambda: set(services.done("event")) == set(range(15)), 10, "B to finish order 5"
        )
        await until(lambda: services.settled(EVENTS, group), 5, "every delivery acked")
    steps = services.steps()
    # Order 5 was started by A, never finished there, and finished once, by B, only after
    # it had been idle for claim_after. Had A been killed *after* its side effects but
    # before its ack, B would have redone them: delivery is at least once, so handlers
    # must be idempotent (or deduplicate by Envelope.id).
    fives = [(s.role, s.step) for s in steps if s.order_id == 5]
    assert fives == [("A", "start"), ("B", "start"), ("B", "done")]
    a_start, b_start = (s.at for s in steps if s.order_id == 5 and s.step == "start")
    assert b_start - a_start >= CLAIM_AFTER - 0.1
    # Everything else was handled exactly once: 0-9 by A before the kill, 10-14 by B.
    assert services.done("event") == Counter(range(15))
    assert services.done("event", "B") == Counter([5, *range(10, 15)])
    assert await services.pending(EVENTS, group) == 0


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
        transport=transport, service="billing", routes=ROUTES, concurrency=concurrency
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


async def test_sigterm_lets_the_handler_in_flight_finish_and_ack(services: Services) -> None:
    require("redis")
    commands = "command.ChargeCard"  # group: the owner service, "billing"
    services.spawn("A", "billing", slow={1: 1.0})
    await services.ready("A")
    async with sender(services) as orders:
        await orders.execute(ChargeCard(1))  # routed: returns once Redis has it
        await until(lambda: any(s.step == "start" for s in services.steps()), 10, "A to start")
        started = time.monotonic()
        assert await services.stop("A") == {"A": 0}
        stopped_after = time.monotonic() - started
        assert [(s.role, s.step) for s in services.steps()] == [("A", "start"), ("A", "done")]
        assert "Traceback" not in services.output("A"), services.output("A")
        assert stopped_after >= 0.5  # it did wait for the handler (1 s from its start)
        # acked: delivered to the group, and nothing pending in it
        [info] = await services.admin.xinfo_groups(services.key(commands))
        [(entry_id, _)] = await services.admin.xrange(services.key(commands))
        assert (info["name"], info["last-delivered-id"]) == (b"billing", entry_id)
        assert await services.pending(commands, "billing") == 0

        # a new worker of the service gets the next command, and not that one again
        services.spawn("B", "billing")
        await services.ready("B")
        await orders.execute(ChargeCard(2))
        await until(lambda: services.done("command", "B") == Counter([2]), 10, "B to run 2")
        await asyncio.sleep(CLAIM_AFTER)  # a claim of anything abandoned would show by now
    assert [(s.role, s.order_id) for s in services.steps() if s.step == "start"] == [
        ("A", 1),
        ("B", 2),
    ]
    assert await services.stop("B") == {"B": 0}


async def test_two_services_of_two_instances_each_get_every_event_once(
    services: Services,
) -> None:
    require("redis")
    roles = ("billing-1", "billing-2", "shipping-1", "shipping-2")
    for role in roles:
        # a small concurrency (and batch) so that one instance cannot grab everything
        services.spawn(role, role.split("-")[0], pause=0.01, concurrency=4)
    for role in roles:
        await services.ready(role)
    async with sender(services) as orders:
        for n in range(50):
            await orders.publish(OrderPlaced(n))
        for service in ("billing", "shipping"):
            await until(
                lambda s=service: len(services.done("event", s)) == 50, 15, f"{service} done"
            )
            await until(
                lambda s=service: services.settled(EVENTS, f"{s}.{HANDLER}"), 5, f"{service} acked"
            )
    await asyncio.sleep(0.2)  # a duplicate would show up now
    for service in ("billing", "shipping"):  # once per service, no duplicates
        assert services.done("event", service) == Counter(range(50)), service
    by_instance = {role: sum(services.done("event", role).values()) for role in roles}
    assert all(by_instance.values()), f"an instance did no work: {by_instance}"  # competed
    assert await services.stop(*roles) == dict.fromkeys(roles, 0)


async def test_a_query_is_answered_by_another_process(services: Services) -> None:
    require("redis")
    services.spawn("billing", "billing")
    await services.ready("billing")
    async with sender(services) as orders:
        assert await orders.query(GetInvoice(7), timeout=5) == "INV-7"
        answers = await asyncio.gather(*(orders.query(GetInvoice(n), timeout=5) for n in range(10)))
        assert answers == [f"INV-{n}" for n in range(10)]
        with pytest.raises(RemoteError, match=r"GetInvoice failed in service 'billing'") as info:
            await orders.query(GetInvoice(-1), timeout=5)
        assert info.value.error_type == "builtins.LookupError"
        assert info.value.remote_message == "no order -1"

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
        assert await services.stop("billing") == {"billing": 0}
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"no answer to GetInvoice from service 'billing'"):
            await orders.query(GetInvoice(8), timeout=0.5)
        assert time.monotonic() - started < 2


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
