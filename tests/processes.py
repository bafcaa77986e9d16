"""A harness for end-to-end tests with worker *processes*, on any broker.

A test writes an application module (``app.py``) into its ``tmp_path`` and runs it as real
workers: ``python -m iambus worker app:dp --concurrency N``, each a subprocess that gets
its settings as JSON in the environment variable ``IAMBUS_TEST_WORKER``. ``APP_PRELUDE``,
put before the test's own source, reads them into ``config`` and defines
``record(step, kind, ident)``: the handlers append one line per step to a log file shared
by every worker (``<role> <step> <kind> <ident> <time> <pid>``), one ``os.write`` on an
``O_APPEND`` descriptor each, so lines of different processes never mix; the test reads
it to see who did what, and when.

Everything is broker-agnostic: a worker is *ready* once the command logged its
subscriptions (every group is declared then), and what is left over is found with the
transport's own ``receive``. Every wait is bounded, every worker still alive at the end
is killed, and the namespace is destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iambus.errors import TransportError
from iambus.transports import Delivery, Transport, connect

from .conftest import service_up

BROKERS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    # Tansu, the test broker, refuses the idempotent producer; 4 partitions so that a
    # few workers share a group's partitions
    "kafka": "kafka://127.0.0.1:9092?idempotent=false&partitions=4",
}
CONFIG_VARIABLE = "IAMBUS_TEST_WORKER"


def broker_url(broker: str, namespace: str) -> str:
    """The URL of ``broker`` (a key of ``BROKERS``) with ``namespace``."""
    base = BROKERS[broker]
    return f"{base}{'&' if '?' in base else '?'}namespace={namespace}"


READY = "iambus worker "  # what the command logs once its worker has declared every group

# The start of every app.py (as source: the workers do not have the tests on their path).
APP_PRELUDE = '''
import json as _json
import os as _os
import time as _time

config = _json.loads(_os.environ["IAMBUS_TEST_WORKER"])
_log = _os.open(config["log"], _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o644)


def record(step, kind, ident):
    """One line of the shared step log, in one write."""
    line = f"{config['role']} {step} {kind} {ident} {_time.time():.6f} {_os.getpid()}\\n"
    _os.write(_log, line.encode())
'''


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the step log."""

    role: str
    step: str
    kind: str
    ident: str
    at: float
    pid: int


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Wait until ``condition()`` holds; after ``timeout`` s, fail naming ``what``, ``detail()``."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            more = detail()
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}" + (f"\n{more}" if more else "")
            )
        await asyncio.sleep(0.02)


@dataclass
class Cluster:
    """Worker processes of one test on one broker: one namespace, one step log.

    ``transport`` is the test's own (opened by ``open()``): send through it with a
    ``Dispatcher(transport=cluster.transport, ...)``, look at groups with ``nothing_left``.
    ``close()`` declares every group ``watch`` was told about on it before destroying the
    namespace: RabbitMQ deletes only the queues the destroying instance declared.
    """

    broker: str
    tmp: Path
    app: str
    claim_after: float
    namespace: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    groups: dict[tuple[str, str], bool] = field(default_factory=dict)
    _transport: Transport | None = None

    @property
    def url(self) -> str:
        return broker_url(self.broker, self.namespace)

    @property
    def log(self) -> Path:
        return self.tmp / "steps.log"

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, "open() the cluster first"
        return self._transport

    async def open(self) -> Cluster:
        (self.tmp / "app.py").write_text(APP_PRELUDE + self.app)
        self._transport = connect(self.url, claim_after=self.claim_after)
        await self._transport.open()
        return self

    async def __aenter__(self) -> Cluster:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def watch(self, address: str, group: str, *, from_start: bool) -> None:
        """A group the workers declare (as they do: ``from_start`` for commands and queries)."""
        self.groups[address, group] = from_start

    # -- workers ------------------------------------------------------------------------

    def spawn(
        self, role: str, *, concurrency: int = 32, options: Sequence[str] = (), **config: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``iambus worker app:dp --concurrency N *options`` as ``role``.

        ``config`` goes to the app as JSON, with the broker's ``url``, the ``role``, the
        ``log`` path and ``claim_after``.
        """
        settings = {
            "url": self.url,
            "role": role,
            "log": str(self.log),
            "claim_after": self.claim_after,
            **config,
        }
        env = {**os.environ, CONFIG_VARIABLE: json.dumps(settings)}
        command = [sys.executable, "-m", "iambus", "worker", "app:dp"]
        command += ["--concurrency", str(concurrency), *options]
        with open(self.tmp / f"{role}.out", "wb") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp, env=env
            )
        self.procs[role] = proc
        return proc

    def output(self, role: str) -> str:
        path = self.tmp / f"{role}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    async def ready(self, *roles: str, timeout: float = 20) -> None:
        """Wait until every one of ``roles`` has declared its groups (it then consumes)."""
        for role in roles:
            proc = self.procs[role]

            def serving(role: str = role, proc: subprocess.Popen[bytes] = proc) -> bool:
                text = self.output(role)
                assert proc.poll() is None, f"{role} exited ({proc.returncode}):\n{text}"
                return READY in text

            await until(serving, timeout, f"{role} to serve", detail=self.report)

    async def stop(self, *roles: str, timeout: float = 15) -> dict[str, int]:
        """SIGTERM ``roles`` at once; wait for each to exit; their exit codes."""
        for role in roles:
            self.procs[role].send_signal(signal.SIGTERM)

        def exited() -> bool:
            return all(self.procs[role].poll() is not None for role in roles)

        await until(
            exited, timeout, f"{', '.join(roles)} to exit after SIGTERM", detail=self.report
        )
        return {role: self.procs[role].returncode for role in roles}

    def kill(self, role: str) -> float:
        """SIGKILL ``role`` and reap it; when it was killed (``time.time()``)."""
        proc = self.procs[role]
        proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=10)
        return killed_at

    # -- what happened ------------------------------------------------------------------

    def report(self, lines: int = 20) -> str:
        """The end of the step log and of each worker's output: for failure messages."""
        parts = [
            f"last steps:\n{self._tail(self.log.read_text() if self.log.exists() else '', lines)}"
        ]
        for role in self.procs:
            parts.append(f"{role} said:\n{self._tail(self.output(role), lines)}")
        return "\n".join(parts)

    @staticmethod
    def _tail(text: str, lines: int) -> str:
        return "\n".join(f"  {line}" for line in text.splitlines()[-lines:])

    def steps(self) -> list[Step]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().split("\n")[:-1]:  # whole lines only
            role, step, kind, ident, at, pid = line.split()
            out.append(Step(role, step, kind, ident, float(at), int(pid)))
        return out

    def done(self, kind: str, role_prefix: str = "") -> Counter[str]:
        """How many times each ``ident`` of ``kind`` was done (by roles starting so)."""
        return Counter(
            s.ident
            for s in self.steps()
            if s.step == "done" and s.kind == kind and s.role.startswith(role_prefix)
        )

    async def nothing_left(self, *groups: tuple[str, str]) -> None:
        """Nothing in ``groups`` is delivered again, even after ``claim_after``.

        Call it once the workers are gone: it receives from each group as a new consumer
        for ``claim_after`` (and a margin), long enough for any delivery left unsettled
        to be handed over, and fails naming what came.
        """
        for address, group in groups:
            await self.transport.declare(address, group, from_start=self.groups[address, group])
        got: list[Delivery] = []
        deadline = time.monotonic() + self.claim_after + 0.5
        while time.monotonic() < deadline:
            for address, group in groups:
                got += await self.transport.receive(
                    address, group, consumer="the-test", limit=100, wait=0.1
                )
        for delivery in got:
            await delivery.ack()
        assert not got, f"delivered again after the end: {[d.envelope for d in got]}"

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        transport, self._transport = self._transport, None
        if transport is None or not service_up(self.broker):
            return
        try:
            for (address, group), from_start in self.groups.items():
                with contextlib.suppress(TransportError):  # what can be declared still goes
                    await transport.declare(address, group, from_start=from_start)
            await transport.destroy()  # type: ignore[attr-defined]
        finally:
            await transport.close()


def collapse(items: Sequence[int]) -> list[int]:
    """``items`` with consecutive repeats dropped: [0, 1, 1, 2] -> [0, 1, 2]."""
    return [item for n, item in enumerate(items) if n == 0 or items[n - 1] != item]
