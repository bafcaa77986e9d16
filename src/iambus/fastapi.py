"""FastAPI: the dispatcher starts and stops with the app, and endpoints get it — and a unit
of work on the request's database session — through ``Depends``::

    from iambus.fastapi import DispatcherDep, lifespan, unit_of_work

    app = FastAPI(lifespan=lifespan(dp))          # dp starts with the app, stops with it
    Unit = Annotated[UnitOfWork, unit_of_work(get_session)]

    @app.post("/orders")
    async def place(order: NewOrder, unit: Unit, dp: DispatcherDep) -> None:
        unit.session.add(Order(order.id))
        await dp.publish(OrderPlaced(order.id))   # an outbox row of the same transaction

The unit commits when the endpoint returns, before the response is sent (a failed commit
is a 500, never a 201 for nothing); an endpoint that raises (``HTTPException`` included)
rolls it back, and what it sent is dropped. Public FastAPI and Starlette API only: a
lifespan, ``app.state``, and dependencies (``Depends(scope="function")``, FastAPI 0.121).
``pip install 'iambus[fastapi]'``; ``import iambus`` does not import FastAPI.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations at
# runtime, and those of unit_of_work()'s function name the caller's session dependency,
# a local that a string annotation could not resolve.

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, cast

try:
    from fastapi import Depends
    from fastapi.params import Depends as DependsParam
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("iambus.fastapi needs FastAPI: pip install 'iambus[fastapi]'") from exc

from .dispatching import Dispatcher
from .errors import ImproperlyConfigured, bad_option
from .unit_of_work import UnitOfWork

__all__ = ["STATE", "DispatcherDep", "get_dispatcher", "lifespan", "unit_of_work"]

if "scope" not in inspect.signature(Depends).parameters:  # pragma: no cover - old FastAPI
    raise ImportError(
        "iambus.fastapi needs FastAPI 0.121 or newer (Depends(scope='function') commits a "
        "unit of work before the response is sent): pip install -U 'fastapi>=0.121'"
    )

STATE = "iambus_dispatcher"
"""The name of the running dispatcher in ``app.state`` (set by ``lifespan``)."""


def lifespan(dp: Dispatcher) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A lifespan that runs ``dp`` while the app runs: ``FastAPI(lifespan=lifespan(dp))``.

    At startup it enters the dispatcher (``async with dp``: its transport, worker and
    outbox relay start) and puts it in ``app.state`` for ``get_dispatcher``; at shutdown
    it takes it out and stops it (``dp.stop()``, within ``dp.timeouts.shutdown``), after
    the server has stopped taking requests. A start that fails fails the app's startup.

    With a lifespan of your own, enter this one inside it (``async with
    lifespan(dp)(app):``): what yours sets up before is there for the handlers, and torn
    down after the dispatcher has stopped.
    """
    if not isinstance(dp, Dispatcher):
        raise bad_option("lifespan(dp)", dp, "an iambus.Dispatcher")

    @asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[None]:
        if dp.listen_for_signals:
            raise ImproperlyConfigured(
                "the dispatcher listens for SIGINT/SIGTERM (listen_for_signals=True), which "
                "belong to the ASGI server running the app: it would stop while the server "
                "still serves requests. Build it with listen_for_signals=False; the server "
                "stops it through the lifespan"
            )
        running = getattr(app.state, STATE, None)
        if running is not None:
            raise ImproperlyConfigured(
                f"this app runs a dispatcher already ({running!r}): give an app one "
                f"iambus.fastapi.lifespan(dp), and route the messages of several services "
                f"through one dispatcher's routes"
            )
        async with dp:
            setattr(app.state, STATE, dp)
            try:
                yield
            finally:
                delattr(app.state, STATE)

    return run


async def get_dispatcher(connection: HTTPConnection) -> Dispatcher:
    """The dependency giving an endpoint the app's running dispatcher (see ``lifespan``);
    ``DispatcherDep`` is ``Annotated[Dispatcher, Depends(get_dispatcher)]``. Override it
    in tests with ``app.dependency_overrides[get_dispatcher]``."""
    dp = getattr(connection.app.state, STATE, None)
    if not isinstance(dp, Dispatcher):
        raise ImproperlyConfigured(
            "no iambus dispatcher is running for this app: build it with "
            "FastAPI(lifespan=iambus.fastapi.lifespan(dp)) (or enter that lifespan in your "
            "own), and serve it with a server that runs the lifespan (uvicorn does; an "
            "httpx.ASGITransport does not: enter app.router.lifespan_context(app) around "
            "the client). A mounted sub-app has no lifespan: give it to the outer app and "
            "use the dispatcher from there"
        )
    return dp


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
"""An endpoint's parameter typed ``DispatcherDep`` gets the app's running dispatcher."""


def unit_of_work(session: Callable[..., Any] | None = None) -> DependsParam:
    """A dependency opening ``dp.unit_of_work(...)`` around the endpoint, on the session
    (or asyncpg connection) that your dependency ``session`` gives the request; None: a
    session of the dispatcher's own database. Use it as
    ``unit: Annotated[UnitOfWork, unit_of_work(get_session)]``.

    Messages the endpoint sends go into the unit (see ``iambus.unit_of_work``): routed
    ones become outbox rows of its transaction, in-process ones run after the commit. The
    unit commits when the endpoint returns, before the response is sent; if the endpoint
    raises, it rolls back and drops them. Another parameter depending on ``session`` gets
    the same session (FastAPI calls a dependency once per request). If your dependency
    yields a session in a transaction already (``async with session.begin(): yield
    session``), the unit joins that transaction and the commit stays yours.
    """
    if session is not None and not callable(session):
        raise bad_option("unit_of_work(session)", session, "a dependency (a callable) or None")

    if session is None:

        async def dispatcher_session(dp: DispatcherDep) -> AsyncIterator[UnitOfWork]:
            async with dp.unit_of_work() as unit:
                yield unit

        return cast(DependsParam, Depends(dispatcher_session, scope="function"))

    async def request_session(
        dp: DispatcherDep, handle: Annotated[Any, Depends(session)]
    ) -> AsyncIterator[UnitOfWork]:
        async with dp.unit_of_work(handle) as unit:
            yield unit

    # "function": FastAPI ends it when the endpoint returns, before the response is sent,
    # so that the response tells whether the commit happened.
    return cast(DependsParam, Depends(request_session, scope="function"))
