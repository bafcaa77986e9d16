"""``NatsTransport``: NATS JetStream (``pip install 'iambus[nats]'``).

``nats://127.0.0.1:4222?namespace=shop`` — every stream and subject starts with the
namespace (default ``iambus``; letters, digits, ``_`` and ``-``). How the seam maps onto
JetStream:

* the namespace is one stream ``<ns>`` (file storage) holding the subjects ``<ns>.m.>``;
  an address is the subject ``<ns>.m.<address>``. ``send`` publishes there and returns
  once the stream acknowledged it (the PubAck). The envelope travels as the message body
  (its payload) and one header ``Iambus-Envelope`` (the other fields, as JSON);
  ``Nats-Msg-Id`` is ``<address>:<envelope id>``, so a send repeated within the stream's
  duplicate window (2 minutes) is stored once;
* a group is a durable pull consumer on that subject, named after the address and group
  (sanitized, with a hash: ``<address>__<group>_<hash>``), with explicit acks, delivering
  everything (``from_start``) or only what comes after it was declared, and
  ``ack_wait = claim_after``: a delivery its consumer neither settles nor retries within
  ``claim_after`` seconds (a crash, a ``SIGKILL``, a handler slower than that) is
  delivered again, to whichever consumer of the group asks next;
* ``receive`` takes what is there at once (a ``no_wait`` pull of up to ``limit``), and
  when nothing is, waits for one message at most ``wait`` seconds (a pull that expires
  then) and takes what followed it; the attempt is JetStream's delivery counter of the
  message for that consumer (``num_delivered``), which survives restarts;
* ``ack`` is a synchronous ack (the server confirms it, so an acked delivery is not
  redelivered); ``retry(delay)`` is a ``NAK`` with that delay, which redelivers to that
  group only; consumers have no ``max_deliver``: iambus decides when to dead-letter;
* ``dead_letter`` publishes the envelope with its failure to ``<ns>.dead``, in a stream of
  its own, ``<ns>_dead``, then acks the delivery. It is two steps: a crash in between
  leaves the delivery to be redelivered, and its dead letter is not stored twice
  (``Nats-Msg-Id``) when that happens within the duplicate window;
* a dead letter's id is its sequence in ``<ns>_dead``. ``replay`` publishes the envelope
  again to its address with the header ``Iambus-Group`` naming the group it goes to;
  the consumers of the other groups on that address ack it and skip it (a consumer has a
  single subject filter on NATS 2.9, so the replay cannot have a subject of its own
  without a second consumer per group). ``purge`` deletes dead letters by sequence;
* ``request`` publishes the request into the stream (so the owner's durable consumer
  gets it, even if it starts later) with ``reply_to`` set to an inbox of this transport
  instance, on core NATS; ``reply`` is a core NATS publish there (not durable: a reply
  nobody waits for is dropped);
* a message on an address that is no envelope is dead-lettered at once, with its raw
  headers; the rest of the batch flows. A consumer or stream that vanished (deleted, or a
  server restarted without its JetStream store) is declared again, from the start of
  what the stream holds.

The stream keeps at most ``max_length`` messages per address (``max_msgs_per_subject``,
default 1,000,000), acked or not: a group lagging further behind loses the oldest. The
connection reconnects by itself (forever); while it is down, calls fail with
``TransportError`` and the worker tries again. Driver errors surface as
``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope
from ..errors import ImproperlyConfigured, SerializationError, TransportError
from . import DeadLetter, Delivery, Failure

try:
    import nats
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.errors import Error as NatsError
    from nats.js import JetStreamContext
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
    from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("the NATS transport needs nats-py: pip install 'iambus[nats]'") from exc

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

ENVELOPE = "Iambus-Envelope"  # the envelope's fields but its payload, as JSON
ONLY_GROUP = "Iambus-Group"  # on a replayed message: the one group it is for
DEAD_LETTER = "Iambus-Dead-Letter"  # on a dead letter: address, group, failure, time
MSG_ID = "Nats-Msg-Id"

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
_BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.$|\.\.")
_NO_MESSAGE = (10037, 10057)  # "no message found" (get, delete)
_STREAM_IN_USE = 10058  # "stream name already in use" (a concurrent create)
_CONSUMER_EXISTS = (10013, 10148)  # "consumer name already in use" / "already exists"
_GRACE = 1.0  # how long past a pull's expiry to wait for the server's answer


@dataclass(slots=True, eq=False)
class _Puller:
    """One consumer's inbox for the messages its pull requests fetch."""

    inbox: str
    queue: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def put(self, message: Msg) -> None:
        self.queue.put_nowait(message)

    def leftovers(self, limit: int) -> list[Msg]:
        """What earlier pulls brought after their receive gave up (delivered to us)."""
        out: list[Msg] = []
        while len(out) < limit and not self.queue.empty():
            message = self.queue.get_nowait()
            if _status(message) is None:  # a late "no messages" or "expired" is stale
                out.append(message)
        return out


class NatsTransport:
    """NATS JetStream transport; see the module docstring."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        namespace: str | None = None,
        claim_after: float = 60.0,
        max_length: int = 1_000_000,
        timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.namespace = namespace or query.pop("namespace", None) or "iambus"
        query.pop("namespace", None)
        if not _NAME.fullmatch(self.namespace):
            raise ImproperlyConfigured(
                f"a NATS namespace is letters, digits, '_' and '-' only: {self.namespace!r}"
            )
        self._driver_url = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = url
        self.claim_after = claim_after
        self.max_length = max_length
        self.timeout = timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        self._pullers: dict[tuple[str, str, str], _Puller] = {}
        self._declared: dict[tuple[str, str], bool] = {}
        self._streams_ready = False

    # -- names ------------------------------------------------------------------------

    @property
    def stream(self) -> str:
        return self.namespace

    @property
    def dead_stream(self) -> str:
        return f"{self.namespace}_dead"

    def subject(self, address: str) -> str:
        if not address or _BAD_SUBJECT.search(address):
            raise ImproperlyConfigured(
                f"{address!r} cannot be a NATS subject: no spaces, '*', '>' or empty tokens"
            )
        return f"{self.namespace}.m.{address}"

    def _dead_subject(self) -> str:
        return f"{self.namespace}.dead"

    @staticmethod
    def durable(address: str, group: str) -> str:
        """The durable consumer's name of ``group`` on ``address``."""
        digest = hashlib.sha1(f"{address}\0{group}".encode(), usedforsecurity=False)
        readable = _NOT_IN_NAME.sub("_", f"{address}__{group}")[:80]
        return f"{readable}_{digest.hexdigest()[:12]}"

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._nc is not None:
            return
        try:
            # nats-py retries the first connection too when reconnecting forever: bound it.
            async with asyncio.timeout(self.timeout):
                nc = await nats.connect(
                    servers=[self._driver_url],
                    name=f"iambus:{self.namespace}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=min(self.timeout, 2.0),
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
        except (NatsError, OSError, TimeoutError) as exc:
            raise TransportError(f"{self.url}: connect failed: {_describe(exc)}") from exc
        self._nc, self._js = nc, nc.jetstream(timeout=self.timeout)
        self._inbox = nc.new_inbox()
        async with self._translate("subscribe for replies"):
            await nc.subscribe(self._inbox, cb=self._on_reply)
            await self._ensure_streams()

    async def close(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransportError(f"{self.url}: closed while waiting"))
        nc, self._nc, self._js = self._nc, None, None
        self._pullers.clear()
        self._declared.clear()
        self._streams_ready = False
        if nc is not None:
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.flush(timeout=1)  # acks and replies published but not yet sent
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()

    async def destroy(self) -> int:
        """Delete this namespace's streams (tests, tear-downs). Returns how many."""
        js = self._jetstream()
        deleted = 0
        for name in (self.stream, self.dead_stream):
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
        for name, subject in (
            (self.stream, f"{self.namespace}.m.>"),
            (self.dead_stream, self._dead_subject()),
        ):
            async with self._translate("create stream"):
                try:
                    await js.stream_info(name)
                    continue
                except NotFoundError:
                    pass
                config = StreamConfig(
                    name=name,
                    subjects=[subject],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    max_msgs_per_subject=self.max_length if name == self.stream else -1,
                    duplicate_window=120.0,
                )
                try:
                    await js.add_stream(config)
                except APIError as exc:
                    if exc.err_code != _STREAM_IN_USE:  # created meanwhile by another one
                        raise
        self._streams_ready = True

    # -- sending and receiving --------------------------------------------------------

    async def send(self, address: str, envelope: Envelope) -> None:
        headers = {MSG_ID: f"{address}:{envelope.id}", ENVELOPE: _fields(envelope)}
        await self._publish(self.subject(address), envelope.payload, headers)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        js = self._jetstream()
        try:
            async with self._translate("publish"):
                await js.publish(subject, payload, headers=headers)
        except TransportError as exc:
            if not isinstance(exc.__cause__, NoStreamResponseError):
                raise
            # No stream takes the subject: it was deleted, or the server restarted
            # without its store. Create it again and publish once more.
            logger.warning("iambus: stream %s on %s was lost; creating it", self.stream, self.url)
            await self._ensure_streams()
            async with self._translate("publish"):
                await js.publish(subject, payload, headers=headers)

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        js = self._jetstream()
        if not self._streams_ready:
            await self._ensure_streams()
        durable = self.durable(address, group)
        async with self._translate("create consumer"):
            try:
                await js.consumer_info(self.stream, durable)
            except NotFoundError:
                config = ConsumerConfig(
                    durable_name=durable,
                    filter_subject=self.subject(address),
                    deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.claim_after,
                    max_deliver=-1,
                    # Messages waiting out a retry's delay count as pending acks: with the
                    # server's default cap (1,000) a burst of retries would freeze the group.
                    max_ack_pending=-1,
                )
                try:
                    await js.add_consumer(self.stream, config)
                except APIError as exc:
                    if exc.err_code not in _CONSUMER_EXISTS:  # created meanwhile
                        raise
        self._declared[address, group] = from_start

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        puller = await self._puller(address, group, consumer)
        deadline = time.monotonic() + max(wait, 0.0)
        async with puller.lock:
            while True:
                messages = await self._pull(address, group, puller, limit, deadline)
                out: list[Delivery] = []
                for message in messages:
                    delivery = await self._delivery(address, group, message)
                    if delivery is not None:
                        out.append(delivery)
                if out or time.monotonic() >= deadline:
                    return out

    async def _puller(self, address: str, group: str, consumer: str) -> _Puller:
        nc = self._client()
        puller = self._pullers.get((address, group, consumer))
        if puller is None:
            puller = _Puller(nc.new_inbox())
            async with self._translate("subscribe"):
                await nc.subscribe(puller.inbox, cb=puller.put)
            self._pullers[address, group, consumer] = puller
        return puller

    async def _pull(
        self, address: str, group: str, puller: _Puller, limit: int, deadline: float
    ) -> list[Msg]:
        messages = puller.leftovers(limit)
        if len(messages) < limit:
            messages += await self._request(address, group, puller, limit - len(messages), 0)
        remaining = deadline - time.monotonic()
        if not messages and remaining > 0.001:
            # Nothing there: wait for one message (a pull for one is done when it comes,
            # so none is left over), then take what else came with it.
            messages = await self._request(address, group, puller, 1, remaining)
            if messages and limit > 1:
                messages += await self._request(address, group, puller, limit - 1, 0)
        return messages

    async def _request(
        self, address: str, group: str, puller: _Puller, batch: int, expires: float
    ) -> list[Msg]:
        nc = self._client()
        request: dict[str, Any] = {"batch": batch}
        if expires > 0:
            request["expires"] = int(expires * 1e9)
        else:
            request["no_wait"] = True
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable(address, group)}"
        async with self._translate("pull"):
            await nc.publish(subject, json.dumps(request).encode(), reply=puller.inbox)
        give_up = time.monotonic() + expires + _GRACE
        out: list[Msg] = []
        while len(out) < batch:
            try:
                async with asyncio.timeout(give_up - time.monotonic()):
                    message = await puller.queue.get()
            except TimeoutError:
                # No answer at all, not even "no messages": is the consumer gone?
                await self._redeclare(address, group)
                break
            status = _status(message)
            if status is None:
                out.append(message)
            elif status == "409":
                # e.g. "Consumer Deleted", "Exceeded MaxWaiting": this request is over.
                logger.debug("iambus: pull on %s/%s: %s", address, group, message.headers)
                break
            elif status != "100":  # 404 no messages, 408 expired; 100 is a heartbeat
                break
        return out

    async def _redeclare(self, address: str, group: str) -> None:
        js = self._jetstream()
        async with self._translate("consumer info"):
            try:
                await js.consumer_info(self.stream, self.durable(address, group))
                return  # it is there; the server was slow
            except NotFoundError:
                pass
        logger.warning("iambus: consumer of %s on %s was lost; declaring it again", group, address)
        self._streams_ready = False
        await self.declare(address, group, from_start=True)

    async def _delivery(self, address: str, group: str, message: Msg) -> Delivery | None:
        """A delivery, or None: a replay for another group (acked), or no envelope (parked)."""
        headers = message.headers or {}
        only = headers.get(ONLY_GROUP)
        if only is not None and only != group:
            await self._ack(message)
            return None
        try:
            envelope = _envelope(headers, message.data)
        except SerializationError as exc:
            logger.error("iambus: a message on %s is no envelope; dead-lettered: %s", address, exc)
            # Parked as a well-formed envelope carrying the raw message, so that listing
            # the dead letters never trips over it.
            parked = Envelope(
                name="?",
                payload=message.data,
                content_type="application/x-iambus-raw-message",
                headers={k: v for k, v in headers.items() if isinstance(v, str)},
            )
            failure = Failure("iambus.errors.SerializationError", str(exc), "", _attempt(message))
            await self._park(address, group, message, parked, failure)
            return None
        return _NatsDelivery(self, address, group, message, envelope)

    # -- settling (called by deliveries) ----------------------------------------------

    async def _ack(self, message: Msg) -> None:
        async with self._translate("ack"):
            await message.ack_sync(timeout=self.timeout)

    async def _retry(self, message: Msg, delay: float) -> None:
        async with self._translate("nak"):
            await message.nak(delay=max(delay, 0.0) or None)

    async def _park(
        self, address: str, group: str, message: Msg, envelope: Envelope, failure: Failure
    ) -> None:
        record = {
            "address": address,
            "group": group,
            "failed_at": time.time(),
            "failure": dataclasses.asdict(failure),
        }
        headers = {
            # The same delivery parked twice (the ack below failed) is stored once.
            MSG_ID: f"dead:{self.durable(address, group)}:{message.metadata.sequence.stream}",
            ENVELOPE: _fields(envelope),
            DEAD_LETTER: json.dumps(record, separators=(",", ":")),
        }
        await self._publish(self._dead_subject(), envelope.payload, headers)
        await self._ack(message)

    # -- request/reply --------------------------------------------------------------

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._client()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting[envelope.id] = future
        try:
            await self.send(address, dataclasses.replace(envelope, reply_to=self._inbox))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(envelope.id, None)

    async def reply(self, to: str, envelope: Envelope) -> None:
        nc = self._client()
        async with self._translate("publish reply"):
            await nc.publish(to, envelope.payload, headers={ENVELOPE: _fields(envelope)})

    async def _on_reply(self, message: Msg) -> None:
        try:
            answer = _envelope(message.headers or {}, message.data)
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
            out.append(_dead_letter(raw.seq, raw.headers or {}, raw.data or b""))
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
            letter = _dead_letter(int(letter_id), raw.headers or {}, raw.data or b"")
            headers = {
                MSG_ID: f"replay:{letter.id}:{letter.envelope.id}",
                ENVELOPE: _fields(letter.envelope),
                ONLY_GROUP: letter.group,
            }
            await self._publish(self.subject(letter.address), letter.envelope.payload, headers)
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
            raise TransportError(f"{self.url}: {what} failed: {_describe(exc)}") from exc

    async def _on_error(self, exc: Exception) -> None:
        logger.warning("iambus: NATS connection %s: %r", self.url, exc)

    async def _on_disconnect(self) -> None:
        if self._nc is None:  # closing
            return
        logger.warning("iambus: disconnected from %s; reconnecting", self.url)

    async def _on_reconnect(self) -> None:
        logger.info("iambus: reconnected to %s", self.url)


class _NatsDelivery:
    __slots__ = ("_address", "_group", "_message", "_transport", "attempt", "envelope")

    def __init__(
        self,
        transport: NatsTransport,
        address: str,
        group: str,
        message: Msg,
        envelope: Envelope,
    ) -> None:
        self._transport = transport
        self._address = address
        self._group = group
        self._message = message
        self.envelope = envelope
        self.attempt = _attempt(message)

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


def _fields(envelope: Envelope) -> str:
    fields = envelope.to_fields()
    del fields["payload"]
    # ASCII JSON: one header line whatever the values hold (newlines, non-ASCII).
    return json.dumps(fields, separators=(",", ":"))


def _envelope(headers: dict[str, str], payload: bytes) -> Envelope:
    raw = headers.get(ENVELOPE)
    if raw is None:
        raise SerializationError(f"no {ENVELOPE} header; headers: {headers!r}")
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise SerializationError(f"malformed {ENVELOPE} header {raw!r}: {exc}") from exc
    if not isinstance(fields, dict):
        raise SerializationError(f"malformed {ENVELOPE} header {raw!r}: not a JSON object")
    fields["payload"] = payload
    return Envelope.from_fields(fields)


def _attempt(message: Msg) -> int:
    return int(message.metadata.num_delivered or 1)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _status(message: Msg) -> str | None:
    """The status of a pull's control message ("404", "408", ...), None for a message."""
    return message.headers.get("Status") if message.headers else None


def _dead_letter(seq: int, headers: dict[str, str], payload: bytes) -> DeadLetter:
    record = json.loads(headers[DEAD_LETTER])
    return DeadLetter(
        id=str(seq),
        address=record["address"],
        group=record["group"],
        envelope=_envelope(headers, payload),
        failure=Failure(**record["failure"]),
        failed_at=float(record["failed_at"]),
    )
