"""Middleware: code that runs around every handler call, of every kind.

A middleware is an async callable ``mw(message, call_next, context)``. ``await
call_next(message)`` runs the rest of the chain and the handler and returns the
handler's result; the middleware returns what the caller (or the event bus) gets::

    async def timing(message, call_next, context):
        started = time.perf_counter()
        try:
            return await call_next(message)
        finally:
            log.info("%s took %.1f ms", context.handler, (time.perf_counter() - started) * 1e3)

    dp.add_middleware(timing)              # every handler of every kind
    dp.commands.add_middleware(in_transaction)   # command handlers only

It can time, log, retry (call ``call_next`` again), wrap a transaction, or stop the call
(return without calling ``call_next``). Chains are composed once, when the dispatcher
starts: dispatcher-wide middleware run outside router middleware, each list in the order
it was added. Events a handler emits are published after the whole chain returned, so a
transaction middleware that fails on commit stops them — unless a unit of work is open
around the handler (a middleware may open one with ``dp.unit_of_work(session)``): then
they go into it as the handler returns, and commit with it (see ``unit_of_work``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ImproperlyConfigured
from .handlers import Kind

__all__ = ["CallNext", "Context", "Middleware"]

CallNext = Callable[[Any], Awaitable[Any]]
Middleware = Callable[[Any, CallNext, "Context"], Awaitable[Any]]
# The composed chain: (message, context, call) -> result; ``call`` is the route's record of
# this run (``dispatching.Call``: where the message came from, what the handler emitted).
Chain = Callable[[Any, "Context", Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Context:
    """What a middleware or error handler is told about the call."""

    kind: Kind
    """``"event"``, ``"command"`` or ``"query"``."""
    handler: str
    """The qualified name of the handler being called."""
    key: str | None
    """The ordering key the message was sent with, if any."""


def check_middleware(mw: Any) -> None:
    plain = inspect.isroutine(mw) or isinstance(mw, functools.partial)
    target = mw if plain else getattr(mw, "__call__", None)  # noqa: B004
    if target is None or not inspect.iscoroutinefunction(target):
        raise ImproperlyConfigured(
            f"middleware {mw!r} must be an async callable: "
            f"`async def mw(message, call_next, context)`"
        )


def compose(middleware: Sequence[Middleware], inner: Chain) -> Chain:
    """Wrap ``inner`` (the call of the handler) in ``middleware``, outermost first."""
    chain = inner
    for mw in reversed(middleware):
        chain = _link(mw, chain)
    return chain


def _link(mw: Middleware, inner: Chain) -> Chain:
    # A plain function returning the middleware's coroutine: no frame of ours in between.
    def chain(message: Any, context: Context, call: Any) -> Awaitable[Any]:
        return mw(message, lambda msg: inner(msg, context, call), context)

    return chain
