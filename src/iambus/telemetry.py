"""Telemetry: the few points every message passes, where observers watch it go by.

::

    from iambus.tracing import Tracing
    from iambus.metrics import Metrics

    dp = Dispatcher(transport="redis://localhost", service="orders")
    dp.instrument(Tracing(), Metrics())

An ``Observer`` has three hooks, each returning a context manager around the work:

* ``send(sending)``: a message is about to leave: ``dp.send``, ``publish``, ``execute``
  and ``query`` through a transport, a routed message written to the outbox (operation
  ``create``), the relay's send of an outbox row, and a worker's reply. An observer may
  add headers to ``sending.headers`` (trace context): they travel in the envelope.
* ``process(processing)``: a worker processes a delivery (decoding, handler, reply).
  A failure of the handler is in ``processing.error`` when the block ends.
* ``settle(settlement)``: the worker settles a delivery: ``ack``, ``retry`` (with its
  delay) or ``dead_letter``, inside its ``process`` block.

With nothing attached, each point costs one attribute check. Observers are attached
with ``Dispatcher.instrument(...)`` (and ``Relay(telemetry=...)`` for a relay run on
its own); several may be attached, each sees every point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from .envelope import Envelope
from .errors import bad_option

logger = logging.getLogger(__name__)

__all__ = [
    "Observer",
    "Processing",
    "Sending",
    "Settlement",
    "Telemetry",
    "error_type",
    "system_of",
]

Operation = Literal["create", "send", "request", "reply"]
Outcome = Literal["ack", "retry", "dead_letter"]

_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()

# The messaging.system of a transport, from its URL's scheme (the convention's names
# where it has one; others are documented in docs/telemetry.md).
_SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "rediss": "redis", "tls": "nats"}


def system_of(url: str) -> str:
    """The ``messaging.system`` of a transport URL: ``redis``, ``rabbitmq``, ``nats``,
    ``memory`` (iambus's in-memory transport), or the URL's scheme."""
    scheme = url.partition("://")[0].lower() or "unknown"
    return _SYSTEMS.get(scheme, scheme)


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of ``exc``: its class's qualified name (a builtin's bare)."""
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclass(slots=True)
class Sending:
    """A message about to leave."""

    operation: Operation
    """``send`` (dp.send, publish), ``request`` (execute, query: the block lasts until
    the answer arrives), ``create`` (written to the outbox; the relay sends it later),
    ``reply`` (a worker answers a request)."""
    system: str
    """The transport's ``messaging.system``."""
    kind: str
    """``event``, ``command``, ``query``, or ``reply``."""
    destination: str | None
    """The address (``event.OrderPlaced``): low cardinality. None for a reply, whose
    address is the requester's own (``address`` holds it)."""
    address: str
    envelope: Envelope
    relayed: bool = False
    """Sent by the relay: the envelope was made (and its trace context set) when it was
    written to the outbox."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers an observer adds (trace context); they travel in the envelope."""


@dataclass(slots=True)
class Processing:
    """A delivery a worker processes."""

    system: str
    kind: str
    destination: str
    group: str
    handler: str
    envelope: Envelope
    attempt: int
    error: BaseException | None = None
    """What the handler (or decoding) raised, once the block ends; None if it did not."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """The worker settles a delivery: ``outcome`` is ``ack``, ``retry`` or
    ``dead_letter``."""

    processing: Processing
    outcome: Outcome
    delay: float | None = None
    """Seconds until a retry is delivered again."""


class Observer:
    """What watches messages go by; subclass it and override the hooks you need (each
    returns a context manager around the work; the defaults do nothing)."""

    def send(self, sending: Sending) -> AbstractContextManager[object]:
        return _NOTHING

    def process(self, processing: Processing) -> AbstractContextManager[object]:
        return _NOTHING

    def settle(self, settlement: Settlement) -> AbstractContextManager[object]:
        return _NOTHING


class Telemetry:
    """The observers attached to a dispatcher (or a relay), called as one."""

    __slots__ = ("observers", "single")

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers
        # One observer (the usual case) is called directly: no ExitStack per point.
        self.single = observers[0] if len(observers) == 1 else None

    @classmethod
    def of(cls, *observers: object, before: Telemetry | None = None) -> Telemetry | None:
        """``observers`` added to ``before``'s; None when there are none. Anything not an
        ``Observer`` is an ImproperlyConfigured naming it."""
        for observer in observers:
            if not isinstance(observer, Observer):
                raise bad_option(
                    "an observer",
                    observer,
                    "an iambus.telemetry.Observer (e.g. iambus.tracing.Tracing(), "
                    "iambus.metrics.Metrics(), iambus.metrics.PrometheusMetrics())",
                )
        every = (before.observers if before is not None else ()) + observers
        return cls(every) if every else None  # type: ignore[arg-type]

    def send(self, sending: Sending) -> AbstractContextManager[Envelope]:
        """Around a send; gives the envelope to send (with the headers observers added)."""
        if self.single is not None:
            return _Stamping(_Guarded(self.single, "send", sending), sending)
        return _Stamping(_Each(self.observers, "send", sending), sending)

    def process(self, processing: Processing) -> AbstractContextManager[object]:
        if self.single is not None:
            return _Guarded(self.single, "process", processing)
        return _Each(self.observers, "process", processing)

    def settle(self, settlement: Settlement) -> AbstractContextManager[object]:
        if self.single is not None:
            return _Guarded(self.single, "settle", settlement)
        return _Each(self.observers, "settle", settlement)


class _Each:
    """Several observers' blocks at one point, entered in order and left in reverse,
    each guarded as ``_Guarded`` guards one (inline: an object per observer and point,
    or an ExitStack, cost more than the observers' own work)."""

    __slots__ = ("entered", "hook", "observers", "point")

    def __init__(self, observers: tuple[Observer, ...], hook: str, point: object) -> None:
        self.observers = observers
        self.hook = hook
        self.point = point
        self.entered: list[tuple[Observer, AbstractContextManager[object]]] = []

    def __enter__(self) -> None:
        hook, point, entered = self.hook, self.point, self.entered
        for observer in self.observers:
            try:
                manager = getattr(observer, hook)(point)
                manager.__enter__()
            except Exception as exc:  # the observer's own: logged
                _complain(observer, hook, exc)
            except BaseException as exc:  # KeyboardInterrupt, say: the entered ones end
                self._leave(exc)
                raise
            else:
                entered.append((observer, manager))

    def __exit__(self, *exc_info: Any) -> None:
        self._leave(exc_info[1])

    def _leave(self, exc: BaseException | None) -> None:
        """Leave the entered blocks in reverse, each even if one before it raised (a
        BaseException: an observer's Exception is logged); the first such is raised."""
        entered, self.entered = self.entered, []
        raised: BaseException | None = None
        info = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
        for observer, manager in reversed(entered):
            try:
                manager.__exit__(*info)
            except Exception as failure:
                if failure is not exc:
                    _complain(observer, self.hook, failure)
            except BaseException as failure:
                raised = raised or failure
        if raised is not None:
            raise raised


class _Guarded:
    """One observer's block at one point, whose errors are the observer's own: logged
    (once a minute per observer and hook), never raised into the message's path. A
    tracer or a metrics file that fails must not change what happens to a message (a
    delivery not acked, a relayed row sent again), nor swallow the error of the work
    it watches."""

    __slots__ = ("hook", "manager", "observer", "point")

    def __init__(self, observer: Observer, hook: str, point: object) -> None:
        self.observer = observer
        self.hook = hook
        self.point = point
        self.manager: AbstractContextManager[object] | None = None

    def __enter__(self) -> None:
        try:
            manager = getattr(self.observer, self.hook)(self.point)
            manager.__enter__()
        except Exception as exc:
            _complain(self.observer, self.hook, exc)
        else:
            self.manager = manager

    def __exit__(self, *exc_info: Any) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            try:
                manager.__exit__(*exc_info)
            except Exception as exc:
                if exc is not exc_info[1]:
                    _complain(self.observer, self.hook, exc)
        # (None: the work's own error goes on, whatever the observer said)


_complained: dict[tuple[type, str], float] = {}
COMPLAIN_EVERY = 60.0
"""Seconds between two log lines about one observer's failing hook."""


def _complain(observer: Observer, hook: str, exc: Exception) -> None:
    where = (type(observer), hook)
    now = time.monotonic()
    if now - _complained.get(where, -COMPLAIN_EVERY) < COMPLAIN_EVERY:
        logger.debug("iambus: observer %r failed in %s() again", observer, hook, exc_info=exc)
        return
    _complained[where] = now
    logger.error(
        "iambus: observer %r failed in %s(); the message goes on without it (logged once a "
        "minute while it fails)",
        observer,
        hook,
        exc_info=exc,
    )


def _stamped(sending: Sending) -> Envelope:
    envelope = sending.envelope
    if sending.headers:
        headers = {**envelope.headers, **sending.headers}
        envelope = dataclasses.replace(envelope, headers=headers)
    return envelope


class _Stamping:
    """One observer's ``send`` block, giving the envelope with the headers it added."""

    __slots__ = ("manager", "sending")

    def __init__(self, manager: AbstractContextManager[object], sending: Sending) -> None:
        self.manager = manager
        self.sending = sending

    def __enter__(self) -> Envelope:
        self.manager.__enter__()
        return _stamped(self.sending)

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self.manager.__exit__(*exc_info)
