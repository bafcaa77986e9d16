"""iambus.testing: the conformance suite itself must catch broken transports."""

from collections.abc import Sequence

import pytest

from iambus.envelope import Envelope
from iambus.testing import TRANSPORT_CHECKS, check_transport
from iambus.transports import Backlog, DeadLetter, Delivery, Instance, Monitor, Registry
from iambus.transports.memory import MemoryTransport


async def test_check_transport_runs_every_check() -> None:
    transport = MemoryTransport(claim_after=0.2)
    await transport.open()
    await check_transport(transport)


async def test_check_transport_names_the_broken_check() -> None:
    class ForgetsRetries(MemoryTransport):
        async def _retry(self, address: str, group: str, token: int, delay: float) -> None:
            await self._settle(address, group, token)  # drops instead of retrying

    transport = ForgetsRetries(claim_after=0.2)
    with pytest.raises(AssertionError, match="ForgetsRetries fails 'retry_goes_to_one_group"):
        await check_transport(transport)


def test_every_check_has_a_docstring_saying_what_it_checks() -> None:
    for name, check in TRANSPORT_CHECKS.items():
        assert check.__doc__, name


async def test_the_registry_and_backlog_checks_catch_what_is_wrong() -> None:
    class KeepsTheDead(MemoryTransport):
        async def withdraw(self, instance: Instance) -> None:
            pass  # a stopped instance stays live

    class CountsNothing(MemoryTransport):
        async def backlog(self, address: str, group: str) -> Backlog:
            return Backlog(waiting=0, in_flight=0, retrying=0)

    with pytest.raises(AssertionError, match="a withdrawn instance must not be live"):
        await TRANSPORT_CHECKS["registry"](KeepsTheDead())
    with pytest.raises(AssertionError, match="3 sent, none received: expected 3 waiting"):
        await TRANSPORT_CHECKS["backlog"](CountsNothing())


async def test_check_transport_leaves_out_the_optional_parts_a_transport_has_not() -> None:
    class Plain:
        """The Transport seam only: no Registry, no Monitor."""

        def __init__(self) -> None:
            self.inner = MemoryTransport(claim_after=0.2)
            self.url, self.claim_after = "plain://", 0.2

        async def open(self) -> None:
            await self.inner.open()

        async def close(self) -> None:
            await self.inner.close()

        async def send(self, address: str, envelope: Envelope) -> None:
            await self.inner.send(address, envelope)

        async def declare(self, address: str, group: str, *, from_start: bool) -> None:
            await self.inner.declare(address, group, from_start=from_start)

        async def receive(
            self, address: str, group: str, *, consumer: str, limit: int, wait: float
        ) -> Sequence[Delivery]:
            return await self.inner.receive(
                address, group, consumer=consumer, limit=limit, wait=wait
            )

        async def leave(self, consumer: str) -> None:
            await self.inner.leave(consumer)

        async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
            return await self.inner.request(address, envelope, timeout=timeout)

        async def reply(self, to: str, envelope: Envelope) -> None:
            await self.inner.reply(to, envelope)

        async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
            return await self.inner.dead_letters(limit=limit)

        async def replay(self, ids: Sequence[str]) -> int:
            return await self.inner.replay(ids)

        async def purge(self, ids: Sequence[str] | None = None) -> int:
            return await self.inner.purge(ids)

    plain = Plain()
    assert not isinstance(plain, Registry | Monitor)
    await check_transport(plain)
    with pytest.raises(AssertionError, match="no Registry"):
        await TRANSPORT_CHECKS["registry"](plain)


async def test_the_compete_check_catches_consumers_that_each_get_every_envelope() -> None:
    class EveryConsumerGetsAll(MemoryTransport):
        async def receive(  # type: ignore[override]
            self, address: str, group: str, *, consumer: str, limit: int, wait: float
        ):
            own = f"{group}.{consumer}"  # a group per consumer: a fan-out, not a competition
            await self.declare(address, own, from_start=True)
            return await super().receive(address, own, consumer=consumer, limit=limit, wait=wait)

    transport = EveryConsumerGetsAll(claim_after=0.2)
    await transport.open()
    with pytest.raises(AssertionError, match="not each get them"):
        await TRANSPORT_CHECKS["consumers_of_a_group_compete"](transport)
