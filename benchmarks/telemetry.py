"""Telemetry's cost: in-process with tracing off and on; events through a broker with
tracing and metrics off, then on.

    .venv/bin/python benchmarks/telemetry.py                 # memory, redis, rabbitmq, nats
    .venv/bin/python benchmarks/telemetry.py --broker redis --n 5000 --rounds 3

In-process: ``10 n`` queries answered by an in-process handler, plain and with the
``Tracing.handlers`` middleware. Through a broker: each round sends ``n`` events (100
sends in flight) from one dispatcher to a handler of another, and counts events handled
per second from the first send to the last handler call. "off" and "on" alternate within
the run, and the best round of each is printed with the ratio on/off. "on" attaches
``Tracing`` (an SDK TracerProvider whose batch processor hands the spans to an exporter
that drops them) and ``Metrics`` (an SDK MeterProvider, read once at the end) to both
dispatchers; further columns sample 1 % of traces, attach each alone, attach
``PrometheusMetrics`` alone, and attach both with the OpenTelemetry API's no-op providers:
what iambus's own hooks cost, without the SDK's work.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

from iambus import Dispatcher, Limits, Query
from iambus.metrics import Metrics, PrometheusMetrics
from iambus.tracing import Tracing
from iambus.transports import Transport, connect

URLS = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
}


MODES = {
    "off": "off (events/s)",
    "otel": "tracing + metrics (OTel)",
    "sampled": "the same, 1 % of traces sampled",
    "tracing": "tracing alone",
    "metrics": "OTel metrics alone",
    "prometheus": "PrometheusMetrics",
    "noop": "iambus's hooks alone (no-op OTel providers)",
}


@dataclass(frozen=True, slots=True)
class Ticked:
    n: int


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def transports(broker: str) -> tuple[Transport, Transport, list[Transport]]:
    if broker == "memory":
        shared = connect("memory://")
        return shared, shared, [shared]
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    made = [connect(URLS[broker], namespace=namespace) for _ in range(2)]
    return made[0], made[1], made


async def one_round(broker: str, n: int, mode: str) -> float:
    sending, consuming, made = transports(broker)
    routes = {Ticked: "clock"}
    clock = Dispatcher(
        transport=consuming, service="clock", routes=routes, limits=Limits(concurrency=64)
    )
    shop = Dispatcher(transport=sending, service="shop", routes=routes)
    traces: TracerProvider | None = None
    if mode == "prometheus":
        for dp in (clock, shop):
            dp.instrument(PrometheusMetrics(registry=CollectorRegistry()))
    if mode in ("otel", "sampled", "tracing"):
        sampler = ParentBased(TraceIdRatioBased(0.01)) if mode == "sampled" else None
        traces = TracerProvider(sampler=sampler)
        traces.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=65536))
        for dp in (clock, shop):
            dp.instrument(Tracing(tracer_provider=traces))
    if mode in ("otel", "sampled", "metrics"):
        meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        for dp in (clock, shop):
            dp.instrument(Metrics(meter_provider=meters))
    if mode == "noop":  # every hook of iambus runs; the API's no-op spans and instruments
        for dp in (clock, shop):
            dp.instrument(Tracing(tracer_provider=NoOpTracerProvider()))
            dp.instrument(Metrics(meter_provider=NoOpMeterProvider()))
    done = asyncio.Event()
    seen = 0

    @clock.events.register(Ticked)
    async def on_tick(event: Ticked) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    async with clock, shop:
        start = time.perf_counter()
        for first in range(0, n, 100):
            await asyncio.gather(*(shop.send(Ticked(i)) for i in range(first, first + 100)))
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
    if traces is not None:
        traces.shutdown()
    for transport in made:
        destroy: Any = getattr(transport, "destroy", None)
        if destroy is not None:
            await transport.open()
            await destroy()
            await transport.close()
    return n / elapsed


@dataclass(frozen=True, slots=True)
class Balance(Query[int]):
    account: int


async def in_process(n: int, traced: bool) -> float:
    """Queries per second through an in-process handler (S1 of inprocess.py)."""
    dp = Dispatcher()
    provider: TracerProvider | None = None
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=65536))
        dp.add_middleware(Tracing(tracer_provider=provider).handlers)

    @dp.queries.register(Balance)
    async def balance(query: Balance) -> int:
        return 1

    message = Balance(1)
    async with dp:
        query = dp.query
        start = time.perf_counter()
        for _ in range(n):
            await query(message)
        elapsed = time.perf_counter() - start
    if provider is not None:
        provider.shutdown()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", action="append", choices=sorted(URLS))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for traced in (False, True):
            best[traced] = max(best[traced], await in_process(args.n * 10, traced))
    print("| in-process: query round trip (S1) | off (queries/s) | on: tracing.handlers |")
    print("|---|---:|---:|")
    ratio = best[True] / best[False]
    print(f"| iambus | {best[False]:,.0f} (1.00x) | {best[True]:,.0f} ({ratio:.2f}x) |")
    print()
    modes = tuple(MODES)
    print(f"| broker | {' | '.join(MODES.values())} |")
    print("|---|" + "---:|" * len(MODES))
    for broker in args.broker or list(URLS):
        rates = dict.fromkeys(modes, 0.0)
        for _ in range(args.rounds):
            for mode in modes:
                rates[mode] = max(rates[mode], await one_round(broker, args.n, mode))
        cells = [f"{rates[m]:,.0f} ({rates[m] / rates['off']:.2f}x)" for m in modes]
        print(f"| {broker} | {' | '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
