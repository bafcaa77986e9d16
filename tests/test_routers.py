"""Routers: binding handlers to messages, and customising how it is done."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import (
    CallNext,
    Context,
    Dispatcher,
    EventRouter,
    Handler,
    HandlerAlreadyBound,
    ImproperlyConfigured,
    RegistrationClosed,
    RequestRouter,
)

# -- messages and handlers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserCreated:
    user_id: int


@dataclass(frozen=True, slots=True)
class CreateUser:
    name: str


@dataclass(frozen=True, slots=True)
class GetUser:
    user_id: int


async def echo(message: Any) -> str:
    return f"handled {message!r}"


async def other_echo(message: Any) -> str:
    return f"also handled {message!r}"


def qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


ROUTERS = ["events", "commands", "queries"]


async def send(dp: Dispatcher, router: str, message: Any) -> Any:
    if router == "events":
        return await dp.publish(message)
    if router == "commands":
        return await dp.execute(message)
    return await dp.query(message)


def bind_with_dispatcher(dp: Dispatcher, router: str, message: Any, handler: Any) -> Any:
    method = {
        "events": dp.register_event_handler,
        "commands": dp.register_command_handler,
        "queries": dp.register_query_handler,
    }[router]
    return method(message, handler)


def bind_with_router(dp: Dispatcher, router: str, message: Any, handler: Any) -> Any:
    return getattr(dp, router).bind(message, handler)


def bind_with_decorator(dp: Dispatcher, router: str, message: Any, handler: Any) -> Any:
    return getattr(dp, router).register(message)(handler)


BINDERS = [bind_with_dispatcher, bind_with_router, bind_with_decorator]


# -- three ways to bind -------------------------------------------------------------


@pytest.mark.parametrize("binder", BINDERS)
@pytest.mark.parametrize("router", ROUTERS)
async def test_every_way_of_binding_routes_the_message(
    router: str, binder: Callable[..., Any]
) -> None:
    dp = Dispatcher()
    received: list[Any] = []

    async def handler(message: GetUser) -> int:
        received.append(message)
        return message.user_id + 1

    binder(dp, router, GetUser, handler)
    message = GetUser(1)
    result = await send(dp, router, message)

    assert received == [message]
    assert result == (None if router == "events" else 2)
    assert [h.fn for h in getattr(dp, router).handlers()] == [handler]


@pytest.mark.parametrize("router", ROUTERS)
def test_dispatcher_register_methods_return_the_handler_record(router: str) -> None:
    dp = Dispatcher()

    record = bind_with_dispatcher(dp, router, GetUser, echo)

    assert isinstance(record, Handler)
    assert record.fn is echo
    assert getattr(dp, router).handlers() == [record]


@pytest.mark.parametrize("router", ROUTERS)
async def test_register_returns_the_function_unchanged(router: str) -> None:
    dp = Dispatcher()

    async def handler(message: GetUser) -> str:
        return f"user {message.user_id}"

    decorated = getattr(dp, router).register(GetUser)(handler)

    assert decorated is handler
    assert await decorated(GetUser(3)) == "user 3"  # still directly awaitable


async def test_register_decorator_passes_bound_arguments() -> None:
    dp = Dispatcher()

    @dp.queries.register(GetUser, prefix="#")
    async def get_user(query: GetUser, prefix: str) -> str:
        return f"{prefix}{query.user_id}"

    assert await dp.query(GetUser(4)) == "#4"
    assert await get_user(GetUser(5), prefix="!") == "!5"


# -- one handler per command or query -----------------------------------------------


@pytest.mark.parametrize("router", ["commands", "queries"])
def test_second_handler_for_a_request_is_rejected(router: str) -> None:
    dp = Dispatcher()
    getattr(dp, router).bind(GetUser, echo)

    with pytest.raises(HandlerAlreadyBound) as info:
        getattr(dp, router).bind(GetUser, other_echo)

    assert isinstance(info.value, ImproperlyConfigured)
    text = str(info.value)
    assert qualified(GetUser) in text
    assert qualified(echo) in text
    assert qualified(other_echo) in text
    assert "exactly one handler" in text
    assert "make it an event" in text
    # the first binding stands
    assert [h.fn for h in getattr(dp, router).handlers()] == [echo]


@pytest.mark.parametrize("router", ["commands", "queries"])
def test_second_handler_via_register_dispatcher_method_is_rejected(router: str) -> None:
    dp = Dispatcher()
    bind_with_dispatcher(dp, router, GetUser, echo)

    with pytest.raises(HandlerAlreadyBound, match=re.escape(qualified(other_echo))):
        bind_with_dispatcher(dp, router, GetUser, other_echo)


@pytest.mark.parametrize(("first", "second"), [("commands", "queries"), ("queries", "commands")])
def test_same_type_as_command_and_query_is_rejected(first: str, second: str) -> None:
    dp = Dispatcher()
    getattr(dp, first).bind(GetUser, echo)

    with pytest.raises(
        HandlerAlreadyBound,
        match=rf"{re.escape(qualified(GetUser))} already has its "
        rf"{first[:-1] if first == 'commands' else 'query'} handler "
        rf"{re.escape(qualified(echo))}.*{re.escape(qualified(other_echo))} cannot be bound",
    ):
        getattr(dp, second).bind(GetUser, other_echo)
    assert getattr(dp, second).handlers() == []


def test_event_may_have_the_type_of_a_command() -> None:
    dp = Dispatcher()
    dp.commands.bind(GetUser, echo)

    record = dp.events.bind(GetUser, other_echo)

    assert dp.events.handlers() == [record]


# -- registration closes at start ---------------------------------------------------


@pytest.mark.parametrize("binder", BINDERS)
@pytest.mark.parametrize("router", ROUTERS)
def test_binding_after_start_is_rejected(router: str, binder: Callable[..., Any]) -> None:
    dp = Dispatcher()
    dp.events.bind(UserCreated, echo)
    dp.start()
    before = getattr(dp, router).handlers()

    with pytest.raises(RegistrationClosed, match="the dispatcher has started") as info:
        binder(dp, router, CreateUser, other_echo)

    assert isinstance(info.value, ImproperlyConfigured)
    assert "before dp.start()" in str(info.value)
    assert getattr(dp, router).handlers() == before


async def test_binding_after_the_first_send_is_rejected() -> None:
    dp = Dispatcher()
    dp.queries.bind(GetUser, echo)
    await dp.query(GetUser(1))  # starts the dispatcher implicitly

    with pytest.raises(RegistrationClosed, match="dispatcher has started"):
        dp.commands.bind(CreateUser, echo)


async def test_binding_after_stop_is_still_rejected() -> None:
    dp = Dispatcher()
    dp.queries.bind(GetUser, echo)
    async with dp:
        pass

    with pytest.raises(RegistrationClosed):
        dp.queries.bind(CreateUser, echo)


def test_start_with_nothing_bound_leaves_registration_open() -> None:
    dp = Dispatcher()
    dp.start()

    record = dp.commands.bind(CreateUser, echo)

    assert dp.commands.handlers() == [record]


# -- what can be a message key ------------------------------------------------------


@pytest.mark.parametrize("router", ROUTERS)
def test_binding_an_instance_instead_of_a_class_is_rejected(router: str) -> None:
    dp = Dispatcher()

    with pytest.raises(
        ImproperlyConfigured,
        match=r"bound by class or by string name, got the instance GetUser\(user_id=1\); "
        r"bind GetUser instead",
    ):
        getattr(dp, router).bind(GetUser(1), echo)
    assert getattr(dp, router).handlers() == []


@pytest.mark.parametrize("router", ROUTERS)
def test_binding_the_str_type_is_rejected(router: str) -> None:
    dp = Dispatcher()

    with pytest.raises(
        ImproperlyConfigured, match=r"str type cannot be a message class.*register\('on startup'\)"
    ):
        getattr(dp, router).bind(str, echo)


async def test_string_event_keys() -> None:
    dp = Dispatcher()
    calls: list[Any] = []

    @dp.events.register("on startup")
    async def on_startup() -> None:
        calls.append("no-arg")

    @dp.events.register("on startup")
    async def on_startup_with_message(name: str) -> None:
        calls.append(name)

    await dp.publish("on shutdown")  # another string: nobody handles it
    assert calls == []

    await dp.publish("on startup")
    assert sorted(calls) == ["no-arg", "on startup"]
    assert list(dp.events.map) == ["on startup"]


@pytest.mark.parametrize("router", ["commands", "queries"])
async def test_string_request_keys(router: str) -> None:
    dp = Dispatcher()

    @getattr(dp, router).register("reindex")
    async def reindex(name: str) -> str:
        return f"done: {name}"

    assert await send(dp, router, "reindex") == "done: reindex"
    assert getattr(dp, router).map["reindex"].fn is reindex


# -- the event router keeps many handlers ---------------------------------------------


async def test_event_router_keeps_handlers_in_binding_order() -> None:
    dp = Dispatcher()
    calls: list[str] = []

    async def first(event: UserCreated) -> None:
        calls.append("first")

    async def second(event: UserCreated) -> None:
        calls.append("second")

    async def third(event: CreateUser) -> None:
        calls.append("third")

    async def fourth(event: UserCreated) -> None:
        calls.append("fourth")

    r1 = dp.events.bind(UserCreated, first)
    dp.events.register(UserCreated)(second)
    r2 = dp.events.handlers()[-1]
    r3 = dp.register_event_handler(CreateUser, third)
    r4 = dp.events.bind(UserCreated, fourth)

    assert [h.fn for h in dp.events.map[UserCreated]] == [first, second, fourth]
    assert dp.events.map[UserCreated] == [r1, r2, r4]
    assert dp.events.map[CreateUser] == [r3]
    assert [h.fn for h in dp.events.handlers()] == [first, second, fourth, third]

    await dp.publish(UserCreated(1))
    assert sorted(calls) == ["first", "fourth", "second"]


def test_binding_the_same_event_handler_twice_keeps_both() -> None:
    dp = Dispatcher()

    dp.events.bind(UserCreated, echo)
    dp.events.bind(UserCreated, echo)

    assert [h.fn for h in dp.events.map[UserCreated]] == [echo, echo]


def test_router_maps_are_read_only() -> None:
    dp = Dispatcher()
    dp.events.bind(UserCreated, echo)
    dp.commands.bind(CreateUser, echo)

    with pytest.raises(TypeError):
        dp.events.map[CreateUser] = []  # type: ignore[index]
    with pytest.raises(TypeError):
        dp.commands.map[GetUser] = dp.commands.map[CreateUser]  # type: ignore[index]


def test_router_kinds() -> None:
    dp = Dispatcher()

    assert isinstance(dp.events, EventRouter)
    assert isinstance(dp.commands, RequestRouter)
    assert isinstance(dp.queries, RequestRouter)
    assert (dp.events.kind, dp.commands.kind, dp.queries.kind) == ("event", "command", "query")
    assert dp.events.dispatcher is dp


# -- custom router classes ----------------------------------------------------------


class RecordingEventRouter(EventRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound: list[Any] = []

    def bind(self, message: Any, /, handler: Any, **kwargs: Any) -> Handler:
        self.bound.append((message, handler))
        return super().bind(message, handler, **kwargs)


class RecordingRequestRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound: list[Any] = []

    def bind(self, message: Any, /, handler: Any, **kwargs: Any) -> Handler:
        self.bound.append((message, handler))
        return super().bind(message, handler, **kwargs)


def custom_dispatcher() -> Dispatcher:
    return Dispatcher(
        events_router_cls=RecordingEventRouter,
        commands_router_cls=RecordingRequestRouter,
        queries_router_cls=RecordingRequestRouter,
    )


@pytest.mark.parametrize("binder", BINDERS)
@pytest.mark.parametrize("router", ROUTERS)
async def test_custom_router_bind_is_used_by_every_way_of_binding(
    router: str, binder: Callable[..., Any]
) -> None:
    dp = custom_dispatcher()

    binder(dp, router, GetUser, echo)

    custom = getattr(dp, router)
    expected = RecordingEventRouter if router == "events" else RecordingRequestRouter
    assert type(custom) is expected
    assert custom.bound == [(GetUser, echo)]
    assert [h.fn for h in custom.handlers()] == [echo]
    result = await send(dp, router, GetUser(2))
    assert result == (None if router == "events" else "handled GetUser(user_id=2)")


def test_custom_routers_keep_their_kind() -> None:
    dp = custom_dispatcher()

    assert dp.commands is not dp.queries
    assert dp.commands.kind == "command"
    assert dp.queries.kind == "query"
    assert dp.queries.bind(GetUser, echo).kind == "query"
    with pytest.raises(HandlerAlreadyBound):
        dp.commands.bind(GetUser, other_echo)


@pytest.mark.parametrize(
    ("option", "value", "base"),
    [
        ("events_router_cls", RequestRouter, "EventRouter"),
        ("commands_router_cls", EventRouter, "RequestRouter"),
        ("queries_router_cls", EventRouter, "RequestRouter"),
        ("queries_router_cls", dict, "RequestRouter"),
        ("events_router_cls", "EventRouter", "EventRouter"),
    ],
)
def test_router_class_that_is_not_a_subclass_is_rejected(
    option: str, value: Any, base: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=rf"{option} must be a subclass of {base}, got "):
        Dispatcher(**{option: value})


def test_routers_are_created_on_first_use() -> None:
    class CountingEvents(EventRouter):
        created = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            type(self).created += 1

    class CountingRequests(RequestRouter):
        created = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            type(self).created += 1

    dp = Dispatcher(
        events_router_cls=CountingEvents,
        commands_router_cls=CountingRequests,
        queries_router_cls=CountingRequests,
    )
    assert (CountingEvents.created, CountingRequests.created) == (0, 0)

    events = dp.events
    assert (CountingEvents.created, CountingRequests.created) == (1, 0)
    assert dp.events is events
    assert CountingEvents.created == 1

    commands = dp.commands
    assert CountingRequests.created == 1
    queries = dp.queries
    assert CountingRequests.created == 2
    assert commands is not queries
    assert dp.commands is commands
    assert dp.queries is queries
    assert CountingRequests.created == 2


# -- middleware registration --------------------------------------------------------


async def passthrough(message: Any, call_next: CallNext, context: Context) -> Any:
    return await call_next(message)


def sync_middleware(message: Any, call_next: CallNext, context: Context) -> Any:
    return call_next(message)


@pytest.mark.parametrize("router", ROUTERS)
def test_router_middleware_after_start_is_rejected(router: str) -> None:
    dp = Dispatcher()
    dp.events.bind(UserCreated, echo)
    dp.start()

    with pytest.raises(
        RegistrationClosed, match="cannot add middleware: the dispatcher has started"
    ):
        getattr(dp, router).add_middleware(passthrough)
    assert getattr(dp, router).middleware == []


def test_dispatcher_middleware_after_start_is_rejected() -> None:
    dp = Dispatcher()
    dp.events.bind(UserCreated, echo)
    dp.start()

    with pytest.raises(RegistrationClosed, match="dispatcher has started"):
        dp.add_middleware(passthrough)


@pytest.mark.parametrize("router", ROUTERS)
def test_sync_router_middleware_is_rejected(router: str) -> None:
    dp = Dispatcher()

    with pytest.raises(ImproperlyConfigured, match=r"must be an async callable.*async def mw"):
        getattr(dp, router).add_middleware(sync_middleware)
    assert getattr(dp, router).middleware == []


def test_sync_dispatcher_middleware_is_rejected() -> None:
    dp = Dispatcher()

    with pytest.raises(ImproperlyConfigured, match="must be an async callable"):
        dp.add_middleware(sync_middleware)


@pytest.mark.parametrize("router", ROUTERS)
async def test_router_middleware_runs_around_its_handlers(router: str) -> None:
    dp = Dispatcher()
    seen: list[tuple[str, str]] = []

    async def spy(message: Any, call_next: CallNext, context: Context) -> Any:
        seen.append((context.kind, context.handler))
        return await call_next(message)

    getattr(dp, router).add_middleware(spy)
    getattr(dp, router).bind(GetUser, echo)

    await send(dp, router, GetUser(1))

    assert seen == [
        ({"events": "event", "commands": "command"}.get(router, "query"), qualified(echo))
    ]


def test_a_failed_bind_binds_nothing_not_even_its_providers() -> None:
    from iambus import HandlerSignatureError, Singleton

    dp = Dispatcher()

    def v1() -> int:
        return 1

    def v2() -> int:
        return 2

    async def broken(query: GetUser, repo: int, other: int) -> int:
        return repo

    async def fixed(query: GetUser, repo: int) -> int:
        return repo

    with pytest.raises(HandlerSignatureError):
        dp.queries.bind(GetUser, broken, repo=Singleton["repo":v1])
    dp.queries.bind(GetUser, fixed, repo=Singleton["repo":v2])  # no ProviderConflict


def test_binding_a_union_is_a_clear_error() -> None:
    dp = Dispatcher()

    async def handler(event: object) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match="bind each message type separately"):
        dp.events.bind(UserCreated | CreateUser, handler)  # type: ignore[arg-type]
