"""Metrics: OpenTelemetry (``iambus[otel]``) and Prometheus (``iambus[prometheus]``).

::

    from iambus.metrics import Metrics, PrometheusMetrics

    dp.instrument(Metrics())  # the global MeterProvider, or Metrics(meter_provider=...)
    dp.instrument(PrometheusMetrics())  # prometheus_client's REGISTRY, or registry=...

``Metrics`` records the messaging conventions' instruments, ``messaging.client.sent.
messages``, ``messaging.client.consumed.messages``, ``messaging.client.operation.duration``
and ``messaging.process.duration``, plus iambus's own: ``iambus.acks``, ``iambus.retries``,
``iambus.dead_letters``, ``iambus.handlers.in_flight``, and the outbox's backlog
(``iambus.outbox.backlog``, ``iambus.outbox.parked``, ``iambus.outbox.oldest_age``) while
``watch_outbox(database)`` runs.

``PrometheusMetrics`` keeps the same per-message figures in prometheus_client metrics,
which work in its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): see docs/metrics.md.
Each module imports its package only when its class is made, so either extra is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from .database import Database
from .relay import OutboxStatus, outbox_status
from .telemetry import Observer, Processing, Sending, Settlement, error_type

__all__ = ["Metrics", "PrometheusMetrics"]

_NOTHING = contextlib.nullcontext()

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _need(extra: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"iambus.metrics needs {package.partition('.')[0]}: pip install 'iambus[{extra}]'"
        ) from exc


def _send_attributes(sending: Sending) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": sending.system,
        "messaging.operation.name": sending.operation,
        "messaging.operation.type": "send",
    }
    if sending.destination is not None:  # a reply's address is the requester's own
        attributes["messaging.destination.name"] = sending.destination
    return attributes


def _consumer_attributes(processing: Processing, operation: str, kind: str) -> dict[str, Any]:
    return {
        "messaging.system": processing.system,
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "messaging.destination.name": processing.destination,
        "messaging.consumer.group.name": processing.group,
    }


class Metrics(Observer):
    """OpenTelemetry instruments for every message; see the module docstring.

    ``meter_provider``: where they are recorded (default: the global one). ``acks``:
    record each ack's duration in ``messaging.client.operation.duration`` too (off by
    default: a histogram measurement costs about as much as the rest of an ack; acks are
    counted in ``iambus.acks`` all the same, and retries and dead letters are always
    timed).
    """

    def __init__(self, *, meter_provider: Any = None, acks: bool = False) -> None:
        from . import __version__

        self.acks = acks
        metrics = _need("otel", "opentelemetry.metrics")
        meter = metrics.get_meter("iambus", __version__, meter_provider=meter_provider)
        # The counters are tallies of our own, read when the SDK collects (observable
        # instruments): a message costs a dict update instead of an SDK measurement
        # (about 14 µs each, measured in benchmarks/telemetry.py).
        observation = metrics.Observation
        self.sent = _Tally(observation)
        self.consumed = _Tally(observation)
        self.retries = _Tally(observation)
        self.dead_letters = _Tally(observation)
        self.acked = _Tally(observation)
        self.in_flight = _Tally(observation)
        for name, tally, description in (
            ("messaging.client.sent.messages", self.sent, "Messages sent (or tried)."),
            ("messaging.client.consumed.messages", self.consumed, "Messages delivered."),
            ("iambus.acks", self.acked, "Deliveries acked."),
            ("iambus.retries", self.retries, "Deliveries set to be retried."),
            ("iambus.dead_letters", self.dead_letters, "Deliveries dead-lettered."),
        ):
            meter.create_observable_counter(
                name, [tally.observe], unit="{message}", description=description
            )
        meter.create_observable_up_down_counter(
            "iambus.handlers.in_flight",
            [self.in_flight.observe],
            unit="{message}",
            description="Deliveries being processed now.",
        )
        self.operation_duration = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Duration of a send or settle operation.",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing a delivery (decoding, handler, reply).",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self._outbox: OutboxStatus | None = None

        def outbox(field: str) -> Any:
            def observe(_: Any) -> Iterable[Any]:
                status = self._outbox
                value = None if status is None else getattr(status, field)
                return () if value is None else (observation(value),)

            return observe

        meter.create_observable_gauge(
            "iambus.outbox.backlog",
            [outbox("backlog")],
            unit="{message}",
            description="Outbox rows waiting to be sent.",
        )
        meter.create_observable_gauge(
            "iambus.outbox.parked",
            [outbox("parked")],
            unit="{message}",
            description="Outbox rows that cannot be sent.",
        )
        meter.create_observable_gauge(
            "iambus.outbox.oldest_age",
            [outbox("oldest_age")],
            unit="s",
            description="Seconds since the oldest waiting outbox row was written.",
        )

    async def watch_outbox(self, database: Database, *, every: float = 15.0) -> None:
        """Read ``database``'s outbox status every ``every`` seconds, for the outbox
        gauges (which report the last reading); runs until cancelled."""
        while True:
            await self.read_outbox(database)
            await asyncio.sleep(every)

    async def read_outbox(self, database: Database) -> OutboxStatus:
        """Read ``database``'s outbox status once, for the outbox gauges."""
        self._outbox = status = await outbox_status(database)
        return status

    def send(self, sending: Sending) -> AbstractContextManager[object]:
        if sending.operation == "create":  # written to the outbox: counted when relayed
            return _NOTHING
        # A reply is sent by a worker: cancelled, the worker is stopping (see _Timed).
        stopping = sending.operation == "reply"
        attributes = _send_attributes(sending)
        return _Timed(self.operation_duration, attributes, self.sent, stopping=stopping)

    def process(self, processing: Processing) -> AbstractContextManager[object]:
        return _Processed(self, processing)

    def settle(self, settlement: Settlement) -> AbstractContextManager[object]:
        outcome = settlement.outcome
        attributes = _consumer_attributes(settlement.processing, outcome, "settle")
        if outcome == "ack":
            histogram = self.operation_duration if self.acks else None
            tally = self.acked
        else:
            histogram = self.operation_duration
            tally = self.retries if outcome == "retry" else self.dead_letters
        return _Timed(histogram, attributes, tally, counted_on_error=False, stopping=True)


class _Timed:
    """A send's or a settlement's block: its duration recorded in ``histogram`` (if any;
    with ``error.type`` if it raised), and counted in ``tally``. ``stopping``: the block
    runs in a worker (a settlement, a reply), where a cancellation means the worker is
    stopping: neither recorded nor counted. (A class, not a generator: it runs for every
    message.)"""

    __slots__ = ("attributes", "counted_on_error", "histogram", "start", "stopping", "tally")

    def __init__(
        self,
        histogram: Any,
        attributes: dict[str, Any],
        tally: _Tally,
        *,
        counted_on_error: bool = True,
        stopping: bool = False,
    ) -> None:
        self.histogram = histogram
        self.attributes = attributes
        self.tally = tally
        self.counted_on_error = counted_on_error
        self.stopping = stopping
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        attributes = self.attributes
        if exc is not None:
            if self.stopping and isinstance(exc, asyncio.CancelledError):
                return
            attributes["error.type"] = error_type(exc)
        if self.histogram is not None:
            self.histogram.record(time.perf_counter() - self.start, attributes)
        if exc is None or self.counted_on_error:
            self.tally.add(attributes)


class _Processed:
    """A delivery's processing: consumed, in flight while it runs, then its duration."""

    __slots__ = ("attributes", "flight", "metrics", "processing", "start")

    def __init__(self, metrics: Metrics, processing: Processing) -> None:
        self.metrics = metrics
        self.processing = processing
        self.attributes = _consumer_attributes(processing, "process", "process")
        self.flight = {"messaging.destination.name": processing.destination}
        self.start = 0.0

    def __enter__(self) -> None:
        metrics = self.metrics
        metrics.consumed.add(self.attributes)
        metrics.in_flight.add(self.flight)
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        metrics, processing, attributes = self.metrics, self.processing, self.attributes
        metrics.in_flight.add(self.flight, -1)
        if processing.error is None and isinstance(exc, asyncio.CancelledError):
            return  # the worker stopped: not processed, not failed; it comes again
        error = processing.error or exc
        if error is not None:
            processing.error = error
            attributes["error.type"] = error_type(error)
        metrics.process_duration.record(time.perf_counter() - self.start, attributes)


class _Tally:
    """Counts by attributes, reported by an observable instrument's callback."""

    __slots__ = ("counts", "observation")

    def __init__(self, observation: Any) -> None:
        self.observation = observation
        self.counts: dict[tuple[tuple[str, Any], ...], int] = {}

    def add(self, attributes: dict[str, Any], n: int = 1) -> None:
        key = tuple(attributes.items())
        self.counts[key] = self.counts.get(key, 0) + n

    def observe(self, _: Any) -> Iterable[Any]:
        # Called from the reader's thread, maybe: list() copies the dict in one step.
        return [self.observation(n, dict(key)) for key, n in list(self.counts.items())]


class PrometheusMetrics(Observer):
    """prometheus_client metrics for every message, registered in ``registry`` (default
    ``prometheus_client.REGISTRY``); see docs/metrics.md for their names and labels.

    Made before the worker processes fork (or in each), they work in prometheus_client's
    multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` before the process starts, and
    serve a registry with a ``MultiProcessCollector``. One per registry.
    """

    def __init__(self, *, registry: Any = None, namespace: str = "iambus") -> None:
        prometheus = _need("prometheus", "prometheus_client")
        if registry is None:
            registry = prometheus.REGISTRY
        common = {"namespace": namespace, "registry": registry}
        consumer = ("kind", "message", "group")
        self.sent = prometheus.Counter(
            "messages_sent",
            "Messages sent (or tried), by outcome (ok, error).",
            ("kind", "message", "outcome"),
            **common,
        )
        self.send_duration = prometheus.Histogram(
            "send_duration_seconds",
            "Seconds a send took (a request's: until its answer came).",
            ("kind", "message"),
            buckets=_SECONDS,
            **common,
        )
        self.processed = prometheus.Counter(
            "messages_processed",
            "Deliveries processed, by outcome (ok, error: the handler raised).",
            (*consumer, "outcome"),
            **common,
        )
        self.process_duration = prometheus.Histogram(
            "process_duration_seconds",
            "Seconds processing a delivery took (decoding, handler, reply).",
            consumer,
            buckets=_SECONDS,
            **common,
        )
        self.settled = prometheus.Counter(
            "messages_settled",
            "Deliveries settled, by outcome (ack, retry, dead_letter).",
            (*consumer, "outcome"),
            **common,
        )
        self.in_flight = prometheus.Gauge(
            "handlers_in_flight",
            "Deliveries being processed now.",
            consumer,
            multiprocess_mode="livesum",
            **common,
        )
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._consumers: dict[tuple[str, str, str], _Consumer] = {}

    def send(self, sending: Sending) -> AbstractContextManager[object]:
        if sending.operation == "create":  # written to the outbox: counted when relayed
            return _NOTHING
        labels = (sending.kind, sending.envelope.name)
        sender = self._senders.get(labels)
        if sender is None:
            sender = self._senders[labels] = _Sender(self, labels)
        return _Observed(sender, stopping=sending.operation == "reply")

    def process(self, processing: Processing) -> AbstractContextManager[object]:
        return _Handled(self._consumer(processing), processing)

    def settle(self, settlement: Settlement) -> AbstractContextManager[object]:
        return _Counted(self._consumer(settlement.processing).settled[settlement.outcome])

    def _consumer(self, processing: Processing) -> _Consumer:
        # The message's name as the subscription's address has it, not as the envelope
        # says: names from the wire (anyone may write to an address) would make a new
        # series each, without end.
        labels = (processing.kind, processing.destination.split(".", 1)[-1], processing.group)
        children = self._consumers.get(labels)
        if children is None:
            children = self._consumers[labels] = _Consumer(self, labels)
        return children


class _Sender:
    """One message type's labelled send metrics, looked up once."""

    __slots__ = ("duration", "error", "ok")

    def __init__(self, metrics: PrometheusMetrics, labels: tuple[str, str]) -> None:
        self.duration = metrics.send_duration.labels(*labels)
        self.ok = metrics.sent.labels(*labels, "ok")
        self.error = metrics.sent.labels(*labels, "error")


class _Observed:
    """A send's block: its duration observed, counted ok or error (a reply cancelled by a
    stopping worker: neither)."""

    __slots__ = ("sender", "start", "stopping")

    def __init__(self, sender: _Sender, *, stopping: bool) -> None:
        self.sender = sender
        self.stopping = stopping
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        sender = self.sender
        if exc is None:
            sender.ok.inc()
        elif self.stopping and isinstance(exc, asyncio.CancelledError):
            return
        else:
            sender.error.inc()
        sender.duration.observe(time.perf_counter() - self.start)


class _Handled:
    """A delivery's processing: in flight while it runs, then its duration and outcome."""

    __slots__ = ("consumer", "processing", "start")

    def __init__(self, consumer: _Consumer, processing: Processing) -> None:
        self.consumer, self.processing = consumer, processing
        self.start = 0.0

    def __enter__(self) -> None:
        self.consumer.in_flight.inc()
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        consumer = self.consumer
        consumer.in_flight.dec()
        if self.processing.error is None and isinstance(exc, asyncio.CancelledError):
            return  # the worker stopped: not processed, not failed; it comes again
        consumer.duration.observe(time.perf_counter() - self.start)
        failed = exc is not None or self.processing.error is not None
        (consumer.failed if failed else consumer.ok).inc()


class _Counted:
    """A settlement's block: counted once it returned."""

    __slots__ = ("counter",)

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.counter.inc()


class _Consumer:
    """One consumer's labelled metrics, looked up once (``labels()`` takes a lock and
    builds a key per call)."""

    __slots__ = ("duration", "failed", "in_flight", "ok", "settled")

    def __init__(self, metrics: PrometheusMetrics, labels: tuple[str, str, str]) -> None:
        self.in_flight = metrics.in_flight.labels(*labels)
        self.duration = metrics.process_duration.labels(*labels)
        self.ok = metrics.processed.labels(*labels, "ok")
        self.failed = metrics.processed.labels(*labels, "error")
        self.settled = {
            outcome: metrics.settled.labels(*labels, outcome)
            for outcome in ("ack", "retry", "dead_letter")
        }
