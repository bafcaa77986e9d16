"""iambus.testing: the conformance suite itself must catch broken transports."""

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from iambus import Command, Dispatcher, Retry
from iambus.database import Database
from iambus.envelope import Envelope
from iambus.errors import DeadLettered, ImproperlyConfigured, NotSettled, SerializationError
from iambus.outbox import Outgoing, write
from iambus.testing import TRANSPORT_CHECKS, FakeClock, check_transport, skip_reason, watch
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

from .conftest import Bus


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


# -- watch(), settled() and FakeClock -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PlaceOrder(Command[None]):
    order_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    order_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class CardCharged:
    order_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Audit:  # in-process only: nobody routes it
    order_id: int


ROUTES: dict[Any, str] = {
    PlaceOrder: "orders",
    OrderPlaced: "orders",
    ChargeCard: "billing",
    CardCharged: "billing",
}
NO_JITTER = Retry(attempts=3, backoff=0.5, jitter=False)


def services(bus: Bus, **options: Any) -> tuple[Dispatcher, Dispatcher]:
    """orders and billing; ChargeCard fails on its first attempt."""
    options.setdefault("retry", NO_JITTER)
    orders = Dispatcher(transport=bus.transport(), service="orders", routes=ROUTES, **options)
    billing = Dispatcher(transport=bus.transport(), service="billing", routes=ROUTES, **options)
    return orders, billing


async def test_settled_waits_for_cascades_between_services_and_retries(bus: Bus) -> None:
    orders, billing = services(bus)
    seen: list[str] = []
    attempts: list[int] = []

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        seen.append("placed")
        return OrderPlaced(command.order_id)

    @billing.events.register(OrderPlaced)
    async def bill(event: OrderPlaced) -> None:
        seen.append("billed")
        await billing.send(ChargeCard(event.order_id))  # a command to a service of its own

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> CardCharged:
        attempts.append(command.order_id)
        if len(attempts) == 1:
            raise ConnectionError("card service down")
        await billing.handle(Audit(command.order_id))  # in-process background work
        return CardCharged(command.order_id)

    @billing.events.register(Audit)
    async def audit(event: Audit) -> None:
        seen.append("audited")

    @orders.events.register(CardCharged)
    async def paid(event: CardCharged) -> None:
        seen.append("paid")

    clock = FakeClock()
    watched = watch(orders, billing, clock=clock)
    async with orders, billing:
        await orders.send(PlaceOrder(7))  # returns once the broker has it: nothing ran yet
        done = await watched.settled(timeout=10)
        # No polling: everything the command caused has run once settled() returns.
        assert seen == ["placed", "billed", "audited", "paid"]
        assert attempts == [7, 7]
        assert clock.delays == [0.5]  # asked for, and not waited out
        assert [(s.name, s.attempt, s.delay) for s in done.retried] == [("ChargeCard", 1, 0.5)]
        assert done.handled("billing") == ["ChargeCard"]
        assert sorted(done.handled()) == sorted(
            ["PlaceOrder", "OrderPlaced", "ChargeCard", "CardCharged"]
        )
        assert not done.dead_lettered
        assert not done.waiting
        assert not watched.pending
        # A second call returns what settled since the first: here nothing.
        assert (await watched.settled()).settlements == ()


async def test_settled_waits_for_a_query_between_services(bus: Bus) -> None:
    orders, billing = services(bus)
    handled: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        handled.append(command.order_id)

    watched = watch(orders, billing)
    async with orders, billing:
        await orders.execute(ChargeCard(1))  # request/reply: answered, then acked
        done = await watched.settled(timeout=10)
    assert handled == [1]
    assert done.handled("billing") == ["ChargeCard"]


async def test_settled_raises_on_a_dead_letter_unless_told_to_expect_it(bus: Bus) -> None:
    orders, billing = services(bus, retry=Retry(attempts=2, backoff=5, jitter=False))

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        raise ValueError(f"card {command.order_id} refused")

    clock = FakeClock()
    watched = watch(orders, billing, clock=clock)
    async with orders, billing:
        await orders.send(ChargeCard(1))
        with pytest.raises(DeadLettered) as raised:
            await watched.settled(timeout=10)
        assert "ChargeCard" in str(raised.value)
        assert "attempt 2: dead-lettered: builtins.ValueError: card 1 refused" in str(raised.value)
        await orders.send(ChargeCard(2))
        done = await watched.settled(timeout=10, dead_letters=True)
    [dead] = done.dead_lettered
    assert dead.failure is not None
    assert dead.failure.attempts == 2
    assert dead.group == "billing"
    assert clock.delays == [5, 5]


async def test_settled_waits_for_a_dead_letter_replayed_through_a_watched_transport(
    bus: Bus,
) -> None:
    orders, billing = services(bus, retry=Retry(attempts=1))
    fixed = False
    charged: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        if not fixed:
            raise ValueError("card network down")
        charged.append(command.order_id)

    watched = watch(orders, billing)
    async with orders, billing:
        await orders.send(ChargeCard(1))
        [dead] = (await watched.settled(timeout=10, dead_letters=True)).dead_lettered
        fixed = True
        store = billing.remote.transport  # the watched one
        assert isinstance(store, DeadLetterStore)
        [letter] = [d for d in await store.dead_letters() if d.envelope.id == dead.id]
        assert await store.replay([letter.id]) == 1
        done = await watched.settled(timeout=10)  # the replay is handled, not only sent
        assert charged == [1]
    assert [(s.id, s.outcome) for s in done.settlements] == [(dead.id, "acked")]


async def test_a_replay_for_a_group_no_watched_dispatcher_consumes_is_not_waited_for() -> None:
    transport = MemoryTransport()
    orders = Dispatcher(transport=transport, service="orders", routes=ROUTES)
    billing = Dispatcher(transport=transport, service="billing", routes=ROUTES, retry=Retry(1))
    fixed = False

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        if not fixed:
            raise ValueError("card network down")

    async with billing:
        await billing.send(ChargeCard(1))
        await billing.join()
    watched = watch(orders)  # billing is not watched
    fixed = True
    async with orders, billing:
        store = orders.remote.transport
        assert isinstance(store, DeadLetterStore)
        [letter] = await store.dead_letters()
        assert await store.replay([letter.id]) == 1
        await watched.settled(timeout=2)  # billing's group is none of the watch's


async def test_settled_waits_for_a_message_sent_before_its_consumer_started(bus: Bus) -> None:
    orders, billing = services(bus)
    handled: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        handled.append(command.order_id)

    watched = watch(orders, billing)
    async with orders:
        await orders.send(ChargeCard(3))  # billing's group is declared (backlog too) later
        async with billing:
            await watched.settled(timeout=10)
            assert handled == [3]


async def test_settled_times_out_listing_what_is_pending() -> None:
    transport = MemoryTransport()
    orders = Dispatcher(transport=transport, service="orders", routes=ROUTES)
    billing = Dispatcher(transport=transport, service="billing", routes=ROUTES)
    release = asyncio.Event()

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        await release.wait()

    watched = watch(orders, billing)
    async with orders, billing:
        await orders.send(ChargeCard(1), id="charge-1")
        with pytest.raises(NotSettled) as raised:
            await watched.settled(timeout=0.3)
        assert str(raised.value) == (
            "not settled after 0.3s:\n"
            "  ChargeCard (id charge-1) for group 'billing': attempt 1, handling"
        )
        release.set()
        assert (await watched.settled()).handled() == ["ChargeCard"]


async def test_settled_says_a_stopped_service_handles_nothing() -> None:
    transport = MemoryTransport()
    orders = Dispatcher(transport=transport, service="orders", routes=ROUTES)
    billing = Dispatcher(transport=transport, service="billing", routes=ROUTES)

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        pass

    watched = watch(orders, billing)
    async with billing:
        pass
    async with orders:
        await orders.send(ChargeCard(1), id="c1")
        with pytest.raises(NotSettled) as raised:
            await watched.settled(timeout=0.2)
    assert "ChargeCard (id c1) for group 'billing': not received yet, sent" in str(raised.value)
    assert "the dispatcher of service 'billing' is stopped" in str(raised.value)


async def test_a_manual_clock_holds_retries_until_advanced() -> None:
    transport = MemoryTransport()
    orders, billing = services(Bus("memory", lambda: transport))
    attempts: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        attempts.append(command.order_id)
        if len(attempts) < 3:
            raise ConnectionError("down")

    clock = FakeClock(auto=False)
    watched = watch(orders, billing, clock=clock)
    async with orders, billing:
        await orders.send(ChargeCard(1))
        done = await watched.settled()
        assert attempts == [1]
        assert clock.delays == [0.5]
        assert [(p.name, p.attempt, p.state) for p in done.waiting] == [
            ("ChargeCard", 1, "held by the clock")
        ]
        clock.advance(0.4)  # not due yet
        assert (await watched.settled()).waiting
        assert attempts == [1]
        clock.advance(0.1)
        done = await watched.settled()
        assert attempts == [1, 1]
        assert clock.delays == [0.5, 1.0]
        assert clock.now == 0.5
        clock.advance(1)
        done = await watched.settled()
        assert attempts == [1, 1, 1]
        assert not done.waiting
        assert done.handled() == ["ChargeCard"]


async def test_settled_waits_for_the_outbox_relay(bus: Bus, database: Database) -> None:
    _, billing = services(bus)
    orders = Dispatcher(
        transport=bus.transport(),
        service="orders",
        routes=ROUTES,
        database=database,
        unit_of_work=True,  # what a handler emits goes to the outbox, the relay sends it
    )
    billed: list[int] = []

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        return OrderPlaced(command.order_id)

    @billing.events.register(OrderPlaced)
    async def bill(event: OrderPlaced) -> None:
        billed.append(event.order_id)

    watched = watch(orders, billing)
    async with orders, billing:
        await orders.send(PlaceOrder(5))
        done = await watched.settled(timeout=10)
        assert billed == [5]
        assert done.handled() == ["PlaceOrder", "OrderPlaced"]


class TooLarge(MemoryTransport):
    """A broker that takes no OrderPlaced (too large for it, say)."""

    async def send(self, address: str, envelope: Envelope) -> None:
        if envelope.name.endswith("OrderPlaced"):
            raise SerializationError("the message is larger than the broker takes")
        await super().send(address, envelope)


async def test_settled_says_an_outbox_row_was_parked(database: Database) -> None:
    orders = Dispatcher(
        transport=TooLarge(),
        service="orders",
        routes=ROUTES,
        database=database,
        unit_of_work=True,
    )

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        return OrderPlaced(command.order_id)

    async with database.connection() as conn, conn.transaction():  # parked before the watch
        await write(conn, database, [Outgoing("event.Old", Envelope("Old", b"{}"))])
        await conn.execute(f"UPDATE {database.outbox} SET parked_at = now()")

    watched = watch(orders)
    async with orders:
        await orders.send(PlaceOrder(5))
        with pytest.raises(DeadLettered, match=r"^1 outbox row\(s\) were parked"):
            await watched.settled(timeout=10)
        await orders.send(PlaceOrder(6))
        done = await watched.settled(timeout=10, dead_letters=True)
        assert done.parked == 1  # the second one (the first was reported already)
        assert done.handled() == ["PlaceOrder"]
        async with database.connection() as conn:  # released (iambus outbox retry): gone
            await conn.execute(f"DELETE FROM {database.outbox} WHERE parked_at IS NOT NULL")
        assert (await watched.settled(timeout=10)).parked == 0


async def test_watch_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(TypeError, match=r"watch\(\) needs the dispatchers"):
        watch()
    in_process = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"has none; for in-process work await"):
        watch(in_process)
    routed = Dispatcher(transport="memory://", service="orders", routes=ROUTES)
    with pytest.raises(ImproperlyConfigured, match=r"clock=\.\.\.\) must be a FakeClock"):
        watch(routed, clock=1.0)  # type: ignore[arg-type]
    watched = watch(routed)
    with pytest.raises(ImproperlyConfigured, match="is watched already"):
        watch(routed)
    with pytest.raises(ImproperlyConfigured, match="never started"):
        await watched.settled()
    with pytest.raises(ImproperlyConfigured, match=r"timeout=\.\.\.\) must be a number"):
        await watched.settled(timeout=0)

    @routed.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        pass

    late = Dispatcher(transport="memory://", service="orders", routes=ROUTES)
    late.commands.register(PlaceOrder)(place)
    async with late:
        with pytest.raises(ImproperlyConfigured, match="before it starts"):
            watch(late)


def test_a_fake_clock_refuses_time_going_back() -> None:
    clock = FakeClock()
    with pytest.raises(ImproperlyConfigured, match=r"advance\(seconds\) must be"):
        clock.advance(-1)
    with pytest.raises(ImproperlyConfigured, match=r"auto=\.\.\.\) must be True or False"):
        FakeClock(auto="yes")  # type: ignore[arg-type]
    clock.advance(2)
    assert clock.now == 2
    assert clock.delays == []


async def test_a_watched_transport_keeps_the_optional_parts_of_its_own() -> None:
    class Small(MemoryTransport):
        request = reply = None  # type: ignore[assignment]

    for transport, requester in ((MemoryTransport(), True), (Small(), False)):
        dp = Dispatcher(transport=transport, service="orders", routes=ROUTES)
        watch(dp)
        assert dp.remote is not None
        assert isinstance(dp.remote.transport, Requester) is requester
        assert isinstance(dp.remote.transport, DeadLetterStore)
        assert dp.remote.transport.url == transport.url


async def test_a_retry_the_clock_holds_is_given_back_when_its_worker_stops() -> None:
    transport = MemoryTransport()
    orders, billing = services(Bus("memory", lambda: transport))
    attempts: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        attempts.append(command.order_id)
        if len(attempts) == 1:
            raise ConnectionError("down")

    clock = FakeClock(auto=False)
    watched = watch(orders, billing, clock=clock)
    async with orders:
        async with billing:
            await orders.send(ChargeCard(1))
            assert (await watched.settled()).waiting
        # The stop did not wait for the clock; the delivery went back to the group.
        assert [(p.name, p.state) for p in watched.pending] == [("ChargeCard", "given back")]
        async with billing:
            done = await watched.settled()
    assert attempts == [1, 1]
    assert done.handled() == ["ChargeCard"]


async def test_settled_waits_for_background_work_and_says_when_it_does_not_end() -> None:
    orders = Dispatcher(transport=MemoryTransport(), service="orders", routes=ROUTES)
    release = asyncio.Event()
    audited: list[int] = []

    @orders.events.register(Audit)
    async def audit(event: Audit) -> None:
        await release.wait()
        audited.append(event.order_id)

    watched = watch(orders)
    async with orders:
        await orders.handle(Audit(1))  # in-process, in the background
        with pytest.raises(NotSettled) as raised:
            await watched.settled(timeout=0.2)
        assert str(raised.value) == (
            "not settled after 0.2s:\n"
            "  no message is pending: background work (dp.join()) is not done"
        )
        release.set()
        done = await watched.settled()
        assert audited == [1]
        assert done.settlements == ()  # nothing went through the transport


async def test_a_watched_transport_still_keeps_the_transport_contract() -> None:
    # What watch() puts between a dispatcher and its transport changes nothing the
    # worker relies on: it passes the checks the transport itself passes. (Not with a
    # FakeClock: that one takes the delay out of retries, by design.)
    dp = Dispatcher(transport=MemoryTransport(claim_after=0.2), service="orders", routes=ROUTES)
    watch(dp)
    assert dp.remote is not None
    watched = dp.remote.transport
    await watched.open()
    try:
        assert await check_transport(watched) == {}
    finally:
        await watched.close()
