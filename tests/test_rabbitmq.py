"""What the RabbitMQ transport does beyond the shared contract (tests/test_transports.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from iambus.envelope import Envelope
from iambus.errors import ImproperlyConfigured, TransportError, TransportRefused
from iambus.transports import Delivery, Failure, Instance, connect

from .conftest import require
from .processes import until

pytest.importorskip("aio_pika")

from iambus.transports import rabbitmq
from iambus.transports.rabbitmq import RabbitMQTransport, _properties

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def transport() -> AsyncIterator[RabbitMQTransport]:
    require("rabbitmq")
    made = RabbitMQTransport(URL, namespace=f"test-{uuid.uuid4().hex[:8]}", claim_after=0.3)
    await made.open()
    yield made
    await made.destroy()
    await made.close()


def _ping(n: int) -> Envelope:
    return Envelope(name="Ping", payload=str(n).encode())


async def _take(
    transport: RabbitMQTransport,
    count: int,
    *,
    address: str = "a",
    group: str = "g",
    consumer: str = "c",
    within: float = 5,
) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await transport.receive(
            address, group, consumer=consumer, limit=count - len(got), wait=0.2
        )
    return got


def test_connect_knows_amqp_urls() -> None:
    made = connect("amqp://guest:guest@127.0.0.1:5672/?namespace=shop", claim_after=5)
    assert isinstance(made, RabbitMQTransport)
    assert (made.namespace, made.claim_after) == ("shop", 5)
    assert isinstance(connect("amqps://127.0.0.1/"), RabbitMQTransport)


def test_a_namespace_must_be_a_plain_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="namespace"):
        RabbitMQTransport(URL, namespace="a@b")


async def test_a_closed_transport_says_so() -> None:
    with pytest.raises(TransportError, match="not open"):
        await RabbitMQTransport(URL).send("a", _ping(0))


async def test_opening_needs_a_broker_and_twice_is_harmless() -> None:
    unreachable = RabbitMQTransport("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(TransportError, match="connect failed"):
        await unreachable.open()
    require("rabbitmq")
    made = RabbitMQTransport(URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
    await made.open()
    await made.open()
    waiting = asyncio.create_task(made.request("nobody.listens", _ping(0), timeout=5))
    await _until_held(made, "nobody.listens", 1)  # sent: it waits for its answer
    await made.destroy()
    await made.close()
    with pytest.raises(TransportError, match="closed while waiting"):
        await waiting
    with pytest.raises(TransportError, match="not open"):
        await made.dead_letters()


async def test_wrong_credentials_are_refused_not_retried() -> None:
    require("rabbitmq")
    wrong = RabbitMQTransport("amqp://guest:wrong@127.0.0.1:5672/")
    with pytest.raises(TransportRefused, match="connect refused") as info:
        await wrong.open()
    assert "check the user and password" in str(info.value)


async def test_very_long_names_still_make_a_queue(transport: RabbitMQTransport) -> None:
    group = "g" * 300
    await transport.declare("a", group, from_start=False)
    await transport.send("a", _ping(1))
    [delivery] = await _take(transport, 1, group=group)
    await delivery.ack()
    assert len(transport._queue("a", group)) <= 255


async def test_receiving_from_an_undeclared_group_is_a_clear_error(
    transport: RabbitMQTransport,
) -> None:
    with pytest.raises(ImproperlyConfigured, match="declare"):
        await transport.receive("nowhere", "g", consumer="c", limit=1, wait=0)


async def test_names_any_group_may_have_stay_apart(transport: RabbitMQTransport) -> None:
    # Worker groups hold '<locals>' and '#2'; a naive "<address>.<group>" queue name
    # would also give these two (address, group) pairs the same queue.
    pairs = [("x.y", "z<locals>#2"), ("x", "y.z<locals>#2")]
    for address, group in pairs:
        await transport.declare(address, group, from_start=False)
    await transport.send("x.y", _ping(1))
    [delivery] = await _take(transport, 1, address="x.y", group=pairs[0][1])
    await delivery.ack()
    assert await _take(transport, 1, address="x", group=pairs[1][1], within=0.5) == []


async def test_a_long_retry_does_not_hold_back_a_short_one(transport: RabbitMQTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    await transport.send("a", _ping(2))
    first, second = await _take(transport, 2)
    started = time.monotonic()
    await first.retry(30)  # in a 30 s delay queue
    await second.retry(0.2)  # in its own 200 ms queue: not behind the 30 s one
    [again] = await _take(transport, 1)
    waited = time.monotonic() - started
    assert (again.envelope.payload, again.attempt) == (b"2", 2)
    assert 0.19 <= waited < 2, waited
    await again.ack()


async def test_a_message_that_is_no_envelope_is_parked_and_the_rest_flow(
    transport: RabbitMQTransport,
) -> None:
    import aio_pika

    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    assert transport._connection is not None
    channel = await transport._connection.channel()
    exchange = await channel.get_exchange(transport.namespace, ensure=False)
    await exchange.publish(aio_pika.Message(b"raw bytes", type="Ping"), routing_key="a")
    bad_headers = {"x-iambus-at": "1", "x-iambus-headers": "[1]"}
    odd = aio_pika.Message(b"{}", type="Ping", message_id="m-1", headers=bad_headers)
    await exchange.publish(odd, routing_key="a")
    await channel.close()
    await transport.send("a", _ping(2))
    got = await _take(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()
    raw, odd_letter = await transport.dead_letters()
    assert raw.failure.error_type == "iambus.errors.SerializationError"
    assert raw.envelope.payload == b"raw bytes"
    assert (raw.address, raw.group) == ("a", "g")
    assert "headers" in odd_letter.failure.message


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"x-iambus-at": "1", "x-iambus-headers": "[" * 100_000}, "nested too deep"),
        ({"x-iambus-at": "1e999"}, "no finite time"),
        ({"x-iambus-at": "nan"}, "no finite time"),
    ],
)
async def test_a_message_whose_envelope_nests_too_deep_or_has_no_time_is_parked(
    transport: RabbitMQTransport, headers: dict[str, str], why: str
) -> None:
    # As on NATS: user headers nested too deep raised RecursionError out of receive (the
    # message was never parked), and an "at" of inf or nan passed as a time.
    import aio_pika

    await transport.declare("a", "g", from_start=False)
    assert transport._connection is not None
    channel = await transport._connection.channel()
    exchange = await channel.get_exchange(transport.namespace, ensure=False)
    odd = aio_pika.Message(b"{}", type="Ping", message_id="m-1", headers=dict(headers))
    await exchange.publish(odd, routing_key="a")
    await channel.close()
    await transport.send("a", _ping(2))
    got = await _take(transport, 1)
    assert [d.envelope.payload for d in got] == [b"2"]
    await got[0].ack()
    [letter] = await transport.dead_letters()
    assert why in letter.failure.message
    assert len(letter.failure.message) < 1_000


async def test_dead_letters_are_listed_without_being_taken(transport: RabbitMQTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    failure = Failure("builtins.ValueError", "no", "", attempts=1, handler="h")
    for delivery in await _take(transport, 3):
        await delivery.dead_letter(failure)
    other = RabbitMQTransport(URL, namespace=transport.namespace)
    await other.open()
    try:
        # Listing from two places at once: each sees all of them, in the order parked.
        mine, theirs = await asyncio.gather(transport.dead_letters(), other.dead_letters())
        assert [d.envelope.payload for d in mine] == [b"0", b"1", b"2"]
        assert [d.id for d in theirs] == [d.id for d in mine]
        assert [d.id for d in await transport.dead_letters(limit=2)] == [d.id for d in mine[:2]]
        assert await other.purge([mine[0].id]) == 1
        assert await transport.replay([mine[1].id, "unknown"]) == 1
        [replayed] = await _take(transport, 1)
        assert (replayed.envelope, replayed.attempt) == (mine[1].envelope, 1)
        await replayed.ack()
        assert [d.id for d in await transport.dead_letters()] == [mine[2].id]
        assert await transport.purge() == 1
        assert await other.dead_letters() == []
    finally:
        await other.close()


async def test_held_messages_go_to_the_first_group_declared_from_start(
    transport: RabbitMQTransport,
) -> None:
    for n in range(3):
        await transport.send("early", _ping(n))
    await transport.declare("early", "late", from_start=False)  # does not take them
    await transport.declare("early", "first", from_start=True)
    await transport.declare("early", "second", from_start=True)
    got = await _take(transport, 3, address="early", group="first")
    assert [d.envelope.payload for d in got] == [b"0", b"1", b"2"]
    for delivery in got:
        await delivery.ack()
    for group in ("late", "second"):
        assert await _take(transport, 1, address="early", group=group, within=0.3) == []


@pytest.mark.parametrize("settle", ["retry", "dead_letter"])
async def test_a_settle_that_fails_unexpectedly_gives_the_delivery_back(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch, settle: str
) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    [first] = await _take(transport, 1)

    async def bug(*args: object) -> None:
        raise RuntimeError("a bug while settling")  # not the broker's: no TransportError

    monkeypatch.setattr(transport, "_publish", bug)
    settling = (
        first.retry(0)
        if settle == "retry"
        else first.dead_letter(Failure("builtins.ValueError", "no", "", 1))
    )
    with pytest.raises(RuntimeError, match="a bug while settling"):
        await settling
    monkeypatch.undo()
    # Given back at once (the consumer goes on receiving, so it would never be reclaimed),
    # as a further attempt; the worker settles a delivery only once, so nothing else does.
    [again] = await _take(transport, 1)
    assert (again.envelope.id, again.attempt) == (first.envelope.id, 2)
    await again.ack()


async def test_an_idle_consumer_gives_back_what_it_held(transport: RabbitMQTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    # Prefetch 3, but only one handed out: the other two wait in this consumer's buffer.
    transport.prefetch = 3
    [held] = await _take(transport, 1, consumer="stalled")
    stalled = transport._consumers[("a", "g", "stalled")]
    await until(lambda: len(stalled.inbox) == 2, 10, "the other two in the stalled buffer")
    got = await _take(transport, 3, consumer="alive")
    attempts = {d.envelope.payload: d.attempt for d in got}
    # The one handed out and never settled is a failed attempt; the buffered ones are not.
    others = {b"0", b"1", b"2"} - {held.envelope.payload}
    assert attempts == {held.envelope.payload: 2, **dict.fromkeys(others, 1)}
    for delivery in got:
        await delivery.ack()
    with pytest.raises(TransportError, match="channel closed"):
        await held.ack()  # too late: it went to another consumer


async def test_request_reply_over_direct_reply_to(transport: RabbitMQTransport) -> None:
    await transport.declare("q", "g", from_start=False)

    async def serve() -> None:
        [delivery] = await _take(transport, 1, address="q")
        request = delivery.envelope
        assert request.reply_to is not None
        assert request.reply_to.startswith("amq.rabbitmq.reply-to.")
        answer = Envelope(name="Pong", payload=b"ok", correlation_id=request.id)
        await transport.reply(request.reply_to, answer)
        await delivery.ack()

    serving = asyncio.create_task(serve())
    reply = await transport.request("q", _ping(1), timeout=5)
    await serving
    assert reply.payload == b"ok"
    await transport.reply(reply.id, _ping(0))  # nobody waits there: dropped, no error


@pytest.mark.timeout(90)
async def test_persistent_messages_survive_a_broker_restart(
    transport: RabbitMQTransport,
) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("needs rabbitmqctl to restart the broker")
    transport.timeout = 2  # how long an operation waits for a reconnect
    await transport.declare("a", "g", from_start=False)
    for n in range(5):
        await transport.send("a", _ping(n))  # confirmed: on disk before the restart
    [first] = await _take(transport, 1)
    await first.ack()
    await transport.declare("b", "g", from_start=False)
    for n in range(3):
        await transport.send("b", _keyed(n, "k"))
    [out] = await _take(transport, 1, address="b")  # out (never settled) across the restart
    assert out.envelope.payload == b"0"
    try:
        await _rabbitmqctl("stop_app")
        with pytest.raises(TransportError):
            await transport.send("a", _ping(99))
    finally:
        await _rabbitmqctl("start_app")
        await _rabbitmqctl("await_startup")
    got: list[Delivery] = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        try:
            got += await transport.receive("a", "g", consumer="c", limit=10, wait=0.5)
        except TransportError:
            await asyncio.sleep(0.5)  # still reconnecting
    assert sorted(d.envelope.payload for d in got) == [b"1", b"2", b"3", b"4"]
    for delivery in got:
        await delivery.ack()
    await transport.send("a", _ping(5))  # and it keeps working
    [after] = await _take(transport, 1)
    assert after.envelope.payload == b"5"
    await after.ack()
    # The key's order and attempts survive too: the one out comes back first, counted.
    keyed: list[tuple[bytes, int]] = []
    while len(keyed) < 3 and time.monotonic() < deadline + 10:
        for delivery in await transport.receive("b", "g", consumer="c", limit=10, wait=0.5):
            keyed.append((delivery.envelope.payload, delivery.attempt))
            await delivery.ack()
    assert keyed == [(b"0", 2), (b"1", 1), (b"2", 1)]


async def _rabbitmqctl(*args: str) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
    return out.decode().splitlines()


async def test_a_worker_runs_as_many_handlers_at_once_as_its_concurrency() -> None:
    # Without an explicit prefetch, it follows the largest batch the worker asks for:
    # a first fetch of one (an idle subscription) must not pin it to one at a time.
    from dataclasses import dataclass

    from iambus import Dispatcher, Limits

    @dataclass(frozen=True, slots=True)
    class Job:
        n: int

    namespace = f"test-{uuid.uuid4().hex[:8]}"
    dp = Dispatcher(
        transport=f"{URL}?namespace={namespace}",
        service="jobs",
        routes={Job: "jobs"},
        limits=Limits(concurrency=10),
    )
    running = peak = 0
    done: list[int] = []

    @dp.commands.register(Job)
    async def work(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.3)
        running -= 1
        done.append(job.n)

    async with dp:
        await asyncio.sleep(0.2)  # the first (idle) fetch asks for one
        for n in range(10):
            await dp.send(Job(n))
        for _ in range(200):  # up to 10 s
            if len(done) == 10:
                break
            await asyncio.sleep(0.05)
        transport = dp.remote.transport  # type: ignore[union-attr]
        assert sorted(done) == list(range(10))
        assert peak >= 5, f"at most {peak} handler(s) ran at once with concurrency=10"
        await transport.destroy()  # type: ignore[attr-defined]


# -- per-key ordering (partition queues) and names ------------------------------------


def _keyed(n: int, key: str) -> Envelope:
    return Envelope(name="Ping", payload=str(n).encode(), key=key)


def _apart(transport: RabbitMQTransport, count: int) -> list[str]:
    """``count`` keys in different partitions of ``transport``."""
    from iambus.partitions import partition

    keys: dict[int, str] = {}
    n = 0
    while len(keys) < count:
        keys.setdefault(partition(f"k{n}", transport.partitions), f"k{n}")
        n += 1
    return list(keys.values())


def _what(deliveries: list[Delivery]) -> list[tuple[str | None, bytes, int]]:
    return [(d.envelope.key, d.envelope.payload, d.attempt) for d in deliveries]


async def _open(namespace: str, partitions: int | None = None) -> RabbitMQTransport:
    made = RabbitMQTransport(URL, namespace=namespace, claim_after=0.3, partitions=partitions)
    await made.open()
    return made


def test_partitions_come_from_the_constructor_or_the_url() -> None:
    assert RabbitMQTransport(URL).partitions == 16
    from_url = RabbitMQTransport(f"{URL}?partitions=4&namespace=shop")
    assert (from_url.partitions, from_url.namespace) == (4, "shop")
    assert "partitions" not in from_url._driver_url  # not a driver option
    assert RabbitMQTransport(f"{URL}?partitions=4", partitions=8).partitions == 8
    with pytest.raises(ImproperlyConfigured, match="partitions must be a whole number"):
        RabbitMQTransport(f"{URL}?partitions=0")


def test_a_namespace_too_long_for_exchange_names_is_refused() -> None:
    RabbitMQTransport(URL, namespace="n" * 200)
    with pytest.raises(ImproperlyConfigured, match=r"at most 200 bytes.*'nnn.*has 201"):
        RabbitMQTransport(URL, namespace="n" * 201)


async def test_long_addresses_and_groups_get_the_same_short_names_everywhere(
    transport: RabbitMQTransport,
) -> None:
    address, group = "é" * 200, "g" * 300  # 400 and 300 bytes: too long for AMQP names
    other = await _open(transport.namespace)  # another process declares the group
    try:
        await other.declare(address, group, from_start=False)
        await transport.send(address, _ping(1))
        await transport.send(address, _keyed(2, "k"))
        got = await _take(transport, 2, address=address, group=group)
        assert sorted(_what(got), key=str) == [("k", b"2", 1), (None, b"1", 1)]
        for delivery in got:
            await delivery.ack()
        # Sent before any group, to another long address: held, then taken, keyed or not.
        await transport.send("x" * 300, _keyed(3, "k"))
        await transport.declare("x" * 300, "g", from_start=True)
        [held] = await _take(transport, 1, address="x" * 300)
        assert _what([held]) == [("k", b"3", 1)]
        await held.ack()
    finally:
        await other.destroy()  # the queues it declared (last: the exchanges go too)
        await other.close()


async def test_a_message_name_too_long_for_amqp_is_a_clear_error(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    with pytest.raises(ImproperlyConfigured, match=r"message name .* is 300 bytes.* at most 255"):
        await transport.send("a", Envelope(name="N" * 300, payload=b"0"))
    with pytest.raises(ImproperlyConfigured, match=r"correlation id .* is 256 bytes"):
        await transport.send("a", Envelope(name="Ping", payload=b"0", correlation_id="c" * 256))
    await transport.send("a", _ping(1))  # the channel and its confirms are still in step
    [delivery] = await _take(transport, 1)
    assert delivery.envelope.payload == b"1"
    await delivery.ack()


async def test_a_keyed_sender_with_other_partitions_is_an_error_logged_not_a_stop(
    transport: RabbitMQTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # One stray sender (a script with other settings) stopped every worker of the
    # address at its next start (ImproperlyConfigured is permanent for a worker): it is
    # logged once, and the consumer goes on with its own partitions.
    other = await _open(transport.namespace, partitions=4)
    try:
        await other.declare("a", "g", from_start=False)
        await other.send("a", _keyed(0, "k"))  # keyed sends begin: with 4 partitions
        await transport.receive("a", "g", consumer="c", limit=1, wait=0)
        await transport.receive("a", "g", consumer="c", limit=1, wait=0)
        said = [
            r for r in caplog.records if "last sent by a process with 4 partitions" in r.message
        ]
        assert len(said) == 1
        assert "here 16" in said[0].message
        await transport.send("a", _keyed(1, "k"))  # sent with 16: consumed here
        [delivery] = await _take(transport, 1)
        assert delivery.envelope.payload == b"1"
        await delivery.ack()
    finally:
        await other.destroy()  # the queues it declared (last: the exchanges go too)
        await other.close()


async def test_a_keyed_sender_with_other_partitions_is_logged_where_its_address_is_consumed(
    transport: RabbitMQTransport, caplog: pytest.LogCaptureFixture
) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _keyed(0, "k"))
    [delivery] = await _take(transport, 1)
    await delivery.ack()
    other = await _open(transport.namespace, partitions=4)
    try:
        await other.send("a", _keyed(1, "k"))
        await until(
            lambda: "sent by a process with 4 partitions, here 16" in caplog.text,
            5,
            "the mismatch logged by the consuming process",
        )
    finally:
        await other.close()


async def test_keyed_messages_sent_before_any_group_wait_in_order(
    transport: RabbitMQTransport,
) -> None:
    for n in range(3):
        await transport.send("early", _keyed(n, "k"))
    await transport.send("early", _ping(9))
    await transport.declare("early", "first", from_start=True)
    await transport.declare("early", "second", from_start=True)  # the first took them
    seen: list[tuple[str | None, bytes, int]] = []
    for _ in range(20):
        got = list(await transport.receive("early", "first", consumer="c", limit=5, wait=0.3))
        assert sum(d.envelope.key is not None for d in got) <= 1, "two of one key out at once"
        seen += _what(got)
        for delivery in got:
            await delivery.ack()
        if len(seen) == 4:
            break
    assert [s for s in seen if s[0]] == [("k", b"0", 1), ("k", b"1", 1), ("k", b"2", 1)]
    assert (None, b"9", 1) in seen
    assert await _take(transport, 1, address="early", group="second", within=0.3) == []


async def _lanes_found(transport: RabbitMQTransport, address: str, group: str) -> int:
    """How many of the group's partition queues exist (passive declares)."""
    names = [transport._lane(address, group, n) for n in range(transport.partitions)]
    return sum(found is not None for found in await transport._probe(names))


async def _keyed_seen(
    transport: RabbitMQTransport, count: int, *, consumer: str = "c", within: float = 10
) -> dict[str, list[bytes]]:
    """The payloads of ``count`` deliveries of group ``g`` on ``a``, by key, acked."""
    seen: dict[str, list[bytes]] = {}
    deadline = time.monotonic() + within
    while sum(map(len, seen.values())) < count and time.monotonic() < deadline:
        for delivery in await transport.receive("a", "g", consumer=consumer, limit=10, wait=0.2):
            seen.setdefault(delivery.envelope.key or "", []).append(delivery.envelope.payload)
            await delivery.ack()
    return seen


async def _payloads_until(
    transport: RabbitMQTransport, address: str, last: bytes, *, within: float = 10
) -> list[bytes]:
    """The payloads of group ``g`` on ``address``, acked, until ``last`` came (or
    ``within`` seconds passed)."""
    got: list[bytes] = []
    deadline = time.monotonic() + within
    while last not in got and time.monotonic() < deadline:
        for delivery in await transport.receive(address, "g", consumer="c", limit=5, wait=0.2):
            got.append(delivery.envelope.payload)
            await delivery.ack()
    return got


async def test_a_group_that_gets_no_keyed_message_has_no_partition_queue(
    transport: RabbitMQTransport,
) -> None:
    other = await _open(transport.namespace)  # another process of the group
    try:
        for made in (transport, other):
            await made.declare("a", "g", from_start=False)
        for n in range(3):
            await other.send("a", _ping(n))
        got = await _take(transport, 3)
        assert sorted(d.envelope.payload for d in got) == [b"0", b"1", b"2"]
        for delivery in got:
            await delivery.ack()
        assert await _lanes_found(transport, "a", "g") == 0
        # Keyed sends to another address make only that address's group's.
        await transport.declare("b", "g", from_start=False)
        await other.send("b", _keyed(0, "k"))
        assert await _lanes_found(transport, "b", "g") == transport.partitions
        assert await _lanes_found(transport, "a", "g") == 0
    finally:
        await other.close()


async def test_keyed_messages_sent_first_to_a_group_without_partitions_come_in_key_order(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    await _take(transport, 1, within=0.3)  # consuming the group's queue, nothing else
    assert await _lanes_found(transport, "a", "g") == 0
    sender = await _open(transport.namespace)  # another process: it knows of no group
    try:
        keys = _apart(transport, 3)
        for n in range(30):
            await sender.send("a", _keyed(n, keys[n % 3]))
        await sender.send("a", _ping(99))
        seen = await _keyed_seen(transport, 31)
        for i, key in enumerate(keys):
            assert seen[key] == [str(n).encode() for n in range(i, 30, 3)]
        assert seen[""] == [b"99"]
    finally:
        await sender.close()


async def test_two_consumers_of_a_group_both_take_keys_once_keyed_sends_begin(
    transport: RabbitMQTransport,
) -> None:
    other = await _open(transport.namespace)
    sender = await _open(transport.namespace)
    try:
        for made in (transport, other):
            await made.declare("a", "g", from_start=False)
        keys = _apart(transport, transport.partitions)  # one key per partition
        count = 3 * len(keys)

        async def consume(made: RabbitMQTransport, name: str) -> dict[str, list[bytes]]:
            seen: dict[str, list[bytes]] = {}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and sum(map(len, both.values())) < count:
                for d in await made.receive("a", "g", consumer=name, limit=10, wait=0.2):
                    seen.setdefault(d.envelope.key or "", []).append(d.envelope.payload)
                    both.setdefault(d.envelope.key or "", []).append(d.envelope.payload)
                    await d.ack()
            return seen

        both: dict[str, list[bytes]] = {}
        consuming = asyncio.gather(consume(transport, "one"), consume(other, "two"))
        await asyncio.sleep(0.5)  # both consume the group's queue, waiting
        for n in range(count):
            await sender.send("a", _keyed(n, keys[n % len(keys)]))
        one, two = await consuming
        assert one, "the other consumer took every partition"
        assert two, "the other consumer took every partition"
        assert not set(one) & set(two), "a key went to both"
        for i, key in enumerate(keys):
            assert both[key] == [str(n).encode() for n in range(i, count, len(keys))]
    finally:
        await other.close()
        await sender.close()


async def test_a_group_declared_after_keyed_sends_began_gets_its_partitions_at_once(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "first", from_start=False)
    await transport.send("a", _keyed(0, "k"))
    later = await _open(transport.namespace)
    try:
        await later.declare("a", "g", from_start=False)
        assert await _lanes_found(later, "a", "g") == later.partitions
        await transport.send("a", _keyed(1, "k"))  # this sender made its queues before
        assert await _keyed_seen(later, 1) == {"k": [b"1"]}
    finally:
        await later.close()


async def test_a_group_declared_as_keyed_sends_begin_misses_nothing_sent_after(
    transport: RabbitMQTransport,
) -> None:
    # Each side records itself in the directory, then reads it: one of them sees the
    # other, and makes the group's partition queues before its declare or send returns.
    sender = await _open(transport.namespace)
    addresses = [f"a{n}" for n in range(8)]
    try:
        await asyncio.gather(
            *(transport.declare(address, "g", from_start=False) for address in addresses),
            *(sender.send(address, _keyed(0, "k")) for address in addresses),
        )
        for address in addresses:
            await sender.send(address, _keyed(1, "k"))
        for address in addresses:
            got = await _payloads_until(transport, address, b"1")
            assert got in ([b"1"], [b"0", b"1"]), (address, got)
    finally:
        await sender.close()


async def test_partition_queues_an_earlier_version_made_are_still_consumed(
    transport: RabbitMQTransport,
) -> None:
    # Earlier versions made them with every group, and recorded nothing: the keyed
    # messages waiting there, or sent there by such a version, are still handled.
    from iambus.partitions import partition

    old = await _open(transport.namespace)
    try:
        await old._declare_lanes("a", "g")
        n = partition("k", old.partitions)
        await old._publish_raw(old._keyed, f"a.{n}", b"0", _properties(_keyed(0, "k"), None))
        await transport.declare("a", "g", from_start=False)
        await transport.declare("a", "new", from_start=False)  # makes its queues too
        assert await _lanes_found(transport, "a", "new") == transport.partitions
        assert await _keyed_seen(transport, 1) == {"k": [b"0"]}
        # Held by such a version before any group: moved into queues made for it.
        await old._declare_held_keyed("early")
        await old._publish_raw(old._keyed, f"early.{n}", b"1", _properties(_keyed(1, "k"), None))
        await transport.declare("early", "g", from_start=True)
        [held] = await _take(transport, 1, address="early")
        assert _what([held]) == [("k", b"1", 1)]
        await held.ack()
    finally:
        await old.destroy()  # the queues it declared (last: the exchanges go too)
        await old.close()


async def test_processes_starting_together_on_a_new_namespace_keep_their_connections() -> None:
    # RabbitMQ 3.10 crashes a channel (and its connection) whose first publish to a stream
    # comes before the broker noted the leader of a stream another connection has just
    # declared: here the directory, which both declares write to at once.
    require("rabbitmq")

    async def later(made: RabbitMQTransport, pause: float) -> None:
        await asyncio.sleep(pause)
        await made.declare("b", "g", from_start=False)

    for n in range(8):
        namespace = f"test-{uuid.uuid4().hex[:8]}"
        one, two = await _open(namespace), await _open(namespace)
        try:
            await asyncio.gather(one.declare("a", "g", from_start=False), later(two, n * 0.001))
            await two.send("a", _ping(1))
            [delivery] = await _take(one, 1)
            await delivery.ack()
            assert one._lost is None
            assert two._lost is None
        finally:
            await one.destroy()
            await two.destroy()
            for made in (one, two):
                await made.close()


async def test_a_retired_consumer_hands_its_partitions_on_without_counting_or_doubling(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    held_key, buffered_key = _apart(transport, 2)
    await transport.send("a", _keyed(0, held_key))
    for n in range(2):
        await transport.send("a", _keyed(n, buffered_key))
    [held] = await _take(transport, 1, consumer="stalled")
    stalled = transport._consumers[("a", "g", "stalled")]
    # the other partition's first message waits in its buffer
    await until(lambda: bool(stalled.inbox), 10, "a message in the stalled buffer")
    [(_, lane)] = stalled.inbox
    assert lane is not None
    seen: list[tuple[str | None, bytes, int]] = []
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        for delivery in await transport.receive("a", "g", consumer="alive", limit=10, wait=0.2):
            seen.append((delivery.envelope.key, delivery.envelope.payload, delivery.attempt))
            await delivery.ack()
    [other_key] = {held_key, buffered_key} - {held.envelope.key}
    first = held.envelope.payload
    expected_held = [(held.envelope.key, first, 2)]  # handed out, never settled: counted
    if held.envelope.key == buffered_key:  # its successor follows it
        expected_held.append((buffered_key, b"1", 1))
    expected_other = [(other_key, b"0", 1)]  # buffered only: the same attempt
    if other_key == buffered_key:
        expected_other.append((buffered_key, b"1", 1))
    assert [s for s in seen if s[0] == held.envelope.key] == expected_held
    assert [s for s in seen if s[0] == other_key] == expected_other
    # ... and the original of the handed-back one is not delivered a second time.
    assert await transport.receive("a", "g", consumer="alive", limit=10, wait=0.5) == []
    with pytest.raises(TransportError, match="channel closed"):
        await held.ack()


async def test_keyed_attempts_count_every_lost_delivery_and_a_pending_retry(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(2):
        await transport.send("a", _keyed(n, "k"))
    attempts = []
    for _ in range(2):  # two processes die holding it (closed without settling)
        other = await _open(transport.namespace)
        [lost] = await _take(other, 1, consumer="doomed")
        attempts.append((lost.envelope.payload, lost.attempt))
        await other.close()
    other = await _open(transport.namespace)
    [again] = await _take(other, 1, consumer="doomed")
    attempts.append((again.envelope.payload, again.attempt))
    await again.retry(60)  # its process stops while the retry waits: back at once, counted
    await other.close()
    [last] = await _take(transport, 1)
    attempts.append((last.envelope.payload, last.attempt))
    assert attempts == [(b"0", 1), (b"0", 2), (b"0", 3), (b"0", 4)]
    await last.ack()
    [successor] = await _take(transport, 1)
    assert (successor.envelope.payload, successor.attempt) == (b"1", 1)
    await successor.ack()


async def test_a_replayed_keyed_letter_goes_behind_its_partition(
    transport: RabbitMQTransport,
) -> None:
    transport.claim_after = 10  # `second` stays out while the dead letters are read
    await transport.declare("a", "g", from_start=False)
    for n in range(2):
        await transport.send("a", _keyed(n, "k"))
    [first] = await _take(transport, 1)
    await first.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
    [second] = await _take(transport, 1)
    [letter] = await transport.dead_letters()
    assert await transport.replay([letter.id]) == 1
    assert await _take(transport, 1, consumer="other", within=0.5) == []  # `second` is out
    await second.ack()
    [replayed] = await _take(transport, 1)
    assert _what([replayed]) == [("k", b"0", 1)]
    await replayed.ack()


async def test_a_keyed_request_is_answered_through_its_partition(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("q", "g", from_start=False)

    async def serve() -> None:
        [delivery] = await _take(transport, 1, address="q")
        assert delivery.envelope.key == "k"
        answer = Envelope(name="Pong", payload=b"ok", correlation_id=delivery.envelope.id)
        await transport.reply(delivery.envelope.reply_to or "", answer)
        await delivery.ack()

    serving = asyncio.create_task(serve())
    reply = await transport.request("q", _keyed(1, "k"), timeout=5)
    await serving
    assert reply.payload == b"ok"


async def test_deliveries_never_handed_out_are_not_counted_after_a_reconnect(
    transport: RabbitMQTransport,
) -> None:
    transport.claim_after = 10  # not retired while it sits still below
    await transport.declare("a", "g", from_start=False)
    transport.prefetch = 5
    keys = _apart(transport, 2)
    for n in range(2):
        await transport.send("a", _ping(n))
        await transport.send("a", _keyed(10 + n, keys[n]))
    handed = await transport.receive("a", "g", consumer="c", limit=1, wait=5)
    state = transport._consumers[("a", "g", "c")]
    await until(lambda: len(handed) + len(state.inbox) == 4, 10, "all four at the consumer")
    # Both of the consumer's channels fail (as in a lost connection) and are reopened.
    for channel in (state.channel, state.lanes):
        underlay = await channel.get_underlay_channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await underlay.queue_declare(f"missing-{uuid.uuid4().hex}", passive=True)
    got = await _take(transport, 4)
    attempts = {d.envelope.payload: d.attempt for d in got}
    expected = dict.fromkeys([b"0", b"1", b"10", b"11"], 1)
    expected[handed[0].envelope.payload] = 2  # it was out: maybe handled, so counted
    assert attempts == expected
    for delivery in got:
        await delivery.ack()
    with pytest.raises(TransportError, match="channel closed"):
        await handed[0].ack()


async def test_destroy_deletes_the_partition_queues() -> None:
    require("rabbitmq")
    made = await _open(f"test-{uuid.uuid4().hex[:8]}", partitions=2)
    await made.declare("a", "g", from_start=False)
    await made.send("a", _keyed(0, "k"))  # the first keyed send makes them
    lanes = [made._lane("a", "g", n) for n in range(2)]
    assert set(lanes) <= made._declared
    await made.destroy()
    assert made._connection is not None
    channel = await made._connection.channel()
    for name in lanes:
        with pytest.raises(Exception, match="NOT_FOUND"):
            await channel.declare_queue(name, passive=True)
        channel = await made._connection.channel()
    await made.close()


async def test_a_hand_back_handed_back_again_is_still_delivered_once(
    transport: RabbitMQTransport,
) -> None:
    # Two consumers retired one after the other (two instances stopping at once): the
    # second still holds the first one's hand-back copy, which (a copy at priority 1)
    # returns to its place, before anything else; the original behind it is dropped.
    transport.claim_after = 60  # retired below, by hand, in a fixed order
    await transport.declare("a", "g", from_start=False)
    one, two = _apart(transport, 2)
    await transport.send("a", _keyed(0, one))
    for n in range(2):
        await transport.send("a", _keyed(n, two))
    [held] = await _take(transport, 1, consumer="s1")
    s1 = transport._consumers[("a", "g", "s1")]
    # the other partition's first message is in s1's buffer
    await until(lambda: bool(s1.inbox), 10, "a message in s1's buffer")
    assert await transport.receive("a", "g", consumer="s2", limit=1, wait=0) == []
    first, second = (transport._consumers[("a", "g", name)] for name in ("s1", "s2"))
    await transport._retire(first)  # s2 is the only one waiting: it gets both partitions
    for _ in range(50):
        if len(second.inbox) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(second.inbox) == 2
    assert await transport.receive("a", "g", consumer="s3", limit=1, wait=0) == []
    await transport._retire(second)
    seen: dict[str, list[tuple[bytes, int]]] = {one: [], two: []}
    deadline = time.monotonic() + 10
    while sum(map(len, seen.values())) < 3 and time.monotonic() < deadline:
        for delivery in await transport.receive("a", "g", consumer="s3", limit=10, wait=0.2):
            seen[delivery.envelope.key or ""].append((delivery.envelope.payload, delivery.attempt))
            await delivery.ack()
    assert await transport.receive("a", "g", consumer="s3", limit=10, wait=0.5) == []
    handed, other = held.envelope.key, ({one, two} - {held.envelope.key}).pop()
    assert seen[handed][0] == (b"0", 2)  # it was out: counted
    assert seen[other][0] == (b"0", 1)  # only ever buffered: not counted, and once
    assert seen[two] == [(b"0", seen[two][0][1]), (b"1", 1)]


@contextlib.asynccontextmanager
async def _lanes_refuse_publishes(transport: RabbitMQTransport) -> AsyncIterator[None]:
    """While inside, the broker nacks what is published to the group ``g`` of ``a``'s
    partition queues that hold a message ready (a length-limit policy an operator might
    set): a publish that fails while the consumer's channel stays open."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("needs rabbitmqctl to set a policy")
    name = f"{transport.namespace}-full"
    lanes = {transport._lane("a", "g", n) for n in range(transport.partitions)}
    pattern = f"^{re.escape(transport._lane('a', 'g', 0))[:-1]}[0-9]+$"
    definition = '{"max-length": 1, "overflow": "reject-publish"}'

    async def applied() -> bool:
        listing = await _rabbitmqctl("list_queues", "-q", "name", "policy")
        return any(line.split("\t") == [lane, name] for line in listing for lane in lanes)

    async def until(wanted: bool) -> None:  # policies apply asynchronously
        for _ in range(60):
            if await applied() == wanted:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"policy {name} still {'not ' if wanted else ''}applied")

    await _rabbitmqctl("set_policy", "--apply-to", "queues", name, pattern, definition)
    try:
        await until(True)
        yield
    finally:
        await _rabbitmqctl("clear_policy", name)
        await until(False)


async def _keyed_in_order(
    transport: RabbitMQTransport, count: int, *, within: float = 15
) -> list[tuple[bytes, int]]:
    """What ``count`` receives of group ``g`` on ``a`` bring, acked, riding out errors."""
    seen: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + within
    while len(seen) < count and time.monotonic() < deadline:
        try:
            got = await transport.receive("a", "g", consumer="c", limit=10, wait=0.2)
        except TransportError:
            await asyncio.sleep(0.2)
            continue
        for delivery in got:
            seen.append((delivery.envelope.payload, delivery.attempt))
            await delivery.ack()
    return seen


@pytest.mark.timeout(90)
@pytest.mark.parametrize("delay", [0, 0.3])
async def test_a_keyed_retry_the_broker_refuses_gives_the_delivery_back(
    transport: RabbitMQTransport, delay: float
) -> None:
    # The retry's copy was nacked and the delivery stayed unacked on a channel that stayed
    # open: its partition was stuck for as long as the consumer kept receiving.
    transport.claim_after = 60  # never retired: it keeps receiving
    await transport.declare("a", "g", from_start=False)
    for n in range(2):
        await transport.send("a", _keyed(n, "k"))
    [first] = await _take(transport, 1)
    async with _lanes_refuse_publishes(transport):
        if delay:
            await first.retry(delay)
            # The copy waits out its delay, then its lane refuses it: nothing seen from
            # here marks that moment, so this waits the delay and a margin.
            await asyncio.sleep(delay + 0.5)
        else:
            with pytest.raises(TransportError, match="Nack"):
                await first.retry(0)
        # still refused: a receive that needs a copy says so, and loses nothing
        with contextlib.suppress(TransportError):
            assert await transport.receive("a", "g", consumer="c", limit=10, wait=0.5) == []
    assert await _keyed_in_order(transport, 2) == [(b"0", 2), (b"1", 1)]
    assert await transport.receive("a", "g", consumer="c", limit=10, wait=0.5) == []


async def test_a_keyed_message_with_a_malformed_attempt_header_does_not_stop_its_key(
    transport: RabbitMQTransport,
) -> None:
    # int() of the header raised ValueError out of receive, after the message had left the
    # consumer's buffer: never handed out nor acked, it held its partition for good.
    from iambus.partitions import partition

    await transport.declare("a", "g", from_start=False)
    await transport._ensure_keyed("a")  # the partition queues, as for a first keyed send
    n = partition("k", transport.partitions)
    properties = _properties(_keyed(0, "k"), {"x-iambus-attempt": "second"})
    await transport._publish_raw(transport._keyed, f"a.{n}", b"0", properties)
    await transport.send("a", _keyed(1, "k"))
    assert await _keyed_in_order(transport, 2, within=5) == [(b"0", 1), (b"1", 1)]


async def test_keyed_messages_sent_while_held_ones_move_come_after_them(
    transport: RabbitMQTransport,
) -> None:
    # The first from_start group binds its partition queues, then moves the held messages
    # in: what a sender publishes meanwhile went straight into a partition queue, ahead of
    # the held messages of its key not yet moved.
    held = 300
    await asyncio.gather(*(transport.send("early", _keyed(n, "k")) for n in range(held)))
    await _until_held(transport, "early", held)  # all in the held queue, in this order
    sender = await _open(transport.namespace)
    sent = held

    async def keep_sending() -> None:
        nonlocal sent
        while True:
            await sender.send("early", _keyed(sent, "k"))
            sent += 1
            await asyncio.sleep(0.005)

    sending = asyncio.create_task(keep_sending())
    try:
        await transport.declare("early", "first", from_start=True)
        await asyncio.sleep(0.2)  # the behaviour under test: sends go on after the move
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await sender.close()
    assert sent > held + 5, "nothing was sent while the held messages moved"
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while len(seen) < sent and time.monotonic() < deadline:
        for delivery in await transport.receive("early", "first", consumer="c", limit=10, wait=0.2):
            seen.append(int(delivery.envelope.payload))
            await delivery.ack()
    assert seen == list(range(sent))


async def test_two_instances_moving_held_messages_at_once_keep_their_order(
    transport: RabbitMQTransport,
) -> None:
    # Two instances of a service starting together both declare its group from_start and
    # both moved the held messages: interleaved, their copies reordered a key.
    held = 1500
    await asyncio.gather(*(transport.send("early", _keyed(n, "k")) for n in range(held)))
    await _until_held(transport, "early", held)
    other = await _open(transport.namespace)
    try:
        await asyncio.gather(
            transport.declare("early", "first", from_start=True),
            other.declare("early", "first", from_start=True),
        )
    finally:
        await other.close()  # the same queues as `transport`'s: its tear-down deletes them
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(seen) < held and time.monotonic() < deadline:
        for delivery in await transport.receive("early", "first", consumer="c", limit=10, wait=0.2):
            seen.append(int(delivery.envelope.payload))
            await delivery.ack()
    assert seen == list(range(held))


async def test_the_sweeper_outlives_a_retirement_that_fails(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiormq raises ChannelInvalidStateError (a RuntimeError, not an AMQPError) for a call
    # on a channel that is closing under it — as a connection drops while a consumer is
    # retired: it ended the sweeper, and no idle consumer was ever retired again.
    import aiormq

    await transport.declare("a", "g", from_start=False)
    retire, failed = transport._retire, []

    async def closing_under_it(state: Any) -> None:
        if not failed:
            failed.append(state.key)
            raise aiormq.exceptions.ChannelInvalidStateError("<Channel: 7> closed")
        await retire(state)

    monkeypatch.setattr(transport, "_retire", closing_under_it)
    await transport.receive("a", "g", consumer="idle", limit=1, wait=0)
    for _ in range(100):  # 10 s
        if ("a", "g", "idle") not in transport._consumers:
            break
        await asyncio.sleep(0.1)
    assert failed == [("a", "g", "idle")]
    assert ("a", "g", "idle") not in transport._consumers, "the sweeper is gone"


async def test_a_keyed_dead_letter_replays_into_the_partition_it_came_from(
    transport: RabbitMQTransport,
) -> None:
    # A replay by a process with another partition count (the dlq CLI without the
    # workers' ?partitions=) put the envelope in a partition queue they never consume.
    from iambus.partitions import partition

    workers = await _open(transport.namespace, partitions=4)
    try:
        await workers.declare("a", "g", from_start=False)
        key = next(f"k{n}" for n in range(1000) if partition(f"k{n}", 16) >= 4)
        await workers.send("a", _keyed(0, key))
        [failed] = await _take(workers, 1)
        await failed.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
        [letter] = await transport.dead_letters()  # the default 16 partitions
        assert await transport.replay([letter.id]) == 1
        [replayed] = await _take(workers, 1)
        assert _what([replayed]) == [(key, b"0", 1)]
        await replayed.ack()
    finally:
        await workers.destroy()
        await workers.close()


# -- failures users see: what they name, what is left behind ---------------------------


async def _until_held(transport: RabbitMQTransport, address: str, count: int) -> None:
    """Wait (10 s at most) until the held queue of ``address`` holds ``count`` messages."""
    name = transport._held_queue(address)
    held = -1
    async with _side_channel() as channel:
        for _ in range(200):
            queue = await channel.declare_queue(name, passive=True)
            held = queue.declaration_result.message_count
            if held >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{name} holds {held} messages, not {count}")


@contextlib.asynccontextmanager
async def _side_channel() -> AsyncIterator[Any]:
    """A plain aio-pika channel on a connection of its own (not the transport's)."""
    import aio_pika

    connection = await aio_pika.connect(URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def test_an_open_that_fails_midway_leaves_the_transport_closed_and_can_be_retried() -> None:
    # An exchange of the namespace already declared otherwise (an operator's, an older
    # version's): open() fails naming the mismatch, and keeps no half-open connection.
    import aio_pika

    require("rabbitmq")
    made = RabbitMQTransport(URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
    async with _side_channel() as channel:
        theirs = await channel.declare_exchange(made._unrouted, aio_pika.ExchangeType.FANOUT)
        with pytest.raises(TransportError, match=r"connect failed: .*PRECONDITION_FAILED"):
            await made.open()
        assert made._connection is None
        assert made._sweeper is None
        with pytest.raises(TransportError, match="not open"):
            await made.send("a", _ping(0))
        await theirs.delete()
    # Once the conflict is gone, a second open() succeeds.
    await made.open()
    try:
        await made.declare("a", "g", from_start=False)
        await made.send("a", _ping(1))
        [delivery] = await _take(made, 1)
        await delivery.ack()
    finally:
        await made.destroy()
        await made.close()


async def test_a_send_the_broker_refuses_is_an_error_and_the_next_sends_go_through(
    transport: RabbitMQTransport,
) -> None:
    # A queue that rejects publishes (full, "overflow: reject-publish") makes the broker
    # nack the send: the sender must learn it was not stored, not believe it was.
    await transport.declare("a", "g", from_start=False)
    async with _side_channel() as channel:
        full = await channel.declare_queue(
            f"{transport.namespace}.full",
            auto_delete=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await full.bind(transport.namespace, routing_key="a")
        with pytest.raises(TransportError, match=r"publish to test-\w+ failed: .*Nack"):
            await transport.send("a", _ping(1))
        await full.delete()
    await transport.send("a", _ping(2))
    got = await _take(transport, 2, within=1)
    # The nacked send reached the group's queue all the same (at least once), the next
    # one too: the publisher channel is still in step with its confirms.
    assert sorted(d.envelope.payload for d in got) == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()


async def test_a_delivery_kept_past_claim_after_cannot_be_retried_or_dead_lettered(
    transport: RabbitMQTransport,
) -> None:
    # Its consumer was retired (claim_after 0.3 s): the broker has it back. A retry copy
    # or a dead letter made now would be a second live copy of it.
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    [late] = await _take(transport, 1, consumer="slow")
    for _ in range(50):
        if ("a", "g", "slow") not in transport._consumers:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(TransportError, match=r"cannot retry <delivery Ping #1 .*channel closed"):
        await late.retry(0)
    with pytest.raises(TransportError, match=r"cannot dead-letter .*delivers it again"):
        await late.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
    [again] = await _take(transport, 1, consumer="fast")
    assert (again.envelope.payload, again.attempt) == (b"1", 2)
    await again.ack()
    assert await transport.dead_letters() == []
    assert await _take(transport, 1, consumer="fast", within=0.5) == []


async def test_a_dead_letter_that_cannot_be_written_gives_the_delivery_back(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dead letter's publish fails while the consumer lives on: the delivery must not
    # stay unacked with it (holding a prefetch slot) but come again, a further attempt.
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    [delivery] = await _take(transport, 1)
    publish, failed = transport._publish, []

    async def refused(exchange: str, routing_key: str, *args: Any, **kwargs: Any) -> None:
        if routing_key == transport._dead and not failed:
            failed.append(routing_key)
            raise TransportError("publish to the default exchange failed: refused")
        await publish(exchange, routing_key, *args, **kwargs)

    monkeypatch.setattr(transport, "_publish", refused)
    with pytest.raises(TransportError, match="refused"):
        await delivery.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
    assert failed
    [again] = await _take(transport, 1, within=2)
    assert (again.envelope.payload, again.attempt) == (b"1", 2)
    await again.dead_letter(Failure("builtins.ValueError", "no", "", attempts=2))
    [letter] = await transport.dead_letters()
    assert (letter.envelope.payload, letter.failure.attempts) == (b"1", 2)


async def test_the_first_group_waits_for_another_instance_moving_the_held_messages(
    transport: RabbitMQTransport,
) -> None:
    # Another instance holds the mover's lock (an exclusive queue): declare() waits for
    # it to go instead of interleaving its copies with the other's, or failing.
    for n in range(3):
        await transport.send("early", _ping(n))
    lock = f"{transport._held_queue('early')}@@mover"
    async with _side_channel() as channel:
        await channel.declare_queue(lock, exclusive=True)
        declaring = asyncio.create_task(transport.declare("early", "first", from_start=True))
        await asyncio.sleep(1.2)  # the behaviour under test: declare() waits all this while
        assert not declaring.done()
    async with asyncio.timeout(3):
        await declaring
    got = await _take(transport, 3, address="early", group="first")
    assert [d.envelope.payload for d in got] == [b"0", b"1", b"2"]
    for delivery in got:
        await delivery.ack()


async def test_rabbitmq_each_bad_reply_is_one_warning_naming_it_and_replies_flow_on(
    transport: RabbitMQTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # As on Redis and NATS: a reply that is no envelope is logged once, as a warning
    # saying what was wrong, and skipped; the consumer of replies stays.
    import logging

    import aio_pika

    await transport.declare("q", "g", from_start=False)
    question = _ping(1)
    asking = asyncio.create_task(transport.request("q", question, timeout=5))
    [delivery] = await _take(transport, 1, address="q")
    to = delivery.envelope.reply_to
    assert to is not None
    junk = [
        aio_pika.Message(b"junk"),  # no message id, no type
        aio_pika.Message(b"x", message_id="m", type="Pong", headers={"x-iambus-at": "soon"}),
        aio_pika.Message(
            b"x",
            message_id="m",
            type="Pong",
            correlation_id=question.id,
            headers={"x-iambus-at": "1", "x-iambus-headers": "[1]"},
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="iambus"):
        async with _side_channel() as channel:
            for message in junk:
                await channel.default_exchange.publish(message, routing_key=to)
        answer = Envelope(name="Pong", payload=b"ok", correlation_id=question.id)
        await transport.reply(to, answer)
        assert (await asking).payload == b"ok"
        await delivery.ack()
    skipped = [r for r in caplog.records if "a reply on" in r.getMessage()]
    assert [r.levelno for r in skipped] == [logging.WARNING] * len(junk), caplog.text
    assert "no message_id" in skipped[0].getMessage()
    assert "soon" in skipped[1].getMessage()
    assert "[1]" in skipped[2].getMessage()


async def test_an_unreadable_dead_letter_record_is_skipped_and_logged(
    transport: RabbitMQTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # Another producer (or an older version) wrote a record listing cannot read: the
    # others are still listed, replayable and purgeable.
    import aio_pika

    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    async with _side_channel() as channel:
        odd = aio_pika.Message(b"?", headers={"x-iambus-dead": "odd-1"})
        await channel.default_exchange.publish(odd, routing_key=transport._dead)
    [delivery] = await _take(transport, 1)
    await delivery.dead_letter(Failure("builtins.ValueError", "no", "", attempts=1))
    [letter] = await transport.dead_letters()
    assert letter.envelope.payload == b"1"
    assert "a record in the dead-letter stream is unreadable" in caplog.text
    assert await transport.purge() == 1
    assert await transport.dead_letters() == []


# -- queue_type: classic queues for groups -------------------------------------------


def test_queue_type_comes_from_the_constructor_or_the_url() -> None:
    assert RabbitMQTransport(URL).queue_type == "quorum"
    from_url = RabbitMQTransport(f"{URL}?queue_type=classic&namespace=shop")
    assert (from_url.queue_type, from_url.namespace) == ("classic", "shop")
    assert "queue_type" not in from_url._driver_url  # not a driver option
    assert RabbitMQTransport(f"{URL}?queue_type=classic", queue_type="quorum").queue_type == (
        "quorum"
    )
    with pytest.raises(ImproperlyConfigured, match=r"'quorum'.*'classic'.*not 'stream'"):
        RabbitMQTransport(f"{URL}?queue_type=stream")


async def test_a_group_declared_with_another_queue_type_is_a_clear_error(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    other = RabbitMQTransport(URL, namespace=transport.namespace, queue_type="classic")
    await other.open()
    try:
        with pytest.raises(ImproperlyConfigured, match=r"exists with other arguments.*classic"):
            await other.declare("a", "g", from_start=False)
        await other.declare("a", "other", from_start=False)  # the transport works on
        await other.send("a", _ping(1))
        [delivery] = await _take(other, 1, group="other")
        await delivery.ack()
    finally:
        await other.destroy()
        await other.close()


async def test_a_classic_group_counts_every_lost_delivery_as_an_attempt() -> None:
    # A classic queue only flags a redelivery: each one is replaced by a copy carrying
    # attempt + 1, so that a message killing its workers still reaches its last attempt.
    require("rabbitmq")
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    made: list[RabbitMQTransport] = []

    def instance() -> RabbitMQTransport:
        made.append(RabbitMQTransport(URL, namespace=namespace, queue_type="classic"))
        return made[-1]

    first = instance()
    await first.open()
    try:
        await first.declare("a", "g", from_start=False)
        await first.send("a", _ping(1))
        attempts = []
        for _ in range(3):
            crashing = instance()
            await crashing.open()
            [delivery] = await _take(crashing, 1)
            attempts.append(delivery.attempt)
            await crashing.close()  # handed out, never settled: the broker requeues it
        [last] = await _take(first, 1)
        attempts.append(last.attempt)
        await last.ack()
        assert attempts == [1, 2, 3, 4]
        assert await first.receive("a", "g", consumer="c", limit=1, wait=0.3) == []
    finally:
        await first.destroy()  # what it declared: the group's queues
        for transport in made:
            await transport.close()


async def test_a_classic_group_counts_a_loss_held_unhanded_by_a_retired_consumer() -> None:
    # A redelivered message still in a retiring consumer's buffer has its loss counted on
    # the copy that consumer hands back (a quorum queue would count it by itself).
    require("rabbitmq")
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    holder = RabbitMQTransport(URL, namespace=namespace, queue_type="classic")
    buffering = RabbitMQTransport(URL, namespace=namespace, queue_type="classic", prefetch=10)
    after = RabbitMQTransport(URL, namespace=namespace, queue_type="classic")
    for made in (holder, buffering, after):
        await made.open()
    try:
        await holder.declare("a", "g", from_start=False)
        for n in range(3):
            await holder.send("a", _ping(n))
        [lost] = await _take(holder, 1)  # prefetch 1: only the first
        [handed] = await _take(buffering, 1)  # the second; the third waits in its buffer
        await holder.close()  # the first comes back, redelivered, to `buffering`'s buffer
        state = buffering._consumers[("a", "g", "c")]
        for _ in range(100):
            if len(state.inbox) == 2:
                break
            await asyncio.sleep(0.05)
        assert [m.body for m, _ in state.inbox] == [b"2", b"0"]
        await buffering.close()  # retired: the buffer goes back as copies, `handed` requeued
        got = {d.envelope.payload: d.attempt for d in await _take(after, 3)}
        assert (lost.envelope.payload, handed.envelope.payload) == (b"0", b"1")
        assert got == {b"0": 2, b"1": 2, b"2": 1}
        assert await after.receive("a", "g", consumer="c", limit=1, wait=0.3) == []
    finally:
        await holder.open()
        await holder.destroy()
        for made in (holder, buffering, after):
            await made.close()


class _Proxy:
    """A TCP proxy to RabbitMQ whose ``cut()`` closes the client's side only, as a lost
    route does: the broker keeps the old connections (and their exclusive queues) until
    their heartbeat times out, or until ``release()``."""

    def __init__(self) -> None:
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.pumps: set[asyncio.Task[None]] = set()
        self.frozen: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self.pairs.append((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)

        self.pumps.add(asyncio.ensure_future(pump(reader, up_writer)))
        self.pumps.add(asyncio.ensure_future(pump(up_reader, writer)))

    def cut(self) -> None:
        for task in self.pumps:
            task.cancel()
        self.pumps.clear()
        for client, upstream in self.pairs:
            client.close()  # the client sees its connection drop ...
            self.frozen.append(upstream)  # ... the broker does not
        self.pairs.clear()

    def release(self) -> None:
        """The broker's side of the cut connections closes: as a heartbeat timeout."""
        for upstream in self.frozen:
            upstream.close()
        self.frozen.clear()

    async def stop(self) -> None:
        self.cut()
        self.release()
        self.server.close()


async def test_a_lost_route_leaves_an_announced_transport_working() -> None:
    # An announced instance's exclusive queue lives on a connection of its own: after a
    # lost route the broker still holds the old connections (until their heartbeat times
    # out), and the transport's reconnect must not wait for them. The instance stays
    # listed meanwhile, and its next announce declares its queue again.
    require("rabbitmq")
    proxy = _Proxy()
    port = await proxy.start()
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    made = RabbitMQTransport(url, namespace=namespace, reconnect_interval=0.2, timeout=2.0)
    one = _instance(1)
    await made.open()
    try:
        await made.declare("a", "g", from_start=True)
        await made.announce(one)
        proxy.cut()

        async def sent() -> bool:
            try:
                await made.send("a", _ping(1))
            except TransportError:
                return False
            return True

        await until(sent, 20, "a send after a lost route")
        assert [i.id for i in await made.instances()] == [one.id]  # the old queue, held

        async def refused() -> bool:  # once the registry connection noticed its loss
            try:
                await made.announce(one)
            except TransportError as exc:
                return "still holds" in str(exc)
            return False

        await until(refused, 20, "announcing again to be refused while the broker holds on")
        proxy.release()

        async def announced() -> bool:
            try:
                await made.announce(one)
            except TransportError:
                return False
            return True

        await until(announced, 20, "announcing again once the broker let go")
        assert [i.id for i in await made.instances()] == [one.id]
        [delivery] = await _take(made, 1)
        await delivery.ack()
    finally:
        await proxy.stop()
        async with asyncio.timeout(10):
            await made.close()
        cleaner = RabbitMQTransport(URL, namespace=namespace)
        await cleaner.open()
        await cleaner.declare("a", "g", from_start=False)
        await cleaner.instances()  # declares the registry: destroyed with the rest
        await cleaner.destroy()
        await cleaner.close()


def _instance(n: int, instance_id: str | None = None) -> Instance:
    return Instance(
        "svc", instance_id or f"h-{n}-{uuid.uuid4().hex[:6]}", "h", n, time.time(), (("a", "g"),)
    )


async def test_an_instance_found_gone_is_listed_again_once_it_announces_again(
    transport: RabbitMQTransport,
) -> None:
    # A reader remembers the instances it found gone, not to probe them at every read;
    # the same instance announcing again (a new registry connection) is live again.
    namespace = transport.namespace
    one = _instance(1)
    for _ in range(2):
        holder = RabbitMQTransport(URL, namespace=namespace)
        await holder.open()
        await holder.announce(one)
        assert [i.id for i in await transport.instances()] == [one.id]
        await holder.close()  # its queue goes with its connection: gone, not withdrawn
        assert await transport.instances() == []
        assert await transport.instances() == []  # remembered gone
    assert await transport.groups() == {("a", "g"): "svc"}


async def test_a_registry_made_by_an_older_version_is_used_as_it_is(
    transport: RabbitMQTransport,
) -> None:
    import aio_pika

    older = {"x-queue-type": "stream", "x-max-age": "7D", "x-stream-max-segment-size-bytes": 10**6}
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        registry = f"{transport.namespace}.registry"
        await channel.declare_queue(registry, durable=True, arguments=older)
    finally:
        await connection.close()
    one = _instance(1)
    await transport.announce(one)
    assert [i.id for i in await transport.instances()] == [one.id]
    await transport.withdraw(one)
    assert await transport.instances() == []


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
async def test_leave_keeps_a_retry_delay(transport: RabbitMQTransport, keyed: bool) -> None:
    # A delivery the leaving consumer retried is settled: leave() must not bring it back
    # before its delay (a keyed one waits unacked on the partition channel: that channel
    # stays until the retry fired), nor count an attempt more.
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", Envelope(name="P", payload=b"{}", key="k" if keyed else None))
    [delivery] = await _take(transport, 1, consumer="leaving")
    retried = time.monotonic()
    await delivery.retry(4.0)
    await transport.leave("leaving")
    early = await _take(transport, 1, consumer="staying", within=1.5)
    assert time.monotonic() - retried < 4.0  # the check above ended before the delay
    assert not early, f"retried with a 4 s delay, back at once after leave(): {early}"
    [again] = await _take(transport, 1, consumer="staying", within=20)
    assert time.monotonic() - retried >= 4.0
    assert again.attempt == 2
    await again.ack()


async def test_a_registry_deleted_under_a_reader_is_declared_again(
    transport: RabbitMQTransport,
) -> None:
    import aio_pika

    assert await transport.instances() == []
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"{transport.namespace}.registry")
    finally:
        await connection.close()
    with contextlib.suppress(TransportError):  # this read finds it gone
        await transport.instances()
    one = _instance(1)
    await transport.announce(one)
    assert [i.id for i in await transport.instances()] == [one.id]


async def test_two_first_announces_at_once_share_one_registry_connection(
    transport: RabbitMQTransport,
) -> None:
    # Two dispatchers sharing one transport announce at the same moment: one registry
    # connection, closed with the transport, so neither stays listed as live.
    holder = RabbitMQTransport(URL, namespace=transport.namespace)
    await holder.open()
    one, two = _instance(1), _instance(2)
    try:
        await asyncio.gather(holder.announce(one), holder.announce(two))
        assert {i.id for i in await transport.instances()} == {one.id, two.id}
    finally:
        await holder.close()
    assert [i.id for i in await transport.instances()] == []


async def test_a_group_recorded_after_the_first_keyed_send_misses_nothing_sent_later(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race of declare and a first keyed send, made to happen: the declarer looked at
    # the directory (no keyed sends yet) before the sender's record went in, and its
    # own record goes in after it. The declare must still make the partition queues.
    sender = await _open(transport.namespace)
    try:
        await transport.declare("other", "x", from_start=False)  # both read the directory
        await sender.send("other", _keyed(0, "k"))
        written, recording = asyncio.Event(), asyncio.Event()
        record = transport._record

        async def late_record(headers: Any) -> None:
            if rabbitmq.H_GROUP in headers:
                recording.set()
                await written.wait()
            await record(headers)

        monkeypatch.setattr(transport, "_record", late_record)

        async def first_keyed_send() -> None:
            await recording.wait()
            await sender.send("a", _keyed(0, "k"))
            written.set()  # its keyed-sends record is in, and read by the sender

        await asyncio.gather(transport.declare("a", "g", from_start=False), first_keyed_send())
        await sender.send("a", _keyed(1, "k"))
        got = await _payloads_until(transport, "a", b"1", within=5)
        assert b"1" in got, got
    finally:
        await sender.close()


async def _cut_registry_read(transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the registry and cancel the read while its consume is on the wire, as a
    dispatcher's close cancels its background registry reads (and a timeout a slow one)."""
    import aiormq

    registry = f"{transport.namespace}.registry"
    real = aiormq.Channel.basic_consume
    reading: asyncio.Task[Any] | None = None

    async def consume_then_cut(self: aiormq.Channel, queue: str, *args: Any, **kwargs: Any) -> Any:
        call = asyncio.ensure_future(real(self, queue, *args, **kwargs))
        if queue == registry and reading is not None:
            for _ in range(3):  # Basic.Consume goes out; its ConsumeOk is a round trip away
                await asyncio.sleep(0)
            reading.cancel()
        return await call

    with monkeypatch.context() as patched:
        patched.setattr(aiormq.Channel, "basic_consume", consume_then_cut)
        reading = asyncio.create_task(transport.instances())
        with pytest.raises(asyncio.CancelledError):
            await reading


async def test_close_after_typical_use_and_a_registry_read_cut_short_is_quick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cut read's channel was closed by aiormq without waiting for the broker, and no
    # longer read: the records the broker had sent on it filled its 10-frame buffer, and
    # the connection's reader waited there for good. close() took 3 s (the directory
    # follower's channel close given up after 1 s, then 2 s of aiormq waiting for the
    # broker's Close-Ok), or hung for good cancelling a consumer that had not left.
    require("rabbitmq")
    for turn in range(3):
        transport = RabbitMQTransport(URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
        await transport.open()
        try:
            for n in range(5):  # more records than that buffer holds, sent at the cut
                await transport.announce(_instance(n))
            await transport.declare("a", "g", from_start=False)
            await transport.send("a", _ping(turn))
            await transport.send("a", Envelope(name="Ping", payload=b"", key="k"))
            for delivery in await _take(transport, 2):
                await delivery.ack()
            if turn:
                await transport.leave("c")  # a worker that stopped, its consumers gone
            await _cut_registry_read(transport, monkeypatch)
        finally:
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await transport.close()
            took = time.monotonic() - started
            cleaner = RabbitMQTransport(URL, namespace=transport.namespace)
            await cleaner.open()
            cleaner._declared |= transport._declared
            await cleaner.destroy()
            await cleaner.close()
        assert took < 1.5, f"close() took {took:.2f} s"


async def test_a_registry_read_cut_short_leaves_the_connection_working(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut as above, the read left every later call on the connection hanging, until the
    # heartbeat gave the connection up (minutes).
    for n in range(5):
        await transport.announce(_instance(n))
    await transport.declare("a", "g", from_start=False)
    for turn in range(3):
        await _cut_registry_read(transport, monkeypatch)
        async with asyncio.timeout(5):
            await transport.send("a", _ping(turn))
            [delivery] = await _take(transport, 1)
            await delivery.ack()
            assert len(await transport.instances()) == 5


async def test_a_registry_read_cancelled_as_its_channel_closes_leaves_the_connection_up(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiormq answers a Channel.Close cancelled before the broker's Close-Ok with a
    # second Channel.Close; the broker, done with the first, closed the whole connection
    # for it (504 "expected 'channel.open'"): the next send failed, every consumer and
    # request on the connection with it. The cancel lands a few turns of the loop after
    # the read's channel starts closing: at some of them, between the Close and its
    # Close-Ok (a round trip).
    import aio_pika

    real = aio_pika.RobustChannel.close
    reading: asyncio.Task[Any] | None = None
    ticks = 0
    cuts: set[asyncio.Task[None]] = set()

    async def close_then_cut(self: Any, *args: Any, **kwargs: Any) -> Any:
        if reading is not None and asyncio.current_task() is reading:

            async def cut() -> None:
                for _ in range(ticks):
                    await asyncio.sleep(0)
                reading.cancel()

            cuts.add(asyncio.ensure_future(cut()))
        return await real(self, *args, **kwargs)

    for n in range(5):
        await transport.announce(_instance(n))
    await transport.declare("a", "g", from_start=False)
    for ticks in range(30):
        with monkeypatch.context() as patched:
            patched.setattr(aio_pika.RobustChannel, "close", close_then_cut)
            reading = asyncio.create_task(transport.instances())
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        async with asyncio.timeout(5):
            await transport.send("a", _ping(ticks))
            [delivery] = await _take(transport, 1)
            await delivery.ack()
    assert len(await transport.instances()) == 5


async def _leave_cut_short(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch, consumer: str
) -> None:
    """``leave(consumer)`` cancelled as it publishes the first copy of its buffer."""
    real = transport._publish_raw
    handing_back = asyncio.Event()

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        if asyncio.current_task() is leaving:
            handing_back.set()
            await asyncio.Event().wait()  # cut here, before the copy is published
        return await real(*args, **kwargs)

    monkeypatch.setattr(transport, "_publish_raw", stuck)
    leaving = asyncio.create_task(transport.leave(consumer))
    async with asyncio.timeout(5):
        await handing_back.wait()
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving


async def test_a_retirement_cut_short_does_not_count_what_it_had_not_handed_back(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retirement cancelled as it handed its buffer back (a worker stopped with a
    # deadline) closed the channel with the rest of the buffer unacked, never recorded as
    # given back: the quorum queue returned them counted, each as a failed attempt.
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    transport.prefetch = 3
    [first] = await _take(transport, 1, consumer="stopping")
    await first.ack()
    stopping = transport._consumers[("a", "g", "stopping")]
    await until(lambda: len(stopping.inbox) == 2, 10, "two in the stopping buffer")
    await _leave_cut_short(transport, monkeypatch, "stopping")
    got = await _take(transport, 2, consumer="alive")
    assert sorted(d.attempt for d in got) == [1, 1]
    for delivery in got:
        await delivery.ack()


async def test_receives_at_once_on_one_consumer_consume_once(
    transport: RabbitMQTransport,
) -> None:
    # Two receives starting together on a new consumer both issued Basic.Consume on its
    # channel: two consumers there, each with the prefetch, held twice what it should.
    await transport.declare("a", "g", from_start=False)
    for n in range(4):
        await transport.send("a", _ping(n))
    transport.prefetch = 1
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    got = await asyncio.gather(
        *(transport.receive("a", "g", consumer="c", limit=1, wait=0.3) for _ in range(2))
    )
    [held] = [delivery for batch in got for delivery in batch]
    assert (await transport.backlog("a", "g")).waiting == 3
    state = transport._consumers[("a", "g", "c")]
    assert len(state.inbox) == 0
    await held.ack()
    for _ in range(3):  # prefetch 1: one at a time
        [delivery] = await _take(transport, 1)
        assert delivery.attempt == 1
        await delivery.ack()


async def test_a_consume_answered_after_its_cancelled_receive_gave_up_is_issued_once(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The consume of a cancelled receive goes on after the receive's bound (timeout):
    # the next receive, seeing no consume answered yet, issued one more on the same
    # channel, the first one then answered as well: two consumers, twice the prefetch.
    import aiormq

    real = aiormq.Channel.basic_consume
    late: list[bool] = []

    async def answered_late(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not late:
            late.append(True)
            await asyncio.sleep(0.6)  # the broker answers after the receive's bound
        return await real(self, *args, **kwargs)

    await transport.declare("a", "g", from_start=False)
    for n in range(4):
        await transport.send("a", _ping(n))
    transport.prefetch = 1
    transport.timeout = 0.3
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    monkeypatch.setattr(aiormq.Channel, "basic_consume", answered_late)
    receiving = asyncio.create_task(transport.receive("a", "g", consumer="c", limit=1, wait=5))
    await until(lambda: bool(late), 5, "the consume issued")
    receiving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiving
    async with asyncio.timeout(5):
        while True:  # (a receive waits `timeout` at most for that consume's answer too)
            with contextlib.suppress(TransportError):
                [held] = await transport.receive("a", "g", consumer="c", limit=1, wait=2)
                break
    await asyncio.sleep(0.3)  # (a second consumer's delivery would have come by now)
    assert (await transport.backlog("a", "g")).waiting == 3
    assert len(transport._consumers[("a", "g", "c")].inbox) == 0
    await held.ack()


async def test_a_retirement_cut_short_does_not_count_what_its_partitions_had_not_handed_back(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, from partition queues: what was not handed back yet returned redelivered,
    # and came again as a copy counting a failed attempt.
    await transport.declare("a", "g", from_start=False)
    for n, key in enumerate(_apart(transport, 3)):
        await transport.send("a", _keyed(n, key))
    [first] = await _take(transport, 1, consumer="stopping")
    await first.ack()
    stopping = transport._consumers[("a", "g", "stopping")]
    await until(lambda: len(stopping.inbox) == 2, 10, "two in the stopping buffer")
    await _leave_cut_short(transport, monkeypatch, "stopping")
    got = await _take(transport, 2, consumer="alive")
    assert sorted(d.attempt for d in got) == [1, 1]
    for delivery in got:
        await delivery.ack()
    assert await transport.receive("a", "g", consumer="alive", limit=10, wait=0.5) == []


async def test_a_left_consumer_does_not_count_what_its_partitions_sent_as_it_retired(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # leave() with a keyed retry waiting retires the partition channel later
    # (_retire_lanes_later), without _retire's last look at the buffer: a delivery that
    # reached the consumer while its buffer was being handed back (after it was taken)
    # returned with the channel, never recorded as unhanded, and came again as a copy
    # counting a failed attempt it never had.
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    await transport.declare("a", "g", from_start=False)
    retried_key, buffered_key, late_key = _apart(transport, 3)
    await transport.send("a", _keyed(0, retried_key))
    [retried] = await _take(transport, 1, consumer="leaving")
    await retried.retry(0.5)  # keeps the partition channel open until it is due
    await transport.send("a", _keyed(1, buffered_key))
    state = transport._consumers[("a", "g", "leaving")]
    await until(lambda: len(state.inbox) == 1, 10, "one in the leaving buffer")

    real = transport._pass_on
    arrived: list[bool] = []

    async def late_arrival(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("handback") and not arrived:
            # As the buffer is handed back, a message for another partition arrives.
            await transport.send("a", _keyed(2, late_key))
            await until(lambda: bool(state.inbox), 10, "the late one in the leaving buffer")
            arrived.append(True)
        return await real(*args, **kwargs)

    monkeypatch.setattr(transport, "_pass_on", late_arrival)
    await transport.leave("leaving")
    await until(lambda: not transport._leaving, 10, "the partitions retired")
    assert arrived
    got = await _take(transport, 3, consumer="staying", within=10)
    assert sorted((d.envelope.payload, d.attempt) for d in got) == [
        (b"0", 2),  # (its retry: the channel's close gave it back, counted)
        (b"1", 1),
        (b"2", 1),
    ]
    for delivery in got:
        await delivery.ack()


async def _break(channel: Any) -> None:
    """Fail a consumer's channel (a channel error): what it held returns to its queues,
    redelivered; the robust channel opens again by itself."""
    underlay = await channel.get_underlay_channel()
    with pytest.raises(Exception, match="NOT_FOUND"):
        await underlay.queue_declare(f"missing-{uuid.uuid4().hex}", passive=True)


def _gate(
    monkeypatch: pytest.MonkeyPatch,
    transport: RabbitMQTransport,
    step: str,
    when: Any,
    *,
    after: bool = False,
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the transport's ``step`` (a method), where ``when(*args)`` holds, before it
    runs (``after``: once it ran) until the second event is set; the first is set as it
    is held."""
    real = getattr(transport, step)
    reached, go = asyncio.Event(), asyncio.Event()

    async def gated(*args: Any, **kwargs: Any) -> Any:
        held = when(*args)
        if held and not after:
            reached.set()
            await go.wait()
        outcome = await real(*args, **kwargs)
        if held and after:
            reached.set()
            await go.wait()
        return outcome

    monkeypatch.setattr(transport, step, gated)
    return reached, go


async def _cancelled_amid(
    receiving: asyncio.Task[Any],
    reached: asyncio.Event,
    go: asyncio.Event,
    *,
    meanwhile: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Cancel ``receiving`` once held (``_gate``), run ``meanwhile`` while it waits for the
    held step, then let the step go on."""
    async with asyncio.timeout(5):
        await reached.wait()
    receiving.cancel()
    if meanwhile is not None:
        await meanwhile()
    go.set()  # (the step, if it still runs, goes on)
    with pytest.raises(asyncio.CancelledError):
        await receiving


async def _raw_then_held_receive(
    transport: RabbitMQTransport, state: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """A message that is no envelope into ``state``'s buffer, behind the one there, and
    its dead-lettering held (``_gate``) for the receive that comes next."""
    import aio_pika

    async with _side_channel() as side:
        exchange = await side.get_exchange(transport.namespace, ensure=False)
        await exchange.publish(aio_pika.Message(b"raw bytes", type="Ping"), routing_key="a")
    await until(lambda: len(state.inbox) == 2, 10, "the raw one in the buffer after it")
    return _gate(monkeypatch, transport, "_park", lambda *args: True)


@pytest.mark.parametrize("source", ["partition", "classic group"])
async def test_a_receive_cancelled_amid_a_hand_out_gives_back_what_it_had_taken(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # A receive cancelled (a worker stopping, a timeout around it) while a message that
    # is no envelope was being dead-lettered lost the deliveries it had already taken:
    # neither buffered nor handed to anyone, unacked on a live channel, a partition
    # stuck. The one taken here was returned unhanded before (a channel error): given
    # back to the buffer, it must not be counted as a further attempt either (a lane or
    # a classic queue only says "redelivered": such a one is copied with attempt + 1).
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    transport.prefetch = 10
    transport.queue_type = "quorum" if source == "partition" else "classic"
    await transport.declare("a", "g", from_start=False)
    state = await transport._consumer("a", "g", "c", 10)
    if source == "partition":
        first_key, key = _apart(transport, 2)
        await transport.send("a", _keyed(0, first_key))  # the consumer takes the partitions
        [first] = await _take(transport, 1)
        await first.ack()
        channel = state.lanes
    else:
        key, channel = None, state.channel
        await transport._consume(state)
    await transport.send("a", Envelope(name="Ping", payload=b"1", key=key))
    await until(lambda: len(state.inbox) == 1, 10, "it in the buffer")
    await _break(channel)  # it returns unhanded ...
    await transport._consume(state)  # ... and comes again, redelivered, once consumed again
    await until(lambda: len(state.inbox) == 1, 10, "it back in the buffer")
    reached, go = await _raw_then_held_receive(transport, state, monkeypatch)
    receiving = asyncio.create_task(transport.receive("a", "g", consumer="c", limit=10, wait=5))
    await _cancelled_amid(receiving, reached, go)
    monkeypatch.undo()
    again = await _take(transport, 1, within=2)
    assert _what(again) == [(key, b"1", 1)]  # handed out, once, the same attempt
    await again[0].ack()
    await transport.send("a", Envelope(name="Ping", payload=b"2", key=key))  # (its key goes on)
    [following] = await _take(transport, 1)
    assert _what([following]) == [(key, b"2", 1)]
    await following.ack()
    [letter] = await transport.dead_letters()  # the raw one, parked once
    assert letter.envelope.payload == b"raw bytes"
    assert await transport.receive("a", "g", consumer="c", limit=10, wait=0.3) == []


async def test_a_receive_cancelled_as_it_copies_a_redelivered_keyed_message_copies_it_once(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A redelivered keyed message is replaced by a copy with attempt + 1 before it is
    # handed out. A receive cancelled amid that copy left the original unacked on a live
    # channel: its partition stuck (the copy published behind it); and were it simply
    # given to the next receive, it would be copied a second time: handled twice.
    from iambus.partitions import partition

    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    await transport.declare("a", "g", from_start=False)
    for n in range(2):
        await transport.send("a", _keyed(n, "k"))
    [lost] = await _take(transport, 1)  # handed out, never settled ...
    state = transport._consumers[("a", "g", "c")]
    await _break(state.lanes)  # ... and back in its partition queue, redelivered
    lane = transport._lane("a", "g", partition("k", transport.partitions))
    # held once the copy is published (confirmed), before the original is acked
    reached, go = _gate(
        monkeypatch, transport, "_publish_raw", lambda _, route, *__: route == lane, after=True
    )
    receiving = asyncio.create_task(transport.receive("a", "g", consumer="c", limit=10, wait=5))
    await _cancelled_amid(receiving, reached, go)
    monkeypatch.undo()
    assert await _keyed_in_order(transport, 2, within=5) == [(b"0", 2), (b"1", 1)]
    assert await transport.receive("a", "g", consumer="c", limit=10, wait=0.3) == []
    with pytest.raises(TransportError, match="channel closed"):
        await lost.ack()


async def test_a_consume_the_broker_does_not_answer_fails_the_receive_after_timeout(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a memory or disk alarm lasts, RabbitMQ stops reading a connection that
    # publishes, and checks no heartbeat on it: a consume issued then is not answered
    # until the alarm ends. The receive waited for it as long, whatever its `wait` (a
    # worker's receive loop stuck, its health fine), and so did every later receive of
    # the consumer. Here the driver holds the consume as such a connection would.
    import aiormq

    real = aiormq.Channel.basic_consume
    answer = asyncio.Event()

    async def unanswered(self: Any, *args: Any, **kwargs: Any) -> Any:
        await answer.wait()
        return await real(self, *args, **kwargs)

    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    transport.timeout = 0.3
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    monkeypatch.setattr(aiormq.Channel, "basic_consume", unanswered)
    async with asyncio.timeout(5):
        for _ in range(2):  # the second waits for the same consume: none issued again
            with pytest.raises(TransportError, match="did not answer"):
                await transport.receive("a", "g", consumer="c", limit=1, wait=0.1)
    answer.set()
    [delivery] = await _take(transport, 1)
    await delivery.ack()
    state = transport._consumers[("a", "g", "c")]
    assert len((await state.channel.get_underlay_channel()).consumers) == 1


async def _keyed_taken_raw_held(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, str, asyncio.Task[Any], asyncio.Event, asyncio.Event]:
    """Consumer ``c`` holding the partitions, a keyed message (payload ``1``) and then one
    that is no envelope in its buffer, and a receive of both started, to be held as it
    dead-letters the second (``_gate``): the consumer, the key, the receive, the gate."""
    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    transport.prefetch = 10
    await transport.declare("a", "g", from_start=False)
    state = await transport._consumer("a", "g", "c", 10)
    first_key, key = _apart(transport, 2)
    await transport.send("a", _keyed(0, first_key))  # the consumer takes the partitions
    [first] = await _take(transport, 1)
    await first.ack()
    await transport.send("a", Envelope(name="Ping", payload=b"1", key=key))
    await until(lambda: len(state.inbox) == 1, 10, "it in the buffer")
    reached, go = await _raw_then_held_receive(transport, state, monkeypatch)
    receiving = asyncio.create_task(transport.receive("a", "g", consumer="c", limit=10, wait=5))
    return state, key, receiving, reached, go


async def test_what_a_receive_cancelled_amid_a_hand_out_took_is_not_counted_if_its_consumer_left(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receive cancelled amid a settling step of its hand-out (here: dead-lettering a
    # message that is no envelope) waits for that step, `timeout` at most; a worker
    # stopping waits RECEIVE_WAIT + 2 s for its receive loops, then leaves: the
    # consumer's channels close and what the receive had taken returns to its queues,
    # never handed out. Put back into the retired consumer's buffer, nobody noted it
    # unhanded: where it came again, it was counted as a further attempt.
    _, key, receiving, reached, go = await _keyed_taken_raw_held(transport, monkeypatch)
    # the worker's stop: it leaves, its receive loop not ended yet
    await _cancelled_amid(receiving, reached, go, meanwhile=lambda: transport.leave("c"))
    monkeypatch.undo()
    again = await _take(transport, 1, consumer="d")
    assert _what(again) == [(key, b"1", 1)]  # never handed out: not a further attempt
    await again[0].ack()
    [letter] = await transport.dead_letters()  # the raw one, parked once
    assert letter.envelope.payload == b"raw bytes"


@pytest.mark.parametrize("source", ["partition", "classic group"])
async def test_a_redelivered_message_copied_as_its_consumer_leaves_is_handed_out_once(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # A receive cancelled amid the copy of a redelivered message (attempt + 1: a keyed
    # one, or one of a classic group) carries the copy through, then acks the original.
    # A worker's stop does not wait that long for its receive loops: it leaves, and the
    # channel closes between the copy and the ack. The original, not acked, came back
    # and was copied a second time: the message handed out twice.
    from iambus.partitions import partition

    transport.claim_after = 60  # (not retired by the sweeper meanwhile)
    transport.queue_type = "quorum" if source == "partition" else "classic"
    await transport.declare("a", "g", from_start=False)
    key = "k" if source == "partition" else None
    for n in range(2):
        await transport.send("a", Envelope(name="Ping", payload=str(n).encode(), key=key))
    assert len(await _take(transport, 1)) == 1  # handed out, never settled ...
    state = transport._consumers[("a", "g", "c")]
    if source == "partition":
        route = transport._lane("a", "g", partition("k", transport.partitions))
        await _break(state.lanes)  # ... and back in its queue, redelivered
    else:
        route = state.queue
        await _break(state.channel)
    # held once the copy is published (confirmed), before the original is acked
    reached, go = _gate(
        monkeypatch, transport, "_publish_raw", lambda _, to, *__: to == route, after=True
    )
    receiving = asyncio.create_task(transport.receive("a", "g", consumer="c", limit=1, wait=5))
    # the worker's stop: it leaves, its receive loop not ended yet
    await _cancelled_amid(receiving, reached, go, meanwhile=lambda: transport.leave("c"))
    monkeypatch.undo()
    seen: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        for delivery in await transport.receive("a", "g", consumer="d", limit=10, wait=0.2):
            seen.append((delivery.envelope.payload, delivery.attempt))
            await delivery.ack()
    seen += [
        (delivery.envelope.payload, delivery.attempt)
        for delivery in await transport.receive("a", "g", consumer="d", limit=10, wait=0.5)
    ]
    assert sorted(seen) == [(b"0", 2), (b"1", 1)]


async def test_a_delivery_whose_channel_closes_while_its_receive_goes_on_is_not_handed_out(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receive that took a delivery goes on with the buffer: the next message may need
    # a step first (here: dead-lettering one that is no envelope). Should the taken
    # delivery's channel close meanwhile, the broker has it back: handed out all the
    # same, its handler ran on a delivery it cannot settle, and it came again counted
    # as a further attempt.
    state, key, receiving, reached, go = await _keyed_taken_raw_held(transport, monkeypatch)
    async with asyncio.timeout(5):
        await reached.wait()
    await _break(state.lanes)  # the keyed one, taken, returns to its queue
    go.set()
    assert await receiving == []
    monkeypatch.undo()
    again = await _take(transport, 1)
    assert _what(again) == [(key, b"1", 1)]  # never handed out: not a further attempt
    await again[0].ack()
