"""What a message is, and the optional ``Command[R]`` / ``Query[R]`` markers.

Any object is a message. It is routed by its type — a dataclass, a pydantic model, a
msgspec Struct or a plain class instance alike — except a string, which is its own key
(``dp.events.register("on startup")``).

Subclassing ``Query[R]`` or ``Command[R]`` is optional. It only tells type checkers what
``await dp.query(...)`` / ``await dp.execute(...)`` returns::

    @dataclass(frozen=True, slots=True)
    class GetUser(Query[User]):
        user_id: int

    user = await dp.query(GetUser(7))   # a type checker sees ``User``
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

__all__ = ["Command", "Query", "describe", "message_key"]

R = TypeVar("R", covariant=True)

MessageKey = type | str


class Command(Generic[R]):
    """Marks a command whose handler returns ``R``."""

    __slots__ = ()


class Query(Generic[R]):
    """Marks a query whose handler returns ``R``."""

    __slots__ = ()


def message_key(message: Any) -> MessageKey:
    """The routing key of ``message``: the string itself, or the message's type."""
    return message if type(message) is str else type(message)


def describe(key: MessageKey) -> str:
    """A readable name for a routing key, as used in error messages."""
    if isinstance(key, str):
        return repr(key)
    return f"{key.__module__}.{key.__qualname__}"
