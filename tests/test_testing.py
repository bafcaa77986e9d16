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
