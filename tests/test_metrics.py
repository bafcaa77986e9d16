"""OpenTelemetry and Prometheus metrics of every message, against the real brokers."""

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from iambus import Command, Dispatcher, Retry, TransportError
from iambus.database import Database
from iambus.envelope import Envelope
from iambus.metrics import Metrics, PrometheusMetrics
from iambus.outbox import Outgoing, write
from iambus.telemetry import Observer, Settlement
from iambus.tracing import Tracing
from iambus.transports.memory import MemoryTransport

from .conftest import Bus


@dataclass(frozen=True, slots=True)
class Reserve(Command[int]):
    sku: str


@dataclass(frozen=True, slots=True)
class Restocked:
    sku: str


ROUTES: dict[type | str, str] = {Reserve: "stock", Restocked: "stock"}
TWICE = Retry(attempts=2, backoff=0.01, jitter=False)


class DeadLettered(Observer):
    """Attached first (so told last): set once a delivery was dead-lettered."""

    def __init__(self) -> None:
        self.happened = asyncio.Event()

    @contextlib.contextmanager
    def settle(self, settlement: Settlement) -> Iterator[None]:
        yield
        if settlement.outcome == "dead_letter":
            self.happened.set()


async def traffic(bus: Bus, *observers: Observer) -> None:
    """One command answered, one event retried once and then dead-lettered."""
    stock = Dispatcher(transport=bus.transport(), service="stock", routes=ROUTES, retry=TWICE)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    dead = DeadLettered()
    stock.instrument(dead, *observers)
    shop.instrument(*observers)

    @stock.commands.register(Reserve)
    async def reserve(command: Reserve) -> int:
        return 3

    @stock.events.register(Restocked)
    async def on_restocked(event: Restocked) -> None:
        raise LookupError(event.sku)

    async with stock, shop:
        assert await shop.execute(Reserve("ab-1")) == 3
        await shop.publish(Restocked("ab-1"))
        await asyncio.wait_for(dead.happened.wait(), 15)


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def total(found: dict[str, list[Any]], name: str, **attributes: Any) -> float:
    """The sum of ``name``'s points (a histogram's: their count) with ``attributes``."""
    return sum(
        getattr(p, "count", None) or p.value
        for p in found.get(name, [])
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    )


async def test_otel_metrics_count_sends_deliveries_retries_and_dead_letters(bus: Bus) -> None:
    reader = InMemoryMetricReader()
    await traffic(bus, Metrics(meter_provider=MeterProvider(metric_readers=[reader])))
    found = points(reader)
    system = "memory" if bus.kind == "memory" else bus.kind
    sent = "messaging.client.sent.messages"
    assert total(found, sent, **{"messaging.operation.name": "request"}) == 1
    assert total(found, sent, **{"messaging.destination.name": "event.Restocked"}) == 1
    assert total(found, sent, **{"messaging.operation.name": "reply"}) == 1
    assert {p.attributes["messaging.system"] for p in found[sent]} == {system}
    consumed = "messaging.client.consumed.messages"
    assert total(found, consumed, **{"messaging.destination.name": "command.Reserve"}) == 1
    assert total(found, consumed, **{"messaging.destination.name": "event.Restocked"}) == 2
    process = "messaging.process.duration"
    assert total(found, process, **{"error.type": "LookupError"}) == 2
    assert total(found, process, **{"messaging.destination.name": "command.Reserve"}) == 1
    assert all(p.sum >= 0 for p in found[process])
    operation = "messaging.client.operation.duration"
    # A retry and a dead letter are timed; acks only with acks=True (below).
    assert total(found, operation, **{"messaging.operation.type": "settle"}) == 2
    assert total(found, operation, **{"messaging.operation.name": "ack"}) == 0
    assert total(found, operation, **{"messaging.operation.type": "send"}) == 3
    assert total(found, "iambus.acks") == 1  # counted though not timed
    assert total(found, "iambus.retries") == 1
    assert total(found, "iambus.dead_letters") == 1
    assert total(found, "iambus.handlers.in_flight") == 0  # none left counted


async def test_otel_metrics_time_every_ack_when_asked(bus: Bus) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    await traffic(bus, Metrics(meter_provider=meters, acks=True))
    found = points(reader)
    operation = "messaging.client.operation.duration"
    assert total(found, operation, **{"messaging.operation.type": "settle"}) == 3
    assert total(found, operation, **{"messaging.operation.name": "ack"}) == 1


async def test_the_outbox_gauges_report_the_last_reading(database: Database) -> None:
    reader = InMemoryMetricReader()
    metrics = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))
    assert "iambus.outbox.backlog" not in points(reader)  # not read yet: no point
    async with database.connection() as conn, conn.transaction():
        rows = [Outgoing("event.Restocked", Envelope("Restocked", b"{}")) for _ in range(3)]
        await write(conn, database, rows)
    status = await metrics.read_outbox(database)
    assert status.backlog == 3
    found = points(reader)
    assert total(found, "iambus.outbox.backlog") == 3
    assert total(found, "iambus.outbox.parked") == 0
    assert found["iambus.outbox.oldest_age"][0].value >= 0


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, found), v in samples.items()
        if n == name and all(dict(found).get(k) == want for k, want in labels.items())
    )


async def test_prometheus_output_counts_every_message(bus: Bus) -> None:
    registry = CollectorRegistry()
    await traffic(bus, PrometheusMetrics(registry=registry))
    samples = scrape(registry)
    sent = "iambus_messages_sent_total"
    assert value(samples, sent, kind="command", message="Reserve", outcome="ok") == 1
    assert value(samples, sent, kind="event", message="Restocked", outcome="ok") == 1
    assert value(samples, sent, kind="reply", message="Reserve.result", outcome="ok") == 1
    processed = "iambus_messages_processed_total"
    assert value(samples, processed, message="Reserve", outcome="ok") == 1
    assert value(samples, processed, message="Restocked", outcome="error") == 2
    settled = "iambus_messages_settled_total"
    assert value(samples, settled, message="Reserve", outcome="ack") == 1
    assert value(samples, settled, message="Restocked", outcome="retry") == 1
    assert value(samples, settled, message="Restocked", outcome="dead_letter") == 1
    assert value(samples, "iambus_process_duration_seconds_count", message="Restocked") == 2
    assert value(samples, "iambus_send_duration_seconds_count", kind="command") == 1
    assert value(samples, "iambus_handlers_in_flight") == 0
    groups = {dict(labels)["group"] for (n, labels) in samples if n == processed}
    assert len(groups) == 2  # the command's service, the event handler's group
    assert not any("id" in dict(labels) for (_, labels) in samples)  # no unbounded label


async def test_names_from_the_wire_make_no_new_series(bus: Bus) -> None:
    """Envelopes with made-up names sent to a subscribed address are dead-lettered (they
    do not decode), and counted under the subscription's message, not their own name."""
    registry = CollectorRegistry()
    stock = Dispatcher(transport=bus.transport(), service="stock", routes=ROUTES, retry=TWICE)
    dead = DeadLettered()
    stock.instrument(dead, PrometheusMetrics(registry=registry))

    @stock.commands.register(Reserve)
    async def reserve(command: Reserve) -> int:
        return 3

    sender = bus.transport()
    await sender.open()
    try:
        async with stock:
            for n in range(5):
                dead.happened.clear()
                await sender.send("command.Reserve", Envelope(name=f"Bogus{n}", payload=b"[]"))
                await asyncio.wait_for(dead.happened.wait(), 15)
    finally:
        await sender.close()
    samples = scrape(registry)
    messages = {dict(labels).get("message") for (name, labels) in samples}
    assert not any(str(m).startswith("Bogus") for m in messages), messages
    settled = "iambus_messages_settled_total"
    assert value(samples, settled, message="Reserve", outcome="dead_letter") == 5


def test_prometheus_metrics_work_in_multiprocess_mode(tmp_path: Path) -> None:
    code = (
        "import contextlib\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from prometheus_client.multiprocess import MultiProcessCollector\n"
        "from iambus.envelope import Envelope\n"
        "from iambus.metrics import PrometheusMetrics\n"
        "from iambus.telemetry import Processing\n"
        "metrics = PrometheusMetrics(registry=CollectorRegistry())\n"
        "p = Processing('redis', 'event', 'event.A', 'g', 'h', Envelope('A', b''), 1)\n"
        "with metrics.process(p):\n"
        "    pass\n"
        "inflight = metrics.process(p)\n"
        "inflight.__enter__()\n"  # one left in flight while this process lives
        "served = CollectorRegistry()\n"
        "MultiProcessCollector(served)\n"
        "print(generate_latest(served).decode())\n"
        "import os\n"
        "from prometheus_client import multiprocess\n"
        "multiprocess.mark_process_dead(os.getpid())\n"  # as a stopping worker does
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = []
    for _ in range(2):  # two worker processes on one host
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(outputs[-1])
        for s in family.samples
    }
    # Both processes' counts, read from the shared directory.
    assert value(samples, "iambus_messages_processed_total", outcome="ok") == 2
    # livesum: the gauge counts live processes only (the second one, still running; the
    # first one's series left when it was marked dead).
    assert value(samples, "iambus_handlers_in_flight") == 1


class Refusing(MemoryTransport):
    """A broker that refuses every send."""

    async def send(self, address: str, envelope: Envelope) -> None:
        raise TransportError("the broker refused it (a test's doing)")


async def test_a_send_the_broker_refuses_is_an_error_in_metrics_and_spans() -> None:
    reader = InMemoryMetricReader()
    registry = CollectorRegistry()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    shop = Dispatcher(transport=Refusing(), service="shop", routes=ROUTES)
    shop.instrument(
        Metrics(meter_provider=MeterProvider(metric_readers=[reader])),
        PrometheusMetrics(registry=registry),
        Tracing(tracer_provider=tracer_provider),
    )
    async with shop:
        with pytest.raises(TransportError, match="refused"):
            await shop.publish(Restocked("ab-1"))
    found = points(reader)
    sent = total(
        found, "messaging.client.sent.messages", **{"error.type": "iambus.errors.TransportError"}
    )
    assert sent == 1
    assert value(scrape(registry), "iambus_messages_sent_total", outcome="error") == 1
    [span] = spans.get_finished_spans()
    assert span.name == "send event.Restocked"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "iambus.errors.TransportError"


async def test_watch_outbox_reads_the_backlog_until_cancelled(database: Database) -> None:
    reader = InMemoryMetricReader()
    metrics = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))
    async with database.connection() as conn, conn.transaction():
        await write(conn, database, [Outgoing("event.Restocked", Envelope(name="R", payload=b""))])
    watching = asyncio.create_task(metrics.watch_outbox(database, every=0.01))
    try:
        deadline = time.monotonic() + 10
        while total(points(reader), "iambus.outbox.backlog") != 1:
            assert time.monotonic() < deadline, points(reader)
            await asyncio.sleep(0.02)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def test_a_worker_stopping_mid_handler_records_no_failure() -> None:
    """Stopping cancels a running handler; its delivery comes again. Not a failure: an
    alert on failed deliveries must not fire on every deploy."""
    registry, reader, exporter = CollectorRegistry(), InMemoryMetricReader(), InMemorySpanExporter()
    traces = TracerProvider()
    traces.add_span_processor(SimpleSpanProcessor(exporter))
    bus = MemoryTransport()
    stock = Dispatcher(transport=bus, service="stock", routes=ROUTES)
    shop = Dispatcher(transport=bus, service="shop", routes=ROUTES)
    stock.instrument(
        PrometheusMetrics(registry=registry),
        Metrics(meter_provider=MeterProvider(metric_readers=[reader])),
        Tracing(tracer_provider=traces),
    )
    started = asyncio.Event()

    @stock.events.register(Restocked)
    async def on_restocked(event: Restocked) -> None:
        started.set()
        await asyncio.Event().wait()  # until the worker stops

    async with shop, stock:
        await shop.publish(Restocked("ab-1"))
        await asyncio.wait_for(started.wait(), 5)
        await stock.stop(timeout=0.1)
    samples = scrape(registry)
    assert value(samples, "iambus_handlers_in_flight") == 0
    assert value(samples, "iambus_messages_processed_total") == 0
    assert value(samples, "iambus_process_duration_seconds_count") == 0
    found = points(reader)
    assert total(found, "messaging.process.duration") == 0
    assert total(found, "iambus.handlers.in_flight") == 0
    [process] = [s for s in exporter.get_finished_spans() if s.name.startswith("process ")]
    assert process.status.status_code is StatusCode.UNSET
    assert [e.name for e in process.events] == ["iambus.cancelled"]


def test_a_settlement_or_reply_a_stopping_worker_cuts_short_is_not_counted() -> None:
    from iambus.telemetry import Processing, Sending

    reader, registry = InMemoryMetricReader(), CollectorRegistry()
    otel = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))
    prometheus = PrometheusMetrics(registry=registry)
    processing = Processing("memory", "event", "event.A", "g", "h", Envelope("A", b"{}"), 1)
    reply = Sending("reply", "memory", "reply", None, "inbox.1", Envelope("A.result", b"1"))
    for observer in (otel, prometheus):
        with (
            pytest.raises(asyncio.CancelledError),
            observer.settle(Settlement(processing, "retry")),
        ):
            raise asyncio.CancelledError  # the worker stops while the retry is being made
        with pytest.raises(asyncio.CancelledError), observer.send(reply):
            raise asyncio.CancelledError
    found = points(reader)
    assert total(found, "iambus.retries") == 0
    assert total(found, "messaging.client.operation.duration") == 0
    assert total(found, "messaging.client.sent.messages") == 0
    samples = scrape(registry)
    assert value(samples, "iambus_messages_settled_total") == 0
    assert value(samples, "iambus_messages_sent_total") == 0
    assert value(samples, "iambus_send_duration_seconds_count") == 0
