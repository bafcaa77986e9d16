"""``NatsTransport``: NATS JetStream (``pip install 'iambus[nats]'``).

``nats://127.0.0.1:4222?namespace=shop&partitions=16`` — every stream and subject starts
with the namespace (default ``iambus``; letters, digits, ``_`` and ``-``). How the seam
maps onto JetStream:

* the namespace is one stream ``M_<ns>`` (file storage) holding the subjects ``<ns>.m.>``
  and ``<ns>.k.>``; an address is the subject ``<ns>.m.<address>``. ``send`` publishes
  there and returns once the stream acknowledged it (the PubAck, awaited on an inbox of
  the transport). The envelope travels in the message body: its fields but the payload
  as one line of JSON, a newline, then the payload (``_framed``; a body with the payload
  alone and the fields in an ``Iambus-Envelope`` header is read too). Its one header,
  ``Nats-Msg-Id``, is ``<address>:<envelope id>``, so a send repeated within the
  stream's duplicate window (2 minutes) is stored once;
* a group is a durable pull consumer on that subject, named after the address and group
  (sanitized, with a hash: ``<address>__<group>_<hash>``), with explicit acks, delivering
  everything (``from_start``) or only what comes after it was declared, and
  ``ack_wait = claim_after``: a delivery its consumer neither settles nor retries within
  ``claim_after`` seconds (a crash, a ``SIGKILL``, a handler slower than that) is
  delivered again, to whichever consumer of the group asks next;
* ``receive`` keeps a pull request of one waiting on each of the group's consumers (its
  *lanes*: the one above and one per partition); when the unkeyed lane has traffic, it
  adds a *batch* pull of what the caller has room for, which waits 50 ms at most. Every
  pull has a reply subject of its own (``<inbox>.<kind>.<n>``: one wildcard subscription
  for batch pulls, two for standing ones, renewed in turn), so a status ("408 Request
  Timeout", "409 Consumer Deleted") ends only its own request, and a message is counted
  against the pull that brought it. A standing pull lives 10 seconds and a receive renews
  it before it ends, so one is always waiting from one receive to the next: nats-server
  2.9 skips a redelivery that finds only expired pulls waiting, and counts it as an
  attempt (the message came back one ``claim_after`` later, as attempt 3). What the
  pulls bring is buffered per group, shared by every consumer name of the transport,
  and handed out in stream order; a receive that finds nothing waits at most ``wait``
  seconds for the next message. What no receive takes within ``claim_after / 2`` (a
  worker busy elsewhere, or gone) is handed back (a ``NAK`` without delay: counted as an
  attempt) rather than left until ``claim_after``; so is whatever comes after a receive
  was cancelled (a worker stopping), until the next receive of the group, and what the
  buffer holds at ``close``. A lane's messages are handed back only once no pull of this
  transport waits on it, or the server would give them right back;
* the attempt is JetStream's delivery counter of the message for that consumer
  (``num_delivered``), which survives restarts;
* ``leave(consumer)`` (a worker stopping) hands back what that consumer was given and
  did not settle (a ``NAK`` without delay: attempt + 1), so that its partitions pass on
  now instead of after ``ack_wait``;
* ``ack`` publishes the ack and returns once a round trip to the server (a ``PING``,
  shared by all the acks published meanwhile) showed the server received it;
  ``retry(delay)`` is a ``NAK`` with that delay, which redelivers to that
  group only; consumers have no ``max_deliver``: iambus decides when to dead-letter;
* ``dead_letter`` publishes the envelope with its failure to ``<ns>.dead``, in a stream of
  its own, ``D_<ns>``, then acks the delivery. It is two steps: a crash in between
  leaves the delivery to be redelivered, and its dead letter is not stored twice
  (``Nats-Msg-Id``) when that happens within the duplicate window. (Stream names start
  with ``M_`` and ``D_`` so that no namespace's stream is another's: the dead stream of
  ``x`` was once ``x_dead``, the message stream of the namespace ``x_dead``);
* a dead letter's id is its sequence in ``D_<ns>``. ``replay`` publishes the envelope
  again to its address (a keyed one to its partition's subject, behind what the partition
  holds) with the header ``Iambus-Group`` naming the group it goes to; the consumers of
  the other groups on that address ack it and skip it (a consumer has a single subject
  filter on NATS 2.9, so the replay cannot have a subject of its own without a second
  consumer per group). ``purge`` deletes dead letters by sequence;
* ``request`` sets ``reply_to`` to an inbox of this transport instance, on core NATS;
  ``reply`` is a core NATS publish there (not durable: a reply nobody waits for is
  dropped). A query without a key is published on core NATS to ``<ns>.r.<address>``
  (no stream holds it; ``r`` is no ``m`` nor ``k``), framed the same way and without
  headers, with a NATS reply subject of its own: a group's first ``receive`` subscribes
  there, in a queue group named after its consumer, so that one instance of each group
  gets it, and ``receive`` hands it out with the rest (attempt 1). When nobody listens, the server
  answers "no responders" (503) on that reply subject and the request goes into the
  stream as a send (so the owner's durable consumer gets it, even if it starts later);
  a keyed request always does (its partition's order), and so does a command's request
  (``execute()``), which must survive a crash of its worker. Such a delivery's ``ack`` does
  nothing, ``retry(delay)`` gives it to a receive of this transport again after the
  delay (in memory, attempt + 1), ``dead_letter`` stores it in the dead stream. What a
  cancelled receive (a worker stopping; it unsubscribes), ``close``, or no receive
  within ``claim_after / 2`` leaves unread goes into the stream. Not durable: a request
  in flight when the process that received it dies is lost, and its requester times out;
* a message on an address that is no envelope is dead-lettered at once, with its raw
  headers; the rest of the batch flows. A consumer that is missing (deleted, or a server
  restarted without its JetStream store) is declared again, from the start of what the
  stream holds: a receive checks once per group, after a reconnect, when a pull reports
  its consumer deleted, and when a pull ended without a word.

Per-key ordering (``iambus.partitions``): an envelope with a ``key`` is published to
``<ns>.k.<n>.<address>``, ``n = partition(key, partitions)``. ``declare`` makes, besides
the group's consumer, one durable pull consumer per partition
(``<address>__<group>_<hash>-p<n>``, filtered on that subject) with ``max_ack_pending =
1``: the server lets one message of the partition out at a time for the group, across
all clients, in stream order. A retry (``NAK`` with a delay) keeps the message pending,
so the partition waits for it; an ack or a dead letter releases it; an unsettled one is
redelivered after ``ack_wait = claim_after`` (attempt + 1) before anything behind it.
A partition's next pull is made as soon as a receive hands out its message, so the
next one comes right after the settle. So ``partitions + 1`` consumers per group, made
even if no key is ever sent; an idle group costs no round trip per receive (its pulls
wait on the server, renewed every few seconds). Limits: keyed and unkeyed
envelopes are not ordered relative to each other (a receive hands out what it holds in
stream order, but the lanes deliver independently); a delivery handed back unread (see
above) counts an attempt; a buffered keyed message holds its partition until a receive
takes it or it is handed back. Every process of a namespace must use the same
``partitions``.

The registry (``announce`` / ``instances``): the key-value bucket ``L_<ns>`` holds the
live instances (its entries expire after ``ANNOUNCE_TTL``), ``G_<ns>`` the groups.

On nats-server 2.9, pulls that outlive their client (a ``close``, a crash) stay waiting
until they expire (10 s): a redelivery due in that window on a consumer nobody else pulls
from is skipped once (delivered later, with a wrong attempt count); the 2.10 series
fixed that in 2024.

The stream keeps at most ``max_length`` messages per subject (``max_msgs_per_subject``,
default 1,000,000: per address, and per address and partition), acked or not: a group
lagging further behind loses the oldest. The connection reconnects by itself (forever);
while it is down, calls fail with ``TransportError`` and the worker tries again. Driver
errors surface as ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope, finite_time
from ..errors import (
    ImproperlyConfigured,
    MessageRefused,
    SerializationError,
    TransportError,
    TransportRefused,
    check_count,
    check_seconds,
)
from ..partitions import partition, partitions_option
from . import (
    ANNOUNCE_TTL,
    UNREADABLE,
    Backlog,
    Capability,
    DeadLetter,
    Delivery,
    Failure,
    Instance,
    Transport,
    client_name,
    plain_namespace,
    redact,
)

try:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.errors import Error as NatsError
    from nats.errors import MaxPayloadError
    from nats.js import JetStreamContext
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        KeyValueConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
    from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
    from nats.js.kv import KeyValue
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("the NATS transport needs nats-py: pip install 'iambus[nats]'") from exc

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

ENVELOPE = "Iambus-Envelope"  # before 0.3: the envelope's fields but its payload (read still)
ONLY_GROUP = "Iambus-Group"  # on a replayed message: the one group it is for
DEAD_LETTER = "Iambus-Dead-Letter"  # on a dead letter: address, group, failure, time
MSG_ID = "Nats-Msg-Id"

_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
_BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.$|\.\.")
_NO_MESSAGE = (10037, 10057)  # "no message found" (get, delete)
_STREAM_IN_USE = 10058  # "stream name already in use" (a concurrent create)
_SUBJECTS_OVERLAP = 10065  # "subjects overlap with an existing stream"
_CONSUMER_EXISTS = (10013, 10148)  # "consumer name already in use" / "already exists"
_COVER = 10.0  # how long a standing pull waits; a receive renews it well before its end
_RENEW = 1.0  # renewed when it would end less than this after the receive's wait
_FETCH = 0.05  # how long a batch pull waits for more than the backlog holds
_SETTLE = 0.01  # after pulling on several lanes at once, how long to let their answers in
_SILENT = 2.0  # a pull that ended this long ago without a word: is its consumer gone?
_BATCH = 2  # the subscription of batch pulls (0 and 1: standing pulls, renewed in turn)
_NO_RESPONDERS = "503"  # the server's answer to a core request nobody is subscribed to


@dataclass(slots=True, eq=False)
class _Pull:
    """One pull request to one consumer, open until its batch is in or it expires."""

    token: str  # the last token of its reply subject
    lane: _Lane
    kind: int  # its subscription: 0 or 1 (standing, renewed in turn), or _BATCH
    remaining: int
    ends: float  # monotonic time the server lets it expire


@dataclass(slots=True, eq=False)
class _Lane:
    """One consumer of a group: its lane for envelopes without a key, or one partition."""

    group: _Group
    durable: str
    partition: int | None
    # A standing pull of one waits on every lane; renewing it makes the next one in the
    # other slot. Each slot answers to a subscription of its own, so a message is always
    # counted against the pull that brought it.
    standing: list[_Pull | None] = field(default_factory=lambda: [None, None])
    batch: _Pull | None = None  # the unkeyed lane's batch pull, while it is open

    def newest(self) -> _Pull | None:
        pulls = [pull for pull in self.standing if pull is not None]
        return max(pulls, key=lambda pull: pull.ends) if pulls else None


@dataclass(slots=True, eq=False)
class _Asked:
    """A request that came over core NATS, until a receive hands it out."""

    message: Msg
    due: float  # monotonic: when it arrived, or when its retry is due
    attempt: int


class _Held(NamedTuple):
    """A message a pull brought, until a receive hands it out."""

    message: Msg
    arrived: float  # monotonic
    lane: _Lane
    sequence: int  # in the stream: the order it was sent in
    attempt: int  # the server's delivery count


@dataclass(slots=True, eq=False)
class _Group:
    """What this transport pulled for one group (all consumer names share it)."""

    address: str
    group: str
    lanes: list[_Lane] = field(default_factory=list)  # unkeyed, then partitions 0..n-1
    buffer: deque[_Held] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    receiving: bool = False
    parked: bool = False  # a receive was cancelled: hand back whatever comes
    busy: bool = True  # the unkeyed lane had traffic: the next receive pulls a batch
    bare: set[_Lane] = field(default_factory=set)  # lanes with no standing pull of ours
    renew: float = 0.0  # when the first standing pull needs renewing (monotonic)
    check: bool = True  # make sure the consumers exist before the next receive
    timer: asyncio.TimerHandle | None = None
    # Requests over core NATS: the subscription to the address's request subject (in a
    # queue group named after the group, made by a receive), and what it brought.
    listener: Subscription | None = None
    asked: list[_Asked] = field(default_factory=list)


class NatsTransport(Transport):
    """NATS JetStream transport; see the module docstring."""

    capabilities = (
        Capability.RECLAIM | Capability.KEY_ORDER | Capability.DELAYED_RETRY | Capability.SEND_ORDER
    )
    partitions: int  # always partitioned (see iambus.partitions)

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        namespace: str | None = None,
        claim_after: float = 60.0,
        max_length: int = 1_000_000,
        timeout: float = 5.0,
        partitions: int | None = None,
        client_name: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.namespace = plain_namespace(namespace, query, "NATS")
        self.partitions = partitions_option(partitions, query)
        self._driver_url = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = redact(url)
        self.client_name = client_name  # None: the dispatcher's service names it on open
        self.claim_after = check_seconds("claim_after", claim_after)
        self.max_length = check_count("max_length", max_length)
        self.timeout = check_seconds("timeout", timeout)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._pull_inbox = ""
        self._ack_inbox = ""
        self._pull_subs: list[Subscription] = []
        self._stored: dict[str, asyncio.Future[Msg]] = {}  # token -> the PubAck awaited
        self._store_deadlines: deque[tuple[float, str]] = deque()
        self._sweeping: asyncio.TimerHandle | None = None
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        self._ask_inbox = ""
        # core requests not known to be heard: token -> (address, envelope)
        self._unheard: dict[str, tuple[str, Envelope]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        # Messages handed out to each consumer name and maybe not settled yet, for
        # leave() (settled ones are dropped at the consumer's next receive).
        self._handed: dict[str, list[Msg]] = {}
        self._handed_asked: dict[str, list[_AskedDelivery]] = {}  # the same, over core NATS
        self._lanes: dict[str, _Lane] = {}  # consumer name -> lane
        self._pulls: dict[str, _Pull] = {}  # reply token -> open pull
        self._tokens = 0
        self._background: set[asyncio.Task[None]] = set()
        self._confirming: asyncio.Future[None] | None = None  # the next round trip's
        self._round_trips: asyncio.Task[None] | None = None
        self._streams_ready = False
        self._first_error: asyncio.Future[Exception] | None = None  # while connecting
        self._lost: float | None = None  # disconnected since (monotonic), reconnecting
        self._closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- names ------------------------------------------------------------------------

    @property
    def stream(self) -> str:
        """The namespace's message stream (``M_<ns>``: no namespace's dead stream)."""
        return f"M_{self.namespace}"

    @property
    def dead_stream(self) -> str:
        """The namespace's dead letters (``D_<ns>``)."""
        return f"D_{self.namespace}"

    def subject(self, address: str) -> str:
        """The subject of ``address``'s envelopes without a key."""
        if not address or _BAD_SUBJECT.search(address):
            raise ImproperlyConfigured(
                f"{address!r} cannot be a NATS subject: no spaces, '*', '>' or empty tokens"
            )
        return f"{self.namespace}.m.{address}"

    def keyed_subject(self, address: str, partition: int) -> str:
        """The subject of ``address``'s keyed envelopes in ``partition``."""
        self.subject(address)  # the same rules
        return f"{self.namespace}.k.{partition}.{address}"

    def request_subject(self, address: str) -> str:
        """The core NATS subject of ``address``'s requests (not in any stream)."""
        self.subject(address)  # the same rules
        return f"{self.namespace}.r.{address}"

    def _dead_subject(self) -> str:
        return f"{self.namespace}.dead"

    @staticmethod
    def durable(address: str, group: str, partition: int | None = None) -> str:
        """The durable consumer's name of ``group`` on ``address`` (or of one partition)."""
        digest = hashlib.sha1(f"{address}\0{group}".encode(), usedforsecurity=False)
        readable = _NOT_IN_NAME.sub("_", f"{address}__{group}")[:80]
        name = f"{readable}_{digest.hexdigest()[:12]}"
        return name if partition is None else f"{name}-p{partition}"

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._closing is not None:  # a close cancelled midway: it ends first
            await asyncio.shield(self._closing)
        if self._nc is not None:
            return
        self._lost = None  # (an outage of an earlier connection set it)
        nc = Client()
        # nats-py retries a first connection that fails for as long as it would reconnect
        # (forever here): the first error it reports while connecting ends the attempt
        # instead, so an unreachable server is named at once, as Redis and RabbitMQ do.
        self._first_error = failed = asyncio.get_running_loop().create_future()
        options: dict[str, Any] = {  # Any: nats-py types its seconds as int, takes floats
            "servers": [self._driver_url],
            "name": self.client_name or client_name(),  # shown by the server's connz
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": min(self.timeout, 2.0),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
        }
        connecting = asyncio.ensure_future(nc.connect(**options))
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.wait((connecting, failed), return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                raise failed.result()
            connecting.result()
        except Exception as exc:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            with contextlib.suppress(Exception):
                await nc.close()
            if _refused(exc):
                raise TransportRefused(
                    f"{self.url}: connect refused: {_describe(exc)}; check the user and "
                    f"password (or token) in the URL, and what the server allows them"
                ) from exc
            raise TransportError(f"{self.url}: connect failed: {_describe(exc)}") from exc
        finally:
            self._first_error = None
            connecting.cancel()
        self._nc, self._js = nc, nc.jetstream(timeout=self.timeout)
        self._inbox = nc.new_inbox()
        self._pull_inbox = nc.new_inbox()
        self._ack_inbox = nc.new_inbox()
        self._ask_inbox = nc.new_inbox()
        try:
            async with self._translate("subscribe"):
                await nc.subscribe(self._inbox, cb=self._on_reply)
                await nc.subscribe(f"{self._ask_inbox}.*", cb=self._on_unheard)
                await nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_stored)
                for kind in (0, 1, _BATCH):
                    self._pull_subs.append(
                        await nc.subscribe(f"{self._pull_inbox}.{kind}.*", cb=self._pulled(kind))
                    )
            await self._ensure_streams()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        # Run to its end even if the caller is cancelled: a close cut short left the
        # connection open, its tasks running, and what it held in limbo.
        if self._closing is None:
            self._closing = closing = asyncio.get_running_loop().create_task(self._close())
            closing.add_done_callback(self._closed)
        await asyncio.shield(self._closing)

    def _closed(self, closing: asyncio.Task[None]) -> None:
        if self._closing is closing:
            self._closing = None
        if not closing.cancelled() and closing.exception() is not None:
            logger.debug("iambus: closing %s failed: %r", self.url, closing.exception())

    async def _close(self) -> None:
        if self._nc is not None:
            # Requests that came over core NATS and were never handed out go into the
            # stream, where another instance of their group gets them.
            await asyncio.gather(*(self._unlisten(state) for state in self._groups.values()))
            # Our pulls stop taking first (the server passes over them): what is handed
            # to the stream next, or given back below, must not be fetched by us again
            # (it would sit in a buffer closed meanwhile until claim_after).
            subscriptions, self._pull_subs = self._pull_subs, []
            for subscription in subscriptions:
                with contextlib.suppress(NatsError, OSError, TimeoutError):
                    await subscription.unsubscribe()
            # Those handed out and not settled too, as leave() hands them over: closed
            # without it, their requesters would wait until their timeout.
            unsettled = [d for ds in self._handed_asked.values() for d in ds if not d.settled]
            for delivery in unsettled:
                delivery.settled = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(
                        *(
                            self._hand_over(state, asked)
                            for state in self._groups.values()
                            for asked in state.asked
                        ),
                        *(self._hand_over(d._state, d._request) for d in unsettled),
                    )
            for state in self._groups.values():
                state.asked.clear()
        waiting: list[asyncio.Future[Any]] = [*self._waiting.values(), *self._stored.values()]
        for future in waiting:
            if not future.done():
                future.set_exception(TransportError(f"{self.url}: closed while waiting"))
                # A request still publishing when this happens never awaits its answer:
                # no "exception never retrieved" for it (whoever awaits still gets it).
                future.exception()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        self._store_deadlines.clear()
        held: list[Msg] = []
        for state in self._groups.values():
            held += (entry.message for entry in state.buffer)
            state.buffer.clear()
            if state.timer is not None:
                state.timer.cancel()
            state.arrived.set()  # a receive waiting returns (and finds the transport closed)
        nc, self._nc, self._js = self._nc, None, None
        self._groups.clear()
        self._handed.clear()
        self._handed_asked.clear()
        self._lanes.clear()
        self._pulls.clear()
        self._streams_ready = False
        if nc is not None:
            # What our pulls fetched and nobody was handed goes back, to another consumer.
            for message in held:
                with contextlib.suppress(NatsError, OSError, TimeoutError):
                    await message.nak()
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.flush(timeout=1)  # acks and replies published but not yet sent
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()
        # The ack round trip (its flush fails or times out once the connection is closed)
        # and the hand-backs in flight end before close() returns.
        pending = [*self._background, *(t for t in [self._round_trips] if t is not None)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def destroy(self) -> int:
        """Delete this namespace's streams, and so their consumers. Returns how many streams."""
        js = self._jetstream()
        deleted = 0
        for name in (self.stream, self.dead_stream, *(f"KV_{b}" for b in self._buckets())):
            try:
                async with self._translate("delete stream"):
                    deleted += bool(await js.delete_stream(name))
            except TransportError as exc:
                if not isinstance(exc.__cause__, NotFoundError):
                    raise
        self._streams_ready = False
        return deleted

    async def _ensure_streams(self) -> None:
        js = self._jetstream()
        wanted = (
            (self.stream, [f"{self.namespace}.m.>", f"{self.namespace}.k.>"], self.max_length),
            (self.dead_stream, [self._dead_subject()], -1),
        )
        for name, subjects, per_subject in wanted:
            async with self._translate("create stream"):
                try:
                    info = await js.stream_info(name)
                except NotFoundError:
                    pass
                else:
                    retention = info.config.retention  # (nats-py gives the name, a str)
                    retention = getattr(retention, "value", retention)
                    if retention not in (None, RetentionPolicy.LIMITS.value):
                        # A work queue refuses a second group on an address; an interest
                        # stream drops what no consumer waits for (dead letters, all).
                        raise ImproperlyConfigured(
                            f"{self.url}: stream {name!r} has {retention} retention; "
                            f"iambus needs limits retention (each group reads every message, "
                            f"kept until trimmed): delete it (nats stream rm {name}) to let "
                            f"iambus make it again, or pick another namespace"
                        )
                    have = list(info.config.subjects or [])
                    if not set(subjects) <= set(have):  # made before keyed subjects existed
                        config = dataclasses.replace(
                            info.config, subjects=have + [s for s in subjects if s not in have]
                        )
                        await js.update_stream(config)
                    continue
                config = StreamConfig(
                    name=name,
                    subjects=subjects,
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    max_msgs_per_subject=per_subject,
                    duplicate_window=120.0,
                )
                try:
                    await js.add_stream(config)
                except APIError as exc:
                    if exc.err_code == _SUBJECTS_OVERLAP:
                        raise await self._overlap(name, subjects) from exc
                    if exc.err_code != _STREAM_IN_USE:  # created meanwhile by another one
                        raise
        self._streams_ready = True

    async def _overlap(self, name: str, subjects: list[str]) -> ImproperlyConfigured:
        owner = "another stream"
        for subject in subjects:
            with contextlib.suppress(NatsError):
                owner = f"stream {await self._jetstream().find_stream_name_by_subject(subject)!r}"
                break
        return ImproperlyConfigured(
            f"{self.url}: cannot create stream {name!r}: {owner} already holds its subjects "
            f"{', '.join(subjects)}. Before iambus named its streams M_<namespace> and "
            f"D_<namespace>, they were <namespace> and <namespace>_dead: let the old ones "
            f"drain, then delete them (nats stream rm), or pick another namespace"
        )

    # -- sending and receiving --------------------------------------------------------

    async def send(self, address: str, envelope: Envelope) -> None:
        if envelope.key is None:
            subject = self.subject(address)
        else:
            subject = self.keyed_subject(address, partition(envelope.key, self.partitions))
        await self._publish(subject, _framed(envelope), {MSG_ID: f"{address}:{envelope.id}"})

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        if await self._store(subject, payload, headers):
            return
        # No stream takes the subject: it was deleted, or the server restarted without
        # its store. Create it again and publish once more.
        logger.warning("iambus: stream %s on %s was lost; creating it", self.stream, self.url)
        await self._ensure_streams()
        if not await self._store(subject, payload, headers):
            raise TransportError(f"{self.url}: publish failed: no stream takes {subject!r}")

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> bool:
        """Publish into the stream and wait for its PubAck; False: no stream took it."""
        nc = self._client()
        # The server holds headers and body together to max_payload, nats-py the body
        # alone: a message over it by its headers would cost the connection.
        size = (
            len(payload)
            + _HEADER_FRAME
            + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
        )
        if size > nc.max_payload:
            raise self._error("publish", MaxPayloadError())
        self._tokens += 1
        token = format(self._tokens, "x")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Msg] = loop.create_future()
        # No timer per publish: one sweep a second fails those waiting past the timeout.
        self._stored[token] = answer
        self._store_deadlines.append((loop.time() + self.timeout, token))
        if self._sweeping is None:
            self._sweeping = loop.call_later(1.0, self._sweep_stored)
        try:
            await nc.publish(subject, payload, reply=f"{self._ack_inbox}.{token}", headers=headers)
            reply = await answer
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._error("publish", exc) from exc
        finally:
            self._stored.pop(token, None)
        if _status(reply) == "503":  # no responders: no stream on that subject
            return False
        if b'"error"' in reply.data:
            error = json.loads(reply.data).get("error") or {}
            raise TransportError(
                f"{self.url}: publish failed: {error.get('description', reply.data)!r}"
            )
        return True

    def _sweep_stored(self) -> None:
        now = asyncio.get_running_loop().time()
        deadlines = self._store_deadlines
        while deadlines and deadlines[0][0] <= now:
            _, token = deadlines.popleft()
            answer = self._stored.get(token)
            if answer is not None and not answer.done():
                answer.set_exception(TimeoutError(f"no PubAck within {self.timeout}s"))
        while deadlines and deadlines[0][1] not in self._stored:
            deadlines.popleft()  # answered
        self._sweeping = None
        if deadlines:
            self._sweeping = asyncio.get_running_loop().call_later(1.0, self._sweep_stored)

    async def _on_stored(self, message: Msg) -> None:
        answer = self._stored.get(message.subject.rpartition(".")[2])
        if answer is not None and not answer.done():
            answer.set_result(message)

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        await self._declare(address, group, from_start=from_start, update=True)

    async def _declare(
        self, address: str, group: str, *, from_start: bool, update: bool
    ) -> set[str]:
        """Declare the group's consumers; returns the names of those it had to create
        (``update``: give those that exist this transport's claim_after)."""
        if not self._streams_ready:
            await self._ensure_streams()
        lanes: list[tuple[str, str, bool]] = [
            (self.durable(address, group), self.subject(address), False)
        ]
        for n in range(self.partitions):
            lanes.append((self.durable(address, group, n), self.keyed_subject(address, n), True))
        created = await asyncio.gather(
            *(self._declare_consumer(*lane, from_start=from_start, update=update) for lane in lanes)
        )
        return {name for (name, _, _), made in zip(lanes, created, strict=True) if made}

    async def _declare_consumer(
        self, durable: str, subject: str, keyed: bool, *, from_start: bool, update: bool
    ) -> bool:
        js = self._jetstream()
        async with self._translate("create consumer"):
            try:
                info = await js.consumer_info(self.stream, durable)
            except NotFoundError:
                pass
            else:
                had = info.config.ack_wait
                if update and (had is None or abs(had - self.claim_after) > 1e-6):
                    # claim_after changed since it was made: a shorter ack_wait would
                    # redeliver what is still being handled (a key's next out beside it).
                    logger.info(
                        "iambus: consumer %s: ack_wait %ss -> claim_after %ss",
                        durable,
                        had,
                        self.claim_after,
                    )
                    config = dataclasses.replace(info.config, ack_wait=self.claim_after)
                    await js.add_consumer(self.stream, config)
                return False
            config = ConsumerConfig(
                durable_name=durable,
                filter_subject=subject,
                deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.claim_after,
                max_deliver=-1,
                # A partition has one delivery out at a time; a retry waiting out its
                # delay still counts, so the partition waits for it. Without a key no cap:
                # with the server's default (1,000) a burst of retries would freeze the group.
                max_ack_pending=1 if keyed else -1,
            )
            try:
                await js.add_consumer(self.stream, config)
            except APIError as exc:
                if exc.err_code not in _CONSUMER_EXISTS:  # created meanwhile
                    raise
                return False
            return True

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        self._client()
        state = self._group(address, group)
        wait = max(wait, 0.0)
        deadline = time.monotonic() + wait
        async with state.lock:
            state.receiving, state.parked = True, False
            try:
                if state.listener is None:
                    await self._listen(state)
                spread = await self._cover(state, wait) > 1
                pulled = time.monotonic()
                while True:
                    asked = self._take_asked(state, limit)
                    if spread and state.buffer and not asked:
                        # Lanes answer on their own: let the others' answers in, so that
                        # what this receive returns comes in the order it was sent.
                        spread = False
                        await asyncio.sleep(pulled + _SETTLE - time.monotonic())
                    messages = await self._take(state, limit - len(asked))
                    unkeyed = state.lanes[0]
                    room = limit - len(asked) - len(messages) - len(state.buffer)
                    room -= sum(pull.remaining for pull in unkeyed.standing if pull is not None)
                    if room > 0 and state.busy and unkeyed.batch is None:
                        # Traffic: a batch pull of what there is room for. It waits a
                        # moment only; what it brings after this receive is buffered.
                        state.busy = False
                        await self._request(unkeyed, _BATCH, room, _FETCH)
                    if not messages and not asked:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return []
                        state.arrived.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(remaining):
                                await state.arrived.wait()
                        self._client()  # closed meanwhile
                        continue
                    out = await self._deliveries(state, asked, messages)
                    if out:
                        self._hand(consumer, out)
                    if out or time.monotonic() >= deadline:
                        return out
            except asyncio.CancelledError:
                # The worker stops. Pulls stay open on the server (there is no cancelling
                # them): hand back what they bring until a receive comes again. Requests
                # stop coming over core NATS (they go through the stream while nobody
                # listens), and those it brought go into the stream.
                state.parked = True
                if state.listener is not None:
                    self._background_task(self._drain(state.listener))
                    state.listener = None
                self._release_stale(state, everything=True)
                raise
            finally:
                state.receiving = False
                self._schedule_release(state)

    async def _deliveries(
        self, state: _Group, asked: list[_Asked], messages: list[_Held]
    ) -> list[Delivery]:
        """The deliveries of what a receive took. One settled here that fails to be (a
        message that is no envelope, parked; a replay for another group, acked) comes
        back later and holds back none of the rest; cancelled midway, what is left goes
        back where it was taken from (and from there to another consumer)."""
        out: list[Delivery] = []
        settled: list[_Asked] = []  # requests dead-lettered here
        try:
            for request in asked:
                try:
                    delivery = await self._asked_delivery(state, request)
                except Exception as exc:
                    logger.warning(
                        "iambus: could not park a request on %s; into the stream with it: %s",
                        state.address,
                        exc,
                    )
                    settled.append(request)
                    self._background_task(self._hand_over(state, request))
                    continue
                if delivery is None:
                    settled.append(request)
                else:
                    out.append(delivery)
            for entry in messages:
                try:
                    delivery = await self._delivery(state.address, state.group, entry)
                except Exception as exc:  # left unsettled: it comes back after claim_after
                    logger.warning(
                        "iambus: could not settle a message on %s for %s; it comes back "
                        "after claim_after: %s",
                        state.address,
                        state.group,
                        exc,
                        # not the broker's: a bug, show where
                        exc_info=None if isinstance(exc, TransportError) else exc,
                    )
                    continue
                if delivery is not None:
                    out.append(delivery)
        except BaseException:  # cancelled: nothing was handed out
            state.asked[:0] = [request for request in asked if request not in settled]
            state.buffer.extendleft(
                reversed([entry for entry in messages if not entry.message._ackd])
            )
            raise
        return out

    def _hand(self, consumer: str, out: list[Delivery]) -> None:
        handed = [message for message in self._handed.get(consumer, ()) if not message.is_acked]
        handed += (d._message for d in out if isinstance(d, _NatsDelivery))
        self._handed[consumer] = handed
        asked = [d for d in self._handed_asked.get(consumer, ()) if not d.settled]
        asked += (d for d in out if isinstance(d, _AskedDelivery))
        if asked:
            self._handed_asked[consumer] = asked
        else:
            self._handed_asked.pop(consumer, None)

    async def leave(self, consumer: str) -> None:
        """Hand back (``NAK`` without delay: attempt + 1) what ``consumer`` was handed and
        did not settle: its partitions pass on now, not after ``claim_after``."""
        handed = self._handed.pop(consumer, [])
        asked = self._handed_asked.pop(consumer, [])
        if self._nc is None:
            return
        for message in handed:
            if not message.is_acked:
                await self._nak_now(message)
        for delivery in asked:  # a request over core NATS: into the stream with it
            if not delivery.settled:
                delivery.settled = True
                await self._hand_over(delivery._state, delivery._request)

    def _group(self, address: str, group: str) -> _Group:
        state = self._groups.get((address, group))
        if state is None:
            self.subject(address)  # a clear error for an address that cannot be a subject
            state = _Group(address, group)
            names = [self.durable(address, group)]
            names += (self.durable(address, group, n) for n in range(self.partitions))
            for n, name in enumerate(names):
                lane = _Lane(state, name, None if n == 0 else n - 1)
                state.lanes.append(lane)
                self._lanes[name] = lane
            self._groups[address, group] = state
        return state

    async def _cover(self, state: _Group, wait: float) -> int:
        """Keep a pull waiting on every lane, renewed before it ends; how many it made."""
        now = time.monotonic()
        due = now + wait + _RENEW
        if due < state.renew and not state.check:
            lanes = list(state.bare)  # the usual case: only lanes whose pull was answered
        else:  # look at them all: renew what ends soon, forget what went silent
            lanes = state.lanes
            for lane in lanes:
                for pull in (*lane.standing, lane.batch):
                    if pull is not None and pull.ends < now - _SILENT:
                        # Expired without a word: the server dropped it, or its consumer
                        # is gone.
                        self._forget(pull)
                        state.check = True
            if state.check:
                await self._declare_again(state)
        made = 0
        life = max(_COVER, wait + 3 * _RENEW)
        for lane in lanes:
            newest = lane.newest()
            if newest is not None and newest.ends > due:
                continue
            if lane.partition is not None and any(e.lane is lane for e in state.buffer):
                continue  # its next one comes when a receive takes the one it holds
            await self._stand(lane, life)
            made += 1
        if lanes is state.lanes:
            state.renew = min(
                (newest.ends for lane in lanes if (newest := lane.newest()) is not None),
                default=now,
            )
        return made

    async def _stand(self, lane: _Lane, life: float) -> None:
        """A standing pull of one on ``lane``: in the slot that is free, or was first."""
        first, second = lane.standing
        if first is None or second is None:
            slot = 0 if first is None else 1
        else:  # both open: the older is all but over; what it still brings is buffered
            older = first if first.ends < second.ends else second
            slot = older.kind
            self._forget(older)
        await self._request(lane, slot, 1, life)

    async def _request(self, lane: _Lane, kind: int, batch: int, expires: float) -> None:
        nc = self._client()
        self._tokens += 1
        token = format(self._tokens, "x")
        pull = _Pull(token, lane, kind, batch, time.monotonic() + expires)
        self._pulls[token] = pull
        if kind == _BATCH:
            lane.batch = pull
        else:
            lane.standing[kind] = pull
            lane.group.bare.discard(lane)
            lane.group.renew = min(lane.group.renew, pull.ends)
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        try:
            async with self._translate("pull"):
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{lane.durable}",
                    body,
                    reply=f"{self._pull_inbox}.{kind}.{token}",
                )
        except BaseException:
            self._forget(pull)
            raise

    def _forget(self, pull: _Pull) -> None:
        self._pulls.pop(pull.token, None)
        lane = pull.lane
        if lane.batch is pull:
            lane.batch = None
        elif pull.kind != _BATCH and lane.standing[pull.kind] is pull:
            lane.standing[pull.kind] = None
            if lane.standing[1 - pull.kind] is None:
                lane.group.bare.add(lane)

    async def _take(self, state: _Group, limit: int) -> list[_Held]:
        """Up to ``limit`` buffered messages, in the order they were sent (stream order)."""
        out: list[_Held] = []
        now = time.monotonic()
        hold = self.claim_after / 2
        while state.buffer and len(out) < limit:
            entry = state.buffer.popleft()
            message, arrived, lane = entry.message, entry.arrived, entry.lane
            if now - arrived < hold:
                out.append(entry)
                if now - arrived > self.claim_after / 10:
                    # The server's ack_wait runs from when it sent it: start it again,
                    # so that the handler has claim_after from now, not what is left.
                    with contextlib.suppress(NatsError, OSError):
                        await message.in_progress()
                if lane.partition is not None and lane.newest() is None:
                    # Pull the partition's next one now: the server holds it back until
                    # this one is settled, then sends it without waiting for a receive.
                    await self._stand(lane, _COVER)
            elif now - arrived < self.claim_after * 0.8:
                self._release(message)  # held too long: another consumer may have it now
            # else: the server gives it to someone else anyway; a NAK now could come late
        if len(out) > 1:
            out.sort(key=lambda entry: entry.sequence)
        return out

    def _pulled(self, kind: int) -> Callable[[Msg], Awaitable[None]]:
        async def callback(message: Msg) -> None:
            self._on_pulled(message, kind)

        return callback

    def _on_pulled(self, message: Msg, kind: int) -> None:
        """Everything pulls bring: messages, and statuses ending a pull."""
        status = _status(message)
        if status is not None:
            pull = self._pulls.get(message.subject.rpartition(".")[2])
            if pull is None:
                return  # a pull already forgotten
            self._forget(pull)
            state = pull.lane.group
            if status == "409" and "deleted" in str(_header(message, "Description")).lower():
                state.check = True
            elif status not in ("404", "408"):
                logger.debug("iambus: pull on %s: %s", pull.lane.durable, message.headers)
            if state.parked:  # what its lane held can go now
                self._release_stale(state, everything=True)
            return
        try:
            consumer, attempt, sequence = _ack_subject(message.reply)
        except (ValueError, IndexError):  # pragma: no cover - not a JetStream message
            return
        lane = self._lanes.get(consumer)
        if lane is None:  # the transport forgot the group (closed): let someone else have it
            self._release(message)
            return
        pull = lane.batch if kind == _BATCH else lane.standing[kind]
        if pull is not None:
            pull.remaining -= 1
            if pull.remaining <= 0:  # its batch is in: it is over
                self._forget(pull)
        state = lane.group
        if lane.partition is None and kind != _BATCH:
            state.busy = True  # the standing pull brought one: there may be more
        state.buffer.append(_Held(message, time.monotonic(), lane, sequence, attempt))
        state.arrived.set()
        if state.parked:
            self._release_stale(state, everything=True)
        elif not state.receiving:
            self._schedule_release(state)

    def _schedule_release(self, state: _Group, later: bool = False) -> None:
        """Hand back what no receive took within claim_after / 2 (``later``: look again)."""
        if state.timer is not None or not (state.buffer or state.asked) or state.receiving:
            return
        hold = self.claim_after / 2
        first = min(asked.due for asked in state.asked) if state.asked else math.inf
        if state.buffer:
            first = min(first, state.buffer[0].arrived)
        delay = first + hold - time.monotonic()
        if later:
            delay = max(delay, min(hold / 4, 1.0))
        state.timer = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._release_stale, state
        )

    def _release_stale(self, state: _Group, everything: bool = False) -> None:
        """Hand back what waited claim_after / 2 (or everything, once a receive is cancelled).

        Only from lanes with no pull of this transport open: the server would give it
        right back to that pull. The rest goes when its lane's pull is over.
        """
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if state.receiving and not everything:
            return
        cutoff = math.inf if everything else time.monotonic() - self.claim_after / 2 + 0.001
        kept: deque[_Held] = deque()
        for entry in state.buffer:
            lane = entry.lane
            if entry.arrived <= cutoff and lane.batch is None and lane.newest() is None:
                self._release(entry.message)
            else:
                kept.append(entry)
        state.buffer = kept
        if state.asked:
            asked, state.asked = state.asked, []
            for request in asked:
                if request.due <= cutoff:
                    self._background_task(self._hand_over(state, request))
                else:
                    state.asked.append(request)
        if not everything:
            self._schedule_release(state, later=True)

    def _release(self, message: Msg) -> None:
        """NAK ``message`` without delay, in the background: another consumer gets it now."""
        if self._nc is None or message._ackd:
            return
        self._background_task(self._nak_now(message))

    def _background_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _nak_now(self, message: Msg) -> None:
        try:
            await message.nak()
        except (NatsError, OSError) as exc:  # it comes back after claim_after anyway
            logger.debug("iambus: could not hand back a message: %r", exc)

    async def _declare_again(self, state: _Group) -> None:
        """Make sure a group's consumers exist; one that is missing is declared again."""
        self._streams_ready = False  # it may have gone with its stream
        # Not their ack_wait: an instance still on an older claim_after would put it
        # back over the one a later deployment declared.
        missing = await self._declare(state.address, state.group, from_start=True, update=False)
        state.check = False
        if missing:
            logger.warning(
                "iambus: %d consumer(s) of %s on %s were missing; declared them again",
                len(missing),
                state.group,
                state.address,
            )
        for lane in state.lanes:
            if lane.durable in missing:
                for pull in (*lane.standing, lane.batch):
                    if pull is not None:
                        self._forget(pull)  # it went to a consumer that was not there

    async def _delivery(self, address: str, group: str, entry: _Held) -> Delivery | None:
        """A delivery, or None: a replay for another group (acked), or no envelope (parked)."""
        message = entry.message
        headers = message.headers or {}
        only = headers.get(ONLY_GROUP)
        if only is not None and only != group:
            await self._ack(message)
            return None
        try:
            envelope = _unframed(headers, message.data)
        except SerializationError as exc:
            logger.error("iambus: a message on %s is no envelope; dead-lettered: %s", address, exc)
            parked, failure = _raw_letter(message, exc, entry.attempt)
            await self._park(address, group, message, parked, failure)
            return None
        return _NatsDelivery(self, address, group, message, envelope, entry.attempt)

    # -- settling (called by deliveries) ----------------------------------------------

    async def _ack(self, message: Msg) -> None:
        try:
            await message.ack()
        except (NatsError, OSError) as exc:
            raise TransportError(f"{self.url}: ack failed: {_describe(exc)}") from exc
        await asyncio.shield(self._round_trip())  # shared: one caller's cancel is its own

    def _round_trip(self) -> asyncio.Future[None]:
        """Done once the server has everything published so far (one PING for many acks)."""
        if self._confirming is None:
            self._confirming = asyncio.get_running_loop().create_future()
            if self._round_trips is None:
                self._round_trips = asyncio.get_running_loop().create_task(self._ping())
        return self._confirming

    async def _ping(self) -> None:
        try:
            while self._confirming is not None:
                waiting, self._confirming = self._confirming, None
                try:
                    await self._client().flush(timeout=max(math.ceil(self.timeout), 1))
                except (NatsError, OSError, TimeoutError, TransportError) as exc:
                    waiting.set_exception(
                        TransportError(f"{self.url}: ack not confirmed: {_describe(exc)}")
                    )
                else:
                    waiting.set_result(None)
        finally:
            self._round_trips = None

    async def _retry(self, message: Msg, delay: float) -> None:
        async with self._translate("nak"):
            await message.nak(delay=max(delay, 0.0) or None)

    async def _park(
        self, address: str, group: str, message: Msg, envelope: Envelope, failure: Failure
    ) -> None:
        # The same delivery parked twice (the ack below failed) is stored once.
        key = f"dead:{self.durable(address, group)}:{message.metadata.sequence.stream}"
        await self._bury(key, address, group, envelope, failure)
        await self._ack(message)

    async def _bury(
        self, key: str, address: str, group: str, envelope: Envelope, failure: Failure
    ) -> None:
        """Store a dead letter (``key``: its ``Nats-Msg-Id``)."""
        body = _framed(envelope)
        # The room max_payload leaves for the failure (counted as _store counts it): a
        # large message's dead letter fits with its failure cut short.
        room = self._client().max_payload - len(body) - _HEADER_FRAME
        room -= len(MSG_ID) + len(key.encode()) + 4 + len(DEAD_LETTER) + 4
        headers = {MSG_ID: key, DEAD_LETTER: _dead_record(address, group, failure, room)}
        await self._publish(self._dead_subject(), body, headers)

    # -- request/reply --------------------------------------------------------------

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._client()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting[envelope.id] = future
        envelope = dataclasses.replace(envelope, reply_to=self._inbox)
        self._tokens += 1
        token = format(self._tokens, "x")
        try:
            async with asyncio.timeout(timeout):
                # A query without a key goes over core NATS to whoever listens; a keyed
                # one keeps its place in its partition, and one nobody listens for waits
                # in the stream for the owner's worker to start. A command always goes
                # into the stream: it must outlive a crash of the worker handling it,
                # and its retries must be durable (core NATS keeps nothing).
                if envelope.key is None and not address.startswith("command."):
                    await self._ask(address, envelope, token)
                else:
                    await self.send(address, envelope)
                return await future
        finally:
            self._waiting.pop(envelope.id, None)
            self._unheard.pop(token, None)

    async def _ask(self, address: str, envelope: Envelope, token: str) -> None:
        """Publish a request over core NATS; if nobody listens, it goes into the stream."""
        nc = self._client()
        subject = self.request_subject(address)
        self._unheard[token] = (address, envelope)
        try:
            await nc.publish(subject, _framed(envelope), reply=f"{self._ask_inbox}.{token}")
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._error("publish request", exc) from exc

    async def _on_unheard(self, message: Msg) -> None:
        """The server's "no responders" to a core request: into the stream with it."""
        if _status(message) != _NO_RESPONDERS:
            return
        asked = self._unheard.pop(message.subject.rpartition(".")[2], None)
        if asked is not None:
            self._background_task(self._send_unheard(*asked))

    async def _send_unheard(self, address: str, envelope: Envelope) -> None:
        answer = self._waiting.get(envelope.id)
        if answer is None or answer.done():
            return  # the requester gave up
        try:
            await self.send(address, envelope)
        except (TransportError, ImproperlyConfigured) as exc:
            if not answer.done():
                answer.set_exception(exc)

    async def _listen(self, state: _Group) -> None:
        """Subscribe to the requests of the group's address (one member answers each)."""
        nc = self._client()

        async def callback(message: Msg) -> None:
            self._on_asked(state, message)

        async with self._translate("subscribe"):
            state.listener = await nc.subscribe(
                self.request_subject(state.address),
                queue=self.durable(state.address, state.group),
                cb=callback,
            )

    async def _unlisten(self, state: _Group) -> None:
        listener, state.listener = state.listener, None
        if listener is not None:
            await self._drain(listener)

    @staticmethod
    async def _drain(listener: Subscription) -> None:
        # Drained: what the subscription already got still reaches the callback.
        with contextlib.suppress(NatsError, OSError, TimeoutError):
            # Any: drain() is typed only in some nats-py releases
            draining: Any = listener
            await draining.drain()

    def _on_asked(self, state: _Group, message: Msg) -> None:
        if self._groups.get((state.address, state.group)) is not state:
            return  # closed: the requester times out
        request = _Asked(message, time.monotonic(), 1)
        if state.parked:  # no receive is coming: into the stream with it
            self._background_task(self._hand_over(state, request))
            return
        state.asked.append(request)
        state.arrived.set()
        if not state.receiving:
            self._schedule_release(state)

    def _take_asked(self, state: _Group, limit: int) -> list[_Asked]:
        """Up to ``limit`` core requests that are due (a retried one waits out its delay)."""
        if not state.asked:
            return []
        now = time.monotonic()
        out: list[_Asked] = []
        kept: list[_Asked] = []
        for request in state.asked:
            (out if request.due <= now and len(out) < limit else kept).append(request)
        state.asked = kept
        return out

    async def _asked_delivery(self, state: _Group, request: _Asked) -> Delivery | None:
        """A delivery of a core request, or None: no envelope (dead-lettered)."""
        message = request.message
        try:
            envelope = _unframed(message.headers, message.data)
        except SerializationError as exc:
            logger.error(
                "iambus: a request on %s is no envelope; dead-lettered: %s", state.address, exc
            )
            parked, failure = _raw_letter(message, exc, request.attempt)
            key = f"dead:{self.durable(state.address, state.group)}:r:{parked.id}"
            await self._bury(key, state.address, state.group, parked, failure)
            return None
        return _AskedDelivery(self, state, request, envelope)

    async def _hand_over(self, state: _Group, request: _Asked) -> None:
        """Put a core request into the stream: the group's consumer delivers it from there."""
        message = request.message
        try:
            envelope = _unframed(message.headers, message.data)
        except SerializationError:  # stored as it came: the consumer dead-letters it
            data, headers = message.data, dict(message.headers or {})
            headers.setdefault(MSG_ID, f"{state.address}:r:{message.sid}:{time.time_ns()}")
        else:
            data, headers = _framed(envelope), {MSG_ID: f"{state.address}:{envelope.id}"}
        try:
            if not await self._store(self.subject(state.address), data, headers):
                logger.warning("iambus: no stream to hand a request on %s to", state.address)
        except (TransportError, ImproperlyConfigured) as exc:  # the requester times out
            logger.warning("iambus: could not hand a request on %s over: %s", state.address, exc)

    def _retry_asked(self, state: _Group, request: _Asked, delay: float) -> None:
        """A core request tried again here after ``delay`` (in memory: not durable)."""
        if self._groups.get((state.address, state.group)) is not state:
            return
        later = _Asked(request.message, time.monotonic() + max(delay, 0.0), request.attempt + 1)
        if state.parked:
            self._background_task(self._hand_over(state, later))
            return
        state.asked.append(later)
        asyncio.get_running_loop().call_later(max(delay, 0.0), state.arrived.set)
        if not state.receiving:
            self._schedule_release(state)

    async def reply(self, to: str, envelope: Envelope) -> None:
        nc = self._client()
        try:
            await nc.publish(to, _framed(envelope))
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._error("publish reply", exc) from exc

    async def _on_reply(self, message: Msg) -> None:
        try:
            answer = _unframed(message.headers, message.data)
        except SerializationError as exc:
            logger.warning("iambus: a reply on %s is no envelope: %s", self.url, exc)
            return
        waiting = self._waiting.get(answer.correlation_id or "")
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)
        # else: the requester gave up (timed out); the answer has no taker

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        js = self._jetstream()
        out: list[DeadLetter] = []
        seq = 1
        while len(out) < limit:
            try:
                async with self._translate("get dead letter"):
                    raw = await js.get_msg(
                        self.dead_stream, seq, subject=self._dead_subject(), next=True
                    )
            except TransportError as exc:
                if isinstance(exc.__cause__, NotFoundError):
                    break
                raise
            if raw.seq is None:  # pragma: no cover - the server always names it
                break
            letter = _dead_letter(self.dead_stream, raw.seq, raw.headers or {}, raw.data or b"")
            if letter is not None:
                out.append(letter)
            seq = raw.seq + 1
        return out

    async def replay(self, ids: Sequence[str]) -> int:
        js = self._jetstream()
        replayed = 0
        for letter_id in ids:
            if not letter_id.isdigit():
                continue
            try:
                async with self._translate("get dead letter"):
                    raw = await js.get_msg(self.dead_stream, int(letter_id))
            except TransportError as exc:
                if isinstance(exc.__cause__, NotFoundError):
                    continue
                raise
            letter = _dead_letter(
                self.dead_stream, int(letter_id), raw.headers or {}, raw.data or b""
            )
            if letter is None:
                continue
            headers = {MSG_ID: f"replay:{letter.id}:{letter.envelope.id}", ONLY_GROUP: letter.group}
            key = letter.envelope.key
            subject = (
                self.subject(letter.address)
                if key is None  # a keyed one goes behind what its partition holds
                else self.keyed_subject(letter.address, partition(key, self.partitions))
            )
            await self._publish(subject, _framed(letter.envelope), headers)
            await self._delete_dead(int(letter_id))
            replayed += 1
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        js = self._jetstream()
        if ids is None:
            async with self._translate("purge"):
                info = await js.stream_info(self.dead_stream)
                await js.purge_stream(self.dead_stream)
            return int(info.state.messages)
        deleted = 0
        for letter_id in ids:
            if letter_id.isdigit():
                deleted += await self._delete_dead(int(letter_id))
        return deleted

    async def _delete_dead(self, seq: int) -> bool:
        try:
            async with self._translate("delete dead letter"):
                return bool(await self._jetstream().delete_msg(self.dead_stream, seq))
        except TransportError as exc:
            cause = exc.__cause__
            if isinstance(cause, APIError) and cause.err_code in _NO_MESSAGE:
                return False
            raise

    # -- registry and backlog ---------------------------------------------------------

    def _buckets(self) -> tuple[str, str]:
        """The key-value buckets of the live instances (entries expire) and of the groups."""
        return f"L_{self.namespace}", f"G_{self.namespace}"

    async def _bucket(self, name: str, ttl: float | None) -> KeyValue:
        js = self._jetstream()
        async with self._translate("open key-value bucket"):
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                pass
            config = KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.FILE)
            try:
                return await js.create_key_value(config)
            except APIError as exc:
                if exc.err_code != _STREAM_IN_USE:  # created meanwhile by another one
                    raise
                return await js.key_value(name)

    async def _entries(self, name: str, ttl: float | None) -> list[bytes]:
        """The value of every key of bucket ``name``, read message by message from its
        stream (each read a request and its answer: a watcher's end-of-data marker may
        come before the entries it pushed, and a read would miss a live instance)."""
        await self._bucket(name, ttl)
        js = self._jetstream()
        values: list[bytes] = []
        seq = 1
        while True:
            try:
                async with self._translate("read key-value bucket"):
                    raw = await js.get_msg(f"KV_{name}", seq, subject=f"$KV.{name}.>", next=True)
            except TransportError as exc:
                if isinstance(exc.__cause__, NotFoundError):
                    return values  # nothing at or after seq: the end
                raise
            if raw.seq is None:  # pragma: no cover - the server always names it
                return values
            operation = (raw.headers or {}).get("KV-Operation")
            if raw.data and operation not in ("DEL", "PURGE"):
                values.append(raw.data)
            seq = raw.seq + 1

    async def announce(self, instance: Instance) -> None:
        live, groups = self._buckets()
        bucket = await self._bucket(live, ANNOUNCE_TTL)
        async with self._translate("announce"):
            await bucket.put(_kv_key(instance.id), instance.to_json())
        known = await self._bucket(groups, None)
        for address, group in instance.consumes:
            record = json.dumps([address, group, instance.service]).encode()
            async with self._translate("announce"):
                await known.put(_kv_key(f"{address}\0{group}"), record)

    async def withdraw(self, instance: Instance) -> None:
        bucket = await self._bucket(self._buckets()[0], ANNOUNCE_TTL)
        async with self._translate("withdraw"):
            await bucket.purge(_kv_key(instance.id))

    async def instances(self) -> list[Instance]:
        live: list[Instance] = []
        for value in await self._entries(self._buckets()[0], ANNOUNCE_TTL):
            try:
                live.append(Instance.from_json(value))
            except ValueError as exc:
                logger.warning("iambus: %s: skipping a registry entry: %s", self.url, exc)
        return live

    async def groups(self) -> dict[tuple[str, str], str]:
        known: dict[tuple[str, str], str] = {}
        for value in await self._entries(self._buckets()[1], None):
            with contextlib.suppress(ValueError, TypeError):
                address, group, service = json.loads(value)
                known[(str(address), str(group))] = str(service)
        return known

    async def backlog(self, address: str, group: str) -> Backlog:
        js = self._jetstream()
        names = [self.durable(address, group)]
        names += [self.durable(address, group, n) for n in range(self.partitions)]
        waiting = in_flight = 0
        for name in names:
            try:
                async with self._translate("consumer info"):
                    info = await js.consumer_info(self.stream, name)
            except TransportError as exc:
                if isinstance(exc.__cause__, NotFoundError):
                    continue
                raise
            waiting += info.num_pending or 0
            in_flight += info.num_ack_pending or 0
        # A retry waiting out its delay (a NAK with a delay) stays ack-pending on the
        # server: it is counted in flight.
        return Backlog(waiting=waiting, in_flight=in_flight, retrying=None)

    # -- internals --------------------------------------------------------------------

    def _client(self) -> Client:
        if self._nc is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        self._client()
        assert self._js is not None
        return self._js

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._error(what, exc) from exc

    def _error(self, what: str, exc: BaseException) -> TransportError:
        if isinstance(exc, MaxPayloadError):
            limit = "" if self._nc is None else f" ({self._nc.max_payload:,} bytes)"
            return MessageRefused(
                f"{self.url}: {what} failed: the message is larger than the server's "
                f"max_payload{limit}; send a smaller one (a reference to the data, say) "
                f"or raise max_payload in the server's configuration"
            )
        return TransportError(f"{self.url}: {what} failed: {_describe(exc)}")

    async def _on_error(self, exc: Exception) -> None:
        if self._first_error is not None:  # connecting: open() reports it
            if not self._first_error.done():
                self._first_error.set_result(exc)
            return
        logger.warning("iambus: NATS connection %s: %r", self.url, exc)

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic()``) the connection has been lost, reconnecting;
        None while connected (``iambus.transports.Link``)."""
        nc = self._nc
        if nc is None or nc.is_connected:
            return None
        return self._lost if self._lost is not None else time.monotonic()

    async def _on_disconnect(self) -> None:
        if self._nc is None:  # closing
            return
        if self._lost is None:
            self._lost = time.monotonic()
        logger.warning("iambus: disconnected from %s; reconnecting", self.url)

    async def _on_reconnect(self) -> None:
        self._lost = None
        logger.info("iambus: reconnected to %s", self.url)
        # A restarted server forgot the waiting pulls (and, without its store, the
        # consumers): pull anew, and declare the groups again before their next receive.
        for pull in list(self._pulls.values()):
            self._forget(pull)
        for state in self._groups.values():
            state.check = True


class _NatsDelivery:
    __slots__ = ("_address", "_group", "_message", "_transport", "attempt", "envelope")

    def __init__(
        self,
        transport: NatsTransport,
        address: str,
        group: str,
        message: Msg,
        envelope: Envelope,
        attempt: int,
    ) -> None:
        self._transport = transport
        self._address = address
        self._group = group
        self._message = message
        self.envelope = envelope
        self.attempt = attempt

    async def ack(self) -> None:
        await self._transport._ack(self._message)

    async def retry(self, delay: float) -> None:
        await self._transport._retry(self._message, delay)

    async def dead_letter(self, failure: Failure) -> None:
        await self._transport._park(
            self._address, self._group, self._message, self.envelope, failure
        )

    def __repr__(self) -> str:
        return f"<delivery {self.envelope.name} #{self.attempt} to {self._group}@{self._address}>"


class _AskedDelivery:
    """A request that came over core NATS: nothing to ack; not redelivered if lost."""

    __slots__ = ("_request", "_state", "_transport", "attempt", "envelope", "settled")

    def __init__(
        self, transport: NatsTransport, state: _Group, request: _Asked, envelope: Envelope
    ) -> None:
        self._transport = transport
        self._state = state
        self._request = request
        self.envelope = envelope
        self.attempt = request.attempt
        self.settled = False  # (else leave() puts it into the stream)

    async def ack(self) -> None:
        self.settled = True  # core NATS keeps nothing to settle

    async def retry(self, delay: float) -> None:
        self._transport._retry_asked(self._state, self._request, delay)
        self.settled = True

    async def dead_letter(self, failure: Failure) -> None:
        state = self._state
        key = f"dead:{self._transport.durable(state.address, state.group)}:r:{self.envelope.id}"
        await self._transport._bury(key, state.address, state.group, self.envelope, failure)
        self.settled = True

    def __repr__(self) -> str:
        state = self._state
        return f"<request {self.envelope.name} #{self.attempt} to {state.group}@{state.address}>"


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _fields(envelope: Envelope) -> str:
    fields = envelope.to_fields()
    del fields["payload"]
    # ASCII JSON: one header line whatever the values hold (newlines, non-ASCII).
    return _COMPACT.encode(fields)


_HEADER_FRAME = len(b"NATS/1.0\r\n\r\n")  # a header block's first line and its end


def _framed(envelope: Envelope) -> bytes:
    """A message's body: the envelope's fields but its payload as one line of (ASCII)
    JSON, a newline, then the payload.

    In the body rather than in a header: nats-py writes and parses headers in Python,
    character by character in places; that cost showed in every round trip."""
    return b"%s\n%s" % (_fields(envelope).encode(), envelope.payload)


def _unframed(headers: dict[str, str] | None, data: bytes) -> Envelope:
    """The envelope of a message's body (``_framed``); or, as iambus wrote it before, of
    the body (the payload) and the ``Iambus-Envelope`` header (the other fields)."""
    if headers and ENVELOPE in headers:
        return _from_json(headers[ENVELOPE], data, f"{ENVELOPE} header")
    line, newline, payload = data.partition(b"\n")
    if not newline:
        raise SerializationError(
            f"no envelope: no line of JSON before the payload (nor an {ENVELOPE} header); "
            f"body {data[:80]!r}"
        )
    return _from_json(line, payload, "envelope line")


def _raw_letter(message: Msg, exc: SerializationError, attempt: int) -> tuple[Envelope, Failure]:
    """What a message that is no envelope is dead-lettered as: a well-formed envelope
    carrying the raw body and headers (listing dead letters never trips over it)."""
    parked = Envelope(
        name="?",
        payload=message.data,
        content_type="application/x-iambus-raw-message",
        headers={k: v for k, v in (message.headers or {}).items() if isinstance(v, str)},
    )
    return parked, Failure("iambus.errors.SerializationError", str(exc), "", attempt)


def _from_json(raw: str | bytes, payload: bytes, what: str) -> Envelope:
    shown = raw[:200]  # (a line of a megabyte is no message to log)
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise SerializationError(f"malformed {what} {shown!r}: {exc}") from exc
    except RecursionError as exc:  # not a ValueError: it would fail every receive
        raise SerializationError(f"malformed {what} {shown!r}: JSON nested too deep") from exc
    if not isinstance(fields, dict):
        raise SerializationError(f"malformed {what} {shown!r}: not a JSON object")
    fields["payload"] = payload
    return Envelope.from_fields(fields)


def _ack_subject(reply: str) -> tuple[str, int, int]:
    """(consumer, delivery count, stream sequence) from a message's ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>,
    # or with <domain>.<account hash> after ACK (and a random token at the end).
    tokens = reply.split(".")
    at = 3 if len(tokens) == 9 else 5
    return tokens[at], int(tokens[at + 1]), int(tokens[at + 2])


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _status(message: Msg) -> str | None:
    """The status of a pull's control message ("404", "408", ...), None for a message."""
    return _header(message, "Status")


def _header(message: Msg, name: str) -> str | None:
    return message.headers.get(name) if message.headers else None


def _kv_key(text: str) -> str:
    """A key-value bucket's key for ``text``: readable, and unique by a digest."""
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
    return f"{_NOT_IN_NAME.sub('_', text)[:60]}_{digest}"


_RECORD_MAX = 32_000  # bytes of a dead letter's record: the server refuses 64 KiB of headers


def _dead_record(address: str, group: str, failure: Failure, room: int) -> str:
    """The ``Iambus-Dead-Letter`` header: where a dead letter was going, and its failure,
    whose message and traceback are cut short to fit in a header and in the ``room``
    (bytes) its message leaves (a failure that did not fit was refused, and its message
    came back for ever instead of being parked)."""
    most = min(_RECORD_MAX, room)
    original = failure
    for cut in (None, 8_000, 1_000, 100, 0):
        if cut is not None:
            failure = dataclasses.replace(
                original,
                message=_cut_short(original.message, cut),
                # the innermost frames
                traceback=original.traceback[len(original.traceback) - cut :],
            )
        record = {
            "address": address,
            "group": group,
            "failed_at": time.time(),
            "failure": dataclasses.asdict(failure),
        }
        text = json.dumps(record, separators=(",", ":"))
        if len(text) <= most:
            break
    return text  # (still over the room: the server refuses it, MessageRefused)


def _cut_short(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    return f"{text[:keep]}... ({len(text) - keep:,} characters cut)"


def _dead_letter(
    stream: str, seq: int, headers: dict[str, str], payload: bytes
) -> DeadLetter | None:
    """The dead letter stored at ``seq``; None (logged) for a message that is none."""
    try:
        record = json.loads(headers[DEAD_LETTER])
        return DeadLetter(
            id=str(seq),
            address=str(record["address"]),
            group=str(record["group"]),
            envelope=_unframed(headers, payload),
            failure=Failure(**record["failure"]),
            failed_at=finite_time(record["failed_at"], "failed_at"),
        )
    except UNREADABLE as exc:
        logger.error(
            "iambus: dead letter %d in %s is unreadable (skipped; `nats stream rmm %s %d` "
            "deletes it): %r",
            seq,
            stream,
            stream,
            seq,
            exc,
        )
        return None


def _refused(exc: BaseException) -> bool:
    """Whether nats-py's ``exc`` says the server refused the credentials (nats-py reports
    an authorization violation as a plain error carrying the server's words)."""
    from nats.errors import AuthorizationError

    text = str(exc).lower()
    return (
        isinstance(exc, AuthorizationError)
        or "authorization violation" in text
        or ("authentication" in text and ("expired" in text or "revoked" in text))
    )
