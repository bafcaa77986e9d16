"""Every transport keeps the same contract: iambus.testing's conformance checks."""

import uuid
from collections.abc import AsyncIterator

import pytest

from iambus.errors import ImproperlyConfigured, TransportError
from iambus.testing import TRANSPORT_CHECKS
from iambus.transports import Transport, connect
from iambus.transports.memory import MemoryTransport

from .conftest import require


@pytest.fixture(params=["memory", "redis"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "memory":
        made: Transport = connect("memory://", claim_after=0.3)
    else:
        require("redis")
        made = connect(
            f"redis://127.0.0.1:6379/0?namespace=test-{uuid.uuid4().hex[:8]}",
            claim_after=0.3,
            block=0.1,
        )
    await made.open()
    yield made
    if request.param == "redis":
        await made.destroy()  # type: ignore[attr-defined]
    await made.close()


@pytest.mark.parametrize("check", sorted(TRANSPORT_CHECKS))
async def test_conformance(transport: Transport, check: str) -> None:
    await TRANSPORT_CHECKS[check](transport)


def test_unknown_url_scheme_is_a_clear_error() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"unknown transport URL 'kafka://x'.*memory://"):
        connect("kafka://x")


async def test_memory_join_waits_until_everything_is_settled() -> None:
    transport = MemoryTransport()
    await transport.declare("a", "g", from_start=False)
    await transport.send("a", _ping())
    assert transport.unsettled() == 1
    [delivery] = await transport.receive("a", "g", consumer="c", limit=5, wait=0)
    assert transport.unsettled() == 1  # delivered is not settled
    await delivery.ack()
    assert transport.unsettled() == 0
    await transport.join()


async def test_memory_keeps_only_what_a_group_still_needs() -> None:
    transport = MemoryTransport(max_length=3)
    for n in range(5):
        await transport.send("nobody-listens", _ping(n))
    await transport.declare("nobody-listens", "late", from_start=True)
    got = await transport.receive("nobody-listens", "late", consumer="c", limit=10, wait=0)
    assert [d.envelope.payload for d in got] == [_ping(n).payload for n in (2, 3, 4)]


async def test_memory_receive_needs_a_declared_group() -> None:
    transport = MemoryTransport()
    with pytest.raises(ImproperlyConfigured, match="declare"):
        await transport.receive("a", "g", consumer="c", limit=1, wait=0)


async def test_a_closed_memory_transport_refuses_work_and_fails_waiting_requests() -> None:
    import asyncio

    transport = MemoryTransport()
    waiting = asyncio.create_task(transport.request("nobody", _ping(), timeout=5))
    await asyncio.sleep(0.01)
    await transport.close()
    with pytest.raises(TransportError, match="closed"):
        await waiting
    with pytest.raises(TransportError, match="closed"):
        await transport.send("a", _ping())
    await transport.open()
    await transport.send("a", _ping())


def _ping(n: int = 0):  # type: ignore[no-untyped-def]
    from iambus.envelope import Envelope

    return Envelope(name="Ping", payload=str(n).encode())
