"""The application scripts/chaos runs as ``iambus worker chaos_app:create`` (3 processes).

``create()`` reads its settings as JSON from the environment variable ``IAMBUS_CHAOS``:
the broker ``url`` (with the run's namespace), ``claim_after`` and the ``log`` path; the
sender imports only the messages. Each handler records what it handled with one
``os.write`` on an ``O_APPEND`` descriptor, just before it returns: the line is in the
kernel's hands at once, so it survives a SIGKILL of the worker, and lines of different
workers never mix. A record means "handled" (the side effect happened); the ack comes
after it, so a worker killed in between makes the broker deliver the message again and
the record appears twice: at least once.

    bump <key> <seq> <pid>     a keyed command, numbered from 0 per key
    event <n> <pid>            an event (one group: this handler's)
    poison <n> <pid>           an attempt at a poison command (it always fails)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass

from iambus import Command, Dispatcher
from iambus.retry import Retry
from iambus.transports import connect


@dataclass(frozen=True, slots=True)
class Bump(Command[None]):
    """Sent with ``key=key``: handled one at a time per key, in ``seq`` order."""

    key: str
    seq: int


@dataclass(frozen=True, slots=True)
class Noted:
    n: int


@dataclass(frozen=True, slots=True)
class Poison(Command[None]):
    n: int


ROUTES: dict[type | str, str] = {Bump: "chaos", Noted: "chaos", Poison: "chaos"}
# Three quick attempts, then the dead-letter store (with the error) instead of the
# default five over several seconds: the run waits for every poison message to get there.
POISON_RETRY = Retry(attempts=3, backoff=0.2, max_backoff=1.0)

_log: int | None = None  # the record file, opened by create()


def record(*fields: object) -> None:
    assert _log is not None, "create() opens the record file"
    os.write(_log, (" ".join(map(str, (*fields, os.getpid()))) + "\n").encode())


async def busy() -> None:
    # A little work, so that a SIGKILL or a dropped connection lands mid-handler.
    await asyncio.sleep(random.uniform(0, 0.01))


async def on_bump(command: Bump) -> None:
    await busy()
    record("bump", command.key, command.seq)


async def on_noted(event: Noted) -> None:
    await busy()
    record("event", event.n)


async def on_poison(command: Poison) -> None:
    record("poison", command.n)
    raise RuntimeError(f"poison message {command.n}: this handler always fails")


def create() -> Dispatcher:
    """The worker's dispatcher, on the settings in ``IAMBUS_CHAOS``."""
    global _log
    config = json.loads(os.environ["IAMBUS_CHAOS"])
    _log = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    dp = Dispatcher(
        transport=connect(config["url"], claim_after=config["claim_after"]),
        service="chaos",
        routes=ROUTES,
    )
    dp.commands.register(Bump)(on_bump)
    dp.events.register(Noted)(on_noted)
    dp.commands.register(Poison, retry=POISON_RETRY)(on_poison)
    return dp
