"""Simple dependency injection: ``Singleton`` and ``Factory`` providers.

Pass a provider as a bound argument; the handler receives what it provides::

    async def get_storage() -> dict[str, Book]:
        return {}

    @dp.queries.register(BookQuery, storage=Singleton["storage": get_storage])
    async def find_book(query: BookQuery, storage: dict[str, Book]) -> list[Book]: ...

``Singleton["name": fn]`` calls ``fn`` once, on first use, and hands every handler the
same object; ``Factory["name": fn]`` calls ``fn`` for every handler call. ``fn`` may be
sync (called inline) or async (awaited — never by blocking the event loop). The call
form ``Singleton(fn, name="storage")`` is the same thing, and type-checks cleanly.

Providers belong to the dispatcher they are bound in: two dispatchers (two tests) never
share a singleton. Within one dispatcher a name means one provider: reusing it with the
other provider type or another function raises ``ProviderConflict``; reusing it with the
same function shares the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from .errors import ProviderConflict

__all__ = ["Factory", "Provider", "Singleton"]

ProviderFn = Callable[[], Any]


P = TypeVar("P", bound="Provider")


class _Named(type):
    """``Singleton["name": fn]``: on the metaclass, so that type checkers read it as a call."""

    def __getitem__(cls: type[P], item: slice) -> P:  # type: ignore[misc]
        if (
            not isinstance(item, slice)
            or item.step is not None
            or item.stop is None
            or not isinstance(item.start, str)
        ):
            raise TypeError(
                f"{cls.__name__}[...] takes a slice of a name and a callable: "
                f'{cls.__name__}["repo": get_repo], got {item!r}'
            )
        return cls(item.stop, name=str(item.start))


class Provider(metaclass=_Named):
    """A named recipe for a value that handlers receive as an argument."""

    __slots__ = ("fn", "name")
    kind: ClassVar[str] = "provider"

    def __init__(self, fn: ProviderFn, *, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(
                f"{type(self).__name__} needs a callable that returns the value, got {fn!r}"
            )
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__qualname__", repr(fn))

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.name!r}: {self.fn!r}]"

    def state(self) -> ProviderState:
        raise NotImplementedError


class Singleton(Provider):
    """Calls its function once, lazily, and gives every handler the same object."""

    __slots__ = ()
    kind = "Singleton"

    def state(self) -> ProviderState:
        return SingletonState(self.fn)


class Factory(Provider):
    """Calls its function for every handler call."""

    __slots__ = ()
    kind = "Factory"

    def state(self) -> ProviderState:
        return FactoryState(self.fn)


class ProviderState:
    """What a dispatcher keeps for one provider name: how to get the value now."""

    __slots__ = ("fn", "ready", "value")

    def __init__(self, fn: ProviderFn) -> None:
        self.fn = fn
        # ``ready`` means ``value`` can be used as is, with no call and no await.
        self.ready = False
        self.value: Any = None

    async def get(self) -> Any:
        raise NotImplementedError


async def _call(fn: ProviderFn) -> Any:
    value = fn()
    if inspect.isawaitable(value):
        value = await value
    return value


class SingletonState(ProviderState):
    __slots__ = ("_pending",)

    def __init__(self, fn: ProviderFn) -> None:
        super().__init__(fn)
        self._pending: asyncio.Future[Any] | None = None

    async def get(self) -> Any:
        while not self.ready:
            pending = self._pending
            if pending is None:
                return await self._create()
            # Concurrent callers wait for the one creation in progress.
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller was cancelled
                # The creating caller was cancelled, not this one: create it here.
        return self.value

    async def _create(self) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending = future
        try:
            value = await _call(self.fn)
        except BaseException as exc:
            # Not cached: the next call tries again.
            self._pending = None
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # waiters, if any, see it; no "never retrieved" warning
            raise
        self.value, self.ready, self._pending = value, True, None
        future.set_result(value)
        return value


class FactoryState(ProviderState):
    __slots__ = ()

    async def get(self) -> Any:
        return await _call(self.fn)


class ProviderRegistry:
    """One dispatcher's providers, by name."""

    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[Provider, ProviderState]] = {}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo the names registered inside the block if it raises (a failed bind)."""
        before = set(self._by_name)
        try:
            yield
        except BaseException:
            for name in set(self._by_name) - before:
                del self._by_name[name]
            raise

    def resolve(self, provider: Provider) -> ProviderState:
        known = self._by_name.get(provider.name)
        if known is None:
            state = provider.state()
            self._by_name[provider.name] = (provider, state)
            return state
        first, state = known
        if type(first) is not type(provider):
            raise ProviderConflict(
                f"provider {provider.name!r} is already a {first.kind} and cannot become a "
                f"{provider.kind}; use another name, or the same provider type everywhere"
            )
        if first.fn is not provider.fn:
            raise ProviderConflict(
                f"provider {provider.name!r} already calls {first.fn!r}, not {provider.fn!r}; "
                f"one name stands for one provider function in a dispatcher"
            )
        return state
