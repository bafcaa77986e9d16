"""``RabbitMQTransport``: RabbitMQ over AMQP 0-9-1 (``pip install 'iambus[rabbitmq]'``).

``amqp://guest:guest@127.0.0.1:5672/?namespace=shop&partitions=16`` — every exchange and
queue name starts with the namespace (default ``iambus``). How the seam maps onto RabbitMQ:

* ``send`` publishes a persistent message to the topic exchange ``<ns>`` with the
  address as routing key, and waits for the publisher confirm;
* a group is a durable *quorum* queue (``queue_type="classic"``: a classic one)
  ``<ns>.<address>@<group>``, bound to ``<ns>`` by
  the address and to the direct exchange ``<ns>.direct`` by its own name — the key that
  retries and replays use, so that they reach that group only;
* an address no group is bound to yet: ``<ns>`` has the alternate exchange
  ``<ns>.unrouted``, where such messages wait in ``<ns>.held.<address>`` (at most
  ``max_length``); the first group declared with ``from_start=True`` takes them, one
  instance at a time (the lock: an exclusive queue ``<ns>.held.<address>@@mover``);
* ``receive`` reads from one consumer (its own channel, with a prefetch of ``prefetch``
  or else the first ``limit`` asked for) per (address, group, consumer name);
* the attempt is ``x-iambus-attempt`` (1 when absent) plus the quorum queue's own
  ``x-delivery-count``: a message whose consumer died unacked counts as a further attempt
  (a classic queue only flags a redelivery: such a message is replaced by a copy with
  attempt + 1, at the back of the queue);
* ``retry(delay)`` publishes a copy, its attempt header incremented, to a delay queue
  ``<ns>.delay.<ms>`` (a per-queue TTL, dead-lettered to ``<ns>.direct`` under
  the group's name), waits for the confirm, then acks the original: a crash in
  between gives a duplicate, never a loss;
* a consumer that neither receives nor settles for ``claim_after`` seconds is considered
  dead: its channels are closed, so RabbitMQ hands what it held to the others;
  ``leave(consumer)`` (a worker stopping) and ``close`` do the same at once (``leave``
  keeps a consumer's partition channel until a keyed retry it waits for is due);
* a retry or dead letter whose copy the broker does not confirm (a nack, a confirm
  timeout) gives the delivery back (``basic.nack``, requeue) while its channel is open:
  it comes again as a further attempt instead of staying with a consumer that lives on;
  a message whose hand-out needs such a copy stays in the buffer for the next receive,
  and so does what a receive cancelled on the way had taken (a copy it was publishing
  is carried through first);
* dead letters are records in the stream queue ``<ns>.dead``; replaying or purging one
  appends a tombstone, so listing them never takes them from anyone;
* ``request`` / ``reply`` use direct reply-to (``amq.rabbitmq.reply-to``): no queue per
  requester;
* the registry (``announce`` / ``instances``): announcements and withdrawals are records
  in the stream queue ``<ns>.registry`` (a week kept); an announced instance is live
  while its exclusive queue ``<ns>.alive.<id>`` exists (a passive declare from another
  connection finds it locked), so one killed is gone at once. Those queues live on a
  registry connection of their own, not robust (opened again by the next announce), so
  that the transport's reconnect never waits for the broker to drop a lost connection.

Per-key ordering (``iambus.partitions``): an envelope with a ``key`` is published to the
direct exchange ``<ns>.keyed`` under ``<address>.<n>``, ``n = partition(key,
partitions)``. A group of an address keyed envelopes are sent to has a *partition queue*
``<ns>.<address>@<group>@<n>`` per partition, bound by that key: a durable *classic*
queue with a single active consumer and two priorities (``x-max-priority: 1``). Each
consumer name consumes all of them on a second channel, with a prefetch of 1 per
consumer: RabbitMQ gives a partition queue to one consumer at a time, which gets its next
message only once it settled the previous one — so each (group, partition) has at most
one delivery out in the cluster.

* partition queues are made on demand: the stream ``<ns>.directory`` records each group
  (at its first ``declare``) and each address keyed envelopes go to (before the first
  is sent); a sender makes the partition queues of every group recorded before that,
  a group declared after it makes its own, and the consumers of an address, told by
  the stream, start consuming theirs — a group that gets no keyed envelope has none;
* ``retry(delay)`` of a keyed delivery keeps it unacked through the delay, then publishes
  a copy with attempt + 1 at priority 1 — ahead of everything queued — and acks it;
* the attempt is ``x-iambus-attempt`` alone: a classic queue only flags a redelivery, so
  a redelivered message (its consumer died or was retired) is not handed out but replaced
  by such a copy with attempt + 1;
* a retired consumer first gives back what it buffered unhandled as *hand-back* copies
  (same attempt, priority 1; a copy already at priority 1 just returns to its place, as
  a classic queue does), then closes the channel: RabbitMQ activates the waiting
  consumer with the highest (random) ``x-priority``, which gets the copy or the returned
  delivery first; an original returning behind its hand-back copy is dropped there;
* keyed sends to an address no group is bound to wait in its held queue too (the
  alternate exchange of ``<ns>.keyed`` is the topic exchange ``<ns>.keyed.unrouted``),
  and are moved to their partition queues at priority 1: ahead of what is sent there
  once the queues are bound;
* a replayed keyed dead letter is published to the partition queue it came from
  (recorded in the dead letter), at the back.

Names longer than AMQP's 255 bytes (queues, routing keys) keep their start and a SHA-256
digest, the same in every process. See ``docs/rabbitmq.md`` for the reasons and the
limits. Driver errors surface as ``TransportError``; a lost connection is reopened in
the background (robust connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import random
import string
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope, finite_time, new_id
from ..errors import (
    ImproperlyConfigured,
    SerializationError,
    TransportError,
    TransportRefused,
    check_count,
    check_name,
    check_seconds,
)
from ..partitions import partition, partitions_option
from . import (
    Backlog,
    Capability,
    DeadLetter,
    Delivery,
    Failure,
    Instance,
    Transport,
    client_name,
    redact,
)

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import AbstractConnection, AbstractRobustChannel, AbstractRobustConnection
    from aiormq.abc import DeliveredMessage
    from pamqp import commands as spec
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "the RabbitMQ transport needs aio-pika: pip install 'iambus[rabbitmq]'"
    ) from exc

__all__ = ["RabbitMQTransport"]

logger = logging.getLogger(__name__)

REPLY_TO = "amq.rabbitmq.reply-to"
PERSISTENT = 2

# Headers iambus writes; every other envelope field is an AMQP property.
H_AT = "x-iambus-at"
H_CAUSE = "x-iambus-cause"
H_KEY = "x-iambus-key"
H_HEADERS = "x-iambus-headers"
H_ATTEMPT = "x-iambus-attempt"
H_DELAY = "iambus-delay"  # no "x-": a headers exchange ignores x- binding arguments
H_HANDBACK = "x-iambus-handback"  # a lane copy handed back unhandled: its original follows
# Records of the dead-letter stream.
H_DEAD = "x-iambus-dead"
H_SETTLED = "x-iambus-settled"
H_MARK = "x-iambus-mark"
H_PARTITION = "x-iambus-partition"  # in a keyed dead letter: the partition it came from
H_ADDRESS = "x-iambus-address"  # in a dead letter, and in a record of the directory
H_GROUP = "x-iambus-group"  # (likewise)
# Records of the directory stream: a group of an address (H_ADDRESS, H_GROUP), keyed
# sends to an address (H_ADDRESS, H_PARTITIONS: the sender's count); each with its id.
H_PARTITIONS = "x-iambus-partitions"
H_RECORD = "x-iambus-record"
# Records of the registry stream: an instance announced (its JSON), withdrawn (its id).
H_ANNOUNCED = "x-iambus-announced"
H_WITHDRAWN = "x-iambus-withdrawn"
# The registry stream keeps a week of records: retention drops whole segments once they
# are older, so they are small (each read appends a mark of about 100 bytes).
REGISTRY_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-stream-max-segment-size-bytes": 100_000,
}
# An instance's announcement is written again this often (seconds): older records go.
REGISTRY_REFRESH = 86_400.0
H_FAILURE = (
    ("x-iambus-error-type", "error_type"),
    ("x-iambus-error-message", "message"),
    ("x-iambus-traceback", "traceback"),
    ("x-iambus-attempts", "attempts"),
    ("x-iambus-handler", "handler"),
)
_PLAIN = frozenset(string.ascii_letters + string.digits + "-_.#,/+ ")
MAX_HEADER_TEXT = 16_000  # an AMQP header frame must fit in one frame (128 KiB)
MAX_NAME = 255  # bytes in an AMQP short string: queue and exchange names, routing keys
MAX_NAMESPACE = 200  # it starts every exchange name: room for the longest suffix
QUEUE_TYPES = ("quorum", "classic")  # of a group's queue: the queue_type option
LANE_ARGUMENTS: dict[str, Any] = {"x-single-active-consumer": True, "x-max-priority": 1}
FIRST = 1  # the priority of a lane copy that must come before everything queued
DECLARERS = 4  # channels that declare a group's partition queues side by side
SPREAD = 0.3  # seconds over which running consumers take the partitions when keyed sends begin
DIRECTORY_PREFETCH = 2000  # records of the directory stream in flight to its reader
_REMEMBERED = 10_000  # entries in each per-process memory of returned deliveries


@dataclass(eq=False)
class _Consumer:
    """One consumer name on one group: its channels, and what it was sent but not given.

    ``inbox`` holds (message, lane): ``lane`` is the partition queue it came from, or
    None for the group's queue.
    """

    key: tuple[str, str, str]
    queue: str
    channel: AbstractRobustChannel
    lanes: AbstractRobustChannel  # prefetch 1 per consumer: one consumer per partition
    inbox: deque[tuple[DeliveredMessage, str | None]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    consuming_on: Any = None  # the AMQP channel the consume was issued on
    lanes_on: Any = None  # the AMQP channel the partition queues are consumed on
    # Partition queue -> the AMQP channel it is consumed on: the consumes that went
    # through before a receive was cancelled amid them are not issued twice.
    lanes_consumed: dict[str, Any] = field(default_factory=dict)
    # One _consume at a time: two receives starting together each issued Basic.Consume,
    # two consumers on the channel, each with the prefetch (twice the deliveries held).
    consume_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Queue -> (AMQP channel, the consume issued on it, not answered yet): a consume
    # carried on past a cancelled caller's bound (see _unbroken) is waited for by the
    # next receive, not issued a second time.
    subscribing: dict[str, tuple[Any, asyncio.Future[None]]] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    receiving: int = 0
    retrying: set[asyncio.Task[None]] = field(default_factory=set)  # keyed retries waiting
    left: bool = False  # left while keyed retries waited: its partition channel closes after


class RabbitMQTransport(Transport):
    """RabbitMQ transport; see the module docstring and ``docs/rabbitmq.md``."""

    capabilities = (
        Capability.RECLAIM | Capability.KEY_ORDER | Capability.DELAYED_RETRY | Capability.SEND_ORDER
    )
    partitions: int  # always partitioned (see iambus.partitions)

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        namespace: str | None = None,
        claim_after: float = 60.0,
        prefetch: int | None = None,
        max_length: int = 10_000,
        timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        partitions: int | None = None,
        queue_type: str | None = None,
        client_name: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        if namespace is not None:
            check_name("namespace", namespace)
        in_url = query.pop("namespace", None)
        type_in_url = query.pop("queue_type", None)
        self.queue_type = queue_type or type_in_url or "quorum"
        if self.queue_type not in QUEUE_TYPES:
            raise ImproperlyConfigured(
                f"queue_type is 'quorum' (the default: replicated, counts deliveries) or "
                f"'classic' (one node, lower latency), not {self.queue_type!r}"
            )
        self.namespace = namespace or in_url or "iambus"
        if not set(self.namespace) <= _PLAIN:
            raise ImproperlyConfigured(
                f"a RabbitMQ namespace holds letters, digits and '-_.#,/+ ' only: "
                f"{self.namespace!r}"
            )
        if len(self.namespace) > MAX_NAMESPACE:
            raise ImproperlyConfigured(
                f"a RabbitMQ namespace is at most {MAX_NAMESPACE} bytes (it starts every "
                f"exchange name, and AMQP names hold {MAX_NAME}); "
                f"{self.namespace[:40]!r}... has {len(self.namespace)}"
            )
        self.partitions = partitions_option(partitions, query)
        self._driver_url = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = redact(url)
        self.client_name = client_name  # None: the dispatcher's service names it on open
        self.claim_after = check_seconds("claim_after", claim_after)
        self.prefetch = None if prefetch is None else check_count("prefetch", prefetch)
        self.max_length = check_count("max_length", max_length)
        self.timeout = check_seconds("timeout", timeout)
        self.reconnect_interval = check_seconds("reconnect_interval", reconnect_interval)
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._admin: AbstractRobustChannel | None = None
        self._replier: AbstractRobustChannel | None = None
        self._declarers: list[AbstractRobustChannel] = []  # with _admin: partition queues
        self._reply_consuming_on: Any = None
        self._reply_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        self._consumers: dict[tuple[str, str, str], _Consumer] = {}
        self._consumer_lock = asyncio.Lock()
        self._held: dict[str, str] = {}  # address -> its routing key, held queue declared
        self._held_keyed: dict[str, str] = {}  # address -> its lanes' routing-key prefix
        self._lanes: set[tuple[str, str]] = set()  # (address, group): partition queues declared
        self._lanes_lock = asyncio.Lock()
        self._keyed_ready: set[str] = set()  # addresses whose groups' partition queues exist
        self._keyed_lock = asyncio.Lock()
        # What this process read of the directory stream (see _directory), kept up to date
        # by a consumer of it: address -> its groups; address -> the partition count of its
        # latest keyed-sends record; the offset to resume at; records awaited, by id.
        self._groups: dict[str, set[str]] = {}
        self._keyed_sends: dict[str, int] = {}
        self._mismatched: set[str] = set()  # addresses whose partitions mismatch was logged
        self._directory_next: int | None = None
        self._awaited: dict[str, asyncio.Future[None]] = {}
        self._follower: asyncio.Task[None] | None = None
        self._following = asyncio.Lock()
        self._caught_up = False  # read up to a record written when the following began
        self._appended: set[str] = set()  # streams this process published to (_append)
        self._delays: dict[int, float] = {}  # delay bucket (ms) -> when last declared
        self._declared: set[str] = set()  # queue names, for destroy()
        self._sweeper: asyncio.Task[None] | None = None
        self._lost: float | None = None  # the connection lost since (monotonic)
        # Deliveries this process received and gave back without handing them out, so
        # that their return is not counted as an attempt when it comes back here:
        # (queue, message id, attempt header, hand-back copy?) -> how many times.
        self._unhanded: dict[tuple[str, str | None, int, bool], int] = {}
        # Lane deliveries whose hand-back copy came first, and deliveries (of a lane or a
        # classic group queue) copied with attempt + 1 as their channel closed, before
        # their ack: the original, back unacked, is dropped (see _pass_on).
        self._superseded: dict[tuple[str, str | None, int], int] = {}
        # The registry's own connection, not robust: it holds the exclusive queues of the
        # instances announced here (their ids). A robust one would declare them again on
        # every reconnect, which fails while the broker still holds the connection that
        # was lost (RESOURCE_LOCKED): the transport's connection must never wait for that.
        self._presence: AbstractConnection | None = None
        self._presences: dict[str, float] = {}  # id -> when its announcement was written
        self._announcing = asyncio.Lock()
        # Consumers that left while keyed retries waited: retired once those fired.
        self._leaving: dict[_Consumer, asyncio.Task[None]] = {}
        # Instances found gone (their queue deleted): id -> the stream offset of the
        # announcement that was probed; a later announcement of the id is probed again.
        self._gone: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- names ------------------------------------------------------------------------

    @property
    def _direct(self) -> str:
        return f"{self.namespace}.direct"

    @property
    def _unrouted(self) -> str:
        return f"{self.namespace}.unrouted"

    @property
    def _delay_exchange(self) -> str:
        return f"{self.namespace}.delay"

    @property
    def _dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def _keyed(self) -> str:
        return f"{self.namespace}.keyed"

    @property
    def _keyed_unrouted(self) -> str:
        return f"{self.namespace}.keyed.unrouted"

    def _queue(self, address: str, group: str) -> str:
        # Also the routing key of the group's binding to <ns>.direct: unique per group.
        return _fit(f"{self.namespace}.{_escape(address)}@{_escape(group)}")

    def _lane(self, address: str, group: str, n: int) -> str:
        # A second '@' (escaped everywhere else): never the name of a group's queue.
        return _fit(f"{self.namespace}.{_escape(address)}@{_escape(group)}@{n}")

    def _held_queue(self, address: str) -> str:
        return _fit(f"{self.namespace}.held.{_escape(address)}")

    @property
    def _directory_stream(self) -> str:
        return f"{self.namespace}.directory"

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._connection is not None:
            return
        async with self._translate("connect"):
            connection = await aio_pika.connect_robust(
                self._driver_url,
                reconnect_interval=self.reconnect_interval,
                # Shown by the management UI and `rabbitmqctl list_connections`.
                client_properties={"connection_name": self.client_name or client_name()},
            )
            self._lost = None  # (a close of an earlier connection set it)
            connection.close_callbacks.add(self._on_lost)
            connection.reconnect_callbacks.add(self._on_back)
            try:
                self._publisher = await connection.channel(publisher_confirms=True)
                self._admin = await connection.channel(publisher_confirms=True)
                self._replier = await connection.channel(publisher_confirms=True)
                self._connection = connection
                await self._declare_topology()
            except BaseException:
                self._connection = None
                await connection.close()
                raise
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic()``) the connection has been lost, reconnecting;
        None while connected (``iambus.transports.Link``)."""
        connection = self._connection
        if connection is None or connection.connected.is_set():
            return None
        return self._lost if self._lost is not None else time.monotonic()

    def _on_lost(self, *_: Any) -> None:
        if self._lost is None:
            self._lost = time.monotonic()

    def _on_back(self, *_: Any) -> None:
        self._lost = None

    async def _declare_topology(self) -> None:
        ch = await self._ready(self._admin)
        await ch.exchange_declare(self._unrouted, exchange_type="direct", durable=True)
        await ch.exchange_declare(
            self.namespace,
            exchange_type="topic",
            durable=True,
            arguments={"alternate-exchange": self._unrouted},
        )
        await ch.exchange_declare(self._direct, exchange_type="direct", durable=True)
        await ch.exchange_declare(self._delay_exchange, exchange_type="headers", durable=True)
        # Keyed sends: routing key "<address>.<partition>"; one with no partition queue
        # bound goes to the address's held queue, bound by "<address>.*".
        await ch.exchange_declare(self._keyed_unrouted, exchange_type="topic", durable=True)
        await ch.exchange_declare(
            self._keyed,
            exchange_type="direct",
            durable=True,
            arguments={"alternate-exchange": self._keyed_unrouted},
        )
        await ch.queue_declare(self._dead, durable=True, arguments={"x-queue-type": "stream"})

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await self._stop_following()
        for consumer in list(self._consumers.values()):
            for retry in consumer.retrying:  # they come back now, with the connection
                retry.cancel()
            await asyncio.gather(*consumer.retrying, return_exceptions=True)
            await self._leave(consumer)
        await self._stop_leaving()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransportError(f"{self.url}: closed while waiting"))
        connection, self._connection = self._connection, None
        presence, self._presence = self._presence, None
        self._presences.clear()
        if presence is not None:
            with contextlib.suppress(Exception):
                await presence.close()
        self._publisher = self._admin = self._replier = None
        self._declarers = []
        self._reply_consuming_on = None
        self._held.clear()
        self._held_keyed.clear()
        self._lanes.clear()
        self._keyed_ready.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def leave(self, consumer: str) -> None:
        """Retire ``consumer``'s consumers now (see ``_retire``), not after ``claim_after``:
        what they held goes to the others, and each partition queue to the next consumer."""
        for key, state in list(self._consumers.items()):
            if key[2] == consumer:
                await self._leave(state)

    async def _leave(self, state: _Consumer) -> None:
        if all(retry.done() for retry in state.retrying):
            with contextlib.suppress(TransportError):
                await self._retire(state)
            return
        # A keyed retry still waiting keeps its delivery unacked on the partition
        # channel, its partition blocked, until it fires: closing that channel now would
        # bring it back at once (attempt + 1). The group's queue goes now, the partition
        # queues once the retries fired.
        if self._consumers.get(state.key) is state:
            del self._consumers[state.key]
        state.left = True
        with contextlib.suppress(TransportError):
            await self._retire_group(state)
        task = asyncio.get_running_loop().create_task(self._retire_lanes_later(state))
        self._leaving[state] = task
        task.add_done_callback(lambda _: self._leaving.pop(state, None))

    async def _retire_lanes_later(self, state: _Consumer) -> None:
        while not all(retry.done() for retry in state.retrying):
            await asyncio.gather(*list(state.retrying), return_exceptions=True)
        try:
            await self._retire_lanes(state)
        except Exception as exc:
            logger.warning("iambus: retiring consumer %s: %r", state.key, exc)

    async def _stop_leaving(self) -> None:
        """Closing: the retries a left consumer still waits for come back now (as the
        connection's close would bring them), what it buffered is handed back."""
        for state in list(self._leaving):
            for retry in state.retrying:
                retry.cancel()
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)

    async def destroy(self) -> int:
        """Delete this namespace's exchanges and the queues this instance declared (tests)."""
        await self._stop_leaving()
        await self._stop_following()
        for consumer in list(self._consumers.values()):
            # Everything goes: nothing to hand back first.
            del self._consumers[consumer.key]
            for task in consumer.retrying:
                task.cancel()
            await asyncio.gather(*consumer.retrying, return_exceptions=True)
            for channel in (consumer.channel, consumer.lanes):
                await _shut(channel, within=self.timeout)
        ch = await self._ready(self._admin)
        names = {*self._declared, self._dead}
        names |= {f"{self.namespace}.delay.{ms}" for ms in self._delays}
        exchanges = (
            self.namespace,
            self._unrouted,
            self._direct,
            self._delay_exchange,
            self._keyed,
            self._keyed_unrouted,
        )
        async with self._translate("destroy"):
            for name in sorted(names):
                await ch.queue_delete(name)
            for exchange in exchanges:
                await ch.exchange_delete(exchange)
        self._declared.clear()
        self._held.clear()
        self._held_keyed.clear()
        self._lanes.clear()
        self._keyed_ready.clear()
        self._appended.clear()
        self._delays.clear()
        return len(names)

    # -- sending and declaring --------------------------------------------------------

    async def send(self, address: str, envelope: Envelope) -> None:
        if envelope.key is None:
            route = self._held.get(address)
            if route is None:
                route = await self._declare_held(address)
            await self._publish(self.namespace, route, envelope, None)
        else:
            route = await self._lane_route(address, envelope.key)
            await self._publish(self._keyed, route, envelope, None)

    async def _lane_route(self, address: str, key: str) -> str:
        """The routing key of ``key``'s partition of ``address`` on ``<ns>.keyed``, once
        every group of ``address`` has its partition queues."""
        prefix = self._held_keyed.get(address)
        if prefix is None:
            prefix = await self._declare_held_keyed(address)
        if address not in self._keyed_ready:
            await self._ensure_keyed(address)
        return f"{prefix}.{partition(key, self.partitions)}"

    async def _ensure_keyed(self, address: str) -> None:
        """Make sure every group of ``address`` has its partition queues (before this
        process first sends a keyed envelope there): a group without them would not get
        it. The groups are those the directory holds up to a keyed-sends record of
        ``address``; a group recorded after that record saw it, and declared its own."""
        async with self._keyed_lock:
            if address in self._keyed_ready:
                return
            await self._directory()
            if self._keyed_sends.get(address) != self.partitions:
                await self._record({H_ADDRESS: address, H_PARTITIONS: self.partitions})
            for group in sorted(self._groups.get(address, ())):
                await self._declare_lanes(address, group)
            self._keyed_ready.add(address)

    async def _declare_held(self, address: str) -> str:
        # Where an address's messages wait while no group is bound to it (the exchange's
        # alternate exchange routes them here): a later `from_start` group takes them.
        route = _shorten(address, MAX_NAME)
        await self._held_queue_bound(address, self._unrouted, route)
        self._held[address] = route
        return route

    async def _declare_held_keyed(self, address: str) -> str:
        # The same held queue, for keyed sends no group's partition queue is bound to:
        # one queue, so held messages keep their send order whatever their key.
        prefix = _shorten(address, MAX_NAME - 5)  # room for ".<partition>"
        await self._held_queue_bound(address, self._keyed_unrouted, f"{prefix}.*")
        self._held_keyed[address] = prefix
        return prefix

    async def _held_queue_bound(self, address: str, exchange: str, route: str) -> None:
        ch = await self._ready(self._admin)
        name = self._held_queue(address)
        async with self._translate(f"declare {name}"):
            await ch.queue_declare(name, durable=True, arguments={"x-max-length": self.max_length})
            await ch.queue_bind(name, exchange, routing_key=route)
        self._declared.add(name)

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        ch = await self._ready(self._admin)
        name = self._queue(address, group)
        route = _shorten(address, MAX_NAME)
        try:
            async with self._translate(f"declare {name}"):
                arguments: dict[str, Any] = {"x-queue-type": self.queue_type}
                await ch.queue_declare(name, durable=True, arguments=arguments)
        except TransportError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelPreconditionFailed):
                raise ImproperlyConfigured(
                    f"{self.url}: the queue {name!r} exists with other arguments than "
                    f"queue_type={self.queue_type!r} gives it ({exc.__cause__}); every "
                    f"process of a namespace must use the same queue_type (a queue's type "
                    f"never changes: drain and delete the queue to switch)"
                ) from exc.__cause__
            raise
        async with self._translate(f"declare {name}"):
            await ch.queue_bind(name, self.namespace, routing_key=route)
            await ch.queue_bind(name, self._direct, routing_key=self._queue(address, group))
        self._declared.add(name)
        await self._directory()
        if group not in self._groups.get(address, ()):
            # Recorded before it looks for keyed sends: a sender that records its keyed
            # sends later finds the group, and makes its partition queues itself.
            await self._record({H_ADDRESS: address, H_GROUP: group})
        if address in self._keyed_sends:
            await self._declare_lanes(address, group)
        elif (address, group) not in self._lanes:
            [found] = await self._probe([self._lane(address, group, 0)])
            if found is not None:
                # Made by an iambus that declared them with every group: keyed messages may
                # wait there, and senders of that version record nothing.
                await self._ensure_keyed(address)
        if from_start:
            await self._take_held(address, group)

    async def _declare_lanes(self, address: str, group: str) -> None:
        """The group's partition queues, bound to ``<ns>.keyed`` by ``<address>.<n>``
        (once per process): over a few channels at once (a channel waits for each reply),
        2-3 times faster."""
        if (address, group) in self._lanes:
            return
        async with self._lanes_lock:
            if (address, group) not in self._lanes:
                await self._declare_lanes_now(address, group)

    async def _declare_lanes_now(self, address: str, group: str) -> None:
        if not self._declarers:
            self._declarers = [await self._new_channel() for _ in range(DECLARERS - 1)]
        channels = [await self._ready(c) for c in (self._admin, *self._declarers)]

        async def declare(ch: aiormq.abc.AbstractChannel, numbers: range) -> None:
            for n in numbers:
                await self._declare_lane(ch, address, group, n)

        step = len(channels)
        done = await asyncio.gather(
            *(declare(ch, range(i, self.partitions, step)) for i, ch in enumerate(channels)),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        self._lanes.add((address, group))

    async def _declare_lane(
        self, ch: aiormq.abc.AbstractChannel, address: str, group: str, n: int
    ) -> str:
        name = self._lane(address, group, n)
        async with self._translate(f"declare {name}"):
            await ch.queue_declare(name, durable=True, arguments=LANE_ARGUMENTS)
            route = f"{_shorten(address, MAX_NAME - 5)}.{n}"
            await ch.queue_bind(name, self._keyed, routing_key=route)
        self._declared.add(name)
        return name

    async def _take_held(self, address: str, group: str) -> None:
        if address not in self._held:
            await self._declare_held(address)
        held = self._held_queue(address)
        ch = await self._ready(self._admin)
        async with self._translate(f"move {held}"):
            waiting = await ch.queue_declare(held, passive=True)
        if not waiting.message_count:
            return
        async with self._moving(held):
            await self._move_held(address, group, held)

    @contextlib.asynccontextmanager
    async def _moving(self, held: str) -> AsyncIterator[None]:
        """One mover of a held queue at a time, cluster-wide: two instances declaring the
        first group at once would interleave their copies and reorder a key. The lock is
        an exclusive queue (RabbitMQ deletes it with its connection, should that die)."""
        lock = _fit(f"{held}@@mover")  # '@@': never the name of a queue of iambus's own
        while True:
            channel = await self._new_channel()
            try:
                ch = await self._ready(channel)
                async with self._translate(f"lock {held}"):
                    await ch.queue_declare(lock, exclusive=True)
                break
            except TransportError as exc:
                await _shut(channel, within=self.timeout)
                if not isinstance(exc.__cause__, aiormq.exceptions.ChannelLockedResource):
                    raise
                await asyncio.sleep(0.5)  # another instance is moving them
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await ch.queue_delete(lock)
            await _shut(channel, within=self.timeout)

    async def _move_held(self, address: str, group: str, held: str) -> None:
        ch = await self._ready(self._admin)
        moved = 0
        async with self._translate(f"move {held}"):
            while True:
                message = await ch.basic_get(held, no_ack=False)
                if not isinstance(message.delivery, spec.Basic.GetOk):
                    break
                # Copy, confirmed, then ack: a crash in between duplicates, never loses.
                properties = message.header.properties
                key = (properties.headers or {}).get(H_KEY)
                if key is None:
                    exchange, route = self._direct, self._queue(address, group)
                else:  # to its partition queue, by name (the default exchange) ...
                    n = partition(_text(key), self.partitions)
                    exchange, route = "", self._lane(address, group, n)
                    # ... at priority 1: ahead of what senders put there since it was
                    # bound (after everything held), behind what was moved before it.
                    properties = copy.copy(properties)
                    properties.priority = FIRST
                try:
                    if key is not None and address not in self._keyed_ready:
                        await self._ensure_keyed(address)  # (an older iambus recorded none)
                    await self._publish_raw(exchange, route, message.body, properties)
                except BaseException:
                    # Back to the head of the held queue at once (nothing else takes from
                    # it while this holds its lock), not at the channel's close.
                    with contextlib.suppress(Exception):
                        await ch.basic_reject(_tag(message), requeue=True)
                    raise
                await ch.basic_ack(_tag(message))
                moved += 1
        if moved:
            logger.info("iambus: %d held message(s) on %s went to %s", moved, address, group)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        extra: Mapping[str, Any] | None,
        *,
        channel: aiormq.abc.AbstractChannel | None = None,
    ) -> None:
        await self._publish_raw(
            exchange, routing_key, envelope.payload, _properties(envelope, extra), channel=channel
        )

    async def _publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        channel: aiormq.abc.AbstractChannel | None = None,
    ) -> None:
        ch = channel or await self._ready(self._publisher)
        async with self._translate(f"publish to {exchange or 'the default exchange'}"):
            try:
                confirm = await ch.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    timeout=self.timeout,
                )
            except (TypeError, ValueError) as exc:  # pamqp: a short string is too long
                problem = _too_long(routing_key, properties)
                if problem is None:
                    raise
                raise ImproperlyConfigured(f"{self.url}: cannot publish: {problem}") from exc
        if not isinstance(confirm, spec.Basic.Ack):
            raise TransportError(f"{self.url}: the broker did not confirm a message: {confirm!r}")

    # -- the directory: the groups of each address, and the addresses sent keyed -------

    async def _directory(self) -> None:
        """Follow the directory stream ``<ns>.directory`` (from the first call on), and
        wait until this process has read it up to a record written at that first call.

        It holds a record per group (written by the first ``declare`` of it) and per
        address keyed envelopes are sent to (written before the first is sent): RabbitMQ
        tells no queue's bindings over AMQP, and a sender must find the groups that have
        no partition queues yet. Its consumer here keeps ``_groups`` and
        ``_keyed_sends`` up to date, and wakes an address's consumers when keyed sends
        to it begin, to consume their partition queues.
        """
        if self._caught_up:
            return
        async with self._following:
            if self._caught_up:
                return
            if self._follower is None:
                ch = await self._ready(self._admin)
                name = self._directory_stream
                async with self._translate(f"declare {name}"):
                    await ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
                self._declared.add(name)
                self._follower = asyncio.get_running_loop().create_task(self._follow())
            await self._record({})  # a mark: what came before it is known once it is read
            self._caught_up = True

    async def _record(self, headers: Mapping[str, Any]) -> None:
        """Append a record to the directory stream, and wait until it is read here: every
        record before it is known then."""
        record = uuid.uuid4().hex
        read = asyncio.get_running_loop().create_future()
        self._awaited[record] = read
        try:
            properties = spec.Basic.Properties(
                delivery_mode=PERSISTENT, headers={**headers, H_RECORD: record}
            )
            await self._append(self._directory_stream, b"", properties)
            # A long directory takes a while to read at a process's start: wait as long
            # as the reading goes on, and give up after ``timeout`` without progress.
            progress = self._directory_next
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        await asyncio.shield(read)
                    break
                except TimeoutError:
                    if self._directory_next == progress:
                        raise TransportError(
                            f"{self.url}: a record of {self._directory_stream} was not read "
                            f"back within {self.timeout} s"
                        ) from None
                    progress = self._directory_next
        finally:
            self._awaited.pop(record, None)

    async def _follow(self) -> None:
        """Consume the directory stream while the transport is open; after a lost channel
        or connection, again from the record after the last one read."""
        name = self._directory_stream
        failing = False
        young = 0  # consumes refused as the stream has no running member here yet
        while self._connection is not None:  # (closed: a follower started late ends)
            pause = self.reconnect_interval
            channel: AbstractRobustChannel | None = None
            try:
                channel = await self._new_channel()
                async with self._translate(f"read {name}"):
                    # (a stream consumer needs one; a large one reads a long directory fast)
                    await channel.set_qos(prefetch_count=DIRECTORY_PREFETCH)
                    ch = await channel.get_underlay_channel()
                    start = self._directory_next
                    await _unbroken(
                        ch.basic_consume(
                            name,
                            self._on_record,
                            arguments={"x-stream-offset": "first" if start is None else start},
                        ),
                        timeout=self.timeout,
                    )
                failing, young = False, 0
                with contextlib.suppress(Exception):
                    await ch.closing
            except TransportError as exc:
                if isinstance(exc.__cause__, aiormq.exceptions.ChannelPreconditionFailed):
                    young += 1  # another process declared it a moment ago
                if 0 < young < 20:
                    pause = 0.05
                elif not failing:
                    logger.warning("iambus: %s; reading it again", exc)
                    failing = True
            except Exception as exc:  # a bug: logged, and read again, never left unread
                if not failing:
                    logger.exception("iambus: %s: reading %s failed: %r", self.url, name, exc)
                    failing = True
            finally:
                if channel is not None:
                    # Waited for 1 s at most: on a connection that is recovering (the
                    # stream deleted under it, say), a channel's close waits for the
                    # recovery (it goes on alone then, not cut: see _shut).
                    await _shut(channel, within=1.0)
            await asyncio.sleep(pause)

    async def _on_record(self, message: DeliveredMessage) -> None:
        # Everything is taken in before the first await: the records are read in order.
        headers = message.header.properties.headers or {}
        offset = _offset(headers)
        if offset < 0 or self._directory_next is None or offset >= self._directory_next:
            if offset >= 0:
                self._directory_next = offset + 1
            try:
                self._take_record(headers)
            except (KeyError, TypeError, ValueError) as exc:
                logger.error(
                    "iambus: a record of %s is unreadable: %r", self._directory_stream, exc
                )
        # Acks only give the stream credit: one for many, half the prefetch at a time.
        tag = _tag(message)
        if tag % (DIRECTORY_PREFETCH // 2) == 0:
            with contextlib.suppress(Exception):
                await message.channel.basic_ack(tag, multiple=True)

    def _take_record(self, headers: Mapping[str, Any]) -> None:
        if H_ADDRESS in headers:
            address = _text(headers[H_ADDRESS])
            if H_GROUP in headers:
                self._groups.setdefault(address, set()).add(_text(headers[H_GROUP]))
            else:
                began = address not in self._keyed_sends
                partitions = self._keyed_sends[address] = int(headers[H_PARTITIONS])
                consumers = [s for s in self._consumers.values() if s.key[0] == address]
                if began:  # they start consuming their partition queues
                    for state in consumers:
                        state.arrived.set()
                if consumers and partitions != self.partitions:
                    logger.error(
                        "iambus: keyed messages to %r are now sent by a process with %d "
                        "partitions, here %d: some go to partition queues not consumed here; "
                        "give every process of namespace %r the same partitions",
                        address,
                        partitions,
                        self.partitions,
                        self.namespace,
                    )
        read = self._awaited.get(_text(headers.get(H_RECORD, "")))
        if read is not None and not read.done():
            read.set_result(None)

    async def _stop_following(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        self._caught_up = False
        self._directory_next = None
        self._groups.clear()
        self._keyed_sends.clear()
        for read in self._awaited.values():
            if not read.done():
                read.set_exception(TransportError(f"{self.url}: closed"))

    async def _append(self, stream: str, body: bytes, properties: spec.Basic.Properties) -> None:
        """Publish a record to the stream queue ``stream``; this process's first one over a
        connection of its own, sent again should that connection fail.

        On RabbitMQ 3.10 a channel whose first publish to a stream comes before the broker
        has noted the stream's leader (a stream another process declared a moment ago:
        two workers starting on a new namespace) crashes, and takes its connection down
        with it (``INTERNAL_ERROR``) — here a throwaway one, not the transport's. Once a
        record went through, the leader is noted for good. (A record sent twice is read
        twice: every reader of these streams takes that.)
        """
        if stream in self._appended:
            await self._publish_raw("", stream, body, properties)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            connection: AbstractConnection | None = None
            try:
                async with self._translate(f"connect to publish to {stream}"):
                    async with asyncio.timeout(self.timeout):
                        connection = await aio_pika.connect(
                            self._driver_url,
                            client_properties={
                                "connection_name": f"{self.client_name or client_name()} (once)"
                            },
                        )
                    channel = await connection.channel(publisher_confirms=True)
                    underlay = await channel.get_underlay_channel()
                await self._publish_raw("", stream, body, properties, channel=underlay)
                break
            except TransportError as exc:
                crashed = isinstance(exc.__cause__, aiormq.exceptions.ConnectionInternalError)
                if not crashed or loop.time() >= deadline:
                    raise
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
            await asyncio.sleep(0.05)
        self._appended.add(stream)

    # -- receiving --------------------------------------------------------------------

    def tune(self, *, concurrency: int) -> None:
        """Called by a worker before it consumes: without an explicit ``prefetch``,
        each consumer may hold as many unacked deliveries as the worker runs at once
        (a consumer's prefetch cannot change once it consumes)."""
        if self.prefetch is None:
            self.prefetch = concurrency

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        self._check_open()
        state = await self._consumer(address, group, consumer, limit)
        state.receiving += 1
        try:
            await self._consume(state)
            out: list[_RabbitDelivery] = []
            try:
                await self._hand_out(state, address, group, out, limit, wait)
            except BaseException:
                # Cancelled (a worker stopping, a timeout around the receive) or failed
                # amid a hand-out: what it took goes back, as it was, to the head of the
                # buffer for the next receive. Lost here, it would stay unacked on a live
                # channel until the consumer's retirement: for a partition queue (prefetch
                # 1), its key stuck that long.
                self._put_back(state, out)
                raise
            # A channel that closed while the hand-out went on (awaiting a later message's
            # copy or dead letter) gave its deliveries back to the broker: handed out,
            # their handlers would run on what comes again, counted as a further attempt.
            gone = [delivery for delivery in out if delivery._message.channel.is_closed]
            if gone:
                self._put_back(state, gone)  # (noted as never handed out)
                out = [delivery for delivery in out if delivery not in gone]
            return out
        finally:
            state.receiving -= 1
            state.last_seen = time.monotonic()

    async def _hand_out(
        self,
        state: _Consumer,
        address: str,
        group: str,
        out: list[_RabbitDelivery],
        limit: int,
        wait: float,
    ) -> None:
        """Hand out the consumer's buffer into ``out`` (up to ``limit``), waiting ``wait``
        seconds at most for a first delivery."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while len(out) < limit:
            if not state.inbox:
                if out or loop.time() >= deadline:
                    break
                state.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await state.arrived.wait()
                await self._consume(state)  # (woken by keyed sends that started)
                continue
            message, lane = state.inbox.popleft()
            if message.channel.is_closed:
                self._unhand(state, message, lane)  # the broker has requeued it
                continue
            try:
                delivery = await self._delivery(state, address, group, message, lane)
            except TransportError as exc:
                # What handing it out needed (a copy, a dead letter) did not reach the
                # broker: it stays here, unacked, for a later receive to try again —
                # dropped, it would hold its partition (or a prefetch slot) for good. At
                # the back: one whose copy keeps failing does not hold up the others.
                state.inbox.append((message, lane))
                if not out:
                    raise
                logger.warning("iambus: %s; tried again at the next receive", exc)
                break
            except asyncio.CancelledError:
                raise  # (_dispose saw to the message: settled, or back in the buffer)
            except BaseException:
                state.inbox.append((message, lane))  # (another error: kept all the same)
                raise
            if delivery is not None:
                out.append(delivery)

    def _put_back(self, state: _Consumer, out: list[_RabbitDelivery]) -> None:
        """``out`` was not handed out after all: back to the head of the buffer, in order,
        as if never taken. The next receive judges each again (``_delivery``), which is
        safe as what judging a message handed out did is undone here or harmless: a
        delivery that used up the record of its unhanded return (``_unhanded``: a lane's
        or classic queue's redelivery not counted) gets it back — else it would be counted
        as a further attempt, copied with attempt + 1; a quorum queue's count is read, not
        used up (the record goes at the ack); a hand-back copy's note that its original is
        superseded (``_superseded``) is written again, the same. Nothing was published nor
        acked for a message handed out: a message that needed that (a copy with attempt
        + 1, a dead letter, an ack of a superseded original) is never in ``out``.

        One whose channel closed meanwhile (the consumer retired by a worker's stop while
        the receive waited for a settling step) is back in its queue: noted as unhanded,
        not to be counted where it comes again — the buffer of a retired consumer is
        never read again."""
        for delivery in reversed(out):
            message, lane = delivery._message, delivery._lane
            if delivery._took:
                key = _returned(lane or state.queue, message)
                _remember(self._unhanded, key, self._unhanded.get(key, 0) + delivery._took)
            if message.channel.is_closed:
                self._unhand(state, message, lane)
                continue
            state.inbox.appendleft((message, lane))
        if out:
            state.arrived.set()

    async def _consumer(self, address: str, group: str, consumer: str, limit: int) -> _Consumer:
        key = (address, group, consumer)
        state = self._consumers.get(key)
        if state is not None:
            return state
        async with self._consumer_lock:
            state = self._consumers.get(key)
            if state is not None:
                return state
            channel = await self._new_channel()
            try:
                lanes = await self._new_channel()
            except BaseException:
                await _shut(channel, within=self.timeout)
                raise
            try:
                async with self._translate("set a consumer's prefetch"):
                    await channel.set_qos(prefetch_count=self.prefetch or max(limit, 1))
                    # Per consumer (global=False): one unacked delivery per partition queue.
                    await lanes.set_qos(prefetch_count=1)
            except BaseException:
                for made in (channel, lanes):
                    await _shut(made, within=self.timeout)
                raise
            state = _Consumer(key, self._queue(address, group), channel, lanes)
            self._consumers[key] = state
            return state

    async def _consume(self, state: _Consumer) -> None:
        """Start consuming on the consumer's channels, again when one was reopened; the
        partition queues once keyed envelopes are sent to the address."""
        await self._directory()
        async with state.consume_lock:
            await self._consume_now(state)

    async def _consume_now(self, state: _Consumer) -> None:
        address, group, _ = state.key
        keyed = address in self._keyed_sends or (address, group) in self._lanes
        if _live(state.consuming_on) and (_live(state.lanes_on) or not keyed):
            return
        # Keyed sends began while it consumed: so did they for the group's other consumers.
        began = state.consuming_on is not None and state.lanes_on is None
        self._drop_closed(state)  # from a channel that is gone: requeued by the broker
        ch = await self._ready(state.channel)
        if state.consuming_on is not ch:
            await self._subscribe(state, ch, state.queue, None)
        if not keyed:
            return
        sent_with = self._keyed_sends.get(address, self.partitions)
        if sent_with != self.partitions and address not in self._mismatched:
            # One stray sender (a script with other settings) must not stop every worker
            # of the address: this one consumes its own partitions, and says why some
            # keyed messages may wait in queues nobody here consumes.
            self._mismatched.add(address)
            logger.error(
                "iambus: %s: keyed messages to %r were last sent by a process with %d "
                "partitions, here %d: those of partitions not consumed here wait; give "
                "every process of namespace %r the same partitions",
                self.url,
                address,
                sent_with,
                self.partitions,
                self.namespace,
            )
        await self._declare_lanes(address, group)  # (a sender made them, or is making them)
        lanes = await self._ready(state.lanes)
        if state.lanes_on is not lanes:
            # Single active consumer: the first consumer of a partition queue has it until
            # its channel closes; then the waiting one with the highest x-priority takes
            # over. Random priorities (and order) spread the partitions over the others.
            # Woken together, the consumers of a group take them turn by turn, over
            # SPREAD seconds: in a random order each, so that each gets some.
            pause = SPREAD / self.partitions if began else 0.0
            for n in random.sample(range(self.partitions), self.partitions):
                name = self._lane(address, group, n)
                if state.lanes_consumed.get(name) is lanes:
                    continue
                await self._subscribe(state, lanes, name, name)
                if pause:
                    await asyncio.sleep(pause)
            state.lanes_on = lanes

    async def _subscribe(
        self, state: _Consumer, ch: aiormq.abc.AbstractChannel, queue: str, lane: str | None
    ) -> None:
        """Consume ``queue`` on ``ch``, and note it in ``state`` (even when the caller is
        cancelled meanwhile: the consume is carried through, see ``_unbroken``)."""
        arguments: dict[str, Any] | None = None
        if lane is not None:
            arguments = {"x-priority": random.randrange(1 << 16)}

        async def consume() -> None:
            await ch.basic_consume(queue, _putter(state, lane), arguments=arguments)
            if lane is None:
                state.consuming_on = ch
            else:
                state.lanes_consumed[queue] = ch

        issued = state.subscribing.get(queue)
        if issued is None or issued[0] is not ch or issued[1].done():
            task = asyncio.ensure_future(consume())
            issued = (ch, task)
            state.subscribing[queue] = issued
            task.add_done_callback(_retrieved)

            def done(_: asyncio.Future[None], issued: Any = issued) -> None:
                if state.subscribing.get(queue) is issued:
                    del state.subscribing[queue]

            task.add_done_callback(done)
        try:
            async with self._translate(f"consume {queue}"):
                try:
                    await _unbroken(issued[1], timeout=self.timeout, bounded=True)
                except TimeoutError:
                    # RabbitMQ stops reading a connection that publishes while a memory
                    # or disk alarm lasts, and checks no heartbeat on it meanwhile: the
                    # receive (and each of the consumer's next ones, behind consume_lock)
                    # waited for the answer that long, whatever its `wait`. It fails now,
                    # as any call waiting for the connection does; the next one waits
                    # for this consume again (state.subscribing), not issuing a second.
                    raise TransportError(
                        f"{self.url}: the broker did not answer the consume of {queue!r} "
                        f"within {self.timeout} s (a connection it blocks for a memory or "
                        f"disk alarm?); the next receive waits for it again"
                    ) from None
        except TransportError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                address, group, _ = state.key
                if lane is None:
                    raise ImproperlyConfigured(
                        f"{self.url}: no group {group!r} on {address!r}; declare() it before "
                        f"receiving"
                    ) from exc
                raise ImproperlyConfigured(
                    f"{self.url}: no partition queue {queue!r} for group {group!r} on "
                    f"{address!r}; declare() the group with this version, and give every "
                    f"process of namespace {self.namespace!r} the same partitions "
                    f"(here {self.partitions})"
                ) from exc
            raise

    def _drop_closed(self, state: _Consumer) -> None:
        if any(message.channel.is_closed for message, _ in state.inbox):
            kept: deque[tuple[DeliveredMessage, str | None]] = deque()
            for message, lane in state.inbox:
                if message.channel.is_closed:
                    self._unhand(state, message, lane)
                else:
                    kept.append((message, lane))
            state.inbox = kept

    def _unhand(self, state: _Consumer, message: DeliveredMessage, lane: str | None) -> None:
        """``message`` was never handed out and its channel is gone: the broker returns it
        counted as a delivery. Remember it, not to count that if it comes back here."""
        if lane is not None and _redelivered(message):
            return  # an earlier return of it is still to be counted, where it arrives
        key = _returned(lane or state.queue, message)
        _remember(self._unhanded, key, self._unhanded.get(key, 0) + 1)

    async def _delivery(
        self,
        state: _Consumer,
        address: str,
        group: str,
        message: DeliveredMessage,
        lane: str | None,
    ) -> _RabbitDelivery | None:
        """A delivery, or None: a message that is no envelope is parked at once; one from a
        partition queue may be replaced by a copy counting its attempt (``_lane_attempt``).

        Its only awaits are such steps, each through ``_dispose``: cancelled, it has seen
        to ``message`` (settled, or back in the buffer). Any other error leaves
        ``message`` as it was, for ``receive`` to keep.
        """
        properties = message.header.properties
        headers: Mapping[str, Any] = properties.headers or {}
        attempt = _own_attempt(headers)
        returned = None
        took = 0  # the record of an unhanded return the hand-out used up (see _put_back)
        if lane is not None:
            counted = await self._lane_attempt(state, message, lane, attempt)
            if counted is None:
                return None
            attempt, took = counted
        elif "x-delivery-count" in headers:  # the quorum queue had it out before
            returned = _returned(state.queue, message)
            attempt += int(headers["x-delivery-count"]) - self._unhanded.get(returned, 0)
        elif _redelivered(message):
            if self._superseded.pop((state.queue, properties.message_id, attempt), 0):
                # its copy (attempt + 1) went out as its channel closed: see _pass_on
                await self._dispose(state, message, lane, self._ack_message(message))
                return None
            took = self._unhanded.pop(_returned(state.queue, message), 0)
            if not took:
                # A classic queue says "again", not how often: counted by a copy with
                # attempt + 1 (at the back: the group's queue keeps no order), so that a
                # message that kills its workers ends up dead-lettered instead of looping.
                await self._dispose(
                    state, message, lane, self._pass_on(message, state.queue, attempt + 1)
                )
                return None
        try:
            envelope = _envelope(properties, message.body)
        except SerializationError as exc:
            logger.error("iambus: a message on %s is no envelope; dead-lettered: %s", address, exc)
            raw = Envelope(
                name=str(properties.message_type or "?"),
                payload=message.body,
                content_type="application/x-iambus-raw-message",
            )
            failure = Failure("iambus.errors.SerializationError", str(exc), "", attempt)
            parked = _RabbitDelivery(
                self, state, address, group, message, raw, attempt, lane, returned
            )
            await self._dispose(state, message, lane, self._park(parked, failure))
            return None
        return _RabbitDelivery(
            self, state, address, group, message, envelope, attempt, lane, returned, took
        )

    async def _lane_attempt(
        self, state: _Consumer, message: DeliveredMessage, lane: str, attempt: int
    ) -> tuple[int, int] | None:
        """The attempt of a message from a partition queue and the count of the record of
        its unhanded return that it used up, or None if it is not handed out.

        A classic queue says *redelivered*, not how often: a redelivered message is
        replaced by a copy carrying its attempt + 1, at the head of the queue (priority
        ``FIRST``), which is handed out instead. Not counted: one this process gave back
        unhandled, and one whose hand-back copy came first, or whose copy went out as
        its channel closed (dropped: a duplicate).
        """
        handback = H_HANDBACK in (message.header.properties.headers or {})
        original = (lane, message.header.properties.message_id, attempt)
        if handback:
            _remember(self._superseded, original, 1)
        if not _redelivered(message):
            return attempt, 0
        if not handback and self._superseded.pop(original, 0):
            await self._dispose(state, message, lane, self._ack_message(message))
            return None
        took = self._unhanded.pop(_returned(lane, message), 0)
        if took:
            return attempt, took
        await self._dispose(state, message, lane, self._pass_on(message, lane, attempt + 1))
        return None

    async def _dispose(
        self,
        state: _Consumer,
        message: DeliveredMessage,
        lane: str | None,
        step: Coroutine[Any, Any, None],
    ) -> None:
        """Run ``step``, which settles ``message`` instead of handing it out (a copy or a
        dead letter, confirmed, then its ack; or its ack alone), to its end even if the
        receive is cancelled meanwhile.

        Cut halfway, a copy could be out with ``message`` unacked: kept, it would hold its
        partition (the copy behind it) or a prefetch slot; given to the next receive, it
        would be copied again. So a cancelled receive waits for the step (``timeout`` at
        most; past that it goes on by itself), then is cancelled; a step that fails then
        puts ``message`` back in the buffer, as a failed step does in ``receive``.
        """
        task = asyncio.ensure_future(step)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                if not task.done():
                    await asyncio.wait([task], timeout=self.timeout)
            finally:  # (cancelled again as it waits: the step goes on all the same)
                task.add_done_callback(lambda done: self._disposed(state, message, lane, done))
            raise

    def _disposed(
        self,
        state: _Consumer,
        message: DeliveredMessage,
        lane: str | None,
        step: asyncio.Future[None],
    ) -> None:
        """A step of ``_dispose`` whose receive was cancelled ended: if it failed, the
        message goes back to the buffer (or, its channel gone, is noted as unhanded)."""
        error = None if step.cancelled() else step.exception()
        if not step.cancelled() and error is None:
            return
        if message.channel.is_closed:
            self._unhand(state, message, lane)
            return
        if error is not None:
            logger.warning("iambus: %s; tried again at the next receive", error)
        state.inbox.append((message, lane))
        state.arrived.set()

    async def _pass_on(
        self, message: DeliveredMessage, lane: str, attempt: int, *, handback: bool = False
    ) -> None:
        """A copy of ``message`` with ``attempt`` at the head of its partition queue
        (confirmed), then ``message`` acked: a crash in between duplicates, never reorders.
        (To a group's classic queue, ``lane`` being its name: at its back.)

        A hand-back copy leaves ``message`` unacked: its channel is closing, and acking
        would only bring the copy to it. The original comes back behind the copy, and is
        dropped where the copy was delivered (``_lane_attempt``).
        """
        properties = copy.copy(message.header.properties)
        headers = dict(properties.headers or {})
        headers[H_ATTEMPT] = attempt
        headers.pop("x-delivery-count", None)
        if handback:
            headers[H_HANDBACK] = 1
        else:
            headers.pop(H_HANDBACK, None)
        properties.headers = headers
        properties.priority = FIRST
        await self._publish_raw("", lane, message.body, properties)
        if handback:
            return
        if message.channel.is_closed:
            # Closed as the copy went out (its consumer retired amid the receive that
            # waited for this copy, a lost connection): the broker has ``message`` back,
            # unacked. Where it comes back here, it is dropped as its copy's duplicate
            # (``_superseded``). Not one without an id: another such would be dropped.
            if properties.message_id is not None:
                own = _own_attempt(message.header.properties.headers or {})
                original = (lane, properties.message_id, own)
                _remember(self._superseded, original, 1)
            return
        await self._ack_message(message)

    async def _ack_message(self, message: DeliveredMessage) -> None:
        if message.channel.is_closed:
            return  # the broker has it back
        async with self._translate("ack"):
            await message.channel.basic_ack(_tag(message))

    # -- settling (called by deliveries) ----------------------------------------------

    async def _ack(self, delivery: _RabbitDelivery) -> None:
        delivery._consumer.last_seen = time.monotonic()
        message = delivery._message
        if message.channel.is_closed:
            raise TransportError(
                f"{self.url}: cannot ack {delivery!r}: its channel closed (a lost connection, "
                f"or the consumer idled past claim_after); the broker delivers it again"
            )
        async with self._translate("ack"):
            await message.channel.basic_ack(_tag(message))
        if delivery._returned is not None:
            self._unhanded.pop(delivery._returned, None)

    def _check_settleable(self, delivery: _RabbitDelivery, action: str) -> None:
        # A delivery whose channel closed is already back in its queue: publishing a
        # retry copy or a dead letter for it too would leave two live copies.
        if delivery._message.channel.is_closed:
            raise TransportError(
                f"{self.url}: cannot {action} {delivery!r}: its channel closed (a lost "
                f"connection, or the consumer idled past claim_after); the broker delivers "
                f"it again"
            )

    async def _give_back(self, delivery: _RabbitDelivery) -> None:
        """A settle failed while the delivery's channel is open: requeue it, so that it is
        delivered again (a further attempt) instead of staying unacked with a consumer
        that goes on living — for a keyed one, holding its partition for good."""
        message = delivery._message
        if message.channel.is_closed:
            return  # the broker has it back
        try:
            async with self._translate("give back"):
                await message.channel.basic_nack(_tag(message), requeue=True)
        except TransportError as exc:
            logger.warning("iambus: giving %r back failed: %s", delivery, exc)

    async def _retry(self, delivery: _RabbitDelivery, delay: float) -> None:
        self._check_settleable(delivery, "retry")
        delivery._consumer.last_seen = time.monotonic()
        try:
            await self._retry_unsafe(delivery, delay)
        except Exception:
            # Any failure, not only the broker's: a delivery left unacked on a channel
            # that lives on would never come back (nor, if keyed, its partition).
            await self._give_back(delivery)
            raise

    async def _retry_unsafe(self, delivery: _RabbitDelivery, delay: float) -> None:
        if delivery._lane is not None:
            await self._retry_keyed(delivery, delivery._lane, delay)
            return
        extra: dict[str, Any] = {H_ATTEMPT: delivery.attempt + 1}
        target = self._queue(delivery._address, delivery._group)
        if delay <= 0:
            await self._publish(self._direct, target, delivery.envelope, extra)
        else:
            # Rounded up to two significant digits: never early, and a bounded number of
            # delay queues (each one has a fixed TTL, so its head always expires first).
            ms = _bucket(delay)
            await self._declare_delay(ms)
            extra[H_DELAY] = str(ms)
            await self._publish(self._delay_exchange, target, delivery.envelope, extra)
        await self._ack(delivery)

    async def _retry_keyed(self, delivery: _RabbitDelivery, lane: str, delay: float) -> None:
        # The partition stays blocked: the delivery stays unacked through the delay (a
        # delay queue would put it behind its successors), then its copy goes first.
        if delay <= 0:
            await self._pass_on(delivery._message, lane, delivery.attempt + 1)
            return
        state = delivery._consumer
        task = asyncio.get_running_loop().create_task(self._retry_later(delivery, lane, delay))
        state.retrying.add(task)
        task.add_done_callback(state.retrying.discard)

    async def _retry_later(self, delivery: _RabbitDelivery, lane: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            # A closed channel gave it back already, counted: that is this retry. A
            # consumer that left closes its channel once its retries are due: that gives
            # it back, counted, at the head of its queue (a copy could go to that
            # consumer again, as the partition is still its own until then).
            if not delivery._message.channel.is_closed and not delivery._consumer.left:
                await self._pass_on(delivery._message, lane, delivery.attempt + 1)
        except Exception:
            logger.exception("iambus: retrying %r failed; it is redelivered now", delivery)
            await self._give_back(delivery)
        finally:
            delivery._consumer.last_seen = time.monotonic()

    async def _declare_delay(self, ms: int) -> None:
        now = time.monotonic()
        if now - self._delays.get(ms, -math.inf) < 30:
            return
        # x-expires removes a delay queue unused for a minute past its TTL; it is declared
        # again at least every 30 s while used, so it never expires under a waiting message.
        ch = await self._ready(self._admin)
        name = f"{self.namespace}.delay.{ms}"
        async with self._translate(f"declare {name}"):
            await ch.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": self._direct,
                    "x-expires": ms + 60_000,
                },
            )
            await ch.queue_bind(
                name,
                self._delay_exchange,
                arguments={"x-match": "all", H_DELAY: str(ms)},
            )
        self._delays[ms] = now

    async def _park(self, delivery: _RabbitDelivery, failure: Failure) -> None:
        self._check_settleable(delivery, "dead-letter")
        delivery._consumer.last_seen = time.monotonic()
        extra: dict[str, Any] = {
            H_DEAD: new_id(),
            H_ADDRESS: delivery._address,
            H_GROUP: delivery._group,
            "x-iambus-failed-at": repr(time.time()),
        }
        for header, name in H_FAILURE:
            value = getattr(failure, name)
            if value is not None:
                extra[header] = value[:MAX_HEADER_TEXT] if isinstance(value, str) else value
        if delivery._lane is not None:
            came_from = self._lane_number(delivery._address, delivery._group, delivery._lane)
            if came_from is not None:
                extra[H_PARTITION] = came_from
        # (Not _append: the stream is declared when the transport opens, long before.)
        await self._publish("", self._dead, delivery.envelope, extra)
        await self._ack(delivery)

    def _lane_number(self, address: str, group: str, lane: str) -> int | None:
        """Which partition queue of the group ``lane`` is (one this process consumes)."""
        for n in range(self.partitions):
            if self._lane(address, group, n) == lane:
                return n
        return None

    async def _dead_letter(self, delivery: _RabbitDelivery, failure: Failure) -> None:
        try:
            await self._park(delivery, failure)
        except Exception:  # as in _retry
            await self._give_back(delivery)
            raise

    # -- reclaiming from consumers that stopped ---------------------------------------

    async def _sweep(self) -> None:
        interval = min(max(self.claim_after / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for state in list(self._consumers.values()):
                if (
                    not state.receiving
                    and not state.retrying
                    and now - state.last_seen > self.claim_after
                ):
                    try:
                        await self._retire(state)
                    except Exception as exc:  # the sweeper must outlive any one of them
                        logger.warning("iambus: retiring consumer %s: %r", state.key, exc)

    async def _retire(self, state: _Consumer) -> None:
        """Close a consumer's channels: RabbitMQ redelivers what it held to the others.

        What it was sent but never handed out goes back first with the same attempt
        (closing the channel would count it as a failed attempt): from the group's queue
        as a copy, acked; from a partition queue as a hand-back copy at the head of it
        (see ``_pass_on``) — unless it is a copy at priority 1 already: a classic queue
        returns a message to its place, which would put it before its hand-back copy, so
        it simply returns (counted, except where this process gets it again).

        Partition consumers are closed with their channel, never cancelled: after a
        cancel, RabbitMQ 3.10 keeps a single-active-consumer classic queue on the
        cancelled consumer while its channel lives (and that queue process crashes on the
        next message).
        """
        if self._consumers.get(state.key) is state:
            del self._consumers[state.key]
        try:
            await self._retire_lanes(state)
            await self._retire_group(state)
        finally:
            # Cut short (cancelled, a failed publish): what is still buffered goes back
            # with the channels, and is not counted where it comes again.
            self._unhand_buffer(state)
            try:
                await _shut(state.channel, within=self.timeout)
            finally:
                # (the group's consumer was not cancelled if the partitions' hand-back was
                # cut: it may deliver until the channel is closed)
                self._unhand_buffer(state)

    async def _retire_lanes(self, state: _Consumer) -> None:
        """Hand back what the consumer buffered from partition queues, close their channel."""
        buffered = deque((message, lane) for message, lane in state.inbox if lane is not None)
        state.inbox = deque((message, lane) for message, lane in state.inbox if lane is None)
        try:
            while buffered:
                message, lane = buffered[0]
                assert lane is not None
                if not _redelivered(message) and not (
                    # A copy (priority 1) returns to its place, first, and counted (its
                    # hand-back copy would come after it): here, not counted (below).
                    message.channel.is_closed or message.header.properties.priority
                ):
                    attempt = _own_attempt(message.header.properties.headers or {})
                    await self._pass_on(message, lane, attempt, handback=True)
                    buffered.popleft()  # (its return is dropped behind the copy)
                    continue
                buffered.popleft()
                self._unhand(state, message, lane)  # (a redelivered one is still counted)
        finally:
            # Cut short: the rest returns with the channel, not handed out.
            for message, lane in buffered:
                self._unhand(state, message, lane)
            # Partition consumers are not cancelled: what they delivered after the buffer
            # was taken (a message sent meanwhile) returns with the channel too. Not only
            # _retire looks again: leave() with a keyed retry waiting retires them alone.
            self._unhand_buffer(state, lanes=True)
            try:
                await _shut(state.lanes, within=self.timeout)
            finally:
                self._unhand_buffer(state, lanes=True)

    async def _retire_group(self, state: _Consumer) -> None:
        """Stop consuming the group's queue, give back what was buffered from it as copies
        with their attempt, close the channel."""
        address, group, _ = state.key
        buffered = deque(message for message, lane in state.inbox if lane is None)
        state.inbox = deque((message, lane) for message, lane in state.inbox if lane is not None)
        ch = state.consuming_on
        try:
            if ch is not None and not ch.is_closed:
                async with self._translate("cancel a consumer"):
                    for tag in list(ch.consumers):
                        await _unbroken(ch.basic_cancel(tag), timeout=self.timeout)
                # (and what was delivered before the broker took the cancel)
                buffered += (message for message, lane in state.inbox if lane is None)
                state.inbox = deque((m, lane) for m, lane in state.inbox if lane is not None)
            while buffered and not buffered[0].channel.is_closed:
                message = buffered[0]
                returned = _returned(state.queue, message)
                given_back = self._unhanded.get(returned, 0)
                properties = copy.copy(message.header.properties)  # (the key stays as it is)
                headers = dict(properties.headers or {})
                if "x-delivery-count" in headers or not _redelivered(message):
                    headers[H_ATTEMPT] = _attempt(headers) - given_back
                else:  # a classic queue's "again": one return, counted unless ours
                    headers[H_ATTEMPT] = _attempt(headers) + (0 if given_back else 1)
                headers.pop("x-delivery-count", None)
                properties.headers = headers
                await self._publish_raw(
                    self._direct, self._queue(address, group), message.body, properties
                )
                await self._ack_message(message)
                buffered.popleft()
                self._unhanded.pop(returned, None)
        finally:
            # What was not handed back as a copy (its channel gone, or the retirement cut
            # short: cancelled, a publish that failed) returns with the channel: counted
            # by the broker, not an attempt (a copy published but not acked: a duplicate).
            for message in buffered:
                self._unhand(state, message, None)
            self._unhand_buffer(state, lanes=False)  # (delivered during a cut cancel)
            try:
                await _shut(state.channel, within=self.timeout)
            finally:
                self._unhand_buffer(state, lanes=False)

    def _unhand_buffer(self, state: _Consumer, *, lanes: bool | None = None) -> None:
        """``state``'s channels are closing (``lanes``: only the partition channel; False:
        only the group's): what it buffered from them returns unhanded."""
        kept: deque[tuple[DeliveredMessage, str | None]] = deque()
        for message, lane in state.inbox:
            if lanes is None or (lane is not None) == lanes:
                self._unhand(state, message, lane)
            else:
                kept.append((message, lane))
        state.inbox = kept

    # -- request/reply --------------------------------------------------------------

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._check_open()
        ch = await self._reply_channel()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting[envelope.id] = future
        try:
            if envelope.key is not None:
                exchange, route = self._keyed, await self._lane_route(address, envelope.key)
            else:
                exchange, held = self.namespace, self._held.get(address)
                route = held if held is not None else await self._declare_held(address)
            # Published on the channel that consumes amq.rabbitmq.reply-to, as direct
            # reply-to requires; RabbitMQ rewrites reply_to to this channel's own name.
            await self._publish(exchange, route, _with_reply_to(envelope), None, channel=ch)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(envelope.id, None)

    async def _reply_channel(self) -> aiormq.abc.AbstractChannel:
        async with self._reply_lock:
            ch = await self._ready(self._replier)
            if self._reply_consuming_on is not ch:
                async with self._translate("consume replies"):
                    await ch.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
                self._reply_consuming_on = ch
            return ch

    async def _on_reply(self, message: DeliveredMessage) -> None:
        try:
            answer = _envelope(message.header.properties, message.body)
        except SerializationError as exc:
            logger.warning("iambus: a reply on %s is no envelope: %s", self.url, exc)
            return
        waiting = self._waiting.get(answer.correlation_id or "")
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    async def reply(self, to: str, envelope: Envelope) -> None:
        # The default exchange routes by queue name; a requester that is gone has no
        # queue, and RabbitMQ drops the answer.
        await self._publish("", to, envelope, None)

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        return list((await self._read_dead()).values())[:limit]

    async def replay(self, ids: Sequence[str]) -> int:
        came_from: dict[str, int] = {}
        live = await self._read_dead(came_from)
        replayed: list[str] = []
        for letter_id in ids:
            letter = live.pop(letter_id, None)
            if letter is None:
                continue
            await self.declare(letter.address, letter.group, from_start=False)
            # No attempt header: a replayed envelope starts counting again. A keyed one
            # goes behind what its partition queue holds (by name: the default exchange):
            # the queue it came from, whatever this process's count (the dlq CLI may not
            # know the workers').
            key = letter.envelope.key
            if key is None:
                exchange, route = self._direct, self._queue(letter.address, letter.group)
            else:
                n = came_from.get(letter_id, partition(key, self.partitions))
                exchange, route = "", self._lane(letter.address, letter.group, n)
                # (Declared again: n may be beyond this process's partitions.)
                admin = await self._ready(self._admin)
                await self._declare_lane(admin, letter.address, letter.group, n)
            await self._publish(exchange, route, letter.envelope, None)
            await self._settle_dead([letter_id])
            replayed.append(letter_id)
        return len(replayed)

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        live = await self._read_dead()
        gone = list(live) if ids is None else [i for i in dict.fromkeys(ids) if i in live]
        if gone:
            await self._settle_dead(gone)
        return len(gone)

    async def _settle_dead(self, ids: list[str]) -> None:
        properties = spec.Basic.Properties(
            delivery_mode=PERSISTENT, headers={H_SETTLED: 1}, content_type="application/json"
        )
        await self._append(self._dead, json.dumps(ids).encode(), properties)

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        # Only the headers of each record are looked at: no envelope is decoded nor kept.
        counts: Counter[tuple[str, str]] = Counter()
        for message in (await self._unsettled_dead("count dead letters")).values():
            headers = message.header.properties.headers or {}
            with contextlib.suppress(KeyError, TypeError):
                address, group = headers[H_ADDRESS], headers[H_GROUP]
                counts[_text(address), _text(group)] += 1
        return dict(counts)

    async def _read_dead(self, came_from: dict[str, int] | None = None) -> dict[str, DeadLetter]:
        """The dead letters not replayed nor purged; ``came_from`` gets the partition of
        each keyed letter that records it."""
        live: dict[str, DeadLetter] = {}
        for message in (await self._unsettled_dead("read dead letters")).values():
            letter = _dead_letter(message)
            if letter is not None:
                live[letter.id] = letter
                n = _came_from(message.header.properties.headers or {})
                if came_from is not None and n is not None:
                    came_from[letter.id] = n
        return live

    async def _unsettled_dead(self, what: str) -> dict[str, DeliveredMessage]:
        """The records of the dead-letter stream not replayed nor purged since, by id."""
        live: dict[str, DeliveredMessage] = {}
        for message in await self._read_stream(self._dead, what):
            headers = message.header.properties.headers or {}
            if H_SETTLED in headers:
                for letter_id in json.loads(message.body):
                    live.pop(letter_id, None)
            elif H_DEAD in headers:
                try:
                    live[_text(headers[H_DEAD])] = message
                except (TypeError, ValueError) as exc:
                    logger.error(
                        "iambus: a record in the dead-letter stream is unreadable: %s", exc
                    )
        return live

    async def _read_stream(self, queue: str, what: str) -> list[DeliveredMessage]:
        """The records of the stream queue ``queue`` from its start up to a mark written
        just now."""
        self._check_open()
        mark = uuid.uuid4().hex
        await self._append(
            queue,
            b"",
            spec.Basic.Properties(delivery_mode=PERSISTENT, headers={H_MARK: mark}),
        )
        records: list[DeliveredMessage] = []
        inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

        async def put(message: DeliveredMessage) -> None:
            inbox.put_nowait(message)

        channel = await self._new_channel()
        async with self._translate(what):
            try:
                await channel.set_qos(prefetch_count=500)
                ch = await channel.get_underlay_channel()
                await _unbroken(
                    ch.basic_consume(
                        queue, put, no_ack=False, arguments={"x-stream-offset": "first"}
                    ),
                    timeout=self.timeout,
                )
                while True:
                    async with asyncio.timeout(self.timeout):
                        message = await inbox.get()
                    await ch.basic_ack(_tag(message))
                    headers = message.header.properties.headers or {}
                    if headers.get(H_MARK) == mark:
                        break
                    if H_MARK not in headers:
                        records.append(message)
            finally:
                await _shut(channel, within=self.timeout)
        return records

    # -- registry and backlog ---------------------------------------------------------

    @property
    def _registry(self) -> str:
        return f"{self.namespace}.registry"

    def _alive(self, instance_id: str) -> str:
        return _fit(f"{self.namespace}.alive.{_escape(instance_id)}")

    async def announce(self, instance: Instance) -> None:
        # One at a time: two first announces at once (two dispatchers sharing this
        # transport) would each open a registry connection, one of them never closed.
        async with self._announcing:
            await self._announce(instance)

    async def _announce(self, instance: Instance) -> None:
        self._check_open()
        presence = self._presence
        lost = presence is None or presence.is_closed or not presence.connected.is_set()
        written = self._presences.get(instance.id)
        if written is not None and not lost:
            # Its queue lives as long as that connection; its record, a week.
            if time.monotonic() - written > REGISTRY_REFRESH:
                await self._append(self._registry, instance.to_json(), _ANNOUNCED)
                self._presences[instance.id] = time.monotonic()
            return
        await self._declare_registry()
        if presence is None or lost:
            # Lost (or never made): the queues it held are gone, or will be once the
            # broker notices; each instance is declared again by its next announce.
            self._presence = None
            self._presences.clear()
            if presence is not None:
                with contextlib.suppress(Exception):
                    await presence.close()
            presence = self._presence = await self._presence_connection()
        name = self._alive(instance.id)
        try:
            async with self._translate("announce"), asyncio.timeout(self.timeout):
                channel = await presence.channel()
                try:
                    await channel.declare_queue(name, exclusive=True)
                finally:
                    await _shut(channel, within=self.timeout)
        except TransportError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelLockedResource):
                raise TransportError(
                    f"{self.url}: cannot announce {instance.id} again yet: the broker still "
                    f"holds its queue {name!r} on the connection that was lost (until its "
                    f"heartbeat times out); it is still listed as live meanwhile"
                ) from exc.__cause__
            raise
        await self._append(self._registry, instance.to_json(), _ANNOUNCED)
        self._presences[instance.id] = time.monotonic()

    async def _presence_connection(self) -> AbstractConnection:
        name = f"{self.client_name or client_name()} (registry)"
        async with self._translate("connect the registry"), asyncio.timeout(self.timeout):
            return await aio_pika.connect(
                self._driver_url, client_properties={"connection_name": name}
            )

    async def _declare_registry(self) -> None:
        if self._registry in self._declared:
            return
        try:
            admin = await self._ready(self._admin)
            async with self._translate(f"declare {self._registry}"):
                await admin.queue_declare(
                    self._registry, durable=True, arguments=REGISTRY_ARGUMENTS
                )
        except TransportError as exc:
            if not isinstance(exc.__cause__, aiormq.exceptions.ChannelPreconditionFailed):
                raise
            # Made by an older iambus with other segments: used as it is.
            admin = await self._ready(self._admin)
            async with self._translate(f"declare {self._registry}"):
                await admin.queue_declare(self._registry, passive=True)
        self._declared.add(self._registry)

    async def _read_registry(self) -> list[DeliveredMessage]:
        await self._declare_registry()
        try:
            return await self._read_stream(self._registry, "read the registry")
        except TransportError:
            self._declared.discard(self._registry)  # deleted meanwhile? declared again
            raise

    async def withdraw(self, instance: Instance) -> None:
        async with self._announcing:
            await self._withdraw(instance)

    async def _withdraw(self, instance: Instance) -> None:
        if self._presences.pop(instance.id, None) is None:
            return
        self._check_open()
        properties = spec.Basic.Properties(delivery_mode=PERSISTENT, headers={H_WITHDRAWN: 1})
        await self._append(self._registry, instance.id.encode(), properties)
        presence = self._presence
        if presence is None:
            return
        if not self._presences:  # its last queue: closing the connection deletes it
            self._presence = None
            with contextlib.suppress(Exception):
                await presence.close()
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                channel = await presence.channel()
                try:
                    await channel.queue_delete(self._alive(instance.id))
                finally:
                    await _shut(channel, within=self.timeout)

    async def _announced(self) -> dict[str, tuple[Instance, int]]:
        """Every instance the registry stream holds that did not withdraw, by id, with
        the stream offset of its latest announcement."""
        announced: dict[str, tuple[Instance, int]] = {}
        for message in await self._read_registry():
            headers = message.header.properties.headers or {}
            if H_WITHDRAWN in headers:
                announced.pop(message.body.decode(errors="replace"), None)
            elif H_ANNOUNCED in headers:
                try:
                    instance = Instance.from_json(message.body)
                except ValueError as exc:
                    logger.warning("iambus: %s: skipping a registry entry: %s", self.url, exc)
                    continue
                announced[instance.id] = (instance, _offset(headers))
        return announced

    async def instances(self) -> list[Instance]:
        # Live while its exclusive queue exists: another connection holds it (locked),
        # or this one does (declared). One found gone is not probed again, unless it
        # announced again since (after a lost registry connection).
        announced = [
            (instance, offset)
            for instance, offset in (await self._announced()).values()
            if self._gone.get(instance.id) != offset
        ]
        found = await self._probe([self._alive(instance.id) for instance, _ in announced])
        live: list[Instance] = []
        for (instance, offset), ok in zip(announced, found, strict=True):
            if ok is None:
                _remember(self._gone, instance.id, offset)
            else:
                live.append(instance)
        return live

    async def groups(self) -> dict[tuple[str, str], str]:
        known: dict[tuple[str, str], str] = {}
        # Withdrawn ones included: read the records of every announcement kept.
        for message in await self._read_registry():
            if H_ANNOUNCED in (message.header.properties.headers or {}):
                with contextlib.suppress(ValueError):
                    instance = Instance.from_json(message.body)
                    known.update(dict.fromkeys(instance.consumes, instance.service))
        return known

    async def backlog(self, address: str, group: str) -> Backlog:
        names = [self._queue(address, group)]
        names += [self._lane(address, group, n) for n in range(self.partitions)]
        found = await self._probe(names)
        waiting = sum(ok.message_count or 0 for ok in found if ok)
        # Unacked counts need the management plugin (HTTP); retries wait in the delay
        # queues, which every group shares.
        return Backlog(waiting=waiting, in_flight=None, retrying=None)

    async def _probe(self, names: Sequence[str]) -> list[Any]:
        """Declare each queue passively: its ``DeclareOk``, None if there is no such
        queue, or True if another connection holds it exclusively."""
        connection = self._connection
        if connection is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")
        found: list[Any] = []
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            for name in names:
                async with self._translate(f"declare {name} (passive)"):
                    if channel is None or channel.is_closed:
                        async with asyncio.timeout(self.timeout):
                            await connection.ready()
                        underlay = connection.transport
                        if underlay is None:
                            raise TransportError(f"{self.url}: not connected")
                        channel = await underlay.connection.channel()
                    try:
                        found.append(await channel.queue_declare(name, passive=True))
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        found.append(None)
                    except aiormq.exceptions.ChannelLockedResource:
                        found.append(True)
        finally:
            if channel is not None and not channel.is_closed:
                await _shut(channel, within=self.timeout)
        return found

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._connection is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")

    async def _new_channel(self) -> AbstractRobustChannel:
        """A new channel, once the connection is up (waiting at most ``timeout``)."""
        connection = self._connection
        if connection is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")
        async with self._translate("open a channel"):
            async with asyncio.timeout(self.timeout):
                await connection.ready()
            try:
                return await connection.channel(publisher_confirms=False)
            except RuntimeError as exc:  # aio-pika: "Connection was not opened" (reconnecting)
                raise TransportError(f"{self.url}: open a channel failed: {exc}") from exc

    async def _ready(self, channel: AbstractRobustChannel | None) -> aiormq.abc.AbstractChannel:
        """The live AMQP channel under ``channel``; waits at most ``timeout`` for a reconnect."""
        if channel is None or self._connection is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")
        async with self._translate("wait for the connection"):
            async with asyncio.timeout(self.timeout):
                while True:
                    await channel.ready()
                    underlay = await channel.get_underlay_channel()
                    if not underlay.is_closed:
                        return underlay
                    # Closed by the broker a moment ago (a channel error, such as a
                    # declare with other arguments): aio-pika reopens it from a callback
                    # that has not run yet.
                    await asyncio.sleep(0.005)

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (
            aiormq.exceptions.ProbableAuthenticationError,
            aiormq.exceptions.AuthenticationError,
            aiormq.exceptions.ChannelAccessRefused,
        ) as exc:
            raise TransportRefused(
                f"{self.url}: {what} refused: {exc!r} (check the user and password in the URL, "
                f"and the user's permissions on the virtual host)"
            ) from exc
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException) as exc:
            raise TransportError(f"{self.url}: {what} failed: {exc!r}") from exc
        except aiormq.exceptions.ChannelInvalidStateError as exc:  # closing under the call
            raise TransportError(f"{self.url}: {what} failed: {exc!r}") from exc
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"{self.url}: {what} failed: {exc!r}") from exc


class _RabbitDelivery:
    __slots__ = (
        "_address",
        "_consumer",
        "_group",
        "_lane",
        "_message",
        "_returned",
        "_took",
        "_transport",
        "attempt",
        "envelope",
    )

    def __init__(
        self,
        transport: RabbitMQTransport,
        consumer: _Consumer,
        address: str,
        group: str,
        message: DeliveredMessage,
        envelope: Envelope,
        attempt: int,
        lane: str | None,
        returned: tuple[str, str | None, int, bool] | None,
        took: int = 0,
    ) -> None:
        self._transport = transport
        self._consumer = consumer
        self._address = address
        self._group = group
        self._message = message
        self.envelope = envelope
        self.attempt = attempt
        self._lane = lane  # the partition queue it came from, or None
        self._returned = returned  # its key in the transport's _unhanded, if redelivered
        self._took = took  # what it used up of _unhanded (a lane's, classic queue's return)

    async def ack(self) -> None:
        await self._transport._ack(self)

    async def retry(self, delay: float) -> None:
        await self._transport._retry(self, delay)

    async def dead_letter(self, failure: Failure) -> None:
        await self._transport._dead_letter(self, failure)

    def __repr__(self) -> str:
        return f"<delivery {self.envelope.name} #{self.attempt} to {self._group}@{self._address}>"


def _putter(state: _Consumer, lane: str | None) -> Any:
    async def put(message: DeliveredMessage) -> None:
        state.inbox.append((message, lane))
        state.arrived.set()

    return put


_ANNOUNCED = spec.Basic.Properties(delivery_mode=PERSISTENT, headers={H_ANNOUNCED: 1})


def _offset(headers: Mapping[str, Any]) -> int:
    """The offset RabbitMQ gives a record of a stream queue (-1 if it says none)."""
    try:
        return int(headers["x-stream-offset"])
    except (KeyError, TypeError, ValueError):
        return -1


def _redelivered(message: DeliveredMessage) -> bool:
    return bool(getattr(message.delivery, "redelivered", False))


def _live(channel: aiormq.abc.AbstractChannel | None) -> bool:
    return channel is not None and not channel.is_closed


_T = TypeVar("_T")


async def _unbroken(call: Awaitable[_T], *, timeout: float, bounded: bool = False) -> _T:
    """``await call``; a caller cancelled meanwhile waits for the call to end (at most
    ``timeout``), then is cancelled. ``bounded``: a caller waits ``timeout`` at most in
    any case, then gets ``TimeoutError``; the call goes on by itself.

    For the consumes and consumer cancels of channels that receive: aiormq answers a call
    cancelled halfway by closing its channel without waiting for the broker, and the
    ``close()`` that follows (ours, in a ``finally``) stops reading the channel at once.
    What the broker delivered on it before it saw the close (a stream read from its
    start: every record) then fills the channel's buffer of 10 frames, and the
    connection's reader waits on that buffer for good: every call on the connection hangs
    until aiormq's heartbeat check gives it up (minutes), and the transport's close took
    3 s (the directory follower's channel close given up after 1 s, then aiormq's 2 s
    wait for a Close-Ok it can no longer read). A dispatcher's close cancels its registry
    reads: they came to that.
    """
    task = asyncio.ensure_future(call)
    try:
        async with asyncio.timeout(timeout if bounded else None):
            return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task], timeout=timeout)
        raise


async def _shut(channel: Any, *, within: float) -> None:
    """Close ``channel`` (its errors ignored), waiting ``within`` seconds at most, and
    never cut the close: a caller cancelled meanwhile still waits for it (within the same
    bound), then is cancelled; a close that outlasts the bound goes on by itself.

    aiormq answers a Channel.Close cancelled before the broker's Close-Ok by sending a
    second Channel.Close; the broker, done with the first, takes it for a frame on a
    closed channel and closes the whole connection (504 "CHANNEL_ERROR - expected
    'channel.open'"): a registry read cancelled as its channel closed (a timeout, a
    dispatcher's close) failed every consumer, publish and request of the transport.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    closing = asyncio.ensure_future(channel.close())
    closing.add_done_callback(_retrieved)
    try:
        await asyncio.wait([closing], timeout=within)
    except asyncio.CancelledError:
        await asyncio.wait([closing], timeout=max(deadline - loop.time(), 0.0))
        raise


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # (a close left to itself fails unheard, as it was suppressed)


_K = TypeVar("_K")


def _remember(memory: dict[_K, int], key: _K, value: int) -> None:
    memory[key] = value
    if len(memory) > _REMEMBERED:
        del memory[next(iter(memory))]  # the oldest


def _returned(queue: str, message: DeliveredMessage) -> tuple[str, str | None, int, bool]:
    """Which delivery ``message`` is, across its returns to ``queue``."""
    headers = message.header.properties.headers or {}
    attempt = _own_attempt(headers)
    return (queue, message.header.properties.message_id, attempt, H_HANDBACK in headers)


def _escape(text: str) -> str:
    """``text`` with every character an AMQP name may not hold (and ':', '@') as ':xx'."""
    return "".join(c if c in _PLAIN else "".join(f":{b:02x}" for b in c.encode()) for c in text)


def _shorten(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else its start and its SHA-256: the
    same on every process, and never the same for two texts."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    digest = hashlib.sha256(raw).hexdigest()
    return raw[: limit - len(digest) - 1].decode(errors="ignore") + ":" + digest


def _fit(name: str) -> str:
    # AMQP names are short strings (255 bytes): a longer one keeps its start and a digest.
    return _shorten(name, MAX_NAME)


def _too_long(routing_key: str, properties: spec.Basic.Properties) -> str | None:
    """Which field of a publish does not fit in an AMQP short string, or None."""
    for what, value in (
        ("routing key", routing_key),
        ("message name (the AMQP type)", properties.message_type),
        ("envelope id (the AMQP message_id)", properties.message_id),
        ("correlation id", properties.correlation_id),
        ("reply_to", properties.reply_to),
        ("content type", properties.content_type),
    ):
        if isinstance(value, str) and len(value.encode()) > MAX_NAME:
            return (
                f"its {what} {value[:40]!r}... is {len(value.encode())} bytes, and AMQP "
                f"allows at most {MAX_NAME}; shorten it"
            )
    return None


def _tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None, "a message from basic.deliver or basic.get has a delivery tag"
    return tag


def _own_attempt(headers: Mapping[str, Any]) -> int:
    """The attempt iambus wrote (1 when absent, or not a number: another producer's
    header must not stop a queue): what a partition queue counts by."""
    try:
        return max(int(headers.get(H_ATTEMPT, 1)), 1)
    except (TypeError, ValueError):
        return 1


def _came_from(headers: Mapping[str, Any]) -> int | None:
    """The partition a keyed dead letter was taken from, if it says."""
    try:
        return int(headers[H_PARTITION])
    except (KeyError, TypeError, ValueError):
        return None


def _attempt(headers: Mapping[str, Any]) -> int:
    # x-delivery-count: how often a quorum queue handed it out before and got it back.
    return _own_attempt(headers) + int(headers.get("x-delivery-count", 0))


def _bucket(delay: float) -> int:
    ms = max(math.ceil(delay * 1000), 1)
    step = 10 ** max(len(str(ms)) - 2, 0)
    return int(-(-ms // step) * step)


def _properties(envelope: Envelope, extra: Mapping[str, Any] | None) -> spec.Basic.Properties:
    headers: dict[str, Any] = {H_AT: repr(envelope.created_at)}
    if envelope.causation_id is not None:
        headers[H_CAUSE] = envelope.causation_id
    if envelope.key is not None:
        headers[H_KEY] = envelope.key
    if envelope.headers:
        headers[H_HEADERS] = json.dumps(dict(envelope.headers), separators=(",", ":"))
    if extra:
        headers.update(extra)
    return spec.Basic.Properties(
        content_type=envelope.content_type,
        delivery_mode=PERSISTENT,
        headers=headers,
        message_id=envelope.id,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        timestamp=datetime.datetime.fromtimestamp(int(envelope.created_at), datetime.UTC),
        message_type=envelope.name,
    )


def _envelope(properties: spec.Basic.Properties, body: bytes) -> Envelope:
    headers = properties.headers or {}
    try:
        if not properties.message_id or not properties.message_type:
            raise ValueError("no message_id or type property")
        user = headers.get(H_HEADERS)
        envelope = Envelope(
            id=properties.message_id,
            name=properties.message_type,
            payload=body,
            content_type=properties.content_type or "application/json",
            created_at=finite_time(_text(headers[H_AT]), H_AT),
            correlation_id=properties.correlation_id,
            causation_id=_optional(headers.get(H_CAUSE)),
            reply_to=properties.reply_to,
            key=_optional(headers.get(H_KEY)),
            headers=json.loads(_text(user)) if user else {},
        )
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        # (not a ValueError: a RecursionError would fail every receive)
        why = f"{H_HEADERS} nested too deep" if isinstance(exc, RecursionError) else exc
        raise SerializationError(
            f"malformed envelope (AMQP properties {properties!r:.300}): {why}"
        ) from exc
    if not isinstance(envelope.headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envelope.headers.items()
    ):
        raise SerializationError(
            f"malformed envelope headers {envelope.headers!r:.300}: "
            f"expected a JSON object of strings"
        )
    return envelope


def _with_reply_to(envelope: Envelope) -> Envelope:
    import dataclasses

    return dataclasses.replace(envelope, reply_to=REPLY_TO)


def _dead_letter(message: DeliveredMessage) -> DeadLetter | None:
    properties = message.header.properties
    headers = properties.headers or {}
    try:
        failure = {name: headers.get(header) for header, name in H_FAILURE}
        return DeadLetter(
            id=_text(headers[H_DEAD]),
            address=_text(headers[H_ADDRESS]),
            group=_text(headers[H_GROUP]),
            envelope=_envelope(properties, message.body),
            failure=Failure(
                error_type=_text(failure["error_type"]),
                message=_text(failure["message"]),
                traceback=_text(failure["traceback"]),
                attempts=int(failure["attempts"]),  # type: ignore[arg-type]
                handler=_optional(failure["handler"]),
            ),
            failed_at=float(_text(headers["x-iambus-failed-at"])),
        )
    except (KeyError, ValueError, TypeError, SerializationError) as exc:
        logger.error("iambus: a record in the dead-letter stream is unreadable: %s", exc)
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional(value: Any) -> str | None:
    return None if value is None else _text(value)
