"""The compiled routing: which results are events, and how an event reaches its handlers.

Most tests build a ``RouteTable`` from routers alone, with no ``Dispatcher``: the table
needs only a function to report failures to.
"""

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import Context, Dispatcher, EventRouter, Retry
from iambus.handlers import Handler
from iambus.messages import MessageKey
from iambus.providers import ProviderRegistry
from iambus.routes import RouteTable


@dataclass(frozen=True)
class Base:
    n: int


@dataclass(frozen=True)
class Child(Base):
    pass


@dataclass(frozen=True)
class Plain:
    n: int


@dataclass(frozen=True)
class Announced:
    n: int


class Owner:
    """What a router needs of a dispatcher, and no more (see ``iambus.routers.Owner``)."""

    def __init__(self) -> None:
        self.providers = ProviderRegistry()
        self.started = False

    def request_handler(self, key: MessageKey) -> Handler | None:
        return None


Reported = list[tuple[BaseException, Any, Context]]


def compiled(events: EventRouter, reported: Reported | None = None) -> RouteTable:
    async def report(exc: BaseException, message: Any, context: Context) -> None:
        if reported is None:
            raise AssertionError(f"unexpected failure reported: {exc!r}")
        reported.append((exc, message, context))

    table = RouteTable(report)
    table.compile(
        {"event": events},
        [],
        remote=None,
        database=None,
        every_unit=False,
        retry=Retry(),
        retry_for={},
    )
    table.open()
    return table


def names(routes: tuple[Any, ...]) -> list[str]:
    return [route.name.rsplit(".", 1)[-1] for route in routes]


# -- is this result an event? ---------------------------------------------------------


def test_a_result_is_an_event_when_its_type_or_a_base_has_handlers() -> None:
    events = EventRouter(Owner())

    @events.register(Base)
    async def on_base(event: Base) -> None: ...

    @events.register(object)
    async def audit(event: object) -> None: ...

    table = compiled(events)
    child = Child(1)
    assert names(table.published_to(child, "the message", None)) == ["on_base", "audit"]
    assert names(table.published_to(Base(2), "the message", None)) == ["on_base", "audit"]
    # A catch-all handler does not make every result an event: a Plain is just a result,
    # and its type is remembered as quiet (what the dispatcher's fast paths test).
    assert table.published_to(Plain(3), "the message", None) == ()
    assert Plain in table.quiet
    assert table.published_to(None, "the message", None) == ()
    # An event handler handing its very event back does not publish it again.
    assert table.published_to(child, child, None) == ()


def test_with_a_response_event_only_values_of_that_type_are_events() -> None:
    events = EventRouter(Owner())

    @events.register(object)
    async def audit(event: object) -> None: ...

    table = compiled(events)
    assert table.published_to(Plain(1), "the message", None) == ()  # quiet without it
    # Declared as the response event, a Plain is one: its handlers (here the catch-all)
    # get it, although its type is quiet for handlers that declare nothing.
    assert names(table.published_to(Plain(1), "the message", Plain)) == ["audit"]
    assert table.published_to(Announced(1), "the message", Plain) == ()


async def test_every_way_a_handler_runs_publishes_its_returned_event_once() -> None:
    # The fast paths of query() and execute(), a handler run through its route (a keyed
    # send), a single event handler and one of several: each asks the table whether the
    # result is an event, and each publishes it once.
    dp = Dispatcher()
    announced: list[int] = []

    @dataclass(frozen=True)
    class Ask:
        n: int

    @dataclass(frozen=True)
    class Do:
        n: int

    @dataclass(frozen=True)
    class One:
        n: int

    @dataclass(frozen=True)
    class Many:
        n: int

    async def answer(message: Any) -> Announced:
        return Announced(message.n)

    async def nothing(message: Any) -> None:
        return None

    dp.queries.bind(Ask, answer)
    dp.commands.bind(Do, answer)
    dp.events.bind(One, answer)
    dp.events.bind(Many, nothing)
    dp.events.bind(Many, answer)
    dp.events.bind(Many, nothing)

    @dp.events.register(Announced)
    async def on_announced(event: Announced) -> None:
        announced.append(event.n)

    async with dp:
        assert await dp.query(Ask(1)) == Announced(1)
        assert await dp.execute(Do(2)) == Announced(2)
        assert await dp.execute(Do(3), key="k") == Announced(3)
        await dp.publish(One(4))
        await dp.publish(Many(5))
        await dp.publish(Many(6), key="k")
    assert sorted(announced) == [1, 2, 3, 4, 5, 6]


# -- fan-out --------------------------------------------------------------------------


async def test_handlers_that_do_not_wait_run_in_the_sending_task() -> None:
    events = EventRouter(Owner())
    tasks: list[asyncio.Task[Any] | None] = []

    for _ in range(3):

        @events.register(Base)
        async def record(event: Base) -> None:
            tasks.append(asyncio.current_task())

    table = compiled(events)
    await table.deliver(table.event_handlers(Base), Base(1), None, False)
    # No task was made for them: a timeout or a task group inside a handler behaves as
    # it would in a direct call.
    assert tasks == [asyncio.current_task()] * 3


async def test_once_a_handler_waits_the_rest_run_concurrently() -> None:
    events = EventRouter(Owner())
    ready = asyncio.Event()

    @events.register(Base)
    async def first(event: Base) -> None:
        await ready.wait()  # set by the last handler: only runs if they run alongside

    @events.register(Base)
    async def last(event: Base) -> None:
        ready.set()

    table = compiled(events)
    async with asyncio.timeout(5):
        await table.deliver(table.event_handlers(Base), Base(1), None, False)
    assert ready.is_set()


async def test_failures_of_several_handlers_are_raised_together_or_each_reported() -> None:
    events = EventRouter(Owner())

    @events.register(Base)
    async def breaks(event: Base) -> None:
        raise ValueError("broken")

    @events.register(Base)
    async def works(event: Base) -> None: ...

    @events.register(Base)
    async def waits_then_breaks(event: Base) -> None:
        await asyncio.sleep(0)
        raise KeyError("gone")

    reported: Reported = []
    table = compiled(events, reported)
    routes = table.event_handlers(Base)
    with pytest.raises(BaseExceptionGroup) as raised:
        await table.deliver(routes, Base(1), None, False)
    assert "2 of 3 handler(s) of" in str(raised.value)
    assert raised.value.message.endswith("<locals>.waits_then_breaks")
    assert "<locals>.breaks, " in raised.value.message
    assert [type(e) for e in raised.value.exceptions] == [ValueError, KeyError]
    assert reported == []

    await table.deliver(routes, Base(2), "a-key", True)
    assert [(type(exc), message, context.key) for exc, message, context in reported] == [
        (ValueError, Base(2), "a-key"),
        (KeyError, Base(2), "a-key"),
    ]
    assert [context.handler.rsplit(".", 1)[-1] for _, _, context in reported] == [
        "breaks",
        "waits_then_breaks",
    ]
