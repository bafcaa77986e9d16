"""Spans per the OpenTelemetry messaging conventions, against the real brokers."""

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from iambus import Dispatcher, Query, Retry
from iambus.database import Database
from iambus.tracing import CANCELLED, DELIVERY_ATTEMPT, Tracing
from iambus.transports.memory import MemoryTransport

from .conftest import Bus

SYSTEMS = {
    "memory": "memory",
    "redis": "redis",
    "rabbitmq": "rabbitmq",
    "nats": "nats",
    "kafka": "kafka",
}


@dataclass(frozen=True, slots=True)
class GetBalance(Query[int]):
    account: int


@dataclass(frozen=True, slots=True)
class Deposited:
    account: int


class Broken(Exception):
    pass


ROUTES: dict[type | str, str] = {GetBalance: "billing", Deposited: "billing"}
TWICE = Retry(attempts=2, backoff=0.01, jitter=False)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def provider_of(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def spans_until(exporter: InMemorySpanExporter, *names: str) -> dict[str, ReadableSpan]:
    """The finished spans once every one of ``names`` has ended (the first of each)."""
    deadline = time.monotonic() + 15
    while True:
        finished = exporter.get_finished_spans()
        if all(any(s.name == n for s in finished) for n in names):
            by_name: dict[str, ReadableSpan] = {}
            for span in finished:
                by_name.setdefault(span.name, span)
            return by_name
        assert time.monotonic() < deadline, f"spans so far: {[s.name for s in finished]}"
        await asyncio.sleep(0.02)


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


async def test_a_query_across_two_services_is_one_trace(
    bus: Bus, exporter: InMemorySpanExporter
) -> None:
    provider = provider_of(exporter)
    billing = Dispatcher(transport=bus.transport(), service="billing", routes=ROUTES)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    billing.instrument(Tracing(tracer_provider=provider, acks=True))
    shop.instrument(Tracing(tracer_provider=provider))

    @billing.queries.register(GetBalance)
    async def balance(query: GetBalance) -> int:
        return query.account * 10

    tracer = provider.get_tracer("test")
    async with billing, shop:
        with tracer.start_as_current_span("checkout") as caller:
            assert await shop.query(GetBalance(4)) == 40
        spans = await spans_until(
            exporter, "checkout", "request query.GetBalance", "process query.GetBalance", "reply"
        )
        spans |= await spans_until(exporter, "ack query.GetBalance")

    request = spans["request query.GetBalance"]
    process = spans["process query.GetBalance"]
    reply, ack = spans["reply"], spans["ack query.GetBalance"]
    root = spans["checkout"]
    # caller -> request -> process (the other service) -> reply, and the ack
    assert parent_of(request) == caller.get_span_context().span_id == span_id(root)
    assert parent_of(process) == span_id(request)
    assert parent_of(reply) == span_id(process)
    assert parent_of(ack) == span_id(process)
    assert {trace_id(s) for s in (root, request, process, reply, ack)} == {trace_id(root)}
    assert [link.context.span_id for link in process.links] == [span_id(request)]
    assert (request.kind, process.kind, reply.kind, ack.kind) == (
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
        SpanKind.CLIENT,
    )
    system = SYSTEMS[bus.kind]
    assert request.attributes is not None
    assert process.attributes is not None
    assert ack.attributes is not None
    assert reply.attributes is not None
    message_id = request.attributes["messaging.message.id"]
    assert dict(request.attributes) == {
        "messaging.system": system,
        "messaging.operation.name": "request",
        "messaging.operation.type": "send",
        "messaging.destination.name": "query.GetBalance",
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": message_id,  # it starts the conversation
    }
    assert dict(process.attributes) == {
        "messaging.system": system,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "query.GetBalance",
        "messaging.consumer.group.name": process.attributes["messaging.consumer.group.name"],
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": message_id,
        DELIVERY_ATTEMPT: 1,
    }
    assert "billing" in str(process.attributes["messaging.consumer.group.name"])
    assert ack.attributes["messaging.operation.type"] == "settle"
    assert ack.attributes["messaging.operation.name"] == "ack"
    assert reply.attributes["messaging.destination.temporary"] is True
    assert reply.attributes["messaging.message.conversation_id"] == message_id
    assert all(s.status.status_code is StatusCode.UNSET for s in (request, process, reply))


async def test_an_event_retried_then_dead_lettered_records_each_attempt(
    bus: Bus, exporter: InMemorySpanExporter
) -> None:
    provider = provider_of(exporter)
    billing = Dispatcher(transport=bus.transport(), service="billing", routes=ROUTES, retry=TWICE)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    billing.instrument(Tracing(tracer_provider=provider))
    shop.instrument(Tracing(tracer_provider=provider))

    @billing.events.register(Deposited)
    async def on_deposit(event: Deposited) -> None:
        raise Broken(f"account {event.account} is locked")

    async with billing, shop:
        await shop.publish(Deposited(7))
        await spans_until(exporter, "dead_letter event.Deposited")

    finished = exporter.get_finished_spans()
    [send] = [s for s in finished if s.name == "send event.Deposited"]
    processes = sorted(
        (s for s in finished if s.name == "process event.Deposited"),
        key=lambda s: s.attributes[DELIVERY_ATTEMPT] if s.attributes else 0,
    )
    [retry] = [s for s in finished if s.name == "retry event.Deposited"]
    [dead] = [s for s in finished if s.name == "dead_letter event.Deposited"]
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes is not None
    assert send.attributes["messaging.operation.type"] == "send"
    # Two attempts, each a child of the send, each failing with the handler's error.
    assert [s.attributes[DELIVERY_ATTEMPT] for s in processes if s.attributes] == [1, 2]
    for process in processes:
        assert parent_of(process) == span_id(send)
        assert trace_id(process) == trace_id(send)
        assert process.status.status_code is StatusCode.ERROR
        assert process.attributes is not None
        assert process.attributes["error.type"] == f"{__name__}.Broken"
        [event] = [e for e in process.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.message"] == "account 7 is locked"
    # The retry settles the first attempt, the dead letter the second.
    assert parent_of(retry) == span_id(processes[0])
    assert parent_of(dead) == span_id(processes[1])
    assert retry.attributes is not None
    assert dead.attributes is not None
    assert retry.attributes["messaging.operation.type"] == "settle"
    assert retry.attributes["messaging.iambus.retry.delay"] == pytest.approx(0.01)
    assert dead.attributes["messaging.operation.name"] == "dead_letter"
    assert retry.kind is dead.kind is SpanKind.CLIENT


async def test_an_outbox_relayed_event_is_consumed_in_the_producers_trace(
    bus: Bus, exporter: InMemorySpanExporter, database: Database
) -> None:
    provider = provider_of(exporter)
    billing = Dispatcher(transport=bus.transport(), service="billing", routes=ROUTES)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES, database=database)
    billing.instrument(Tracing(tracer_provider=provider))
    shop.instrument(Tracing(tracer_provider=provider))
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @billing.events.register(Deposited)
    async def on_deposit(event: Deposited) -> None:
        got.set_result(event.account)

    tracer = provider.get_tracer("test")
    async with billing, shop:
        with tracer.start_as_current_span("deposit"):
            async with database.connection() as conn, shop.unit_of_work(conn):
                await shop.publish(Deposited(3))
        assert await asyncio.wait_for(got, 15) == 3
        spans = await spans_until(
            exporter, "deposit", "create event.Deposited", "send event.Deposited"
        )
        spans |= await spans_until(exporter, "process event.Deposited")

    root, create = spans["deposit"], spans["create event.Deposited"]
    relayed, process = spans["send event.Deposited"], spans["process event.Deposited"]
    assert create.kind is SpanKind.PRODUCER
    assert relayed.kind is SpanKind.CLIENT  # the relay sends; the message was made before
    assert process.kind is SpanKind.CONSUMER
    assert parent_of(create) == span_id(root)
    assert parent_of(relayed) == span_id(create)
    assert parent_of(process) == span_id(create)  # the creation context, via the outbox
    assert {trace_id(s) for s in (root, create, relayed, process)} == {trace_id(root)}
    assert create.attributes is not None
    assert relayed.attributes is not None
    assert create.attributes["messaging.operation.type"] == "create"
    assert relayed.attributes["messaging.message.id"] == create.attributes["messaging.message.id"]
    # The ack ended the process span (acks=True would give it a span of its own).
    assert not [s.name for s in exporter.get_finished_spans() if s.name.startswith("ack ")]


async def test_in_process_handlers_are_traced_only_with_the_middleware(
    exporter: InMemorySpanExporter,
) -> None:
    provider = provider_of(exporter)
    tracing = Tracing(tracer_provider=provider)
    plain, traced = Dispatcher(), Dispatcher()
    traced.add_middleware(tracing.handlers)
    for dp in (plain, traced):

        @dp.queries.register(GetBalance)
        async def balance(query: GetBalance) -> int:
            if query.account < 0:
                raise Broken("no such account")
            return 1

    tracer = provider.get_tracer("test")
    async with plain, traced:
        with tracer.start_as_current_span("caller") as caller:
            assert await plain.query(GetBalance(1)) == 1
            assert not exporter.get_finished_spans()  # off: nothing made
            assert await traced.query(GetBalance(1)) == 1
            with pytest.raises(Broken):
                await traced.query(GetBalance(-1))
    ok, failed = [s for s in exporter.get_finished_spans() if s.name == "handle GetBalance"]
    assert ok.kind is failed.kind is SpanKind.INTERNAL
    assert parent_of(ok) == parent_of(failed) == caller.get_span_context().span_id
    assert ok.attributes is not None
    assert ok.attributes["iambus.message.kind"] == "query"
    assert str(ok.attributes["iambus.handler"]).endswith("balance")
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == f"{__name__}.Broken"


async def test_a_password_in_an_error_never_reaches_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    dp = Dispatcher()
    dp.add_middleware(Tracing(tracer_provider=provider_of(exporter)).handlers)

    @dp.queries.register(GetBalance)
    async def balance(query: GetBalance) -> int:
        raise Broken("cannot reach redis://app:s3cret@ledger:6379/0")

    async with dp:
        with pytest.raises(Broken, match="s3cret"):  # the error itself is the caller's
            await dp.query(GetBalance(1))
    [failed] = exporter.get_finished_spans()
    assert failed.status.description == (
        f"{__name__}.Broken: cannot reach redis://app:***@ledger:6379/0"
    )
    [event] = failed.events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "cannot reach redis://app:***@ledger:6379/0"
    stack = str(event.attributes["exception.stacktrace"])
    assert "redis://app:***@ledger" in stack
    assert "s3cret" not in stack


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class Failing(TextMapPropagator):
    """An application's propagator that fails to inject."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return context

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        raise RuntimeError("propagator broken")

    @property
    def fields(self) -> set[str]:
        return set()


async def test_every_span_ends_whatever_fails_in_it(exporter: InMemorySpanExporter) -> None:
    """A propagator that raises (the send goes on without its context) and a handler's
    exception whose str() fails: the spans end all the same, with the error."""
    provider = provider_of(exporter)
    bus = MemoryTransport()
    billing = Dispatcher(transport=bus, service="billing", routes=ROUTES, retry=Retry(attempts=1))
    shop = Dispatcher(transport=bus, service="shop", routes=ROUTES)
    billing.instrument(Tracing(tracer_provider=provider))
    shop.instrument(Tracing(tracer_provider=provider))

    @billing.events.register(Deposited)
    async def on_deposit(event: Deposited) -> None:
        raise Unprintable

    async with billing, shop:
        before = propagate.get_global_textmap()
        propagate.set_global_textmap(Failing())
        try:
            await shop.publish(Deposited(1))  # sent without its trace context
        finally:
            propagate.set_global_textmap(before)
        spans = await spans_until(exporter, "send event.Deposited", "dead_letter event.Deposited")
        spans |= await spans_until(exporter, "process event.Deposited")
    send, process = spans["send event.Deposited"], spans["process event.Deposited"]
    assert send.status.status_code is StatusCode.ERROR
    assert send.status.description == "RuntimeError: propagator broken"
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == f"{__name__}.Unprintable: <Unprintable: str() failed>"
    [event] = process.events
    assert event.attributes is not None
    assert event.attributes["exception.type"] == f"{__name__}.Unprintable"


def test_a_settlement_a_stopping_worker_cuts_short_is_no_failure(
    exporter: InMemorySpanExporter,
) -> None:
    from iambus.envelope import Envelope
    from iambus.telemetry import Processing, Settlement

    tracing = Tracing(tracer_provider=provider_of(exporter))
    processing = Processing("memory", "event", "event.A", "g", "h", Envelope("A", b"{}"), 1)
    with (
        pytest.raises(asyncio.CancelledError),
        tracing.settle(Settlement(processing, "retry", 1.0)),
    ):
        raise asyncio.CancelledError  # the worker stops while the retry is being made
    with pytest.raises(ConnectionError), tracing.settle(Settlement(processing, "dead_letter")):
        raise ConnectionError("broker gone")
    cut, failed = exporter.get_finished_spans()
    assert cut.status.status_code is StatusCode.UNSET
    assert [e.name for e in cut.events] == [CANCELLED]
    assert failed.status.status_code is StatusCode.ERROR
