"""The sending side of a dispatcher with a transport.

Routed messages (see ``routing``) are encoded into an ``Envelope`` and handed to the
transport. Envelopes inherit their correlation id from the message being handled (the
*conversation*), and carry the id of that message as their causation id, so a chain of
messages can be traced across services.

Where the handler runs never changes what the caller sees: a routed command or query is
a request. ``await dp.execute(cmd)`` and ``await dp.query(q, timeout=2)`` wait for the
owner's answer and decode it into the ``R`` of ``Command[R]`` / ``Query[R]``; a failure
over there is raised here as ``RemoteError``, no answer in time as ``RequestTimeout``.
``await dp.send(msg)`` hands a command or an event to the transport and returns once the
broker has it, without waiting for a handler.

When the transport keeps a registry of the live worker instances (every iambus transport
does), a ``RequestTimeout`` says what it found there: no live instance of the owner, or
live instances none of which handles the message (and what they do handle). The first
send of each routed command and event looks there too, in the background, and logs a
warning once when its owner runs but none of its instances handles the command, or
when no handler ever subscribed to the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .codecs import Codec
from .engine import followups
from .envelope import Envelope, current_envelope, new_id
from .errors import (
    DispatcherStopped,
    RemoteError,
    RequestTimeout,
    SerializationError,
    TransportError,
    WouldDeadlock,
    check_seconds,
)
from .handlers import Kind
from .messages import MessageKey, MessageRegistry, describe, message_key, result_type
from .middleware import Context
from .routing import Routes, address
from .telemetry import Operation, Sending, Telemetry, system_of
from .transports import (
    Instance,
    Registry,
    Transport,
    check_requester,
    client_name,
    connect,
    redact,
    resolve,
)
from .unit_of_work import UnitOfWork, unit_of

__all__ = ["Remote", "RemoteRoute", "current_envelope"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

LOOKUP_TIMEOUT = 2.0  # seconds a look in the registry may take
# A RequestTimeout words its cause from the registry, but keeps the caller's deadline: a
# request still unanswered halfway to its timeout (at most LOOKUP_TIMEOUT before it) starts
# reading the registry, and once the timeout passed the error waits at most LATE_LOOKUP
# (or a quarter of the timeout, if less) more for that read.
LATE_LOOKUP = 0.1


STATUS, ERROR_TYPE = "iambus-status", "iambus-error-type"
SENDER = "iambus-sender"  # "<service>@<host>" of a request: who asks, and on which clock


class Remote:
    """A dispatcher's link to its transport: encodes, sends, requests, decodes."""

    def __init__(
        self,
        transport: Transport | str,
        *,
        service: str | None,
        routes: Routes,
        codec: Codec,
        request_timeout: float,
        owned: bool,
    ) -> None:
        # What the dispatcher was given: a transport, or the URL of one. A URL is checked
        # now and made into its transport on first use, so that building a dispatcher
        # imports no broker driver: `iambus worker --transport` replaces it before that.
        self.source = transport
        self._transport = None if isinstance(transport, str) else transport
        if isinstance(transport, str):
            resolve(transport)
        # A transport made from a URL is ours to close; one passed in (maybe shared by
        # several dispatchers) is closed by whoever made it.
        self.owned = owned
        self.service = service
        self.routes = routes
        self.codec = codec
        self.request_timeout = request_timeout
        self.registry = MessageRegistry()
        self.sender = f"{service or ''}@{socket.gethostname()}"
        self._opened = False
        self._closing = False  # close() under way: nothing may open the transport again
        self._opening: asyncio.Lock | None = None
        self._checked: set[str] = set()  # addresses sent to whose handlers were looked up
        self._checks: set[asyncio.Task[None]] = set()
        self._census: asyncio.Future[list[Instance] | None] | None = None  # a read under way
        self._recent: tuple[float, list[Instance] | None] | None = None  # (when, last read)
        self.telemetry: Telemetry | None = None  # observers (Dispatcher.instrument)

    @property
    def transport(self) -> Transport:
        """The transport; one given as a URL is made (its driver imported) on first use."""
        if self._transport is None:
            assert isinstance(self.source, str)
            self._transport = connect(self.source)
        return self._transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        self.source = self._transport = transport

    async def open(self) -> None:
        if self._opened:
            return
        if self._closing:
            raise DispatcherStopped(
                f"the transport {redact(self.transport.url)} is being closed (the dispatcher "
                f"stops): nothing more is sent through it; send before dp.stop(), or start "
                f"the dispatcher again once stopped"
            )
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if not self._opened:
                transport = self.transport
                if transport.client_name is None:
                    # A broker transport not named yet: its connections carry our service.
                    transport.client_name = client_name(self.service)
                await transport.open()
                self._opened = True

    async def close(self) -> None:
        # Closing from the first line: a send meanwhile must not open the transport again.
        opened, self._opened, self._closing = self._opened, False, True
        try:
            pending: list[asyncio.Future[Any]] = [*self._checks]
            if self._census is not None:
                pending.append(self._census)  # a request reading it gets None (see _live)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if opened and self.owned:
                await self.transport.close()
        finally:
            self._closing = False

    # -- envelopes --------------------------------------------------------------------

    def envelope(
        self, message: Any, key: str | None, *, id: str | None = None, **fields: Any
    ) -> Envelope:
        name = self.registry.name_of(message_key(message))
        parent = current_envelope.get()
        envelope_id = new_id() if id is None else id
        # A message sent while none is handled starts a conversation of its own.
        correlation_id = (parent.correlation_id or parent.id) if parent else envelope_id
        causation_id = parent.id if parent is not None else None
        if not fields:  # every send: positional, in the fields' order (~0.4 µs less)
            return Envelope(
                name,
                self.codec.encode(message),
                self.codec.content_type,
                envelope_id,
                correlation_id,
                causation_id,
                time.time(),
                None,
                key,
                {},
            )
        return Envelope(
            id=envelope_id,
            name=name,
            payload=self.codec.encode(message),
            content_type=self.codec.content_type,
            key=key,
            correlation_id=correlation_id,
            causation_id=causation_id,
            **fields,
        )

    def decode(self, envelope: Envelope, into: Any) -> Any:
        return self.codec.decode(envelope.payload, into, name=envelope.name)

    # -- sending ----------------------------------------------------------------------

    async def send(self, kind: Kind, message: Any, key: str | None, id: str | None = None) -> None:
        unit = unit_of(self)
        if unit is not None:
            # In a unit of work: an outbox row, sent by the relay once committed.
            envelope = self.envelope(message, key, id=id)
            if self.telemetry is not None:
                to = address(kind, envelope.name)
                with self.telemetry.send(self.sending("create", kind, to, envelope)) as envelope:
                    unit.send(to, envelope)
                return
            unit.send(address(kind, envelope.name), envelope)
            return
        if not self._opened:
            await self.open()
        envelope = self.envelope(message, key, id=id)
        to = address(kind, envelope.name)
        if self.telemetry is None:
            await self.transport.send(to, envelope)
        else:
            with self.telemetry.send(self.sending("send", kind, to, envelope)) as envelope:
                await self.transport.send(to, envelope)
        if to not in self._checked:
            self._checked.add(to)
            owner = self.routes.owner(message_key(message)) if kind == "command" else None
            check = asyncio.get_running_loop().create_task(self._check(to, owner))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def send_envelope(self, kind: Kind, envelope: Envelope) -> None:
        """Send a ready envelope as it is: a resend keeps its id (see ``Dispatcher.send``)."""
        unit = unit_of(self)
        to = address(kind, envelope.name)
        if self.telemetry is not None:
            operation: Operation = "send" if unit is None else "create"
            with self.telemetry.send(self.sending(operation, kind, to, envelope)) as envelope:
                await self._hand_over(unit, to, envelope)
        else:
            await self._hand_over(unit, to, envelope)

    async def _hand_over(self, unit: UnitOfWork | None, to: str, envelope: Envelope) -> None:
        if unit is not None:
            unit.send(to, envelope)
            return
        if not self._opened:
            await self.open()
        await self.transport.send(to, envelope)

    def sending(self, operation: Operation, kind: str, to: str, envelope: Envelope) -> Sending:
        """What the telemetry's ``send`` hook is told of a message about to leave."""
        reply = operation == "reply"
        return Sending(
            operation,
            system_of(self.transport.url),
            kind,
            None if reply else to,
            to,
            envelope,
        )

    async def request(
        self, kind: Kind, message: Any, key: str | None, timeout: float | None
    ) -> Any:
        """Send a command or query to its owner; return the answer, or raise its error."""
        if kind == "command" and unit_of(self) is not None:
            raise WouldDeadlock(
                f"execute({describe(message_key(message))}) inside a unit of work waits for "
                f"an answer to a command that is only sent once the unit commits; send it "
                f"with dp.send() (it goes to the outbox), or execute it after the unit"
            )
        timeout = (
            self.request_timeout
            if timeout is None
            else check_seconds("timeout", timeout)  # before anything is sent
        )
        if not self._opened:
            await self.open()
        mkey = message_key(message)
        # A query nobody answers in time is skipped by its owner; a late command is still
        # carried out (it is durable, and maybe sent on purpose to a service that is down).
        headers = {SENDER: self.sender}
        if kind == "query":
            headers["deadline"] = repr(time.time() + timeout)
        envelope = self.envelope(message, key, headers=headers)
        # Asked from a worker's delivery of this very service: the worker slot it holds is
        # lent while it waits, or no slot could be left to answer it (see ``worker``).
        delivery = followups.get() if self.routes.owner(mkey) == self.service else None
        ahead = min(LOOKUP_TIMEOUT, timeout / 2)
        look = asyncio.get_running_loop().call_later(timeout - ahead, self._look_ahead)
        to = address(kind, envelope.name)
        try:
            async with contextlib.nullcontext() if delivery is None else delivery.lend():
                if self.telemetry is None:
                    answer = await check_requester(self.transport).request(
                        to, envelope, timeout=timeout
                    )
                else:
                    sending = self.sending("request", kind, to, envelope)
                    with self.telemetry.send(sending) as envelope:
                        answer = await check_requester(self.transport).request(
                            to, envelope, timeout=timeout
                        )
        except TimeoutError as exc:
            if isinstance(exc, TransportError):
                raise
            owner = self.routes.owner(mkey)
            try:
                async with asyncio.timeout(min(LATE_LOOKUP, timeout / 4)):
                    found = await self.handlers_of(to, owner, fresh=ahead + LATE_LOOKUP)
            except TimeoutError:
                found = None  # the registry is slow: the caller's deadline comes first
            if found is None:
                why = f"is a worker of {owner!r} running?"
            elif found[0]:
                why = f"{found[1]}: busy, or is the handler slower than the timeout?"
            else:
                why = found[1]
            later = (
                ""
                if kind == "query"
                else " The command stays with the broker and may still be carried out: wait "
                "longer (execute(..., timeout=...)), or dp.send() it to hand it over "
                "without waiting."
            )
            raise RequestTimeout(
                f"no answer to {envelope.name} from service {owner!r} within {timeout}s; "
                f"{why}{later}"
            ) from exc
        finally:
            look.cancel()
        if answer.headers.get(STATUS) == "error":
            owner = self.routes.owner(mkey)
            details = json.loads(answer.payload)
            attempts = details.get("attempts")
            tried = "" if attempts is None else f" after {attempts} attempt(s), dead-lettered"
            raise RemoteError(
                f"{envelope.name} failed in service {owner!r}{tried}: "
                f"{details['type']}: {details['message']}",
                error_type=details["type"],
                remote_message=details["message"],
            )
        into = result_type(mkey)
        if into is None or into is type(None):
            # Command[None]: nothing to return, even if the handler returned an event (to
            # publish it) or some value the caller declared it does not want.
            return None
        try:
            return self.codec.decode(answer.payload, into, name=f"{envelope.name} result")
        except SerializationError as exc:
            if kind == "query":
                raise
            owner = self.routes.owner(mkey)
            raise SerializationError(
                f"{envelope.name} was carried out by service {owner!r}, but its result does "
                f"not decode as declared: {exc}; make the R of Command[R] the type its "
                f"handler returns"
            ) from exc

    # -- who handles what (the transport's registry) -----------------------------------

    async def handlers_of(
        self, to: str, owner: str | None, *, fresh: float = 0.0
    ) -> tuple[bool, str] | None:
        """Whether a live instance handles address ``to`` (of service ``owner``; None: of
        any service, an event), and a sentence saying what the registry shows. None when
        the transport keeps no registry or it could not be read. A read that ended at
        most ``fresh`` seconds ago is used as it is."""
        live = await self._live(fresh)
        if live is None:
            return None
        if owner is None:
            handling = [i for i in live if i.handles(to)]
            if handling:
                return True, f"{_instances(len(handling))} handle {to}"
            return False, f"no live instance of any service handles {to}"
        mine = [i for i in live if i.service == owner]
        if not mine:
            return False, f"no live instance of service {owner!r} is running"
        handling = [i for i in mine if i.handles(to)]
        if handling:
            return True, f"{_instances(len(handling))} of {owner!r} handle it"
        handled = sorted({consumed for i in mine for consumed, _ in i.consumes})
        return False, (
            f"service {owner!r} runs ({_instances(len(mine))}) but none of them handles "
            f"{to} (it handles: {', '.join(handled) or 'nothing'}); deploy a version that "
            f"binds a handler for it, or check the routes"
        )

    async def _live(self, fresh: float = 0.0) -> list[Instance] | None:
        """The live instances the registry shows; callers at the same time share a read."""
        recent = self._recent
        if fresh and recent is not None and time.monotonic() - recent[0] <= fresh:
            return recent[1]
        census = self._census or self._read_census()
        try:
            return await asyncio.shield(census)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if census.cancelled() and current is not None and not current.cancelling():
                return None  # close() stopped the read, not this caller's own cancellation
            raise

    def _read_census(self) -> asyncio.Future[list[Instance] | None]:
        census = self._census = asyncio.ensure_future(self._read_live())
        census.add_done_callback(self._census_done)
        return census

    def _census_done(self, census: asyncio.Future[list[Instance] | None]) -> None:
        self._census = None
        if not census.cancelled() and census.exception() is None:
            self._recent = (time.monotonic(), census.result())

    def _look_ahead(self) -> None:
        # A request nears its timeout: read the registry now, so that a RequestTimeout
        # can say what it shows without making the caller wait past the timeout.
        if self._opened and self._census is None:
            self._read_census()

    async def _read_live(self) -> list[Instance] | None:
        return await self._from_registry(lambda registry: registry.instances())

    async def _from_registry(self, read: Callable[[Registry], Awaitable[_T]]) -> _T | None:
        """What ``read`` finds in the transport's registry; None when the transport keeps
        none, or it could not be read within LOOKUP_TIMEOUT (it only informs)."""
        transport = self.transport
        if not isinstance(transport, Registry):
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                return await read(transport)
        except Exception as exc:
            logger.debug("iambus: could not read the registry of %s: %s", transport.url, exc)
            return None

    async def _check(self, to: str, owner: str | None) -> None:
        if owner is None:
            # An event reaches every group on its address, running or not: a warning only
            # when no handler ever subscribed to it (nobody will ever get this one). Groups
            # are known for good, so a service that just stopped is no false alarm.
            known = await self._groups()
            if known is None or any(address == to for address, _ in known):
                return
            logger.warning(
                "iambus: sent %s, but no handler of any service has ever subscribed to it: "
                "nobody receives it, and a handler that subscribes later gets only the "
                "events sent after it started",
                to,
            )
            return
        # A command waits in the broker for its owner: fine while no instance runs (that
        # is what a durable send is for); a warning when the owner runs and none of its
        # instances handles it (an old version, a wrong route), where it would sit.
        found = await self.handlers_of(to, owner)
        if found is None or found[0] or not await self._runs(owner):
            return
        logger.warning("iambus: sent %s to service %r, where it waits: %s", to, owner, found[1])

    async def _runs(self, service: str) -> bool:
        live = await self._live()
        return live is not None and any(i.service == service for i in live)

    async def _groups(self) -> dict[tuple[str, str], str] | None:
        return await self._from_registry(lambda registry: registry.groups())

    def answer(self, request: Envelope, result: Any, *, empty: bool = False) -> Envelope:
        """The reply to ``request`` carrying ``result`` (``empty``: nothing, for a
        requester that does not read it: a ``Command[None]``)."""
        return Envelope(
            name=f"{request.name}.result",
            payload=b"" if empty else self.codec.encode(result),
            content_type=self.codec.content_type,
            correlation_id=request.id,
            causation_id=request.id,
            headers={STATUS: "ok"},
        )

    def failure(
        self, request: Envelope, exc: BaseException, *, attempts: int | None = None
    ) -> Envelope:
        """The reply to ``request`` saying its handler raised ``exc``.

        ``attempts``: how often a command was tried before it was dead-lettered.
        """
        kind = type(exc)
        details: dict[str, Any] = {
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": str(exc),
        }
        if attempts is not None:
            details["attempts"] = attempts
        return Envelope(
            name=f"{request.name}.error",
            payload=json.dumps(details).encode(),
            correlation_id=request.id,
            causation_id=request.id,
            headers={STATUS: "error", ERROR_TYPE: details["type"]},
        )


def _instances(n: int) -> str:
    return f"{n} live instance{'' if n == 1 else 's'}"


class RemoteRoute:
    """Stands in the dispatcher's maps for a routed message: sending it is remote."""

    __slots__ = ("context", "kind", "message", "name", "remote")

    plain = False  # never on the dispatcher's fast path
    response_event = None
    is_remote = True

    def __init__(self, remote: Remote, kind: Kind, message: MessageKey) -> None:
        self.remote = remote
        self.kind = kind
        self.message = message
        self.name = f"{kind} {remote.registry.name_of(message)} -> {remote.routes.owner(message)}"
        self.context = Context(kind, self.name, None)

    def context_for(self, key: str | None) -> Context:
        return self.context if key is None else Context(self.kind, self.name, key)

    # run and send hand back the remote's own coroutine, not one of theirs: a frame less
    # on a routed send's way to the broker's ack (each frame between a sending task and
    # the wait it resumes from costs it ~1 µs).

    def run(
        self, message: Any, key: str | None, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """A command or query: its owner's answer. An event: sent (None)."""
        if self.kind == "event":
            return self.remote.send("event", message, key)
        return self.remote.request(self.kind, message, key, timeout)

    def send(
        self, message: Any, key: str | None, id: str | None = None
    ) -> Coroutine[Any, Any, None]:
        """Hand the message to the transport; return once the broker has it."""
        return self.remote.send(self.kind, message, key, id)
