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
* ``ack``, ``retry``, ``dead_letter`` (CLIENT, operation type ``settle``): children of the
  ``process`` span.

The trace context travels in the envelope's headers, injected and extracted with the
global propagator (``opentelemetry.propagate``), so a propagator the application set is
used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, Span, SpanKind, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "iambus.tracing needs OpenTelemetry's API: pip install 'iambus[otel]'"
    ) from exc

from .middleware import CallNext, Context
from .telemetry import Observer, Processing, Sending, Settlement, error_type

__all__ = ["DELIVERY_ATTEMPT", "Tracing"]

DELIVERY_ATTEMPT = "messaging.iambus.message.delivery_attempt"
"""The span attribute of a delivery's attempt (1 for the first delivery); the conventions
have none that is not a broker's own."""


class Tracing(Observer):
    """Spans for each message sent, processed and settled; see the module docstring.

    ``tracer_provider``: where the spans go (default: the global one).
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("iambus", __version__, tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def send(self, sending: Sending) -> Iterator[None]:
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
        try:
            if not sending.relayed:
                propagate.inject(sending.headers, trace.set_span_in_context(span))
            yield
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    @contextlib.contextmanager
    def process(self, processing: Processing) -> Iterator[None]:
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
        name = f"process {processing.destination}"
        # The current span while the handler runs: what it sends and does is its child.
        # Errors are recorded here (with error.type), once.
        with self.tracer.start_as_current_span(
            name,
            context=context,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                _failed(span, exc)
                raise
            if processing.error is not None:
                _failed(span, processing.error)

    @contextlib.contextmanager
    def settle(self, settlement: Settlement) -> Iterator[None]:
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
        span = self.tracer.start_span(name, None, SpanKind.CLIENT, attributes)  # (see send)
        try:
            yield
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

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


def _failed(span: Span, exc: BaseException) -> None:
    kind = error_type(exc)
    span.set_attribute("error.type", kind)
    span.record_exception(exc)
    span.set_status(StatusCode.ERROR, f"{kind}: {exc}")
