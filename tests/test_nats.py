"""NATS JetStream specifics; the shared contract runs in test_transports and test_worker.

Most tests use the shared server on 127.0.0.1:4222 with a namespace of their own
(``test-<uuid>``) whose streams are deleted at the end. The restart test runs a
nats-server of its own (a free loopback port, a JetStream store in ``tmp_path``), so
that restarting it disturbs no one else; it stops that server before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from iambus.envelope import Envelope
from iambus.errors import ImproperlyConfigured, MessageRefused, TransportError, TransportRefused
from iambus.transports import Delivery, Failure, connect

from .conftest import receive_some, require
from .processes import until

pytest.importorskip("nats", reason="the NATS transport needs nats-py: pip install 'iambus[nats]'")

from nats.aio.msg import Msg

from iambus.transports.nats import NatsTransport

NATS = "nats://127.0.0.1:4222"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
HAS_SERVER = Path(NATS_SERVER).exists()
T = TypeVar("T")


@pytest.fixture
async def transport() -> AsyncIterator[NatsTransport]:
    require("nats")
    made = NatsTransport(NATS, namespace=f"test-{uuid.uuid4().hex[:10]}", claim_after=0.3)
    await made.open()
    yield made
    await made.destroy()
    await made.close()


def _ping(n: int) -> Envelope:
    return Envelope(name="Ping", payload=str(n).encode())


@contextlib.asynccontextmanager
async def _two(
    *, claim_after: float, second_claim_after: float | None = None
) -> AsyncIterator[tuple[NatsTransport, NatsTransport]]:
    """Two open transports on one fresh namespace (two processes); deleted and closed after."""
    require("nats")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    first = NatsTransport(NATS, namespace=namespace, claim_after=claim_after)
    second = NatsTransport(NATS, namespace=namespace, claim_after=second_claim_after or claim_after)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await second.destroy()  # the first may be closed by then: a test of closing
        for transport in (first, second):
            await transport.close()


def test_the_url_picks_the_namespace_and_a_bad_one_is_refused() -> None:
    transport = connect("nats://127.0.0.1:4222?namespace=shop", claim_after=2)
    assert isinstance(transport, NatsTransport)
    assert (transport.namespace, transport.stream, transport.dead_stream) == (
        "shop",
        "M_shop",
        "D_shop",
    )
    assert transport.subject("event.OrderPlaced") == "shop.m.event.OrderPlaced"
    assert transport.partitions == 16
    with pytest.raises(ImproperlyConfigured, match="letters, digits"):
        NatsTransport("nats://127.0.0.1:4222", namespace="a.b")
    with pytest.raises(ImproperlyConfigured, match="cannot be a NATS subject"):
        transport.subject("event.Order Placed")


def test_consumer_names_are_valid_and_distinct() -> None:
    names = {
        NatsTransport.durable("event.OrderPlaced", "billing.app.charge"),
        NatsTransport.durable("event.OrderPlaced", "billing.app.charge#2"),
        NatsTransport.durable("event.OrderPlaced", "billing_app_charge"),
        NatsTransport.durable("command.ChargeCard", "billing"),
    }
    assert len(names) == 4
    for name in names:
        assert all(c.isalnum() or c in "_-" for c in name), name


async def test_a_closed_transport_says_so() -> None:
    transport = NatsTransport(NATS)
    with pytest.raises(TransportError, match="not open"):
        await transport.send("a", _ping(1))


async def test_an_unreachable_server_is_a_transport_error() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = NatsTransport(f"nats://127.0.0.1:{port}", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError, match="connect failed"):
        await transport.open()
    assert time.monotonic() - started < 3


async def test_a_message_that_is_no_envelope_is_parked_and_the_rest_flow(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    js = transport._jetstream()
    await js.publish(transport.subject("a"), b"raw", headers={"x-origin": "elsewhere"})
    await transport.send("a", _ping(2))
    got = await receive_some(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()
    [letter] = await transport.dead_letters()
    assert letter.failure.error_type == "iambus.errors.SerializationError"
    assert "Iambus-Envelope" in letter.failure.message
    assert (letter.envelope.payload, letter.envelope.headers["x-origin"]) == (b"raw", "elsewhere")
    assert await receive_some(transport, 1, wait=0.5) == []  # parked means acked


async def test_a_resend_of_the_same_envelope_is_stored_once(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    envelope = _ping(1)
    await transport.send("a", envelope)
    await transport.send("a", envelope)  # e.g. a send retried after a lost PubAck
    [delivery] = await receive_some(transport, 1)
    await delivery.ack()
    assert await receive_some(transport, 1, wait=0.5) == []


async def test_a_lost_consumer_is_declared_again(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport._jetstream().delete_consumer(transport.stream, transport.durable("a", "g"))
    await transport.send("a", _ping(5))
    got = await receive_some(transport, 1, wait=5)
    assert [d.envelope.payload for d in got] == [b"5"]


async def test_dead_letters_are_listed_in_order_and_purged_all_at_once(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    failure = Failure("builtins.ValueError", "bad\nline", "Traceback\n  ...", 3, "mod.handler")
    for delivery in await receive_some(transport, 3):
        await delivery.dead_letter(failure)
    letters = await transport.dead_letters()
    assert [d.envelope.payload for d in letters] == [b"0", b"1", b"2"]
    assert all(d.failure == failure for d in letters)
    assert len(await transport.dead_letters(limit=2)) == 2
    assert await transport.purge([letters[1].id, "not-a-number"]) == 1
    assert [d.id for d in await transport.dead_letters()] == [letters[0].id, letters[2].id]
    assert await transport.purge() == 2
    assert await transport.dead_letters() == []


# -- a server restart -----------------------------------------------------------------


class _Server:
    """A nats-server with JetStream on a free loopback port, its store in ``store``."""

    def __init__(self, store: Path, *options: str) -> None:
        self.options = options  # more command-line options, e.g. ("--user", "u", ...)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.store = store
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        command = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", *self.options]
        self.process = await asyncio.create_subprocess_exec(
            *command,
            "-sd",
            str(self.store),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "the nats-server did not start"
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 10)
        self.process = None


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[_Server]:
    if not HAS_SERVER:
        pytest.skip(f"no nats-server at {NATS_SERVER} to restart")
    made = _Server(tmp_path / "jetstream")
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


async def test_wrong_credentials_are_refused_not_retried(tmp_path: Path) -> None:
    # A refused login is TransportRefused (the worker stops on it), named at once, with
    # the password hidden: not a TransportError retried for ever.
    if not HAS_SERVER:
        pytest.skip(f"no nats-server at {NATS_SERVER} to start with a password")
    guarded = _Server(tmp_path / "jetstream", "--user", "u", "--pass", "right")
    await guarded.start()
    try:
        wrong = NatsTransport(f"nats://u:wrong@127.0.0.1:{guarded.port}", timeout=5)
        started = time.monotonic()
        with pytest.raises(TransportRefused, match="connect refused") as info:
            await wrong.open()
        assert time.monotonic() - started < 2
        assert "check the user and password" in str(info.value)
        assert "wrong" not in str(info.value)
        right = NatsTransport(f"nats://u:right@127.0.0.1:{guarded.port}", timeout=5)
        await right.open()
        await right.close()
    finally:
        await guarded.stop()


async def _receive_from(
    transport: NatsTransport, group: str, count: int, *, wait: float = 10
) -> Sequence[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + wait
    while len(got) < count and time.monotonic() < deadline:
        try:
            got += await transport.receive(
                "a", group, consumer="c", limit=count - len(got), wait=0.3
            )
        except TransportError:  # while the server is coming back
            await asyncio.sleep(0.1)
    return got


async def test_everything_survives_a_server_restart_with_its_store(server: _Server) -> None:
    transport = NatsTransport(server.url, claim_after=0.5, timeout=1)
    await transport.open()
    try:
        await transport.declare("a", "g", from_start=False)
        for n in range(3):
            await transport.send("a", _ping(n))
        first, unsettled = await _receive_from(transport, "g", 2)
        await first.ack()
        failure = Failure("builtins.ValueError", "no", "", 1)
        await transport.send("a", _ping(9))

        await server.stop()
        during = _ping(3)
        with pytest.raises(TransportError):
            await transport.send("a", during)  # the server is down: an error, no hang
        await server.start()
        # The failed send may still go out once reconnected (nats-py buffers it); the
        # caller's retry of the same envelope is stored once all the same.
        await _retrying(lambda: transport.send("a", during))

        # The same transport reconnects by itself; the stream, the group's position,
        # the unacked delivery (now attempt 2) and the dead letters are all still there.
        got = await _receive_from(transport, "g", 4)
        assert sorted((d.envelope.payload, d.attempt) for d in got) == [
            (b"1", 2),
            (b"2", 1),
            (b"3", 1),
            (b"9", 1),
        ]
        assert unsettled.envelope.payload == b"1"
        for delivery in got:
            if delivery.envelope.payload == b"9":
                await delivery.dead_letter(failure)
            else:
                await delivery.ack()
        await transport.send("a", _ping(4))
        [late] = await _receive_from(transport, "g", 1)
        assert late.envelope.payload == b"4"
        await late.ack()
        assert await _receive_from(transport, "g", 1, wait=1) == []  # 3 was stored once

        await server.stop()
        await server.start()
        [letter] = await _retrying(transport.dead_letters)
        assert (letter.envelope.payload, letter.failure) == (b"9", failure)
        assert await _receive_from(transport, "g", 1, wait=1) == []  # acked stays acked
    finally:
        await transport.close()


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await call()
        except TransportError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


# -- stream names, partitions, pulls -------------------------------------------------


def test_partitions_come_from_the_url_or_the_keyword_and_a_bad_count_is_refused() -> None:
    transport = connect("nats://127.0.0.1:4222?namespace=shop&partitions=4")
    assert isinstance(transport, NatsTransport)
    assert transport.partitions == 4
    assert NatsTransport(NATS, partitions=2).partitions == 2
    assert transport.keyed_subject("event.OrderPlaced", 3) == "shop.k.3.event.OrderPlaced"
    assert NatsTransport.durable("a", "g", 3) == NatsTransport.durable("a", "g") + "-p3"
    with pytest.raises(ImproperlyConfigured, match="partitions must be a whole number"):
        NatsTransport(f"{NATS}?partitions=0")
    with pytest.raises(ImproperlyConfigured, match="cannot be a NATS subject"):
        transport.keyed_subject("a b", 1)


async def test_a_namespace_ending_in_dead_has_streams_of_its_own() -> None:
    require("nats")
    base = f"test-{uuid.uuid4().hex[:10]}"
    # Once, namespace X's dead letters were the stream "X_dead": namespace "X_dead" then
    # took that stream for its messages.
    first = NatsTransport(NATS, namespace=base, claim_after=0.5)
    second = NatsTransport(NATS, namespace=f"{base}_dead", claim_after=0.5)
    await first.open()
    await second.open()
    try:
        assert {first.stream, first.dead_stream}.isdisjoint({second.stream, second.dead_stream})
        failure = Failure("builtins.ValueError", "no", "", 1)
        for transport, n in ((first, 1), (second, 2)):
            await transport.declare("a", "g", from_start=False)
            await transport.send("a", _ping(n))
            [delivery] = await receive_some(transport, 1)
            await delivery.dead_letter(failure)
        assert [d.envelope.payload for d in await first.dead_letters()] == [b"1"]
        assert [d.envelope.payload for d in await second.dead_letters()] == [b"2"]
    finally:
        for transport in (first, second):
            await transport.destroy()
            await transport.close()


async def test_a_stream_of_the_old_name_holding_the_subjects_is_a_clear_error() -> None:
    require("nats")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    transport = NatsTransport(NATS, namespace=namespace)
    import nats as nats_py

    client = await nats_py.connect(NATS)
    js = client.jetstream()
    await js.add_stream(name=namespace, subjects=[f"{namespace}.m.>"])  # as iambus made it
    try:
        with pytest.raises(ImproperlyConfigured, match=rf"stream '{namespace}' already holds"):
            await transport.open()
        with pytest.raises(TransportError, match="not open"):
            await transport.send("a", _ping(1))
    finally:
        await js.delete_stream(namespace)
        await client.close()


async def test_a_stream_made_before_keys_gets_the_keyed_subjects() -> None:
    require("nats")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    import nats as nats_py

    client = await nats_py.connect(NATS)
    js = client.jetstream()
    await js.add_stream(name=f"M_{namespace}", subjects=[f"{namespace}.m.>"])
    transport = NatsTransport(NATS, namespace=namespace, claim_after=0.5)
    try:
        await transport.open()
        info = await js.stream_info(transport.stream)
        assert info.config.subjects == [f"{namespace}.m.>", f"{namespace}.k.>"]
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", Envelope(name="Ping", payload=b"1", key="k"))
        [delivery] = await receive_some(transport, 1)
        assert delivery.envelope.key == "k"
        await delivery.ack()
    finally:
        await transport.destroy()
        await transport.close()
        await client.close()


async def test_a_keyed_envelope_is_stored_on_its_partition_subject(
    transport: NatsTransport,
) -> None:
    from iambus.partitions import partition

    await transport.declare("a", "g", from_start=False)
    await transport.send("a", Envelope(name="Ping", payload=b"1", key="order-7"))
    subject = transport.keyed_subject("a", partition("order-7", transport.partitions))
    stored = await transport._jetstream().get_last_msg(transport.stream, subject)
    line, _, payload = stored.data.partition(b"\n")
    assert (json.loads(line)["key"], payload) == ("order-7", b"1")


async def test_a_stored_message_is_its_envelope_framed_in_the_body_with_one_header(
    transport: NatsTransport,
) -> None:
    sent = Envelope(name="Ping", payload=b"two\nlines", headers={"h": "v"}, correlation_id="c")
    await transport.declare("a", "g", from_start=True)
    await transport.send("a", sent)
    stored = await transport._jetstream().get_last_msg(transport.stream, transport.subject("a"))
    assert stored.headers == {"Nats-Msg-Id": f"a:{sent.id}"}
    line, _, payload = stored.data.partition(b"\n")
    assert (json.loads(line)["corr"], payload) == ("c", b"two\nlines")
    # As iambus stored them before: the payload alone, the fields in a header.
    old = Envelope(name="Ping", payload=b"old")
    fields = {k: v for k, v in old.to_fields().items() if k != "payload"}
    await transport._jetstream().publish(
        transport.subject("a"), old.payload, headers={"Iambus-Envelope": json.dumps(fields)}
    )
    got = await receive_some(transport, 2)
    assert [d.envelope for d in got] == [sent, old]
    for delivery in got:
        await delivery.ack()


async def test_destroy_deletes_the_streams_and_every_consumer_declare_made() -> None:
    require("nats")
    transport = NatsTransport(NATS, namespace=f"test-{uuid.uuid4().hex[:10]}", partitions=3)
    await transport.open()
    try:
        await transport.declare("a", "g", from_start=False)
        js = transport._jetstream()
        names = [c.name for c in await js.consumers_info(transport.stream)]
        assert sorted(names) == sorted(
            [NatsTransport.durable("a", "g")]
            + [NatsTransport.durable("a", "g", n) for n in range(3)]
        )
        assert await transport.destroy() == 2
        from nats.js.errors import NotFoundError

        for stream in (transport.stream, transport.dead_stream):
            with pytest.raises(NotFoundError):
                await js.stream_info(stream)
    finally:
        await transport.close()


async def test_a_pull_stays_waiting_from_one_receive_to_the_next(
    transport: NatsTransport,
) -> None:
    # nats-server 2.9 skips a redelivery that finds only expired pulls waiting, and counts
    # it as an attempt: a delivery reclaimed just as a receive's pull ran out came back one
    # claim_after later, as attempt 3. So a receive leaves its pull waiting (it expires
    # long after), and the next receive uses it.
    await transport.declare("a", "g", from_start=False)
    js = transport._jetstream()
    for _ in range(2):
        assert await transport.receive("a", "g", consumer="c", limit=5, wait=0.3) == []
        info = await js.consumer_info(transport.stream, transport.durable("a", "g"))
        assert info.num_waiting == 1, "one pull waits between receives: not none, not more"
    await transport.send("a", _ping(1))
    [lost] = await receive_some(transport, 1)
    # A receive that ends just when the server reclaims it (claim_after = 0.3).
    await transport.receive("a", "g", consumer="other", limit=5, wait=0.28)
    [found] = await receive_some(transport, 1)
    assert (found.envelope, found.attempt) == (lost.envelope, 2)
    await found.ack()


async def test_a_cancelled_receive_strands_nothing() -> None:
    # claim_after is long: what a stopped worker's pulls caught must come back at once.
    async with _two(claim_after=30) as (stopping, other):
        await stopping.declare("a", "g", from_start=False)
        waiting = asyncio.create_task(stopping.receive("a", "g", consumer="w", limit=10, wait=5))

        def pulling() -> bool:  # its pulls are out, waiting on the server
            group = stopping._groups.get(("a", "g"))
            return group is not None and group.receiving and not group.bare

        await until(pulling, 10, "the receive to pull")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        sent = [_ping(n) for n in range(3)] + [
            Envelope(name="Ping", payload=f"k{n}".encode(), key=f"key-{n}") for n in range(3)
        ]
        for envelope in sent:
            await stopping.send("a", envelope)
        got = await receive_some(other, len(sent), wait=5)
        assert sorted(d.envelope.payload for d in got) == sorted(e.payload for e in sent)
        for delivery in got:
            await delivery.ack()
        # A receive after the cancelled one works as before.
        await stopping.send("a", _ping(9))
        [late] = await _receive_any(stopping, other)
        assert late.envelope.payload == b"9"


async def _receive_any(*transports: NatsTransport) -> list[Delivery]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for transport in transports:
            got = await transport.receive("a", "g", consumer="c", limit=1, wait=0.2)
            if got:
                return list(got)
    return []


async def test_what_no_receive_takes_goes_back_after_half_of_claim_after() -> None:
    async with _two(claim_after=4) as (greedy, other):
        await greedy.declare("a", "g", from_start=False)
        keys = ["key-0", "key-1", "key-2"]  # three partitions of 16
        for key in keys:
            await greedy.send("a", Envelope(name="Ping", payload=key.encode(), key=key))
        # One receive pulls on every partition and takes one; it never receives again.
        [taken] = await receive_some(greedy, 1)
        started = time.monotonic()
        got = await receive_some(other, 2, wait=8)
        assert sorted(d.envelope.payload for d in got) == sorted(
            k.encode() for k in keys if k.encode() != taken.envelope.payload
        )
        # handed back after claim_after / 2 (2 s), not reclaimed after claim_after (4 s)
        assert 1.5 < time.monotonic() - started < 3.5
        assert {d.attempt for d in got} == {2}  # they were delivered to `greedy` first


async def test_a_keyed_replay_goes_to_its_group_behind_its_partition() -> None:
    require("nats")
    # claim_after is long enough to hold a delivery across a receive.
    transport = NatsTransport(NATS, namespace=f"test-{uuid.uuid4().hex[:10]}", claim_after=5)
    await transport.open()
    try:
        await _replay_behind_the_partition(transport)
    finally:
        await transport.destroy()
        await transport.close()


async def _replay_behind_the_partition(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport.declare("a", "other", from_start=False)

    def keyed(n: int) -> Envelope:
        return Envelope(name="Ping", payload=str(n).encode(), key="k")

    await transport.send("a", keyed(0))
    [first] = await receive_some(transport, 1)
    [elsewhere] = await receive_some(transport, 1, group="other")
    await elsewhere.ack()
    await first.dead_letter(Failure("builtins.ValueError", "no", "", 1))
    await transport.send("a", keyed(1))
    [second] = await receive_some(transport, 1)  # holds the partition while the replay comes
    [letter] = await transport.dead_letters()
    assert await transport.replay([letter.id]) == 1
    assert await transport.receive("a", "g", consumer="c", limit=5, wait=0.3) == []
    await second.ack()
    [replayed] = await receive_some(transport, 1)
    assert (replayed.envelope.payload, replayed.attempt) == (b"0", 1)
    await replayed.ack()
    [other] = await receive_some(transport, 1, group="other")
    assert other.envelope.payload == b"1"  # the replay is for "g" only
    await other.ack()
    assert await receive_some(transport, 1, group="other", wait=0.5) == []


async def test_a_deleted_stream_is_made_again_by_the_next_send(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    assert await transport.receive("a", "g", consumer="c", limit=5, wait=0.1) == []
    await transport._jetstream().delete_stream(transport.stream)  # its consumers go too
    await transport.send("a", _ping(1))  # no stream takes it: made again, then stored
    await transport.send("a", Envelope(name="Ping", payload=b"2", key="k"))
    got = await receive_some(transport, 2)
    assert sorted(d.envelope.payload for d in got) == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()


async def test_what_a_closed_transport_fetched_and_never_handed_out_goes_back() -> None:
    async with _two(claim_after=30) as (closing, other):
        await closing.declare("a", "g", from_start=False)
        keys = ["key-0", "key-1", "key-2"]  # three partitions of 16
        for key in keys:
            await closing.send("a", Envelope(name="Ping", payload=key.encode(), key=key))
        [taken] = await receive_some(closing, 1)  # its pulls fetched the other two as well
        await closing.close()
        got = await receive_some(other, 2, wait=5)  # well before claim_after
        assert sorted(d.envelope.payload for d in got) == sorted(
            k.encode() for k in keys if k.encode() != taken.envelope.payload
        )


# -- requests over core NATS --------------------------------------------------------


async def _stored(transport: NatsTransport) -> int:
    """How many messages the namespace's message stream holds."""
    info = await transport._jetstream().stream_info(transport.stream)
    return int(info.state.messages)


async def _until_stored(transport: NatsTransport, count: int) -> int:
    """Wait (5 s at most) until the message stream holds ``count`` messages; how many it does."""
    for _ in range(100):
        if await _stored(transport) >= count:
            break
        await asyncio.sleep(0.05)
    return await _stored(transport)


async def _answer(transport: NatsTransport, count: int, *, wait: float = 5) -> list[Delivery]:
    """Receive ``count`` requests on ``a``/``g`` and answer each with its own payload."""
    got = await receive_some(transport, count, wait=wait)
    for delivery in got:
        request = delivery.envelope
        assert request.reply_to
        answer = Envelope(name="Pong", payload=request.payload, correlation_id=request.id)
        await transport.reply(request.reply_to, answer)
        await delivery.ack()
    return got


async def test_an_unkeyed_request_goes_over_core_nats_and_the_stream_holds_nothing(
    transport: NatsTransport,
) -> None:
    assert transport.request_subject("a") == f"{transport.namespace}.r.a"
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []  # listens
    serving = asyncio.create_task(_answer(transport, 3))
    replies = await asyncio.gather(*(transport.request("a", _ping(n), timeout=5) for n in range(3)))
    assert sorted(reply.payload for reply in replies) == [b"0", b"1", b"2"]
    got = await serving
    assert [d.attempt for d in got] == [1, 1, 1]
    assert await _stored(transport) == 0  # it never went through the stream


async def test_a_request_nobody_listens_for_waits_in_the_stream_for_its_worker(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=True)
    asking = asyncio.create_task(transport.request("a", _ping(7), timeout=10))
    # the server said "no responders": into the stream with it
    assert await _until_stored(transport, 1) == 1
    assert not asking.done()
    [delivery] = await _answer(transport, 1)  # the worker starts: it gets it from the stream
    assert (await asking).payload == b"7"
    assert delivery.attempt == 1


async def test_a_keyed_request_goes_through_the_stream_even_with_a_listener(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
    serving = asyncio.create_task(_answer(transport, 1))
    keyed = Envelope(name="Ping", payload=b"k", key="key-1")
    assert (await transport.request("a", keyed, timeout=5)).payload == b"k"
    await serving
    info = await transport._jetstream().stream_info(transport.stream, subjects_filter=">")
    assert info.state.subjects == {transport.keyed_subject("a", partition_of("key-1")): 1}


def partition_of(key: str) -> int:
    from iambus.partitions import PARTITIONS, partition

    return partition(key, PARTITIONS)


async def test_a_core_request_that_fails_is_dead_lettered_and_retried_in_memory(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
    asking = asyncio.create_task(transport.request("a", _ping(3), timeout=10))
    [first] = await receive_some(transport, 1)
    await first.retry(0.2)  # back to this transport's group, after its delay
    started = time.monotonic()
    [again] = await receive_some(transport, 1)
    assert time.monotonic() - started >= 0.15
    assert (again.envelope.id, again.attempt) == (first.envelope.id, 2)
    failure = Failure("builtins.ValueError", "no", "", again.attempt)
    await again.dead_letter(failure)
    await again.dead_letter(failure)  # parked twice (a retried settle): stored once
    [letter] = await transport.dead_letters()
    assert (letter.address, letter.group, letter.failure) == ("a", "g", failure)
    assert letter.envelope.payload == b"3"
    assert letter.envelope.reply_to
    assert await _stored(transport) == 0
    asking.cancel()


async def test_a_core_request_that_is_no_envelope_is_dead_lettered(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
    nc = transport._client()
    await nc.publish(transport.request_subject("a"), b"junk", headers={"X": "1"})
    serving = asyncio.create_task(_answer(transport, 1))
    assert (await transport.request("a", _ping(1), timeout=5)).payload == b"1"  # flows on
    await serving
    [letter] = await transport.dead_letters()
    assert letter.envelope.payload == b"junk"
    assert letter.failure.error_type == "iambus.errors.SerializationError"


async def test_core_requests_and_replies_carry_the_envelope_in_the_body(
    transport: NatsTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # No NATS headers: one JSON line of the envelope's fields, then the payload.
    nc = transport._client()
    seen: asyncio.Queue[Msg] = asyncio.Queue()
    tap = await nc.subscribe(f"{transport.namespace}.r.a", cb=seen.put)
    request = Envelope(name="Ping", payload=b"two\nlines", headers={"h": "v"})
    asking = asyncio.create_task(transport.request("a", request, timeout=5))
    sent = await asyncio.wait_for(seen.get(), 5)
    await tap.unsubscribe()
    assert not sent.headers
    line, _, payload = sent.data.partition(b"\n")
    assert payload == b"two\nlines"
    assert json.loads(line)["headers"] == '{"h":"v"}'
    inbox = json.loads(line)["reply"]
    with caplog.at_level(logging.WARNING, logger="iambus"):
        await nc.publish(inbox, b"no envelope here")  # a reply that is none: logged
        await nc.flush()
        for _ in range(100):
            if "no envelope" in caplog.text:
                break
            await asyncio.sleep(0.01)
    assert "a reply on" in caplog.text
    assert "no envelope" in caplog.text
    assert not asking.done()
    answer = Envelope(name="Pong", payload=b"ok", correlation_id=request.id)
    await transport.reply(inbox, answer)
    assert (await asking).payload == b"ok"


async def test_nats_each_bad_reply_is_one_warning_naming_it_and_replies_flow_on(
    transport: NatsTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # As on Redis and RabbitMQ: a reply that is no envelope is logged once, as a warning
    # saying what was wrong, and skipped; the next reply still reaches its request.
    await transport.declare("a", "g", from_start=False)
    question = _ping(1)
    asking = asyncio.create_task(transport.request("a", question, timeout=5))
    [delivery] = await receive_some(transport, 1)
    to = delivery.envelope.reply_to
    assert to is not None
    nc = transport._client()
    junk: list[tuple[bytes, dict[str, str] | None]] = [
        (b"junk", None),  # no line of JSON
        (b"[1]\npayload", None),  # JSON, not an object
        (b"payload", {"Iambus-Envelope": "{"}),  # header form, cut short
        (b'{"id": "x", "name": "Pong", "at": "1", "corr": ["a list"]}\npayload', None),
    ]
    with caplog.at_level(logging.WARNING, logger="iambus"):
        for body, headers in junk:
            await nc.publish(to, body, headers=headers)
        answer = Envelope(name="Pong", payload=b"ok", correlation_id=question.id)
        await transport.reply(to, answer)
        assert (await asking).payload == b"ok"
        await delivery.ack()
    skipped = [r for r in caplog.records if "a reply on" in r.getMessage()]
    assert [r.levelno for r in skipped] == [logging.WARNING] * len(junk), caplog.text
    assert "no line of JSON" in skipped[0].getMessage()
    assert "not a JSON object" in skipped[1].getMessage()
    assert "Iambus-Envelope" in skipped[2].getMessage()
    assert "a list" in skipped[3].getMessage()


async def test_a_core_request_in_header_form_is_read_too(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
    nc = transport._client()
    request = Envelope(name="Ping", payload=b"p", reply_to="elsewhere")
    await nc.publish(
        transport.request_subject("a"),
        request.payload,
        headers={
            "Iambus-Envelope": json.dumps(
                {k: v for k, v in request.to_fields().items() if k != "payload"}
            )
        },
    )
    [delivery] = await receive_some(transport, 1)
    assert delivery.envelope == request


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"junk", "no envelope"), (b"{not json\npayload", "malformed envelope line")],
)
async def test_a_core_request_with_a_bad_envelope_line_is_dead_lettered_with_the_reason(
    transport: NatsTransport, body: bytes, reason: str
) -> None:
    await transport.declare("a", "g", from_start=True)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
    await transport._client().publish(transport.request_subject("a"), body)
    assert await receive_some(transport, 1, wait=1) == []
    [letter] = await transport.dead_letters()
    assert reason in letter.failure.message
    assert letter.envelope.payload == body


async def test_a_stopped_worker_stops_listening_and_hands_its_requests_to_the_stream() -> None:
    async with _two(claim_after=30) as (stopping, other):
        await stopping.declare("a", "g", from_start=True)
        assert await stopping.receive("a", "g", consumer="w", limit=1, wait=0.1) == []
        # Listening, but no receive running: a request waits in its buffer...
        first = asyncio.create_task(other.request("a", _ping(1), timeout=10))
        group = stopping._groups[("a", "g")]
        await until(lambda: bool(group.asked), 10, "the request to reach the listener")
        assert await _stored(other) == 0
        waiting = asyncio.create_task(stopping.receive("a", "g", consumer="w", limit=0, wait=5))
        await until(lambda: group.receiving, 10, "the receive to run")
        waiting.cancel()  # ...the worker stops: it goes into the stream
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # and the listener is gone: this one goes there too
        await until(lambda: group.listener is None, 10, "the listener to go")
        second = asyncio.create_task(other.request("a", _ping(2), timeout=10))
        assert await _until_stored(other, 2) == 2
        got = await _answer(other, 2)
        assert sorted(d.envelope.payload for d in got) == [b"1", b"2"]
        assert [(await first).payload, (await second).payload] == [b"1", b"2"]


async def test_a_closed_transport_hands_its_unread_requests_to_the_stream() -> None:
    async with _two(claim_after=30) as (closing, other):
        await closing.declare("a", "g", from_start=True)
        assert await closing.receive("a", "g", consumer="w", limit=1, wait=0.1) == []
        asking = asyncio.create_task(other.request("a", _ping(5), timeout=10))
        group = closing._groups[("a", "g")]
        # it reached the listener, which no receive reads
        await until(lambda: bool(group.asked), 10, "the request to reach the listener")
        assert await _stored(other) == 0
        await closing.close()
        [delivery] = await _answer(other, 1)
        assert delivery.envelope.payload == b"5"
        assert (await asking).payload == b"5"


async def test_an_undecodable_query_over_core_nats_is_answered_and_dead_lettered() -> None:
    require("nats")
    from iambus import Dispatcher

    from .test_worker import ROUTES, GetInvoice

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    transport = NatsTransport(NATS, namespace=namespace)
    await transport.open()
    billing = Dispatcher(transport=transport, service="billing", routes=ROUTES)

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        return f"INV-{query.order_id}"

    try:
        async with billing:
            for _ in range(100):  # the worker's first receive subscribes to the requests
                group = transport._groups.get(("query.GetInvoice", "billing"))
                if group is not None and group.listener is not None:
                    break
                await asyncio.sleep(0.05)
            good = Envelope(name="GetInvoice", payload=b'{"order_id": 1}')
            assert (await transport.request("query.GetInvoice", good, timeout=10)).payload
            bad = Envelope(name="GetInvoice", payload=b'{"order_id": "one"}')
            started = time.monotonic()
            reply = await transport.request("query.GetInvoice", bad, timeout=10)
            assert time.monotonic() - started < 2  # answered, not timed out
            assert reply.headers["iambus-status"] == "error"
            assert b"SerializationError" in reply.payload
            [letter] = await transport.dead_letters()
            assert letter.envelope.id == bad.id
            assert letter.failure.error_type == "iambus.errors.SerializationError"
            assert await _stored(transport) == 0  # both went over core NATS
    finally:
        await transport.destroy()
        await transport.close()


READS = 150  # of each kind: one in several hundred missed before


async def test_registry_reads_list_a_live_instance_every_time(transport: NatsTransport) -> None:
    # A key-value watcher's end-of-data marker may come before the entries it pushed: a
    # read that trusted it missed a live instance now and then.
    from iambus.transports import Instance

    one = Instance("svc", f"h-1-{uuid.uuid4().hex[:6]}", "h", 1, time.time(), (("a", "g"),))
    await transport.announce(one)
    misses = 0
    for _ in range(READS):
        misses += await transport.groups() != {("a", "g"): "svc"}
        misses += [i.id for i in await transport.instances()] != [one.id]
    assert misses == 0, f"{misses} of {2 * READS} registry reads missed the one live instance"
    await transport.withdraw(one)
    assert await transport.instances() == []
    assert await transport.groups() == {("a", "g"): "svc"}


async def test_a_message_over_max_payload_by_its_headers_is_refused_and_the_link_stays(
    transport: NatsTransport,
) -> None:
    # nats-py checks the body alone; the server holds body and headers (Nats-Msg-Id) to
    # max_payload and drops the connection of a client that goes over: a send just
    # under by its body failed after the timeout, as an outage, for ever the same.
    from iambus.transports import nats

    await transport.declare("a", "g", from_start=True)
    nc = transport._nc
    assert nc is not None
    base = Envelope(name="Ping", payload=b"")
    headers = len(f"{nats.MSG_ID}: a:{base.id}\r\n") + nats._HEADER_FRAME
    room = nc.max_payload - len(nats._framed(base)) - headers
    same = {"id": base.id, "created_at": base.created_at}  # (the framing's length as base's)
    at_limit = Envelope(name="Ping", payload=b"x" * room, **same)
    await transport.send("a", at_limit)  # exactly max_payload, headers included
    over = Envelope(name="Ping", payload=b"x" * (room + 1), **same)
    with pytest.raises(MessageRefused, match=r"max_payload \(1,048,576 bytes\)"):
        await transport.send("a", over)
    assert nc.is_connected
    assert nc.stats["reconnects"] == 0
    [got] = await receive_some(transport, 1)
    assert len(got.envelope.payload) == room


async def test_a_message_whose_envelope_line_nests_too_deep_is_parked_and_the_rest_flow(
    transport: NatsTransport,
) -> None:
    # json.loads raises RecursionError, not ValueError, on a deep nesting: the message
    # must be parked like any other that is no envelope, not fail every receive.
    await transport.declare("a", "g", from_start=False)
    deep_line = b"[" * 20_000 + b"\npayload"
    fields = {"id": "x", "name": "Ping", "at": "1", "headers": "[" * 20_000}
    deep_headers = json.dumps(fields).encode() + b"\npayload"
    await transport.send("a", _ping(1))
    await transport._jetstream().publish(transport.subject("a"), deep_line)
    await transport._jetstream().publish(transport.subject("a"), deep_headers)
    await transport.send("a", _ping(2))
    got = await receive_some(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()
    letters = await transport.dead_letters()
    assert [letter.envelope.payload for letter in letters] == [deep_line, deep_headers]
    for letter in letters:
        assert letter.failure.error_type == "iambus.errors.SerializationError"
        assert "deep" in letter.failure.message or "recursion" in letter.failure.message


async def test_a_failure_too_long_for_a_header_is_parked_cut_short(
    transport: NatsTransport,
) -> None:
    # The failure travels in a header, and the server refuses headers over 64 KiB: an
    # exception with a long message (or a long malformed line) could never be parked,
    # and came back for ever.
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping(1))
    long_line = b"{" + b"x" * 100_000 + b"\npayload"
    await transport._jetstream().publish(transport.subject("a"), long_line)
    await transport.send("a", _ping(2))
    got = await receive_some(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    await got[0].dead_letter(Failure("app.Error", "why " * 50_000, "Traceback\n", 1, "h"))
    await got[1].ack()
    raw, failed = await transport.dead_letters()  # (the raw one parked as received)
    assert raw.envelope.payload == long_line
    assert raw.failure.message.startswith("malformed envelope line b'{xxx")
    assert failed.envelope.payload == b"1"
    assert failed.failure.message.startswith("why why")
    assert failed.failure.message.endswith("characters cut)")
    assert len(failed.failure.message) < 20_000
    assert (failed.failure.error_type, failed.failure.handler) == ("app.Error", "h")
    assert await receive_some(transport, 1, wait=0.5) == []  # both settled


def _max_payload(transport: NatsTransport) -> int:
    """The largest message the server takes, headers included."""
    nc = transport._nc
    assert nc is not None
    return nc.max_payload


async def test_a_message_that_cannot_be_parked_holds_back_nothing_behind_it() -> None:
    # A raw message at max_payload is no envelope, and its dead letter (the same body
    # and a failure header) is over the limit: parking it fails. The messages taken
    # with it must still go out, now, not after claim_after.
    async with _two(claim_after=30) as (transport, _):
        await transport.declare("a", "g", from_start=False)
        raw = b"x" * (_max_payload(transport) - 100)
        await transport._jetstream().publish(transport.subject("a"), raw)
        await transport.send("a", _ping(1))
        await transport.send("a", Envelope(name="Ping", payload=b"k", key="key-1"))
        got: list[Delivery] = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            with contextlib.suppress(TransportError):
                got += await transport.receive("a", "g", consumer="c", limit=10, wait=0.2)
        assert sorted(d.envelope.payload for d in got) == [b"1", b"k"]
        for delivery in got:
            await delivery.ack()


class _SlowToPark(NatsTransport):
    """A transport whose dead letters never get stored: its receive can be cancelled
    while it parks a message that is no envelope."""

    parking: asyncio.Event

    async def _bury(self, *args: object) -> None:
        self.parking.set()
        await asyncio.Event().wait()


async def test_a_receive_cancelled_while_parking_gives_back_what_it_took() -> None:
    require("nats")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    stopping = _SlowToPark(NATS, namespace=namespace, claim_after=60)
    stopping.parking = asyncio.Event()
    other = NatsTransport(NATS, namespace=namespace, claim_after=60)
    await stopping.open()
    await other.open()
    try:
        await stopping.declare("a", "g", from_start=False)
        # A first receive leaves a pull waiting on each lane; they bring the raw message
        # and the keyed one, and the next receive takes both together.
        assert await stopping.receive("a", "g", consumer="w", limit=10, wait=0) == []
        await stopping._jetstream().publish(stopping.subject("a"), b"raw")
        await stopping.send("a", Envelope(name="Ping", payload=b"k", key="key-1"))
        buffer = stopping._groups["a", "g"].buffer
        await until(lambda: len(buffer) == 2, 10, "both pulled")
        receiving = asyncio.create_task(stopping.receive("a", "g", consumer="w", limit=10, wait=5))
        await stopping.parking.wait()
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        # Given back (once the pulls that brought them are over), not after claim_after.
        got = await receive_some(other, 1, wait=20)
        assert [d.envelope.payload for d in got] == [b"k"]
    finally:
        await other.destroy()
        await stopping.close()
        await other.close()


async def _core_request_handed_out(
    answering: NatsTransport, other: NatsTransport, n: int
) -> asyncio.Task[Envelope]:
    """``other`` asks ``_ping(n)`` over core NATS; ``answering`` (listening, group ``g``
    of address ``a``) has it handed out to consumer ``c`` and leaves it unsettled. The
    request's task."""
    await answering.declare("a", "g", from_start=True)
    assert await answering.receive("a", "g", consumer="w", limit=1, wait=0.1) == []
    asking = asyncio.create_task(other.request("a", _ping(n), timeout=20))
    [handed] = await receive_some(answering, 1)
    assert handed.envelope.payload == str(n).encode()
    return asking


async def test_a_core_request_its_consumer_leaves_unsettled_goes_to_the_stream() -> None:
    # A worker stopping cancels its receives and a handler still running, then calls
    # leave(): what it was handed goes to the group's other consumers, a request that
    # came over core NATS too (it was lost: its requester timed out).
    async with _two(claim_after=30) as (stopping, other):
        asking = await _core_request_handed_out(stopping, other, 4)
        # The worker stops: its receive is cancelled, then it leaves.
        group = stopping._groups[("a", "g")]
        waiting = asyncio.create_task(stopping.receive("a", "g", consumer="c", limit=1, wait=5))
        await until(lambda: group.receiving, 10, "the receive to run")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stopping.leave("c")  # (receive_some's consumer)
        [delivery] = await _answer(other, 1, wait=10)
        assert delivery.envelope.payload == b"4"
        assert (await asking).payload == b"4"


async def test_a_core_request_handed_out_and_unsettled_at_close_goes_to_the_stream() -> None:
    # A transport closed without leave() (not by a worker: by its owner) hands what it
    # was handed over core NATS and did not settle to the stream, as leave() does (it was
    # dropped: its requester waited until its timeout).
    async with _two(claim_after=30) as (closing, other):
        asking = await _core_request_handed_out(closing, other, 5)
        await closing.close()
        [delivery] = await _answer(other, 1, wait=10)
        assert delivery.envelope.payload == b"5"
        assert (await asking).payload == b"5"


@pytest.mark.parametrize(
    ("stream", "retention"), [("M", "workqueue"), ("M", "interest"), ("D", "interest")]
)
async def test_a_stream_made_with_other_retention_is_a_clear_error(
    stream: str, retention: str
) -> None:
    # A work-queue stream refuses a second group on an address ("filtered consumer not
    # unique", retried for ever as an outage); an interest stream drops what no consumer
    # waits for: a group declared later, and every dead letter.
    require("nats")
    import nats as nats_py
    from nats.js.api import RetentionPolicy

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    name = f"{stream}_{namespace}"
    subjects = [f"{namespace}.m.>", f"{namespace}.k.>"] if stream == "M" else [f"{namespace}.dead"]
    client = await nats_py.connect(NATS)
    js = client.jetstream()
    await js.add_stream(name=name, subjects=subjects, retention=RetentionPolicy(retention))
    transport = NatsTransport(NATS, namespace=namespace)
    try:
        with pytest.raises(
            ImproperlyConfigured,
            match=rf"stream '{name}' has {retention} retention; iambus needs limits .*"
            rf"nats stream rm {name}",
        ):
            await transport.open()
    finally:
        for made in (f"M_{namespace}", f"D_{namespace}"):
            with contextlib.suppress(Exception):
                await js.delete_stream(made)
        await client.close()
        await transport.close()


async def test_a_cancelled_close_still_closes_the_connection(transport: NatsTransport) -> None:
    # A close cancelled midway (a shutdown with a deadline, a second Ctrl-C) left its
    # connection open, its reader and pinger tasks running, for ever.
    await transport.declare("a", "g", from_start=False)
    assert await transport.receive("a", "g", consumer="c", limit=1, wait=0) == []  # listens
    nc = transport._nc
    assert nc is not None
    closing = asyncio.create_task(transport.close())
    await asyncio.sleep(0)  # it runs up to its first wait on the server
    assert not closing.done()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await until(lambda: nc.is_closed, 10, "the connection to be closed")
    with pytest.raises(TransportError, match="not open"):
        await transport.send("a", _ping(1))
    await transport.open()  # and it opens again
    await transport.send("a", _ping(2))


async def test_an_unreadable_record_among_the_dead_letters_is_skipped_and_logged(
    transport: NatsTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # Something else published on the dead-letter subject: listing (iambus dlq, iambus
    # status) and replaying failed on it with a KeyError.
    await transport.declare("a", "g", from_start=False)
    for n in (1, 2):
        await transport.send("a", _ping(n))
    first, second = await receive_some(transport, 2)
    failure = Failure("builtins.ValueError", "no", "", 1)
    await first.dead_letter(failure)
    junk = await transport._jetstream().publish(f"{transport.namespace}.dead", b"junk")
    await second.dead_letter(failure)
    with caplog.at_level(logging.ERROR, logger="iambus.transports.nats"):
        letters = await transport.dead_letters()
        assert [letter.envelope.payload for letter in letters] == [b"1", b"2"]
        assert await transport.replay([str(junk.seq)]) == 0
    assert f"dead letter {junk.seq} in {transport.dead_stream} is unreadable" in caplog.text
    assert await transport.replay([letter.id for letter in letters]) == 2
    assert await transport.purge() == 1  # the junk


@pytest.mark.parametrize("failed_at", [10**400, "nan", "1e999"])
async def test_a_dead_letter_failed_at_no_finite_time_is_skipped_too(
    transport: NatsTransport, failed_at: int | str
) -> None:
    # float() of a huge integer raises OverflowError, not ValueError: it failed listing
    # (iambus dlq, iambus status) and replaying; inf or nan failed showing it.
    from iambus.transports import nats

    failure = {"error_type": "E", "message": "", "traceback": "", "attempts": 1}
    record = {"address": "a", "group": "g", "failed_at": failed_at, "failure": failure}
    headers = {nats.DEAD_LETTER: json.dumps(record)}
    body = nats._framed(_ping(1))
    await transport._jetstream().publish(f"{transport.namespace}.dead", body, headers=headers)
    assert await transport.dead_letters() == []
    assert await transport.replay(["1"]) == 0


async def test_a_large_message_is_parked_with_its_failure_cut_to_the_room_left(
    transport: NatsTransport,
) -> None:
    # Its dead letter is its body plus a header with the failure: a message a few KB
    # under max_payload, failing with a traceback of a few KB, was refused for ever.
    await transport.declare("a", "g", from_start=False)
    room = _max_payload(transport) - 3_000
    await transport.send("a", Envelope(name="Ping", payload=b"x" * room))
    [delivery] = await receive_some(transport, 1)
    failure = Failure("app.Error", "why " * 1_000, "Traceback\n" + "  frame\n" * 500, 1, "h")
    await delivery.dead_letter(failure)
    [letter] = await transport.dead_letters()
    assert letter.envelope.payload == delivery.envelope.payload
    assert letter.failure.message.startswith("why why")
    assert (letter.failure.error_type, letter.failure.handler) == ("app.Error", "h")
    assert await receive_some(transport, 1, wait=0.5) == []  # acked


async def test_a_message_whose_time_is_out_of_range_is_parked_and_the_rest_flow(
    transport: NatsTransport,
) -> None:
    # float() of a huge integer raises OverflowError, not ValueError: it failed every
    # receive instead of being parked as no envelope.
    await transport.declare("a", "g", from_start=False)
    line = json.dumps({"id": "x", "name": "Ping", "at": 10**400}).encode()
    await transport.send("a", _ping(1))
    await transport._jetstream().publish(transport.subject("a"), line + b"\npayload")
    await transport.send("a", _ping(2))
    got = await receive_some(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    [letter] = await transport.dead_letters()
    assert letter.failure.error_type == "iambus.errors.SerializationError"
    assert "too large" in letter.failure.message


@pytest.mark.parametrize("at", ['"1e999"', '"nan"', "-Infinity"])
async def test_a_message_whose_time_is_no_finite_number_is_parked(
    transport: NatsTransport, at: str
) -> None:
    # Read as inf or nan, it was handed out: with a deadline, its query "expired", and
    # so did every later query of its sender for a while (their age read against it).
    await transport.declare("a", "g", from_start=False)
    line = b'{"id":"x","name":"Ping","at":%s,"headers":"{\\"deadline\\":\\"1\\"}"}' % at.encode()
    await transport._jetstream().publish(transport.subject("a"), line + b"\npayload")
    await transport.send("a", _ping(1))
    got = await receive_some(transport, 1)
    assert [d.envelope.payload for d in got] == [b"1"]
    [letter] = await transport.dead_letters()
    assert "no finite time" in letter.failure.message


async def test_a_changed_claim_after_applies_to_groups_declared_before() -> None:
    # ack_wait is claim_after: a group declared with a short one kept it when the next
    # deployment raised it (for slower handlers), and its deliveries were redelivered
    # while they were handled, keyed ones out of order.
    require("nats")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    before = NatsTransport(NATS, namespace=namespace, claim_after=0.5)
    await before.open()
    await before.declare("a", "g", from_start=False)
    await before.close()
    after = NatsTransport(NATS, namespace=namespace, claim_after=30)
    await after.open()
    try:
        await after.declare("a", "g", from_start=False)
        js = after._jetstream()
        for name in (after.durable("a", "g"), after.durable("a", "g", 3)):
            info = await js.consumer_info(after.stream, name)
            assert info.config.ack_wait == 30
        await after.send("a", Envelope(name="Ping", payload=b"k", key="key-1"))
        [delivery] = await receive_some(after, 1)
        # not redelivered after 0.5 s while it is handled
        assert await receive_some(after, 1, wait=2) == []
        await delivery.ack()
    finally:
        await after.destroy()
        await after.close()


async def test_an_instance_with_an_older_claim_after_does_not_put_it_back_on_reconnect() -> None:
    # A deployment raised claim_after; an instance still running the old one checks its
    # groups' consumers again after a reconnect (or a pull gone silent under load): that
    # set ack_wait back to its claim_after, and the new instances' deliveries were
    # redelivered while still handled. Only a declare (a worker starting) changes it.
    async with _two(claim_after=0.5, second_claim_after=30) as (old, new):
        await old.declare("a", "g", from_start=False)
        assert await old.receive("a", "g", consumer="c", limit=1, wait=0) == []
        await new.declare("a", "g", from_start=False)
        await old._on_reconnect()  # (what the driver calls once it is connected again)
        assert await old.receive("a", "g", consumer="c", limit=1, wait=0) == []
        js = new._jetstream()
        for name in (new.durable("a", "g"), new.durable("a", "g", 3)):
            info = await js.consumer_info(new.stream, name)
            assert info.config.ack_wait == 30, name


async def test_a_delivery_has_claim_after_from_when_it_is_handed_out() -> None:
    # What waits in the buffer (the worker busy) is handed out up to claim_after / 2
    # after the server sent it: its handler had only what was left of the server's
    # ack_wait, and a key's message was redelivered while it was still handled.
    # What is tested is time passing (the server's ack_wait), so it sleeps: each step is
    # timed from what the test measured, with a second or more to spare either way.
    claim_after = 8.0
    async with _two(claim_after=claim_after) as (busy, other):
        await busy.declare("a", "g", from_start=False)
        assert await busy.receive("a", "g", consumer="c", limit=1, wait=0) == []
        await busy.send("a", Envelope(name="Ping", payload=b"k", key="key-1"))
        group = busy._groups["a", "g"]
        await until(lambda: bool(group.buffer), 10, "the message to be pulled")
        sent = group.buffer[0].arrived  # (the server sent it a moment before)
        # The worker is busy: the message waits in the buffer, past a tenth of
        # claim_after; it is handed out before claim_after / 2 (a second to spare).
        await asyncio.sleep(sent + claim_after * 3 / 8 - time.monotonic())
        [delivery] = await busy.receive("a", "g", consumer="c", limit=1, wait=1)
        handed = time.monotonic()
        assert handed - sent < claim_after / 2, "handed out too late to tell (the load?)"
        # Its handler runs a second past the server's first ack_wait, and (by two
        # seconds or so) under claim_after from when it was handed out: it is not
        # delivered again meanwhile.
        assert await receive_some(other, 1, wait=sent + claim_after + 1 - time.monotonic()) == []
        await delivery.ack()
        assert time.monotonic() < handed + claim_after, "acked too late to tell (the load?)"
        assert await receive_some(busy, 1, wait=0.5) == []  # (its pull would have it)


async def test_why_a_large_message_is_no_envelope_is_said_in_a_few_lines(
    transport: NatsTransport, caplog: pytest.LogCaptureFixture
) -> None:
    # The reason quoted the whole line, or every field with the payload: a log line
    # (and a dead letter's failure) of up to a megabyte.
    await transport.declare("a", "g", from_start=False)
    long_line = b"{" + b"x" * 100_000 + b"\npayload"
    bad_field = json.dumps({"id": 1, "name": "Ping", "at": "1"}).encode() + b"\n" + b"y" * 100_000
    bad_time = json.dumps({"id": "x", "name": "Ping", "at": "z" * 100_000}).encode() + b"\n"
    for body in (long_line, bad_field, bad_time):
        await transport._jetstream().publish(transport.subject("a"), body)
    await transport.send("a", _ping(1))
    with caplog.at_level(logging.ERROR, logger="iambus.transports.nats"):
        [delivery] = await receive_some(transport, 1)
    assert delivery.envelope.payload == b"1"
    letters = await transport.dead_letters()
    assert [letter.envelope.payload for letter in letters] == [long_line, bad_field, bad_time]
    for letter in letters:
        assert len(letter.failure.message) < 1_000, letter.failure.message[:100]
    assert all(len(record.getMessage()) < 1_500 for record in caplog.records)
