"""NATS JetStream specifics; the shared contract runs in test_transports and test_worker.

Most tests use the shared server on 127.0.0.1:4222 with a namespace of their own
(``test-<uuid>``) whose streams are deleted at the end. The restart test runs a
nats-server of its own (a free loopback port, a JetStream store in ``tmp_path``), so
that restarting it disturbs no one else; it stops that server before it ends.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from iambus.envelope import Envelope
from iambus.errors import ImproperlyConfigured, TransportError
from iambus.transports import Delivery, Failure, connect

from .conftest import require

pytest.importorskip("nats", reason="the NATS transport needs nats-py: pip install 'iambus[nats]'")

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


async def _receive(
    transport: NatsTransport, count: int, *, group: str = "g", wait: float = 5
) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + wait
    while len(got) < count and time.monotonic() < deadline:
        got += await transport.receive("a", group, consumer="c", limit=count - len(got), wait=0.2)
    return got


def test_the_url_picks_the_namespace_and_a_bad_one_is_refused() -> None:
    transport = connect("nats://127.0.0.1:4222?namespace=shop", claim_after=2)
    assert isinstance(transport, NatsTransport)
    assert (transport.namespace, transport.stream, transport.dead_stream) == (
        "shop",
        "shop",
        "shop_dead",
    )
    assert transport.subject("event.OrderPlaced") == "shop.m.event.OrderPlaced"
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
    got = await _receive(transport, 2)
    assert [d.envelope.payload for d in got] == [b"1", b"2"]
    for delivery in got:
        await delivery.ack()
    [letter] = await transport.dead_letters()
    assert letter.failure.error_type == "iambus.errors.SerializationError"
    assert "Iambus-Envelope" in letter.failure.message
    assert (letter.envelope.payload, letter.envelope.headers["x-origin"]) == (b"raw", "elsewhere")
    assert await _receive(transport, 1, wait=0.5) == []  # parked means acked


async def test_a_resend_of_the_same_envelope_is_stored_once(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    envelope = _ping(1)
    await transport.send("a", envelope)
    await transport.send("a", envelope)  # e.g. a send retried after a lost PubAck
    [delivery] = await _receive(transport, 1)
    await delivery.ack()
    assert await _receive(transport, 1, wait=0.5) == []


async def test_a_lost_consumer_is_declared_again(transport: NatsTransport) -> None:
    await transport.declare("a", "g", from_start=False)
    await transport._jetstream().delete_consumer(transport.stream, transport.durable("a", "g"))
    await transport.send("a", _ping(5))
    got = await _receive(transport, 1, wait=5)
    assert [d.envelope.payload for d in got] == [b"5"]


async def test_dead_letters_are_listed_in_order_and_purged_all_at_once(
    transport: NatsTransport,
) -> None:
    await transport.declare("a", "g", from_start=False)
    for n in range(3):
        await transport.send("a", _ping(n))
    failure = Failure("builtins.ValueError", "bad\nline", "Traceback\n  ...", 3, "mod.handler")
    for delivery in await _receive(transport, 3):
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

    def __init__(self, store: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.store = store
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        command = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js"]
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
