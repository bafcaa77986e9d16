"""iambus.monitoring: /metrics scraped over HTTP and parsed, the broker's gauges against a
known backlog and dead letter on every transport, the health probes through an outage of
a real broker (a loopback proxy cut and restored), and several worker processes sharing
one metrics port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iambus import Command, Dispatcher
from iambus.envelope import Envelope
from iambus.monitoring import BrokerGauges, Server, liveness, readiness
from iambus.retry import Retry
from iambus.transports import Instance

from .conftest import Bus, require
from .processes import Cluster, until


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


ROUTES: dict[type | str, str] = {ChargeCard: "billing"}
CHARGE, REFUND = "command.ChargeCard", "command.Refund"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels (each must appear once)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice in:\n{text}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def probe(url: str, path: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}{path}", timeout=10)
    return response.status_code, response.json()


def billing_on(bus: Bus) -> Dispatcher:
    """Billing's worker: a charge of a negative amount fails, and is dead-lettered."""
    billing = Dispatcher(
        transport=bus.transport(), service="billing", routes=ROUTES, retry=Retry(attempts=1)
    )

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        if command.amount < 0:
            raise ValueError("a negative amount")

    return billing


async def test_metrics_show_each_group_backlog_and_dead_letters_read_from_the_broker(
    bus: Bus,
) -> None:
    billing = billing_on(bus)
    watcher = bus.transport()
    await watcher.open()
    try:
        # Another worker of billing ran once: it declared a group and announced it. A
        # service of its own, elsewhere, is not billing's to report.
        await watcher.declare(REFUND, "billing", from_start=True)
        await watcher.declare("command.Ship", "shipping", from_start=True)
        for service, address in (("billing", REFUND), ("shipping", "command.Ship")):
            gone = Instance(service, f"{service}-1", "h", 1, time.time(), ((address, service),))
            await watcher.announce(gone)
            await watcher.withdraw(gone)
        async with billing, Server(billing, port=0, broker_cache=0) as server:
            for n in range(3):  # to a group nobody consumes
                await watcher.send(REFUND, Envelope(name="Refund", payload=b'{"n": %d}' % n))
            await watcher.send("command.Ship", Envelope(name="Ship", payload=b"{}"))
            await watcher.send(CHARGE, Envelope(name="ChargeCard", payload=b'{"amount": -1}'))
            found: Samples = {}

            async def shown() -> bool:
                nonlocal found
                found = await scrape(server.url)
                refund = {"service": "billing", "group": "billing", "address": REFUND}
                charging = {**refund, "address": CHARGE}
                return (
                    value(found, "iambus_group_waiting_messages", **refund) == 3
                    and value(found, "iambus_group_dead_letters", **charging) == 1
                )

            await until(shown, 15, "the backlog and the dead letter", detail=lambda: str(found))
        assert value(found, "iambus_broker_up", service="billing") == 1
        assert value(found, "iambus_worker_consuming", service="billing") == 1
        assert value(found, "iambus_worker_receive_down_seconds", service="billing") == 0
        assert (
            value(
                found,
                "iambus_group_waiting_messages",
                service="billing",
                group="billing",
                address=CHARGE,
            )
            == 0
        )
        # Only billing's groups: shipping's is never read.
        assert not [key for key in found if ("service", "shipping") in key[1]]
        # What the broker cannot tell is left out, not shown as 0.
        in_flight = value(
            found, "iambus_group_in_flight_messages", service="billing", group="billing",
            address=REFUND,
        )  # fmt: skip
        # (Kafka tells what its own consumers hold only: billing's transport consumes
        # no refund)
        assert in_flight == (None if bus.kind in ("rabbitmq", "kafka") else 0)
        assert "python_info" in {name for name, _ in found}  # the process's registry too
    finally:
        await watcher.close()


class Proxy:
    """A loopback TCP proxy to a real broker, to cut (an outage: connections closed,
    the port refused) and restore, without touching the broker."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.url = ""  # the broker's URL through it, with {port}
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        await self._server.wait_closed()
        self._server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links -= {writer, up_writer}


# broker -> (its port, the URL of a transport through a proxy on {port})
THROUGH = {
    "redis": (6379, "redis://127.0.0.1:{port}/0"),
    "rabbitmq": (5672, "amqp://guest:guest@127.0.0.1:{port}/"),
    "nats": (4222, "nats://127.0.0.1:{port}"),
}


@pytest.fixture(params=sorted(THROUGH))
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[Proxy]:
    require(request.param)
    made = Proxy(THROUGH[request.param][0])
    made.url = THROUGH[request.param][1]
    await made.start()
    yield made
    if made._server is not None:
        await made.cut()


async def test_metrics_count_what_the_worker_sent_processed_and_settled(bus: Bus) -> None:
    """The server started before the dispatcher (as `iambus worker --metrics-port` does)
    attaches the per-message counters: a scrape shows each delivery processed and
    settled, by outcome."""
    billing = billing_on(bus)
    async with Server(billing, port=0, broker_cache=0) as server, billing:
        before = await scrape(server.url)
        labels = {"kind": "command", "message": "ChargeCard", "group": "billing"}

        def count(samples: Samples, name: str, **more: str) -> float:
            return value(samples, name, **labels, **more) or 0.0

        await billing.send(ChargeCard(amount=5))
        await billing.send(ChargeCard(amount=-1))
        found: Samples = {}

        def grew(name: str, outcome: str) -> bool:
            return count(found, name, outcome=outcome) - count(before, name, outcome=outcome) >= 1

        async def shown() -> bool:
            nonlocal found
            found = await scrape(server.url)
            # A delivery is counted processed as its processing ends, after its settling
            # (a dead letter's is followed by the error handler's turn): both waited for.
            settled, processed = "iambus_messages_settled_total", "iambus_messages_processed_total"
            return (
                grew(settled, "ack")
                and grew(settled, "dead_letter")
                and grew(processed, "ok")
                and grew(processed, "error")
            )

        await until(
            shown,
            15,
            "a delivery acked and one dead-lettered, both counted processed",
            detail=lambda: str(found),
        )
    sent = value(found, "iambus_messages_sent_total", kind="command", message="ChargeCard",
                 outcome="ok")  # fmt: skip
    assert sent is not None
    assert sent >= 2


async def test_health_follows_an_outage_of_the_broker(proxy: Proxy) -> None:
    namespace = f"test-{os.urandom(5).hex()}"
    billing = Dispatcher(
        transport=f"{proxy.url.format(port=proxy.port)}?namespace={namespace}",
        service="billing",
        routes=ROUTES,
    )

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None: ...

    server = Server(billing, port=0, unhealthy_after=1.0, broker_cache=0, broker_timeout=1.0)
    async with server:
        # Not started: alive, not ready.
        assert (await probe(server.url, "/health/live"))[0] == 200
        code, body = await probe(server.url, "/health/ready")
        assert (code, body["status"], body["consuming"]) == (503, "failing", False)
        async with billing:
            assert await probe(server.url, "/health/ready") == (
                200,
                {
                    "status": "ok",
                    "reason": "consuming",
                    "service": "billing",
                    "consuming": True,
                    "down_for": 0.0,
                    "failed_receives": 0,
                },
            )
            await proxy.cut()

            async def unready() -> bool:
                return (await probe(server.url, "/health/ready"))[0] == 503

            await until(unready, 10, "/health/ready to fail once the broker is cut off")
            code, body = await probe(server.url, "/health/ready")
            assert "the transport is down" in str(body["reason"])
            health = billing.health()
            assert health is not None
            assert health.consuming
            assert health.down_for > 0
            if proxy.target == 6379:  # Redis's receives fail; RabbitMQ's and NATS's wait
                # while their driver reconnects (the transport, a Link, says it is down).
                assert health.failed_receives >= 1
            found = await scrape(server.url)  # answers, within the broker timeout
            assert value(found, "iambus_broker_up", service="billing") == 0
            assert value(found, "iambus_worker_receive_down_seconds", service="billing") > 0  # type: ignore[operator]

            async def dead() -> bool:
                return (await probe(server.url, "/health/live"))[0] == 503

            await until(dead, 15, "/health/live to fail after --unhealthy-after")
            code, body = await probe(server.url, "/health/live")
            assert "the transport has been down for" in str(body["reason"])
            assert float(body["down_for"]) > 1.0  # type: ignore[arg-type]

            await proxy.start()  # the broker is back, on the same port

            async def ready() -> bool:
                return (await probe(server.url, "/health/ready"))[0] == 200

            await until(ready, 20, "/health/ready once the broker is back")
            assert (await probe(server.url, "/health/live"))[0] == 200

            async def up() -> bool:
                found = await scrape(server.url)
                return value(found, "iambus_broker_up", service="billing") == 1

            await until(up, 10, "iambus_broker_up 1 once the broker is back")
        # Stopped: not ready.
        assert (await probe(server.url, "/health/ready"))[0] == 503
    assert billing.health() is None
    cleaner = billing.remote.transport if billing.remote else None
    assert cleaner is not None
    await cleaner.open()
    await cleaner.destroy()  # type: ignore[attr-defined]
    await cleaner.close()


def test_liveness_and_readiness_without_a_worker() -> None:
    dp = Dispatcher(service="billing")
    assert liveness(dp) == (True, "alive")
    assert readiness(dp)[0] is False


async def test_a_service_that_consumes_nothing_is_ready_while_it_runs() -> None:
    """A service that only sends (or runs only its relay) has no worker: it is ready
    once started, and not once stopped."""
    dp = Dispatcher(transport="memory://", service="shop", routes={ChargeCard: "billing"})
    assert readiness(dp)[0] is False
    async with dp:
        assert dp.health() is None
        assert readiness(dp) == (True, "running; it consumes nothing")
    assert readiness(dp)[0] is False


async def test_the_health_port_serves_the_probes_alone_without_the_extra() -> None:
    dp = Dispatcher(service="billing")
    async with Server(dp, port=0, metrics=False) as server, httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/metrics")).status_code == 404
        assert (await client.get(f"{server.url}/health/live")).status_code == 200
        assert (await client.post(f"{server.url}/health/live")).status_code == 405
        assert (await client.head(f"{server.url}/health/ready")).status_code == 503
        assert (await client.get(f"{server.url}/nothing")).status_code == 404


async def test_a_broker_read_that_hangs_makes_up_zero_within_the_timeout() -> None:
    from iambus.transports import Backlog
    from iambus.transports.memory import MemoryTransport

    class Stuck(MemoryTransport):
        """A broker that stops answering about its groups."""

        async def backlog(self, address: str, group: str) -> Backlog:
            await asyncio.sleep(3600)
            raise AssertionError("never")

    dp = Dispatcher(transport=Stuck(), service="billing", routes=ROUTES)

    @dp.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None: ...

    gauges = BrokerGauges(dp, cache=60, timeout=0.2)
    await gauges.refresh()  # no worker yet: nothing read, not up
    assert _up(gauges) == 0
    async with dp:
        await gauges.refresh()  # cached: the reading before the start still serves
        assert _up(gauges) == 0
        gauges.cache = 0
        started = time.monotonic()
        await asyncio.gather(gauges.refresh(), gauges.refresh())  # one reading, shared
        assert time.monotonic() - started < 2
        assert _up(gauges) == 0
    ok = BrokerGauges(Dispatcher(transport="memory://", service="billing", routes=ROUTES))
    assert _up(ok) == 0


def _up(gauges: BrokerGauges) -> float:
    [up] = [m for m in gauges.collect() if m.name == "iambus_broker_up"]
    return up.samples[0].value


def test_metrics_need_prometheus_client_and_say_which_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'iambus\[prometheus\]'"):
        Server(Dispatcher(service="billing"), port=0)
    Server(Dispatcher(service="billing"), port=0, metrics=False)  # health alone: no extra


def test_import_iambus_imports_no_prometheus_client() -> None:
    code = (
        "import sys, iambus, iambus.cli, iambus.monitoring, iambus.logs; "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_multiprocess_directory_that_does_not_exist_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError, match="create it"):
        Server(Dispatcher(service="billing"), port=0)


# -- several worker processes on one host ---------------------------------------------------

APP = """
from dataclasses import dataclass

from iambus import Command, Dispatcher
from iambus.retry import Retry


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


dp = Dispatcher(
    transport=config["url"], service="billing", routes={ChargeCard: "billing"},
    retry=Retry(attempts=1),
)


@dp.commands.register(ChargeCard)
async def charge(command: ChargeCard) -> None:
    record("charge", "command", command.amount)
    raise ValueError("declined")
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_worker_processes_share_one_metrics_port_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("redis")
    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    port = _free_port()
    options = ["--metrics-port", str(port), "--health-port", "0"]
    async with Cluster("redis", tmp_path, APP, claim_after=5.0) as cluster:
        cluster.watch(CHARGE, "billing", from_start=True)
        procs = [cluster.spawn(role, options=options) for role in ("w1", "w2")]
        await cluster.ready("w1", "w2")
        pids = {str(proc.pid) for proc in procs}
        await cluster.transport.send(CHARGE, Envelope(name="ChargeCard", payload=b'{"amount": 7}'))
        url = f"http://127.0.0.1:{port}"
        seen: Samples = {}

        async def both_and_dead() -> bool:
            nonlocal seen
            seen = await scrape(url)
            dead = value(
                seen, "iambus_group_dead_letters", service="billing", group="billing",
                address=CHARGE,
            )  # fmt: skip
            return dead == 1 and all(
                value(seen, "iambus_worker_consuming", service="billing", pid=pid) == 1
                for pid in pids
            )

        await until(both_and_dead, 20, "both workers and the dead letter in one scrape",
                    detail=lambda: str(seen))  # fmt: skip
        # Whichever process answers, every scrape shows both workers, and each group's
        # broker gauges once (parse() fails on a sample shown twice).
        for _ in range(6):
            samples = await scrape(url)
            consuming = {
                dict(labels)["pid"] for name, labels in samples if name == "iambus_worker_consuming"
            }
            assert consuming == pids
            assert [name for name, _ in samples].count("iambus_broker_up") == 1
        assert (await cluster.stop("w1")) == {"w1": 0}

        async def one_left() -> bool:
            samples = await scrape(url)
            names = [dict(labels).get("pid") for name, labels in samples
                     if name == "iambus_worker_consuming"]  # fmt: skip
            return names == [str(procs[1].pid)]

        # The stopped process's live gauges leave the merged output (mark_process_dead).
        await until(one_left, 10, "the stopped worker to leave the scrape")
        assert (await cluster.stop("w2")) == {"w2": 0}


async def test_a_collector_that_raises_makes_a_500_and_the_server_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import REGISTRY

    class Broken:
        registered = False

        def collect(self) -> list[object]:
            if not self.registered:  # registering reads it once
                self.registered = True
                return []
            raise RuntimeError("a collector's bug")

    dp = Dispatcher(service="billing")
    broken = Broken()
    async with Server(dp, port=0) as server, httpx.AsyncClient() as client:
        REGISTRY.register(broken)  # type: ignore[arg-type]
        try:
            response = await client.get(f"{server.url}/metrics")
        finally:
            REGISTRY.unregister(broken)  # type: ignore[arg-type]
        assert response.status_code == 500
        assert "a collector's bug" in caplog.text
        assert (await client.get(f"{server.url}/metrics")).status_code == 200


def _serving() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if "Server._serve" in repr(t.get_coro())]


async def test_a_stop_ends_the_connections_of_silent_clients_at_once() -> None:
    dp = Dispatcher(transport="memory://", service="billing")
    server = Server(dp, port=0, metrics=False)
    await server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health/live HTTP/1.1\r\n")  # and never the end of its head
    await writer.drain()
    await until(lambda: bool(_serving()), 5, "the connection served")
    began = time.monotonic()
    await server.stop()
    assert time.monotonic() - began < 2  # (REQUEST_TIMEOUT is 5 s)
    assert _serving() == []
    writer.close()


async def test_a_client_that_does_not_read_its_answer_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("iambus.monitoring.REQUEST_TIMEOUT", 0.5)
    dp = Dispatcher(transport="memory://", service="billing")
    server = Server(dp, port=0, metrics=False)

    async def huge(method: str, path: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"x" * (64 << 20)  # more than the socket buffers hold

    monkeypatch.setattr(server, "_answer", huge)
    await server.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await loop.sock_sendall(sock, b"GET /health/live HTTP/1.1\r\n\r\n")
        await until(lambda: bool(_serving()), 5, "the connection served")
        await until(lambda: not _serving(), 10, "the connection cut off")
    finally:
        sock.close()
        await server.stop()


async def test_connections_past_the_limit_and_requests_that_are_not_http_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("iambus.monitoring.MAX_CLIENTS", 1)
    dp = Dispatcher(transport="memory://", service="billing")
    async with Server(dp, port=0, metrics=False) as server:
        _, first = await asyncio.open_connection("127.0.0.1", server.port)
        first.write(b"GET /health/live HTTP/1.1\r\n")  # held open: the one allowed
        await first.drain()
        await until(lambda: bool(_serving()), 5, "the first connection served")
        second, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(second.read(), 5) == b""  # closed, unanswered
        writer.close()
        first.close()
        await until(lambda: not _serving(), 10, "the first connection ended")
        junk, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert await asyncio.wait_for(junk.read(), 5) == b""  # not HTTP: nothing to answer
        writer.close()
        code, _ = await probe(server.url, "/health/live")  # and it serves on
        assert code == 200
