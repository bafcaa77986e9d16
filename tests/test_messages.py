"""Messages: routing keys, readable names, and the optional Command[R] / Query[R] markers."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import pytest

import iambus
from iambus import Command, Dispatcher, Query
from iambus.messages import describe, message_key


@dataclass(frozen=True, slots=True)
class User:
    user_id: int
    name: str


@dataclass(frozen=True, slots=True)
class GetUser(Query[User]):
    user_id: int


@dataclass(frozen=True, slots=True)
class RenameUser(Command[int]):
    user_id: int
    name: str


@dataclass(frozen=True, slots=True)
class PlainEvent:
    value: int


class Outer:
    class Inner:
        pass


# -- Command[R] / Query[R] ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "marker"), [(GetUser(1), Query), (RenameUser(1, "ann"), Command)]
)
def test_markers_are_usable_as_slotted_frozen_dataclass_bases(message: Any, marker: type) -> None:
    assert isinstance(message, marker)
    assert not hasattr(message, "__dict__")  # slots=True still holds through the marker
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.user_id = 2
    assert dataclasses.fields(message)[0].name == "user_id"


def test_markers_are_generic() -> None:
    alias = Query[User]

    assert typing.get_origin(alias) is Query
    assert typing.get_args(alias) == (User,)
    assert typing.get_args(Command[int]) == (int,)
    assert typing.get_origin(GetUser.__orig_bases__[0]) is Query  # type: ignore[attr-defined]


def test_markers_add_no_state() -> None:
    assert Command.__slots__ == ()
    assert Query.__slots__ == ()
    assert not hasattr(Query(), "__dict__")


async def test_marked_messages_are_routed_by_their_type() -> None:
    dp = Dispatcher()
    users = {1: User(1, "ann")}

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> User:
        return users[query.user_id]

    @dp.commands.register(RenameUser)
    async def rename(command: RenameUser) -> int:
        users[command.user_id] = User(command.user_id, command.name)
        return command.user_id

    assert await dp.query(GetUser(1)) == User(1, "ann")
    assert await dp.execute(RenameUser(1, "bea")) == 1
    assert await dp.query(GetUser(1)) == User(1, "bea")


async def test_markers_are_optional() -> None:
    dp = Dispatcher()

    @dp.queries.register(PlainEvent)
    async def double(query: PlainEvent) -> int:
        return query.value * 2

    assert await dp.query(PlainEvent(4)) == 8


def test_markers_are_exported() -> None:
    assert iambus.Command is Command
    assert iambus.Query is Query
    assert {"Command", "Query"} <= set(iambus.__all__)


# -- message_key ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["on startup", "", "GetUser"])
def test_message_key_of_a_string_is_the_string(text: str) -> None:
    assert message_key(text) is text


@pytest.mark.parametrize(
    ("message", "key"),
    [
        (GetUser(1), GetUser),
        (RenameUser(1, "x"), RenameUser),
        (PlainEvent(0), PlainEvent),
        (Outer.Inner(), Outer.Inner),
        (42, int),
        (None, type(None)),
        (b"on startup", bytes),
    ],
)
def test_message_key_of_anything_else_is_its_type(message: Any, key: type) -> None:
    assert message_key(message) is key


# -- describe -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("on startup", "'on startup'"),
        ("", "''"),
        (GetUser, f"{__name__}.GetUser"),
        (Outer.Inner, f"{__name__}.Outer.Inner"),
        (int, "builtins.int"),
    ],
)
def test_describe(key: Any, text: str) -> None:
    assert describe(key) == text


# -- names ----------------------------------------------------------------------------

from iambus.errors import ImproperlyConfigured as _ImproperlyConfigured  # noqa: E402
from iambus.messages import (  # noqa: E402
    MessageRegistry,
    contract,
    message_name,
    result_type,
)


def test_default_name_is_the_qualname_and_contract_overrides_it() -> None:
    @dataclass
    class Placed:
        pass

    @contract("orders.Placed.v2")
    @dataclass
    class Renamed:
        pass

    class Sub(Renamed):
        pass

    assert (
        message_name(Placed)
        == "test_default_name_is_the_qualname_and_contract_overrides_it.<locals>.Placed"
    )
    assert message_name(Renamed) == "orders.Placed.v2"
    assert message_name(Sub).endswith("Sub")  # a subclass is another message
    assert message_name("on startup") == "on startup"


def test_contract_needs_a_name() -> None:
    with pytest.raises(_ImproperlyConfigured, match="non-empty string"):
        contract("")


def test_registry_refuses_two_types_with_one_name() -> None:
    @contract("Same")
    class A:
        pass

    @contract("Same")
    class B:
        pass

    registry = MessageRegistry([A])
    assert registry.name_of(A) == "Same"
    assert registry.key_of("Same") is A
    assert registry.key_of("Unknown") is None
    with pytest.raises(
        _ImproperlyConfigured, match=r"two message classes are named 'Same'.*@iambus\.contract"
    ):
        registry.add(B)
    assert registry.names() == ["Same"]


def test_result_type_comes_from_the_markers() -> None:
    @dataclass
    class GetIds(Query[list[int]]):
        pass

    @dataclass
    class Charge(Command[bool]):
        pass

    class Plain:
        pass

    from typing import Any

    assert result_type(GetIds) == list[int]
    assert result_type(Charge) is bool
    assert result_type(Plain) is Any
    assert result_type("name") is Any


Traced_R = typing.TypeVar("Traced_R")
Paged_T = typing.TypeVar("Paged_T")


class Traced(Command[Traced_R], typing.Generic[Traced_R]):
    """A project's own generic base for its commands (tracing, auth...)."""


class Paged(Traced[list[Paged_T]], typing.Generic[Paged_T]):
    pass


def test_result_type_reads_through_a_generic_base() -> None:
    # Once the first Command[...] met was Traced's own Command[T]: the TypeVar came back,
    # and a routed execute() decoded into "anything" (a dict where mypy said User).
    class Pay(Traced[User]):
        pass

    class Users(Paged[User]):
        pass

    class Again(Pay):
        pass

    assert result_type(Pay) is User
    assert result_type(Again) is User
    assert result_type(Users) == list[User]
    assert result_type(Traced) is Any  # R never bound: nothing declared
