"""The implementations compared by benchmarks/inprocess.py.

Every ``build_*`` coroutine wires the same five scenarios with one library's
documented, idiomatic API and returns a :class:`Peer`:

* ``S1``    one query round trip (send a query, get its result back);
* ``S2``    one event delivered to ``FANOUT`` handlers;
* ``S3``    a command whose handler produces an event that one event handler
            consumes; one operation ends when that event handler has run;
* ``S4``    ``BATCH`` concurrent queries through ``asyncio.gather``;
* ``S1+mw`` S1 through one pass-through middleware.

An operation is a zero-argument callable returning an awaitable.  Handlers do
trivial work: a query handler returns ``ANSWER``, event handlers and middleware
increment a shared :class:`Tally` (which also lets the harness check that each
scenario really reached its handlers), a command handler returns a message
built once up front.  Messages are built once per peer and reused, so message
construction (a pydantic model for lato, a dataclass elsewhere) is not timed.

A builder that cannot express a scenario puts the reason in ``Peer.na``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED_DIR = HERE / ".seed"

ANSWER = 42
FANOUT = 10
BATCH = 1_000

Op = Callable[[], Awaitable[Any]]


@dataclass
class Tally:
    """Shared counter bumped by event handlers and middleware."""

    n: int = 0


@dataclass
class Peer:
    name: str
    version: str = ""
    ops: dict[str, Op] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)  # scenario -> why it is n/a
    notes: list[str] = field(default_factory=list)  # how the peer is driven
    close: Callable[[], Awaitable[None]] | None = None


# -- plain messages (direct, iambus, seed, blinker) ----------------------------


@dataclass(frozen=True, slots=True)
class GetUser:
    user_id: int


@dataclass(frozen=True, slots=True)
class CreateUser:
    user_id: int


@dataclass(frozen=True, slots=True)
class UserCreated:
    user_id: int


@dataclass(frozen=True, slots=True)
class PageViewed:  # the S2 event, with FANOUT handlers
    page: str


# -- handler factories: fresh function objects for every peer -------------------


async def get_user(query: Any) -> int:
    return ANSWER


def fanout_handlers(tally: Tally) -> list[Callable[[Any], Awaitable[None]]]:
    """FANOUT distinct async handlers (libraries de-duplicate equal callables)."""

    def make() -> Callable[[Any], Awaitable[None]]:
        async def on_page_viewed(event: Any) -> None:
            tally.n += 1

        return on_page_viewed

    return [make() for _ in range(FANOUT)]


def counting_handler(tally: Tally) -> Callable[[Any], Awaitable[None]]:
    async def on_user_created(event: Any) -> None:
        tally.n += 1

    return on_user_created


def gather_op(call: Callable[[], Awaitable[Any]]) -> Op:
    """S4: BATCH copies of one call, awaited together."""

    async def op() -> list[Any]:
        return await asyncio.gather(*[call() for _ in range(BATCH)])

    return op


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# -- direct: the baseline --------------------------------------------------------


async def build_direct(tally: Tally) -> Peer:
    query, command = GetUser(1), CreateUser(1)
    created, viewed = UserCreated(1), PageViewed("/")
    handlers = fanout_handlers(tally)
    on_created = counting_handler(tally)

    async def create_user(cmd: CreateUser) -> UserCreated:
        return created

    async def middleware(message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        tally.n += 1
        return await call_next(message)

    async def s2() -> None:
        for handler in handlers:
            await handler(viewed)

    async def s3() -> None:
        await on_created(await create_user(command))

    return Peer(
        name="direct",
        version="-",
        ops={
            "S1": partial(get_user, query),
            "S2": s2,
            "S3": s3,
            "S4": gather_op(partial(get_user, query)),
            "S1+mw": partial(middleware, query, get_user),
        },
        notes=[
            "direct: plain `await handler(msg)`; S2 awaits the handlers one after "
            "another, S3 awaits the command handler then the event handler, "
            "S1+mw is `await middleware(msg, handler)`."
        ],
    )


# -- iambus: this repository ------------------------------------------------------


def import_ours() -> Any:
    """Import this repository's iambus, preferring the working tree's src/."""
    src = ROOT / "src"
    if (src / "iambus").is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import iambus

    if not hasattr(iambus, "Dispatcher"):
        where = getattr(iambus, "__file__", None) or list(getattr(iambus, "__path__", []))
        raise ImportError(f"iambus at {where} has no Dispatcher (package incomplete?)")
    return iambus


def describe_ours(iambus: Any) -> str:
    version = getattr(iambus, "__version__", None) or _version("iambus")
    where = Path(iambus.__file__).resolve().parent
    if where.is_relative_to(ROOT):
        where = where.relative_to(ROOT)
    return f"{version} from {where}"


async def build_iambus(tally: Tally) -> Peer:
    iambus = import_ours()
    query, command, created, viewed = GetUser(1), CreateUser(1), UserCreated(1), PageViewed("/")

    async def create_user(cmd: CreateUser) -> UserCreated:
        return created  # has an event handler below, so execute() publishes it

    def wire(dp: Any) -> None:
        dp.queries.register(GetUser)(get_user)
        dp.commands.register(CreateUser)(create_user)
        dp.events.register(UserCreated)(counting_handler(tally))
        for handler in fanout_handlers(tally):
            dp.events.bind(PageViewed, handler)

    async def middleware(message: Any, call_next: Any, context: Any) -> Any:
        tally.n += 1
        return await call_next(message)

    dp = iambus.Dispatcher()
    wire(dp)
    dp.start()
    dp_mw = iambus.Dispatcher()
    wire(dp_mw)
    dp_mw.add_middleware(middleware)
    dp_mw.start()

    async def close() -> None:
        for d in (dp, dp_mw):
            await _shutdown(d)

    return Peer(
        name="iambus",
        version=describe_ours(iambus),
        ops={
            "S1": partial(dp.query, query),
            "S2": partial(dp.publish, viewed),
            "S3": partial(dp.execute, command),
            "S4": gather_op(partial(dp.query, query)),
            "S1+mw": partial(dp_mw.query, query),
        },
        notes=[
            "iambus: `Dispatcher.query / publish / execute`; `publish` runs the event "
            "handlers concurrently and returns when all ran; S3's command handler "
            "returns the event and `execute()` returns once its handler has run; "
            "middleware via `add_middleware`."
        ],
        close=close,
    )


async def _shutdown(dp: Any) -> None:
    await dp.join()
    await dp.stop()


# -- seed: iambus 0.2.1 from PyPI, renamed seediambus by setup.sh ------------------


def import_seed() -> Any:
    if not (SEED_DIR / "seediambus").is_dir():
        raise ImportError("seed not prepared: run `bash benchmarks/setup.sh`")
    if str(SEED_DIR) not in sys.path:
        sys.path.insert(0, str(SEED_DIR))
    import seediambus

    return seediambus


async def build_seed(tally: Tally) -> Peer:
    seed = import_seed()
    query, command, created, viewed = GetUser(1), CreateUser(1), UserCreated(1), PageViewed("/")
    loop = asyncio.get_running_loop()
    # The seed's queue workers run the event handler some time after
    # handle(command) returned; S3 waits for it through this future.
    pending: list[asyncio.Future[None]] = []

    async def create_user(cmd: CreateUser) -> UserCreated:
        return created

    async def on_user_created(event: UserCreated) -> None:
        tally.n += 1
        pending.pop().set_result(None)

    # listen_for_signals=False: the default installs SIGINT/SIGTERM handlers.
    dp = seed.Dispatcher(listen_for_signals=False)
    dp.queries.register(GetUser)(get_user)
    dp.commands.register(CreateUser, response_event=UserCreated)(create_user)
    dp.events.register(UserCreated)(on_user_created)
    for handler in fanout_handlers(tally):
        dp.events.bind(PageViewed, handler)
    dp.start()

    async def s3() -> None:
        done = loop.create_future()
        pending.append(done)
        await dp.handle(command)  # returns once the command is queued
        await done

    return Peer(
        name="seed",
        version="0.2.1",
        ops={
            "S1": partial(dp.handle, query, wait_for_response=True),
            "S2": partial(dp.handle, viewed, wait_for_response=True),
            "S3": s3,
            "S4": gather_op(partial(dp.handle, query, wait_for_response=True)),
        },
        na={"S1+mw": "iambus 0.2.1 has no middleware."},
        notes=[
            "seed: iambus 0.2.1 `Dispatcher(listen_for_signals=False).handle(msg, "
            "wait_for_response=True)`: messages go through per-engine queues and one "
            "worker task each; S2 (handlers gathered) waits for all of them through "
            "`wait_for_response`; "
            "S3 registers the command with `response_event=UserCreated` and waits for "
            "the event handler via a future it resolves."
        ],
    )


# -- python-cqrs -------------------------------------------------------------------


async def build_cqrs(tally: Tally) -> Peer:
    import cqrs
    import di
    from cqrs.container.di import DIContainer
    from cqrs.events.event_emitter import EventEmitter
    from cqrs.middlewares.base import MiddlewareChain

    class CqGetUser(cqrs.Request):
        user_id: int

    class CqUserResult(cqrs.Response):
        value: int

    class CqCreateUser(cqrs.Request):
        user_id: int

    class CqUserCreated(cqrs.DomainEvent):
        user_id: int

    class CqPageViewed(cqrs.DomainEvent):
        page: str

    result, created = CqUserResult(value=ANSWER), CqUserCreated(user_id=1)

    class GetUserHandler(cqrs.RequestHandler[CqGetUser, CqUserResult]):
        async def handle(self, request: CqGetUser) -> CqUserResult:
            return result

    class CreateUserHandler(cqrs.RequestHandler[CqCreateUser, None]):
        def __init__(self) -> None:
            self._events: list[cqrs.DomainEvent] = []

        @property
        def events(self) -> list[cqrs.DomainEvent]:
            return self._events

        async def handle(self, request: CqCreateUser) -> None:
            self._events.append(created)

    class OnUserCreated(cqrs.EventHandler[CqUserCreated]):
        async def handle(self, event: CqUserCreated) -> None:
            tally.n += 1

    class OnPageViewed(cqrs.EventHandler[CqPageViewed]):
        async def handle(self, event: CqPageViewed) -> None:
            tally.n += 1

    class PassThrough:  # cqrs.middlewares.base.Middleware protocol
        async def __call__(self, request: Any, handle: Any) -> Any:
            tally.n += 1
            return await handle(request)

    # Handlers are classes resolved per message through a DI container; this
    # is the `di`-backed container that cqrs.bootstrap also builds.
    container = DIContainer()
    container.attach_external_container(di.Container())

    requests = cqrs.RequestMap()
    requests.bind(CqGetUser, GetUserHandler)
    requests.bind(CqCreateUser, CreateUserHandler)
    domain_events = cqrs.EventMap()
    domain_events.bind(CqUserCreated, OnUserCreated)
    emitter = EventEmitter(event_map=domain_events, container=container)
    mediator = cqrs.RequestMediator(
        request_map=requests, container=container, event_emitter=emitter, event_map=domain_events
    )
    chain = MiddlewareChain()
    chain.add(PassThrough())
    mediator_mw = cqrs.RequestMediator(
        request_map=requests, container=container, middleware_chain=chain
    )

    fanout = cqrs.EventMap()
    for i in range(FANOUT):  # EventMap refuses the same handler class twice
        fanout.bind(CqPageViewed, type(f"OnPageViewed{i}", (OnPageViewed,), {}))
    event_mediator = cqrs.EventMediator(event_map=fanout, container=container)

    query, command, viewed = CqGetUser(user_id=1), CqCreateUser(user_id=1), CqPageViewed(page="/")
    return Peer(
        name="python-cqrs",
        version=_version("python-cqrs"),
        ops={
            "S1": partial(mediator.send, query),
            "S2": partial(event_mediator.send, viewed),
            "S3": partial(mediator.send, command),
            "S4": gather_op(partial(mediator.send, query)),
            "S1+mw": partial(mediator_mw.send, query),
        },
        notes=[
            "python-cqrs: `RequestMediator.send` built by hand with a `di` container "
            "(`cqrs.bootstrap` would always append its LoggingMiddleware, which "
            "serialises every request/response); query results are `cqrs.Response` "
            "objects; S2 uses `EventMediator.send` (awaits handlers one by one); S3's "
            "handler exposes the event on `.events` and `send` returns after the "
            "mediator has run its handler."
        ],
    )


# -- lato --------------------------------------------------------------------------


async def build_lato(tally: Tally) -> Peer:
    import lato

    class LaGetUser(lato.Query):
        user_id: int

    class LaCreateUser(lato.Command):
        user_id: int

    class LaUserCreated(lato.Event):
        user_id: int

    class LaPageViewed(lato.Event):
        page: str

    created = LaUserCreated(user_id=1)

    async def create_user(command: LaCreateUser, ctx: lato.TransactionContext) -> None:
        await ctx.publish_async(created)

    async def passthrough(ctx: lato.TransactionContext, call_next: Any) -> Any:
        tally.n += 1
        return await call_next()

    def wire(app: Any) -> None:
        app.handler(LaGetUser)(get_user)
        app.handler(LaCreateUser)(create_user)
        app.handler(LaUserCreated)(counting_handler(tally))
        for handler in fanout_handlers(tally):
            app.handler(LaPageViewed)(handler)

    app = lato.Application("bench")
    wire(app)
    app_mw = lato.Application("bench_mw")
    wire(app_mw)
    app_mw.transaction_middleware(passthrough)

    query, command, viewed = LaGetUser(user_id=1), LaCreateUser(user_id=1), LaPageViewed(page="/")
    return Peer(
        name="lato",
        version=_version("lato"),
        ops={
            "S1": partial(app.execute_async, query),
            "S2": partial(app.publish_async, viewed),
            "S3": partial(app.execute_async, command),
            "S4": gather_op(partial(app.execute_async, query)),
            "S1+mw": partial(app_mw.execute_async, query),
        },
        notes=[
            "lato: `Application.execute_async` / `publish_async` (handlers awaited one "
            "by one, each in the transaction context); S3's command handler calls "
            "`ctx.publish_async(event)`; middleware via `@app.transaction_middleware`; "
            "messages are pydantic models."
        ],
    )


# -- blinker -------------------------------------------------------------------------


async def build_blinker(tally: Tally) -> Peer:
    from blinker import Signal

    query, command, created, viewed = GetUser(1), CreateUser(1), UserCreated(1), PageViewed("/")
    get_user_signal = Signal("get-user")
    create_user_signal = Signal("create-user")
    user_created_signal = Signal("user-created")
    page_viewed_signal = Signal("page-viewed")

    # The message travels as blinker's `sender`, so one-argument handlers work
    # as receivers; weak=False because these receivers are local functions.
    async def create_user(cmd: CreateUser) -> None:
        await user_created_signal.send_async(created)

    get_user_signal.connect(get_user, weak=False)
    create_user_signal.connect(create_user, weak=False)
    user_created_signal.connect(counting_handler(tally), weak=False)
    for handler in fanout_handlers(tally):
        page_viewed_signal.connect(handler, weak=False)

    async def s1() -> int:
        [(_receiver, value)] = await get_user_signal.send_async(query)
        return value

    return Peer(
        name="blinker",
        version=_version("blinker"),
        ops={
            "S1": s1,
            "S2": partial(page_viewed_signal.send_async, viewed),
            "S3": partial(create_user_signal.send_async, command),
            "S4": gather_op(s1),
        },
        na={"S1+mw": "blinker signals have no middleware."},
        notes=[
            "blinker: `Signal.send_async(msg)` with async receivers (awaited one by "
            "one); a query is a signal with one receiver whose return value is read "
            "from the `(receiver, value)` list; S3's receiver sends the event signal."
        ],
    )


async def build_blinker_sync(tally: Tally) -> Peer:
    """blinker's synchronous ``send`` with plain (sync) receivers: its fastest path."""
    from blinker import Signal

    query, command, created, viewed = GetUser(1), CreateUser(1), UserCreated(1), PageViewed("/")
    get_user_signal = Signal("get-user")
    create_user_signal = Signal("create-user")
    user_created_signal = Signal("user-created")
    page_viewed_signal = Signal("page-viewed")

    def get_user_sync(q: GetUser) -> int:
        return ANSWER

    def count(event: Any) -> None:
        tally.n += 1

    def create_user(cmd: CreateUser) -> None:
        user_created_signal.send(created)

    get_user_signal.connect(get_user_sync, weak=False)
    create_user_signal.connect(create_user, weak=False)
    user_created_signal.connect(count, weak=False)
    for _ in range(FANOUT):
        # distinct functions: blinker keeps one connection per receiver
        page_viewed_signal.connect(lambda event: count(event), weak=False)

    # The harness awaits every operation; these coroutines only wrap the sync send.
    async def s1() -> int:
        [(_receiver, value)] = get_user_signal.send(query)
        return value

    async def s2() -> None:
        page_viewed_signal.send(viewed)

    async def s3() -> None:
        create_user_signal.send(command)

    return Peer(
        name="blinker-sync",
        version=_version("blinker"),
        ops={"S1": s1, "S2": s2, "S3": s3, "S4": gather_op(s1)},
        na={"S1+mw": "blinker signals have no middleware."},
        notes=[
            "blinker-sync: `Signal.send(msg)` with synchronous receivers, wrapped in one "
            "coroutine per operation so the harness can await it; the handlers cannot "
            "await anything, so this is an upper bound for blinker, not async handling."
        ],
    )


BUILDERS: list[tuple[str, Callable[[Tally], Awaitable[Peer]]]] = [
    ("direct", build_direct),
    ("iambus", build_iambus),
    ("seed", build_seed),
    ("python-cqrs", build_cqrs),
    ("lato", build_lato),
    ("blinker", build_blinker),
    ("blinker-sync", build_blinker_sync),
]
