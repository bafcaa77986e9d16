"""Every code example of the seed's PyPI page (iambus 0.2.0), run as written.

The page is ``shared/seed/000_ed8ef3756e2ad5e7.txt``. Each snippet below is its text with
``pybus`` replaced by ``iambus``; where the page leaves a body as a comment
(``# your implementation here``, ``# do something``) or ``...``, the adaptation says so.
The names the page uses without defining them (``EventType``, ``UserCreated``, ``repo``
objects...) are supplied by the test, as a reader's own code would.
"""

import asyncio
import textwrap
import typing as t
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

import iambus
from iambus import Dispatcher, HandlerProtocol


@pytest.fixture(autouse=True)
def fresh_default_dispatcher(monkeypatch: pytest.MonkeyPatch) -> Dispatcher:
    """`from iambus import dispatcher` gets a dispatcher of its own in every test."""
    dp = Dispatcher()
    monkeypatch.setattr(iambus, "dispatcher", dp)
    return dp


@dataclass(frozen=True)
class UserCreated:
    data: dict[str, Any]


@dataclass(frozen=True)
class CreateUserCommand:
    data: dict[str, Any]


@dataclass(frozen=True)
class UserQuery:
    name: str


class UserRepoImpl:
    def __init__(self) -> None:
        self.users: list[dict[str, Any]] = []

    async def create(self, data: dict[str, Any]) -> dict[str, Any]:
        user = {"id": len(self.users) + 1, **data}
        self.users.append(user)
        return user


def run(snippet: str, **names: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "seed_page", **names}
    exec(compile(textwrap.dedent(snippet), "<seed page>", "exec"), namespace)
    return namespace


def test_default_dispatcher_import(fresh_default_dispatcher: Dispatcher) -> None:
    ns = run("""
        from iambus import dispatcher as dp
    """)
    assert ns["dp"] is fresh_default_dispatcher


def test_custom_request_router() -> None:
    # Adapted: the page's body is "# your implementation here"; this one delegates.
    # MessageType, HandlerType, EMPTY and PyBusWrappedHandler are the page's names for
    # "any message", "a handler", "no argname" and "the router's record".
    ns = run(
        """
        from iambus import Dispatcher, RequestRouter

        class CustomRequestRouter(RequestRouter):
          def bind(
                self,
                message: MessageType,
                handler: HandlerType,
                argname: t.Optional[str] = EMPTY,
                **initkwargs,
            ) -> PyBusWrappedHandler:
                self.calls.append(message)
                return super().bind(message, handler, argname=argname, **initkwargs)

        dp = Dispatcher(
            queries_router_cls=CustomRequestRouter,
        )
        """,
        t=t,
        MessageType=Any,
        HandlerType=Any,
        EMPTY=None,
        PyBusWrappedHandler=iambus.Handler,
    )
    dp = ns["dp"]
    dp.queries.calls = []

    async def find(query: UserQuery) -> str:
        return query.name.upper()

    dp.register_query_handler(UserQuery, find)
    assert isinstance(dp.queries, ns["CustomRequestRouter"])
    assert dp.queries.calls == [UserQuery]
    assert asyncio.run(dp.query(UserQuery("ann"))) == "ANN"


def test_handler_signatures_with_and_without_argument(
    fresh_default_dispatcher: Dispatcher,
) -> None:
    # Adapted: the page's bodies are comments; these record the call.
    seen: list[Any] = []
    ns = run(
        """
        async def handler_with_arg(event: EventType):
            # do something with event...
            seen.append(event)

        async def handler_without_arg():
            # do something
            seen.append("no arg")
        """,
        EventType=UserCreated,
        seen=seen,
    )
    dp = fresh_default_dispatcher
    dp.events.bind(UserCreated, ns["handler_with_arg"])
    dp.events.bind(UserCreated, ns["handler_without_arg"])
    event = UserCreated({"name": "ann"})
    asyncio.run(dp.publish(event))
    assert seen == [event, "no arg"]


def test_handler_protocol_class() -> None:
    ns = run(
        '''
        class HandlerProtocol(Protocol):

            async def handle(self, message: MessageType, **kwargs) -> Any:
                """Handle message."""

            async def add_event(self, event: EventType) -> None:
                """Add event to emit later."""

            async def dump_events(self) -> list[EventType]:
                """Return list of collected events."""
        ''',
        Protocol=Protocol,
        Any=Any,
        MessageType=Any,
        EventType=Any,
    )
    page_protocol = ns["HandlerProtocol"]
    # iambus ships the same protocol: the page's methods are all there
    for method in ("handle", "add_event", "dump_events"):
        assert hasattr(page_protocol, method)
        assert hasattr(HandlerProtocol, method)


def test_class_handler_with_init_parameters(fresh_default_dispatcher: Dispatcher) -> None:
    ns = run(
        """
        class CustomHandler:
            def __init__(self, repo: RepoType):
                self._repo = repo

            async def __call__(self, cmd: CreateUserCommand):
                user = await self._repo.create(cmd.data)
                return UserCreated(data=user)
        """,
        RepoType=UserRepoImpl,
        CreateUserCommand=CreateUserCommand,
        UserCreated=UserCreated,
    )
    dp = fresh_default_dispatcher
    repo = UserRepoImpl()
    created: list[UserCreated] = []

    async def on_created(event: UserCreated) -> None:
        created.append(event)

    dp.commands.bind(CreateUserCommand, ns["CustomHandler"], repo=repo)
    dp.events.bind(UserCreated, on_created)
    result = asyncio.run(dp.execute(CreateUserCommand({"name": "ann"})))
    assert result == UserCreated({"id": 1, "name": "ann"})
    assert created == [result]  # the returned event was published
    assert repo.users == [{"id": 1, "name": "ann"}]


def test_function_handler_with_bound_repo(fresh_default_dispatcher: Dispatcher) -> None:
    created: list[UserCreated] = []
    ns = run(
        """
        async def create_user_handler(cmd: CreateUserCommand, repo: RepoType):
            user = await repo.create(cmd.data)
            return UserCreated(data=user)


        # main.py
        user_repo = UserRepoImpl()
        dp.commands.bind(CreateUserCommand, handler=create_user_handler, repo=user_repo)
        """,
        dp=fresh_default_dispatcher,
        RepoType=UserRepoImpl,
        UserRepoImpl=UserRepoImpl,
        CreateUserCommand=CreateUserCommand,
        UserCreated=UserCreated,
    )
    dp = fresh_default_dispatcher

    async def on_created(event: UserCreated) -> None:
        created.append(event)

    dp.events.bind(UserCreated, on_created)
    result = asyncio.run(dp.execute(CreateUserCommand({"name": "bob"})))
    # no response_event was given: the returned UserCreated has handlers, so it is published
    assert result == UserCreated({"id": 1, "name": "bob"})
    assert created == [result]
    assert ns["user_repo"].users == [{"id": 1, "name": "bob"}]


@pytest.mark.parametrize(
    "snippet",
    [
        "dp.register_event_handler(UserCreated, create_user_handler)",
        "dp.events.bind(UserCreated, create_user_handler)",
        """
        @dp.events.register(UserCreated)
        async def create_user_handler(event): ...
        """,
    ],
    ids=["register_event_handler", "bind", "register-decorator"],
)
def test_three_ways_to_bind(fresh_default_dispatcher: Dispatcher, snippet: str) -> None:
    seen: list[Any] = []

    async def create_user_handler(event: UserCreated) -> None:
        seen.append(event)

    ns = run(
        snippet,
        dp=fresh_default_dispatcher,
        UserCreated=UserCreated,
        create_user_handler=create_user_handler,
    )
    dp = fresh_default_dispatcher
    assert [h.message for h in dp.events.handlers()] == [UserCreated]
    handler = ns["create_user_handler"]
    assert dp.events.handlers()[0].fn is handler  # the decorator returned it unchanged
    asyncio.run(dp.publish(UserCreated({})))
    if handler is create_user_handler:
        assert seen == [UserCreated({})]


def test_dispatcher_start(fresh_default_dispatcher: Dispatcher) -> None:
    dp = fresh_default_dispatcher

    async def on_created(event: UserCreated) -> None:
        pass

    dp.events.bind(UserCreated, on_created)
    run("dp.start()", dp=dp)
    assert dp.started
    with pytest.raises(iambus.RegistrationClosed):
        dp.events.bind(UserCreated, on_created)


def test_dispatcher_start_without_handlers_drops_setup(
    fresh_default_dispatcher: Dispatcher,
) -> None:
    run("dp.start()", dp=fresh_default_dispatcher)
    assert not fresh_default_dispatcher.started


def test_singleton_provider(fresh_default_dispatcher: Dispatcher) -> None:
    # Adapted: the page's `...` bodies return a repo and a result.
    calls: list[str] = []
    ns = run(
        """
        from iambus import dispatcher as dp, Singleton

        def get_user_repo() -> UserRepo:
            calls.append("get_user_repo")
            return UserRepoImpl()


        @dp.queries.register(UserQuery, repo=Singleton["repo": get_user_repo])
        async def book_query_handler(query: UserQuery, repo: UserRepo) -> BookQueryResult:
            return (query.name, id(repo))
        """,
        calls=calls,
        UserRepo=UserRepoImpl,
        UserRepoImpl=UserRepoImpl,
        UserQuery=UserQuery,
        BookQueryResult=tuple,
    )
    dp = ns["dp"]

    async def main() -> list[tuple[str, int]]:
        return [await dp.query(UserQuery("ann")), await dp.query(UserQuery("bob"))]

    first, second = asyncio.run(main())
    assert first[0] == "ann"
    assert second[0] == "bob"
    assert first[1] == second[1]  # one repo for both calls
    assert calls == ["get_user_repo"]  # created once, lazily
