"""The compiled routing: what runs for each message type.

When a dispatcher starts, it compiles its routers into a ``RouteTable``: each handler
becomes a ``Route`` (the handler wrapped in its middleware chain, knowing what it emits),
each command and query has its one route, each event type the routes of its handlers
(those bound to its base classes included, resolved once per type). A message routed to
another service gets a ``RemoteRoute`` (see ``remote``) in the same maps, and each handler
of a routed message becomes a ``Subscription`` the worker consumes.

The table also delivers: an event to its routes (``deliver``: one after another in the
sending task, spread over tasks only when a handler waits), and what a handler emitted —
the events it collected with ``add_event``, and its result when that is an event
(``published_to``, the one place that decides it). Inside a unit of work, emitted messages
go into the unit at once, so they commit with it (see ``unit_of_work``).

The dispatcher keeps the sending API (``publish``, ``execute``, ...) and its lifecycle; a
route never calls back into it: what a route needs — its table, and a ``report`` function
for failures nobody awaits — it is given when compiled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .database import Database
from .engine import start_task
from .envelope import Envelope
from .errors import ImproperlyConfigured, SerializationError
from .handlers import Handler, Invoke, Kind
from .messages import (
    Command,
    MessageKey,
    Query,
    describe,
    message_key,
    result_type,
    result_unread,
)
from .middleware import Context, Middleware, compose
from .remote import Remote, RemoteRoute
from .retry import Retry
from .routers import Router
from .routing import address
from .unit_of_work import Later, Scope, Session, UnitOfWork, open_unit, run_later

__all__ = ["Call", "Route", "RouteTable", "Subscription"]

logger = logging.getLogger(__name__)

Report = Callable[[BaseException, Any, Context], Awaitable[None]]
"""Where a failure nobody awaits goes: the dispatcher's error handler."""


class Route:
    """A handler compiled for sending: its middleware chain and what it emits.

    The chain's innermost layer calls the handler and takes what it emitted (events it
    returned or collected). When a unit of work is open there — the route's own (``unit``),
    or one a middleware or a caller opened — the emitted messages go into it at once, so
    that they commit with it; otherwise they are published once the whole chain returned,
    so a middleware that fails after the handler stops them.
    """

    __slots__ = (
        "chain",
        "collects",
        "context",
        "handler",
        "invoke",
        "kind",
        "name",
        "plain",
        "response_event",
        "table",
        "unit",
    )

    def __init__(
        self, table: RouteTable, handler: Handler, middleware: list[Middleware], unit: bool
    ) -> None:
        self.table = table
        self.handler = handler
        self.kind = handler.kind
        self.name = handler.name
        self.invoke = handler.invoke
        self.collects = handler.collects_events
        self.response_event = handler.response_event
        self.unit = unit
        self.chain = compose(middleware, self._in_unit if unit else self._innermost)
        # ``plain``: no middleware, no event collection and no unit of work, so a send may
        # call ``invoke`` directly and skip ``run``.
        self.plain = not middleware and not self.collects and not unit
        self.context = Context(handler.kind, handler.name, None)

    def context_for(self, key: str | None) -> Context:
        return self.context if key is None else Context(self.kind, self.name, key)

    async def run(
        self,
        message: Any,
        key: str | None,
        delivered: Envelope | None = None,
        inbox: str | None = None,
    ) -> Any:
        """Run the chain on ``message``; ``delivered``: the envelope it came in, from a
        transport, recorded in the inbox under ``inbox`` (the subscription's group: one
        per handler and service) by a unit of work. Returns an ``AlreadyHandled`` when the
        inbox found it applied already (a redelivery: nothing ran)."""
        call = Call()
        if self.collects:
            call.sink = []
        if delivered is not None:
            call.delivered = delivered
            call.inbox = inbox
        context = self.context if key is None else Context(self.kind, self.name, key)
        try:
            result = await self.chain(message, context, call)
        except Exception:
            if call.later:  # a unit of work committed before a middleware raised
                await run_later(call.later)
            raise
        if call.skipped:
            return AlreadyHandled(result) if call.answered else ALREADY_HANDLED
        if not call.taken and (call.sink or result is not None):
            table = self.table
            # A result of a type in ``quiet`` is no event without a response_event: that
            # set lookup spares most runs the call deciding it (see published_to).
            if call.sink or self.response_event is not None or type(result) not in table.quiet:
                routes = table.published_to(result, message, self.response_event)
                if call.sink or routes:
                    await table.emit(call.sink, result, routes, key)
        if call.later:  # what a unit of work of this call left to its commit
            await run_later(call.later)
        return result

    def _innermost(self, message: Any, context: Context, call: Call) -> Awaitable[Any]:
        # A plain function handing back the handler's coroutine (no frame of ours in
        # between), unless a unit of work may be open here to take what it emits.
        if self.table.units:
            return self._into_unit(message, context, call)
        if self.collects:
            return self.invoke(message, call.sink)
        return self.invoke(message)

    async def _into_unit(self, message: Any, context: Context, call: Call) -> Any:
        """Call the handler; if a unit of work is open here, the delivery is recorded in
        its inbox first, and what the handler emitted goes into it (so it commits with
        it), else it is left to ``run``, as without a unit."""
        table = self.table
        unit = table.open_unit()
        delivered, inbox = call.delivered, call.inbox or self.name
        # The inbox records what changes something: commands and events, not queries.
        if (
            unit is not None
            and delivered is not None
            and self.kind != "query"
            and not await self._claim(unit, delivered, inbox)
        ):
            call.taken = call.skipped = True
            if self._answered(delivered, message):
                return await self._kept_result(unit, delivered, inbox, message, call)
            return None
        if self.collects:
            result = await self.invoke(message, call.sink)
        else:
            result = await self.invoke(message)
        if unit is not None:
            if self._answered(delivered, message):
                await self._keep_answer(unit, delivered, inbox, result)
            routes = table.published_to(result, message, self.response_event)
            sink = call.sink
            call.taken = True
            if self.collects:
                call.sink = []  # a middleware calling again collects afresh
            if sink or routes:
                await table.emit(sink, result, routes, context.key)
        return result

    def _answered(self, delivered: Envelope | None, message: Any) -> bool:
        """Whether ``delivered`` is a command whose requester waits for its result."""
        return (
            self.kind == "command"
            and delivered is not None
            and delivered.reply_to is not None
            and not result_unread(message_key(message))
        )

    async def _keep_answer(
        self, unit: UnitOfWork, request: Envelope | None, inbox: str, result: Any
    ) -> None:
        """Keep in the inbox what the requester of ``request`` is sent for ``result``;
        nothing when it does not encode (the worker tells the requester why)."""
        remote = self.table.remote
        if remote is None or request is None:
            return
        try:
            payload = remote.codec.encode(result)
        except SerializationError:
            return
        await unit.keep_answer(request.id, inbox, (payload, remote.codec.content_type))

    async def _kept_result(
        self, unit: UnitOfWork, request: Envelope, inbox: str, message: Any, call: Call
    ) -> Any:
        """The result an earlier run of ``request`` kept in its inbox record, decoded, for
        the middleware to return as it did the first run's (``call.answered``); None
        when none was kept or it no longer decodes."""
        kept = await unit.kept_answer(request.id, inbox)
        remote = self.table.remote
        if kept is None or remote is None:
            return None
        payload, content_type = kept
        try:
            if content_type != remote.codec.content_type:
                raise SerializationError(
                    f"kept as {content_type}, and this service's codec reads "
                    f"{remote.codec.content_type}"
                )
            result = remote.codec.decode(
                payload, result_type(message_key(message)), name=f"{request.name}.result"
            )
        except SerializationError as exc:
            logger.warning(
                "iambus: the answer %s kept for %s (id %s) does not decode (%s): its "
                "requester is not answered",
                inbox,
                request.name,
                request.id,
                exc,
            )
            return None
        call.answered = True
        return result

    async def _claim(self, unit: UnitOfWork, delivered: Envelope, inbox: str) -> bool:
        if await unit.claim(delivered.id, inbox):
            return True
        logger.info(
            "iambus: %s already handled %s (id %s): a redelivery, acked without running it again",
            inbox,
            delivered.name,
            delivered.id,
        )
        return False

    async def _in_unit(self, message: Any, context: Context, call: Call) -> Any:
        table = self.table
        if table.units and table.open_unit() is not None:
            return await self._into_unit(message, context, call)  # joins the open one
        database = table.database
        assert database is not None  # checked when compiled
        if call.later is None:
            call.later = []
        async with Scope(table, database, table.remote, later=call.later):
            return await self._into_unit(message, context, call)


class AlreadyHandled:
    """What ``Route.run`` returns for a delivery the inbox found applied already (nothing
    ran). ``answered``: an earlier run kept its result for the requester, and ``result``
    is it, as the middleware returned it again."""

    __slots__ = ("answered", "result")

    def __init__(self, result: Any = None, *, answered: bool = True) -> None:
        self.answered = answered
        self.result = result

    def __repr__(self) -> str:
        return f"AlreadyHandled({self.result!r})" if self.answered else "ALREADY_HANDLED"


ALREADY_HANDLED: Any = AlreadyHandled(answered=False)
"""``AlreadyHandled`` without a kept result."""


class Call:
    """One run of a route: where its message came from, and what it leaves to do.

    Its fields default on the class, and a run sets only those it needs: made for every
    call of a route with middleware, it must cost next to nothing.
    """

    delivered: Envelope | None = None  # the envelope of a message from a transport
    sink: list[Any] | None = None  # the events a collecting class handler adds
    inbox: str | None = None  # the name the inbox records ``delivered`` under
    taken = False  # True once a unit of work took what the handler emitted
    skipped = False  # True when the inbox found ``delivered`` applied already
    later: list[Later] | None = None  # in-process work a unit of work left to its commit
    answered = False  # True when a skipped delivery's result is the one its record kept


@dataclass(frozen=True, slots=True)
class Subscription:
    """One handler (event) or one service (command, query) consuming one address."""

    kind: Kind
    address: str
    group: str
    message: MessageKey
    route: Route
    retry: Retry
    from_start: bool

    def describe(self) -> str:
        return f"{self.kind} {describe(self.message)} -> {self.route.name} [{self.group}]"


class RouteTable:
    """What runs for each message type, compiled at start; see the module's docstring.

    Its maps are filled in place (never replaced), so a dispatcher may hold on to them:
    its sending fast paths read ``fast_commands``, ``fast_queries``, ``event_cache`` and
    ``quiet`` directly.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        self.remote: Remote | None = None
        self.database: Database | None = None
        self.commands: dict[MessageKey, Route] = {}
        self.queries: dict[MessageKey, Route] = {}
        # Handler calls of plain routes by message type, filled only while the dispatcher
        # is open (see open()): one lookup in them answers "open, known, plain".
        self.fast_commands: dict[MessageKey, Invoke] = {}
        self.fast_queries: dict[MessageKey, Invoke] = {}
        # Event routes by the key they were bound to.
        self.events: dict[MessageKey, tuple[Route, ...]] = {}
        # Event routes by the type actually sent, subclass handlers included. Filled at
        # start for bound keys and on first sight of any other type, never per message.
        self.event_cache: dict[MessageKey, tuple[Route, ...]] = {}
        # Types seen to have no event handlers: a returned value of one is never
        # published (without a response_event), which a set membership test tells fastest.
        self.quiet: set[type] = set()
        self.implicit: dict[type, tuple[Route, ...]] = {}
        self.subscriptions: list[Subscription] = []
        self.units = 0  # units of work open on this table: 0 keeps sends on the fast path
        # In-process work a commit of a caller's SQLAlchemy transaction set running.
        self.committed: set[asyncio.Task[None]] = set()

    # -- compiling --------------------------------------------------------------------

    def compile(
        self,
        routers: Mapping[Kind, Router],
        middleware: list[Middleware],
        *,
        remote: Remote | None,
        database: Database | None,
        every_unit: bool,
        retry: Retry,
        retry_for: Mapping[MessageKey, Retry | None],
    ) -> None:
        """Compile every handler of ``routers``; with a ``remote``, routed messages become
        remote routes and subscriptions (retried by the handler's own policy, then
        ``retry_for`` the message, then ``retry``)."""
        self.remote = remote
        self.database = database
        self.events.clear()
        for kind, router in routers.items():
            chain = [*middleware, *router.middleware]
            routes = [
                self._route(handler, chain, (router.unit_of_work, every_unit))
                for handler in router.handlers()
            ]
            if kind == "event":
                grouped: dict[MessageKey, list[Route]] = {}
                for route in routes:
                    grouped.setdefault(route.handler.message, []).append(route)
                self.events.update((k, tuple(v)) for k, v in grouped.items())
                self.event_cache.clear()
                for key in self.events:
                    if isinstance(key, str):
                        self.event_cache[key] = self.events[key]
                    else:
                        self._resolve_events(key)  # a bound type has its bases' handlers too
            else:
                target = self.commands if kind == "command" else self.queries
                target.update((route.handler.message, route) for route in routes)
        if remote is not None:
            self._compile_remote(remote, retry, retry_for)

    def _route(
        self, handler: Handler, middleware: list[Middleware], defaults: tuple[bool | None, bool]
    ) -> Route:
        unit = next(
            (choice for choice in (handler.unit_of_work, *defaults) if choice is not None),
            False,
        )
        if unit and self.database is None:
            why = (
                "takes the unit of work's session or connection"
                if handler.unit_of_work
                else "runs in a unit of work"
            )
            raise ImproperlyConfigured(
                f"{handler.kind} handler {handler.name} {why}, and the dispatcher has no "
                f"database: pass Dispatcher(database=Database(...)) (see iambus.database)"
            )
        if unit and self.database is not None and self.database.kind != "sqlalchemy":
            wants = [k for k, v in handler.initkwargs.items() if v is Session]
            if wants:
                raise ImproperlyConfigured(
                    f"{handler.kind} handler {handler.name} takes a SQLAlchemy AsyncSession "
                    f"({', '.join(wants)}), and the dispatcher's database runs on asyncpg "
                    f"alone: type the parameter asyncpg.Connection (or bind it to "
                    f"iambus.unit_of_work.Connection), or give the Database a SQLAlchemy "
                    f"AsyncEngine: Database(create_async_engine('postgresql+asyncpg://...'))"
                )
        return Route(self, handler, middleware, unit)

    def _compile_remote(
        self, remote: Remote, retry: Retry, retry_for: Mapping[MessageKey, Retry | None]
    ) -> None:
        """Routed messages: handlers become subscriptions, sending goes to the transport."""
        routing, service = remote.routes, remote.service
        # Every routed class this dispatcher knows of gets its wire name now, so that two
        # classes of one name fail the start (naming both), not some later send.
        for routed in routing.types():
            remote.registry.add(routed)
        subs: list[Subscription] = []

        def subscription(
            kind: Kind, key: MessageKey, route: Route, group: str, *, from_start: bool
        ) -> Subscription:
            return Subscription(
                kind=kind,
                address=address(kind, remote.registry.add(key)),
                group=group,
                message=key,
                route=route,
                retry=route.handler.retry or retry_for.get(key) or retry,
                from_start=from_start,
            )

        tables: tuple[tuple[Kind, dict[MessageKey, Route]], ...] = (
            ("command", self.commands),
            ("query", self.queries),
        )
        for kind, table in tables:
            for key, route in list(table.items()):
                owner = routing.owner(key)
                if owner is None:
                    continue
                if owner != service:
                    raise ImproperlyConfigured(
                        f"{describe(key)} is routed to service {owner!r}, but this dispatcher "
                        f"(service {service!r}) binds {route.name} for it; a {kind} has "
                        f"one owner: remove the handler here or change the route"
                    )
                subs.append(subscription(kind, key, route, owner, from_start=True))
                table[key] = RemoteRoute(remote, kind, key)  # type: ignore[assignment]
        for key, routes in list(self.events.items()):
            if routing.owner(key) is None:
                continue
            if service is None:
                raise ImproperlyConfigured(
                    f"handlers of the routed event {describe(key)} need a service name to "
                    f"subscribe under: pass Dispatcher(service=...)"
                )
            seen: dict[str, int] = {}
            for route in routes:
                # Each handler is its own subscription, named after it; two handlers with
                # one name (made by a factory, a class bound twice) get "#2", "#3"... in
                # binding order, so they never share a group and compete.
                seen[route.name] = seen.get(route.name, 0) + 1
                suffix = "" if seen[route.name] == 1 else f"#{seen[route.name]}"
                group = f"{service}.{route.name}{suffix}"
                subs.append(subscription("event", key, route, group, from_start=False))
            self.events[key] = (RemoteRoute(remote, "event", key),)  # type: ignore[assignment]
        self.event_cache.clear()
        for key in self.events:
            self._resolve_events(key)
        self.subscriptions[:] = subs

    def open(self) -> None:
        """Fill the fast maps: the dispatcher is open (they stay empty while it is not)."""
        pairs = ((self.fast_commands, self.commands), (self.fast_queries, self.queries))
        for fast, routes in pairs:
            fast.clear()
            fast.update(
                (key, route.invoke)
                for key, route in routes.items()
                if route.plain and route.response_event is None and not isinstance(key, str)
            )

    def close(self) -> None:
        """Empty the fast maps: every send takes the checked path again."""
        self.fast_commands.clear()
        self.fast_queries.clear()

    # -- resolving --------------------------------------------------------------------

    def routed(self, key: MessageKey) -> RemoteRoute | None:
        """The route sending ``key`` to the transport, if it is routed."""
        for table in (self.commands, self.queries):
            route = table.get(key)
            if route is not None:
                return route if isinstance(route, RemoteRoute) else None
        cached = self.event_cache.get(key)
        if cached is not None:
            return cached[0] if len(cached) == 1 and isinstance(cached[0], RemoteRoute) else None
        if key in self.events:
            return None
        return self.remote_route(key, None)

    def remote_route(self, key: MessageKey, kind: Kind | None) -> RemoteRoute | None:
        """A route sending ``key`` to the transport, if it is routed (cached in the maps)."""
        remote = self.remote
        if remote is None or remote.routes.owner(key) is None:
            return None
        if kind is None:  # only handle() does not say: the markers, or else an event
            is_type = isinstance(key, type)
            kind = (
                "query"
                if is_type and issubclass(key, Query)  # type: ignore[arg-type]
                else "command"
                if is_type and issubclass(key, Command)  # type: ignore[arg-type]
                else "event"
            )
        route = RemoteRoute(remote, kind, key)
        if kind == "event":
            self.event_cache[key] = (route,)  # type: ignore[assignment]
        else:
            table = self.commands if kind == "command" else self.queries
            table[key] = route  # type: ignore[assignment]
        return route

    def event_handlers(self, mkey: MessageKey) -> tuple[Route, ...]:
        """The routes an event of ``mkey`` goes to (resolved once per type)."""
        routes = self.event_cache.get(mkey)
        if routes is None:
            routes = self._resolve_events(mkey)
        return routes

    def _resolve_events(self, mkey: MessageKey) -> tuple[Route, ...]:
        remote = self.remote
        if remote is not None and remote.routes.owner(mkey) is not None:
            # A routed event goes to the transport, and only there: local handlers of
            # its base classes (an `object` audit handler, say) do not run in the sender,
            # and a failure to send is the sender's, never reported and forgotten.
            own = self.events.get(mkey)
            if own and isinstance(own[0], RemoteRoute):
                self.event_cache[mkey] = own
                return own
            route = self.remote_route(mkey, "event")
            assert route is not None
            return (route,)  # type: ignore[return-value]
        if isinstance(mkey, str):
            return ()  # strings match exactly; unknown ones are not cached
        # A routed base class does not cover its subclasses: its transport route is
        # never borrowed (it would send the subclass under the subclass's own name).
        found = [
            r
            for base in mkey.__mro__
            for r in self.events.get(base, ())
            if not isinstance(r, RemoteRoute)
        ]
        routes = self.event_cache[mkey] = tuple(found)
        return routes

    def published_to(
        self, result: Any, message: Any, response_event: type | None
    ) -> tuple[Route, ...]:
        """The routes a handler's ``result`` is published to as an event; () when it is
        not one. The one place that decides "is this result an event?":

        * ``None``, or the very message the handler got (an event handler handing its
          event back), never is;
        * with a ``response_event``, a value of that type is;
        * without, a value whose own type or a base has event handlers is (catch-all
          handlers bound to ``object`` do not make every result one), and so is a value
          routed to another service that is no command or query.

        A type found to be none of these is kept in ``quiet``: without a response_event, a
        value of a type in ``quiet`` gives (), which is what lets the dispatcher's fast
        paths and ``Route.run`` test that set and skip the call (it costs about as much
        as the rest of a plain query).
        """
        if result is None or result is message:
            return ()
        rtype = type(result)
        if response_event is None:
            if rtype in self.quiet:
                return ()
            routes = self.implicit.get(rtype)
            return self._implicit_routes(rtype) if routes is None else routes
        return self.event_handlers(rtype) if isinstance(result, response_event) else ()

    def _implicit_routes(self, rtype: type) -> tuple[Route, ...]:
        remote = self.remote
        if any(base in self.events for base in rtype.__mro__[:-1]) or (
            remote is not None
            and remote.routes.owner(rtype) is not None
            and not issubclass(rtype, Command | Query)
        ):
            routes = self.event_handlers(rtype)
        else:
            routes = ()
            self.quiet.add(rtype)
        self.implicit[rtype] = routes
        return routes

    # -- units of work ----------------------------------------------------------------

    def open_unit(self) -> UnitOfWork | None:
        """The unit of work of this table (its dispatcher) open where this is called."""
        return open_unit(self)

    # -- delivering -------------------------------------------------------------------

    async def emit(
        self, sink: list[Any] | None, result: Any, routes: tuple[Route, ...], key: str | None
    ) -> None:
        """Publish what a handler emitted: the events it collected, then its ``result`` to
        ``routes`` (see ``published_to``). Failures go to the error handler."""
        if sink:
            for event in sink:
                await self.publish_reporting(event, key)
        if routes:
            await self.deliver(routes, result, key, True)

    async def publish_raising(self, event: Any, key: str | None) -> None:
        routes = self.event_handlers(message_key(event))
        if routes:
            await self.deliver(routes, event, key, False)

    async def publish_reporting(self, event: Any, key: str | None) -> None:
        routes = self.event_handlers(message_key(event))
        if routes:
            await self.deliver(routes, event, key, True)

    async def deliver(
        self, routes: tuple[Route, ...], event: Any, key: str | None, report: bool
    ) -> None:
        """Run ``routes`` on ``event``; report failures, or raise them as a group."""
        if self.units and not isinstance(routes[0], RemoteRoute):
            unit = self.open_unit()
            if unit is not None:  # handled in-process once the unit has committed
                unit.after_commit(lambda: self.deliver(routes, event, key, True))
                return
        if len(routes) == 1:
            route = routes[0]
            try:
                if route.plain:
                    result = await route.invoke(event)
                    if result is not None:
                        emitted = self.published_to(result, event, route.response_event)
                        if emitted:
                            await self.deliver(emitted, result, key, True)
                else:
                    await route.run(event, key)
            except Exception as exc:
                if isinstance(route, RemoteRoute):
                    raise  # not handed to the transport: the sender must know (and retry)
                if report:
                    await self.report(exc, event, route.context_for(key))
                    return
                raise _group(event, 1, [(route, exc)]) from None
            return

        # Several handlers. They are awaited one after another by the sending task
        # itself, as direct calls are, so current_task(), asyncio.timeout() and task
        # groups inside a handler behave exactly as for a direct call. A callback armed
        # beforehand can only run if a handler suspends: it then starts the remaining
        # handlers as tasks, so they run concurrently with the waiting one. When no
        # handler suspends (the common case), the callback is cancelled unrun: no task.
        fan = _FanOut(routes, event, key)
        armed = asyncio.get_running_loop().call_soon(self._spread, fan)
        try:
            while fan.next < fan.total and fan.tasks is None:
                route = routes[fan.next]
                fan.next += 1
                try:
                    if route.plain:  # _run_one, inlined: one coroutine less per handler
                        result = await route.invoke(event)
                        if result is not None:
                            emitted = self.published_to(result, event, route.response_event)
                            if emitted:
                                await self.deliver(emitted, result, key, True)
                    else:
                        await route.run(event, key)
                except Exception as exc:
                    fan.failures.append((route, exc))
            armed.cancel()
            if fan.tasks:
                await asyncio.wait(fan.tasks)
        except BaseException:
            armed.cancel()
            # Like a TaskGroup: cancelled with us, the started handlers are cancelled
            # too, and we return only once their clean-up has run.
            if fan.tasks:
                for task in fan.tasks:
                    task.cancel()
                await asyncio.wait(fan.tasks)
            raise
        if fan.tasks:
            for route, task in zip(routes[fan.total - len(fan.tasks) :], fan.tasks, strict=True):
                if task.cancelled():
                    fan.failures.append((route, asyncio.CancelledError()))
                elif (error := task.exception()) is not None:
                    fan.failures.append((route, error))
        if not fan.failures:
            return
        if report:
            for route, failure in fan.failures:
                await self.report(failure, event, route.context_for(key))
            return
        raise _group(event, fan.total, fan.failures)

    def _spread(self, fan: _FanOut) -> None:
        # Runs only if a handler of ``fan`` suspended: start the rest as tasks.
        fan.tasks = [
            start_task(self._run_one(route, fan.event, fan.key)) for route in fan.routes[fan.next :]
        ]
        fan.next = fan.total

    async def _run_one(self, route: Route, event: Any, key: str | None) -> None:
        if not route.plain:
            await route.run(event, key)
            return
        result = await route.invoke(event)
        if result is not None:
            emitted = self.published_to(result, event, route.response_event)
            if emitted:
                await self.deliver(emitted, result, key, True)


class _FanOut:
    """One event on its way to several handlers."""

    __slots__ = ("event", "failures", "key", "next", "routes", "tasks", "total")

    def __init__(self, routes: tuple[Route, ...], event: Any, key: str | None) -> None:
        self.routes = routes
        self.event = event
        self.key = key
        self.total = len(routes)
        self.next = 0
        self.tasks: list[asyncio.Task[None]] | None = None
        self.failures: list[tuple[Route, BaseException]] = []


def _group(
    event: Any, total: int, failures: list[tuple[Route, BaseException]]
) -> BaseExceptionGroup[Any]:
    names = ", ".join(route.name for route, _ in failures)
    return BaseExceptionGroup(
        f"{len(failures)} of {total} handler(s) of {describe(message_key(event))} failed: {names}",
        [exc for _, exc in failures],
    )
