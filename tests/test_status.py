"""iambus.status: the live instances and each group's numbers, on every transport."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from iambus import Command, Dispatcher, GroupStatus, ImproperlyConfigured, Status, status
from iambus.envelope import Envelope
from iambus.retry import Retry
from iambus.transports import Backlog, DeadLetter, DeadLetterCounter, Instance, Transport
from iambus.transports.memory import MemoryTransport

from .conftest import Bus


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


ROUTES: dict[type | str, str] = {ChargeCard: "billing"}
CHARGE, SHIP = "command.ChargeCard", "command.ShipOrder"


def group(found: Status, address: str) -> GroupStatus:
    [match] = [g for g in found.groups if g.address == address]
    return match


async def until(transport: Transport, holds: Callable[[Status], bool]) -> Status:
    deadline = time.monotonic() + 10
    while not holds(found := await status(transport)):
        assert time.monotonic() < deadline, f"status never showed it: {found}"
        await asyncio.sleep(0.05)
    return found


async def test_status_shows_instances_backlog_and_dead_letters(bus: Bus) -> None:
    billing = Dispatcher(
        transport=bus.transport(), service="billing", routes=ROUTES, retry=Retry(attempts=1)
    )

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        if command.amount < 0:
            raise ValueError("a negative amount")

    watcher = bus.transport()
    await watcher.open()
    try:
        # Shipping ran once: it declared its group, announced itself and stopped.
        await watcher.declare(SHIP, "shipping", from_start=True)
        gone = Instance("shipping", "gone-1", "there", 1, time.time(), ((SHIP, "shipping"),))
        await watcher.announce(gone)
        await watcher.withdraw(gone)
        async with billing:
            found = await status(watcher)
            assert [i.service for i in found.instances] == ["billing"]
            charging = group(found, CHARGE)
            assert (charging.service, charging.group) == ("billing", "billing")
            assert charging.instances == found.instances  # the worker, consuming it
            assert (charging.waiting, charging.dead) == (0, 0)
            for n in range(3):  # to a group nobody consumes
                await watcher.send(SHIP, Envelope(name="ShipOrder", payload=b'{"n": %d}' % n))
            await watcher.send(CHARGE, Envelope(name="ChargeCard", payload=b'{"amount": -1}'))
            found = await until(
                watcher, lambda f: group(f, CHARGE).dead == 1 and group(f, SHIP).waiting == 3
            )
            shipping = group(found, SHIP)
            assert (shipping.service, shipping.group, shipping.instances) == (
                "shipping",
                "shipping",
                (),
            )
            # (Kafka: none in flight known, none in the retry topic)
            kafka = bus.kind == "kafka"
            allowed = [(None, 0, 0)] if kafka else [(0, 0, 0), (0, None, 0), (None, None, 0)]
            assert (shipping.in_flight, shipping.retrying, shipping.dead) in allowed
            assert group(found, CHARGE).waiting == 0
        found = await status(watcher)
        assert found.instances == ()  # billing stopped: it withdrew
        assert group(found, CHARGE).instances == ()
        assert group(found, CHARGE).dead == 1  # still there, and so is its group
    finally:
        await watcher.close()


async def test_status_needs_a_registry() -> None:
    class Plain:  # a transport without the optional Registry part
        url = "plain://"

    with pytest.raises(ImproperlyConfigured, match="Plain keeps no registry of instances"):
        await status(Plain())  # type: ignore[arg-type]


async def test_status_cannot_count_the_dead_letters_of_a_transport_that_keeps_none() -> None:
    class NoDeadLetters(MemoryTransport):
        # no DeadLetterStore nor DeadLetterCounter: the optional parts taken away
        dead_letters = replay = purge = dead_letter_counts = None

    transport = NoDeadLetters()
    await transport.announce(
        Instance("billing", "b-1", "h", 1, time.time(), ((CHARGE, "billing"),))
    )
    [charging] = (await status(transport)).groups
    assert (charging.address, charging.waiting, charging.dead) == (CHARGE, 0, None)


@pytest.mark.parametrize("bus", ["memory", "redis", "rabbitmq"], indirect=True)
async def test_status_counts_dead_letters_without_loading_them(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once status loaded every dead letter (dead_letters(limit=sys.maxsize)) to count them.
    monkeypatch.setattr("iambus.transports.redis.DEAD_PAGE", 2)  # Redis pages through
    billing = Dispatcher(
        transport=bus.transport(), service="billing", routes=ROUTES, retry=Retry(attempts=1)
    )

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        raise ValueError("a negative amount")

    watcher = bus.transport()
    assert isinstance(watcher, DeadLetterCounter)
    await watcher.open()
    try:
        async with billing:
            for n in range(5):
                await watcher.send(
                    CHARGE, Envelope(name="ChargeCard", payload=b'{"amount": %d}' % n)
                )

            async def loaded(*, limit: int = 100) -> list[DeadLetter]:
                raise AssertionError("status loaded the dead letters to count them")

            monkeypatch.setattr(watcher, "dead_letters", loaded)
            await until(watcher, lambda f: group(f, CHARGE).dead == 5)
        assert await watcher.dead_letter_counts() == {(CHARGE, "billing"): 5}
    finally:
        await watcher.close()


async def test_status_of_one_service_asks_the_broker_about_its_groups_only() -> None:
    asked: list[tuple[str, str]] = []

    class Watched(MemoryTransport):
        async def backlog(self, address: str, group: str) -> Backlog:
            asked.append((address, group))
            return await super().backlog(address, group)

    transport = Watched()
    for service, address in (("billing", CHARGE), ("shipping", SHIP)):
        await transport.declare(address, service, from_start=True)
        await transport.announce(
            Instance(service, f"{service}-1", "h", 1, time.time(), ((address, service),))
        )
    found = await status(transport, service="billing")
    assert [(g.service, g.address) for g in found.groups] == [("billing", CHARGE)]
    assert [i.service for i in found.instances] == ["billing"]
    assert asked == [(CHARGE, "billing")]
    everything = await status(transport)
    assert [g.service for g in everything.groups] == ["billing", "shipping"]
