"""Transports: how envelopes travel between processes. ``Transport`` is the seam.

A transport moves ``Envelope`` objects between *addresses* (one per message name and
kind, e.g. ``"event.OrderPlaced"``) and *groups* (who consumes: every group on an address
receives each envelope once; consumers within a group compete). Everything else — names,
codecs, routing, retries, handlers — lives above the seam, so a transport stays small.

The seam is one protocol every transport implements and a few optional ones, so that a
broker which cannot do everything (Kafka moves partitions, not messages, and has no
request/reply; a PostgreSQL queue has no broker-side registry) is still a transport, and
the worker never asks a transport what it has.

``Transport`` (every transport): group delivery, what a worker and a sender use.

* ``send(address, envelope)``: durably store; return once the broker has it.
* ``declare(address, group, from_start=...)``: make sure the group exists (idempotent).
* ``receive(address, group, consumer=..., limit=..., wait=...)``: up to ``limit``
  deliveries, waiting at most ``wait`` seconds. Besides new envelopes this returns
  retries that are due and envelopes whose consumer stopped acking for ``claim_after``
  seconds (it crashed) — each with its ``attempt``, counted by the broker.
* ``Delivery.ack()`` / ``.retry(delay)`` / ``.dead_letter(failure)``: settle one delivery.
  A retry goes back to *that group only*; a dead letter is parked with the failure and
  the delivery acked, in one step.
* ``leave(consumer)``: the consumer is going away (its worker stopped; the transport may
  live on, shared with others). What it holds goes to the group's other consumers at
  once — its unsettled deliveries, the partitions (keys) they block, its broker-side
  consumers — instead of after ``claim_after``. A worker calls it on stop, after its
  handlers finished or were cancelled; a consumer name the transport never saw is a
  no-op.
* ``tune(concurrency=...)``: a worker calls it before it opens the transport, with how
  many handlers it runs at once (RabbitMQ sizes its prefetch by it). Default: nothing.
* ``join()``: return once every envelope sent through the transport has been settled, as
  far as it can tell (``Dispatcher.join`` waits for it). ``MemoryTransport`` can tell; a
  broker transport cannot, and returns at once (the default).
* ``url``, ``claim_after``, ``client_name``, ``partitions`` and ``capabilities``: see
  ``Transport``.

``capabilities`` declares, as ``Capability`` flags, what only the transport's behaviour
can show: an unsettled delivery reclaimed on its own (``RECLAIM``), keys kept in order
(``KEY_ORDER``), retries that wait out their delay (``DELAYED_RETRY``).
``iambus.testing.check_transport`` runs the checks of what a transport declares and skips
the others, saying so.

Optional parts, each a runtime-checkable protocol that iambus tests with ``isinstance``
(having the methods is the declaration; every transport of iambus has them all):

* ``Requester``: ``request(address, envelope, timeout=...)`` / ``reply(to, envelope)``:
  request/reply, for ``execute()`` and ``query()`` across services (without it, they
  raise ``ImproperlyConfigured``);
* ``DeadLetterStore``: ``dead_letters()`` / ``replay(ids)`` / ``purge(ids)``: the parked
  envelopes, for ``iambus dlq`` and ``iambus status``;
* ``DeadLetterCounter``: ``dead_letter_counts()``: how many dead letters each group has,
  counted without loading them (``iambus.status`` loads them all without it);
* ``Registry``: ``announce(instance)`` / ``withdraw(instance)`` / ``instances()`` /
  ``groups()``: which worker instances of which service are live, kept in the broker
  (a worker announces itself at start, again every ``ANNOUNCE_TTL / 3`` seconds, and
  withdraws on stop; one that stops announcing counts as gone after ``ANNOUNCE_TTL``);
  it feeds ``iambus status`` and the errors of a sender whose message no running
  instance handles;
* ``Monitor``: ``backlog(address, group)``: how many envelopes wait for a group, are out
  with its consumers, and wait out a retry's delay, as far as the broker can tell;
* ``Link``: ``down_since``: since when its connection to the broker has been lost while
  its driver reconnects, for a transport whose receives wait through an outage instead
  of failing (RabbitMQ, NATS); the worker's health reads it (``Dispatcher.health()``).

Errors: ``TransportError`` for a broker that failed or is unreachable (the worker
retries), ``TransportRefused`` for refused credentials or permissions and
``ImproperlyConfigured`` for a set-up that cannot work (a worker meeting either while
receiving stops). A settle call that fails leaves the delivery to come back (given back,
or after ``claim_after``): the worker never settles one delivery twice.
``url`` is the URL a transport was made from, safe to show: ``redact()`` replaced its
password (and any secret in its query) by ``***``, so logs and error messages never carry
a secret.

``MemoryTransport`` is the reference implementation and the embedded default;
``iambus.testing.check_transport`` checks any implementation against this contract.
Subclass ``Transport`` to inherit the defaults of ``tune``, ``join``, ``client_name``,
``partitions`` and ``capabilities``; ``Dispatcher(transport=...)`` refuses an object that
lacks a member of ``Transport``, naming it.
"""

from __future__ import annotations

import abc
import enum
import importlib
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope
from ..errors import ImproperlyConfigured, SerializationError, bad_option, check_name

__all__ = [
    "ANNOUNCE_TTL",
    "Backlog",
    "Capability",
    "DeadLetter",
    "DeadLetterCounter",
    "DeadLetterStore",
    "Delivery",
    "Failure",
    "Instance",
    "Link",
    "Monitor",
    "Registry",
    "Requester",
    "Transport",
    "check_dead_letter_store",
    "check_requester",
    "check_transport_object",
    "client_name",
    "connect",
    "redact",
]

ANNOUNCE_TTL = 30.0
"""Seconds an announced instance counts as live without announcing again."""


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


class Capability(enum.Flag):
    """What a transport guarantees beyond the base contract, declared in its
    ``capabilities`` (``Capability.RECLAIM | Capability.KEY_ORDER``).

    Only behaviour shows these, so a transport says what it does and
    ``iambus.testing.check_transport`` checks it; what a method shows (request/reply, dead
    letters, a registry) is an optional protocol instead (``Requester``, ...).
    """

    RECLAIM = enum.auto()
    """A delivery its consumer never settles goes, on its own, to another consumer of the
    group ``claim_after`` seconds after it was handed out, with attempt + 1. (A broker that
    moves whole partitions when a consumer stops, like Kafka, does not.)"""
    KEY_ORDER = enum.auto()
    """Envelopes sent with one ``key`` go out one at a time, in send order, across the
    consumers of a group; a retried one holds its key, a dead-lettered one lets it move
    on; envelopes without a key are never held up."""
    DELAYED_RETRY = enum.auto()
    """``Delivery.retry(delay)`` redelivers no sooner than ``delay`` seconds."""
    SEND_ORDER = enum.auto()
    """Envelopes without a key that one transport sends to an address reach each group
    in the order they were sent (a queue or a stream). (A partitioned log that spreads
    them over its partitions so that every consumer gets a share, like Kafka, does not.)"""


@runtime_checkable
class Transport(Protocol):
    """The seam between iambus and a broker: group delivery (see the module docstring).

    Subclass it to inherit the defaults below (a subclass sets ``url`` and ``claim_after``
    and defines the abstract methods); an object that only matches it must define every
    member itself.
    """

    url: str
    """Where it connects, safe to show: made with ``redact()``, without its secrets."""

    claim_after: float
    """Seconds a delivery may stay unsettled before the broker gives it to another consumer
    (or moves its partition): how long a crashed consumer holds up what it took."""

    client_name: str | None = None
    """The name its connections carry in the broker's own listing (``client_name()``).
    None: not named yet — a dispatcher names it after its service before it opens it. A
    transport without connections (memory) ignores it."""

    partitions: int | None = None
    """How many partitions a group's keyed envelopes are spread over
    (``iambus.partitions.partition(key, partitions)``); None: each key on its own, or
    no keys kept in order."""

    capabilities: Capability = Capability(0)
    """What it guarantees beyond the base contract; the default declares nothing."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def send(self, address: str, envelope: Envelope) -> None: ...

    @abc.abstractmethod
    async def declare(self, address: str, group: str, *, from_start: bool) -> None: ...

    @abc.abstractmethod
    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]: ...

    @abc.abstractmethod
    async def leave(self, consumer: str) -> None: ...

    def tune(self, *, concurrency: int) -> None:
        """A worker running ``concurrency`` handlers at once will consume: size for it.

        Called before ``open()``. Default: nothing."""
        return None  # a body: not abstract, a default

    async def join(self) -> None:
        """Return once every envelope sent through this transport has been settled, as far
        as it can tell. Default: at once (a broker transport cannot tell)."""
        return None


@runtime_checkable
class Requester(Protocol):
    """Optional part of a transport: request/reply, for ``execute()`` and ``query()``
    across services and for a worker answering them."""

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Send ``envelope`` to ``address`` with a ``reply_to`` of this transport's, and
        return the reply; ``TimeoutError`` when none comes within ``timeout`` seconds."""
        ...

    async def reply(self, to: str, envelope: Envelope) -> None:
        """Send ``envelope`` to a request's ``reply_to``; dropped if nobody waits there."""


@runtime_checkable
class DeadLetterStore(Protocol):
    """Optional part of a transport: the parked envelopes, listed, replayed and purged
    (``iambus dlq``, ``iambus status``)."""

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        ...

    async def replay(self, ids: Sequence[str]) -> int:
        """Send each one again to the group it failed in (only), attempt 1; how many."""
        ...

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters (None: every one); how many were deleted."""
        ...


def check_transport_object(transport: object) -> Transport:
    """``transport`` if it has everything ``Transport`` declares; else the error naming
    what it lacks."""
    if isinstance(transport, type):
        what: str | None = f"an instance, not the class {transport.__name__}"
    else:
        what = _lacking(transport)
    if what is not None:
        raise bad_option(
            "transport",
            transport,
            f"a Transport or a transport URL such as 'redis://127.0.0.1:6379/0' ({what})",
        )
    return transport  # type: ignore[return-value]


def check_requester(transport: Transport) -> Requester:
    """``transport`` if it does request/reply; else the error saying so."""
    if isinstance(transport, Requester):
        return transport
    raise ImproperlyConfigured(
        f"{redact(transport.url)}: {type(transport).__name__} has no request/reply "
        f"(iambus.transports.Requester), so a command or query cannot be sent to another "
        f"service and answered: use a transport that has it, or send a command without "
        f"waiting for its answer (dp.send)"
    )


def check_dead_letter_store(transport: Transport) -> DeadLetterStore:
    """``transport`` if it keeps dead letters that can be listed, replayed and purged;
    else the error saying so."""
    if isinstance(transport, DeadLetterStore):
        return transport
    raise ImproperlyConfigured(
        f"{redact(transport.url)}: {type(transport).__name__} keeps no dead letters iambus "
        f"can list, replay or purge (iambus.transports.DeadLetterStore); use the broker's "
        f"own tools"
    )


def _members(protocol: type) -> list[str]:
    """What ``protocol`` declares: its attributes and methods, in order."""
    methods = [name for name, value in vars(protocol).items() if callable(value)]
    public = [*protocol.__annotations__, *methods]
    return [name for name in dict.fromkeys(public) if not name.startswith("_")]


def _lacks(candidate: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``candidate`` has not. A method set to None is
    not there (as ``isinstance`` sees it: how a subclass takes an optional part away)."""
    return [
        name
        for name in _members(protocol)
        if getattr(candidate, name, None) is None
        and (callable(getattr(protocol, name, None)) or not hasattr(candidate, name))
    ]


def _lacking(candidate: object) -> str | None:
    """What ``candidate`` lacks of ``Transport``, for an error message; None: nothing."""
    lacks = _lacks(candidate, Transport)
    if not lacks:
        return None
    defaulted = [name for name in lacks if name in _DEFAULTED]
    inherit = (
        f"; subclass iambus.transports.Transport to inherit {', '.join(defaulted)}"
        if defaulted
        else ""
    )
    return f"it has no {', '.join(lacks)}{inherit}"


# The members of Transport with a default that a subclass inherits.
_DEFAULTED = ("client_name", "partitions", "capabilities", "tune", "join")


@dataclass(frozen=True, slots=True)
class Instance:
    """One running worker of a service, as it announces itself in the broker."""

    service: str
    id: str
    """The worker's consumer name: ``<host>-<pid>-<random>``, unique per start."""
    host: str
    pid: int
    started: float
    """When the worker started (Unix time, the worker's clock)."""
    consumes: tuple[tuple[str, str], ...]
    """(address, group) of each subscription: ``("command.PlaceOrder", "orders")``."""

    def handles(self, address: str) -> bool:
        """Whether this instance consumes ``address`` (``"command.PlaceOrder"``)."""
        return any(consumed == address for consumed, _ in self.consumes)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "service": self.service,
                "id": self.id,
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "consumes": [list(pair) for pair in self.consumes],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Instance:
        """The instance ``to_json`` wrote; ``ValueError`` if ``data`` is not one."""
        try:
            raw = json.loads(data)
            return cls(
                service=str(raw["service"]),
                id=str(raw["id"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                started=float(raw["started"]),
                consumes=tuple((str(a), str(g)) for a, g in raw["consumes"]),
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"not an announced instance: {data!r:.200}") from exc


@dataclass(frozen=True, slots=True)
class Backlog:
    """What one group has in the broker. None: this broker cannot tell (see docs/cli.md)."""

    waiting: int | None
    """Stored and not yet delivered to any consumer of the group (its lag)."""
    in_flight: int | None
    """Delivered to a consumer and not yet settled (acked, retried or dead-lettered)."""
    retrying: int | None
    """Waiting out a retry's delay before they are delivered to the group again."""


@runtime_checkable
class Registry(Protocol):
    """Optional part of a transport: the live worker instances, kept in the broker."""

    async def announce(self, instance: Instance) -> None:
        """Record ``instance`` as live for ``ANNOUNCE_TTL`` seconds, and its groups for good."""

    async def withdraw(self, instance: Instance) -> None:
        """``instance`` stops: it is no longer live (its groups stay known)."""

    async def instances(self) -> list[Instance]:
        """The live instances, of every service."""
        ...

    async def groups(self) -> dict[tuple[str, str], str]:
        """Every (address, group) an instance ever announced, with its service."""
        ...


@runtime_checkable
class Monitor(Protocol):
    """Optional part of a transport: what a group has in the broker."""

    async def backlog(self, address: str, group: str) -> Backlog: ...


@runtime_checkable
class Link(Protocol):
    """Optional part of a transport: whether its connection to the broker is up."""

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic()``) the connection has been lost, its driver
        reconnecting; None while connected."""
        ...


@runtime_checkable
class DeadLetterCounter(Protocol):
    """Optional part of a transport: the dead letters of each group, counted cheaply."""

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """(address, group) -> how many dead letters it has (not replayed nor purged)."""
        ...


# scheme -> (module, class, the extra that installs its driver)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("iambus.transports.memory", "MemoryTransport", None),
    "redis": ("iambus.transports.redis", "RedisTransport", "redis"),
    "rediss": ("iambus.transports.redis", "RedisTransport", "redis"),
    "amqp": ("iambus.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "amqps": ("iambus.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "nats": ("iambus.transports.nats", "NatsTransport", "nats"),
    "kafka": ("iambus.transports.kafka", "KafkaTransport", "kafka"),
    "kafkas": ("iambus.transports.kafka", "KafkaTransport", "kafka"),
}


def connect(url: str, **options: Any) -> Transport:
    """The transport for ``url`` (``memory://``, ``redis://host:port/db``); not yet opened.

    ``?claim_after=SECONDS`` in the URL is taken out of it and given to the transport as
    the ``claim_after`` option (which ``options`` may also set; the URL's wins), so that a
    URL alone — ``iambus worker --transport`` — can set it.
    """
    module_name, class_name, url, found = resolve(url)
    module = importlib.import_module(module_name)
    transport: Transport = getattr(module, class_name)(url, **{**options, **found})
    return transport


def resolve(url: str) -> tuple[str, str, str, dict[str, Any]]:
    """Check ``url`` without importing a driver: (module, class, url, options from the URL).

    Raises ``ImproperlyConfigured`` for an unknown scheme or a bad ``claim_after``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ImproperlyConfigured(f"unknown transport URL {redact(url)!r}; iambus knows {known}")
    options: dict[str, Any] = {}
    query = parse_qsl(parts.query, keep_blank_values=True)
    claim_after = [value for name, value in query if name == "claim_after"]
    if claim_after:
        options["claim_after"] = url_seconds(claim_after[-1], url)
        rest = [(name, value) for name, value in query if name != "claim_after"]
        url = urlunsplit(parts._replace(query=urlencode(rest)))
    module_name, class_name, _extra = _SCHEMES[scheme]
    return module_name, class_name, url, options


# What reading a stored dead letter raises when something else wrote it (or wrote it
# otherwise): that one is skipped, logged, instead of failing the listing and replays.
UNREADABLE = (KeyError, ValueError, TypeError, OverflowError, RecursionError, SerializationError)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def plain_namespace(given: str | None, query: dict[str, str], broker: str) -> str:
    """A transport's namespace of letters, digits, ``_`` and ``-`` (NATS, Kafka): ``given``
    (its keyword), else ``?namespace=`` of its URL, else ``iambus``; checked. Takes
    ``namespace`` out of ``query`` (the URL's parsed query)."""
    if given is not None:
        check_name("namespace", given)
    in_url = query.pop("namespace", None)
    namespace = given or in_url or "iambus"
    if not _PLAIN_NAME.fullmatch(namespace):
        raise ImproperlyConfigured(
            f"a {broker} namespace is letters, digits, '_' and '-' only: {namespace!r}"
        )
    return namespace


def client_name(service: str | None = None) -> str:
    """The name a connection gives the broker: ``iambus:<service>:<host>:<pid>``.

    Without a service: ``iambus:<host>:<pid>``. Whitespace becomes ``_`` (Redis refuses
    a client name with spaces).
    """
    parts = ["iambus", *([service] if service else []), socket.gethostname(), str(os.getpid())]
    return ":".join(re.sub(r"\s+", "_", part) for part in parts)


# Query parameters whose values are secrets (a driver may take credentials there).
_SECRET_PARAMETERS = ("password", "token", "secret", "key", "credential", "auth", "nkey")


def redact(url: str) -> str:
    """``url`` safe to show: its password, and secrets in its query, replaced by ``***``.

    ``redis://user:s3cret@host:6379/0`` becomes ``redis://user:***@host:6379/0``; a NATS
    token (``nats://t0ken@host``) becomes ``nats://***@host``. A URL that cannot be
    parsed is shown as its scheme alone.
    """
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # (kafka://h1:9092,h2:9092 lists several hosts)
            _port = parts.port  # a malformed port raises here rather than later
    except ValueError:
        return url.partition(":")[0] + "://***"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        if colon:
            userinfo = f"{user}:***"
        elif parts.scheme == "nats":  # nats://TOKEN@host: the user part is the secret
            userinfo = "***"
        netloc = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret(name) for name, _value in pairs):
            query = urlencode(
                [(name, "***" if _secret(name) else value) for name, value in pairs], safe="*"
            )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret (and "memory://" stays as written)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _secret(parameter: str) -> bool:
    name = parameter.lower()
    return any(word in name for word in _SECRET_PARAMETERS)


def url_seconds(text: str, url: str, option: str = "claim_after") -> float:
    """``?option=text`` of ``url`` as seconds above 0, else ``ImproperlyConfigured``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ImproperlyConfigured(
            f"{option} in {redact(url)!r} must be a positive number of seconds, got {text!r}"
        )
    return value
