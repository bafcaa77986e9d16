"""Checked by mypy (tests/test_typing.py), never run: typing is part of the API."""

from dataclasses import dataclass
from typing import Any, assert_type

from iambus import Command, Dispatcher, Query


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class GetUser(Query[User]):
    user_id: int


@dataclass(frozen=True, slots=True)
class CreateUser(Command[int]):
    name: str


@dataclass(frozen=True, slots=True)
class Untyped:
    pass


dp = Dispatcher()


@dp.queries.register(GetUser)
async def get_user(query: GetUser) -> User:
    return User("ann")


async def main() -> None:
    # the decorator returns the function unchanged, signature included
    assert_type(await get_user(GetUser(1)), User)
    assert_type(await dp.query(GetUser(7)), User)
    assert_type(await dp.execute(CreateUser("ann")), int)
    assert_type(await dp.execute(CreateUser("ann"), timeout=2), int)
    assert_type(await dp.send(CreateUser("ann"), id="x"), None)
    assert_type(await dp.handle(GetUser(7), wait_for_response=True), User)
    assert_type(await dp.query(Untyped()), Any)
    assert_type(await dp.publish(Untyped()), None)
