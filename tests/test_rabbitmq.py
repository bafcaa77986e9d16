"""What the RabbitMQ transport does beyond the shared contract (tests/test_transports.py)."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from iambus.envelope import Envelope
from iambus.errors import ImproperlyConfigured, TransportError
from iambus.transports import Delivery, Failure, connect

from .conftest import require

pytest.importorskip("aio_pika")

from iambus.transports.rabbitmq import RabbitMQTransport

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
    await asyncio.sleep(0.2)
    await made.destroy()
    await made.close()
    with pytest.raises(TransportError, match="closed while waiting"):
        await waiting
    with pytest.raises(TransportError, match="not open"):
        await made.dead_letters()


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


async def test_an_idle_consumer_gives_back_what_it_held(transport: RabbitMQTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    # Prefetch 3, but only one handed out: the other two wait in this consumer's buffer.
    transport.prefetch = 3
    [held] = await _take(transport, 1, consumer="stalled")
    await asyncio.sleep(0.2)
    assert len(transport._consumers[("a", "g", "stalled")].inbox) == 2
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


async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"


async def test_a_worker_runs_as_many_handlers_at_once_as_its_concurrency() -> None:
    # Without an explicit prefetch, it follows the largest batch the worker asks for:
    # a first fetch of one (an idle subscription) must not pin it to one at a time.
    from dataclasses import dataclass

    from iambus import Dispatcher

    @dataclass(frozen=True, slots=True)
    class Job:
        n: int

    namespace = f"test-{uuid.uuid4().hex[:8]}"
    dp = Dispatcher(
        transport=f"{URL}?namespace={namespace}",
        service="jobs",
        routes={Job: "jobs"},
        concurrency=10,
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
            await dp.execute(Job(n))
        for _ in range(200):  # up to 10 s
            if len(done) == 10:
                break
            await asyncio.sleep(0.05)
        transport = dp.remote.transport  # type: ignore[union-attr]
        assert sorted(done) == list(range(10))
        assert peak >= 5, f"at most {peak} handler(s) ran at once with concurrency=10"
        await transport.destroy()  # type: ignore[attr-defined]
