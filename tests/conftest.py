"""Shared fixtures: the brokers the distributed tests run against.

``bus`` is parametrized over every transport. Memory always runs. A real broker is
reached on loopback only; when it is down, its tests skip with one line saying what to
start — except in CI (``CI=true``), where a missing broker fails the run.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from iambus.transports import Transport
from iambus.transports.memory import MemoryTransport

SERVICES = {
    "redis": (
        "127.0.0.1",
        6379,
        "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no",
    ),
}


def service_up(name: str) -> bool:
    host, port, _ = SERVICES[name]
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require(name: str) -> None:
    """Skip (locally) or fail (in CI) when the broker ``name`` is not reachable."""
    if service_up(name):
        return
    host, port, start = SERVICES[name]
    message = f"{name} is not running on {host}:{port}; start it with: {start}"
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


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        shared = MemoryTransport(claim_after=0.5)
        yield Bus("memory", lambda: shared)
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
