"""The dispatcher: starts, sends messages to their handlers, and stops.

::

    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> User: ...

    async with dp:                       # start(); on exit, stop() drains background work
        user = await dp.query(GetUser(7))

Sending:

* ``await dp.publish(event)`` runs every handler of the event concurrently and returns
  when all have run; failures are raised together as an ``ExceptionGroup``.
* ``await dp.execute(command)`` / ``await dp.query(query)`` run the one handler and return
  its result, or raise its exception — in this process, or in the service a route sends
  it to (a request: the owner's worker answers).
* ``await dp.send(message, key=None, id=None)`` hands a command or an event over without
  waiting for its handlers: to the transport when routed (returns once the broker has
  it), else to the background workers (as ``handle()`` does).
* ``await dp.handle(message, key=None, wait_for_response=False)`` finds the message in the
  events, commands, then queries router. Without ``wait_for_response`` it queues the
  message for the background workers and returns once queued; failures go to the
  ``error_handler``. With it, it behaves as the explicit form above.
* ``key=...`` (any form): messages with the same key are handled one at a time, in the
  order they were sent.

Events a handler emits (returned, or collected with ``add_event``) are published after
the handler — and its middleware — succeeded, and before the send that caused them
returns. Their handlers' failures go to the ``error_handler``: the command did succeed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypedDict, TypeVar, Unpack, overload

from .codecs import Codec, JsonCodec
from .database import Database
from .engine import Engine, JobFn, current_key, in_worker, outside_workers
from .envelope import Envelope
from .errors import (
    DispatcherStopped,
    HandlerDoesNotExist,
    ImproperlyConfigured,
    RegistrationClosed,
    RequestTimeout,
    WouldDeadlock,
    bad_option,
    check_count,
    check_flag,
    check_name,
    check_seconds,
)
from .handlers import Handler, Kind
from .messages import Command, MessageKey, Query, describe, message_key, message_name
from .middleware import Context, Middleware, check_middleware
from .providers import ProviderRegistry
from .relay import Relay
from .remote import Remote, RemoteRoute
from .retry import Retry, checked_policy
from .routers import EventRouter, RequestRouter, Router
from .routes import RouteTable
from .routing import Routes
from .telemetry import Observer, Telemetry
from .transports import Transport, check_transport_object, redact
from .unit_of_work import Scope, UnitOfWork
from .worker import StopDeadline, Worker, WorkerHealth, bounded, seconds_until

__all__ = ["Dispatcher", "ErrorHandler", "Limits", "Timeouts"]

logger = logging.getLogger(__name__)

R = TypeVar("R")
ErrorHandler = Callable[[BaseException, Any, Context], Awaitable[None] | None]

_NEW, _STARTED, _STOPPING, _STOPPED = "new", "started", "stopping", "stopped"


async def log_error(exc: BaseException, message: Any, context: Context) -> None:
    """The default error handler: log the failure with its traceback."""
    logger.error(
        "%s handler %s failed on %s%s",
        context.kind,
        context.handler,
        describe(message_key(message)),
        "" if context.key is None else f" (key {context.key!r})",
        exc_info=exc,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a dispatcher runs at once::

        Dispatcher(limits=Limits(concurrency=64, background=4))

    * ``concurrency``: handlers of messages from the transport running at once (the
      worker fetches no more meanwhile);
    * ``background``: handlers of this process's background work running at once — what
      ``handle()`` and an unrouted ``send()`` queue (the engine's workers);
    * ``max_pending``: background messages queued or running before ``handle()`` waits
      for room.
    """

    concurrency: int = 32
    background: int = 8
    max_pending: int = 10_000

    def __post_init__(self) -> None:
        check_count("limits.concurrency", self.concurrency)
        check_count("limits.background", self.background)
        check_count("limits.max_pending", self.max_pending)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a dispatcher waits, in seconds::

        Dispatcher(timeouts=Timeouts(request=5.0, shutdown=None))

    * ``request``: for the answer to a routed command or query, unless the call passes
      ``timeout=`` (a handler in this process is awaited as long as it takes);
    * ``shutdown``: how long ``stop()`` lets work finish (None: no limit).
    """

    request: float = 10.0
    shutdown: float | None = 30.0

    def __post_init__(self) -> None:
        check_seconds("timeouts.request", self.request)
        check_seconds("timeouts.shutdown", self.shutdown, zero=True, none="no limit")


class _Moved:
    """An option's old attribute name: reads and sets its new place, with a warning."""

    def __init__(self, group: str, field: str | None) -> None:
        self.group = group
        self.field = field
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, dispatcher: Any, owner: type | None = None) -> Any:
        if dispatcher is None:
            return self
        _deprecated("Dispatcher attribute", self.name, stacklevel=2)
        value = getattr(dispatcher, self.group)
        return value if self.field is None else getattr(value, self.field)

    def __set__(self, dispatcher: Any, value: Any) -> None:
        _deprecated("Dispatcher attribute", self.name, stacklevel=2)
        if self.field is None:
            setattr(dispatcher, self.group, _policies(self.name, value))
        else:
            group = getattr(dispatcher, self.group)
            setattr(dispatcher, self.group, dataclasses.replace(group, **{self.field: value}))


class _Renamed(TypedDict, total=False):
    """The options' old names: they still work, with a DeprecationWarning."""

    engine_workers: int
    max_pending: int
    concurrency: int
    request_timeout: float
    shutdown_timeout: float | None
    retries: Mapping[Any, Retry]


class Dispatcher:
    """Routes events, commands and queries to their handlers, in this process."""

    def __init__(
        self,
        *,
        # How much runs at once (transport handlers, background workers, queued background
        # work) and how long to wait (for a routed request's answer, for stop() to drain).
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        # This process: failures nobody awaits, signals, custom router classes.
        error_handler: ErrorHandler | None = None,
        listen_for_signals: bool = False,
        events_router_cls: type[EventRouter] | None = None,
        commands_router_cls: type[RequestRouter] | None = None,
        queries_router_cls: type[RequestRouter] | None = None,
        # Across services: the transport, this service's name, which service owns which
        # message, and how messages are encoded.
        transport: Transport | str | None = None,
        service: str | None = None,
        routes: Mapping[Any, str] | None = None,  # Any: a dict of classes is no Mapping[type]
        codec: Codec | None = None,
        # Retrying messages from the transport: the policy, and policies per message type.
        retry: Retry | None = None,
        retry_for: Mapping[Any, Retry] | None = None,
        # The database: units of work, the outbox and its relay, the inbox.
        database: Database | str | None = None,
        unit_of_work: bool = False,
        relay: bool = True,
        # Deprecated names: engine_workers, max_pending, concurrency (limits=Limits(...)),
        # request_timeout, shutdown_timeout (timeouts=Timeouts(...)), retries (retry_for).
        **renamed: Unpack[_Renamed],
    ) -> None:
        if renamed:
            limits, timeouts, retry_for = _renamed(renamed, limits, timeouts, retry_for)
        check_flag("listen_for_signals", listen_for_signals)
        if service is not None:
            check_name("service", service)
        if routes is not None and not isinstance(routes, Mapping):
            raise bad_option(
                "routes",
                routes,
                "a mapping of message classes, message names or 'module.*' patterns to "
                "the names of the services that own them",
            )
        if codec is not None:
            _check_codec(codec)
        if transport is not None and not isinstance(transport, str):
            check_transport_object(transport)
        # A DSN is made into a Database the dispatcher owns (and closes when it stops);
        # a Database passed in may be shared, and is closed by whoever made it.
        owns_database = isinstance(database, str)
        if isinstance(database, str):
            database = Database(database)
        if database is not None and not isinstance(database, Database):
            raise bad_option(
                "database",
                database,
                "an iambus.database.Database (e.g. Database(engine)) or a PostgreSQL DSN",
            )
        check_flag("unit_of_work", unit_of_work)
        check_flag("relay", relay)
        if error_handler is not None and not callable(error_handler):
            raise bad_option(
                "error_handler", error_handler, "callable as fn(exc, message, context)"
            )
        for option, cls, base in (
            ("events_router_cls", events_router_cls, EventRouter),
            ("commands_router_cls", commands_router_cls, RequestRouter),
            ("queries_router_cls", queries_router_cls, RequestRouter),
        ):
            if cls is not None and not (isinstance(cls, type) and issubclass(cls, base)):
                raise bad_option(option, cls, f"a subclass of {base.__name__}")
        self.remote: Remote | None = None
        self.limits = Limits() if limits is None else limits
        self.timeouts = Timeouts() if timeouts is None else timeouts
        self._router_classes: dict[Kind, type[Router]] = {
            "event": events_router_cls or EventRouter,
            "command": commands_router_cls or RequestRouter,
            "query": queries_router_cls or RequestRouter,
        }
        self._routers: dict[Kind, Router] = {}
        self.providers = ProviderRegistry()
        self.middleware: list[Middleware] = []
        self.error_handler: ErrorHandler = error_handler or log_error
        self.listen_for_signals = listen_for_signals
        self.retry = checked_policy("retry", retry) or Retry()
        self.retry_for = _policies("retries" if "retries" in renamed else "retry_for", retry_for)
        # Across services: a transport and the routes that decide what uses it.
        self.service = service
        self.routes = Routes(routes)
        if transport is not None:
            self.remote = Remote(
                transport,
                service=service,
                routes=self.routes,
                codec=codec or JsonCodec(),
                request_timeout=self.timeouts.request,
                owned=isinstance(transport, str),
            )
        elif self.routes:
            raise ImproperlyConfigured(
                "routes need a transport to send routed messages through: pass "
                "transport='memory://' (or 'redis://...') with them"
            )
        self._worker: Worker | None = None
        self.telemetry: Telemetry | None = None  # observers: see instrument()
        # The database of units of work (and of the outbox its relay sends from).
        self.database = database
        self._owns_database = owns_database
        self._every_unit = unit_of_work  # Dispatcher(unit_of_work=True): every handler
        self.relay = relay
        self._relay: Relay | None = None  # sends the database's outbox while started

        self._state = _NEW
        # True only while started: the one check on the hot path.
        self._open = False
        # What runs for each message type, compiled at start (see iambus.routes). The
        # sending fast paths read its maps through these names: the same objects, which
        # the table fills in place, so that a send is a dict lookup and a call.
        table = self._table = RouteTable(self._report)
        self._fast_commands = table.fast_commands
        self._fast_queries = table.fast_queries
        self._event_cache = table.event_cache
        self._quiet = table.quiet
        self._published_to = table.published_to
        self._deliver = table.deliver
        self._engine: Engine | None = None
        self._shutdown: asyncio.Event | None = None
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None  # what stopped the worker, if anything
        self._draining: asyncio.Task[Any] | None = None  # the task running stop()'s drain
        self._draining_worker: Worker | None = None
        self._forced = False  # a second signal cut the drain short

    # -- options --------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """How much runs at once (see ``Limits``); set it before the dispatcher starts."""
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        if not isinstance(limits, Limits):
            raise bad_option("limits", limits, "a Limits(...), e.g. Limits(concurrency=64)")
        self._limits = limits

    @property
    def timeouts(self) -> Timeouts:
        """How long to wait (see ``Timeouts``)."""
        return self._timeouts

    @timeouts.setter
    def timeouts(self, timeouts: Timeouts) -> None:
        if not isinstance(timeouts, Timeouts):
            raise bad_option("timeouts", timeouts, "a Timeouts(...), e.g. Timeouts(request=5.0)")
        self._timeouts = timeouts
        if self.remote is not None:
            self.remote.request_timeout = timeouts.request

    # The old names of options, as attributes (deprecated, like the keywords).
    engine_workers = _Moved("limits", "background")
    max_pending = _Moved("limits", "max_pending")
    concurrency = _Moved("limits", "concurrency")
    request_timeout = _Moved("timeouts", "request")
    shutdown_timeout = _Moved("timeouts", "shutdown")
    retries = _Moved("retry_for", None)

    # -- routers and registration ---------------------------------------------------

    @property
    def events(self) -> EventRouter:
        """The event router (created on first use)."""
        return self._router("event")  # type: ignore[return-value]

    @property
    def commands(self) -> RequestRouter:
        """The command router (created on first use)."""
        return self._router("command")  # type: ignore[return-value]

    @property
    def queries(self) -> RequestRouter:
        """The query router (created on first use)."""
        return self._router("query")  # type: ignore[return-value]

    def _router(self, kind: Kind) -> Router:
        router = self._routers.get(kind)
        if router is None:
            router = self._routers[kind] = self._router_classes[kind](self, kind=kind)
        return router

    def register_event_handler(
        self, message: MessageKey, /, handler: Any, **kwargs: Any
    ) -> Handler:
        """Same as ``dp.events.bind(message, handler, **kwargs)``."""
        return self.events.bind(message, handler, **kwargs)

    def register_command_handler(
        self, message: MessageKey, /, handler: Any, **kwargs: Any
    ) -> Handler:
        """Same as ``dp.commands.bind(message, handler, **kwargs)``."""
        return self.commands.bind(message, handler, **kwargs)

    def register_query_handler(
        self, message: MessageKey, /, handler: Any, **kwargs: Any
    ) -> Handler:
        """Same as ``dp.queries.bind(message, handler, **kwargs)``."""
        return self.queries.bind(message, handler, **kwargs)

    def add_middleware(self, middleware: Middleware) -> None:
        """Run ``middleware`` around every handler call, outside router middleware."""
        if self.started:
            raise RegistrationClosed(
                "cannot add middleware: the dispatcher has started; add it before "
                "dp.start(), the first send, or `async with dp`"
            )
        check_middleware(middleware)
        self.middleware.append(middleware)

    def instrument(self, *observers: Observer) -> None:
        """Attach ``observers`` (``iambus.tracing.Tracing()``, ``iambus.metrics.Metrics()``,
        ...): each watches every message this dispatcher sends through its transport,
        processes from it and settles, and its relay sends. See ``iambus.telemetry``."""
        if self.started:
            raise RegistrationClosed(
                "cannot instrument the dispatcher: it has started; attach observers before "
                "dp.start(), the first send, or `async with dp`"
            )
        self.telemetry = Telemetry.of(*observers, before=self.telemetry)
        if self.remote is not None:
            self.remote.telemetry = self.telemetry

    def request_handler(self, key: MessageKey) -> Handler | None:
        """The command or query handler bound to ``key``, if any."""
        for kind in ("command", "query"):
            router = self._routers.get(kind)
            if isinstance(router, RequestRouter) and key in router.map:
                return router.map[key]
        return None

    # -- units of work --------------------------------------------------------------

    def unit_of_work(self, session: Any = None) -> Scope:
        """``async with dp.unit_of_work(session):`` sends into the transaction of
        ``session`` (a SQLAlchemy ``AsyncSession`` or an asyncpg connection; None: a new
        one of the dispatcher's database). See ``iambus.unit_of_work``."""
        if self.database is None:
            raise ImproperlyConfigured(
                "dp.unit_of_work() writes to the outbox of the dispatcher's database, and it "
                "has none: pass Dispatcher(database=Database(...)) (see iambus.database)"
            )
        return Scope(self._table, self.database, self.remote, session)

    def open_unit(self) -> UnitOfWork | None:
        """The unit of work of this dispatcher open where this is called, if any."""
        return self._table.open_unit()

    # -- lifecycle ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once started (and after a stop): registration is closed."""
        return self._state != _NEW

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``stop()`` begins."""
        return self._state == _STARTED

    def health(self) -> WorkerHealth | None:
        """What its worker is doing (consuming? receiving failing for how long?), for a
        health probe; None when no worker runs (not started, stopped, or nothing to
        consume). See ``iambus.monitoring``."""
        worker = self._worker
        return worker.health() if worker is not None else None

    def start(self) -> None:
        """Finalise the handler maps. Works with or without a running event loop.

        Binding afterwards raises ``RegistrationClosed``. With nothing bound it logs a
        warning and does nothing, leaving registration open. Sending starts the
        dispatcher implicitly; calling ``start()`` again is harmless, and after
        ``stop()`` it reopens the dispatcher.
        """
        if self._state == _STARTED:
            return
        if self._state == _STOPPING:
            raise DispatcherStopped(
                "the dispatcher is stopping; await dp.stop() (or dp.wait_for_shutdown()) "
                "before starting it again"
            )
        if self._state == _NEW:
            if not self.routes and not any(r.handlers() for r in self._routers.values()):
                logger.warning("iambus: no handlers registered; the dispatcher was not started")
                return
            self._table.compile(
                self._routers,
                self.middleware,
                remote=self.remote,
                database=self.database,
                every_unit=self._every_unit,
                retry=self.retry,
                retry_for=self.retry_for,
            )
        self._state = _STARTED
        self._failure = None
        self._open = True
        self._table.open()
        if self._shutdown is not None:
            self._shutdown.clear()  # waiters from before the start keep waiting on it
        if self.listen_for_signals:
            self._install_signals()
        logger.debug("iambus: dispatcher started")

    async def __aenter__(self) -> Dispatcher:
        self.start()
        if self.listen_for_signals:
            self._install_signals()
        await self._start_remote()
        return self

    async def _start_remote(self) -> None:
        if self.remote is None or self._state != _STARTED:
            return
        await self.remote.open()
        if self.database is not None and self.relay and self._relay is None:
            # Every started dispatcher with a database relays its outbox: several relays
            # share the work, each lane held by one at a time (see iambus.relay). Started
            # first: a database it cannot use fails the start before anything consumes.
            observers = () if self.telemetry is None else self.telemetry.observers
            relay = Relay(self.database, self.remote.transport, observers=observers)
            await relay.start()
            self._relay = relay
        try:
            await self._start_worker()
        except BaseException:
            # The start failed after the relay started: stop it too (and close a database
            # of our own), so that nothing of this start is left running; entering again
            # starts a new one.
            await self._stop_relay(StopDeadline.after(0))
            raise

    async def _start_worker(self) -> None:
        assert self.remote is not None
        if not self._table.subscriptions:
            logger.info(
                "iambus: service %s sends routed messages through %s; it binds no handler "
                "for one, so it consumes nothing",
                self.service,
                redact(self.remote.transport.url),
            )
        elif self._worker is None:
            worker = Worker(
                self.remote,
                self._table.subscriptions,
                concurrency=self.limits.concurrency,
                batch=min(32, self.limits.concurrency),
                report=self._report,
                fatal=self._worker_failed,
            )
            try:
                await worker.start()
            except BaseException:
                # A declare failed (the broker going down...): stop what did start, and
                # keep no worker, so that entering again (a supervisor's retry) starts one.
                await worker.stop(StopDeadline.after(0))
                raise
            self._worker = worker

    def _worker_failed(self, exc: BaseException) -> None:
        # The worker met an error retrying cannot fix: stop, and let run() and
        # wait_for_shutdown() raise it.
        if self._failure is None:
            self._failure = exc
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.get_running_loop().create_task(
                self.stop(), context=outside_workers()
            )

    async def run(self) -> None:
        """Serve until stopped: start, consume from the transport, stop on SIGINT/SIGTERM.

        The main loop of a worker process (``iambus worker`` calls it). Signal handling
        is installed for the duration, whatever ``listen_for_signals`` says. When the
        worker meets an error that retrying cannot fix (``ImproperlyConfigured``,
        ``TransportRefused``), it stops and ``run()`` raises that error.
        """
        self.listen_for_signals = True
        async with self:
            await self.wait_for_shutdown()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking messages, let queued and running background work finish, stop.

        Waits at most ``timeout`` seconds (default: ``timeouts.shutdown``); what is still
        queued or running then is cancelled, and logged as lost. The one deadline covers
        every wait — handlers fed by the transport, background work, giving back what the
        worker holds, closing the transport — so it returns within ``timeout`` plus 2 s
        whatever hangs (see ``StopDeadline``). While it drains, sends from the background
        handlers being drained are accepted (they are part of the work); any other send
        raises ``DispatcherStopped``.
        """
        if timeout is not None:
            check_seconds("stop(timeout=...)", timeout, zero=True)  # before any state changes
        if self._state in (_NEW, _STOPPED):
            self._signal_shutdown()  # nothing runs; a NEW dispatcher stays open to binding
            return
        if in_worker.get():
            # From a background handler: draining would wait for this very handler, so
            # the stop runs in a task of its own; this call returns at once.
            if self._stop_task is None or self._stop_task.done():
                self._stop_task = asyncio.get_running_loop().create_task(
                    self.stop(timeout), context=outside_workers()
                )
            return
        if self._state == _STOPPING:
            await self._shutdown_event().wait()
            return
        self._state = _STOPPING
        self._open = False
        # Every send now takes the checked path, which admits only drained handlers.
        self._table.close()
        timeout = self.timeouts.shutdown if timeout is None else timeout
        engine = self._engine
        deadline = StopDeadline.after(timeout)  # one deadline for every wait below
        # A second SIGINT/SIGTERM cancels this drain, or the close after it (see
        # _on_signal): what runs then stays unacked, and the transport is closed at once.
        self._draining, self._forced = asyncio.current_task(), False
        loop = asyncio.get_running_loop()
        worker_stopped = False
        try:
            if self._worker is not None:
                self._draining_worker, self._worker = self._worker, None
                await self._draining_worker.stop(deadline)
            worker_stopped = True
            await self._committed_work(seconds_until(deadline.drain))
            if engine is not None and engine.loop is loop:
                try:
                    async with asyncio.timeout_at(deadline.drain):
                        await engine.join()
                except TimeoutError:
                    logger.warning(
                        "iambus: stop timed out after %ss with %d background message(s) "
                        "queued or running; they are cancelled and lost",
                        timeout,
                        engine.pending,
                    )
                await engine.close(seconds_until(deadline.unwind))
        except asyncio.CancelledError:
            if not self._stopped_at_once():
                raise
            worker = self._draining_worker
            if worker is not None and not worker_stopped:
                await self._give_back(worker, deadline.close)  # the drain did not get there
            if engine is not None and engine.loop is loop:
                await engine.close(seconds_until(deadline.unwind))
        finally:
            self._draining_worker = None
            self._engine = None
            try:
                await self._stop_relay(deadline)
                await self._close_remote(deadline.close)
            finally:
                self._draining = None
                self._state = _STOPPED
                self._remove_signals()
                self._signal_shutdown()
        logger.debug("iambus: dispatcher stopped")

    def _stopped_at_once(self) -> bool:
        # In stop(), on a CancelledError: True if it is a second signal's (see _force),
        # taken back so that stop() returns normally; False if someone else cancelled.
        current = asyncio.current_task()
        if not self._forced or current is None or self._draining is not current:
            return False
        current.uncancel()
        return True

    async def _give_back(self, worker: Worker, by: float | None) -> None:
        # A forced stop cut the worker's drain short: what its handlers held still goes
        # to the other instances now, not after claim_after (a transport passed in lives on).
        assert self.remote is not None
        try:
            if await bounded(self.remote.transport.leave(worker.consumer), by):
                return
            why = "took too long"
        except Exception as exc:
            why = f"failed ({exc})"
        logger.warning(
            "iambus: giving back what the worker held %s; it is redelivered after claim_after",
            why,
        )

    async def _stop_relay(self, deadline: StopDeadline) -> None:
        # After the handlers: rows they committed while draining are sent, or stay in
        # the outbox for the next relay; never lost.
        relay, self._relay = self._relay, None
        try:
            if relay is not None:
                await relay.stop(deadline.unwind)
        finally:
            if self.database is not None and self._owns_database:
                await self.database.close(seconds_until(deadline.close))

    async def _close_remote(self, by: float | None) -> None:
        if self.remote is None:
            return
        forced = self._forced
        closing = asyncio.ensure_future(self.remote.close())
        try:
            if await bounded(closing, by):
                return
            left = "took too long"
        except asyncio.CancelledError:
            if forced or not self._stopped_at_once():
                raise
            closing.cancel()  # a second signal while closing: stop now
            left = "was interrupted by a second signal"
        logger.warning(
            "iambus: closing the transport %s %s; left behind", self.remote.transport.url, left
        )

    async def join(self) -> None:
        """Return once all background work — and what it cascaded — has finished."""
        if in_worker.get():
            raise WouldDeadlock(
                "dp.join() from a background handler would wait for that handler itself; "
                "call it from the code that sent the messages"
            )
        settle = self.remote.transport.join if self.remote else None
        loop = asyncio.get_running_loop()
        while True:
            await self._committed_work(None)
            engine = self._engine
            if engine is not None and engine.loop is loop:
                await engine.join()
            if settle is not None:
                await settle()  # a MemoryTransport: every message between services settled
            if any(task.get_loop() is loop for task in self._table.committed):
                continue  # (work of a commit made meanwhile)
            engine = self._engine
            if settle is None or engine is None or engine.loop is not loop:
                return  # (an engine of another loop is not this loop's to wait for)
            if not engine.pending:
                return

    async def _committed_work(self, within: float | None) -> None:
        """Wait for the in-process work that commits of callers' SQLAlchemy transactions
        set running (see ``unit_of_work``), and what it set running in turn; past
        ``within`` seconds (None: no limit), cancel what still runs, as lost."""
        loop = asyncio.get_running_loop()
        end = None if within is None else loop.time() + within
        while tasks := [t for t in self._table.committed if t.get_loop() is loop and not t.done()]:
            left = None if end is None else max(end - loop.time(), 0.0)
            _, late = await asyncio.wait(tasks, timeout=left)
            if late:
                for task in late:
                    task.cancel()
                logger.warning(
                    "iambus: stop timed out with %d in-process job(s) of committed units of "
                    "work running; they are cancelled and lost",
                    len(late),
                )
                await asyncio.wait(late, timeout=1.0)
                return

    async def wait_for_shutdown(self) -> None:
        """Return when ``stop()`` has finished, or a signal stopped the dispatcher.

        Raises the error that stopped the worker, if one did (see ``run()``).
        """
        if self.listen_for_signals and self._state == _STARTED:
            self._install_signals()
        if self._state != _STOPPED:
            await self._shutdown_event().wait()
        if self._failure is not None:
            raise self._failure

    def _shutdown_event(self) -> asyncio.Event:
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
        return self._shutdown

    def _signal_shutdown(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    def _install_signals(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # installed when the dispatcher is first used inside a loop
        if self._signal_loop is loop:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._signal_loop = loop

    def _remove_signals(self) -> None:
        loop, self._signal_loop = self._signal_loop, None
        if loop is not None and not loop.is_closed():
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        signalled = self._stop_task is not None and not self._stop_task.done()
        if signalled and self._draining is not None and not self._forced:
            self._force(name)
            return
        logger.info("iambus: received %s, stopping", name)
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    def _force(self, name: str) -> None:
        """A second signal while draining: stop now, leaving what runs unacked."""
        assert self._draining is not None
        self._forced = True
        worker = self._draining_worker
        unacked = worker.abort() if worker is not None else 0
        engine = self._engine
        lost = engine.pending if engine is not None else 0
        logger.warning(
            "iambus: received %s again, stopping now: %d message(s) from the transport stay "
            "unacked and will be redelivered; %d background message(s) of this process "
            "are dropped",
            name,
            unacked,
            lost,
        )
        self._draining.cancel()

    def _ensure_open(self) -> None:
        # Called only when ``_open`` is false: not started yet, draining, or stopped.
        if self._state == _NEW:
            self.start()
        elif self._state == _STOPPED:
            raise DispatcherStopped(
                "the dispatcher was stopped and takes no more messages; call dp.start() "
                "(or enter `async with dp`) to use it again"
            )
        elif self._state == _STOPPING and not in_worker.get():
            # While draining, only the background handlers being drained may still send:
            # what they send is part of the work. Everyone else is turned away.
            raise DispatcherStopped(
                "the dispatcher is stopping and takes no new messages; send before "
                "dp.stop(), or start it again once stopped"
            )

    # -- sending --------------------------------------------------------------------

    @overload
    async def query(
        self, query: Query[R], /, *, key: str | None = None, timeout: float | None = None
    ) -> R: ...

    @overload
    async def query(
        self, query: Any, /, *, key: str | None = None, timeout: float | None = None
    ) -> Any: ...

    async def query(
        self, query: Any, /, *, key: str | None = None, timeout: float | None = None
    ) -> Any:
        """Run the query's handler and return its result.

        ``timeout`` (seconds) bounds the wait: ``RequestTimeout`` when it passes. A routed
        query is a request to its owner service (default timeout: ``timeouts.request``).
        """
        # The hot path: the fast map holds the handler call of each plain route (no
        # middleware, no event collection, no response_event) only while the dispatcher
        # is open, so one lookup answers "open, known, plain"; the rest goes the long way.
        invoke = self._fast_queries.get(type(query))
        if invoke is None or key is not None or timeout is not None:
            return await self._send_request("query", query, key, timeout)
        result = await invoke(query)
        # Plain routes have no response_event, so a result of a type in ``quiet`` is no
        # event: that set lookup spares most calls the call deciding it (see routes).
        if result is not None and type(result) not in self._quiet:
            routes = self._published_to(result, query, None)
            if routes:
                await self._deliver(routes, result, None, True)
        return result

    @overload
    async def execute(
        self, command: Command[R], /, *, key: str | None = None, timeout: float | None = None
    ) -> R: ...

    @overload
    async def execute(
        self, command: Any, /, *, key: str | None = None, timeout: float | None = None
    ) -> Any: ...

    async def execute(
        self, command: Any, /, *, key: str | None = None, timeout: float | None = None
    ) -> Any:
        """Run the command's handler and return its result, or raise its exception.

        Events it emits have been published (their handlers have run) when this returns.
        A routed command is a request to its owner service: its result comes back
        decoded into the ``R`` of ``Command[R]``, a failure as ``RemoteError`` once the
        owner gave up retrying it, and ``RequestTimeout`` after ``timeout`` seconds
        (default: ``timeouts.request``). To hand a command over without waiting, use
        ``send()``.
        """
        invoke = self._fast_commands.get(type(command))
        if invoke is None or key is not None or timeout is not None:
            return await self._send_request("command", command, key, timeout)
        result = await invoke(command)
        # Plain routes have no response_event, so a result of a type in ``quiet`` is no
        # event: that set lookup spares most calls the call deciding it (see routes).
        if result is not None and type(result) not in self._quiet:
            routes = self._published_to(result, command, None)
            if routes:
                await self._deliver(routes, result, None, True)
        return result

    async def publish(self, event: Any, /, *, key: str | None = None) -> None:
        """Run every handler of ``event`` concurrently; return when all have run.

        Raises an ``ExceptionGroup`` of the failures, if any, after all have run. An
        event nobody handles is fine.
        """
        if not self._open:
            self._ensure_open()
        if key is not None:
            if self._table.units and await self._into_unit(event, key, publish=True):
                return
            await self._through_lane(self._table.publish_raising, event, key)
            return
        mkey = event if type(event) is str else type(event)
        routes = self._event_cache.get(mkey)
        if routes is None:
            routes = self._table.event_handlers(mkey)
        only = routes[0] if len(routes) == 1 else None
        if isinstance(only, RemoteRoute):
            # Sent, handled by no one here: what deliver() would do (a failure raised as
            # it is, no unit of work in between), without its frame on the way to the
            # broker's ack (~1 µs a send).
            await only.run(event, None)
        elif routes:
            await self._deliver(routes, event, None, False)

    @overload
    async def handle(
        self,
        message: Query[R] | Command[R],
        /,
        *,
        key: str | None = None,
        wait_for_response: Literal[True],
    ) -> R: ...

    @overload
    async def handle(
        self, message: Any, /, *, key: str | None = None, wait_for_response: bool = False
    ) -> Any: ...

    async def handle(
        self, message: Any, /, *, key: str | None = None, wait_for_response: bool = False
    ) -> Any:
        """Send ``message`` to whichever router knows it: events, commands, then queries.

        ``wait_for_response=False`` queues it for the background workers and returns
        once queued (waiting for room if ``limits.max_pending`` messages are pending); a routed
        message is sent to the transport instead (``send()``).
        ``wait_for_response=True`` returns the command's or query's result, or waits for
        an event's handlers, raising failures as ``publish``/``execute``/``query`` do.
        """
        if not self._open:
            self._ensure_open()
        mkey = message_key(message)
        _check_key(key)
        table = self._table
        if self.remote is not None:
            remote = table.routed(mkey)
            if remote is not None:
                # Routed: handed to the broker now, whether or not the caller waits —
                # durability is the broker's job, not an in-memory queue's. A routed
                # query always waits for its answer.
                if wait_for_response or remote.kind == "query":
                    result = await remote.run(message, key)
                    return result if wait_for_response else None
                await remote.send(message, key)
                return None
        job: JobFn
        # Events bound to this very type first (the seed's order: events, commands,
        # queries); handlers bound to a base class (or ``object``) only when no command or
        # query handler claims the type, so a catch-all audit handler never swallows one.
        commands, queries = table.commands, table.queries
        if mkey in table.events or (
            mkey not in commands and mkey not in queries and table.event_handlers(mkey)
        ):
            if wait_for_response:
                return await self.publish(message, key=key)
            job = table.publish_reporting
        elif mkey in commands or mkey in queries:
            if wait_for_response:
                if key is not None and not (table.units and table.open_unit() is not None):
                    return await self._through_lane(self._request, message, key)
                return await self._request(message, key)  # in a unit: inline, joining it
            job = self._request_reporting
        else:
            # Before a unit of work defers it: the error belongs to the sender, now.
            raise HandlerDoesNotExist(
                f"no event, command or query handler is bound for {describe(mkey)}; "
                f"bind one with dp.events / dp.commands / dp.queries .register(...) "
                f"before sending it"
            )
        if table.units and await self._into_unit(message, key):
            return None
        await self._background().put(job, message, key, None)

    async def send(self, message: Any, /, *, key: str | None = None, id: str | None = None) -> None:
        """Hand a command or an event over without waiting for its handlers.

        Routed, it goes to the transport and this returns once the broker has it (the
        owner's worker handles it, retries it, dead-letters it; nobody waits for its
        result). Not routed, it is queued for the background workers, as
        ``handle(message)`` does.

        ``id`` gives the envelope that id instead of a new one, and ``message`` may be a
        ready ``Envelope``: a send that raised ``TransportError`` may still have been
        stored, and resending the same id lets a broker that deduplicates (NATS, within
        its duplicate window) store it once. Queries are asked, not sent: ``query()``.
        """
        if isinstance(message, Envelope):
            if key is not None or id is not None:
                raise TypeError(
                    "an Envelope is sent as it is, with its own id and key; pass neither "
                    "key= nor id= with one"
                )
            await self._send_envelope(message)
            return
        if id is not None and (not isinstance(id, str) or not id):
            raise TypeError(
                f"id must be a non-empty string (the envelope id, e.g. one a failed send "
                f"used), got {id!r}"
            )
        if not self._open:
            self._ensure_open()
        mkey = message_key(message)
        _check_key(key)
        table = self._table
        if self.remote is not None:
            routed = table.routed(mkey)
            if routed is not None:
                if routed.kind == "query":
                    raise _not_sent(describe(mkey))
                await routed.send(message, key, id)
                return
        if mkey in table.queries and mkey not in table.commands and mkey not in table.events:
            raise _not_sent(describe(mkey))  # what handle() would run is the query handler
        await self.handle(message, key=key)

    async def _send_envelope(self, envelope: Envelope) -> None:
        remote = self.remote
        if remote is None:
            raise ImproperlyConfigured(
                f"an Envelope ({envelope.name}) goes to a transport, and this dispatcher has "
                f"none: pass Dispatcher(transport=..., routes=...)"
            )
        if not self._open:
            self._ensure_open()
        mkey = remote.registry.key_of(envelope.name)
        if mkey is None:
            # Kept by an earlier process: its class may be routed by name or by module,
            # and not sent by this process yet.
            mkey = self._message_named(envelope.name)
            if mkey is not None:
                remote.registry.add(mkey)
        route = self._table.routed(mkey) if mkey is not None else None
        if route is None:
            owner = self.routes.owner(envelope.name)
            raise ImproperlyConfigured(
                f"cannot send the envelope of {envelope.name!r}: "
                + (
                    f"it is routed to {owner!r} by name, but whether it is a command or an "
                    f"event comes from its class, which is not found by that name here "
                    f"(a Command or Query subclass is found once its module is imported; "
                    f"a plain event class only when routed by class or by 'module.*')"
                    if owner is not None
                    else "no routed message of that name is known here. Route its class "
                    "(routes={MyMessage: 'service'}, by name or 'module.*')"
                )
                + f", or send the message itself again with id={envelope.id!r}"
            )
        if route.kind == "query":
            raise _not_sent(repr(envelope.name))
        await remote.send_envelope(route.kind, envelope)

    def _message_named(self, name: str) -> MessageKey | None:
        """The routed message called ``name`` on the wire: bound here, or a loaded class
        (a command or query by its marker, any message of a module routed by pattern)."""
        for table in (self._table.commands, self._table.queries, self._table.events):
            for key in table:
                if message_name(key) == name and self.routes.owner(key) is not None:
                    return key
        found = list(
            dict.fromkeys(
                cls
                for cls in _loaded_messages(self.routes.patterns())
                if message_name(cls) == name and self.routes.owner(cls) is not None
            )
        )
        if len(found) > 1:
            raise ImproperlyConfigured(
                f"cannot send the envelope of {name!r}: several routed classes have that "
                f"name ({', '.join(describe(cls) for cls in found)}); give each a distinct "
                f"one with @iambus.contract('...')"
            )
        return found[0] if found else None

    # -- internals: requests, units of work, reporting ----------------------------------

    def _send_request(
        self, kind: Kind, message: Any, key: str | None, timeout: float | None = None
    ) -> Awaitable[Any]:
        # Not async: it hands back the coroutine to await, one layer fewer per call.
        if timeout is not None:
            # Checked before anything is sent (a routed command would be stored first).
            check_seconds(
                "query(timeout=...)" if kind == "query" else "execute(timeout=...)", timeout
            )
        if not self._open:
            self._ensure_open()
        table = self._table
        routes = table.queries if kind == "query" else table.commands
        mkey = message_key(message)
        route = routes.get(mkey) or table.remote_route(mkey, kind)
        if route is None:
            raise self._missing(kind, message)
        _check_key(key)
        if isinstance(route, RemoteRoute):
            return route.run(message, key, timeout)  # ordered by the broker, not a lane
        if timeout is not None:
            return _within(timeout, self._send_request(kind, message, key), message)
        if key is not None and not (table.units and table.open_unit() is not None):
            return self._through_lane(self._request, message, key)
        # In a unit of work, inline even with a key: it joins the unit (a lane's task
        # would run it outside), and is not queued behind other work of its key.
        return route.run(message, key)

    def _missing(self, kind: Kind, message: Any) -> HandlerDoesNotExist:
        mkey = message_key(message)
        router, other, other_kind = (
            ("queries", self._table.commands, "command")
            if kind == "query"
            else ("commands", self._table.queries, "query")
        )
        hint = f" (it has a {other_kind} handler: send it with that)" if mkey in other else ""
        return HandlerDoesNotExist(
            f"no {kind} handler is bound for {describe(mkey)}{hint}; bind one with "
            f"@dp.{router}.register(...) before sending it"
        )

    async def _request(self, message: Any, key: str | None) -> Any:
        mkey = message_key(message)
        route = self._table.commands.get(mkey) or self._table.queries[mkey]
        return await route.run(message, key)

    async def _request_reporting(self, message: Any, key: str | None) -> None:
        mkey = message_key(message)
        route = self._table.commands.get(mkey) or self._table.queries[mkey]
        try:
            await route.run(message, key)
        except Exception as exc:
            await self._report(exc, message, route.context_for(key))

    async def _into_unit(self, message: Any, key: str | None, *, publish: bool = False) -> bool:
        """In a unit of work, an in-process send without waiting (``handle``) or a keyed
        ``publish`` is left until the unit has committed, and a routed keyed event goes
        into the unit's outbox: True when it went into the unit (see ``unit_of_work``)."""
        unit = self.open_unit()
        if unit is None:
            return False
        if not publish:

            async def later() -> None:
                await self.handle(message, key=key)

            unit.after_commit(later)
            return True
        routes = self._table.event_handlers(message_key(message))
        if routes and isinstance(routes[0], RemoteRoute):
            await routes[0].send(message, key)  # not through a lane: the unit keeps order
        elif routes:

            async def later() -> None:
                try:
                    await self.publish(message, key=key)
                except Exception as exc:
                    name = f"handlers of {describe(message_key(message))}"
                    await self._report(exc, message, Context("event", name, key))

            unit.after_commit(later)
        return True

    async def _report(self, exc: BaseException, message: Any, context: Context) -> None:
        try:
            outcome = self.error_handler(exc, message, context)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception(
                "iambus: error_handler %r failed while reporting an error of %s",
                self.error_handler,
                context.handler,
            )
            await log_error(exc, message, context)

    # -- internals: background ------------------------------------------------------

    def _background(self) -> Engine:
        engine = self._engine
        loop = asyncio.get_running_loop()
        if engine is None or engine.loop is not loop:
            if engine is not None and engine.pending:
                logger.warning(
                    "iambus: %d background message(s) of a previous event loop are lost",
                    engine.pending,
                )
            engine = self._engine = Engine(
                workers=self.limits.background,
                max_pending=self.limits.max_pending,
                orphaned=self._orphaned,
            )
            if self.listen_for_signals:
                self._install_signals()
        return engine

    async def _orphaned(self, exc: BaseException, message: Any, key: Any) -> None:
        # An awaited keyed send whose caller stopped waiting (timeout, cancellation)
        # still failed: nobody will see the exception, so report it.
        mkey = message_key(message)
        route = self._table.commands.get(mkey) or self._table.queries.get(mkey)
        context = (
            route.context_for(key)
            if route is not None
            else Context("event", f"handlers of {describe(mkey)}", key)
        )
        await self._report(exc, message, context)

    async def _through_lane(self, job: JobFn, message: Any, key: str) -> Any:
        _check_key(key)
        if current_key.get() == key:
            raise WouldDeadlock(
                f"a handler running under key {key!r} awaits a send of "
                f"{describe(message_key(message))} with the same key, which can only run "
                f"after that handler returns; send it without waiting "
                f"(await dp.handle(message, key={key!r})), or emit it as an event"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._background().put(job, message, key, future)
        return await future


# Old option name -> (group, field): limits=Limits(field=...), timeouts=Timeouts(field=...),
# or (field None) retry_for= itself.
_OLD_NAMES: dict[str, tuple[str, str | None]] = {
    "engine_workers": ("limits", "background"),
    "max_pending": ("limits", "max_pending"),
    "concurrency": ("limits", "concurrency"),
    "request_timeout": ("timeouts", "request"),
    "shutdown_timeout": ("timeouts", "shutdown"),
    "retries": ("retry_for", None),
}
_GROUPS = {"limits": "Limits", "timeouts": "Timeouts"}


def _replacement(old: str) -> str:
    group, field = _OLD_NAMES[old]
    if field is None:
        return f"{group}=..."
    return f"{group}={_GROUPS[group]}({field}=...)"


def _deprecated(what: str, old: str, stacklevel: int) -> None:
    warnings.warn(
        f"{what} {old} is deprecated; use {_replacement(old)} instead "
        f"(see docs/dispatching.md#options)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def _renamed(
    renamed: Mapping[str, Any],
    limits: Limits | None,
    timeouts: Timeouts | None,
    retry_for: Mapping[Any, Retry] | None,
) -> tuple[Limits | None, Timeouts | None, Mapping[Any, Retry] | None]:
    """The options given by their old names, moved into their groups (with a warning)."""
    fields: dict[str, dict[str, Any]] = {"limits": {}, "timeouts": {}}
    given = {"limits": limits, "timeouts": timeouts, "retry_for": retry_for}
    for old, value in renamed.items():
        if old not in _OLD_NAMES:
            raise TypeError(f"Dispatcher() got an unexpected keyword argument {old!r}")
        _deprecated("Dispatcher(...) option", old, stacklevel=3)
        group, field = _OLD_NAMES[old]
        if given[group] is not None:
            raise ImproperlyConfigured(
                f"{old}= is the old name of {group}{'' if field is None else '.' + field}, "
                f"and {group}= is given too: pass {_replacement(old)} alone"
            )
        if old == "request_timeout":
            check_seconds(old, value)  # checked under the name it was given by
        elif old == "shutdown_timeout":
            check_seconds(old, value, zero=True, none="no limit")
        elif field is not None:
            check_count(old, value)
        if field is None:
            retry_for = value
        else:
            fields[group][field] = value
    if fields["limits"]:
        limits = Limits(**fields["limits"])
    if fields["timeouts"]:
        timeouts = Timeouts(**fields["timeouts"])
    return limits, timeouts, retry_for


def _policies(option: str, policies: object) -> dict[MessageKey, Retry | None]:
    if policies is None:
        return {}
    if not isinstance(policies, Mapping):
        raise ImproperlyConfigured(
            f"{option} must map message types (or names) to Retry(...), got {policies!r}; "
            f"e.g. {option}={{ChargeCard: Retry(attempts=10)}}"
        )
    return {
        key: checked_policy(f"{option}[{describe(key)}]", policy)
        for key, policy in policies.items()
    }


async def _within(timeout: float, call: Awaitable[Any], message: Any) -> Any:
    try:
        async with asyncio.timeout(timeout) as scope:
            return await call
    except TimeoutError as exc:
        if not scope.expired():
            raise  # the handler's own TimeoutError
        raise RequestTimeout(
            f"{describe(message_key(message))} got no answer within {timeout}s"
        ) from exc


def _loaded_messages(patterns: list[str]) -> Iterator[type]:
    # Every loaded subclass of Command or Query its module holds (not one replaced, as
    # @dataclass(slots=True) does), then the classes defined in the loaded modules that
    # match a routing pattern.
    stack: list[type] = [Command, Query]
    sub: type
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            held: Any = sys.modules.get(sub.__module__)
            for part in sub.__qualname__.split("."):
                held = getattr(held, part, None)
            if held is sub:
                yield sub
    for module_name, module in list(sys.modules.items()):
        if any(module_name == p or module_name.startswith(p + ".") for p in patterns):
            for value in list(vars(module).values()):
                if isinstance(value, type) and value.__module__ == module_name:
                    yield value


def _not_sent(what: str) -> TypeError:
    return TypeError(
        f"{what} is a query: a query is asked for its answer, not sent; use await dp.query(...)"
    )


def _check_codec(codec: object) -> None:
    if (
        isinstance(codec, type)
        or not isinstance(codec, Codec)
        or not isinstance(codec.content_type, str)
        or not codec.content_type
        or not callable(codec.encode)
        or not callable(codec.decode)
    ):
        hint = f" (an instance: {codec.__name__}())" if isinstance(codec, type) else ""
        raise bad_option(
            "codec",
            codec,
            f"a Codec{hint}: an object with a content_type (a non-empty str), "
            f"encode(value) -> bytes and decode(data, into, *, name); e.g. JsonCodec()",
        )


def _check_key(key: object) -> None:
    if key is not None and not isinstance(key, str):
        raise TypeError(
            f"key must be a string (messages with equal keys are handled in order), "
            f"got {key!r}; pass str(...) of what identifies the sequence"
        )
