"""Routers: where handlers are bound to messages.

A dispatcher has three: ``dp.events`` (an ``EventRouter``: any number of handlers per
event) and ``dp.commands`` / ``dp.queries`` (``RequestRouter``: exactly one handler per
message). Bind with a call or a decorator::

    dp.events.bind(UserCreated, send_welcome_mail, mailer=mailer)

    @dp.queries.register(GetUser, repo=Singleton["repo": get_repo])
    async def get_user(query: GetUser, repo: UserRepo) -> User: ...

``register`` returns the function unchanged: it stays directly callable and testable.
Subclass a router and pass it to ``Dispatcher(events_router_cls=...,
commands_router_cls=..., queries_router_cls=...)`` to customise binding.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, Union, get_origin

from .errors import HandlerAlreadyBound, ImproperlyConfigured, RegistrationClosed
from .handlers import Handler, Kind, build_handler
from .messages import MessageKey, describe
from .middleware import Middleware, check_middleware
from .providers import ProviderRegistry
from .retry import Retry

__all__ = ["EventRouter", "Owner", "RequestRouter", "Router"]

H = TypeVar("H")


class Owner(Protocol):
    """What a router needs of its dispatcher (a ``Dispatcher`` is one): the providers
    handlers draw on, whether registration has closed, and the command or query handler
    bound elsewhere (a message has one, across both request routers)."""

    @property
    def providers(self) -> ProviderRegistry: ...

    @property
    def started(self) -> bool: ...

    def request_handler(self, key: MessageKey) -> Handler | None: ...


class Router:
    """What the event and request routers share: binding, decorators, middleware."""

    kind: Kind

    def __init__(self, dispatcher: Owner, *, kind: Kind | None = None) -> None:
        if kind is not None:
            self.kind = kind
        self.dispatcher = dispatcher
        self.middleware: list[Middleware] = []
        self.unit_of_work: bool | None = None
        """Whether this router's handlers run in a unit of work (None: as the dispatcher)."""

    def bind(
        self,
        message: MessageKey,
        /,
        handler: Any,
        *,
        argname: str | None = None,
        response_event: type | None = None,
        retry: Retry | None = None,
        unit_of_work: bool | None = None,
        **initkwargs: Any,
    ) -> Handler:
        """Bind ``handler`` to ``message``; ``initkwargs`` are passed to it on every call.

        ``argname`` names the parameter that receives the message (needed when more than
        one required parameter is left unbound). ``response_event`` makes a returned
        value of that type be published as an event. ``retry`` is this handler's retry
        policy for messages from a transport. ``unit_of_work`` runs it in a unit of work
        (None: as the router, then the dispatcher, say; see ``iambus.unit_of_work``).
        """
        self._check_open(f"bind {describe(message) if _is_key(message) else message!r}")
        if message is str:
            raise ImproperlyConfigured(
                "the str type cannot be a message class: a string message is its own key, "
                "so bind the name itself, e.g. register('on startup')"
            )
        if isinstance(message, types.UnionType) or get_origin(message) is Union:
            raise ImproperlyConfigured(
                f"cannot bind the union {message!r}: bind each message type separately "
                f"(the same handler may be bound to several)"
            )
        if not _is_key(message):
            raise ImproperlyConfigured(
                f"messages are bound by class or by string name, got the instance "
                f"{message!r}; bind {type(message).__qualname__} instead"
            )
        # A failed bind binds nothing: not even the provider names it registered.
        with self.dispatcher.providers.transaction():
            record = build_handler(
                self.kind,
                message,
                handler,
                argname=argname,
                response_event=response_event,
                retry=retry,
                unit_of_work=unit_of_work,
                initkwargs=initkwargs,
                providers=self.dispatcher.providers,
            )
            self._add(record)
        return record

    def register(
        self,
        message: MessageKey,
        /,
        *,
        argname: str | None = None,
        response_event: type | None = None,
        retry: Retry | None = None,
        unit_of_work: bool | None = None,
        **initkwargs: Any,
    ) -> Callable[[H], H]:
        """Decorator form of ``bind``; returns the decorated handler unchanged."""

        def decorator(handler: H) -> H:
            self.bind(
                message,
                handler,
                argname=argname,
                response_event=response_event,
                retry=retry,
                unit_of_work=unit_of_work,
                **initkwargs,
            )
            return handler

        return decorator

    def add_middleware(self, middleware: Middleware) -> None:
        """Run ``middleware`` around every handler call of this router."""
        self._check_open("add middleware")
        check_middleware(middleware)
        self.middleware.append(middleware)

    def handlers(self) -> list[Handler]:
        """Every bound handler, in binding order."""
        raise NotImplementedError

    def _add(self, handler: Handler) -> None:
        raise NotImplementedError

    def _check_open(self, action: str) -> None:
        if self.dispatcher.started:
            raise RegistrationClosed(
                f"cannot {action}: the dispatcher has started and its handler maps are "
                f"final; bind handlers and middleware before dp.start(), the first send, "
                f"or `async with dp`"
            )


class EventRouter(Router):
    """Any number of handlers per event; every one of them receives it."""

    kind = "event"

    def __init__(self, dispatcher: Owner, *, kind: Kind | None = None) -> None:
        super().__init__(dispatcher, kind=kind)
        self._map: dict[MessageKey, list[Handler]] = {}

    @property
    def map(self) -> Mapping[MessageKey, list[Handler]]:
        """Handlers by the message they were bound to (subclasses are resolved at send)."""
        return MappingProxyType(self._map)

    def handlers(self) -> list[Handler]:
        return [h for bound in self._map.values() for h in bound]

    def _add(self, handler: Handler) -> None:
        self._map.setdefault(handler.message, []).append(handler)


class RequestRouter(Router):
    """Exactly one handler per command or query."""

    kind = "command"

    def __init__(self, dispatcher: Owner, *, kind: Kind | None = None) -> None:
        super().__init__(dispatcher, kind=kind)
        self._map: dict[MessageKey, Handler] = {}

    @property
    def map(self) -> Mapping[MessageKey, Handler]:
        """The handler of each message."""
        return MappingProxyType(self._map)

    def handlers(self) -> list[Handler]:
        return list(self._map.values())

    def _add(self, handler: Handler) -> None:
        key = handler.message
        taken = self._map.get(key) or self.dispatcher.request_handler(key)
        if taken is not None:
            raise HandlerAlreadyBound(
                f"{describe(key)} already has its {taken.kind} handler {taken.name}; a "
                f"{self.kind} has exactly one handler, so {handler.name} cannot be bound "
                f"too. Remove one, or make it an event if several parties should react"
            )
        self._map[key] = handler


def _is_key(message: Any) -> bool:
    return isinstance(message, type | str)
