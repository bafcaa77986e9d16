"""Handlers: what may be bound, how its signature is read, and how it is called."""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from iambus import (
    AbstractHandler,
    Dispatcher,
    Handler,
    HandlerIsSync,
    HandlerProtocol,
    HandlerSignatureError,
    ImproperlyConfigured,
)

# -- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateUser:
    name: str


@dataclass(frozen=True, slots=True)
class GetUser:
    user_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class UserCreated:
    user_id: int


@dataclass(frozen=True, slots=True)
class AdminCreated(UserCreated):
    pass


@dataclass(frozen=True, slots=True)
class AuditLogged:
    text: str


@dataclass(frozen=True, slots=True)
class Tagged:
    tag: str


@dataclass(frozen=True, slots=True)
class TagCommand:
    tag: str
    delay: float = 0.0


@dataclass
class UserRepo:
    names: list[str] = field(default_factory=list)

    async def add(self, name: str) -> int:
        self.names.append(name)
        return len(self.names)


def qualified(obj: Any) -> str:
    """The qualified name iambus is specified to report for a handler."""
    return f"{obj.__module__}.{obj.__qualname__}"


def named(obj: Any) -> str:
    """A regex matching ``obj``'s qualified name literally."""
    return re.escape(qualified(obj))


# -- module-level handlers ------------------------------------------------------------


async def create_user(command: CreateUser, repo: UserRepo) -> int:
    return await repo.add(command.name)


async def greet(query: GetUser, greeting: str) -> str:
    return f"{greeting} #{query.user_id}"


def sync_handler(command: CreateUser) -> int:
    return 1


# -- plain functions ------------------------------------------------------------------


async def test_handler_without_parameters_is_called_without_the_message() -> None:
    dp = Dispatcher()

    async def ping() -> str:
        return "pong"

    dp.queries.bind(Ping, ping)

    assert await dp.query(Ping()) == "pong"


async def test_the_single_parameter_receives_the_message() -> None:
    dp = Dispatcher()
    received: list[Any] = []

    async def on_get(query: GetUser) -> int:
        received.append(query)
        return query.user_id * 2

    dp.queries.bind(GetUser, on_get)
    query = GetUser(21)

    assert await dp.query(query) == 42
    assert received == [query]
    assert received[0] is query


async def test_bound_arguments_are_passed_and_the_unbound_parameter_gets_the_message() -> None:
    dp = Dispatcher()
    repo = UserRepo()
    dp.commands.bind(CreateUser, handler=create_user, repo=repo)

    assert await dp.execute(CreateUser("ann")) == 1
    assert await dp.execute(CreateUser("bob")) == 2
    assert repo.names == ["ann", "bob"]


async def test_the_message_parameter_need_not_come_first() -> None:
    dp = Dispatcher()
    repo = UserRepo()

    async def handler(repo: UserRepo, command: CreateUser) -> int:
        return await repo.add(command.name)

    dp.commands.bind(CreateUser, handler, repo=repo)

    assert await dp.execute(CreateUser("ann")) == 1
    assert repo.names == ["ann"]


async def test_parameters_with_defaults_keep_them() -> None:
    dp = Dispatcher()
    seen: list[tuple[Any, int]] = []

    async def h(event: UserCreated, retries: int = 3) -> None:
        seen.append((event, retries))

    dp.events.bind(UserCreated, h)
    await dp.publish(UserCreated(1))

    assert seen == [(UserCreated(1), 3)]


async def test_a_bound_argument_overrides_a_default() -> None:
    dp = Dispatcher()
    seen: list[int] = []

    async def h(event: UserCreated, retries: int = 3) -> None:
        seen.append(retries)

    dp.events.bind(UserCreated, h, retries=5)
    await dp.publish(UserCreated(1))

    assert seen == [5]


async def test_keyword_only_message_parameter() -> None:
    dp = Dispatcher()
    repo = UserRepo()

    async def handler(repo: UserRepo, *, command: CreateUser) -> int:
        return await repo.add(command.name)

    dp.commands.bind(CreateUser, handler, repo=repo)

    assert await dp.execute(CreateUser("kw")) == 1
    assert repo.names == ["kw"]


async def test_keyword_only_message_parameter_alone() -> None:
    dp = Dispatcher()

    async def handler(*, query: GetUser) -> int:
        return query.user_id

    dp.queries.bind(GetUser, handler)

    assert await dp.query(GetUser(9)) == 9


async def test_argname_names_the_message_parameter_when_it_has_a_default() -> None:
    dp = Dispatcher()
    repo = UserRepo()

    async def handler(repo: UserRepo, command: CreateUser | None = None) -> str | None:
        return None if command is None else command.name

    dp.commands.bind(CreateUser, handler, argname="command", repo=repo)

    assert await dp.execute(CreateUser("named")) == "named"


async def test_argname_selects_a_keyword_parameter() -> None:
    dp = Dispatcher()

    async def handler(repo: UserRepo, payload: CreateUser) -> str:
        return f"{payload.name}:{len(repo.names)}"

    dp.commands.bind(CreateUser, handler, argname="payload", repo=UserRepo(["x"]))

    assert await dp.execute(CreateUser("p")) == "p:1"


async def test_argname_is_allowed_for_a_positional_only_first_parameter() -> None:
    dp = Dispatcher()
    repo = UserRepo()

    async def handler(command: CreateUser, /, repo: UserRepo) -> int:
        return await repo.add(command.name)

    dp.commands.bind(CreateUser, handler, argname="command", repo=repo)

    assert await dp.execute(CreateUser("po")) == 1
    assert repo.names == ["po"]


async def test_positional_only_message_parameter_without_argname() -> None:
    dp = Dispatcher()

    async def handler(query: GetUser, /) -> int:
        return query.user_id + 1

    dp.queries.bind(GetUser, handler)

    assert await dp.query(GetUser(1)) == 2


def test_positional_only_message_parameter_that_is_not_first_is_an_error() -> None:
    dp = Dispatcher()

    async def handler(first: Any = None, second: Any = None, /) -> None: ...

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(handler)}.*'second' is positional-only.*move it first or remove the `/`",
    ):
        dp.commands.bind(CreateUser, handler, argname="second")


async def test_var_keyword_handler_accepts_unknown_bound_arguments() -> None:
    dp = Dispatcher()
    seen: list[tuple[Any, dict[str, Any]]] = []

    async def handler(event: UserCreated, **extra: Any) -> None:
        seen.append((event, extra))

    dp.events.bind(UserCreated, handler, tenant="acme", region="eu")
    await dp.publish(UserCreated(4))

    assert seen == [(UserCreated(4), {"tenant": "acme", "region": "eu"})]


# -- signature errors ---------------------------------------------------------------


def test_bound_argument_the_handler_does_not_have() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser) -> None: ...

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(handler)} has no parameter 'repo'.*remove it from the registration",
    ):
        dp.commands.bind(CreateUser, handler, repo=UserRepo())


def test_two_unbound_required_parameters_name_both_and_mention_argname() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser, repo: UserRepo) -> None: ...

    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(CreateUser, handler)

    text = str(info.value)
    assert qualified(handler) in text
    assert "'command', 'repo'" in text
    assert "argname=" in text
    assert "repo=..." in text


def test_argname_naming_a_missing_parameter() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser) -> None: ...

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(handler)} has no parameter 'cmd'.*argname= must name one of: 'command'",
    ):
        dp.commands.bind(CreateUser, handler, argname="cmd")


def test_argname_that_is_also_bound() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser, repo: UserRepo) -> None: ...

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(handler)}: 'repo' is named as the message parameter \(argname=\) "
        r"and also bound",
    ):
        dp.commands.bind(CreateUser, handler, argname="repo", repo=UserRepo())


def test_argname_leaving_another_required_parameter_unbound() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser, repo: UserRepo) -> None: ...

    with pytest.raises(HandlerSignatureError, match=rf"{named(handler)}.*'repo'.*repo=\.\.\."):
        dp.commands.bind(CreateUser, handler, argname="command")


def test_a_failed_registration_binds_nothing() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser, repo: UserRepo) -> None: ...

    with pytest.raises(HandlerSignatureError):
        dp.commands.bind(CreateUser, handler)

    assert dp.commands.handlers() == []


# -- sync handlers ------------------------------------------------------------------


class SyncCall:
    def __call__(self, command: CreateUser) -> None: ...


class SyncHandle:
    def handle(self, command: CreateUser) -> None: ...


def test_sync_function_is_rejected() -> None:
    dp = Dispatcher()

    with pytest.raises(HandlerIsSync, match=rf"{named(sync_handler)}.*`async def`"):
        dp.commands.bind(CreateUser, sync_handler)
    assert dp.commands.handlers() == []


def test_sync_lambda_is_rejected() -> None:
    dp = Dispatcher()
    handler = lambda command: None  # noqa: E731

    with pytest.raises(HandlerIsSync, match=rf"{named(handler)}.*`async def`"):
        dp.commands.bind(CreateUser, handler)


@pytest.mark.parametrize(("cls", "method"), [(SyncCall, "__call__"), (SyncHandle, "handle")])
def test_sync_class_method_is_rejected(cls: type, method: str) -> None:
    dp = Dispatcher()

    with pytest.raises(HandlerIsSync, match=rf"{named(cls)}\.{re.escape(method)}.*`async def`"):
        dp.commands.bind(CreateUser, cls)


def test_sync_callable_instance_is_rejected() -> None:
    dp = Dispatcher()

    with pytest.raises(HandlerIsSync, match=rf"{named(SyncCall)}.*`async def`"):
        dp.commands.bind(CreateUser, SyncCall())


def test_handler_is_sync_is_improperly_configured() -> None:
    dp = Dispatcher()

    with pytest.raises(ImproperlyConfigured):
        dp.commands.bind(CreateUser, sync_handler)


# -- callable objects, partials, classes --------------------------------------------


class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting
        self.calls = 0

    async def __call__(self, query: GetUser) -> str:
        self.calls += 1
        return f"{self.greeting} #{query.user_id}"


async def test_callable_instance_with_async_call() -> None:
    dp = Dispatcher()
    greeter = Greeter("hello")

    record = dp.queries.bind(GetUser, greeter)

    assert await dp.query(GetUser(1)) == "hello #1"
    assert await dp.query(GetUser(2)) == "hello #2"
    assert greeter.calls == 2  # the very instance is called, not a copy
    assert record.fn is greeter
    assert record.name == qualified(Greeter)


async def test_callable_instance_with_bound_arguments() -> None:
    dp = Dispatcher()

    class Tagger:
        async def __call__(self, query: GetUser, suffix: str) -> str:
            return f"{query.user_id}{suffix}"

    dp.queries.bind(GetUser, Tagger(), suffix="!")

    assert await dp.query(GetUser(3)) == "3!"


async def test_partial_of_an_async_function() -> None:
    dp = Dispatcher()
    handler = functools.partial(greet, greeting="hi")

    record = dp.queries.bind(GetUser, handler)

    assert await dp.query(GetUser(5)) == "hi #5"
    assert record.fn is handler
    assert record.name == qualified(greet)


async def test_class_with_async_call_is_instantiated_with_initkwargs() -> None:
    dp = Dispatcher()
    instances: list[Any] = []

    class CallHandler:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting
            instances.append(self)

        async def __call__(self, query: GetUser) -> str:
            return f"{self.greeting} {query.user_id}"

    dp.queries.bind(GetUser, CallHandler, greeting="hey")

    assert instances == []  # nothing is instantiated at registration
    assert await dp.query(GetUser(1)) == "hey 1"
    assert await dp.query(GetUser(2)) == "hey 2"
    assert len(instances) == 2
    assert instances[0] is not instances[1]


class ProtocolHandler:
    """Implements HandlerProtocol without AbstractHandler."""

    def __init__(self, repo: UserRepo, created: list[Any]) -> None:
        self.repo = repo
        self.events: list[Any] = []
        created.append(self)

    async def handle(self, command: CreateUser, /) -> int:
        user_id = await self.repo.add(command.name)
        await self.add_event(UserCreated(user_id))
        return user_id

    async def add_event(self, event: Any) -> None:
        self.events.append(event)

    async def dump_events(self) -> list[Any]:
        events, self.events = self.events, []
        return events


def test_protocol_handler_satisfies_handler_protocol() -> None:
    assert isinstance(ProtocolHandler(UserRepo(), []), HandlerProtocol)
    assert not isinstance(Greeter("x"), HandlerProtocol)


async def test_protocol_class_is_instantiated_with_initkwargs_for_every_call() -> None:
    dp = Dispatcher()
    repo = UserRepo()
    created: list[ProtocolHandler] = []
    published: list[Any] = []

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, ProtocolHandler, repo=repo, created=created)
    dp.events.bind(UserCreated, on_created)

    assert created == []
    assert await dp.execute(CreateUser("ann")) == 1
    assert await dp.execute(CreateUser("bob")) == 2

    assert len(created) == 2
    assert created[0] is not created[1]
    assert all(instance.repo is repo for instance in created)
    assert repo.names == ["ann", "bob"]
    assert published == [UserCreated(1), UserCreated(2)]


class CollectingTagHandler:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, command: TagCommand, /) -> None:
        await self.add_event(Tagged(command.tag))
        await asyncio.sleep(command.delay)

    async def add_event(self, event: Any) -> None:
        self.events.append(event)

    async def dump_events(self) -> list[Any]:
        events, self.events = self.events, []
        return events


class AbstractTagHandler(AbstractHandler):
    async def handle(self, command: TagCommand) -> None:
        await self.add_event(Tagged(command.tag))
        await asyncio.sleep(command.delay)


@pytest.mark.parametrize("cls", [CollectingTagHandler, AbstractTagHandler])
async def test_events_of_concurrent_calls_never_leak_into_each_other(cls: type) -> None:
    dp = Dispatcher()
    published: list[Tagged] = []

    async def on_tagged(event: Tagged) -> None:
        published.append(event)

    dp.commands.bind(TagCommand, cls)
    dp.events.bind(Tagged, on_tagged)

    slow = asyncio.ensure_future(dp.execute(TagCommand("slow", delay=0.05)))
    await asyncio.sleep(0)  # "slow" has added its event and is sleeping
    await dp.execute(TagCommand("fast", delay=0.001))

    # Only the fast call's own event: the slow one's is still held by its own instance.
    assert published == [Tagged("fast")]
    await slow
    assert published == [Tagged("fast"), Tagged("slow")]


# -- AbstractHandler ------------------------------------------------------------------


class CreateUserHandler(AbstractHandler):
    def __init__(self, repo: UserRepo, published: list[Any]) -> None:
        self.repo = repo
        self.published = published

    async def handle(self, command: CreateUser) -> int:
        user_id = await self.repo.add(command.name)
        await self.add_event(UserCreated(user_id))
        await self.add_event(AuditLogged(f"created {command.name}"))
        # Collected events wait for handle() to succeed.
        assert self.published == []
        return user_id


async def test_abstract_handler_events_are_published_after_handle_succeeded() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def on_event(event: Any) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, CreateUserHandler, repo=UserRepo(), published=published)
    dp.events.bind(UserCreated, on_event)
    dp.events.bind(AuditLogged, on_event)

    assert await dp.execute(CreateUser("ann")) == 1
    # published before execute() returned, in the order they were added
    assert published == [UserCreated(1), AuditLogged("created ann")]


class FailingHandler(AbstractHandler):
    async def handle(self, command: CreateUser) -> None:
        await self.add_event(UserCreated(99))
        raise LookupError(f"no room for {command.name}")


async def test_abstract_handler_events_are_never_published_if_handle_raised() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, FailingHandler)
    dp.events.bind(UserCreated, on_created)

    with pytest.raises(LookupError, match="no room for ann"):
        await dp.execute(CreateUser("ann"))
    assert published == []


def test_abstract_handler_without_handle_is_rejected_at_registration() -> None:
    dp = Dispatcher()

    class NoHandle(AbstractHandler):
        pass

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(NoHandle)} subclasses AbstractHandler.*`async def handle\(self, message\)`",
    ):
        dp.commands.bind(CreateUser, NoHandle)


def test_class_init_requiring_an_unbound_argument() -> None:
    dp = Dispatcher()

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(CreateUserHandler)}\.__init__ needs 'published'.*published=\.\.\.",
    ):
        dp.commands.bind(CreateUser, CreateUserHandler, repo=UserRepo())


def test_class_init_without_the_bound_argument() -> None:
    dp = Dispatcher()

    class Simple(AbstractHandler):
        async def handle(self, command: CreateUser) -> None: ...

    with pytest.raises(
        HandlerSignatureError, match=rf"{named(Simple)}\.__init__ has no parameter 'repo'"
    ):
        dp.commands.bind(CreateUser, Simple, repo=UserRepo())


def test_class_without_handle_or_call() -> None:
    dp = Dispatcher()

    class NotAHandler:
        def run(self, command: CreateUser) -> None: ...

    with pytest.raises(
        HandlerSignatureError,
        match=rf"{named(NotAHandler)} has neither `async def handle\(self, message\)` "
        r"nor `async def __call__\(self, message\)`",
    ):
        dp.commands.bind(CreateUser, NotAHandler)


def test_not_callable_handler_is_rejected() -> None:
    dp = Dispatcher()

    with pytest.raises(ImproperlyConfigured, match="not callable"):
        dp.commands.bind(CreateUser, 42)


# -- response events ----------------------------------------------------------------


def test_response_event_must_be_a_class() -> None:
    dp = Dispatcher()

    async def handler(command: CreateUser) -> UserCreated:
        return UserCreated(1)

    with pytest.raises(
        ImproperlyConfigured,
        match=rf"response_event of {named(handler)} must be a class.*UserCreated\(user_id=1\)",
    ):
        dp.commands.bind(CreateUser, handler, response_event=UserCreated(1))


async def test_returned_value_of_response_event_type_is_published() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> UserCreated:
        return UserCreated(7)

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, handler, response_event=UserCreated)
    dp.events.bind(UserCreated, on_created)

    assert await dp.execute(CreateUser("ann")) == UserCreated(7)
    assert published == [UserCreated(7)]


async def test_returned_value_not_of_response_event_type_is_not_published() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> AuditLogged:
        return AuditLogged("not a UserCreated")

    async def on_any(event: Any) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, handler, response_event=UserCreated)
    # AuditLogged has handlers, but response_event says only UserCreated is published.
    dp.events.bind(AuditLogged, on_any)
    dp.events.bind(UserCreated, on_any)

    assert await dp.execute(CreateUser("ann")) == AuditLogged("not a UserCreated")
    assert published == []


async def test_returned_subclass_of_response_event_is_published() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> UserCreated:
        return AdminCreated(3)

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, handler, response_event=UserCreated)
    dp.events.bind(UserCreated, on_created)

    await dp.execute(CreateUser("root"))

    assert published == [AdminCreated(3)]


@pytest.mark.parametrize("kind", ["commands", "queries"])
async def test_returned_value_with_event_handlers_is_published_without_response_event(
    kind: str,
) -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> UserCreated:
        return UserCreated(11)

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    getattr(dp, kind).bind(CreateUser, handler)
    dp.events.bind(UserCreated, on_created)
    send = dp.execute if kind == "commands" else dp.query

    result = await send(CreateUser("ann"))

    assert result == UserCreated(11)  # the caller still gets the value
    assert published == [UserCreated(11)]


async def test_returned_value_whose_base_class_has_event_handlers_is_published() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> UserCreated:
        return AdminCreated(12)

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, handler)
    dp.events.bind(UserCreated, on_created)

    assert await dp.execute(CreateUser("root")) == AdminCreated(12)
    assert published == [AdminCreated(12)]


async def test_returned_value_without_event_handlers_is_just_the_result() -> None:
    dp = Dispatcher()
    published: list[Any] = []

    async def handler(command: CreateUser) -> AuditLogged:
        return AuditLogged("plain")

    async def on_created(event: UserCreated) -> None:
        published.append(event)

    dp.commands.bind(CreateUser, handler)
    dp.events.bind(UserCreated, on_created)

    assert await dp.execute(CreateUser("x")) == AuditLogged("plain")
    assert published == []


# -- the Handler record ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("router", "kind"), [("events", "event"), ("commands", "command"), ("queries", "query")]
)
def test_handler_record_describes_the_binding(router: str, kind: str) -> None:
    dp = Dispatcher()
    repo = UserRepo()

    record = getattr(dp, router).bind(CreateUser, create_user, repo=repo)

    assert isinstance(record, Handler)
    assert record.fn is create_user
    assert record.name == f"{__name__}.create_user"
    assert record.kind == kind
    assert record.message is CreateUser
    assert record.initkwargs == {"repo": repo}


def test_handler_record_of_a_class_handler() -> None:
    dp = Dispatcher()

    record = dp.commands.bind(CreateUser, CreateUserHandler, repo=UserRepo(), published=[])

    assert record.fn is CreateUserHandler
    assert record.name == f"{__name__}.CreateUserHandler"
    assert record.kind == "command"
    assert record.message is CreateUser
    assert "CreateUserHandler" in repr(record)


def test_binding_an_instance_of_a_class_handler_says_to_bind_the_class() -> None:
    from iambus import AbstractHandler, HandlerSignatureError

    class Refund(AbstractHandler):
        async def handle(self, command: object) -> None:
            pass

    dp = Dispatcher()
    with pytest.raises(
        HandlerSignatureError, match=r"instance of the class handler .*Refund; bind the class"
    ):
        dp.commands.bind("refund", Refund())
