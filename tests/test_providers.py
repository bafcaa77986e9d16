"""Providers: ``Singleton`` and ``Factory`` values handed to handlers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import (
    AbstractHandler,
    Dispatcher,
    Factory,
    ImproperlyConfigured,
    ProviderConflict,
    Singleton,
)


@dataclass(frozen=True, slots=True)
class GetRepo:
    pass


@dataclass(frozen=True, slots=True)
class Store:
    key: str
    value: int


@dataclass(frozen=True, slots=True)
class Load:
    key: str


class Repo:
    """A value made by a provider; identity tells instances apart."""


class Counter:
    """A provider function that counts its calls and makes a fresh Repo each time."""

    def __init__(self) -> None:
        self.calls = 0

    def sync(self) -> Repo:
        self.calls += 1
        return Repo()

    async def async_(self) -> Repo:
        self.calls += 1
        await asyncio.sleep(0)
        return Repo()


async def get_repo(query: GetRepo, repo: Repo) -> Repo:
    return repo


def make_repo() -> Repo:
    return Repo()


def make_other_repo() -> Repo:
    return Repo()


async def make_storage() -> dict[str, int]:
    return {}


async def store_value(command: Store, storage: dict[str, int]) -> None:
    storage[command.key] = command.value


async def load_value(query: Load, storage: dict[str, int]) -> int | None:
    return storage.get(query.key)


# -- syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda fn: Singleton["repo":fn],
        lambda fn: Singleton(fn, name="repo"),
        lambda fn: Factory["repo":fn],
        lambda fn: Factory(fn, name="repo"),
    ],
    ids=["Singleton[slice]", "Singleton(call)", "Factory[slice]", "Factory(call)"],
)
@pytest.mark.parametrize("flavour", ["sync", "async_"])
async def test_provider_forms_hand_the_value_to_the_handler(
    build: Callable[[Any], Any], flavour: str
) -> None:
    dp = Dispatcher()
    counter = Counter()
    fn = getattr(counter, flavour)
    provider = build(fn)

    dp.queries.bind(GetRepo, get_repo, repo=provider)

    assert provider.name == "repo"
    assert provider.fn == fn
    repo = await dp.query(GetRepo())
    assert isinstance(repo, Repo)
    assert counter.calls == 1


def test_call_form_without_a_name_is_named_after_the_function() -> None:
    assert Singleton(make_repo).name == make_repo.__qualname__
    assert Factory(make_repo).name == make_repo.__qualname__


@pytest.mark.parametrize("provider", [Singleton, Factory])
@pytest.mark.parametrize(
    "build",
    [
        lambda cls: cls["repo"],
        lambda cls: cls[1:2:3],
        lambda cls: cls["repo":make_repo:1],
        lambda cls: cls["repo":],
        lambda cls: cls[make_repo],
    ],
    ids=["no-slice", "step", "step-with-callable", "no-callable", "bare-callable"],
)
def test_bad_slice_syntax_is_a_type_error_with_guidance(
    provider: type, build: Callable[[type], Any]
) -> None:
    with pytest.raises(
        TypeError,
        match=rf"{provider.__name__}\[\.\.\.\] takes a slice of a name and a callable: "
        rf'{provider.__name__}\["repo": get_repo\], got ',
    ):
        build(provider)


@pytest.mark.parametrize("provider", [Singleton, Factory])
def test_slice_without_a_name_is_a_type_error(provider: type) -> None:
    # ``Singleton[:fn]`` has no name; it must not silently become a provider named "None".
    with pytest.raises(TypeError, match=rf'{provider.__name__}\["repo": get_repo\]'):
        provider[:make_repo]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Singleton(42, name="x"),
        lambda: Factory(42, name="x"),
        lambda: Singleton["x":42],
        lambda: Factory["x":"not a function"],
    ],
)
def test_non_callable_is_a_type_error(build: Callable[[], Any]) -> None:
    with pytest.raises(
        TypeError, match=r"(Singleton|Factory) needs a callable that returns the value"
    ):
        build()


# -- Singleton ----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async_"])
async def test_singleton_is_created_lazily_and_once(flavour: str) -> None:
    dp = Dispatcher()
    counter = Counter()
    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo" : getattr(counter, flavour)])
    assert counter.calls == 0  # not at registration

    dp.start()
    assert counter.calls == 0  # nor at start

    first = await dp.query(GetRepo())
    assert counter.calls == 1
    second = await dp.query(GetRepo())
    third = await dp.query(GetRepo())

    assert counter.calls == 1
    assert first is second is third


async def test_singleton_is_created_once_under_concurrency() -> None:
    dp = Dispatcher()
    calls = 0

    async def slow_repo() -> Repo:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return Repo()

    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":slow_repo])

    repos = await asyncio.gather(*(dp.query(GetRepo()) for _ in range(50)))

    assert calls == 1
    assert len(repos) == 50
    assert all(repo is repos[0] for repo in repos)


async def test_failing_singleton_provider_is_retried_on_the_next_call() -> None:
    dp = Dispatcher()
    calls = 0

    async def flaky_repo() -> Repo:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database is down")
        return Repo()

    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":flaky_repo])

    with pytest.raises(ConnectionError, match="database is down"):
        await dp.query(GetRepo())
    assert calls == 1

    repo = await dp.query(GetRepo())
    assert isinstance(repo, Repo)
    assert calls == 2

    assert await dp.query(GetRepo()) is repo
    assert calls == 2


async def test_failing_sync_singleton_provider_is_retried() -> None:
    dp = Dispatcher()
    outcomes: list[Any] = [ValueError("not yet"), Repo()]

    def flaky() -> Repo:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":flaky])

    with pytest.raises(ValueError, match="not yet"):
        await dp.query(GetRepo())
    repo = await dp.query(GetRepo())
    assert await dp.query(GetRepo()) is repo
    assert outcomes == []


async def test_concurrent_waiters_see_the_failure_and_the_next_call_retries() -> None:
    dp = Dispatcher()
    calls = 0

    async def slow_failing() -> Repo:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConnectionError("first attempt failed")
        return Repo()

    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":slow_failing])

    results = await asyncio.gather(*(dp.query(GetRepo()) for _ in range(5)), return_exceptions=True)

    assert calls == 1
    assert all(isinstance(r, ConnectionError) for r in results)
    assert isinstance(await dp.query(GetRepo()), Repo)
    assert calls == 2


async def test_cancelling_the_first_caller_does_not_cancel_concurrent_waiters() -> None:
    dp = Dispatcher()
    calls = 0

    async def slow_repo() -> Repo:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return Repo()

    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":slow_repo])

    first = asyncio.ensure_future(dp.query(GetRepo()))
    await asyncio.sleep(0)  # first is creating the singleton
    second = asyncio.ensure_future(dp.query(GetRepo()))
    await asyncio.sleep(0.01)  # second waits for first's creation
    first.cancel()
    await asyncio.wait([first, second])

    assert first.cancelled()
    # Nobody cancelled the second caller: it must not end up cancelled.
    assert not second.cancelled()
    # and the singleton can still be created afterwards
    assert isinstance(await dp.query(GetRepo()), Repo)


async def test_handlers_sharing_a_singleton_get_the_same_object() -> None:
    dp = Dispatcher()
    calls = 0

    async def storage() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {}

    @dp.commands.register(Store, storage=Singleton["storage":storage])
    async def store(command: Store, storage: dict[str, int]) -> None:
        storage[command.key] = command.value

    # a second, separate Singleton object with the same name and function
    @dp.queries.register(Load, storage=Singleton["storage":storage])
    async def load(query: Load, storage: dict[str, int]) -> int | None:
        return storage.get(query.key)

    await dp.execute(Store("answer", 42))

    assert await dp.query(Load("answer")) == 42
    assert calls == 1


async def test_same_provider_object_reused_across_handlers() -> None:
    dp = Dispatcher()
    shared = Singleton["storage":make_storage]
    dp.commands.bind(Store, store_value, storage=shared)
    dp.queries.bind(Load, load_value, storage=shared)

    await dp.execute(Store("k", 1))

    assert await dp.query(Load("k")) == 1


async def test_providers_belong_to_their_dispatcher() -> None:
    first, second = Dispatcher(), Dispatcher()
    for dp in (first, second):
        dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":make_repo])

    one = await first.query(GetRepo())
    other = await second.query(GetRepo())

    assert one is not other
    assert await first.query(GetRepo()) is one
    assert await second.query(GetRepo()) is other


# -- Factory --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async_"])
async def test_factory_is_called_for_every_handler_call(flavour: str) -> None:
    dp = Dispatcher()
    counter = Counter()
    dp.queries.bind(GetRepo, get_repo, repo=Factory["repo" : getattr(counter, flavour)])
    dp.start()
    assert counter.calls == 0

    repos = [await dp.query(GetRepo()) for _ in range(3)]

    assert counter.calls == 3
    assert len({id(repo) for repo in repos}) == 3


async def test_provider_next_to_static_bound_arguments() -> None:
    dp = Dispatcher()

    async def handler(query: GetRepo, repo: Repo, label: str) -> tuple[Repo, str]:
        return repo, label

    dp.queries.bind(GetRepo, handler, repo=Factory["repo":make_repo], label="static")

    repo, label = await dp.query(GetRepo())

    assert isinstance(repo, Repo)
    assert label == "static"


async def test_provider_for_a_keyword_only_message_parameter_handler() -> None:
    dp = Dispatcher()

    async def handler(repo: Repo, *, query: GetRepo) -> tuple[Repo, GetRepo]:
        return repo, query

    dp.queries.bind(GetRepo, handler, repo=Singleton["repo":make_repo])
    message = GetRepo()

    repo, received = await dp.query(message)

    assert isinstance(repo, Repo)
    assert received is message


async def test_provider_for_a_handler_without_message_parameter() -> None:
    dp = Dispatcher()

    async def handler(repo: Repo) -> Repo:
        return repo

    dp.queries.bind(GetRepo, handler, argname=None, repo=Singleton["repo":make_repo])

    assert isinstance(await dp.query(GetRepo()), Repo)


# -- class handlers -------------------------------------------------------------------


class RepoHandler(AbstractHandler):
    instances: list[RepoHandler]

    def __init__(self, repo: Repo, label: str) -> None:
        self.repo = repo
        self.label = label
        type(self).instances.append(self)

    async def handle(self, query: GetRepo) -> tuple[Repo, str]:
        return self.repo, self.label


@pytest.mark.parametrize(("provider", "shared"), [(Singleton, True), (Factory, False)])
async def test_providers_are_passed_to_class_handler_init(provider: type, shared: bool) -> None:
    dp = Dispatcher()
    counter = Counter()
    RepoHandler.instances = []

    dp.queries.bind(GetRepo, RepoHandler, repo=provider["repo" : counter.async_], label="L")
    assert counter.calls == 0

    (first, label), (second, _) = await dp.query(GetRepo()), await dp.query(GetRepo())

    assert label == "L"
    assert isinstance(first, Repo)
    assert (first is second) is shared
    assert counter.calls == (1 if shared else 2)
    assert len(RepoHandler.instances) == 2
    assert RepoHandler.instances[0] is not RepoHandler.instances[1]


# -- conflicts ------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(Singleton, Factory), (Factory, Singleton)])
def test_reusing_a_name_with_the_other_provider_type(first: type, second: type) -> None:
    dp = Dispatcher()
    dp.queries.bind(GetRepo, get_repo, repo=first["repo":make_repo])

    with pytest.raises(
        ProviderConflict,
        match=rf"provider 'repo' is already a {first.__name__} and cannot become a "
        rf"{second.__name__}; use another name",
    ) as info:
        dp.events.bind(Load, get_repo, repo=second["repo":make_repo])

    assert isinstance(info.value, ImproperlyConfigured)


def test_reusing_a_name_with_another_function() -> None:
    dp = Dispatcher()
    dp.queries.bind(GetRepo, get_repo, repo=Singleton["repo":make_repo])

    with pytest.raises(
        ProviderConflict,
        match=rf"provider 'repo' already calls .*{re.escape(make_repo.__qualname__)}.*"
        rf"not .*{re.escape(make_other_repo.__qualname__)}",
    ):
        dp.events.bind(GetRepo, get_repo, repo=Singleton["repo":make_other_repo])


def test_the_same_name_in_two_dispatchers_is_no_conflict() -> None:
    first, second = Dispatcher(), Dispatcher()

    first.queries.bind(GetRepo, get_repo, repo=Singleton["repo":make_repo])
    second.queries.bind(GetRepo, get_repo, repo=Factory["repo":make_other_repo])

    assert len(first.queries.handlers()) == len(second.queries.handlers()) == 1
