"""Distributed scenarios, written once and run on every transport (see conftest.bus)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import (
    Command,
    Dispatcher,
    DispatcherStopped,
    ImproperlyConfigured,
    Limits,
    Query,
    RemoteError,
    RequestTimeout,
    Timeouts,
)
from iambus.envelope import Envelope
from iambus.errors import TransportError
from iambus.remote import current_envelope
from iambus.retry import Retry
from iambus.transports import Capability, Instance, Registry
from iambus.transports.memory import MemoryTransport

from .conftest import Bus
from .processes import collapse, until


@dataclass(frozen=True, slots=True)
class PlaceOrder(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str]):
    order_id: int


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    order_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class SeatBooked:
    flight: str
    seq: int


ROUTES: dict[type | str, str] = {
    PlaceOrder: "orders",
    OrderPlaced: "orders",
    GetInvoice: "billing",
    ChargeCard: "billing",
    SeatBooked: "seats",
}
FAST = Retry(attempts=3, backoff=0.05, jitter=False)


def service(bus: Bus, name: str, **options: Any) -> Dispatcher:
    options.setdefault("retry", FAST)
    return Dispatcher(transport=bus.transport(), service=name, routes=ROUTES, **options)


async def settle(bus: Bus, *dispatchers: Dispatcher, until: Any = None, timeout: float = 10):
    """Wait until every message between the services is settled (or ``until()`` holds)."""
    if bus.kind == "memory" and until is None:
        await asyncio.wait_for(dispatchers[0].join(), timeout)
        return
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the services did not settle in time"
        await asyncio.sleep(0.02)


async def test_every_service_gets_each_event_and_instances_compete(bus: Bus) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    instances = []
    for name in ("billing", "billing", "shipping", "shipping"):
        dp = service(bus, name)

        async def handler(event: OrderPlaced, name: str = name) -> None:
            seen[name, event.order_id] += 1

        dp.events.bind(OrderPlaced, handler)
        instances.append(dp)
    publisher = service(bus, "orders")
    for dp in instances:
        await dp.__aenter__()
    try:
        for n in range(20):
            await publisher.publish(OrderPlaced(n))
        await settle(bus, publisher, until=lambda: len(seen) == 40)
    finally:
        for dp in instances:
            await dp.stop()
        await publisher.stop()
    # Each service got each event, at least once (a late ack may bring one back), and
    # nothing else.
    assert set(seen) == {(name, n) for name in ("billing", "shipping") for n in range(20)}


async def test_a_command_goes_to_its_owner_and_its_events_follow(bus: Bus) -> None:
    charged: list[int] = []
    shipped: list[int] = []
    orders = service(bus, "orders")
    billing = service(bus, "billing")

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        return OrderPlaced(command.order_id)  # routed: sent to the transport, then acked

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        charged.append(event.order_id)

    @billing.commands.register(ChargeCard)
    async def charge_card(command: ChargeCard) -> None:
        shipped.append(command.amount)

    async with orders, billing:
        assert await orders.execute(PlaceOrder(1)) is None  # remote: the owner answered
        await orders.handle(ChargeCard(1, 50))  # handle() sends routed messages at once
        await settle(bus, orders, until=lambda: charged and shipped)
    assert (charged, shipped) == ([1], [50])


def test_a_service_that_does_not_own_a_command_cannot_handle_it() -> None:
    dp = Dispatcher(transport="memory://", service="orders", routes=ROUTES)

    @dp.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"routed to service 'billing'.*one owner"):
        dp.start()


async def test_queries_answer_across_services_and_fail_clearly(bus: Bus) -> None:
    orders = service(bus, "orders")
    billing = service(bus, "billing")

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        if query.order_id < 0:
            raise KeyError(f"no order {query.order_id}")
        return f"INV-{query.order_id}"

    async with billing:
        results = await asyncio.gather(*(orders.query(GetInvoice(n)) for n in range(10)))
        assert results == [f"INV-{n}" for n in range(10)]  # many requests in flight at once
        with pytest.raises(RemoteError, match=r"GetInvoice failed in service 'billing'") as info:
            await orders.query(GetInvoice(-1), timeout=5)
        assert info.value.error_type == "builtins.KeyError"
        assert "no order -1" in info.value.remote_message
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"no answer to GetInvoice from service 'billing'"):
        await orders.query(GetInvoice(1), timeout=0.3)  # billing has stopped
    assert time.monotonic() - started < 2
    await orders.stop()


async def test_a_poison_message_is_dead_lettered_while_the_rest_flow(bus: Bus) -> None:
    handled: list[int] = []
    attempts: Counter[int] = Counter()
    billing = service(bus, "billing")

    @billing.events.register(OrderPlaced, retry=Retry(attempts=3, backoff=0.05, jitter=False))
    async def charge(event: OrderPlaced) -> None:
        attempts[event.order_id] += 1
        if event.order_id == 13:
            raise ValueError("card declined")
        handled.append(event.order_id)

    orders = service(bus, "orders")
    async with billing:
        for n in range(10, 17):
            await orders.publish(OrderPlaced(n))
        transport = billing.remote.transport  # type: ignore[union-attr]

        async def parked() -> list[Any]:
            return [d for d in await transport.dead_letters() if d.envelope.name == "OrderPlaced"]

        deadline = time.monotonic() + 10
        while not (len(handled) == 6 and await parked()):
            assert time.monotonic() < deadline, (handled, attempts)
            await asyncio.sleep(0.05)
    await orders.stop()
    assert sorted(handled) == [10, 11, 12, 14, 15, 16]
    assert attempts[13] == 3
    [letter] = await parked()
    assert letter.failure.error_type == "builtins.ValueError"
    assert letter.failure.message == "card declined"
    assert letter.failure.attempts == 3
    assert letter.failure.handler.endswith("charge")
    assert "card declined" in letter.failure.traceback
    assert letter.group == f"billing.{charge.__module__}.{charge.__qualname__}"
    await transport.purge([letter.id])


async def test_an_undecodable_payload_is_dead_lettered_with_the_reason(bus: Bus) -> None:
    handled: list[int] = []
    billing = service(bus, "billing")

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    async with billing:
        transport = billing.remote.transport  # type: ignore[union-attr]
        bad = Envelope(name="OrderPlaced", payload=b'{"order_id": "seven"}')
        await transport.send("event.OrderPlaced", bad)
        await billing.publish(OrderPlaced(8))
        deadline = time.monotonic() + 10
        letters: list[Any] = []
        while not (handled and letters):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            letters = [d for d in await transport.dead_letters() if d.envelope.id == bad.id]
    assert handled == [8]
    [letter] = letters
    assert letter.failure.error_type == "iambus.errors.SerializationError"
    assert "order_id" in letter.failure.message
    assert letter.failure.attempts == 1
    await transport.purge([letter.id])


async def test_a_failing_handler_is_retried_alone(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    billing = service(bus, "billing")

    @billing.events.register(OrderPlaced)
    async def flaky(event: OrderPlaced) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("try later")

    @billing.events.register(OrderPlaced)
    async def steady(event: OrderPlaced) -> None:
        calls["steady"] += 1

    async with billing:
        await billing.publish(OrderPlaced(1))
        await settle(bus, billing, until=lambda: calls["flaky"] >= 2 and calls["steady"] >= 1)
    # Stopped: every run that was coming has run. The retry ran flaky again, not steady
    # (a redelivery of the whole message, at least once, would have run both).
    assert calls["flaky"] >= 2
    assert calls["flaky"] - calls["steady"] == 1, calls


async def test_correlation_and_causation_follow_the_conversation(bus: Bus) -> None:
    seen: dict[str, Envelope] = {}
    orders = service(bus, "orders")
    billing = service(bus, "billing")

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> OrderPlaced:
        seen["command"] = current_envelope.get()  # type: ignore[assignment]
        return OrderPlaced(command.order_id)

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        seen["event"] = current_envelope.get()  # type: ignore[assignment]

    async with orders, billing:
        await orders.execute(PlaceOrder(5))
        await settle(bus, orders, until=lambda: "event" in seen)
    command, event = seen["command"], seen["event"]
    assert command.correlation_id == command.id  # a new conversation
    assert command.causation_id is None
    assert event.correlation_id == command.id
    assert event.causation_id == command.id


async def test_stop_finishes_handlers_in_flight_and_acks_them(bus: Bus) -> None:
    started = asyncio.Event()
    finished: list[int] = []
    billing = service(bus, "billing")

    @billing.events.register(OrderPlaced)
    async def slow(event: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(event.order_id)

    await billing.__aenter__()
    await billing.publish(OrderPlaced(1))
    await asyncio.wait_for(started.wait(), 5)
    await billing.stop(timeout=5)
    assert finished == [1]
    # nothing was left unacked: a new instance gets nothing to redo
    again: list[int] = []
    second = service(bus, "billing")

    @second.events.register(OrderPlaced)
    async def slow_again(event: OrderPlaced) -> None:
        again.append(event.order_id)

    # the same handler name is the same subscription
    second.events.handlers()
    async with second:
        # An absence: what is left unacked is handed over after claim_after; nothing comes.
        claim_after = getattr(second.remote.transport, "claim_after", 0.5)  # type: ignore[union-attr]
        await asyncio.sleep(claim_after + 0.5)
    assert again == []


async def test_the_start_lines_never_show_a_password(caplog: pytest.LogCaptureFixture) -> None:
    from iambus.transports.memory import MemoryTransport

    caplog.set_level("INFO")
    # A transport of the user's that keeps its URL as given, password and all.
    secret = MemoryTransport("memory://u:s3cret@bus")
    serving = Dispatcher(transport=secret, service="billing", routes=ROUTES)

    @serving.events.register(OrderPlaced)
    async def noted(event: OrderPlaced) -> None:
        pass

    sending = Dispatcher(transport=secret, service="tester", routes=ROUTES)
    async with serving, sending:
        await sending.publish(OrderPlaced(1))
    assert "on memory://u:***@bus" in caplog.text  # the worker's start line
    assert "through memory://u:***@bus" in caplog.text  # a service that consumes nothing
    assert "s3cret" not in caplog.text


def test_routes_need_a_transport() -> None:
    with pytest.raises(ImproperlyConfigured, match="routes need a transport"):
        Dispatcher(routes=ROUTES)


async def test_a_handler_unfinished_at_stop_timeout_is_redelivered(caplog) -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport(claim_after=0.3)
    runs: list[str] = []
    started = asyncio.Event()
    first = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @first.events.register(OrderPlaced)
    async def slow(event: OrderPlaced) -> None:
        runs.append("first")
        started.set()
        await asyncio.sleep(10)

    await first.__aenter__()
    await first.publish(OrderPlaced(1))
    await asyncio.wait_for(started.wait(), 5)
    await first.stop(timeout=0.05)
    assert "did not finish in time" in caplog.text

    second = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @second.events.register(OrderPlaced)
    async def slow(event: OrderPlaced) -> None:  # noqa: F811 - the same subscription name
        runs.append("second")

    async with second:
        await asyncio.wait_for(second.join(), 5)
    assert runs == ["first", "second"]


async def test_an_expired_query_is_not_handled() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    handled: list[int] = []

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        handled.append(query.order_id)
        return "x"

    async with billing:
        stale = Envelope(
            name="GetInvoice",
            payload=b'{"order_id":1}',
            headers={"deadline": repr(time.time() - 1)},
        )
        await bus.send("query.GetInvoice", stale)
        await asyncio.wait_for(billing.join(), 5)  # settled: acked, not handled
    assert handled == []


async def test_a_failure_to_settle_is_logged_and_the_message_redelivered(caplog) -> None:
    from iambus import TransportError
    from iambus.transports.memory import MemoryTransport

    class FlakyAcks(MemoryTransport):
        failures = 1

        async def _settle(self, address: str, group: str, token: int):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise TransportError("connection reset while acking")
            return await super()._settle(address, group, token)

    bus = FlakyAcks(claim_after=0.2)
    handled: list[int] = []
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    async with billing:
        await billing.publish(OrderPlaced(4))
        await asyncio.wait_for(billing.join(), 5)
    assert "could not settle event OrderPlaced" in caplog.text
    assert handled == [4, 4]  # at least once: handled again after the lost ack


# -- findings of the review of the distributed code -----------------------------------


@dataclass(frozen=True, slots=True)
class Shipped:
    order_id: int


@dataclass(frozen=True, slots=True)
class BaseEvent:
    n: int


@dataclass(frozen=True, slots=True)
class SubEvent(BaseEvent):
    pass


async def test_a_routed_event_goes_only_to_the_transport_even_with_catch_all_handlers() -> None:
    from iambus import TransportError
    from iambus.transports.memory import MemoryTransport

    class FailingSend(MemoryTransport):
        async def send(self, address: str, envelope: Envelope) -> None:
            if address == "event.Shipped":
                raise TransportError("broker down")
            await super().send(address, envelope)

    bus = FailingSend(claim_after=0.3)
    routes = {**ROUTES, Shipped: "orders"}
    orders = Dispatcher(transport=bus, service="orders", routes=routes, retry=FAST)
    audited: list[object] = []

    @orders.events.register(object)
    async def audit(event: object) -> None:
        audited.append(event)

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> Shipped:
        return Shipped(command.order_id)

    async with orders:
        await orders.send(PlaceOrder(1))  # not execute(): that would raise the failure
        await asyncio.wait_for(orders.join(), 5)
    [letter] = await bus.dead_letters()  # retried, then parked: never acked and forgotten
    assert letter.failure.error_type == "iambus.errors.TransportError"
    assert letter.failure.attempts == FAST.attempts
    assert audited == []  # the routed event did not run local catch-all handlers


async def test_a_routed_base_class_does_not_send_its_subclasses() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    dp = Dispatcher(transport=bus, service="s", routes={BaseEvent: "s"})
    await dp.publish(SubEvent(1))
    await dp.publish(BaseEvent(2))
    assert "event.SubEvent" not in bus._streams  # not sent under a name nobody consumes
    assert [e.name for e in bus._streams["event.BaseEvent"].entries] == ["BaseEvent"]


async def test_transport_handlers_may_send_while_draining_and_stop_from_inside() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    started = asyncio.Event()
    sent: list[int] = []

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(0.1)
        await billing.handle(ChargeCard(event.order_id, 10))  # while the dispatcher drains
        sent.append(event.order_id)

    @billing.commands.register(ChargeCard)
    async def charge_card(command: ChargeCard) -> None:
        await billing.stop()  # from a handler: deferred, does not wait for itself

    await billing.__aenter__()
    await billing.publish(OrderPlaced(3))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(billing.stop(timeout=5), 5)
    assert sent == [3]
    assert bus.unsettled() == 1  # the command was sent during the drain: kept, not lost
    await billing.__aenter__()  # the command's handler stops the dispatcher itself
    await asyncio.wait_for(billing.wait_for_shutdown(), 5)
    assert bus.unsettled() == 0


async def test_handlers_with_the_same_name_get_their_own_subscriptions() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    seen: list[str] = []

    def make(label: str) -> Any:
        async def on_placed(event: OrderPlaced) -> None:
            seen.append(label)

        return on_placed

    billing.events.bind(OrderPlaced, make("audit"))
    billing.events.bind(OrderPlaced, make("email"))
    async with billing:
        for n in range(3):
            await billing.publish(OrderPlaced(n))
        await asyncio.wait_for(billing.join(), 5)
    assert sorted(seen) == ["audit"] * 3 + ["email"] * 3
    groups = sorted(sub.group for sub in billing._table.subscriptions)
    assert groups[1] == groups[0] + "#2"


async def test_background_sends_keep_the_conversation_that_queued_them() -> None:
    from iambus.transports.memory import MemoryTransport

    @dataclass(frozen=True, slots=True)
    class Audit:
        order_id: int

    bus = MemoryTransport()
    orders = Dispatcher(transport=bus, service="orders", routes=ROUTES)
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    seen: dict[int, Envelope] = {}
    commands: dict[int, Envelope] = {}

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        commands[command.order_id] = current_envelope.get()  # type: ignore[assignment]
        await orders.handle(Audit(command.order_id))  # local, queued in the background

    @orders.events.register(Audit)
    async def audit(event: Audit) -> None:
        await orders.publish(OrderPlaced(event.order_id))  # routed: sent from the job

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        seen[event.order_id] = current_envelope.get()  # type: ignore[assignment]

    async with orders, billing:
        for n in (1, 2):
            await orders.execute(PlaceOrder(n))
        await orders.publish(OrderPlaced(3))  # from outside any handler
        await settle(Bus("memory", lambda: bus), orders, until=lambda: len(seen) == 3)
    for n in (1, 2):
        assert seen[n].correlation_id == commands[n].correlation_id
    assert seen[3].correlation_id == seen[3].id  # a conversation of its own
    assert seen[1].correlation_id != seen[2].correlation_id


async def test_a_query_that_does_not_decode_is_answered_with_the_error() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        return "x"

    async with billing:
        bad = Envelope(name="GetInvoice", payload=b'{"order_id": "one"}')
        started = time.monotonic()
        reply = await bus.request("query.GetInvoice", bad, timeout=5)
    assert time.monotonic() - started < 2  # not the full timeout
    assert reply.headers["iambus-status"] == "error"
    assert b"SerializationError" in reply.payload


async def test_stop_timeout_is_one_deadline_for_worker_and_background_work() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    started = asyncio.Event()

    @billing.events.register(OrderPlaced)
    async def slow(event: OrderPlaced) -> None:
        started.set()
        await billing.handle(ChargeLocally(1))
        await asyncio.sleep(10)

    @billing.commands.register(ChargeLocally)
    async def local(command: ChargeLocally) -> None:
        await asyncio.sleep(10)

    await billing.__aenter__()
    await billing.publish(OrderPlaced(1))
    await asyncio.wait_for(started.wait(), 5)
    began = time.monotonic()
    await billing.stop(timeout=0.5)
    assert time.monotonic() - began < 1.2


@dataclass(frozen=True, slots=True)
class ChargeLocally:
    n: int


def test_each_busy_subscription_fetches_a_fair_share() -> None:
    from iambus.worker import Worker

    worker = Worker.__new__(Worker)
    worker.concurrency, worker.batch, worker._free = 8, 32, 8
    subs = [object() for _ in range(4)]
    worker._busy = set()  # type: ignore[assignment]
    assert worker._share(subs[0]) == 1  # idle: fetch one to find out
    worker._busy = {subs[0], subs[1]}  # type: ignore[assignment]
    assert worker._share(subs[0]) == 4  # busy: the slots split among the busy ones
    assert worker._share(subs[2]) == 1
    worker._free = 1
    assert worker._share(subs[0]) == 1


async def test_a_key_is_handled_in_order_across_instances_through_retries(
    bus: Bus, request: pytest.FixtureRequest
) -> None:
    from .test_transports import KEYS_PENDING

    if bus.kind in KEYS_PENDING:
        request.applymarker(pytest.mark.xfail(reason="per-key ordering not built", strict=True))
    flights = [f"FL-{n}" for n in range(6)]
    per_flight = 12
    seen: dict[str, list[int]] = {flight: [] for flight in flights}
    running: set[str] = set()
    overlaps = 0
    failed_once: set[tuple[str, int]] = set()

    def instance() -> Dispatcher:
        seats = service(bus, "seats")

        @seats.events.register(SeatBooked)
        async def assign(event: SeatBooked) -> None:
            nonlocal overlaps
            assert event.flight not in running, f"{event.flight} handled twice at once"
            running.add(event.flight)
            overlaps += len(running) > 1
            try:
                await asyncio.sleep(0.002 * (event.seq % 3))
                if event.seq == 5 and (event.flight, 5) not in failed_once:
                    failed_once.add((event.flight, 5))
                    raise ConnectionError("seat map busy")  # retried before seq 6
                seen[event.flight].append(event.seq)
            finally:
                running.discard(event.flight)

        return seats

    first, second = instance(), instance()
    async with first, second:
        for seq in range(per_flight):
            for flight in flights:
                await first.publish(SeatBooked(flight, seq), key=flight)
        await settle(
            bus,
            first,
            until=lambda: all(len(set(s)) == per_flight for s in seen.values()),
            timeout=30,
        )
    for flight in flights:  # in order; a repeat right after itself is a redelivery
        assert collapse(seen[flight]) == list(range(per_flight)), f"{flight}: {seen[flight]}"
    assert len(failed_once) == len(flights)
    assert overlaps > 0, "different keys must be handled in parallel"


# -- the registry: who runs, and what a sender is told --------------------------------


@dataclass(frozen=True, slots=True)
class GetRefund(Query[str]):
    order_id: int


@dataclass(frozen=True, slots=True)
class RefundCard(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class CardExpired:
    order_id: int


@dataclass(frozen=True, slots=True)
class GetInvoiceLater(Command[None]):  # billing does not run when it is sent
    order_id: int


REGISTRY_ROUTES: dict[type | str, str] = {
    **ROUTES,
    GetInvoiceLater: "billing",
    GetRefund: "billing",
    RefundCard: "billing",
    CardExpired: "billing",
}


def billing_service(bus: Bus) -> Dispatcher:
    """Billing as deployed: it handles ChargeCard and GetInvoice, not the refunds."""
    billing = Dispatcher(
        transport=bus.transport(), service="billing", routes=REGISTRY_ROUTES, retry=FAST
    )

    @billing.commands.register(ChargeCard)
    async def charge_card(command: ChargeCard) -> None:
        pass

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        return "INV"

    return billing


async def test_a_running_worker_is_in_the_registry_until_it_stops(bus: Bus) -> None:
    billing = billing_service(bus)
    watcher = bus.transport()
    await watcher.open()
    try:
        assert isinstance(watcher, Registry)
        async with billing:
            [instance] = [i for i in await watcher.instances() if i.service == "billing"]
            assert set(instance.consumes) == {
                ("command.ChargeCard", "billing"),
                ("query.GetInvoice", "billing"),
            }
            assert instance.handles("query.GetInvoice")
            assert not instance.handles("query.GetRefund")
            assert instance.pid == os.getpid()
            assert instance.started <= time.time()
        assert [i for i in await watcher.instances() if i.service == "billing"] == []
        known = await watcher.groups()
        assert known[("command.ChargeCard", "billing")] == "billing"  # known after it stopped
    finally:
        await watcher.close()


async def test_a_query_timeout_says_whether_its_owner_runs_and_what_it_handles(
    bus: Bus,
) -> None:
    orders = Dispatcher(transport=bus.transport(), service="orders", routes=REGISTRY_ROUTES)
    with pytest.raises(
        RequestTimeout,
        match=r"no answer to GetRefund from service 'billing' within 0\.3s; "
        r"no live instance of service 'billing' is running",
    ):
        await orders.query(GetRefund(1), timeout=0.3)
    async with billing_service(bus):
        with pytest.raises(
            RequestTimeout,
            match=r"service 'billing' runs \(1 live instance\) but none of them handles "
            r"query\.GetRefund \(it handles: command\.ChargeCard, query\.GetInvoice\)",
        ):
            await orders.query(GetRefund(1), timeout=0.3)
    await orders.stop()


async def test_a_routed_send_no_live_instance_handles_is_logged_once(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    orders = Dispatcher(transport=bus.transport(), service="orders", routes=REGISTRY_ROUTES)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    async def checked() -> None:  # the look-ups the sends started, in the background
        assert orders.remote is not None
        await asyncio.gather(*orders.remote._checks)

    caplog.set_level(logging.WARNING, logger="iambus.remote")
    await orders.send(GetInvoiceLater(1))  # billing is down: the command waits, no alarm
    await checked()
    assert warnings() == []
    async with billing_service(bus):
        await orders.send(ChargeCard(1, 5))  # handled: nothing to say
        await checked()
        assert warnings() == []
        await orders.send(RefundCard(1))
        await orders.send(RefundCard(2))
        await orders.publish(CardExpired(1))
        await checked()
    await orders.stop()
    assert sorted(warnings()) == [
        "iambus: sent command.RefundCard to service 'billing', where it waits: service "
        "'billing' runs (1 live instance) but none of them handles command.RefundCard (it "
        "handles: command.ChargeCard, query.GetInvoice); deploy a version that binds a "
        "handler for it, or check the routes",
        "iambus: sent event.CardExpired, but no handler of any service has ever subscribed "
        "to it: nobody receives it, and a handler that subscribes later gets only the "
        "events sent after it started",
    ]


async def test_a_worker_that_cannot_announce_itself_serves_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NoRegistry(MemoryTransport):
        async def announce(self, instance: Instance) -> None:
            raise TransportError("memory://: announce failed: the registry is down")

    transport = NoRegistry()
    charged: list[int] = []
    billing = Dispatcher(transport=transport, service="billing", routes=ROUTES)

    @billing.commands.register(ChargeCard)
    async def charge_card(command: ChargeCard) -> None:
        charged.append(command.amount)

    with caplog.at_level(logging.WARNING, logger="iambus.worker"):
        async with billing:
            await billing.handle(ChargeCard(1, 5))
            await billing.join()
    assert charged == [5]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "iambus.worker"]
    assert "could not announce it in the registry" in warning
    assert "the registry is down" in warning


# -- issue 9: trust at the edges ------------------------------------------------------


async def parked_letters(transport: Any, name: str, timeout: float = 10) -> list[Any]:
    """The dead letters of messages named ``name``, once there is one (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        letters = [d for d in await transport.dead_letters() if d.envelope.name == name]
        if letters:
            return letters
        assert time.monotonic() < deadline, f"no dead letter of {name} in {timeout}s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("bus", ["memory", "redis"], indirect=True)
async def test_a_handler_raising_cancelled_error_fails_is_retried_and_dead_lettered(
    bus: Bus,
) -> None:
    runs: Counter[int] = Counter()
    reported: list[BaseException] = []
    billing = service(bus, "billing", error_handler=lambda exc, m, c: reported.append(exc))

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        runs[command.order_id] += 1
        # The handler's own code cancels (an inner task cancelled and awaited, say):
        # a failure of the handler, not a stop of the worker.
        inner = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        inner.cancel()
        await inner

    async with billing:
        await billing.send(ChargeCard(7, 100))
        transport = billing.remote.transport  # type: ignore[union-attr]
        [letter] = await parked_letters(transport, "ChargeCard")
    assert runs[7] >= FAST.attempts  # at least: a redelivery may add a run
    assert letter.failure.error_type == "asyncio.exceptions.CancelledError"
    assert letter.failure.attempts == FAST.attempts
    assert [type(exc) for exc in reported] == [asyncio.CancelledError]
    await transport.purge([letter.id])


def query_from(sender_clock: float, *, timeout: float, sender: str | None) -> Envelope:
    """A GetInvoice request as a sender whose clock reads ``sender_clock`` would send it."""
    headers = {"deadline": repr(sender_clock + timeout)}
    if sender is not None:
        headers["iambus-sender"] = sender
    return Envelope(
        name="GetInvoice", payload=b'{"order_id":1}', created_at=sender_clock, headers=headers
    )


@pytest.mark.parametrize("sender", ["orders@host-a", None], ids=["sender", "old-sender"])
@pytest.mark.parametrize("skew", [-60.0, 60.0], ids=["behind", "ahead"])
async def test_a_fresh_query_is_answered_whatever_the_clock_skew(
    skew: float, sender: str | None
) -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        return f"invoice {query.order_id}"

    async with billing:
        for _ in range(3):  # the sender's clock is off by more than its timeout, every time
            fresh = query_from(time.time() + skew, timeout=2, sender=sender)
            answer = await bus.request("query.GetInvoice", fresh, timeout=5)
            assert answer.payload == b'"invoice 1"'


async def test_an_expired_query_is_logged_with_its_age_name_and_sender(caplog) -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    orders = Dispatcher(transport=bus, service="orders", routes=ROUTES)
    handled: list[int] = []
    senders: list[str | None] = []

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        handled.append(query.order_id)
        senders.append(current_envelope.get().headers.get("iambus-sender"))  # type: ignore[union-attr]
        return "x"

    async with billing, orders:
        assert await orders.query(GetInvoice(1), timeout=2) == "x"
        assert senders == [f"orders@{socket.gethostname()}"]
        # From the same sender (its header, its clock), sent 30 s before that one: its
        # caller gave up long ago.
        stale = query_from(time.time() - 30, timeout=2, sender=senders[0])
        await bus.send("query.GetInvoice", stale)
        await asyncio.wait_for(billing.join(), 5)  # settled: acked, not handled
    assert handled == [1]
    [record] = [r for r in caplog.records if "expired" in r.getMessage()]
    assert record.levelname == "WARNING"
    text = record.getMessage()
    assert "query GetInvoice" in text
    assert stale.id in text
    assert "from service 'orders'" in text
    assert re.search(r"waited (29|30)\.\d\ds, its caller 2\.00s", text), text


@pytest.mark.parametrize("host", ["this-host", "another-host"])
async def test_a_backlog_of_expired_queries_is_not_handled_after_the_owner_starts(
    host: str,
) -> None:
    bus = MemoryTransport()
    handled: list[int] = []
    # Sent while billing was down, by a sender whose callers gave up after 2 s: read
    # oldest first, each is quicker than the last, and none was fresh.
    sender = f"orders@{socket.gethostname() if host == 'this-host' else host}"
    # On this host's one clock, any age tells; from another, past the skew allowed (5 min).
    ages = [20, 15, 10, 5, 3] if host == "this-host" else [700, 600, 500, 400, 350]
    for n, age in enumerate(ages):
        stale = query_from(time.time() - age, timeout=2, sender=sender)
        await bus.send(
            "query.GetInvoice", dataclasses.replace(stale, payload=b'{"order_id":%d}' % n)
        )
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        handled.append(query.order_id)
        return "x"

    async with billing:
        await asyncio.wait_for(billing.join(), 5)  # all settled: acked
    assert handled == []


async def test_a_receive_error_retrying_cannot_fix_stops_the_worker(caplog) -> None:
    from iambus.transports.memory import MemoryTransport

    class Misconfigured(MemoryTransport):
        async def receive(self, *args: Any, **kwargs: Any) -> Any:
            raise ImproperlyConfigured("memory://: no group 'g' on 'a'; declare() it first")

    billing = Dispatcher(transport=Misconfigured(), service="billing", routes=ROUTES)

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None: ...

    with pytest.raises(ImproperlyConfigured, match="declare"):
        await asyncio.wait_for(billing.run(), 10)  # stops by itself, raising the error
    with pytest.raises(DispatcherStopped):
        await billing.publish(OrderPlaced(1))  # stopped, not serving without consuming
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "retrying will not help; stopping" in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line: no traceback for a set-up error


async def test_a_receive_failing_for_good_by_a_bug_in_the_transport_stops_the_worker(
    caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iambus import worker

    class Broken(MemoryTransport):
        async def receive(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyError("offset")  # not the broker's error: a bug of the transport's

    monkeypatch.setattr(worker, "BUG_SPAN", 0.2)  # instead of 30 s
    monkeypatch.setattr(worker, "BUG_FAILURES", 3)
    billing = Dispatcher(transport=Broken(), service="billing", routes=ROUTES)

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None: ...

    with pytest.raises(KeyError, match="offset"):
        await asyncio.wait_for(billing.run(), 10)  # retried a while, then stops raising it
    [stopping] = [r for r in caplog.records if "stopping" in r.getMessage()]
    assert stopping.levelname == "ERROR"
    assert "with an error that is not the broker's (KeyError" in stopping.getMessage()


async def test_a_transient_receive_error_is_retried_and_logged_once_per_outage(caplog) -> None:
    from iambus import TransportError
    from iambus.transports.memory import MemoryTransport

    class Flaky(MemoryTransport):
        failures = 4

        async def receive(self, *args: Any, **kwargs: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise TransportError("memory://: connection reset")
            return await super().receive(*args, **kwargs)

    caplog.set_level("INFO", logger="iambus.worker")
    bus = Flaky()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    handled: list[int] = []

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    async with billing:
        await billing.publish(OrderPlaced(1))
        await asyncio.wait_for(billing.join(), 10)
    assert handled == [1]
    assert bus.failures == 0
    worker = [r for r in caplog.records if r.name == "iambus.worker"]
    warnings = [r.getMessage() for r in worker if r.levelname in ("WARNING", "ERROR")]
    assert len(warnings) == 1, warnings
    assert "receiving event.OrderPlaced failed; retrying" in warnings[0]
    assert "connection reset" in warnings[0]
    [recovered] = [r.getMessage() for r in worker if "works again" in r.getMessage()]
    found = re.search(r"after (\d+\.\d)s and 4 failed receive\(s\)", recovered)
    assert found, recovered
    assert float(found[1]) >= 0.1 + 0.2 + 0.4 + 0.8 - 0.1  # a growing backoff, waited out


class BrokenPolicy(Retry):
    """A retry policy with a bug in ``delay()`` (a subclass: refused nowhere)."""

    def delay(self, attempt: int) -> float:
        raise ZeroDivisionError("division by zero in a custom backoff")


class NonsensePolicy(Retry):
    def delay(self, attempt: int) -> float:
        return "soon"  # type: ignore[return-value]


@pytest.mark.parametrize("policy", [BrokenPolicy, NonsensePolicy])
async def test_a_retry_policy_that_fails_still_ends_in_the_dead_letters(
    policy: type[Retry], caplog
) -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()  # claim_after 30 s: a delivery left unsettled would wait that long
    billing = Dispatcher(
        transport=bus, service="billing", routes=ROUTES, retry=policy(attempts=3, backoff=0.01)
    )
    runs: list[int] = []

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        runs.append(command.order_id)
        raise ValueError("card declined")

    async with billing:
        await billing.send(ChargeCard(1, 100))
        [letter] = await parked_letters(bus, "ChargeCard")
    assert len(runs) >= 3  # the attempts allowed, each retried although the policy failed
    assert letter.failure.error_type == "builtins.ValueError"  # why the message failed
    assert letter.failure.attempts == 3
    settling = [r for r in caplog.records if "settling command ChargeCard" in r.getMessage()]
    assert len(settling) == 2  # the policy's bug is logged at each retry, with its traceback
    assert "(attempt 1 of 3) failed; retrying it" in settling[0].getMessage()
    assert settling[0].exc_info is not None


async def test_a_query_whose_failure_cannot_be_answered_is_dead_lettered(caplog) -> None:
    from iambus.transports.memory import MemoryTransport

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ is broken")

    bus = MemoryTransport(claim_after=1.0)  # a delivery left unsettled comes back, again
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    orders = Dispatcher(transport=bus, service="orders", routes=ROUTES)
    runs: list[int] = []

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        runs.append(query.order_id)
        raise Unprintable

    async with billing, orders:
        with pytest.raises(RequestTimeout):
            await orders.query(GetInvoice(5), timeout=0.5)  # no answer could be built
        [letter] = await parked_letters(bus, "GetInvoice")  # not redelivered for ever
    assert runs[0] == 5
    assert letter.failure.error_type == "builtins.RuntimeError"
    assert letter.failure.message == "raised while settling: __str__ is broken"
    assert "Unprintable" in letter.failure.traceback  # the handler's error, in the chain


async def test_a_receiver_whose_clock_is_ahead_still_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from iambus import worker
    from iambus.transports.memory import MemoryTransport

    # The receiving host's clock is a minute ahead; the query's timeout is 2 s.
    ahead = types.SimpleNamespace(time=lambda: time.time() + 60, monotonic=time.monotonic)
    monkeypatch.setattr(worker, "time", ahead)
    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    orders = Dispatcher(transport=bus, service="orders", routes=ROUTES)
    assert orders.remote is not None
    orders.remote.sender = "orders@another-host"  # one host has one clock

    @billing.queries.register(GetInvoice)
    async def get_invoice(query: GetInvoice) -> str:
        return f"invoice {query.order_id}"

    async with billing, orders:
        for n in range(3):
            assert await orders.query(GetInvoice(n), timeout=2) == f"invoice {n}"


# -- background work a broker-driven handler queues in-process ------------------------


@dataclass(frozen=True, slots=True)
class Audit(Command[None]):  # not routed: handled in-process, in the background
    order_id: int


@dataclass(frozen=True, slots=True)
class Archive(Command[None]):  # not routed: queued in turn by Audit's handler
    order_id: int


async def unacked(transport: Any, address: str, group: str) -> int:
    """Deliveries to ``group`` of ``address`` not acked yet (memory: of all groups)."""
    from iambus.transports.memory import MemoryTransport

    if isinstance(transport, MemoryTransport):
        return transport.unsettled()
    import redis.asyncio

    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        summary = await client.xpending(f"{transport.namespace}:{address}", group)
    finally:
        await client.aclose()
    return int(summary["pending"])


@pytest.mark.parametrize("bus", ["memory", "redis"], indirect=True)
async def test_a_delivery_is_acked_once_the_background_work_its_handler_queued_has_run(
    bus: Bus,
) -> None:
    gate = asyncio.Event()
    archiving = asyncio.Event()
    archived: list[int] = []
    orders = service(bus, "orders")

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        await orders.handle(Audit(command.order_id), key="audit")  # returns once queued

    @orders.commands.register(Audit)
    async def audit(command: Audit) -> None:
        await orders.handle(Archive(command.order_id))  # queued by the queued work

    @orders.commands.register(Archive)
    async def archive(command: Archive) -> None:
        archiving.set()
        await gate.wait()
        archived.append(command.order_id)

    async with orders:
        transport = orders.remote.transport  # type: ignore[union-attr]
        await orders.handle(PlaceOrder(1))  # routed: handed to the transport
        await asyncio.wait_for(archiving.wait(), 10)
        # PlaceOrder's handler returned long ago; what it queued has not finished: the
        # delivery stays unacked (a crash now redelivers it instead of losing Archive).
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert await unacked(transport, "command.PlaceOrder", "orders") == 1
            await asyncio.sleep(0.02)
        gate.set()
        deadline = time.monotonic() + 10
        while await unacked(transport, "command.PlaceOrder", "orders"):
            assert time.monotonic() < deadline, "not acked after its background work ran"
            await asyncio.sleep(0.02)
    assert archived
    assert set(archived) == {1}


@dataclass(frozen=True, slots=True)
class Quote(Command[str]):  # routed to "orders" itself: execute() is a request
    order_id: int


def quoting(*, concurrency: int, reported: list[BaseException]) -> Dispatcher:
    """An "orders" service that owns Quote; a request times out after 3 s, no retry."""
    return Dispatcher(
        transport=MemoryTransport(),
        service="orders",
        routes={**ROUTES, Quote: "orders"},
        limits=Limits(concurrency=concurrency),
        timeouts=Timeouts(request=3),
        retry=Retry(attempts=1),
        error_handler=lambda exc, message, context: reported.append(exc),
    )


async def test_a_handler_awaiting_a_command_of_its_own_service_lends_its_slot() -> None:
    # Each PlaceOrder handler holds the worker's only slots and waits for a Quote that
    # needs a slot of this same worker: lent while it waits, else all would time out.
    reported: list[BaseException] = []
    orders = quoting(concurrency=2, reported=reported)
    quotes: list[str] = []

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        quotes.append(await orders.execute(Quote(command.order_id)))

    @orders.commands.register(Quote)
    async def quote(command: Quote) -> str:
        await asyncio.sleep(0.05)
        return f"quote {command.order_id}"

    async with orders:
        for n in range(4):  # twice `concurrency`
            await orders.send(PlaceOrder(n))
        await asyncio.wait_for(orders.join(), 10)
    assert reported == []
    assert sorted(quotes) == [f"quote {n}" for n in range(4)]


async def test_background_work_awaiting_a_command_of_its_own_service_lends_the_slot() -> None:
    # The delivery holds its slot until its background work has run; that work awaits a
    # Quote, which needs the worker's only slot.
    reported: list[BaseException] = []
    orders = quoting(concurrency=1, reported=reported)
    quotes: list[str] = []

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        await orders.handle(Audit(command.order_id))  # in-process, in the background

    @orders.commands.register(Audit)
    async def audit(command: Audit) -> None:
        quotes.append(await orders.execute(Quote(command.order_id)))

    @orders.commands.register(Quote)
    async def quote(command: Quote) -> str:
        return f"quote {command.order_id}"

    async with orders:
        await orders.send(PlaceOrder(1))
        await asyncio.wait_for(orders.join(), 10)
    assert reported == []
    assert quotes == ["quote 1"]


async def test_a_delivery_whose_background_work_is_unfinished_at_stop_is_redelivered() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport(claim_after=0.3)
    runs: list[str] = []
    audits: list[str] = []
    auditing = asyncio.Event()

    def instance(label: str) -> Dispatcher:
        orders = Dispatcher(transport=bus, service="orders", routes=ROUTES)

        @orders.commands.register(PlaceOrder)
        async def place(command: PlaceOrder) -> None:
            runs.append(label)
            await orders.handle(Audit(command.order_id), key="audit")

        @orders.commands.register(Audit)
        async def audit(command: Audit) -> None:
            auditing.set()
            if label == "first":
                await asyncio.sleep(10)  # still running when the process stops
            audits.append(label)

        return orders

    first = instance("first")
    await first.__aenter__()
    await first.handle(PlaceOrder(1))
    await asyncio.wait_for(auditing.wait(), 5)
    await first.stop(timeout=0.05)
    assert bus.unsettled() == 1  # not acked: the queued Audit was lost with the stop

    second = instance("second")
    async with second:
        await asyncio.wait_for(second.join(), 5)  # redelivered, handled, acked
    assert bus.unsettled() == 0
    assert runs[0] == "first"
    assert "second" in runs
    assert audits
    assert set(audits) == {"second"}


async def test_a_failing_background_follow_up_is_reported_and_its_delivery_acked() -> None:
    # The handler succeeded; what it queued without waiting failed on its own. As for any
    # background message, the failure goes to the error_handler, and the delivery is not
    # redelivered: that would run the handler (and its other follow-ups) again.
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    reports: list[str] = []
    runs: list[int] = []

    def on_error(exc: BaseException, message: object, context: Any) -> None:
        reports.append(f"{type(message).__name__}: {exc}")

    orders = Dispatcher(
        transport=bus, service="orders", routes=ROUTES, retry=FAST, error_handler=on_error
    )

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        runs.append(command.order_id)
        await orders.handle(Audit(command.order_id))

    @orders.commands.register(Audit)
    async def audit(command: Audit) -> None:
        raise ConnectionError("audit log down")

    async with orders:
        await orders.handle(PlaceOrder(1))
        await asyncio.wait_for(orders.join(), 5)
        assert bus.unsettled() == 0
    assert runs == [1]
    assert reports == ["Audit: audit log down"]
    assert await bus.dead_letters() == []


async def test_a_transport_handler_waits_for_room_in_a_full_engine() -> None:
    from iambus.transports.memory import MemoryTransport

    bus = MemoryTransport()
    orders = Dispatcher(
        transport=bus, service="orders", routes=ROUTES, limits=Limits(background=1, max_pending=2)
    )
    gate = asyncio.Event()
    handling = asyncio.Event()
    queued = asyncio.Event()

    @orders.commands.register(PlaceOrder)
    async def place(command: PlaceOrder) -> None:
        handling.set()
        await orders.handle(Audit(command.order_id))  # the engine is full: waits
        queued.set()

    @orders.commands.register(Audit)
    async def audit(command: Audit) -> None:
        await gate.wait()

    async with orders:
        await orders.handle(Audit(-1))
        await orders.handle(Audit(-2))  # max_pending reached
        await orders.handle(PlaceOrder(1))
        await asyncio.wait_for(handling.wait(), 5)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            assert not queued.is_set(), "admitted over max_pending"
            await asyncio.sleep(0.02)
        gate.set()  # room: the handler's send goes in, the delivery is acked
        await asyncio.wait_for(queued.wait(), 5)
        await asyncio.wait_for(orders.join(), 5)
        assert bus.unsettled() == 0


async def test_stop_keeps_one_deadline_when_a_handler_a_receive_and_close_hang(caplog) -> None:
    from iambus.transports.memory import MemoryTransport

    hanging = asyncio.Event()  # set: receives hang, as a driver read ignoring its cancel
    released = asyncio.Event()  # set at the end: whatever still hangs ends
    receive_hangs = asyncio.Event()  # a receive hangs now

    async def hang() -> None:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue  # ignores its cancellation

    class Stuck(MemoryTransport):
        async def receive(self, *args: Any, **kwargs: Any) -> Any:
            if not hanging.is_set():
                return await super().receive(*args, **kwargs)
            receive_hangs.set()
            await hang()
            return []

        async def close(self) -> None:
            await hang()

    billing = Dispatcher(transport="memory://", service="billing", routes=ROUTES)
    assert billing.remote is not None
    assert billing.remote.owned  # made from a URL: closed by the stop
    billing.remote.transport = Stuck()
    started = asyncio.Event()

    @billing.events.register(OrderPlaced)
    async def stubborn(event: OrderPlaced) -> None:
        started.set()
        hanging.set()
        await hang()

    await billing.__aenter__()
    await billing.publish(OrderPlaced(1))
    await asyncio.wait_for(started.wait(), 5)
    # (3.12+: the handler starts eagerly, in the receive loop's turn: the loop's next
    # receive comes after this wakes up.)
    await asyncio.wait_for(receive_hangs.wait(), 5)
    timeout = 1.0
    began = time.monotonic()
    try:
        # Each wait once had its own bound, or none: the receive loop 3 s, the handlers
        # the timeout, then their cancellation and the transport's close without any.
        await asyncio.wait_for(billing.stop(timeout=timeout), timeout + 20)
        took = time.monotonic() - began
    finally:
        released.set()
    assert timeout <= took < timeout + 3, f"stop({timeout}) took {took:.1f}s"
    assert "1 handler(s) did not finish in time" in caplog.text
    assert "2 cancelled handler(s) or receive loop(s) did not end; left behind" in caplog.text
    assert "closing the transport memory:// took too long; left behind" in caplog.text


async def test_stop_keeps_its_deadline_when_an_announcement_in_the_registry_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from iambus import worker

    announcing = asyncio.Event()
    released = asyncio.Event()

    class Stuck(MemoryTransport):
        announced = 0

        async def announce(self, instance: Instance) -> None:
            self.announced += 1
            if self.announced == 1:
                return await super().announce(instance)
            announcing.set()
            while not released.is_set():  # the refresh hangs, ignoring its cancellation
                with contextlib.suppress(asyncio.CancelledError):
                    await released.wait()

    monkeypatch.setattr(worker, "ANNOUNCE_TTL", 0.3)  # announced again after 0.1 s
    billing = Dispatcher(transport=Stuck(), service="billing", routes=ROUTES)

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None: ...

    await billing.__aenter__()
    await asyncio.wait_for(announcing.wait(), 5)
    began = time.monotonic()
    try:
        await asyncio.wait_for(billing.stop(timeout=0.5), 20)
        took = time.monotonic() - began
    finally:
        released.set()
    assert took < 0.5 + 2 * worker.STOP_GRACE + 1, f"stop(0.5) took {took:.1f}s"


async def test_a_receive_ending_after_the_stop_starts_no_handler() -> None:
    hanging = asyncio.Event()  # set: the next receive hangs, ignoring its cancellation
    stuck = asyncio.Event()
    released = asyncio.Event()

    class Slow(MemoryTransport):
        async def receive(self, *args: Any, **kwargs: Any) -> Any:
            if hanging.is_set():
                stuck.set()
                while not released.is_set():
                    with contextlib.suppress(asyncio.CancelledError):
                        await released.wait()
            return await super().receive(*args, **kwargs)

    bus = Slow()
    billing = Dispatcher(
        transport=bus, service="billing", routes=ROUTES, timeouts=Timeouts(shutdown=None)
    )
    ran = asyncio.Event()

    @billing.events.register(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        ran.set()

    await billing.__aenter__()
    hanging.set()
    await asyncio.wait_for(stuck.wait(), 5)
    await billing.publish(OrderPlaced(1))
    assert billing._worker is not None
    loops = list(billing._worker._loops)
    await asyncio.wait_for(billing.stop(), 20)  # gives up on the loop after a few seconds
    released.set()  # the receive ends now, with the event published above
    await asyncio.wait(loops, timeout=5)
    with pytest.raises(TimeoutError):  # an observation window: nothing may start in it
        await asyncio.wait_for(ran.wait(), 0.5)
    assert bus.unsettled() == 1  # not handled: redelivered later


async def test_a_stopped_instance_gives_back_its_key_at_once_on_a_shared_transport(
    bus: Bus,
) -> None:
    # Two instances of one service on one transport object that neither opened: a stop
    # does not close it. The first holds a key when it stops; the second gets the key's
    # messages at once, not after claim_after (made far longer than the test, where a
    # transport reclaims after it: on Kafka it is the session timeout, and a new group's
    # first join on the test broker waits half of it).
    transport = bus.transport()
    if Capability.RECLAIM in transport.capabilities:
        transport.claim_after = 30.0  # type: ignore[attr-defined]
    seen: list[tuple[str, int]] = []  # (instance, seq), every delivery
    started = asyncio.Event()
    both = asyncio.Event()

    def instance(name: str) -> Dispatcher:
        seats = Dispatcher(transport=transport, service="seats", routes=ROUTES, retry=FAST)

        @seats.events.register(SeatBooked)
        async def assign(event: SeatBooked) -> None:
            seen.append((name, event.seq))
            if name == "first":
                started.set()
                await asyncio.sleep(60)  # cancelled by the stop
            elif {seq for who, seq in seen if who == "second"} >= {0, 1}:
                both.set()

        return seats

    first, second = instance("first"), instance("second")
    await first.__aenter__()
    await first.publish(SeatBooked("FL-1", 0), key="FL-1")
    await first.publish(SeatBooked("FL-1", 1), key="FL-1")
    await asyncio.wait_for(started.wait(), 10)
    async with second:
        began = time.monotonic()
        await first.stop(timeout=0.2)
        await asyncio.wait_for(both.wait(), 10)
        took = time.monotonic() - began
    assert seen[0] == ("first", 0)
    again = [seq for who, seq in seen if who == "second"]
    assert again[:2] == [0, 1], f"the key's order was lost: {seen}"
    assert took < 10, f"the key passed on after {took:.1f}s, not at once"


# -- the slot a delivery lends while it awaits its own service ------------------------


class _Places:
    """What a _Slot uses of its worker: the places (semaphore) and the fetch count."""

    def __init__(self, places: int) -> None:
        self._running = asyncio.Semaphore(places)
        self._free = places - 1  # one delivery fetched: the slot's

    def _release(self, slots: int) -> None:
        self._free += slots


async def _lent_until(slot: Any, answered: asyncio.Event) -> None:
    async with slot.lend():  # as Remote.request does while it waits for its own service
        await answered.wait()


@pytest.mark.parametrize("places", [1, 2])
async def test_two_tasks_of_a_delivery_taking_its_slot_back_take_one_place(places: int) -> None:
    from iambus.worker import _Slot

    worker = _Places(places)
    slot = _Slot(worker)  # type: ignore[arg-type]
    await slot.take()
    first, second = asyncio.Event(), asyncio.Event()
    one = asyncio.create_task(_lent_until(slot, first))
    await until(lambda: slot._lent == 1, 5, "the first task to lend the slot")
    for _ in range(places):  # other deliveries take every free place
        await worker._running.acquire()
    first.set()
    await until(lambda: slot._taking is not None, 5, "the first task to wait for a place")
    two = asyncio.create_task(_lent_until(slot, second))
    await until(lambda: slot._lent == 1, 5, "the second task to lend the slot")
    second.set()
    await until(lambda: slot._lent == 0, 5, "the second to ask for its place back too")
    for _ in range(places):
        worker._running.release()  # the other deliveries end
    async with asyncio.timeout(5):  # one place is enough for both: no hang
        await asyncio.gather(one, two)
    slot.end()
    assert worker._running._value == places, "a place in concurrency was lost for good"
    assert worker._free == places


async def test_a_delivery_ending_while_its_background_work_waits_for_a_place_keeps_none() -> None:
    from iambus.worker import _Slot

    worker = _Places(1)
    slot = _Slot(worker)  # type: ignore[arg-type]
    await slot.take()
    answered = asyncio.Event()
    job = asyncio.create_task(_lent_until(slot, answered))
    await until(lambda: slot._lent == 1, 5, "the job to lend the slot")
    await worker._running.acquire()  # another delivery runs in the lent place
    answered.set()
    await until(lambda: slot._taking is not None, 5, "the job to wait for a place")
    slot.end()  # the handler failed: its delivery is settled, the job goes on
    worker._running.release()  # the other delivery ends
    async with asyncio.timeout(5):
        await job
    assert worker._running._value == 1, "the ended delivery kept a place"


@dataclass(frozen=True, slots=True)
class Boom(Command[str]):
    n: int


class _RefusingReplies(MemoryTransport):
    """A broker that takes messages but refuses this worker's answers (an ACL without
    the reply channel, an answer over the broker's size limit)."""

    async def reply(self, to: str, envelope: Envelope) -> None:
        raise TransportError("memory://: reply refused")


async def test_a_failing_command_whose_error_answer_is_refused_is_still_dead_lettered() -> None:
    bus = _RefusingReplies(claim_after=0.3)
    routes: dict[type | str, str] = {Boom: "svc"}
    svc = Dispatcher(transport=bus, service="svc", routes=routes, retry=Retry(attempts=1))
    shop = Dispatcher(transport=bus, service="shop", routes=routes)
    runs: list[int] = []

    @svc.commands.register(Boom)
    async def boom(command: Boom) -> str:
        runs.append(command.n)
        raise ValueError("always")

    async with svc, shop:
        with pytest.raises(RequestTimeout):  # its answer could not reach it
            await shop.execute(Boom(1), timeout=0.5)
        deadline = time.monotonic() + 10
        while not (dead := await bus.dead_letters()):
            assert time.monotonic() < deadline, f"not dead-lettered; ran {len(runs)} times"
            await asyncio.sleep(0.05)
        ran = len(runs)
        await asyncio.sleep(1.0)  # three claim_afters: it must not come back
        assert len(runs) == ran, "a dead-lettered command ran again"
    assert [letter.failure.error_type for letter in dead] == ["builtins.ValueError"]
