"""A worker's Prometheus metrics and health probes, over HTTP.

``iambus worker --metrics-port 9100`` serves, on ``--metrics-host`` (127.0.0.1):

* ``/metrics``: Prometheus's text format, made by the official client library
  (``pip install 'iambus[prometheus]'``): what the process registered in
  ``prometheus_client``'s registry, this worker's own gauges, and each of its service's
  groups read from the broker at scrape time — messages waiting (the lag), in flight,
  retrying, and dead letters (see ``BrokerGauges``);
* ``/health/live`` and ``/health/ready``: 200 or 503 with a small JSON body (see
  ``liveness`` and ``readiness``); ``--health-port`` serves them alone, on a port of
  their own, without the extra.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes on one host), every
process listens on the same metrics port (``SO_REUSEPORT``) and the one the kernel hands
a scrape to answers for all of them, from the directory they share, as gunicorn does with
``prometheus_client``'s multiprocess mode; the broker's gauges are read by that process
alone, so they are never counted twice. See ``docs/monitoring.md``.

From Python::

    from iambus.monitoring import Server

    async with Server(dp, port=9100):  # metrics and health, as the command serves them
        await dp.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .dispatching import Dispatcher
from .status import GroupStatus, status

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "BROKER_CACHE",
    "BROKER_TIMEOUT",
    "UNHEALTHY_AFTER",
    "BrokerGauges",
    "Server",
    "liveness",
    "readiness",
]

logger = logging.getLogger(__name__)

BROKER_CACHE = 2.0  # seconds one reading of the broker answers scrapes
BROKER_TIMEOUT = 5.0  # seconds one reading of the broker may take
UNHEALTHY_AFTER = 60.0  # seconds the transport may be down before /health/live fails
REFRESH = 1.0  # seconds between two updates of this process's own gauges
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request, and to read the answer
MAX_CLIENTS = 64  # connections served at once; more are closed at once
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"


def _prometheus() -> Any:
    """``prometheus_client``, or the error that says how to install it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "iambus's Prometheus metrics need prometheus_client, which is not installed: "
            "pip install 'iambus[prometheus]'"
        ) from exc
    return prometheus_client


# -- health -----------------------------------------------------------------------------


def liveness(dp: Dispatcher, *, unhealthy_after: float = UNHEALTHY_AFTER) -> tuple[bool, str]:
    """Whether the process is alive and well, and why not: it fails once the worker's
    transport has been down (every receive failing) for more than ``unhealthy_after``
    seconds — a restart may help then. A worker starting, draining or consuming nothing
    is alive."""
    health = dp.health()
    if health is not None and health.down_for > unhealthy_after:
        return False, (
            f"the transport has been down for {health.down_for:.0f}s "
            f"({health.failed_receives} failed receives), more than {unhealthy_after:g}s"
        )
    return True, "alive"


def readiness(dp: Dispatcher) -> tuple[bool, str]:
    """Whether the worker consumes, and why not: started, not stopping, and the
    transport up (its receives working, its connection not lost)."""
    health = dp.health()
    if health is None and dp.running:
        # Started with nothing to consume (a service that only sends, or runs a relay).
        return True, "running; it consumes nothing"
    if health is None or not health.consuming:
        return False, "the worker is not consuming (starting, stopping or stopped)"
    if health.down_for > 0:
        return False, (
            f"the transport is down: for {health.down_for:.1f}s "
            f"({health.failed_receives} failed receives)"
        )
    return True, "consuming"


def _health_body(dp: Dispatcher, ok: bool, reason: str) -> bytes:
    health = dp.health()
    body = {
        "status": "ok" if ok else "failing",
        "reason": reason,
        "service": dp.service,
        "consuming": health is not None and health.consuming,
        "down_for": round(health.down_for, 3) if health is not None else 0.0,
        "failed_receives": health.failed_receives if health is not None else 0,
    }
    return json.dumps(body).encode() + b"\n"


# -- the broker's gauges ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reading:
    at: float  # monotonic
    up: bool
    took: float
    groups: tuple[GroupStatus, ...]


class BrokerGauges:
    """The gauges of each group of ``dp``'s service, read from the broker through
    ``iambus.status`` (its ``Monitor`` and dead-letter count), as a ``prometheus_client``
    collector.

    ``refresh()`` reads the broker at most once per ``cache`` seconds (concurrent scrapes
    share one reading), within ``timeout`` seconds; a broker that is down or slow makes
    ``iambus_broker_up`` 0 and leaves the groups' gauges out, instead of failing or
    hanging the scrape.
    """

    def __init__(
        self, dp: Dispatcher, *, cache: float = BROKER_CACHE, timeout: float = BROKER_TIMEOUT
    ) -> None:
        self.dp = dp
        self.cache = cache
        self.timeout = timeout
        self._reading = _Reading(at=-float("inf"), up=False, took=0.0, groups=())
        self._pending: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Cancel a broker read in progress (a stopping server waits for none)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending

    async def refresh(self) -> None:
        if time.monotonic() - self._reading.at < self.cache:
            return
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._read())
        await asyncio.shield(self._pending)

    async def _read(self) -> None:
        started = time.monotonic()
        remote = self.dp.remote
        if remote is None or self.dp.health() is None:  # no worker: the transport is not open
            self._reading = _Reading(at=started, up=False, took=0.0, groups=())
            return
        try:
            async with asyncio.timeout(self.timeout):
                found = await status(remote.transport, service=self.dp.service)
        except Exception as exc:
            logger.warning(
                "iambus: reading the broker's gauges failed (iambus_broker_up 0): %s: %s",
                type(exc).__name__,
                exc or f"no answer within {self.timeout:g}s",
            )
            self._reading = _Reading(
                at=started, up=False, took=time.monotonic() - started, groups=()
            )
            return
        self._reading = _Reading(
            at=started, up=True, took=time.monotonic() - started, groups=found.groups
        )

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        reading = self._reading
        service = self.dp.service or ""
        up = GaugeMetricFamily(
            "iambus_broker_up",
            "1 if the last reading of the broker's gauges succeeded, else 0",
            labels=["service"],
        )
        up.add_metric([service], 1.0 if reading.up else 0.0)
        took = GaugeMetricFamily(
            "iambus_broker_read_seconds",
            "How long the last reading of the broker's gauges took",
            labels=["service"],
        )
        took.add_metric([service], reading.took)
        yield up
        yield took
        labels = ["service", "group", "address"]
        families = {
            name: GaugeMetricFamily(f"iambus_group_{name}", doc, labels=labels)
            for name, doc in _GROUP_GAUGES.items()
        }
        for group in reading.groups:
            values = {
                "waiting_messages": group.waiting,
                "in_flight_messages": group.in_flight,
                "retrying_messages": group.retrying,
                "dead_letters": group.dead,
            }
            for name, value in values.items():
                if value is not None:  # None: this broker cannot tell
                    families[name].add_metric(
                        [group.service, group.group, group.address], float(value)
                    )
        yield from families.values()


_GROUP_GAUGES = {
    "waiting_messages": "Messages stored for the group and not yet delivered (its lag)",
    "in_flight_messages": "Messages delivered to a consumer of the group, not yet settled",
    "retrying_messages": "Messages of the group waiting out a retry's delay",
    "dead_letters": "Dead letters of the group, not replayed nor purged",
}


# -- this process's own metrics -----------------------------------------------------------

_GAUGES: dict[str, Any] = {}  # made once per process: prometheus_client refuses twice


def _instrument(dp: Dispatcher) -> Callable[[], None]:
    """Instrument this process's dispatcher for Prometheus; return what updates its
    gauges (called every ``REFRESH`` seconds and before each scrape).

    The per-message counters and histograms (``iambus.metrics.PrometheusMetrics``, one
    per process, in prometheus_client's default registry: in multiprocess mode their
    values go to the shared directory), attached to ``dp`` unless it has them already;
    and ``iambus_worker_consuming`` and ``iambus_worker_receive_down_seconds``, from
    ``dp.health()``. In multiprocess mode every process keeps its own series (``pid``
    label), dropped when it stops.
    """
    prometheus = _prometheus()
    if "messages" not in _GAUGES:
        from .metrics import PrometheusMetrics

        _GAUGES["messages"] = PrometheusMetrics()
    observers = () if dp.telemetry is None else dp.telemetry.observers
    if _GAUGES["messages"] not in observers:
        if dp.started:  # (observers are attached before the start)
            logger.warning(
                "iambus: the metrics server started after the dispatcher: it shows no "
                "per-message counts (iambus_messages_*); start it first, as `iambus worker "
                "--metrics-port` does, or attach iambus.metrics.PrometheusMetrics() yourself"
            )
        else:
            dp.instrument(_GAUGES["messages"])
    if "consuming" not in _GAUGES:
        _GAUGES["consuming"] = prometheus.Gauge(
            "iambus_worker_consuming",
            "1 while the worker consumes (started, not stopping), else 0",
            ["service"],
            multiprocess_mode="liveall",
        )
        _GAUGES["down"] = prometheus.Gauge(
            "iambus_worker_receive_down_seconds",
            "Seconds the worker's receives have been failing (the transport down); 0 if not",
            ["service"],
            multiprocess_mode="liveall",
        )
    consuming = _GAUGES["consuming"].labels(dp.service or "")
    down = _GAUGES["down"].labels(dp.service or "")

    def update() -> None:
        health = dp.health()
        consuming.set(1 if health is not None and health.consuming else 0)
        down.set(health.down_for if health is not None else 0.0)

    return update


def _registry(broker: BrokerGauges) -> CollectorRegistry:
    """What a scrape shows: the process's registry (or, in multiprocess mode, every
    process's metrics from the shared directory), and the broker's gauges."""
    prometheus = _prometheus()
    registry: CollectorRegistry = prometheus.CollectorRegistry(auto_describe=False)
    if MULTIPROCESS in os.environ:
        from prometheus_client import multiprocess

        if not os.path.isdir(os.environ[MULTIPROCESS]):
            raise NotADirectoryError(
                f"{MULTIPROCESS}={os.environ[MULTIPROCESS]!r} is not a directory: create it "
                f"(empty) before the worker processes start, and empty it between runs"
            )

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call, unused-ignore]
    else:
        registry.register(_Proxy(prometheus.REGISTRY))
    registry.register(broker)
    return registry


class _Proxy:
    """The default registry's metrics, inside the registry a scrape reads."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


# -- the server ---------------------------------------------------------------------------


class Server:
    """Serves ``/metrics`` (with ``metrics=True``) and ``/health/live`` and
    ``/health/ready`` (with ``health=True``) on ``host``:``port`` while in its
    ``async with`` (or between ``start()`` and ``stop()``); ``port=0`` takes a free one
    (``server.port`` says which).

    ``metrics`` needs ``prometheus_client`` (``ImportError`` naming the extra
    otherwise). In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) the metrics port is
    shared by the host's worker processes (``SO_REUSEPORT``).
    """

    def __init__(
        self,
        dp: Dispatcher,
        *,
        host: str = "127.0.0.1",
        port: int = 9100,
        metrics: bool = True,
        health: bool = True,
        unhealthy_after: float = UNHEALTHY_AFTER,
        broker_cache: float = BROKER_CACHE,
        broker_timeout: float = BROKER_TIMEOUT,
    ) -> None:
        self.dp = dp
        self.host = host
        self.port = port
        self.metrics = metrics
        self.health = health
        self.unhealthy_after = unhealthy_after
        self.broker = BrokerGauges(dp, cache=broker_cache, timeout=broker_timeout)
        self._update: Callable[[], None] = lambda: None
        self._registry: CollectorRegistry | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()  # the connections being served
        self._refresh: asyncio.Task[None] | None = None
        self._multiprocess = False
        if metrics:
            self._registry = _registry(self.broker)  # the errors at once
            self._multiprocess = MULTIPROCESS in os.environ

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; ``OSError`` when the port cannot be had (in use, say)."""
        if self.metrics:
            self._update = _instrument(self.dp)
            self._update()
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            reuse_port=self._multiprocess or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.metrics:
            self._refresh = asyncio.get_running_loop().create_task(
                self._refreshing(), name="iambus-metrics"
            )
        paths = [*(["/metrics"] if self.metrics else []), "/health/live", "/health/ready"]
        logger.info(
            "iambus: serving %s on %s",
            ", ".join(paths if self.health else paths[:1]),
            self.url,
        )

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
            self._update()  # what the registry keeps: not consuming, once stopped
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            clients = list(self._clients)  # slow or silent ones do not hold the stop up
            for client in clients:
                client.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await server.wait_closed()
        await self.broker.close()
        if self._multiprocess:
            from prometheus_client import multiprocess

            # Its live gauges leave the merged output with it (prometheus_client's rule).
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call, unused-ignore]

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _refreshing(self) -> None:
        # In multiprocess mode another process may answer the scrape: each keeps its own
        # gauges current in the shared directory.
        while True:
            await asyncio.sleep(REFRESH)
            self._update()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_CLIENTS or task is None:
            writer.transport.abort()
            return
        self._clients.add(task)
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            except (
                TimeoutError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ):
                return  # not an HTTP request: nothing to answer
            try:
                code, kind, body = await self._answer(method, target.partition("?")[0])
            except Exception:  # a collector of the process's that raised, say
                logger.exception("iambus: answering %s %s failed", method, target)
                code, kind, body = 500, "text/plain", b"internal error (logged)\n"
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            async with asyncio.timeout(REQUEST_TIMEOUT):  # a client that does not read
                await writer.drain()
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # the client went away, or does not read
        finally:
            self._clients.discard(task)
            if task.cancelling():  # the server stops: no waiting for the client
                writer.transport.abort()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError, TimeoutError):
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        await writer.wait_closed()

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if self.metrics and path == "/metrics":
            return 200, *await self._scrape()
        if self.health and path in ("/health/live", "/health/ready"):
            if path == "/health/live":
                ok, reason = liveness(self.dp, unhealthy_after=self.unhealthy_after)
            else:
                ok, reason = readiness(self.dp)
            return (200 if ok else 503), "application/json", _health_body(self.dp, ok, reason)
        return 404, "text/plain", b"not found\n"

    async def _scrape(self) -> tuple[str, bytes]:
        from prometheus_client import exposition

        assert self._registry is not None
        self._update()
        await self.broker.refresh()
        # Made off the event loop: in multiprocess mode it reads every process's files.
        body = await asyncio.to_thread(exposition.generate_latest, self._registry)
        return exposition.CONTENT_TYPE_LATEST, body


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
