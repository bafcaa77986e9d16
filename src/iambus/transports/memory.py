"""``MemoryTransport``: a real transport in one process, and the embedded default.

It keeps the semantics of a broker — groups, competing consumers, acks, delayed retries
to one group, attempts counted per group, reclaiming of deliveries a consumer stopped
acking, dead letters, request/reply — in memory. Several dispatchers ("services") can
share one instance, and ``await transport.join()`` returns once every envelope sent
between them has been settled (acked or dead-lettered), which makes multi-service tests
deterministic without a broker.

Envelopes with a ``key`` are ordered per key and group: at most one of a key is out at a
time (unsettled or waiting out its retry's delay); the ones behind it wait, in order, and
other keys are not held up (see ``iambus.partitions``).

It keeps a registry of the workers announced on it (see ``iambus.transports.Registry``)
and counts each group's backlog, as the brokers do.

It is not durable: a process crash loses everything in it. Entries every declared group
has received are dropped; an address nobody has declared a group on keeps its last
``max_length`` entries (a group declared later with ``from_start=True`` sees those).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..envelope import Envelope, new_id
from ..errors import ImproperlyConfigured, TransportError, check_count, check_seconds
from . import ANNOUNCE_TTL, Backlog, Capability, DeadLetter, Delivery, Failure, Instance, Transport

__all__ = ["MemoryTransport"]

_REPLY = "memory-reply:"


@dataclass(slots=True, eq=False)
class _Pending:
    envelope: Envelope
    consumer: str | None  # None: waiting for a retry that is due at ``due``
    delivered_at: float
    count: int
    due: float = 0.0


@dataclass(slots=True, eq=False)
class _Group:
    cursor: int  # the stream position of the next new entry for this group
    pending: dict[int, _Pending] = field(default_factory=dict)
    direct: deque[Envelope] = field(default_factory=deque)  # replayed to this group only
    # Keyed envelopes waiting for an earlier one of their key to be settled, per key.
    held: dict[str, deque[Envelope]] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Stream:
    entries: deque[Envelope] = field(default_factory=deque)
    first: int = 0  # stream position of entries[0]
    groups: dict[str, _Group] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.first + len(self.entries)


class MemoryTransport(Transport):
    """In-process transport with broker semantics; see the module docstring."""

    capabilities = (
        Capability.RECLAIM | Capability.KEY_ORDER | Capability.DELAYED_RETRY | Capability.SEND_ORDER
    )

    def __init__(
        self, url: str = "memory://", *, claim_after: float = 30.0, max_length: int = 10_000
    ) -> None:
        self.url = url
        self.claim_after = check_seconds("claim_after", claim_after)
        self.max_length = check_count("max_length", max_length)
        self._streams: dict[str, _Stream] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._replies: dict[str, asyncio.Future[Envelope]] = {}
        self._tokens = 0
        self._closed = False
        self._changed: asyncio.Condition | None = None
        self._live: dict[str, tuple[Instance, float]] = {}  # id -> (instance, live until)
        self._known: dict[tuple[str, str], str] = {}  # (address, group) -> service

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for future in self._replies.values():
            if not future.done():
                future.set_exception(TransportError(f"{self.url}: closed while waiting"))
        await self._notify()

    # -- sending and receiving --------------------------------------------------------

    async def send(self, address: str, envelope: Envelope) -> None:
        self._check_open()
        stream = self._streams.setdefault(address, _Stream())
        stream.entries.append(envelope)
        self._trim(stream)
        await self._notify()

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        self._check_open()
        stream = self._streams.setdefault(address, _Stream())
        if group not in stream.groups:
            stream.groups[group] = _Group(cursor=stream.first if from_start else stream.end)

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        self._check_open()
        stream = self._streams.get(address)
        if stream is None or group not in stream.groups:
            raise ImproperlyConfigured(
                f"{self.url}: no group {group!r} on {address!r}; declare() it before receiving"
            )
        state = stream.groups[group]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            out = self._take(stream, state, address, group, consumer, limit)
            if out or self._closed:
                return out
            now = loop.time()
            if now >= deadline:
                return out
            # Wake up on any change, or when the next retry or reclaim comes due.
            wake = deadline
            for pending in state.pending.values():
                wake = min(
                    wake,
                    pending.due
                    if pending.consumer is None
                    else pending.delivered_at + self.claim_after,
                )
            condition = self._condition()
            async with condition:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(condition.wait(), max(wake - now, 0.0))

    def _take(
        self,
        stream: _Stream,
        state: _Group,
        address: str,
        group: str,
        consumer: str,
        limit: int,
    ) -> list[Delivery]:
        now = asyncio.get_running_loop().time()
        out: list[Delivery] = []
        for token, pending in state.pending.items():
            if len(out) >= limit:
                break
            retry_due = pending.consumer is None and pending.due <= now
            abandoned = (
                pending.consumer is not None and now - pending.delivered_at >= self.claim_after
            )
            if retry_due or abandoned:
                pending.consumer, pending.delivered_at, pending.due = consumer, now, 0.0
                pending.count += 1
                out.append(_MemoryDelivery(self, address, group, token, pending))
        # A key has at most one envelope out (pending or waiting for its retry); the
        # ones behind it wait in ``held``, in order.
        busy = {p.envelope.key for p in state.pending.values() if p.envelope.key is not None}
        for held in list(state.held):
            if len(out) >= limit:
                break
            if held not in busy:
                queue = state.held[held]
                out.append(self._deliver(address, group, state, queue.popleft(), consumer))
                busy.add(held)
                if not queue:
                    del state.held[held]
        while len(out) < limit and (state.direct or state.cursor < stream.end):
            if state.direct:
                envelope = state.direct.popleft()
            else:
                envelope = stream.entries[state.cursor - stream.first]
                state.cursor += 1
            key = envelope.key
            if key is not None and (key in busy or key in state.held):
                state.held.setdefault(key, deque()).append(envelope)
                continue
            if key is not None:
                busy.add(key)
            out.append(self._deliver(address, group, state, envelope, consumer))
        if out:
            self._trim(stream)
        return out

    def _deliver(
        self, address: str, group: str, state: _Group, envelope: Envelope, consumer: str
    ) -> _MemoryDelivery:
        self._tokens += 1
        pending = _Pending(envelope, consumer, asyncio.get_running_loop().time(), 1)
        state.pending[self._tokens] = pending
        return _MemoryDelivery(self, address, group, self._tokens, pending)

    def _trim(self, stream: _Stream) -> None:
        if stream.groups:
            # Drop what every group has received (unacked ones live in ``pending``).
            done = min(g.cursor for g in stream.groups.values())
            while stream.first < done and stream.entries:
                stream.entries.popleft()
                stream.first += 1
        else:
            while len(stream.entries) > self.max_length:
                stream.entries.popleft()
                stream.first += 1

    # -- settling (called by deliveries) ----------------------------------------------

    async def _settle(self, address: str, group: str, token: int) -> _Pending | None:
        pending = self._streams[address].groups[group].pending.pop(token, None)
        await self._notify()
        return pending

    async def _retry(self, address: str, group: str, token: int, delay: float) -> None:
        pending = self._streams[address].groups[group].pending.get(token)
        if pending is not None:
            pending.consumer = None
            pending.due = asyncio.get_running_loop().time() + max(delay, 0.0)
        await self._notify()

    async def _park(self, address: str, group: str, token: int, failure: Failure) -> None:
        pending = self._streams[address].groups[group].pending.pop(token, None)
        if pending is not None:
            letter = DeadLetter(new_id(), address, group, pending.envelope, failure, time.time())
            self._dead[letter.id] = letter
        await self._notify()

    async def leave(self, consumer: str) -> None:
        """Give back what ``consumer`` holds: each unsettled delivery goes to the group's
        next receive at once (attempt + 1), and its key with it."""
        now = asyncio.get_running_loop().time()
        for stream in self._streams.values():
            for state in stream.groups.values():
                for pending in state.pending.values():
                    if pending.consumer == consumer:
                        pending.consumer, pending.due = None, now
        await self._notify()

    # -- request/reply --------------------------------------------------------------

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._check_open()
        key = _REPLY + envelope.id
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        try:
            await self.send(address, dataclasses.replace(envelope, reply_to=key))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            del self._replies[key]

    async def reply(self, to: str, envelope: Envelope) -> None:
        future = self._replies.get(to)
        if future is not None and not future.done():
            future.set_result(envelope)
        # else: the requester gave up (timed out) or is gone; the answer has no taker

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        return list(self._dead.values())[:limit]

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        return dict(Counter((letter.address, letter.group) for letter in self._dead.values()))

    async def replay(self, ids: Sequence[str]) -> int:
        replayed = 0
        for letter_id in ids:
            letter = self._dead.pop(letter_id, None)
            if letter is None:
                continue
            stream = self._streams.setdefault(letter.address, _Stream())
            state = stream.groups.setdefault(letter.group, _Group(cursor=stream.end))
            state.direct.append(letter.envelope)
            replayed += 1
        await self._notify()
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        if ids is None:
            count = len(self._dead)
            self._dead.clear()
            return count
        return sum(self._dead.pop(letter_id, None) is not None for letter_id in ids)

    # -- registry and backlog ---------------------------------------------------------

    async def announce(self, instance: Instance) -> None:
        self._live[instance.id] = (instance, time.monotonic() + ANNOUNCE_TTL)
        for consumed in instance.consumes:
            self._known[consumed] = instance.service

    async def withdraw(self, instance: Instance) -> None:
        self._live.pop(instance.id, None)

    async def instances(self) -> list[Instance]:
        now = time.monotonic()
        for gone in [key for key, (_, until) in self._live.items() if until <= now]:
            del self._live[gone]
        return [instance for instance, _ in self._live.values()]

    async def groups(self) -> dict[tuple[str, str], str]:
        return dict(self._known)

    async def backlog(self, address: str, group: str) -> Backlog:
        stream = self._streams.get(address)
        state = None if stream is None else stream.groups.get(group)
        if stream is None or state is None:
            return Backlog(waiting=0, in_flight=0, retrying=0)
        retrying = sum(p.consumer is None for p in state.pending.values())
        return Backlog(
            waiting=(stream.end - state.cursor)
            + len(state.direct)
            + sum(map(len, state.held.values())),
            in_flight=len(state.pending) - retrying,
            retrying=retrying,
        )

    # -- waiting for quiet ------------------------------------------------------------

    def unsettled(self) -> int:
        """Envelopes sent to a group and not yet acked or dead-lettered."""
        return sum(
            (stream.end - state.cursor)
            + len(state.pending)
            + len(state.direct)
            + sum(map(len, state.held.values()))
            for stream in self._streams.values()
            for state in stream.groups.values()
        )

    async def join(self) -> None:
        """Return once every envelope delivered to a group has been settled."""
        condition = self._condition()
        async with condition:
            await condition.wait_for(lambda: self.unsettled() == 0 or self._closed)

    # -- internals --------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{self.url} is closed; open() it again to use it")


class _MemoryDelivery:
    __slots__ = ("_address", "_group", "_pending", "_token", "_transport", "attempt", "envelope")

    def __init__(
        self, transport: MemoryTransport, address: str, group: str, token: int, pending: _Pending
    ) -> None:
        self._transport = transport
        self._address = address
        self._group = group
        self._token = token
        self._pending = pending
        self.envelope = pending.envelope
        self.attempt = pending.count

    async def ack(self) -> None:
        await self._transport._settle(self._address, self._group, self._token)

    async def retry(self, delay: float) -> None:
        await self._transport._retry(self._address, self._group, self._token, delay)

    async def dead_letter(self, failure: Failure) -> None:
        await self._transport._park(self._address, self._group, self._token, failure)

    def __repr__(self) -> str:
        return f"<delivery {self.envelope.name} #{self.attempt} to {self._group}@{self._address}>"
