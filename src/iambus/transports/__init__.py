"""Transports: how envelopes travel between processes. ``Transport`` is the seam.

A transport moves ``Envelope`` objects between *addresses* (one per message name and
kind, e.g. ``"event.OrderPlaced"``) and *groups* (who consumes: every group on an address
receives each envelope once; consumers within a group compete). Everything else — names,
codecs, routing, retries, handlers — lives above the seam, so a transport stays small:

* ``send(address, envelope)``: durably store; return once the broker has it.
* ``declare(address, group, from_start=...)``: make sure the group exists (idempotent).
* ``receive(address, group, consumer=..., limit=..., wait=...)``: up to ``limit``
  deliveries, waiting at most ``wait`` seconds. Besides new envelopes this returns
  retries that are due and envelopes whose consumer stopped acking for ``claim_after``
  seconds (it crashed) — each with its ``attempt``, counted by the broker.
* ``Delivery.ack()`` / ``.retry(delay)`` / ``.dead_letter(failure)``: settle one delivery.
  A retry goes back to *that group only*; a dead letter is parked with the failure and
  the delivery acked, in one step.
* ``request(address, envelope, timeout=...)`` / ``reply(to, envelope)``: request/reply.
* ``dead_letters()`` / ``replay(ids)`` / ``purge(ids)``: the parked ones.
* ``leave(consumer)``: the consumer is going away (its worker stopped; the transport may
  live on, shared with others). What it holds goes to the group's other consumers at
  once — its unsettled deliveries, the partitions (keys) they block, its broker-side
  consumers — instead of after ``claim_after``. A worker calls it on stop, after its
  handlers finished or were cancelled; a consumer name the transport never saw is a
  no-op.

A transport may also define ``tune(concurrency=...)``: a worker calls it before it
consumes, with how many handlers it runs at once (RabbitMQ sizes its prefetch by it).

``MemoryTransport`` is the reference implementation and the embedded default;
``iambus.testing.check_transport`` checks any implementation against this contract.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope
from ..errors import ImproperlyConfigured, bad_option

__all__ = ["DeadLetter", "Delivery", "Failure", "Transport", "check_transport_object", "connect"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a delivery was dead-lettered."""

    error_type: str
    """Qualified name of the exception type, e.g. ``"builtins.ValueError"``."""
    message: str
    traceback: str
    """The last frames of the traceback (an excerpt), or "" when there was none."""
    attempts: int
    handler: str | None = None
    """The handler that failed, or None when the message never reached one."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked envelope, with where it was going and why it failed."""

    id: str
    address: str
    group: str
    envelope: Envelope
    failure: Failure
    failed_at: float


@runtime_checkable
class Delivery(Protocol):
    """One envelope delivered to one consumer of a group, to be settled exactly once."""

    @property
    def envelope(self) -> Envelope: ...

    @property
    def attempt(self) -> int:
        """1 on the first delivery to this group, 2 on the first redelivery, and so on."""
        ...

    async def ack(self) -> None:
        """Done: never deliver this envelope to this group again."""

    async def retry(self, delay: float) -> None:
        """Deliver it again to this group (only) after ``delay`` seconds."""

    async def dead_letter(self, failure: Failure) -> None:
        """Park it with ``failure`` and ack it, atomically."""


@runtime_checkable
class Transport(Protocol):
    """The seam between iambus and a broker."""

    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, address: str, envelope: Envelope) -> None: ...

    async def declare(self, address: str, group: str, *, from_start: bool) -> None: ...

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]: ...

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope: ...

    async def reply(self, to: str, envelope: Envelope) -> None: ...

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]: ...

    async def replay(self, ids: Sequence[str]) -> int: ...

    async def purge(self, ids: Sequence[str] | None = None) -> int: ...

    async def leave(self, consumer: str) -> None: ...


def check_transport_object(transport: object) -> Transport:
    """``transport`` if it has everything ``Transport`` declares; else the error naming
    what it lacks."""
    lacks = [name for name in _MEMBERS if not hasattr(transport, name)]
    if isinstance(transport, type) or lacks:
        what = (
            f"an instance, not the class {transport.__name__}"
            if isinstance(transport, type)
            else f"it has no {', '.join(lacks)}"
        )
        raise bad_option(
            "transport",
            transport,
            f"a Transport or a transport URL such as 'redis://127.0.0.1:6379/0' ({what})",
        )
    return transport  # type: ignore[return-value]


# What a Transport has: its attribute and methods, as the Protocol declares them.
_MEMBERS = ("url", *(name for name in vars(Transport) if not name.startswith("_")))

# scheme -> (module, class, the extra that installs its driver)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("iambus.transports.memory", "MemoryTransport", None),
    "redis": ("iambus.transports.redis", "RedisTransport", "redis"),
    "rediss": ("iambus.transports.redis", "RedisTransport", "redis"),
    "amqp": ("iambus.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "amqps": ("iambus.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "nats": ("iambus.transports.nats", "NatsTransport", "nats"),
}


def connect(url: str, **options: Any) -> Transport:
    """The transport for ``url`` (``memory://``, ``redis://host:port/db``); not yet opened.

    ``?claim_after=SECONDS`` in the URL is taken out of it and given to the transport as
    the ``claim_after`` option (which ``options`` may also set; the URL's wins), so that a
    URL alone — ``iambus worker --transport`` — can set it.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ImproperlyConfigured(f"unknown transport URL {url!r}; iambus knows {known}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    claim_after = [value for name, value in query if name == "claim_after"]
    if claim_after:
        options["claim_after"] = _seconds(claim_after[-1], url)
        rest = [(name, value) for name, value in query if name != "claim_after"]
        url = urlunsplit(parts._replace(query=urlencode(rest)))
    module_name, class_name, _extra = _SCHEMES[scheme]
    module = importlib.import_module(module_name)
    transport: Transport = getattr(module, class_name)(url, **options)
    return transport


def _seconds(text: str, url: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ImproperlyConfigured(
            f"claim_after in {url!r} must be a positive number of seconds, got {text!r}"
        )
    return value
