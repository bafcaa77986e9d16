"""iambus.testing: the conformance suite itself must catch broken transports."""

import dataclasses
from collections.abc import Sequence

import pytest

from iambus.envelope import Envelope
from iambus.testing import TRANSPORT_CHECKS, check_transport, skip_reason
from iambus.transports import (
    Backlog,
    Capability,
    DeadLetterStore,
    Delivery,
    Failure,
    Instance,
    Monitor,
    Registry,
    Requester,
    Transport,
)
from iambus.transports.memory import MemoryTransport


async def test_check_transport_runs_every_check() -> None:
    transport = MemoryTransport(claim_after=0.2)
    await transport.open()
    assert await check_transport(transport) == {}  # it declares and has everything


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


class Plain(Transport):
    """The base seam only: no capability declared, no optional part."""

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
        return await self.inner.receive(address, group, consumer=consumer, limit=limit, wait=wait)

    async def leave(self, consumer: str) -> None:
        await self.inner.leave(consumer)


async def test_check_transport_skips_what_a_transport_does_not_declare_and_says_why() -> None:
    plain = Plain()
    assert not isinstance(plain, Requester | DeadLetterStore | Registry | Monitor)
    skipped = await check_transport(plain)
    assert skipped == {
        "dead_letters": "Plain is no DeadLetterStore (an optional part)",
        "unacked_deliveries_are_reclaimed": "Plain declares no Capability.RECLAIM",
        "request_reply": "Plain is no Requester (an optional part)",
        "keys_keep_their_order": "Plain declares no Capability.KEY_ORDER",
        "a_retry_holds_its_key": "Plain declares no Capability.KEY_ORDER",
        "a_lost_key_passes_on_in_order": (
            "Plain declares no Capability.RECLAIM, Capability.KEY_ORDER"
        ),
        "registry": "Plain is no Registry (an optional part)",
        "backlog": "Plain is no Monitor (an optional part)",
    }
    assert skip_reason(plain, "send_receive_ack") is None
    # Run directly, a check that does not apply fails, saying why.
    with pytest.raises(AssertionError, match=r"Plain is no Registry .*check_transport skips"):
        await TRANSPORT_CHECKS["registry"](plain)
    with pytest.raises(AssertionError, match=r"Plain declares no Capability\.RECLAIM"):
        await TRANSPORT_CHECKS["unacked_deliveries_are_reclaimed"](plain)
    with pytest.raises(ValueError, match="no transport check 'reclaim'; there are send_receive"):
        skip_reason(plain, "reclaim")


async def test_a_transport_failing_a_capability_it_declares_is_told_so() -> None:
    class HurriedRetries(MemoryTransport):
        async def _retry(self, address: str, group: str, token: int, delay: float) -> None:
            await super()._retry(address, group, token, 0.0)  # ignores the delay

    with pytest.raises(
        AssertionError,
        match=r"HurriedRetries fails 'retry_goes_to_one_group_after_its_delay': the retry "
        r"came after 0\.\d+s, before its 0\.4s delay \(the transport declares "
        r"Capability\.DELAYED_RETRY\)",
    ):
        await check_transport(HurriedRetries(claim_after=0.2))

    class Undeclared(HurriedRetries):
        capabilities = Capability.RECLAIM | Capability.KEY_ORDER  # no DELAYED_RETRY

    await TRANSPORT_CHECKS["retry_goes_to_one_group_after_its_delay"](Undeclared())


class _Rekeyed:
    """A delivery whose envelope got its key back (see ForgetsKeys)."""

    def __init__(self, delivery: Delivery) -> None:
        self.inner, headers = delivery, dict(delivery.envelope.headers)
        key = headers.pop("x-key", None)
        self.envelope = dataclasses.replace(delivery.envelope, key=key, headers=headers)
        self.attempt = delivery.attempt

    async def ack(self) -> None:
        await self.inner.ack()

    async def retry(self, delay: float) -> None:
        await self.inner.retry(delay)

    async def dead_letter(self, failure: Failure) -> None:
        await self.inner.dead_letter(failure)


async def test_check_transport_says_which_declared_capability_a_transport_fails() -> None:
    class ForgetsKeys(Plain):
        """Declares KEY_ORDER, but hides each key from the transport underneath."""

        capabilities = Capability.KEY_ORDER

        async def send(self, address: str, envelope: Envelope) -> None:
            if envelope.key is not None:
                headers = {**envelope.headers, "x-key": envelope.key}
                envelope = dataclasses.replace(envelope, key=None, headers=headers)
            await super().send(address, envelope)

        async def receive(
            self, address: str, group: str, *, consumer: str, limit: int, wait: float
        ) -> Sequence[Delivery]:
            got = await super().receive(address, group, consumer=consumer, limit=limit, wait=wait)
            return [_Rekeyed(delivery) for delivery in got]

    with pytest.raises(
        AssertionError,
        match=r"ForgetsKeys fails 'keys_keep_their_order', which it declares "
        r"\(Capability\.KEY_ORDER\): one key delivered twice at once",
    ):
        await check_transport(ForgetsKeys())


async def test_check_transport_refuses_what_lacks_part_of_the_seam() -> None:
    class HalfARequester(Plain):
        async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
            return await self.inner.request(address, envelope, timeout=timeout)

    with pytest.raises(
        AssertionError,
        match=r"HalfARequester has part of Requester but no reply: an optional part is all",
    ):
        await check_transport(HalfARequester())

    class Capable(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.capabilities = {"reclaim"}  # type: ignore[assignment]

    with pytest.raises(AssertionError, match=r"Capable.capabilities must be Capability flags"):
        await check_transport(Capable())

    class Old:
        url, claim_after = "old://", 0.2

    with pytest.raises(
        AssertionError,
        match=r"Old is no Transport: it has no client_name, partitions, capabilities, open, "
        r".*, join; subclass iambus\.transports\.Transport to inherit client_name",
    ):
        await check_transport(Old())  # type: ignore[arg-type]


def test_a_transport_subclass_must_define_what_has_no_default() -> None:
    class Bare(Transport):
        url, claim_after = "bare://", 0.2

    # (Python 3.12 quotes the names: 'close', 'declare'...)
    with pytest.raises(TypeError, match=r"abstract methods '?close'?, '?declare'?, '?leave'?"):
        Bare()  # type: ignore[abstract]


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
