"""iambus.testing: the conformance suite itself must catch broken transports."""

import pytest

from iambus.testing import TRANSPORT_CHECKS, check_transport
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
