"""The sending side of a dispatcher with a transport.

Routed messages (see ``routing``) are encoded into an ``Envelope`` and handed to the
transport; the send returns once the broker has them. Envelopes inherit their
correlation id from the message being handled (the *conversation*), and carry the id of
that message as their causation id, so a chain of messages can be traced across
services. A routed query is a request: ``await dp.query(q, timeout=2)`` waits for the
owner's answer and decodes it into the ``R`` of ``Query[R]``; a failure over there is
raised here as ``RemoteError``, no answer in time as ``RequestTimeout``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .codecs import Codec
from .envelope import Envelope, current_envelope, new_id
from .errors import RemoteError, RequestTimeout, TransportError
from .handlers import Kind
from .messages import MessageKey, MessageRegistry, message_key, result_type
from .middleware import Context
from .routing import Routes, address
from .transports import Transport, client_name, connect, resolve

__all__ = ["Remote", "RemoteRoute", "current_envelope"]


STATUS, ERROR_TYPE = "iambus-status", "iambus-error-type"


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
        self._opened = False
        self._opening: asyncio.Lock | None = None

    @property
    def transport(self) -> Transport:
        """The transport; one given as a URL is made (its driver imported) on first use."""
        if self._transport is None:
            assert isinstance(self.source, str)
            self._transport = connect(self.source)
        return self._transport

    async def open(self) -> None:
        if self._opened:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if not self._opened:
                transport: Any = self.transport
                if getattr(transport, "client_name", "") is None:
                    # A broker transport not named yet: its connections carry our service.
                    transport.client_name = client_name(self.service)
                await transport.open()
                self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            if self.owned:
                await self.transport.close()

    # -- envelopes --------------------------------------------------------------------

    def envelope(self, message: Any, key: str | None, **fields: Any) -> Envelope:
        name = self.registry.name_of(message_key(message))
        parent = current_envelope.get()
        envelope_id = new_id()
        return Envelope(
            id=envelope_id,
            name=name,
            payload=self.codec.encode(message),
            content_type=self.codec.content_type,
            key=key,
            # A message sent while none is handled starts a conversation of its own.
            correlation_id=(parent.correlation_id or parent.id) if parent else envelope_id,
            causation_id=parent.id if parent is not None else None,
            **fields,
        )

    def decode(self, envelope: Envelope, into: Any) -> Any:
        return self.codec.decode(envelope.payload, into, name=envelope.name)

    # -- sending ----------------------------------------------------------------------

    async def send(self, kind: Kind, message: Any, key: str | None) -> None:
        if not self._opened:
            await self.open()
        envelope = self.envelope(message, key)
        await self.transport.send(address(kind, envelope.name), envelope)

    async def request(self, query: Any, key: str | None, timeout: float | None) -> Any:
        if not self._opened:
            await self.open()
        timeout = self.request_timeout if timeout is None else timeout
        mkey = message_key(query)
        envelope = self.envelope(query, key, headers={"deadline": repr(time.time() + timeout)})
        try:
            answer = await self.transport.request(
                address("query", envelope.name), envelope, timeout=timeout
            )
        except TimeoutError as exc:
            if isinstance(exc, TransportError):
                raise
            owner = self.routes.owner(mkey)
            raise RequestTimeout(
                f"no answer to {envelope.name} from service {owner!r} within {timeout}s; is a "
                f"worker of {owner!r} running?"
            ) from exc
        if answer.headers.get(STATUS) == "error":
            owner = self.routes.owner(mkey)
            details = json.loads(answer.payload)
            raise RemoteError(
                f"{envelope.name} failed in service {owner!r}: "
                f"{details['type']}: {details['message']}",
                error_type=details["type"],
                remote_message=details["message"],
            )
        return self.codec.decode(answer.payload, result_type(mkey), name=f"{envelope.name} result")

    def answer(self, request: Envelope, result: Any) -> Envelope:
        """The reply to ``request`` carrying ``result``."""
        return Envelope(
            name=f"{request.name}.result",
            payload=self.codec.encode(result),
            content_type=self.codec.content_type,
            correlation_id=request.id,
            causation_id=request.id,
            headers={STATUS: "ok"},
        )

    def failure(self, request: Envelope, exc: BaseException) -> Envelope:
        """The reply to ``request`` saying its handler raised ``exc``."""
        kind = type(exc)
        details = {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(exc)}
        return Envelope(
            name=f"{request.name}.error",
            payload=json.dumps(details).encode(),
            correlation_id=request.id,
            causation_id=request.id,
            headers={STATUS: "error", ERROR_TYPE: details["type"]},
        )


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

    async def run(self, message: Any, key: str | None, timeout: float | None = None) -> Any:
        if self.kind == "query":
            return await self.remote.request(message, key, timeout)
        await self.remote.send(self.kind, message, key)
        return None
