"""The sending side: envelopes, typed results, remote errors, timeouts."""

import asyncio
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, TypeVar, assert_type

import pytest

from iambus import (
    Command,
    Dispatcher,
    DispatcherStopped,
    ImproperlyConfigured,
    Query,
    RemoteError,
    RequestTimeout,
    Retry,
    SerializationError,
)
from iambus.envelope import Envelope
from iambus.remote import current_envelope
from iambus.transports import Instance
from iambus.transports.memory import MemoryTransport

from .conftest import Bus, require


@dataclass(frozen=True, slots=True)
class Holiday:
    day: date
    name: str


@dataclass(frozen=True, slots=True)
class GetHolidays(Query[list[Holiday]]):
    year: int


@dataclass(frozen=True, slots=True)
class Untyped:
    n: int


async def test_query_results_are_decoded_into_the_declared_type() -> None:
    transport = MemoryTransport()
    routes = {GetHolidays: "calendar", Untyped: "calendar"}
    server = Dispatcher(transport=transport, service="calendar", routes=routes)
    client = Dispatcher(transport=transport, service="web", routes=routes)

    @server.queries.register(GetHolidays)
    async def holidays(query: GetHolidays) -> list[Holiday]:
        return [Holiday(date(query.year, 12, 25), "Christmas")]

    @server.queries.register(Untyped)
    async def untyped(query: Untyped) -> dict[str, int]:
        return {"n": query.n}

    async with server:
        assert await client.query(GetHolidays(2026)) == [Holiday(date(2026, 12, 25), "Christmas")]
        assert await client.query(Untyped(3)) == {"n": 3}  # no Query[R]: plain JSON
        # handle(..., wait_for_response=True) of a routed query is the same request
        assert await client.handle(Untyped(4), wait_for_response=True) == {"n": 4}


async def test_envelopes_carry_key_headers_and_a_deadline_for_queries() -> None:
    transport = MemoryTransport()
    client = Dispatcher(transport=transport, service="web", routes={Untyped: "calendar"})
    await transport.declare("query.Untyped", "calendar", from_start=True)
    asking = asyncio.create_task(client.query(Untyped(1), key="k-1", timeout=5))
    [delivery] = await transport.receive("query.Untyped", "calendar", consumer="c", limit=1, wait=2)
    envelope = delivery.envelope
    assert (envelope.name, envelope.key, envelope.correlation_id) == ("Untyped", "k-1", envelope.id)
    assert float(envelope.headers["deadline"]) > envelope.created_at
    await transport.reply(
        envelope.reply_to or "",
        Envelope(
            name="x", payload=b"7", correlation_id=envelope.id, headers={"iambus-status": "ok"}
        ),
    )
    assert await asking == 7


async def test_a_local_query_timeout_is_a_request_timeout() -> None:
    dp = Dispatcher()

    @dp.queries.register(Untyped)
    async def slow(query: Untyped) -> int:
        await asyncio.sleep(1)
        return 1

    with pytest.raises(RequestTimeout, match=r"no answer within 0\.05s"):
        await dp.query(Untyped(1), timeout=0.05)

    @dataclass
    class Raises:
        pass

    dp2 = Dispatcher()

    @dp2.queries.register(Raises)
    async def raises(query: Raises) -> int:
        raise TimeoutError("the handler's own")

    with pytest.raises(TimeoutError, match="the handler's own") as info:
        await dp2.query(Raises(), timeout=5)
    assert not isinstance(info.value, RequestTimeout)


def test_a_routed_event_handler_needs_a_service_name() -> None:
    dp = Dispatcher(transport="memory://", routes={Untyped: "calendar"})

    @dp.events.register(Untyped)
    async def on_untyped(event: Untyped) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"need a service name .*service=\.\.\."):
        dp.start()


def test_service_must_be_a_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="service must be a non-empty name"):
        Dispatcher(transport="memory://", service="")


def test_no_envelope_outside_a_handler() -> None:
    assert current_envelope.get() is None


# -- location transparency: a routed command answers like a local one ----------------


@dataclass(frozen=True, slots=True)
class Receipt:
    charge_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class Charge(Command[Receipt]):
    order_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class Charged:
    order_id: int


@dataclass(frozen=True, slots=True)
class Ship(Command[None]):
    order_id: int


@dataclass(frozen=True, slots=True)
class Lookup(Query[int]):
    sku: str


class Declined(Exception):
    pass


ROUTES: dict[type | str, str] = {Charge: "billing", Charged: "billing", Ship: "billing"}
QUICK = Retry(attempts=3, backoff=0.05, jitter=False)


def pair(bus: Bus, **options: Any) -> tuple[Dispatcher, Dispatcher]:
    """billing (owns the commands) and shop (sends them), each on a transport of its own."""
    options.setdefault("retry", QUICK)
    billing = Dispatcher(transport=bus.transport(), service="billing", routes=ROUTES, **options)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES, **options)
    return billing, shop


async def test_execute_of_a_routed_command_returns_its_result(bus: Bus) -> None:
    billing, shop = pair(bus)

    @billing.commands.register(Charge)
    async def charge(command: Charge) -> Receipt:
        return Receipt(f"ch-{command.order_id}", command.amount)

    async with billing, shop:
        # Decoded into the R of Command[R], as a local handler's result would be.
        assert await shop.execute(Charge(1, 500)) == Receipt("ch-1", 500)
        assert await shop.execute(Charge(2, 700), key="order-2") == Receipt("ch-2", 700)
        assert await shop.handle(Charge(3, 900), wait_for_response=True) == Receipt("ch-3", 900)


async def test_execute_of_a_routed_command_raises_its_error_once_retries_are_spent(
    bus: Bus,
) -> None:
    billing, shop = pair(bus)
    tries: Counter[int] = Counter()

    @billing.commands.register(Charge)
    async def charge(command: Charge) -> Receipt:
        tries[command.order_id] += 1
        if command.order_id == 1 or tries[command.order_id] == 1:
            raise Declined(f"card declined for order {command.order_id}")
        return Receipt(f"ch-{command.order_id}", command.amount)

    async with billing, shop:
        with pytest.raises(RemoteError, match=r"after 3 attempt\(s\), dead-lettered") as info:
            await shop.execute(Charge(1, 500))
        assert info.value.error_type == f"{__name__}.Declined"
        assert info.value.remote_message == "card declined for order 1"
        assert tries[1] >= QUICK.attempts  # the error came with the last attempt
        # A command that fails once and then succeeds answers with its result: the
        # first failure is not the caller's to see (it would be a lie).
        assert await shop.execute(Charge(2, 700)) == Receipt("ch-2", 700)
        assert tries[2] >= 2


async def test_a_routed_command_that_returns_an_event_for_command_none_gives_none(
    bus: Bus,
) -> None:
    billing, shop = pair(bus)
    seen: list[int] = []

    @billing.commands.register(Ship)
    async def ship(command: Ship) -> Charged:
        return Charged(command.order_id)  # published (routed), and not the caller's result

    @billing.events.register(Charged)
    async def on_charged(event: Charged) -> None:
        seen.append(event.order_id)

    async with billing, shop:
        assert await shop.execute(Ship(4)) is None
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline, "the event the command returned was not sent"
            await asyncio.sleep(0.02)


async def test_a_routed_command_nobody_answers_in_time_is_still_carried_out() -> None:
    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    shop = Dispatcher(transport=bus, service="shop", routes=ROUTES)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @billing.commands.register(Charge)
    async def charge(command: Charge) -> Receipt:
        done.set_result(command.order_id)
        return Receipt("ch", command.amount)

    with pytest.raises(RequestTimeout, match="may still be carried out"):
        await shop.execute(Charge(5, 100), timeout=0.05)  # billing is not running
    async with billing:  # durable: the command waited for its owner
        assert await asyncio.wait_for(done, 5) == 5
    await shop.stop()


async def test_a_routed_command_outlives_the_worker_that_took_it(bus: Bus) -> None:
    if bus.kind == "memory":
        pytest.skip("one MemoryTransport is the broker itself: closing it loses everything")
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    crashing, taking_over = bus.transport(), bus.transport()
    for transport in (crashing, taking_over):
        await transport.open()
        await transport.declare("command.Charge", "billing", from_start=True)
    async with shop:
        asking = asyncio.create_task(shop.execute(Charge(9, 1), timeout=30))
        deadline = time.monotonic() + 10
        taken: list[Any] = []
        while not taken:  # the worker that takes it, then dies without settling it
            assert time.monotonic() < deadline, "the command never arrived"
            taken = list(
                await crashing.receive("command.Charge", "billing", consumer="a", limit=1, wait=0.5)
            )
        await crashing.close()
        again: list[Any] = []
        while not again:  # another worker gets it once claim_after has passed
            assert time.monotonic() < deadline + 10, "the command was lost with its worker"
            again = list(
                await taking_over.receive(
                    "command.Charge", "billing", consumer="b", limit=1, wait=0.5
                )
            )
        [delivery] = again
        assert delivery.envelope.id == taken[0].envelope.id
        assert delivery.envelope.reply_to  # and it still knows where to answer
        await taking_over.reply(
            delivery.envelope.reply_to,
            Envelope(
                name="Charge.result",
                payload=b'{"charge_id":"ch-9","amount":1}',
                correlation_id=delivery.envelope.id,
                headers={"iambus-status": "ok"},
            ),
        )
        await delivery.ack()
        assert await asyncio.wait_for(asking, 10) == Receipt("ch-9", 1)


async def test_send_returns_once_the_broker_has_it_without_waiting(bus: Bus) -> None:
    billing, shop = pair(bus)
    handled: asyncio.Future[Charge] = asyncio.get_running_loop().create_future()

    @billing.commands.register(Charge)
    async def charge(command: Charge) -> Receipt:
        handled.set_result(command)
        return Receipt("ch", command.amount)

    async with shop:
        assert await shop.send(Charge(6, 100)) is None  # billing is not even running
        assert not handled.done()
        async with billing:
            assert await asyncio.wait_for(handled, 10) == Charge(6, 100)


async def test_send_without_a_transport_queues_like_handle() -> None:
    dp = Dispatcher()
    handled: list[int] = []

    @dp.commands.register(Charge)
    async def charge(command: Charge) -> Receipt:
        handled.append(command.order_id)
        return Receipt("ch", command.amount)

    async with dp:
        await dp.send(Charge(7, 1), id="ignored-in-process")
        await dp.join()
    assert handled == [7]


async def test_a_query_is_not_sent() -> None:
    dp = Dispatcher(transport="memory://", service="shop", routes={Lookup: "catalog"})
    local = Dispatcher()

    @local.queries.register(Lookup)
    async def lookup(query: Lookup) -> int:
        return 1

    for sender in (dp, local):
        with pytest.raises(TypeError, match=r"is a query.*dp\.query"):
            await sender.send(Lookup("tea"))
        await sender.stop()


async def test_a_query_to_another_service_needs_a_transport_with_request_reply() -> None:
    class NoRequests(MemoryTransport):
        request = reply = None  # no Requester: the optional part taken away

    dp = Dispatcher(transport=NoRequests(), service="shop", routes={Lookup: "catalog"})
    async with dp:
        with pytest.raises(
            ImproperlyConfigured,
            match=r"memory://: NoRequests has no request/reply \(iambus\.transports\.Requester"
            r"\), so a command or query cannot be sent to another service and answered",
        ):
            await dp.query(Lookup("tea"))


# -- resending an envelope: the same id ---------------------------------------------


async def test_send_with_an_id_or_an_envelope_keeps_its_id(bus: Bus) -> None:
    transport = bus.transport()
    shop = Dispatcher(transport=transport, service="shop", routes=ROUTES)
    await transport.open()
    await transport.declare("command.Charge", "billing", from_start=True)
    given = str(uuid.uuid4())
    async with shop:
        await shop.send(Charge(8, 1), id=given, key="order-8")
        ready = Envelope(name="Charge", payload=b'{"order_id":9,"amount":2}')
        await shop.send(ready)  # an envelope kept from a send that raised: sent as it is
        got: list[Envelope] = []
        deadline = time.monotonic() + 10
        while len(got) < 2:
            assert time.monotonic() < deadline, f"got only {got}"
            deliveries = await transport.receive(
                "command.Charge", "billing", consumer="c", limit=2, wait=0.5
            )
            for delivery in deliveries:
                got.append(delivery.envelope)
                await delivery.ack()
    by_id = {envelope.id: envelope for envelope in got}
    assert set(by_id) == {given, ready.id}
    assert by_id[given].key == "order-8"
    assert by_id[ready.id].payload == ready.payload


async def test_a_resend_of_the_same_id_is_stored_once_on_nats() -> None:
    require("nats")
    from iambus.transports.nats import NatsTransport

    transport = NatsTransport("nats://127.0.0.1:4222", namespace=f"t{uuid.uuid4().hex[:10]}")
    shop = Dispatcher(transport=transport, service="shop", routes=ROUTES)
    try:
        await transport.open()
        await transport.declare("command.Charge", "billing", from_start=True)
        async with shop:
            await shop.send(Charge(1, 1), id="resent-1")
            await shop.send(Charge(1, 1), id="resent-1")  # within the duplicate window
            await shop.send(Charge(2, 2))  # stored after any duplicate: read up to it
            ids: list[str] = []
            deadline = time.monotonic() + 10
            while not ids or ids[-1] == "resent-1":
                assert time.monotonic() < deadline, f"got only {ids}"
                for delivery in await transport.receive(
                    "command.Charge", "billing", consumer="c", limit=3, wait=0.5
                ):
                    ids.append(delivery.envelope.id)
                    await delivery.ack()
        assert ids[0] == "resent-1"
        assert ids.count("resent-1") == 1
    finally:
        await transport.open()
        await transport.destroy()
        await transport.close()


@pytest.mark.parametrize(
    "routes", [{f"{__name__}.*": "billing"}, {"Ship": "billing"}], ids=["pattern", "name"]
)
async def test_a_kept_envelope_of_a_class_routed_by_pattern_is_resent_in_a_new_process(
    routes: dict[type | str, str],
) -> None:
    # Once only classes routed by class, or sent once by this process, were known: an
    # envelope kept across a restart was refused until its class happened to be sent.
    transport = MemoryTransport()
    shop = Dispatcher(transport=transport, service="shop", routes=routes)
    billing = Dispatcher(transport=transport, service="billing", routes=routes)
    shipped: list[int] = []

    @billing.commands.register(Ship)
    async def ship(command: Ship) -> None:
        shipped.append(command.order_id)

    kept = Envelope(name="Ship", payload=b'{"order_id": 4}')  # stored by an earlier process
    async with shop:
        await shop.send(kept)
        async with billing:
            await asyncio.wait_for(billing.join(), 5)
    assert set(shipped) == {4}  # at least once


async def test_an_envelope_routed_by_name_whose_class_is_not_imported_says_so() -> None:
    dp = Dispatcher(transport="memory://", service="shop", routes={"Refund": "billing"})
    with pytest.raises(
        ImproperlyConfigured, match=r"by name.*once its module is imported.*id='e-1'"
    ):
        await dp.send(Envelope(name="Refund", payload=b"{}", id="e-1"))
    await dp.stop()


async def test_an_envelope_of_a_name_not_routed_here_is_refused() -> None:
    dp = Dispatcher(transport="memory://", service="shop", routes=ROUTES)
    with pytest.raises(ImproperlyConfigured, match=r"'Refund'.*id='e-1'"):
        await dp.send(Envelope(name="Refund", payload=b"{}", id="e-1"))
    with pytest.raises(TypeError, match="neither key= nor id="):
        await dp.send(Envelope(name="Charge", payload=b"{}"), id="e-2")
    with pytest.raises(TypeError, match="id must be a non-empty string"):
        await dp.send(Charge(1, 1), id="")
    await dp.stop()


@dataclass(frozen=True, slots=True)
class Export(Command[Any]):
    n: int


@dataclass(frozen=True, slots=True)
class Count(Command[int]):
    n: int


async def test_a_command_result_that_does_not_travel_is_an_error_and_not_a_retry() -> None:
    bus = MemoryTransport()
    routes: dict[type | str, str] = {Export: "files", Count: "files"}
    files = Dispatcher(transport=bus, service="files", routes=routes, retry=QUICK)
    app = Dispatcher(transport=bus, service="app", routes=routes)
    runs: Counter[str] = Counter()
    reported: list[BaseException] = []
    files.error_handler = lambda exc, message, context: reported.append(exc)

    @files.commands.register(Export)
    async def export(command: Export) -> object:
        runs["export"] += 1
        return object()  # done, but no codec can encode the result

    @files.commands.register(Count)
    async def count(command: Count) -> str:
        runs["count"] += 1
        return "many"  # not the int that Count declares

    async with files:
        with pytest.raises(RemoteError) as info:
            await app.execute(Export(1))
        assert info.value.error_type == "iambus.errors.SerializationError"
        with pytest.raises(SerializationError, match="was carried out by service 'files'"):
            await app.execute(Count(1))
    await app.stop()
    assert runs == {"export": 1, "count": 1}  # neither was run again
    assert [type(exc) for exc in reported] == [SerializationError]


@pytest.mark.parametrize("bad", ["5", -1, 0, math.inf])
async def test_a_bad_per_call_timeout_is_refused_before_the_command_is_sent(bad: Any) -> None:
    # Once the command was sent first: "5" raised a bare TypeError after the broker had
    # stored it (a caller who fixed the call and retried ran it twice), -1 sent it and
    # raised RequestTimeout at once.
    transport = MemoryTransport()
    routes: dict[type | str, str] = {**ROUTES, Lookup: "billing"}
    shop = Dispatcher(transport=transport, service="shop", routes=routes)
    billing = Dispatcher(transport=transport, service="billing", routes=routes)
    shipped: list[int] = []
    asked: list[str] = []

    @billing.commands.register(Ship)
    async def ship(command: Ship) -> None:
        shipped.append(command.order_id)

    @billing.queries.register(Lookup)
    async def lookup(query: Lookup) -> int:
        asked.append(query.sku)
        return 1

    async with shop:
        with pytest.raises(ImproperlyConfigured, match=r"execute\(timeout=\.\.\.\) must be"):
            await shop.execute(Ship(1), timeout=bad)
        with pytest.raises(ImproperlyConfigured, match=r"query\(timeout=\.\.\.\) must be"):
            await shop.query(Lookup("a"), timeout=bad)
        async with billing:
            await asyncio.wait_for(billing.join(), 5)
    assert shipped == []
    assert asked == []


Traced_R = TypeVar("Traced_R")


class Traced(Command[Traced_R], Generic[Traced_R]):
    """A project's own generic base for its commands (tracing, auth...)."""


@dataclass(frozen=True, slots=True)
class Pay(Traced[Receipt]):
    amount: int


async def test_a_routed_command_through_a_generic_base_returns_its_declared_type() -> None:
    # Once the R of Traced's own Command[T] was read: the TypeVar, so the answer came
    # back as a dict where mypy and the in-process path say Receipt.
    transport = MemoryTransport()
    shop = Dispatcher(transport=transport, service="shop", routes={Pay: "billing"})
    billing = Dispatcher(transport=transport, service="billing", routes={Pay: "billing"})

    @billing.commands.register(Pay)
    async def pay(command: Pay) -> Receipt:
        return Receipt("c1", command.amount)

    async with billing, shop:
        result = await shop.execute(Pay(3), timeout=5)
        assert_type(result, Receipt)
    assert result == Receipt("c1", 3)


class SlowRegistry(MemoryTransport):
    """A registry read that is slow (a broker under load): instances() takes ``delay``."""

    def __init__(self, delay: float = 1.5) -> None:
        super().__init__()
        self.delay = delay
        self.reading = asyncio.Event()

    async def instances(self) -> list[Instance]:
        self.reading.set()
        await asyncio.sleep(self.delay)
        return await super().instances()


async def test_a_request_timeout_is_raised_within_the_timeout_asked_for() -> None:
    # Once the registry was read after the transport's timeout, for up to 2 s more to
    # word the error: a 0.2 s timeout raised after 1.7 s.
    shop = Dispatcher(transport=SlowRegistry(), service="shop", routes=ROUTES)
    async with shop:
        began = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"no answer .* is a worker of 'billing' running"):
            await shop.execute(Ship(1), timeout=0.2)
        took = time.monotonic() - began
    assert took < 1.0, f"RequestTimeout after {took:.2f}s for a 0.2 s timeout"


async def test_a_request_timeout_says_what_a_registry_slower_than_its_margin_shows() -> None:
    # The registry is read from halfway to the timeout: a read of 0.3 s is too slow to
    # start once the timeout passed, and is ready by then.
    shop = Dispatcher(transport=SlowRegistry(0.3), service="shop", routes=ROUTES)
    async with shop:
        with pytest.raises(RequestTimeout, match="no live instance of service 'billing'"):
            await shop.execute(Ship(1), timeout=1.2)


async def test_closing_neither_cancels_a_request_reading_the_registry_nor_reopens() -> None:
    # Once close() cancelled the registry read a timed-out request shared (the caller
    # got a CancelledError it never asked for), and a send during the close opened the
    # transport again.
    transport = SlowRegistry()
    shop = Dispatcher(transport=transport, service="shop", routes=ROUTES)
    await shop.__aenter__()
    remote = shop.remote
    assert remote is not None
    census = asyncio.create_task(remote.handlers_of("command.Ship", "billing"))
    await asyncio.wait_for(transport.reading.wait(), 5)
    closing = asyncio.create_task(remote.close())
    await asyncio.sleep(0)
    with pytest.raises(DispatcherStopped, match="being closed"):
        await remote.send("command", Ship(1), None)
    await asyncio.wait_for(closing, 5)
    assert await asyncio.wait_for(census, 5) is None  # could not be read: no error
    await shop.stop()


async def test_a_command_none_handler_returning_a_value_that_does_not_encode_answers() -> None:
    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES)
    shop = Dispatcher(transport=bus, service="shop", routes=ROUTES)
    shipped: list[int] = []

    @billing.commands.register(Ship)
    async def ship(command: Ship) -> None:
        shipped.append(command.order_id)
        return object()  # type: ignore[return-value]  # an ORM row, say: no codec takes it

    async with billing, shop:
        # Command[None]: the value is discarded, in-process and routed alike.
        assert await shop.execute(Ship(1)) is None  # type: ignore[func-returns-value]
    assert shipped == [1]


@dataclass(frozen=True, slots=True)
class Report(Command[str]):
    n: int


@pytest.mark.parametrize("bus", ["nats"], indirect=True)
async def test_a_command_whose_answer_the_broker_refuses_is_not_run_again(bus: Bus) -> None:
    routes: dict[type | str, str] = {Report: "reports"}
    reports = Dispatcher(transport=bus.transport(), service="reports", routes=routes, retry=QUICK)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=routes)
    runs: list[int] = []
    reported: list[BaseException] = []
    reports.error_handler = lambda exc, message, context: reported.append(exc)

    @reports.commands.register(Report)
    async def report(command: Report) -> str:
        runs.append(command.n)  # a side effect: a file written, a mail sent...
        return "x" * 2_000_000 if command.n == 1 else "small"  # over NATS's max_payload

    async with reports, shop:
        with pytest.raises(RemoteError, match="was carried out, but its answer could not be"):
            await shop.execute(Report(1), timeout=5)
        # Acked: not redelivered after claim_after (1 s here), nor dead-lettered.
        await asyncio.sleep(2.5)  # an observation window: nothing may happen in it
        assert await shop.execute(Report(2), timeout=5) == "small"
    assert runs == [1, 2]
    assert [type(exc).__name__ for exc in reported] == ["MessageRefused"]  # a TransportError
