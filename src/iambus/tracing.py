"""OpenTelemetry tracing: spans per the messaging semantic conventions (``iambus[otel]``).

::

    from iambus.tracing import Tracing

    dp.instrument(Tracing())  # the global TracerProvider, or Tracing(tracer_provider=...)

Spans (names ``{operation} {destination}``, destination = the address, e.g.
``event.OrderPlaced``):

* ``send``/``request`` (PRODUCER): ``dp.send``, ``publish``; ``execute``/``query`` (the
  span lasts until the answer arrives). ``create`` (PRODUCER): a routed message written
  to the outbox in a unit of work; the relay's later send of it is a ``send`` span (CLIENT)
  in the same trace. ``reply`` (PRODUCER): a worker's answer.
* ``process`` (CONSUMER): a worker handles a delivery; a child of the message's creation
  context (the producer's span, carried in ``traceparent``/``tracestate`` headers), with
  a link to it as well.
* ``retry``, ``dead_letter`` (CLIENT, operation type ``settle``): children of the
  ``process`` span; ``ack`` too with ``Tracing(acks=True)``.

The trace context travels in the envelope's headers, injected and extracted with the
global propagator (``opentelemetry.propagate``), so a propagator the application set is
used.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from contextlib import AbstractContextManager
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, Span, SpanKind, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "iambus.tracing needs OpenTelemetry's API: pip install 'iambus[otel]'"
    ) from exc

from .logs import _text, scrub
from .middleware import CallNext, Context
from .telemetry import Observer, Processing, Sending, Settlement, error_type

__all__ = ["CANCELLED", "DELIVERY_ATTEMPT", "Tracing"]

CANCELLED = "iambus.cancelled"
"""The event on a span whose work a stopping worker cancelled (its delivery comes again):
not an error."""

DELIVERY_ATTEMPT = "messaging.iambus.message.delivery_attempt"
"""The span attribute of a delivery's attempt (1 for the first delivery); the conventions
have none that is not a broker's own."""


class Tracing(Observer):
    """Spans for each message sent, processed and settled; see the module docstring.

    ``tracer_provider``: where the spans go (default: the global one). ``acks``: a
    ``settle`` span for every ack too (off by default: an ack is the end of the
    ``process`` span, and a span per ack costs about a third of a message's tracing;
    retries and dead letters always have their span).
    """

    def __init__(
        self, *, tracer_provider: TracerProvider | None = None, acks: bool = False
    ) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("iambus", __version__, tracer_provider=tracer_provider)
        self.acks = acks

    def send(self, sending: Sending) -> AbstractContextManager[object]:
        envelope = sending.envelope
        operation = sending.operation
        attributes: dict[str, Any] = {
            "messaging.system": sending.system,
            "messaging.operation.name": operation,
            "messaging.operation.type": "create" if operation == "create" else "send",
            "messaging.destination.name": sending.address,
            "messaging.message.id": envelope.id,
        }
        if envelope.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = envelope.correlation_id
        if sending.destination is None:
            attributes["messaging.destination.temporary"] = True
            name: str = operation
        else:
            name = f"{operation} {sending.destination}"
        if sending.relayed:
            # The relay sends a message made earlier: its creation context came with it.
            context = propagate.extract(envelope.headers)
            kind = SpanKind.CLIENT
        else:
            context, kind = None, SpanKind.PRODUCER
        # Not made the current span: nothing runs inside it that makes spans (the
        # consumer's come through the headers), and attaching it costs time per message.
        span = self.tracer.start_span(name, context, kind, attributes)
        if not sending.relayed:
            try:
                propagate.inject(sending.headers, trace.set_span_in_context(span))
            except BaseException as exc:  # (a propagator of the application's that fails)
                _failed(span, exc)
                span.end()
                raise
        # A reply is sent by a worker: cancelled, the worker is stopping (see _Ending).
        return _Ending(span, stopping=operation == "reply")

    def process(self, processing: Processing) -> AbstractContextManager[object]:
        envelope = processing.envelope
        attributes: dict[str, Any] = {
            "messaging.system": processing.system,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": processing.destination,
            "messaging.consumer.group.name": processing.group,
            "messaging.message.id": envelope.id,
            DELIVERY_ATTEMPT: processing.attempt,
        }
        if envelope.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = envelope.correlation_id
        context = propagate.extract(envelope.headers) if envelope.headers else None
        created = trace.get_current_span(context).get_span_context() if context else None
        links = [Link(created)] if created is not None and created.is_valid else None
        span = self.tracer.start_span(
            f"process {processing.destination}",
            context,
            SpanKind.CONSUMER,
            attributes,
            links,
            record_exception=False,
            set_status_on_exception=False,
        )
        # The current span while the handler runs: what it sends and does is its child.
        # Errors are recorded here (with error.type), once.
        return _Current(span, processing)

    def settle(self, settlement: Settlement) -> AbstractContextManager[object]:
        if settlement.outcome == "ack" and not self.acks:
            return _NOTHING
        processing = settlement.processing
        attributes: dict[str, Any] = {
            "messaging.system": processing.system,
            "messaging.operation.name": settlement.outcome,
            "messaging.operation.type": "settle",
            "messaging.destination.name": processing.destination,
            "messaging.consumer.group.name": processing.group,
            "messaging.message.id": processing.envelope.id,
            DELIVERY_ATTEMPT: processing.attempt,
        }
        if settlement.delay is not None:
            attributes["messaging.iambus.retry.delay"] = settlement.delay
        name = f"{settlement.outcome} {processing.destination}"
        span = self.tracer.start_span(name, None, SpanKind.CLIENT, attributes)
        return _Ending(span, stopping=True)

    async def handlers(self, message: Any, call_next: CallNext, context: Context) -> Any:
        """Middleware: a span (INTERNAL) around each handler call, in-process ones too.
        Opt-in, ``dp.add_middleware(tracing.handlers)``: a dispatcher without it pays
        nothing for tracing on its in-process path."""
        kind = type(message)
        with self.tracer.start_as_current_span(
            f"handle {kind.__qualname__}",
            kind=SpanKind.INTERNAL,
            attributes={"iambus.handler": context.handler, "iambus.message.kind": context.kind},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next(message)
            except Exception as exc:
                _failed(span, exc)
                raise


_NOTHING = contextlib.nullcontext()


class _Ending:
    """A span's block, not its current span: it ends with the block and records the
    block's error. (A class, not a generator: it runs for every message.) ``stopping``:
    the block runs in a worker (a settlement, a reply), where a cancellation means the
    worker is stopping: not a failure (see ``_Current``)."""

    __slots__ = ("span", "stopping")

    def __init__(self, span: Span, *, stopping: bool = False) -> None:
        self.span = span
        self.stopping = stopping

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is None:
                pass
            elif self.stopping and isinstance(exc, asyncio.CancelledError):
                self.span.add_event(CANCELLED)
            else:
                _failed(self.span, exc)
        finally:
            self.span.end()


class _Current:
    """The ``process`` span's block: the current span while it runs; the handler's
    error (which the worker caught and settled) or the block's own is recorded, but not
    the cancellation of a worker that stops."""

    __slots__ = ("processing", "span", "token")

    def __init__(self, span: Span, processing: Processing) -> None:
        self.span = span
        self.processing = processing
        self.token: object = None

    def __enter__(self) -> None:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            otel_context.detach(self.token)  # type: ignore[arg-type]
            error = self.processing.error if self.processing.error is not None else exc
            if error is exc and isinstance(exc, asyncio.CancelledError):
                # The worker stopped: no failure (an alert on error spans would fire on
                # every deploy); the delivery is left unsettled and comes again.
                self.span.add_event(CANCELLED)
            elif error is not None:
                _failed(self.span, error)
        finally:
            self.span.end()


def _failed(span: Span, exc: BaseException) -> None:
    """``exc`` on ``span``: ``error.type``, status ERROR, the ``exception`` event. Made
    here rather than by ``span.record_exception``: the message and the stack go through
    ``logs.scrub`` (a URL's password in an error, a refused connection's, never reaches
    the trace backend), and an exception whose ``str()`` fails is recorded all the same."""
    kind = error_type(exc)
    text = scrub(_text(exc))
    span.set_attribute("error.type", kind)
    if span.is_recording():
        span.add_event(
            "exception",
            {
                "exception.type": kind,
                "exception.message": text,
                "exception.stacktrace": scrub("".join(traceback.format_exception(exc))),
                "exception.escaped": False,
            },
        )
    span.set_status(StatusCode.ERROR, f"{kind}: {text}")
