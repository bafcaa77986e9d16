"""The telemetry seam: observers see every message sent, processed and settled."""

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from iambus import Dispatcher, ImproperlyConfigured, Retry
from iambus.database import Database
from iambus.errors import RegistrationClosed
from iambus.telemetry import Observer, Processing, Sending, Settlement, system_of
from iambus.testing import watch
from iambus.transports.memory import MemoryTransport

from .conftest import Bus


@dataclass(frozen=True, slots=True)
class Shipped:
    order_id: int


ROUTES: dict[type | str, str] = {Shipped: "warehouse"}


class Recorder(Observer):
    """Writes down each point it is told of, and adds a header to what is sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.second_done = asyncio.Event()  # the second attempt's processing ended

    @contextlib.contextmanager
    def send(self, sending: Sending) -> Iterator[None]:
        sending.headers[f"x-{self.name}"] = sending.envelope.id
        self.seen.append(f"{sending.operation} {sending.destination}")
        yield

    @contextlib.contextmanager
    def process(self, processing: Processing) -> Iterator[None]:
        self.headers.append(dict(processing.envelope.headers))
        self.seen.append(f"process {processing.destination} #{processing.attempt}")
        yield
        self.seen.append(f"processed {type(processing.error).__name__}")
        if processing.attempt == 2:
            self.second_done.set()

    @contextlib.contextmanager
    def settle(self, settlement: Settlement) -> Iterator[None]:
        yield
        self.seen.append(f"{settlement.outcome} {settlement.delay}")


async def test_every_observer_sees_each_send_delivery_and_settlement(bus: Bus) -> None:
    warehouse = Dispatcher(
        transport=bus.transport(),
        service="warehouse",
        routes=ROUTES,
        retry=Retry(attempts=2, backoff=0.01, jitter=False),
    )
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    first, second, consumer = Recorder("first"), Recorder("second"), Recorder("consumer")
    shop.instrument(first)
    shop.instrument(second)  # added to the first, not instead
    warehouse.instrument(consumer)

    @warehouse.events.register(Shipped)
    async def on_shipped(event: Shipped) -> None:
        raise ValueError("no stock")

    async with warehouse, shop:
        await shop.send(Shipped(1))
        await asyncio.wait_for(consumer.second_done.wait(), 15)

    assert first.seen == second.seen == ["send event.Shipped"]
    assert consumer.seen == [
        "process event.Shipped #1",
        "retry 0.01",  # settled inside the processing
        "processed ValueError",
        "process event.Shipped #2",
        "dead_letter None",
        "processed ValueError",
    ]
    # What the producer's observers added travelled in the envelope's headers.
    [header] = {h["x-first"] for h in consumer.headers}
    assert all(h["x-second"] == header for h in consumer.headers)


def test_instrument_refuses_what_is_not_an_observer() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"an iambus.telemetry.Observer .* got 'x'"):
        dp.instrument(Recorder("ok"), "x")  # type: ignore[arg-type]
    assert dp.telemetry is None  # nothing attached when one is wrong


async def test_instrument_after_the_start_is_refused() -> None:
    dp = Dispatcher(transport=MemoryTransport(), service="warehouse", routes=ROUTES)

    @dp.events.register(Shipped)
    async def on_shipped(event: Shipped) -> None: ...

    async with dp:
        with pytest.raises(RegistrationClosed, match="attach observers before"):
            dp.instrument(Recorder("late"))


def test_system_of_names_the_messaging_system() -> None:
    assert system_of("redis://127.0.0.1:6379/0") == "redis"
    assert system_of("rediss://host") == "redis"
    assert system_of("amqp://guest:guest@127.0.0.1/") == "rabbitmq"
    assert system_of("nats://127.0.0.1:4222") == "nats"
    assert system_of("memory://") == "memory"


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )


def test_import_iambus_imports_no_telemetry_package() -> None:
    done = run(
        "import sys, iambus, iambus.telemetry\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('opentelemetry', 'prometheus_client')]\n"
        "print(loaded)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "make", "blocked", "extra"),
    [
        ("iambus.tracing", "Tracing()", "opentelemetry", "iambus[otel]"),
        ("iambus.metrics", "Metrics()", "opentelemetry", "iambus[otel]"),
        ("iambus.metrics", "PrometheusMetrics()", "prometheus_client", "iambus[prometheus]"),
    ],
)
def test_a_missing_package_is_an_import_error_naming_the_extra(
    module: str, make: str, blocked: str, extra: str
) -> None:
    done = run(
        f"import sys\n"
        f"sys.modules['{blocked}'] = None\n"  # as if not installed
        f"sys.modules['{blocked}.metrics'] = None\n"
        f"try:\n"
        f"    from {module} import *\n"
        f"    {make}\n"
        f"except ImportError as exc:\n"
        f"    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"pip install '{extra}'" in done.stdout


# -- an observer that fails ---------------------------------------------------------------


class Faulty(Observer):
    """An observer with a bug at one point (``where``), on entering its block or, for
    ``after``, on leaving it once the work is done."""

    def __init__(self, where: str) -> None:
        self.where = where

    @contextlib.contextmanager
    def _block(self, hook: str) -> Iterator[None]:
        if self.where == hook:
            raise RuntimeError(f"observer bug in {hook}")
        yield
        if self.where == "after":
            raise OSError("a metrics file write failed")

    def send(self, sending: Sending) -> contextlib.AbstractContextManager[None]:
        return self._block("send")

    def process(self, processing: Processing) -> contextlib.AbstractContextManager[None]:
        return self._block("process")

    def settle(self, settlement: Settlement) -> contextlib.AbstractContextManager[None]:
        return self._block("settle")


@pytest.mark.parametrize("where", ["send", "process", "settle", "after"])
async def test_an_observer_that_raises_changes_nothing_for_the_message(
    bus: Bus, where: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its error is logged; the message is sent, handled once and acked all the same
    (it was: never acked, so handled again and again; or dead-lettered unhandled)."""
    monkeypatch.setattr("iambus.telemetry._complained", {})  # (logged once a minute)
    warehouse = Dispatcher(
        transport=bus.transport(), service="warehouse", routes=ROUTES, retry=Retry(attempts=3)
    )
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    warehouse.instrument(Faulty(where))
    shop.instrument(Faulty(where))
    handled: list[int] = []

    @warehouse.events.register(Shipped)
    async def on_shipped(event: Shipped) -> None:
        handled.append(event.order_id)

    watched = watch(warehouse, shop)
    async with warehouse, shop:
        await shop.send(Shipped(1))
        done = await watched.settled(timeout=20)
    assert handled == [1]
    assert [(s.outcome, s.attempt) for s in done.settlements] == [("acked", 1)]
    assert any(f"failed in {where if where != 'after' else 'send'}()" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")  # fmt: skip


async def test_a_relay_whose_observer_raises_after_a_send_sends_the_row_once(
    bus: Bus, database: Database
) -> None:
    warehouse = Dispatcher(transport=bus.transport(), service="warehouse", routes=ROUTES)
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES, database=database)
    shop.instrument(Faulty("after"))
    handled: list[int] = []

    @warehouse.events.register(Shipped)
    async def on_shipped(event: Shipped) -> None:
        handled.append(event.order_id)

    watched = watch(warehouse, shop)
    async with warehouse, shop:
        async with database.connection() as conn, shop.unit_of_work(conn):
            await shop.publish(Shipped(7))
        done = await watched.settled(timeout=20)  # the outbox emptied too
    assert handled == [7]
    assert [s.outcome for s in done.settlements] == ["acked"]


class Outcomes(Observer):
    """Writes down each settlement's outcome; ``dead`` is set at a dead letter."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.dead = asyncio.Event()

    @contextlib.contextmanager
    def settle(self, settlement: Settlement) -> Iterator[None]:
        yield
        self.outcomes.append(settlement.outcome)
        if settlement.outcome == "dead_letter":
            self.dead.set()


@dataclass(frozen=True)
class NegativeDelay(Retry):
    """A policy with a bug: its delay is negative, which the worker refuses."""

    def delay(self, attempt: int) -> float:
        return -1.0


async def test_a_settlement_made_after_a_failed_settle_is_observed_too(bus: Bus) -> None:
    warehouse = Dispatcher(
        transport=bus.transport(),
        service="warehouse",
        routes=ROUTES,
        retry=NegativeDelay(attempts=2, backoff=0.01),
    )
    shop = Dispatcher(transport=bus.transport(), service="shop", routes=ROUTES)
    seen = Outcomes()
    warehouse.instrument(seen)

    @warehouse.events.register(Shipped)
    async def on_shipped(event: Shipped) -> None:
        raise LookupError(event.order_id)

    async with warehouse, shop:
        await shop.send(Shipped(1))
        await asyncio.wait_for(seen.dead.wait(), 20)
    assert seen.outcomes == ["retry", "dead_letter"]


class Noting(Observer):
    """Notes its blocks (a class, not a generator, whose garbage collection would leave
    the block all by itself)."""

    def __init__(self, name: str, seen: list[str], interrupt: str | None = None) -> None:
        self.name, self.seen, self.interrupt = name, seen, interrupt

    def process(self, processing: Processing) -> "Noting":
        return self

    def __enter__(self) -> None:
        if self.interrupt == "enter":
            raise KeyboardInterrupt
        self.seen.append(f"{self.name} in")

    def __exit__(self, *exc_info: object) -> None:
        self.seen.append(f"{self.name} out")
        if self.interrupt == "exit":
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["enter", "exit"])
def test_an_interrupt_in_one_observer_still_ends_the_others_blocks(where: str) -> None:
    """A KeyboardInterrupt is not an observer's own error (those are logged): it goes on,
    but every block already entered is left, so spans end and gauges come back down."""
    from iambus.envelope import Envelope
    from iambus.telemetry import Telemetry

    seen: list[str] = []
    telemetry = Telemetry.of(
        Noting("a", seen), Noting("b", seen, interrupt=where), Noting("c", seen)
    )
    assert telemetry is not None
    point = Processing("memory", "event", "event.A", "g", "h", Envelope("A", b"{}"), 1)
    with pytest.raises(KeyboardInterrupt), telemetry.process(point):
        pass
    if where == "enter":
        assert seen == ["a in", "a out"]
    else:
        assert seen == ["a in", "b in", "c in", "c out", "b out", "a out"]
