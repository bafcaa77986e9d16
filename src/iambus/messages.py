"""What a message is, and the optional ``Command[R]`` / ``Query[R]`` markers.

Any object is a message. It is routed by its type — a dataclass, a pydantic model, a
msgspec Struct or a plain class instance alike — except a string, which is its own key
(``dp.events.register("on startup")``).

Subclassing ``Query[R]`` or ``Command[R]`` is optional. It tells type checkers what
``await dp.query(...)`` / ``await dp.execute(...)`` returns, and tells a transport what type
to decode a remote query's result into::

    @dataclass(frozen=True, slots=True)
    class GetUser(Query[User]):
        user_id: int

    user = await dp.query(GetUser(7))   # a type checker sees ``User``

A message that crosses processes travels under a stable *name*: by default its class's
``__qualname__`` (``"OrderPlaced"``), or what its ``__message_name__`` says — set it
directly or with ``@contract("orders.OrderPlaced")``. A string message's name is itself.
Rename a class freely once it has an explicit name; without one, the name is the contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, get_args, get_origin

from .errors import ImproperlyConfigured

__all__ = [
    "Command",
    "MessageRegistry",
    "Query",
    "contract",
    "describe",
    "message_key",
    "message_name",
    "result_type",
]

R = TypeVar("R", covariant=True)
T = TypeVar("T", bound=type)

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


def contract(name: str) -> Callable[[T], T]:
    """Give a message class a stable name for the wire; returns the class unchanged."""
    if not isinstance(name, str) or not name:
        raise ImproperlyConfigured(f"a message name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        cls.__message_name__ = name  # type: ignore[attr-defined]
        return cls

    return decorate


def message_name(key: MessageKey) -> str:
    """The wire name of a routing key: the string itself, or the class's contract name."""
    if isinstance(key, str):
        return key
    # Read from the class itself, not inherited: a subclass is another message.
    explicit = key.__dict__.get("__message_name__")
    return explicit if isinstance(explicit, str) else key.__qualname__


def result_unread(key: MessageKey) -> bool:
    """Whether a requester of ``key`` ignores its result (a ``Command[None]``: its answer
    carries nothing)."""
    return result_type(key) in (None, type(None))


@functools.cache  # read for every routed request and every answer; a class's R is fixed
def result_type(key: MessageKey) -> Any:
    """``R`` of a ``Query[R]`` / ``Command[R]`` subclass, or ``Any`` when not declared.

    Read through generic bases too: with ``class Traced(Command[T], Generic[T])``,
    ``class Pay(Traced[Receipt])`` declares ``Receipt``.
    """
    if isinstance(key, type):
        found = _declared(key, {})
        if found is not None and not isinstance(found, TypeVar):
            return found
    return Any


def _declared(cls: type, bound: dict[Any, Any]) -> Any:
    # The R of the first Command[...] / Query[...] among the bases of ``cls``, in MRO
    # order, each type variable replaced by what the subclass bound it to (``bound``).
    for base in getattr(cls, "__orig_bases__", ()):
        origin, args = get_origin(base) or base, get_args(base)
        args = tuple(_bind(arg, bound) for arg in args)
        if origin in (Query, Command):
            if args:
                return args[0]
            continue
        if not isinstance(origin, type) or origin is Generic:
            continue
        parameters = getattr(origin, "__parameters__", ())
        found = _declared(origin, dict(zip(parameters, args, strict=False)))
        if found is not None:
            return found
    return None


def _bind(arg: Any, bound: dict[Any, Any]) -> Any:
    if isinstance(arg, TypeVar):
        return bound.get(arg, arg)
    parameters = getattr(arg, "__parameters__", ())
    if parameters and get_origin(arg) is not None:
        try:
            return arg[tuple(bound.get(p, p) for p in parameters)]
        except TypeError:
            return arg
    return arg


class MessageRegistry:
    """Names to message types and back, for one dispatcher; refuses ambiguity."""

    __slots__ = ("_by_key", "_by_name")

    def __init__(self, keys: Iterable[MessageKey] = ()) -> None:
        self._by_name: dict[str, MessageKey] = {}
        self._by_key: dict[MessageKey, str] = {}
        for key in keys:
            self.add(key)

    def add(self, key: MessageKey) -> str:
        """Register ``key`` and return its name; a name taken by another type is refused."""
        known = self._by_key.get(key)
        if known is not None:
            return known
        name = message_name(key)
        other = self._by_name.get(name)
        if other is not None and other != key:
            raise ImproperlyConfigured(
                f"two message classes are named {name!r} on the wire: {describe(other)} and "
                f"{describe(key)}, which would share one address and be decoded as each "
                f"other; give one a distinct name with @iambus.contract('...') on the class "
                f"(or a __message_name__ attribute)"
            )
        self._by_name[name] = key
        self._by_key[key] = name
        return name

    def name_of(self, key: MessageKey) -> str:
        return self._by_key.get(key) or self.add(key)

    def key_of(self, name: str) -> MessageKey | None:
        """The type registered under ``name``, or None for a name this process does not know."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)
