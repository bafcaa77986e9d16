"""The ``iambus`` command: ``worker`` and ``dlq``, run in-process through ``main(argv)``.

The dead-letter commands run on every broker (Redis, RabbitMQ, NATS); the worker
subprocess on Redis. A test skips locally, and fails in CI, when its broker is down.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

import iambus
from iambus import Dispatcher
from iambus.cli import main
from iambus.database import Database
from iambus.envelope import Envelope
from iambus.outbox import Outgoing, write
from iambus.relay import OutboxStatus, outbox_status
from iambus.transports import (
    DeadLetter,
    Delivery,
    Failure,
    Instance,
    Registry,
    Transport,
    connect,
    redact,
)

from .conftest import POSTGRES_DSN, require
from .processes import BROKERS, broker_url

# An application module, as a user would write it. DEFAULTS is replaced per test.
APP = """
from dataclasses import dataclass

from iambus import Command, Dispatcher


@dataclass(frozen=True, slots=True)
class Ping:
    n: int


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


CONFIG = {"not": "a dispatcher"}
dp = Dispatcher(DEFAULTS)


@dp.events.register(Ping)
async def record(event: Ping) -> None:
    with open(HANDLED, "a") as log:
        log.write(f"{event.n}\\n")


@dp.commands.register(ChargeCard)
async def charge(command: ChargeCard) -> None:
    pass


def create() -> Dispatcher:
    return dp
"""
UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@dataclass
class Apps:
    """Writes application modules into a directory that is the current one."""

    root: Path
    names: list[str]

    def write(self, source: str, *, name: str | None = None) -> str:
        name = name or f"app_{uuid.uuid4().hex[:8]}"
        (self.root / f"{name}.py").write_text(source, encoding="utf-8")
        importlib.invalidate_caches()
        self.names.append(name)
        return name

    def app(self, defaults: str = "", handled: Path | None = None) -> str:
        """An APP module whose dispatcher is ``Dispatcher(<defaults>)``."""
        handled = handled or self.root / "handled.txt"
        source = APP.replace("DEFAULTS", defaults).replace("HANDLED", repr(str(handled)))
        return self.write(source)


@pytest.fixture
def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Apps]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the cwd on it
    made = Apps(tmp_path, [])
    yield made
    for name in made.names:
        sys.modules.pop(name, None)


ORDERS = 'transport="redis://127.0.0.1:1/0", service="orders", routes={ChargeCard: "billing"}'


# -- the command itself -----------------------------------------------------------------


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"iambus {iambus.__version__}\n"

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "worker" in out
    assert "dlq" in out

    assert main(["worker", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("MODULE:ATTR", "app", "factory", "--transport", "--concurrency", "--uvloop"):
        assert option in out

    assert main(["dlq", "purge", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--all" in out
    assert "--yes" in out


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert main(["dlq"]) == 2
    assert main(["dlq", "list"]) == 2  # --transport is required
    assert "--transport" in capsys.readouterr().err


def test_the_package_runs_as_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["iambus", "--version"])
    monkeypatch.delitem(sys.modules, "iambus.__main__", raising=False)
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("iambus", run_name="__main__")
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"iambus {iambus.__version__}\n"


def test_python_m_iambus_and_the_console_script_are_the_same_command() -> None:
    expected = f"iambus {iambus.__version__}\n"
    for command in (
        [sys.executable, "-m", "iambus", "--version"],
        [str(Path(sys.executable).with_name("iambus")), "--version"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
        assert (done.returncode, done.stdout) == (0, expected), done.stderr


# -- worker: what it refuses, and why ---------------------------------------------------


@pytest.mark.parametrize("spec", ["app", "app:", ":dp", "my-app:dp", "app:dp:x", "app:1dp"])
def test_worker_wants_module_colon_attribute(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", spec]) == 2
    err = capsys.readouterr().err
    assert f"expected MODULE:ATTR, e.g. 'myapp.worker:dp', got {spec!r}" in err
    assert "Traceback" not in err


def test_worker_says_which_module_it_cannot_import(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "no_such_module_xyz.worker:dp"]) == 2
    err = capsys.readouterr().err
    assert "cannot import module 'no_such_module_xyz.worker'" in err
    assert str(apps.root) in err  # where it looked

    name = apps.write("import a_dependency_that_is_not_installed\n")
    assert main(["worker", f"{name}:dp"]) == 2
    err = capsys.readouterr().err
    assert f"importing module {name!r} failed: No module named 'a_dependency_" in err
    assert "Traceback" not in err


def test_worker_reports_a_misconfigured_module_without_a_traceback(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.write("from iambus import Dispatcher\ndp = Dispatcher(routes={'Ping': 'x'})\n")
    assert main(["worker", f"{name}:dp"]) == 2
    err = capsys.readouterr().err
    assert f"importing module {name!r} failed: routes need a transport" in err
    assert "Traceback" not in err


def test_worker_lets_a_bug_in_the_module_raise_with_its_traceback(apps: Apps) -> None:
    name = apps.write("dp = 1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        main(["worker", f"{name}:dp"])


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("nope", "has no attribute 'nope'"),
        ("dp.nope", "has no attribute 'dp.nope'"),
        ("CONFIG", "is a dict, not a Dispatcher (or a function taking no arguments"),
        ("Ping", "is a type, not a Dispatcher"),
    ],
)
def test_worker_wants_a_dispatcher(
    apps: Apps, attr: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.app(ORDERS)
    assert main(["worker", f"{name}:{attr}"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("def make():\n    return 'dp'\n", "make() returned a str, not a Dispatcher"),
        ("def make(settings):\n    return dp\n", "make needs arguments"),
        ("async def make():\n    return dp\n", "make is async"),
        (
            "def make():\n    return Dispatcher(routes={'Ping': 'x'})\n",
            "make() failed: routes need a transport",
        ),
    ],
)
def test_worker_wants_a_factory_to_return_a_dispatcher(
    apps: Apps, factory: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.write(f"from iambus import Dispatcher\ndp = Dispatcher()\n{factory}")
    assert main(["worker", f"{name}:make"]) == 2
    assert message in capsys.readouterr().err


def test_worker_wants_a_transport_and_routes(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.app()  # Dispatcher(): in-process only
    assert main(["worker", f"{name}:dp"]) == 2
    err = capsys.readouterr().err
    assert (
        "has no transport, so there is nothing to consume: build its Dispatcher with transport="
        in err
    )
    assert "--transport can then point it at another broker" in err

    # A transport alone does not make anything travel through it.
    assert main(["worker", f"{name}:dp", "--transport", "memory://"]) == 2
    assert "routes no messages, so a worker has nothing to consume" in capsys.readouterr().err


def test_worker_refuses_an_unknown_transport(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.app(ORDERS)
    assert main(["worker", f"{name}:dp", "--transport", "mqtt://x"]) == 2
    assert "unknown transport URL 'mqtt://x'" in capsys.readouterr().err


def test_worker_cannot_override_a_dispatcher_started_on_import(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.write(
        "from iambus import Dispatcher\n"
        "dp = Dispatcher(transport='memory://', service='worker', routes={'Ping': 'tester'})\n"
        "dp.start()\n"
    )
    assert main(["worker", f"{name}:dp", "--service", "billing"]) == 2
    assert "was started on import; --transport and --service only apply" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--concurrency", "0"),
        ("--concurrency", "many"),
        ("--shutdown-timeout", "-1"),
        ("--shutdown-timeout", "nan"),
        ("--shutdown-timeout", "soon"),
        ("--shutdown-timeout", "inf"),
        ("--log-level", "LOUD"),
        ("--service", ""),
        ("--metrics-port", "70000"),
        ("--metrics-port", "http"),
        ("--health-port", "-1"),
        ("--unhealthy-after", "0"),
        ("--log-format", "xml"),
    ],
)
def test_worker_checks_its_options(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "app:dp", option, value]) == 2
    err = capsys.readouterr().err
    # One line, as every other error of the command: no usage block.
    assert err.splitlines() == [err.rstrip("\n")]
    assert err.startswith(f"iambus worker: error: argument {option}")
    assert err.rstrip().endswith("(see 'iambus worker --help')")


def test_worker_uvloop_needs_uvloop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # importing it fails, installed or not
    assert main(["worker", "app:dp", "--uvloop"]) == 2
    assert "--uvloop needs uvloop, which is not installed: pip install uvloop" in (
        capsys.readouterr().err
    )


def test_worker_metrics_need_prometheus_client_and_a_free_port(
    apps: Apps, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.app('transport="memory://", service="billing", routes={ChargeCard: "billing"}')
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "prometheus_client", None)  # not installed
        assert main(["worker", f"{name}:dp", "--metrics-port", "0"]) == 2
        assert (
            "--metrics-port: iambus's Prometheus metrics need prometheus_client, which is "
            "not installed: pip install 'iambus[prometheus]'"
        ) in capsys.readouterr().err
    assert main(["worker", f"{name}:dp", "--metrics-port", "9", "--health-port", "9"]) == 2
    assert "--health-port 9 is --metrics-port too" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["worker", f"{name}:dp", "--health-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"iambus: error: --health-port {port}: cannot listen on 127.0.0.1:{port}: " in err


def test_worker_reports_a_set_up_error_found_at_start(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    # ChargeCard is routed to billing, but the dispatcher serves as orders.
    name = apps.app(ORDERS)
    assert main(["worker", f"{name}:dp", "--transport", "memory://"]) == 2
    err = capsys.readouterr().err
    assert f"{name}:dp: {name}.ChargeCard is routed to service 'billing'" in err
    assert "Traceback" not in err


def test_worker_reports_an_unreachable_broker(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    name = apps.app(ORDERS)
    assert main(["worker", f"{name}:dp", "--service", "billing"]) == 1
    err = capsys.readouterr().err
    assert f"iambus: error: {UNREACHABLE}: connect failed" in err
    assert "Traceback" not in err


def test_worker_reports_an_unreachable_database(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its relay starts with the dispatcher: a database that fails then (down, or its
    # connection terminated) ends the worker with one line, as `iambus relay`.
    dsn = "postgresql://postgres:s3cret@127.0.0.1:1/test"  # nothing listens on port 1
    source = APP.replace("DEFAULTS", f'{ORDERS}, database=Database("{dsn}")')
    source = source.replace("HANDLED", "'handled.txt'")
    name = apps.write("from iambus.database import Database\n" + source)
    argv = ["worker", f"{name}:dp", "--transport", "memory://", "--service", "billing"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        f"iambus: error: {name}:dp: the database postgresql://postgres:***@127.0.0.1:1/test "
        f"failed: " in err
    )
    assert "Traceback" not in err


def test_worker_stops_with_one_line_when_receiving_fails_for_good(
    apps: Apps, capsys: pytest.CaptureFixture[str]
) -> None:
    # A set-up error met while serving (not at start): the worker stops and says so once,
    # instead of retrying forever.
    name = apps.app('transport="memory://", service="billing", routes={ChargeCard: "billing"}')
    apps.write(
        "from iambus import ImproperlyConfigured\n"
        "from iambus.transports.memory import MemoryTransport\n"
        f"from {name} import dp\n\n"
        "class Misconfigured(MemoryTransport):\n"
        "    async def receive(self, *args, **kwargs):\n"
        "        raise ImproperlyConfigured(\"memory://: no group 'billing' on 'command."
        "ChargeCard'; declare() it before receiving\")\n\n"
        "dp.remote.transport = Misconfigured()\n",
        name=f"{name}_broken",
    )
    deadline = time.monotonic() + 15  # a guard: a worker still serving then gets SIGTERM
    code = main_with_sigterm(["worker", f"{name}_broken:dp"], lambda: time.monotonic() > deadline)
    err = capsys.readouterr().err
    assert code == 2, err  # a set-up error; SIGTERM (the test's guard) would give 0
    lines = [line for line in err.splitlines() if line.startswith("iambus: error:")]
    assert lines == [
        f"iambus: error: {name}_broken:dp: memory://: no group 'billing' on "
        f"'command.ChargeCard'; declare() it before receiving"
    ]
    assert "Traceback" not in err


@pytest.mark.parametrize("scheme", ["redis", "amqp", "nats"])
def test_the_command_never_shows_a_password(
    scheme: str, apps: Apps, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{scheme}://u:s3cret@127.0.0.1:1/0"  # nothing listens on port 1
    assert main(["dlq", "list", "--transport", url]) == 1
    assert f"{scheme}://u:***@127.0.0.1:1/0: connect failed" in capsys.readouterr().err
    name = apps.app(ORDERS)
    assert main(["worker", f"{name}:dp", "--service", "billing", "--transport", url]) == 1
    out = capsys.readouterr()
    assert f"{scheme}://u:***@127.0.0.1:1/0: connect failed" in out.err
    assert "s3cret" not in out.out + out.err + caplog.text


# Runs the command with one driver's import blocked, as if it were not installed.
WITHOUT = (
    "import sys; sys.modules[sys.argv.pop(1)] = None; "
    "from iambus.cli import main; sys.exit(main(sys.argv[1:]))"
)
NATS_APP = 'transport="nats://127.0.0.1:4222", service="billing", routes={ChargeCard: "billing"}'


def test_worker_transport_does_not_import_the_driver_of_the_modules_own(
    apps: Apps,
) -> None:
    name = apps.app(NATS_APP)
    command = [sys.executable, "-c", WITHOUT, "nats", "worker", f"{name}:dp"]
    done = subprocess.run(
        [*command, "--transport", UNREACHABLE, "--log-level", "WARNING"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=apps.root,
        check=False,
    )
    # It got as far as the broker it was told to use: nats-py was never needed.
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr
        == f"iambus: error: {UNREACHABLE}: connect failed: "
        + (done.stderr.split("connect failed: ", 1)[-1])
    )
    assert "Traceback" not in done.stderr


def test_worker_says_in_one_line_which_driver_is_missing(apps: Apps) -> None:
    name = apps.app(NATS_APP)
    command = [sys.executable, "-c", WITHOUT, "nats", "worker", f"{name}:dp"]
    done = subprocess.run(
        [*command, "--log-level", "WARNING"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=apps.root,
        check=False,
    )
    assert (done.returncode, done.stderr) == (
        2,
        f"iambus: error: {name}:dp: the NATS transport needs nats-py: pip install 'iambus[nats]'\n",
    )


# -- worker: serving --------------------------------------------------------------------


def test_worker_serves_with_the_overrides_until_sigterm(
    apps: Apps, caplog: pytest.LogCaptureFixture
) -> None:
    # Built for an unreachable Redis as service "orders" (which cannot serve ChargeCard):
    # it only runs if --transport and --service really replace what it was built with.
    name = apps.app(ORDERS)
    apps.write(
        "import asyncio\nmade = []\n\n"
        "def new_event_loop():\n    made.append(asyncio.new_event_loop())\n    return made[-1]\n",
        name="uvloop",
    )
    caplog.set_level(logging.INFO)
    argv = ["worker", f"{name}:create", "--transport", "memory://", "--service", "billing"]
    argv += ["--concurrency", "3", "--shutdown-timeout", "1.5", "--uvloop"]
    code = run_until_sigterm(argv, caplog)

    assert code == 0
    dp: Dispatcher = sys.modules[name].dp
    assert dp.remote is not None
    assert (dp.remote.transport.url, dp.remote.service, dp.service) == (
        "memory://",
        "billing",
        "billing",
    )
    assert (dp.limits.concurrency, dp.timeouts.shutdown) == (3, 1.5)
    assert len(sys.modules["uvloop"].made) == 1  # the loop came from --uvloop's factory
    text = caplog.text
    assert "(service billing) on memory://, 3 at once" in text
    assert f"command {name}.ChargeCard -> {name}.charge [billing]" in text
    assert "received SIGTERM, stopping" in text
    assert f"{name}:create stopped" in text


def run_until_sigterm(argv: list[str], caplog: pytest.LogCaptureFixture) -> int:
    """``main(argv)``, with SIGTERM sent to this process once the worker is serving."""
    # The worker logs its subscriptions once the dispatcher handles SIGTERM; a worker
    # that never gets there returns by itself (no signal then: the default action would
    # end the test run).
    return main_with_sigterm(
        argv,
        lambda: any(r.getMessage().startswith("iambus worker") for r in list(caplog.records)),
    )


def main_with_sigterm(argv: list[str], when: Callable[[], bool]) -> int:
    """``main(argv)``, with SIGTERM sent to this process once ``when()`` holds."""
    returned = threading.Event()

    def stop_when() -> None:
        while not returned.wait(0.02):
            if when():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    stopper = threading.Thread(target=stop_when, daemon=True)
    stopper.start()
    try:
        return main(argv)
    finally:
        returned.set()
        stopper.join()


@dataclass(frozen=True, slots=True)
class Ping:  # the app's Ping on the wire: same name, same fields
    n: int


def test_python_m_iambus_worker_serves_until_sigterm(redis_url: str, tmp_path: Path) -> None:
    handled = tmp_path / "handled.txt"
    source = APP.replace(
        "DEFAULTS", 'transport="memory://", service="worker", routes={Ping: "tester"}'
    )
    (tmp_path / "app.py").write_text(source.replace("HANDLED", repr(str(handled))))
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        # --transport: the module's memory:// would be out of the test's reach.
        worker = subprocess.Popen(
            [sys.executable, "-m", "iambus", "worker", "app:dp", "--transport", redis_url],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        # Event groups see only new events: publish once the worker has subscribed.
        wait_until(lambda: "iambus worker" in log.read_text(), what=log)
        asyncio.run(publish(redis_url, Ping(1), Ping(2)))
        wait_until(
            lambda: handled.exists() and sorted(handled.read_text().split()) == ["1", "2"],
            what=log,
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    assert "(service worker) on redis://" in text
    assert "event app.Ping -> app.record [worker.app.record]" in text  # the subscriptions
    assert "received SIGTERM, stopping" in text
    assert "Traceback" not in text


async def publish(url: str, *events: object) -> None:
    tester = Dispatcher(transport=url, service="tester", routes={Ping: "tester"})
    async with tester:
        for event in events:
            await tester.publish(event)


def wait_until(condition: Callable[[], bool], *, what: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; the worker said:\n{what.read_text()}"
        time.sleep(0.05)


# -- dlq --------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    require("redis")
    from iambus.transports.redis import RedisTransport

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    yield f"redis://127.0.0.1:6379/0?namespace={namespace}"

    async def destroy() -> None:
        cleaner = RedisTransport("redis://127.0.0.1:6379/0", namespace=namespace)
        await cleaner.open()
        try:
            await cleaner.destroy()
        finally:
            await cleaner.close()

    asyncio.run(destroy())


ADDRESS, GROUP = "event.Ping", "billing.app.record"
T = TypeVar("T")


@dataclass
class Broker:
    """A namespace on one broker for the dlq commands, and the test's own transport there.

    ``main`` runs its own event loop, so the test's transport is opened and closed around
    each use, in a loop of its own. It stays one instance all along: RabbitMQ's
    ``destroy`` deletes the queues the destroying instance declared.
    """

    url: str
    transport: Transport

    def run(self, work: Callable[[Transport], Awaitable[T]]) -> T:
        async def session() -> T:
            await self.transport.open()
            try:
                await self.transport.declare(ADDRESS, GROUP, from_start=False)
                return await work(self.transport)
            finally:
                await self.transport.close()

        return asyncio.run(session())


@pytest.fixture(params=sorted(BROKERS))
def dlq(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A fresh namespace on each broker in turn; destroyed at the end."""
    require(request.param)
    url = broker_url(request.param, f"test-{uuid.uuid4().hex[:10]}")
    # (Kafka: claim_after is the session timeout; each run() joins the group anew, which on
    # the test broker waits half of it)
    made = Broker(url, connect(url, claim_after=1 if request.param == "kafka" else 5))
    made.run(lambda transport: asyncio.sleep(0))  # GROUP exists before anything is sent
    yield made

    async def destroy(transport: Transport) -> None:
        await transport.destroy()  # type: ignore[attr-defined]

    made.run(destroy)


async def take(transport: Transport, *, count: int, wait: float) -> list[Delivery]:
    """What GROUP gets within ``wait`` s (up to ``count``), and whatever follows at once."""
    got: list[Delivery] = []
    deadline = time.monotonic() + wait
    while len(got) < count:
        more = await transport.receive(ADDRESS, GROUP, consumer="test", limit=count, wait=0.2)
        got += more
        if not more and (got or time.monotonic() > deadline):
            break
    return got


def park(broker: Broker, *envelopes: Envelope) -> list[DeadLetter]:
    """Deliver ``envelopes`` to GROUP and dead-letter each; return the dead letters."""

    async def work(transport: Transport) -> list[DeadLetter]:
        for envelope in envelopes:
            await transport.send(ADDRESS, envelope)
        deliveries = {d.envelope.id: d for d in await take(transport, count=len(envelopes), wait=5)}
        assert set(deliveries) == {e.id for e in envelopes}
        for n, envelope in enumerate(envelopes):  # in this order, whatever the broker's
            await deliveries[envelope.id].dead_letter(
                Failure(
                    error_type="builtins.ValueError",
                    message=f"card declined\n(try {n})",
                    traceback='Traceback (most recent call last):\n  File "app.py"\n'
                    "ValueError: card declined\n",
                    attempts=3,
                    handler="app.record",
                )
            )
        return await transport.dead_letters()

    return broker.run(work)


def receive(broker: Broker) -> list[Envelope]:
    """What GROUP gets now, acked (a replay may take a second to show up: Redis looks for
    replays every ``block`` seconds, 1 by default)."""

    async def work(transport: Transport) -> list[Envelope]:
        deliveries = await take(transport, count=10, wait=2.5)
        for delivery in deliveries:
            await delivery.ack()
        return [delivery.envelope for delivery in deliveries]

    return broker.run(work)


def ping(n: int, **fields: object) -> Envelope:
    return Envelope(name="Ping", payload=f'{{"n": {n}}}'.encode(), **fields)  # type: ignore[arg-type]


def test_dlq_list_shows_a_table(dlq: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--transport", dlq.url]) == 0
    assert capsys.readouterr().out == f"no dead letters on {redact(dlq.url)}\n"

    first, second = park(dlq, ping(1), ping(2))
    assert main(["dlq", "list", "--transport", dlq.url]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "ADDRESS", "GROUP", "ERROR", "MESSAGE", "ATTEMPTS", "AGE"]
    assert [row.split()[:3] for row in rows] == [
        [first.id, ADDRESS, GROUP],
        [second.id, ADDRESS, GROUP],
    ]
    assert rows[0].split()[3:] == ["ValueError", "card", "declined", "(try", "0)", "3", "0s"]


def test_dlq_list_limit_and_json(dlq: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = park(dlq, ping(1, key="order-1"), ping(2))
    assert main(["dlq", "list", "--transport", dlq.url, "--limit", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["id"] == first.id
    assert (record["address"], record["group"], record["handler"]) == (ADDRESS, GROUP, "app.record")
    assert (record["error_type"], record["attempts"]) == ("builtins.ValueError", 3)
    assert record["message"] == "card declined\n(try 0)"
    assert record["envelope"]["key"] == "order-1"
    assert json.loads(record["envelope"]["payload"]) == {"n": 1}
    assert "pass --limit to see them" in err


def test_dlq_show_tells_everything(dlq: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    envelope = ping(7, key="order-7", headers={"tenant": "acme"}, correlation_id="conv-1")
    [letter] = park(dlq, envelope)
    assert main(["dlq", "show", "--transport", dlq.url, letter.id]) == 0
    out = capsys.readouterr().out
    for expected in (
        f"id:        {letter.id}",
        f"address:   {ADDRESS}",
        f"group:     {GROUP}",
        "handler:   app.record",
        "attempts:  3",
        "error:     builtins.ValueError: card declined\n           (try 0)\n",
        f"  id:             {envelope.id}",
        "  name:           Ping",
        "  key:            order-7",
        "  correlation id: conv-1",
        "headers:\n  tenant: acme\n",
        'payload (8 bytes):\n  {"n": 7}\n',
        "traceback (excerpt):\n  Traceback (most recent call last):",
        "  ValueError: card declined",
    ):
        assert expected in out

    assert main(["dlq", "show", "--transport", dlq.url, letter.id, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["envelope"]["headers"] == {"tenant": "acme"}
    assert record["traceback"].endswith("ValueError: card declined\n")


def test_dlq_show_a_payload_that_is_not_text(
    dlq: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    [letter] = park(dlq, Envelope(name="Blob", payload=b"\xff\x00", content_type="x/bin"))
    assert main(["dlq", "show", "--transport", dlq.url, letter.id]) == 0
    assert "payload (2 bytes, not UTF-8):\n  b'\\xff\\x00'" in capsys.readouterr().out
    assert main(["dlq", "show", "--transport", dlq.url, letter.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["envelope"]["payload_base64"] == "/wA="


def test_dlq_show_an_unknown_id(dlq: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    park(dlq, ping(1))
    for unknown in ("0-1", "not-an-id"):
        assert main(["dlq", "show", "--transport", dlq.url, unknown]) == 1
        err = capsys.readouterr().err
        assert f"no dead letter {unknown!r} on {redact(dlq.url)}; 'iambus dlq list' shows" in err


def test_dlq_replay_sends_them_back_to_their_group(
    dlq: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, third = park(dlq, ping(1), ping(2), ping(3))
    assert main(["dlq", "replay", "--transport", dlq.url, first.id]) == 0
    assert capsys.readouterr().out == "replayed 1 dead letter\n"
    assert [e.id for e in receive(dlq)] == [first.envelope.id]

    # Unknown ids are named and fail the command; the known ones are replayed anyway.
    assert main(["dlq", "replay", "--transport", dlq.url, second.id, "nope", first.id]) == 1
    out, err = capsys.readouterr()
    assert out == "replayed 1 dead letter\n"
    assert f"no dead letter 'nope', {first.id!r} on {redact(dlq.url)}" in err
    assert [e.id for e in receive(dlq)] == [second.envelope.id]

    assert main(["dlq", "replay", "--transport", dlq.url, "--all"]) == 0
    assert capsys.readouterr().out == "replayed 1 dead letter\n"
    assert [e.id for e in receive(dlq)] == [third.envelope.id]
    assert main(["dlq", "list", "--transport", dlq.url]) == 0
    assert capsys.readouterr().out.startswith("no dead letters")


def test_dlq_purge_deletes_them(dlq: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    first, second, third = park(dlq, ping(1), ping(2), ping(3))
    assert main(["dlq", "purge", "--transport", dlq.url, first.id]) == 0
    assert capsys.readouterr().out == "purged 1 dead letter\n"

    assert main(["dlq", "purge", "--transport", dlq.url, "--all"]) == 2
    assert "add --yes to confirm" in capsys.readouterr().err
    assert main(["dlq", "list", "--transport", dlq.url, "--json"]) == 0
    remaining = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert remaining == [second.id, third.id]  # nothing purged without --yes

    assert main(["dlq", "purge", "--transport", dlq.url, first.id]) == 1  # gone already
    assert capsys.readouterr().out == "purged 0 dead letters\n"

    assert main(["dlq", "purge", "--transport", dlq.url, "--all", "--yes"]) == 0
    assert capsys.readouterr().out == "purged 2 dead letters\n"
    assert receive(dlq) == []  # purged is not replayed


@pytest.mark.parametrize("action", ["replay", "purge"])
def test_dlq_replay_and_purge_want_ids_or_all(
    action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "redis://127.0.0.1:6379/0"  # not reached: the command line is wrong
    assert main(["dlq", action, "--transport", url]) == 2
    assert f"give the ids of the dead letters to {action}, or --all" in capsys.readouterr().err
    assert main(["dlq", action, "--transport", url, "--all", "1-0"]) == 2
    assert "give dead letter ids or --all, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("memory://", 2, "memory:// lives inside one process"),
        ("mqtt://x", 2, "unknown transport URL 'mqtt://x'"),
        (UNREACHABLE, 1, f"{UNREACHABLE}: connect failed"),
        ("amqp://guest:guest@127.0.0.1:1/", 1, "amqp://guest:***@127.0.0.1:1/: connect failed"),
        ("nats://127.0.0.1:1", 1, "nats://127.0.0.1:1: connect failed"),
    ],
)
def test_dlq_needs_a_reachable_broker(
    url: str, status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dlq", "list", "--transport", url]) == status
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# -- status -----------------------------------------------------------------------------


async def test_status_shows_each_group_and_the_live_instances(
    dlq: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    await asyncio.to_thread(park, dlq, ping(1))  # a dead letter of GROUP
    other = f"event.Shipped{uuid.uuid4().hex[:6]}"
    transport = connect(dlq.url)
    await transport.open()
    try:
        assert isinstance(transport, Registry)
        await transport.declare(other, "billing.app.ship", from_start=False)
        me = Instance(
            "billing",
            f"here-{os.getpid()}-status",
            "here",
            os.getpid(),
            time.time() - 90,
            ((ADDRESS, GROUP), (other, "billing.app.ship")),
        )
        await transport.announce(me)
        for n in range(3):  # nobody consumes them
            await transport.send(other, ping(n))
        # The command runs its own event loop: in a thread, while this one holds `me`
        # live (RabbitMQ: as long as this connection lives).
        assert await asyncio.to_thread(main, ["status", "--transport", dlq.url]) == 0
        out = capsys.readouterr().out
        groups, instances = out.split("\n\n")
        rows = [line.split() for line in groups.splitlines()]
        assert rows[0] == [
            "SERVICE", "GROUP", "ADDRESS", "INSTANCES", "WAITING", "IN", "FLIGHT", "RETRYING",
            "DEAD",
        ]  # fmt: skip
        by_address = {row[2]: row for row in rows[1:]}
        assert by_address[ADDRESS][:5] == ["billing", GROUP, ADDRESS, "1", "0"]
        assert by_address[ADDRESS][-1] == "1"  # the dead letter
        assert by_address[other][:5] == ["billing", "billing.app.ship", other, "1", "3"]
        assert by_address[other][-1] == "0"
        [header, row] = [line.split() for line in instances.splitlines()]
        assert header == ["INSTANCE", "SERVICE", "HOST", "PID", "UP"]
        assert row == [me.id, "billing", "here", str(os.getpid()), "1m"]

        assert await asyncio.to_thread(main, ["status", "--transport", dlq.url, "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        [shipping] = [g for g in found["groups"] if g["address"] == other]
        assert shipping == {
            "service": "billing",
            "group": "billing.app.ship",
            "address": other,
            "instances": [me.id],
            "waiting": 3,
            "in_flight": shipping["in_flight"],  # RabbitMQ cannot tell (None)
            "retrying": shipping["retrying"],
            "dead": 0,
        }
        assert shipping["in_flight"] in (0, None)
        assert [i["id"] for i in found["instances"]] == [me.id]
        await transport.withdraw(me)
        assert await asyncio.to_thread(main, ["status", "--transport", dlq.url]) == 0
        assert capsys.readouterr().out.endswith("\n\nno live instances\n")
    finally:
        await transport.destroy()  # type: ignore[attr-defined]  # RabbitMQ: what it declared
        await transport.close()


def test_status_cannot_see_another_process_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--transport", "memory://"]) == 2
    assert "cannot see its workers and queues" in capsys.readouterr().err
    assert main(["status", "--transport", UNREACHABLE]) == 1
    err = capsys.readouterr().err
    assert f"{UNREACHABLE}: connect failed" in err
    assert "Traceback" not in err


# -- db, relay, outbox (PostgreSQL) -----------------------------------------------------


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema name of its own for one test, dropped at the end."""
    require("postgres")
    name = f"test_{uuid.uuid4().hex[:10]}"
    yield name

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def test_db_init_creates_the_tables(schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["db", "init", "--database", POSTGRES_DSN, "--schema", schema, "--prefix", "bus_"]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"iambus's tables are ready: {schema}.bus_outbox, {schema}.bus_inbox\n"
    )
    assert main(argv) == 0  # again: nothing to do

    async def check() -> None:
        database = Database(POSTGRES_DSN, schema=schema, prefix="bus_")
        try:
            await database.check()
        finally:
            await database.close()

    asyncio.run(check())


def test_db_init_sql_prints_the_tables_sql_without_a_database(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["db", "init", "--sql", "--schema", "shop", "--prefix", "bus_"]) == 0
    expected = Database("postgresql://", schema="shop", prefix="bus_").ddl()
    assert capsys.readouterr().out == expected
    assert 'CREATE TABLE IF NOT EXISTS "shop"."bus_outbox"' in expected
    assert main(["db", "init"]) == 2
    assert "db init: give --database DSN (or --sql" in capsys.readouterr().err


def test_db_init_finds_a_table_of_another_shape(
    schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def make() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(f'CREATE TABLE "{schema}".iambus_outbox (position bigint)')
        finally:
            await conn.close()

    asyncio.run(make())
    assert main(["db", "init", "--database", POSTGRES_DSN, "--schema", schema]) == 2
    err = capsys.readouterr().err
    assert f"the table {schema}.iambus_outbox has no column(s) lane, address" in err
    assert "Traceback" not in err


def test_db_init_without_the_right_to_create_says_why(
    schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    role = f"norights_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE ROLE {role} LOGIN"))
    try:
        dsn = POSTGRES_DSN.replace("postgres@", f"{role}@")
        assert main(["db", "init", "--database", dsn, "--schema", schema]) == 1
    finally:
        asyncio.run(admin(f"DROP ROLE {role}"))
    err = capsys.readouterr().err
    assert "InsufficientPrivilegeError: permission denied for database" in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (
            ["status", "--database", "postgresql://postgres:s3cret@127.0.0.1:1/test"],
            1,
            "the database postgresql://postgres:***@127.0.0.1:1/test failed: ",
        ),
        (
            ["outbox", "list", "--database", "postgresql://postgres@127.0.0.1/no_such_db_xyz"],
            1,
            'database "no_such_db_xyz" does not exist',
        ),
        (
            ["outbox", "retry", "--all", "--database", POSTGRES_DSN, "--schema", "no_such_xyz"],
            2,
            "the table no_such_xyz.iambus_outbox does not exist; create iambus's tables with "
            "`iambus db init --database DSN --schema no_such_xyz`",
        ),
        (
            ["relay", "--transport", UNREACHABLE, "--database", POSTGRES_DSN, "--prefix", "x_"],
            2,
            "the table x_outbox does not exist",
        ),
        (
            ["db", "init", "--database", "mysql://root:s3cret@127.0.0.1/shop"],
            2,
            "database must be a DSN 'postgresql://user@host/db', an asyncpg.Pool, or a "
            "SQLAlchemy AsyncEngine on the asyncpg driver, got 'mysql://root:***@127.0.0.1/shop'",
        ),
        (["outbox", "list"], 2, "--database DSN is required"),
        (["status"], 2, "status: give --transport URL, --database DSN, or both"),
        (
            ["relay", "--transport", "memory://", "--database", POSTGRES_DSN],
            2,
            "memory:// lives inside one process",
        ),
        (["relay", "--transport", "x://", "--database", POSTGRES_DSN, "--poll", "0"], 2, "> 0"),
        (
            ["status", "--database", "postgresql://app:s3cret@127.0.0.1:99999/shop"],
            2,
            "database postgresql://*** is not a valid DSN: a port over 65535",
        ),
        (
            ["outbox", "list", "--database", "postgresql://app:s3cret@[::1/shop"],
            2,
            "is not a valid DSN: an IPv6 address without its closing ']'",
        ),
    ],
    ids=[
        "unreachable",
        "no-database",
        "no-tables",
        "relay-no-tables",
        "not-postgres",
        "no-dsn",
        "status-needs-one",
        "relay-memory",
        "relay-poll",
        "port-out-of-range",
        "broken-ipv6",
    ],
)
def test_database_commands_say_what_is_wrong_in_one_line(
    argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if any(POSTGRES_DSN in arg or "no_such_db" in arg for arg in argv):
        require("postgres")
    assert main(argv) == status
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err
    assert "s3cret" not in err


def test_a_connection_terminated_as_the_relay_starts_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What asyncpg raises when the server terminates a connection in the middle of an
    operation (seen in the outbox crash run): a database failure, status 1, one line."""
    import asyncpg

    async def terminated(self: Database) -> None:
        raise asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )

    monkeypatch.setattr(Database, "check", terminated)
    dsn = "postgresql://app:s3cret@127.0.0.1:5432/shop"
    assert main(["relay", "--transport", "redis://127.0.0.1:1/0", "--database", dsn]) == 1
    err = capsys.readouterr().err
    assert err == (
        "iambus: error: the database postgresql://app:***@127.0.0.1:5432/shop failed: "
        "InternalClientError: cannot switch to state 12; another operation (2) is in progress\n"
    )


async def commit_rows(database: Database, *envelopes: Envelope, address: str) -> None:
    async with database.connection() as conn, conn.transaction():
        await write(conn, database, [Outgoing(address, e) for e in envelopes])


async def test_status_shows_the_outbox(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = ping(2)
    await commit_rows(database, ping(1), stuck, ping(3), address=ADDRESS)
    async with database.connection() as conn:
        await conn.execute(f"UPDATE {database.outbox} SET stored_at = now() - interval '2 minutes'")
        await conn.execute(
            f"UPDATE {database.outbox} SET parked_at = now() WHERE message_id = $1", stuck.id
        )
    argv = ["status", "--database", POSTGRES_DSN, "--schema", str(database.schema)]

    assert await asyncio.to_thread(main, argv) == 0
    [header, row] = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert header == ["OUTBOX", "BACKLOG", "OLDEST", "PARKED"]
    assert row == [f"{database.schema}.iambus_outbox", "2", "2m", "1"]

    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["outbox"]["table"] == f"{database.schema}.iambus_outbox"
    assert (shown["outbox"]["backlog"], shown["outbox"]["parked"]) == (2, 1)
    assert 120 <= shown["outbox"]["oldest_age"] < 180


async def test_outbox_list_and_retry_the_parked_rows(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = ping(1, key="order-7")
    await commit_rows(database, stuck, address=ADDRESS)
    async with database.connection() as conn:
        position = await conn.fetchval(
            f"UPDATE {database.outbox} SET parked_at = now(), attempts = 1, "
            f"last_error = 'SerializationError: outbox row does not decode' RETURNING position"
        )
    where = ["--database", POSTGRES_DSN, "--schema", str(database.schema)]

    assert await asyncio.to_thread(main, ["outbox", "list", *where]) == 0
    [header, row] = [line.split(None, 7) for line in capsys.readouterr().out.splitlines()]
    assert header[:4] == ["POSITION", "MESSAGE", "NAME", "ADDRESS"]
    assert row == [
        str(position), stuck.id, "Ping", ADDRESS, "order-7", "1", "0s",
        "SerializationError: outbox row does not decode",
    ]  # fmt: skip
    assert await asyncio.to_thread(main, ["outbox", "list", *where, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["position"], shown["message_id"], shown["key"]) == (position, stuck.id, "order-7")

    argv = ["outbox", "retry", *where, str(position), str(position + 99)]
    assert await asyncio.to_thread(main, argv) == 1
    out = capsys.readouterr()
    assert out.out == "retrying 1 parked row\n"
    assert f"no parked row at position {position + 99} in" in out.err
    assert (await outbox_status(database)).parked == 0
    assert await asyncio.to_thread(main, ["outbox", "list", *where]) == 0
    assert capsys.readouterr().out.startswith("no parked rows in ")
    assert await asyncio.to_thread(main, ["outbox", "retry", *where, "--all"]) == 0
    assert capsys.readouterr().out == "retrying 0 parked rows\n"
    assert await asyncio.to_thread(main, ["outbox", "retry", *where]) == 2
    assert "give the positions of the parked rows" in capsys.readouterr().err


async def test_python_m_iambus_relay_sends_until_sigterm(
    database: Database, redis_url: str, tmp_path: Path
) -> None:
    receiver = connect(redis_url)
    await receiver.open()
    log = tmp_path / "relay.log"
    try:
        await receiver.declare(ADDRESS, GROUP, from_start=True)
        await commit_rows(database, ping(1, key="k"), address=ADDRESS)  # waiting already
        argv = ["relay", "--transport", redis_url, "--database", POSTGRES_DSN]
        argv += ["--schema", str(database.schema), "--poll", "30"]
        with log.open("w") as output:
            relay = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "iambus", *argv, stdout=output, stderr=subprocess.STDOUT
            )

        def started() -> bool:
            return "iambus relay:" in log.read_text()

        try:
            await asyncio.to_thread(wait_until, started, what=log)
            await commit_rows(database, ping(2, key="k"), ping(3), address=ADDRESS)
            got: list[Envelope] = []
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                for delivery in await receiver.receive(
                    ADDRESS, GROUP, consumer="test", limit=3, wait=0.5
                ):
                    got.append(delivery.envelope)
                    await delivery.ack()
            assert sorted(_n(e) for e in got) == [1, 2, 3]
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 10) == 0, log.read_text()
        finally:
            if relay.returncode is None:
                relay.kill()
                await relay.wait()
    finally:
        await receiver.close()
    assert await outbox_status(database) == OutboxStatus(backlog=0, oldest_age=None, parked=0)
    text = log.read_text()
    assert f"{database.schema}.iambus_outbox -> {redact(redis_url)}" in text
    assert "listening" in text
    assert "received SIGTERM, stopping" in text
    assert "iambus relay: stopped" in text
    assert "Traceback" not in text


def _n(envelope: Envelope) -> int:
    return int(json.loads(envelope.payload)["n"])
