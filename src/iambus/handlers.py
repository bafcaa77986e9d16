"""Handlers: what may be bound, how its signature is read, and how it is called.

A handler is an ``async def`` function, or a class whose ``handle`` (see
``HandlerProtocol``) or ``__call__`` is ``async def``. Its signature is read once, at
registration, and turned into a plain call; nothing is inspected per message.

Arguments bound at registration (``register(Msg, repo=repo)``) go to the function's
parameters, or for a class to its ``__init__`` — the class is instantiated for every
call, so state such as collected events never leaks between calls. The one required
parameter left unbound receives the message; ``argname=`` names it explicitly.
Parameters with defaults keep them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import HandlerIsSync, HandlerSignatureError, ImproperlyConfigured
from .messages import MessageKey, describe
from .providers import Provider, ProviderRegistry, ProviderState
from .retry import Retry, checked_policy
from .unit_of_work import Connection, Session, providers_for

__all__ = ["AbstractHandler", "Handler", "HandlerProtocol", "Kind"]

Kind = Literal["event", "command", "query"]
# ``invoke(message)`` runs the user's code and returns its result; for a handler that
# collects events it is ``invoke(message, sink)`` and extends ``sink`` after success.
Invoke = Callable[..., Awaitable[Any]]

_P = inspect.Parameter
_VARIADIC = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)


@runtime_checkable
class HandlerProtocol(Protocol):
    """A class handler that collects events while it handles a message.

    iambus instantiates the class for each message, awaits ``handle``, then publishes
    what ``dump_events`` returns — only if ``handle`` succeeded.
    """

    async def handle(self, message: Any, /) -> Any: ...

    async def add_event(self, event: Any) -> None: ...

    async def dump_events(self) -> list[Any]: ...


class AbstractHandler:
    """Base class for class handlers: implements ``add_event`` and ``dump_events``.

    Subclass it and write ``async def handle(self, message)``::

        class CreateUserHandler(AbstractHandler):
            def __init__(self, repo: UserRepo) -> None:
                self.repo = repo

            async def handle(self, command: CreateUser) -> int:
                user_id = await self.repo.add(command.name)
                await self.add_event(UserCreated(user_id))
                return user_id
    """

    # Not set in __init__: subclasses need not call super().__init__().
    _iambus_events: list[Any]

    async def handle(self, message: Any, /) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must define async def handle()")

    async def add_event(self, event: Any) -> None:
        """Publish ``event`` once this call of ``handle`` has succeeded."""
        try:
            self._iambus_events.append(event)
        except AttributeError:
            self._iambus_events = [event]

    async def dump_events(self) -> list[Any]:
        """Return the collected events and forget them."""
        events = getattr(self, "_iambus_events", [])
        self._iambus_events = []
        return events


@dataclass(frozen=True, slots=True, eq=False)
class Handler:
    """The router's record of one bound handler."""

    fn: Any
    """What the user bound: the function, class or callable object, unchanged."""
    name: str
    """The handler's qualified name, as used in logs and errors."""
    kind: Kind
    message: MessageKey
    invoke: Invoke
    collects_events: bool
    response_event: type | None
    initkwargs: Mapping[str, Any]
    retry: Retry | None = None
    """The retry policy for messages from a transport (None: the dispatcher's)."""
    unit_of_work: bool | None = None
    """Whether it runs in a unit of work (None: as its router, then its dispatcher, say)."""

    def __repr__(self) -> str:
        return f"<Handler {self.kind} {describe(self.message)} -> {self.name}>"


def qualified_name(obj: Any) -> str:
    target = obj.func if isinstance(obj, functools.partial) else obj
    qualname = getattr(target, "__qualname__", None)
    if qualname is None:
        qualname = type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{qualname}"


def build_handler(
    kind: Kind,
    message: MessageKey,
    fn: Any,
    *,
    argname: str | None,
    response_event: type | None,
    initkwargs: Mapping[str, Any],
    providers: ProviderRegistry,
    retry: Retry | None = None,
    unit_of_work: bool | None = None,
) -> Handler:
    """Check ``fn`` against the message and bound arguments, and compile its call.

    Parameters typed as a unit of work's session or connection (``AsyncSession``,
    ``asyncpg.Connection``) that are not bound get it (``unit_of_work.Session`` /
    ``Connection``), and the handler then runs in a unit of work.
    """
    name = qualified_name(fn)
    checked_policy(f"retry of {name}", retry)
    if unit_of_work is not None and not isinstance(unit_of_work, bool):
        raise ImproperlyConfigured(
            f"unit_of_work of {name} must be True, False or None (as its router), got "
            f"{unit_of_work!r}"
        )
    taken = set(initkwargs) | ({argname} if isinstance(argname, str) else set())
    injected = providers_for(fn, taken)
    if injected:
        initkwargs = {**initkwargs, **injected}
    takes_unit = any(v is Session or v is Connection for v in initkwargs.values())
    if takes_unit:
        if unit_of_work is False:
            raise ImproperlyConfigured(
                f"{name} takes the unit of work's session or connection, and is registered "
                f"with unit_of_work=False; drop one of the two"
            )
        unit_of_work = True
    if response_event is not None and not isinstance(response_event, type):
        raise ImproperlyConfigured(
            f"response_event of {name} must be a class (the event type its return value "
            f"is published as), got {response_event!r}"
        )
    if argname is not None and not isinstance(argname, str):
        raise HandlerSignatureError(
            f"argname of {name} must be the name of the parameter that receives the "
            f"message, got {argname!r}"
        )
    static = {k: v for k, v in initkwargs.items() if not isinstance(v, Provider)}
    provided = [(k, providers.resolve(v)) for k, v in initkwargs.items() if isinstance(v, Provider)]
    # (the router undoes these provider registrations if binding fails after this point)

    if isinstance(fn, type):
        invoke, collects = _class_invoke(fn, name, argname, initkwargs, static, provided)
    else:
        invoke, collects = _function_invoke(fn, name, argname, initkwargs, static, provided)
    return Handler(
        fn=fn,
        name=name,
        kind=kind,
        message=message,
        invoke=invoke,
        collects_events=collects,
        response_event=response_event,
        initkwargs=dict(initkwargs),
        retry=retry,
        unit_of_work=unit_of_work,
    )


def _function_invoke(
    fn: Any,
    name: str,
    argname: str | None,
    initkwargs: Mapping[str, Any],
    static: dict[str, Any],
    provided: list[tuple[str, ProviderState]],
) -> tuple[Invoke, bool]:
    if not callable(fn):
        if callable(getattr(fn, "handle", None)):
            raise HandlerSignatureError(
                f"got an instance of the class handler {type(fn).__qualname__}; bind the "
                f"class itself (iambus instantiates it for every message, with the bound "
                f"arguments)"
            )
        raise HandlerSignatureError(f"{name} is not callable; bind an async function or class")
    target = fn if inspect.isroutine(fn) or isinstance(fn, functools.partial) else fn.__call__
    if not inspect.iscoroutinefunction(target):
        raise HandlerIsSync(
            f"handler {name} is not a coroutine function; define it with `async def` "
            f"(iambus awaits every handler and never runs blocking code on the event loop)"
        )
    sig = _signature(target, name)
    param, positional = _message_parameter(sig, name, set(initkwargs), argname)

    if provided:
        return _with_providers(fn, param, positional, static, provided), False
    # The common cases are a single call with no wrapper of ours in between.
    if param is None:
        if static:
            return (lambda message: fn(**static)), False
        return (lambda message: fn()), False
    if positional:
        return (functools.partial(fn, **static) if static else fn), False
    return (lambda message: fn(**{param: message}, **static)), False


def _with_providers(
    call: Callable[..., Awaitable[Any]],
    param: str | None,
    positional: bool,
    static: dict[str, Any],
    provided: list[tuple[str, ProviderState]],
) -> Invoke:
    send = _sender(param, positional)

    async def invoke(message: Any) -> Any:
        return await send(call, message, await _resolve(static, provided))

    return invoke


async def _resolve(
    static: dict[str, Any], provided: list[tuple[str, ProviderState]]
) -> dict[str, Any]:
    """The bound arguments of one call: the static ones plus what providers give now."""
    kwargs = static.copy()
    for key, state in provided:
        kwargs[key] = state.value if state.ready else await state.get()
    return kwargs


Sender = Callable[[Callable[..., Awaitable[Any]], Any, dict[str, Any]], Awaitable[Any]]


def _sender(param: str | None, positional: bool) -> Sender:
    """How to pass the message: not at all, first positional, or by name."""
    if param is None:
        return lambda call, message, kwargs: call(**kwargs)
    if positional:
        return lambda call, message, kwargs: call(message, **kwargs)
    return lambda call, message, kwargs: call(**kwargs, **{param: message})


def _class_invoke(
    cls: type,
    name: str,
    argname: str | None,
    initkwargs: Mapping[str, Any],
    static: dict[str, Any],
    provided: list[tuple[str, ProviderState]],
) -> tuple[Invoke, bool]:
    method_name = "handle" if callable(getattr(cls, "handle", None)) else "__call__"
    if method_name == "__call__" and not any("__call__" in vars(k) for k in cls.__mro__[:-1]):
        raise HandlerSignatureError(
            f"class handler {name} has neither `async def handle(self, message)` nor "
            f"`async def __call__(self, message)`; define one of them"
        )
    method = getattr(cls, method_name)
    if method is AbstractHandler.handle:
        raise HandlerSignatureError(
            f"class handler {name} subclasses AbstractHandler but does not define "
            f"`async def handle(self, message)`; add it"
        )
    if not inspect.iscoroutinefunction(method):
        raise HandlerIsSync(
            f"{name}.{method_name} is not a coroutine function; define it with `async def`"
        )
    init_sig = _signature(cls, name)
    _check_bindable(init_sig, f"{name}.__init__", set(initkwargs))
    missing = [
        p.name
        for p in init_sig.parameters.values()
        if p.default is _P.empty and p.kind not in _VARIADIC and p.name not in initkwargs
    ]
    if missing:
        raise HandlerSignatureError(
            f"{name}.__init__ needs {_names(missing)}, which {_were(missing)} not bound; "
            f"pass {', '.join(f'{m}=...' for m in missing)} when registering the handler"
        )
    method_sig = _signature(method, f"{name}.{method_name}")
    params = list(method_sig.parameters.values())[1:]  # drop self
    param, positional = _message_parameter(
        method_sig.replace(parameters=params), f"{name}.{method_name}", set(), argname
    )
    collects = callable(getattr(cls, "dump_events", None))

    send = _sender(param, positional)
    no_kwargs: dict[str, Any] = {}

    async def make() -> Any:
        return cls(**(await _resolve(static, provided) if provided else static))

    async def call(message: Any) -> Any:
        return await send(getattr(await make(), method_name), message, no_kwargs)

    if not collects:
        return call, False

    async def call_collecting(message: Any, sink: list[Any]) -> Any:
        instance = await make()
        result = await send(getattr(instance, method_name), message, no_kwargs)
        events = instance.dump_events()
        if inspect.isawaitable(events):
            events = await events
        # Replace, not extend: when middleware retries, only the events of the call
        # whose result is returned are published, not those of a failed attempt.
        sink[:] = events
        return result

    return call_collecting, True


def _signature(obj: Any, name: str) -> inspect.Signature:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        raise HandlerSignatureError(f"cannot read the signature of {name}: {exc}") from exc


def _check_bindable(sig: inspect.Signature, owner: str, bound: set[str]) -> None:
    params = sig.parameters
    takes_any = any(p.kind is _P.VAR_KEYWORD for p in params.values())
    for key in sorted(bound):
        p = params.get(key)
        if p is None:
            if takes_any:
                continue
            raise HandlerSignatureError(
                f"{owner} has no parameter {key!r} for the bound argument {key}=...; "
                f"remove it from the registration or add it to the signature "
                f"(parameters: {_names(list(params)) or 'none'})"
            )
        if p.kind is _P.POSITIONAL_ONLY:
            raise HandlerSignatureError(
                f"{owner}: parameter {key!r} is positional-only and cannot be bound by "
                f"keyword; remove the `/` before it"
            )
        if p.kind in _VARIADIC:
            raise HandlerSignatureError(
                f"{owner}: {key!r} is a variadic parameter and cannot be bound by name"
            )


def _message_parameter(
    sig: inspect.Signature, owner: str, bound: set[str], argname: str | None
) -> tuple[str | None, bool]:
    """Which parameter receives the message, and whether it is passed positionally."""
    _check_bindable(sig, owner, bound)
    params = [p for p in sig.parameters.values() if p.kind not in _VARIADIC]
    required = [p for p in params if p.default is _P.empty and p.name not in bound]
    if argname is not None:
        if argname in bound:
            raise HandlerSignatureError(
                f"{owner}: {argname!r} is named as the message parameter (argname=) and "
                f"also bound as {argname}=...; it can only be one of the two"
            )
        chosen = next((p for p in params if p.name == argname), None)
        if chosen is None:
            raise HandlerSignatureError(
                f"{owner} has no parameter {argname!r} to receive the message; argname= "
                f"must name one of: {_names([p.name for p in params]) or 'none'}"
            )
    elif len(required) > 1:
        names = [p.name for p in required]
        raise HandlerSignatureError(
            f"{owner} has {len(names)} required parameters that are not bound: "
            f"{_names(names)}. One of them receives the message; bind the others when "
            f"registering (e.g. {names[-1]}=...) or name the message parameter with "
            f"argname={names[0]!r}"
        )
    else:
        chosen = required[0] if required else None
    if chosen is None:
        return None, False

    others = [p.name for p in required if p is not chosen]
    if others:
        raise HandlerSignatureError(
            f"{owner}: {_names(others)} {_were(others)} not bound and {argname!r} receives "
            f"the message; bind {', '.join(f'{o}=...' for o in others)} when registering"
        )
    positional_params = [p for p in params if p.kind is not _P.KEYWORD_ONLY]
    first = positional_params[0] if positional_params else None
    if chosen.kind is _P.POSITIONAL_ONLY and chosen is not first:
        raise HandlerSignatureError(
            f"{owner}: the message parameter {chosen.name!r} is positional-only but not "
            f"the first parameter, so it cannot be passed; move it first or remove the `/`"
        )
    return chosen.name, chosen is first


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _were(names: list[str]) -> str:
    return "was" if len(names) == 1 else "were"
