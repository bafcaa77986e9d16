"""The worker: runs a dispatcher's handlers on messages from its transport.

``async with dp:`` (or ``await dp.run()``, or ``iambus worker module:dp``) starts it when
the dispatcher has a transport and handlers for routed messages. It subscribes:

* each event handler to its event, as group ``"<service>.<handler>"`` (new events only);
* the service to each command and query it owns, as group ``"<service>"`` (backlog too).

For every delivery it decodes the message, runs the handler (with middleware and
cascades, exactly as in-process), and only then settles it:

* success: events the handler emitted have been handed to the transport, and the
  background work it queued in-process (``dp.handle(...)`` without waiting, and what that
  work queued in turn) has run; then **ack**. The answer to a query, or to a command sent
  by ``execute()``, is sent to its requester first.
* failure: **retry** after the policy's backoff (that handler only); after the last
  attempt, **dead-letter** with the error type, message, traceback excerpt and attempts,
  and report it to the ``error_handler``. A failing query is answered with the error and
  not retried: its caller is waiting. A command's requester gets the error only with the
  dead letter, after the last attempt (a retry that succeeds answers with the result).
* a payload that does not decode: dead-letter at once, with the reason.
* a redelivery the inbox of a unit of work recorded as applied: acked without running
  the handler, and never answered (the first delivery answered its requester).
* a command whose answer cannot be sent (it does not encode, or the broker refuses it):
  acked all the same (it did its work), its requester told so, the error reported.
* an unexpected error while settling (a retry policy, codec or reply that raises): a
  failed attempt, retried and then dead-lettered with that error; a settle call of the
  transport that raised is never followed by another (the delivery comes back).
* a query whose caller has given up: acked unanswered, with a warning (its age is read
  on one clock from a sender on this host, else against the sender's own clock, so that
  clock skew between hosts up to ``SKEW`` does not count; see docs/remote.md).

A receive that fails is retried with a growing backoff, logged once per outage; one that
retrying cannot fix (``ImproperlyConfigured``, ``TransportRefused``) stops the worker,
and the dispatcher's ``run()`` raises it.

At most ``concurrency`` handlers run at once; one awaiting a command or query of its
own service lends its slot meanwhile (``_Slot``). On stop it fetches nothing more, lets the
handlers in flight finish (within the shutdown timeout) and settles them; what it could
not finish stays unacked, and the worker gives it back (``Transport.leave``): another
instance gets it at once, with its partition, whether or not the transport is closed
afterwards (a transport passed in, shared, lives on). What a crashed worker held waits
for the broker's ``claim_after`` instead. That is at-least-once delivery: a handler can
see a message twice (a crash after the handler's work but before its ack), so make
handlers idempotent or deduplicate by ``Envelope.id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from .engine import Followups, followups, in_worker, outside_workers, start_task
from .envelope import Envelope, current_envelope
from .errors import ImproperlyConfigured, SerializationError, TransportError, TransportRefused
from .logs import message_fields
from .messages import result_unread
from .remote import SENDER, Remote
from .retry import Retry
from .routes import AlreadyHandled, Subscription
from .telemetry import Outcome, Processing, Settlement, Telemetry, system_of
from .transports import (
    ANNOUNCE_TTL,
    Delivery,
    Failure,
    Instance,
    Link,
    Registry,
    check_requester,
    redact,
)

__all__ = ["StopDeadline", "Subscription", "Worker", "WorkerHealth"]

logger = logging.getLogger(__name__)

Report = Callable[[BaseException, Any, Any], Any]
RECEIVE_WAIT = 1.0  # seconds one receive may wait: also how long a stop may take to begin
ANNOUNCE_TIMEOUT = 5.0  # seconds an announcement in the registry may take
WITHDRAW_TIMEOUT = 2.0  # seconds a stopping worker's withdrawal may take (from its stop)
RECEIVE_BACKOFF, RECEIVE_BACKOFF_MAX = 0.1, 5.0  # seconds between receives that failed
RELEARN = 60.0  # seconds a sender's clock offset is trusted before it is learnt again
SENDERS = 1024  # sender clocks remembered at most
SKEW = 300.0  # seconds two hosts' clocks may disagree (Kerberos allows as much)
BUG_FAILURES, BUG_SPAN = 10, 30.0  # receives failing by a bug in a row, and for how long
STOP_GRACE = 1.0  # seconds a stop's deadline is followed by for each of its two clean-ups


@dataclass(frozen=True, slots=True)
class StopDeadline:
    """The one deadline of a stop, in event-loop time (None: no limit).

    Handlers and background work may finish until ``drain``; what is cancelled then gets
    until ``unwind`` to end (a receive blocked in a driver, a handler that ignores its
    cancellation are left behind then); giving back what the consumers hold and closing
    the transport end by ``close``. So ``stop(timeout)`` returns within
    ``timeout + 2 * STOP_GRACE`` seconds whatever hangs.
    """

    drain: float | None
    unwind: float | None
    close: float | None

    @classmethod
    def after(cls, timeout: float | None) -> StopDeadline:
        if timeout is None:
            return cls(None, None, None)
        drain = asyncio.get_running_loop().time() + timeout
        return cls(drain, drain + STOP_GRACE, drain + 2 * STOP_GRACE)


def seconds_until(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (event-loop time), never negative; None: no limit."""
    if deadline is None:
        return None
    return max(deadline - asyncio.get_running_loop().time(), 0.0)


async def bounded(work: Awaitable[Any], deadline: float | None) -> bool:
    """Await ``work`` until ``deadline``; past it, cancel it and leave it behind (it may
    ignore the cancellation). True if it ended in time. Its errors are raised."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds_until(deadline))
    if done:
        task.result()
        return True
    task.cancel()
    # Nobody awaits it any more: whatever it ends with is not "never retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return False


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """What a worker is doing, for a health probe (``Dispatcher.health()``)."""

    consuming: bool
    """Started and not stopping: its receive loops run."""
    down_for: float
    """Seconds the transport has been down: its receives failing, or its connection
    lost (``iambus.transports.Link``); 0.0 while it is up."""
    failed_receives: int
    """How many receives failed since the outage began; 0 while they work."""


class Worker:
    """Consumes ``subscriptions`` from ``remote``'s transport; see the module docstring."""

    def __init__(
        self,
        remote: Remote,
        subscriptions: list[Subscription],
        *,
        concurrency: int,
        batch: int,
        report: Report,
        fatal: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self.remote = remote
        self.subscriptions = subscriptions
        self.concurrency = concurrency
        self.batch = batch
        self._report = report
        self._fatal = fatal  # called once receiving failed in a way retrying cannot fix
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self._free = concurrency
        self._room = asyncio.Event()
        self._running = asyncio.Semaphore(concurrency)
        self._loops: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._closed = False  # stopping, and no longer waiting for the receive loops
        self._busy: set[Subscription] = set()
        self._presence: _Presence | None = None
        self._ages = _Ages(socket.gethostname())
        self._down: dict[Subscription, float] = {}  # failing to receive: its next backoff
        self._outage = (0.0, 0)  # since when (monotonic), failed receives
        self._bugs: dict[Subscription, tuple[float, int]] = {}  # failing not the broker's way
        self._system = ""  # the transport's messaging.system, for the telemetry (at start)

    async def start(self) -> None:
        # A transport may size itself by the worker (RabbitMQ: its consumers' prefetch).
        self.remote.transport.tune(concurrency=self.concurrency)
        self._system = system_of(self.remote.transport.url)  # for the telemetry
        await self.remote.open()
        for sub in self.subscriptions:
            await self.remote.transport.declare(sub.address, sub.group, from_start=sub.from_start)
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._consume(sub), name=f"iambus-consume-{sub.group}")
            for sub in self.subscriptions
        ]
        if isinstance(self.remote.transport, Registry):
            self._presence = _Presence(self.remote.transport, self.instance())
            await self._presence.start()
        lines = "\n".join(f"  {sub.describe()}" for sub in self.subscriptions)
        logger.info(
            "iambus worker %s (service %s) on %s, %d at once:\n%s",
            self.consumer,
            self.remote.service,
            redact(self.remote.transport.url),  # a transport of the user's may not redact
            self.concurrency,
            lines,
        )

    async def stop(self, deadline: StopDeadline) -> int:
        """Fetch nothing more; let what runs finish until ``deadline.drain``, then cancel
        it; give back what this consumer holds. Returns how many handlers did not finish."""
        # Receive loops are cancelled, and also stop by themselves between two receives
        # (each returns within RECEIVE_WAIT): cancelling a read blocked in a driver is not
        # reliable (redis-py can swallow it), so the flag bounds the wait either way.
        self._stopping = True
        self._room.set()
        if self._presence is not None:
            presence, self._presence = self._presence, None
            withdrawn = asyncio.get_running_loop().time() + WITHDRAW_TIMEOUT
            await presence.stop(
                withdrawn if deadline.close is None else min(withdrawn, deadline.close)
            )
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        stuck: set[asyncio.Task[None]] = set()
        if loops:
            # First the loops: a receive ending now still starts its handlers.
            by = asyncio.get_running_loop().time() + RECEIVE_WAIT + 2
            _, stuck = await asyncio.wait(
                loops, timeout=seconds_until(by if deadline.drain is None else deadline.drain)
            )
        # From now on a receive that ends late starts nothing: what it got is not run
        # after the stop, and every handler that did start is in _inflight, below.
        self._closed = True
        left = 0
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=seconds_until(deadline.drain))
            left = len(self._inflight)
        if left:
            logger.warning(
                "iambus worker %s: %d handler(s) did not finish in time; their messages "
                "stay unacked and are given back",
                self.consumer,
                left,
            )
            for task in self._inflight:
                task.cancel()
        # Without a deadline, a loop gets RECEIVE_WAIT + 2 s (above) and is left behind.
        unwinding = (stuck if deadline.unwind is not None else set()) | self._inflight
        if stuck and deadline.unwind is None:
            logger.warning("iambus worker %s: a receive loop did not stop", self.consumer)
        if unwinding:
            _, unwinding = await asyncio.wait(unwinding, timeout=seconds_until(deadline.unwind))
            for task in self._inflight:  # started meanwhile by a receive that ended late
                task.cancel()
        if unwinding:
            logger.warning(
                "iambus worker %s: %d cancelled handler(s) or receive loop(s) did not end; "
                "left behind",
                self.consumer,
                len(unwinding),
            )
        # What this consumer still holds (the cancelled handlers' messages, the partitions
        # they block, its consumers on the broker) goes to the others now, whether or not
        # the transport is closed next: a transport passed in lives on.
        try:
            if not await bounded(self.remote.transport.leave(self.consumer), deadline.close):
                logger.warning(
                    "iambus worker %s: giving back what it holds took too long; the rest "
                    "is redelivered after claim_after",
                    self.consumer,
                )
        except Exception:
            logger.exception(
                "iambus worker %s: could not give back what it holds; it is redelivered "
                "after claim_after",
                self.consumer,
            )
        return left

    def health(self) -> WorkerHealth:
        """Whether it consumes, and for how long the transport has been down (read-only):
        its receives failing, or its connection lost while the driver reconnects (a
        ``Link``: receives then wait instead of failing)."""
        consuming = bool(self._loops) and not self._stopping
        now = time.monotonic()
        began, failures = self._outage if self._down else (now, 0)
        transport = self.remote.transport
        if isinstance(transport, Link) and (lost := transport.down_since) is not None:
            began = min(began, lost)
        return WorkerHealth(consuming=consuming, down_for=now - began, failed_receives=failures)

    def _fields(
        self, sub: Subscription, delivery: Delivery, outcome: str, **more: Any
    ) -> dict[str, Any]:
        """The ``extra=`` of a log line about ``delivery`` (see ``iambus.logs``)."""
        return message_fields(
            delivery.envelope,
            outcome=outcome,
            kind=sub.kind,
            service=self.remote.service,
            handler=more.pop("handler", sub.route.name),
            attempt=delivery.attempt,
            attempts=sub.retry.attempts,
            **more,
        )

    def instance(self) -> Instance:
        """This worker as it announces itself in the transport's registry."""
        return Instance(
            service=self.remote.service or "",
            id=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self.started,
            consumes=tuple(dict.fromkeys((sub.address, sub.group) for sub in self.subscriptions)),
        )

    def abort(self) -> int:
        """Stop at once: cancel the handlers running; return how many were (left unacked)."""
        self._stopping = self._closed = True
        self._room.set()
        for task in self._loops:
            task.cancel()
        running = [task for task in self._inflight if not task.done()]
        for task in running:
            task.cancel()
        return len(running)

    async def _consume(self, sub: Subscription) -> None:
        transport = self.remote.transport
        # Handlers run marked as "in a worker": while the dispatcher drains they may
        # still send (what they send is part of the work), and a stop() from one of them
        # is deferred instead of waiting for itself. They are no engine jobs: their
        # background sends wait for room under max_pending like any producer's.
        context = outside_workers()
        context.run(in_worker.set, True)
        while not self._stopping:
            # Fetch only while there is room. No slot is held while receiving (an idle
            # subscription must not starve the others); the semaphore in _process bounds
            # what runs, and a fetch overshoots by at most one batch per subscription.
            while self._free <= 0 and not self._stopping:
                self._room.clear()
                await self._room.wait()
            if self._stopping:
                return
            try:
                deliveries = await transport.receive(
                    sub.address,
                    sub.group,
                    consumer=self.consumer,
                    limit=self._share(sub),
                    wait=RECEIVE_WAIT,
                )
            except asyncio.CancelledError:
                raise
            except (ImproperlyConfigured, TransportRefused) as exc:
                self._give_up(sub, exc)
                return
            except Exception as exc:
                if self._a_bug_for_good(sub, exc):
                    return
                await self._receive_failed(sub, exc)
                continue
            if self._closed:
                if deliveries:
                    logger.warning(
                        "iambus worker %s: a receive of %s for %s ended after the stop; its "
                        "%d message(s) are not handled here (redelivered)",
                        self.consumer,
                        sub.address,
                        sub.group,
                        len(deliveries),
                    )
                return
            if self._down:
                self._receive_works(sub)
            self._free -= len(deliveries)
            if deliveries:
                self._busy.add(sub)
            else:
                self._busy.discard(sub)
            for delivery in deliveries:
                # Eager where Python can (3.12+): a delivery whose handler never waits is
                # handled and settled right here, and its task is done already (no turn of
                # the event loop to start it, none to tell that it ended: 7 % of the
                # instructions of a Kafka message end to end, counted with callgrind).
                task = start_task(self._process(sub, delivery), context=context.copy())
                if not task.done():
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            if deliveries:
                # Let the handlers just started run first (3.11: up to their first wait;
                # 3.12+ ran them so far already, and now their next steps): the next
                # receive's own work would otherwise delay a query's answer.
                await asyncio.sleep(0)

    def _give_up(
        self, sub: Subscription, exc: BaseException, why: str = "retrying will not help"
    ) -> None:
        # Retrying cannot fix a wrong set-up or refused credentials: stop the worker, and
        # let the dispatcher raise it from run() / wait_for_shutdown().
        logger.error(
            "iambus worker %s: receiving %s for %s failed, and %s; stopping: %s",
            self.consumer,
            sub.address,
            sub.group,
            why,
            exc,
        )
        self._stopping = True
        self._room.set()
        self._fatal(exc)

    def _a_bug_for_good(self, sub: Subscription, exc: Exception) -> bool:
        """Whether receiving failed with an error that is not the broker's (a bug in the
        transport) BUG_FAILURES times in a row over BUG_SPAN seconds: the worker stops
        then, instead of retrying it for ever."""
        if isinstance(exc, TransportError):
            self._bugs.pop(sub, None)
            return False
        since, failures = self._bugs.get(sub, (time.monotonic(), 0))
        self._bugs[sub] = (since, failures + 1)
        if failures + 1 < BUG_FAILURES or time.monotonic() - since < BUG_SPAN:
            return False
        self._give_up(
            sub,
            exc,
            f"{failures + 1} times in a row over {time.monotonic() - since:.0f}s with an "
            f"error that is not the broker's ({type(exc).__name__}: a bug in the transport?)",
        )
        return True

    async def _receive_failed(self, sub: Subscription, exc: Exception) -> None:
        # A broker down or a connection lost: retried with a growing backoff. An outage
        # is logged once as it begins and once as it ends, not at every retry.
        delay = self._down.get(sub)
        if delay is None:
            delay = RECEIVE_BACKOFF
            if not self._down:
                self._outage = (time.monotonic(), 0)
                logger.warning(
                    "iambus worker %s: receiving %s failed; retrying every %.1f-%.0fs until "
                    "it works (logged again then): %s: %s",
                    self.consumer,
                    sub.address,
                    RECEIVE_BACKOFF,
                    RECEIVE_BACKOFF_MAX,
                    type(exc).__name__,
                    exc,
                    # An error that is not the broker's is a bug: show where.
                    exc_info=None if isinstance(exc, TransportError) else exc,
                )
        began, failures = self._outage
        self._outage = (began, failures + 1)
        self._down[sub] = min(delay * 2, RECEIVE_BACKOFF_MAX)
        logger.debug("iambus: receiving %s failed again: %r", sub.address, exc)
        await asyncio.sleep(delay)

    def _receive_works(self, sub: Subscription) -> None:
        self._bugs.pop(sub, None)
        if self._down.pop(sub, None) is not None and not self._down:
            began, failures = self._outage
            logger.info(
                "iambus worker %s: receiving works again, after %.1fs and %d failed receive(s)",
                self.consumer,
                time.monotonic() - began,
                failures,
            )

    def _share(self, sub: Subscription) -> int:
        # The free slots are shared among the subscriptions that are busy (their last
        # fetch returned something); an idle one fetches one to find out. All fetching
        # at once, a worker never holds much more than `concurrency` deliveries: one
        # waiting too long for a slot would look abandoned to other instances.
        if sub not in self._busy:
            return 1
        share = max(1, self.concurrency // len(self._busy))
        return max(1, min(self.batch, self._free, share))

    def _release(self, slots: int) -> None:
        if slots:
            self._free += slots
            self._room.set()

    async def _process(self, sub: Subscription, delivery: Delivery) -> None:
        envelope = delivery.envelope
        settling = _Settling(delivery)
        slot = _Slot(self)  # counted in _free since the fetch; the semaphore is taken here
        telemetry = self.remote.telemetry
        try:
            await slot.take()
            if telemetry is None:
                await self._handle(sub, settling, envelope, slot)
            else:
                settling.telemetry = telemetry
                processing = Processing(
                    self._system,
                    sub.kind,
                    sub.address,
                    sub.group,
                    sub.route.name,
                    envelope,
                    delivery.attempt,
                )
                settling.processing = processing
                with telemetry.process(processing):
                    await self._handle(sub, settling, envelope, slot)
        except asyncio.CancelledError:
            raise  # stopping: left unacked, redelivered after claim_after
        except TransportError:
            # The broker failed while settling: the delivery stays pending (or was given
            # back) and is redelivered, so nothing is lost.
            fields = self._fields(sub, delivery, "unsettled")
            logger.exception(
                "iambus: could not settle %s %s (attempt %d); it will be redelivered%s",
                sub.kind,
                envelope.name,
                delivery.attempt,
                _about(fields),
                extra=fields,
            )
        except Exception as exc:
            await self._settle_failed(sub, settling, exc)
        finally:
            slot.end()

    async def _settle_failed(self, sub: Subscription, settling: _Settling, exc: Exception) -> None:
        """An unexpected error while settling: a bug in a retry policy, a codec, a reply,
        or a transport. It must not turn into redelivery for ever."""
        delivery, envelope = settling.delivery, settling.delivery.envelope
        if settling.done:  # settled already; what failed came after
            fields = self._fields(sub, delivery, "failed", error=exc)
            logger.error(
                "iambus: after settling %s %s%s",
                sub.kind,
                envelope.name,
                _about(fields),
                exc_info=exc,
                extra=fields,
            )
            return
        if settling.called:
            # The transport's settle call raised something that is not a TransportError.
            # What it did is unknown, and settling one delivery twice is not safe on every
            # broker (RabbitMQ closes the channel on a tag settled twice): leave it. The
            # transport gives it back, or the broker redelivers it after claim_after, with
            # one more attempt; the last attempt dead-letters it.
            fields = self._fields(sub, delivery, "unsettled", error=exc)
            logger.error(
                "iambus: settling %s %s (attempt %d of %d) failed in the transport; it will "
                "be redelivered%s",
                sub.kind,
                envelope.name,
                delivery.attempt,
                sub.retry.attempts,
                _about(fields),
                exc_info=exc,
                extra=fields,
            )
            return
        # Nothing was settled yet: this attempt failed, like a handler that raised.
        # Retried while attempts are left (a query is not: its caller is waiting), then
        # dead-lettered with this error as the reason.
        retry = sub.kind != "query" and delivery.attempt < sub.retry.attempts
        fields = self._fields(sub, delivery, "retry" if retry else "dead_letter", error=exc)
        logger.error(
            "iambus: settling %s %s (attempt %d of %d) failed; %s%s",
            sub.kind,
            envelope.name,
            delivery.attempt,
            sub.retry.attempts,
            "retrying it" if retry else "dead-lettering it",
            _about(fields),
            exc_info=exc,
            extra=fields,
        )
        try:  # (through ``settling``: the telemetry sees this settlement too)
            if retry:
                await settling.retry(_safe_delay(sub.retry, delivery.attempt))
            else:
                failure = _failure(exc, delivery.attempt, sub.route.name)
                reason = f"raised while settling: {failure.message}"
                await settling.dead_letter(dataclasses.replace(failure, message=reason))
        except Exception:
            logger.exception(
                "iambus: could not settle %s %s either; it will be redelivered",
                sub.kind,
                envelope.name,
            )

    async def _handle(
        self, sub: Subscription, delivery: _Settling, envelope: Envelope, background: Followups
    ) -> None:
        if sub.kind == "query" and self._expired(sub, delivery):
            await delivery.ack()  # the requester has given up: nobody would read the answer
            return
        try:
            message = self.remote.decode(envelope, sub.message)
        except SerializationError as exc:
            delivery.failed(exc)
            if envelope.reply_to:
                # The requester waits: tell it now rather than let it time out.
                await self._reply(envelope.reply_to, self.remote.failure(envelope, exc))
            await delivery.dead_letter(_failure(exc, delivery.attempt, None))
            fields = self._fields(sub, delivery, "undecodable", handler=None, error=exc)
            logger.error(
                "iambus: %s %s (id %s) does not decode; dead-lettered: %s%s",
                sub.kind,
                envelope.name,
                envelope.id,
                exc,
                _about(fields),
                extra=fields,
            )
            return
        token = current_envelope.set(envelope)
        counted = followups.set(background)  # engine jobs the handler puts (and they put)
        try:
            result = await sub.route.run(message, envelope.key, envelope, sub.group)
        except asyncio.CancelledError as exc:
            if _stopping():
                raise  # the worker stops: left unacked, redelivered after claim_after
            # The handler's own code raised it (a task of its own cancelled, say): a
            # failure like any other, or the delivery would hang until claim_after.
            await self._failed(sub, delivery, message, exc)
            return
        except Exception as exc:
            await self._failed(sub, delivery, message, exc)
            return
        finally:
            followups.reset(counted)
            current_envelope.reset(token)
        if isinstance(result, AlreadyHandled):
            # A redelivery the inbox recorded as applied: nothing ran. A requester still
            # waiting (the first run's answer was lost: its worker died after the commit,
            # or a middleware failed) gets the answer the first run gave or would give,
            # so either may come first: a Command[None]'s "done", or the result the first
            # run kept in its record (returned through the middleware again). Without one
            # kept (a record of an older version, a result that did not encode) it is not
            # answered: an error answer could overtake the first run's on its way.
            if envelope.reply_to and (result.answered or result_unread(sub.message)):
                try:
                    answer = self._answer(sub, envelope, result.result)
                except SerializationError as exc:
                    logger.warning(
                        "iambus: could not answer the requester of %s (id %s), applied already: %s",
                        envelope.name,
                        envelope.id,
                        exc,
                    )
                else:
                    await self._tell(envelope, answer)
            await delivery.ack()
            return
        unanswered: Exception | None = None
        if envelope.reply_to:  # a query, or a command sent by execute(): the answer first
            try:
                await self._reply(envelope.reply_to, self._answer(sub, envelope, result))
            except (SerializationError, TransportError) as exc:
                # The result does not encode, or the broker refused the answer (over
                # NATS's max_payload, say). A query fails (answered with the error). A
                # command did its work: running it again would not make its answer
                # travel, and its side effects would repeat; it is acked below, and its
                # requester and the error_handler hear why there is no answer.
                if sub.kind == "query":
                    # Answered with the error and acked: its background work first.
                    if await self._ran(background, sub, envelope):
                        await self._failed(sub, delivery, message, exc)
                    return
                unanswered = exc
        # (Most handlers queue no background work: no coroutine to find that out.)
        if not background.idle and not await self._ran(background, sub, envelope):
            return
        if unanswered is not None:
            await self._unanswered(sub, delivery, message, unanswered)
            return
        await delivery.ack()

    @staticmethod
    async def _ran(background: Followups, sub: Subscription, envelope: Envelope) -> bool:
        """Whether the background work the handler queued has run (it may be acked)."""
        if await background.wait():
            return True
        # Work the handler queued in memory was dropped unrun (the dispatcher stopped
        # first): acking would lose it with the process, so the delivery stays unacked.
        logger.warning(
            "iambus: %s %s (id %s): background work of its handler was cancelled at "
            "stop; left unacked, it will be redelivered",
            sub.kind,
            envelope.name,
            envelope.id,
        )
        return False

    async def _reply(self, to: str, answer: Envelope) -> None:
        telemetry = self.remote.telemetry
        requester = check_requester(self.remote.transport)
        if telemetry is None:
            await requester.reply(to, answer)
        else:
            with telemetry.send(self.remote.sending("reply", "reply", to, answer)) as answer:
                await requester.reply(to, answer)

    async def _tell(self, request: Envelope, answer: Envelope) -> None:
        """Send ``answer`` to the requester of ``request`` if the broker takes it: a
        requester that cannot be told times out, which must not keep a message that is
        settled anyway (acked, dead-lettered) coming back."""
        assert request.reply_to is not None
        try:
            await self._reply(request.reply_to, answer)
        except TransportError as refused:
            logger.warning(
                "iambus: could not answer the requester of %s (id %s): %s",
                request.name,
                request.id,
                refused,
            )

    def _answer(self, sub: Subscription, request: Envelope, result: Any) -> Envelope:
        if result_unread(sub.message):
            # Command[None]: the requester returns None without reading the answer, so
            # whatever the handler returned is not encoded (it may not encode at all).
            return self.remote.answer(request, None, empty=True)
        return self.remote.answer(request, result)

    async def _unanswered(
        self, sub: Subscription, delivery: _Settling, message: Any, exc: Exception
    ) -> None:
        """A command carried out whose answer could not be sent: acked (never run again
        for it), its requester told why in a small answer, the error_handler too."""
        envelope = delivery.envelope
        why = f"{envelope.name} was carried out, but its answer could not be sent: {exc}"
        fields = self._fields(sub, delivery, "failed", error=exc)
        logger.error("iambus: %s (id %s); acked%s", why, envelope.id, _about(fields), extra=fields)
        await self._tell(envelope, self.remote.failure(envelope, type(exc)(why)))
        await delivery.ack()
        await self._report(exc, message, sub.route.context_for(envelope.key))

    def _expired(self, sub: Subscription, delivery: Delivery) -> bool:
        envelope = delivery.envelope
        deadline = envelope.headers.get("deadline")
        if deadline is None:
            return False
        try:
            # Both on the sender's clock: the caller's budget, whatever the skew.
            budget = float(deadline) - envelope.created_at
        except ValueError:
            return False
        age = self._ages.age(envelope, time.time())
        if not age > budget:
            return False
        service, _, host = envelope.headers.get(SENDER, "").rpartition("@")
        fields = self._fields(sub, delivery, "expired")
        logger.warning(
            "iambus: query %s (id %s) from %s expired before it was handled: it waited "
            "%.2fs, its caller %.2fs; acked without an answer%s",
            envelope.name,
            envelope.id,
            f"service {service!r}"
            if service
            else f"host {host!r} (no service name)"
            if host
            else "a sender that does not say",
            age,
            budget,
            _about(fields),
            extra=fields,
        )
        return True

    async def _failed(
        self, sub: Subscription, delivery: _Settling, message: Any, exc: BaseException
    ) -> None:
        delivery.failed(exc)
        envelope = delivery.envelope
        context = sub.route.context_for(envelope.key)
        if sub.kind == "query":
            if envelope.reply_to:
                await self._reply(envelope.reply_to, self.remote.failure(envelope, exc))
            await delivery.ack()
            fields = self._fields(sub, delivery, "failed", error=exc)
            logger.warning(
                "iambus: %s failed on query %s; answered with the error, not retried: %s: %s%s",
                sub.route.name,
                envelope.name,
                type(exc).__name__,
                fields["error"],
                _about(fields),
                extra=fields,
            )
            await self._report(exc, message, context)
            return
        if isinstance(exc, TransportError):
            # Emitting the handler's events failed: the handler's work is not complete.
            logger.warning("iambus: %s: %s", sub.route.name, exc)
        if delivery.attempt < sub.retry.attempts:
            delay = sub.retry.delay(delivery.attempt)
            if not (isinstance(delay, int | float) and delay >= 0):
                raise ImproperlyConfigured(
                    f"{type(sub.retry).__qualname__}.delay({delivery.attempt}) returned "
                    f"{delay!r}; it must return seconds (a number >= 0)"
                )
            fields = self._fields(sub, delivery, "retry", retry_delay=float(delay), error=exc)
            logger.warning(
                "iambus: %s failed on %s (attempt %d of %d), retrying in %.2fs: %s: %s%s",
                sub.route.name,
                envelope.name,
                delivery.attempt,
                sub.retry.attempts,
                delay,
                type(exc).__name__,
                fields["error"],
                _about(fields),
                extra=fields,
            )
            await delivery.retry(delay)
            return
        if envelope.reply_to:
            # A command's requester (execute()) hears of its failure once it is final:
            # a retry that succeeds answers with the result instead. An answer the
            # broker refuses does not stop the dead letter (it would come back for ever).
            await self._tell(
                envelope, self.remote.failure(envelope, exc, attempts=delivery.attempt)
            )
        await delivery.dead_letter(_failure(exc, delivery.attempt, sub.route.name))
        fields = self._fields(sub, delivery, "dead_letter", error=exc)
        logger.error(
            "iambus: %s failed on %s %d times; dead-lettered (id %s): %s: %s%s",
            sub.route.name,
            envelope.name,
            delivery.attempt,
            envelope.id,
            type(exc).__name__,
            fields["error"],
            _about(fields),
            extra=fields,
        )
        await self._report(exc, message, context)


class _Presence:
    """Announces a worker in its transport's registry, again every third of
    ``ANNOUNCE_TTL``, and withdraws it on stop. The registry only informs (``iambus
    status``, a sender's errors): a failure to announce is logged once per outage and
    never stops the worker."""

    def __init__(self, registry: Registry, instance: Instance) -> None:
        self.registry = registry
        self.instance = instance
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        await self._announce()
        self._task = asyncio.get_running_loop().create_task(
            self._refresh(), name=f"iambus-announce-{self.instance.id}"
        )

    async def stop(self, by: float) -> None:
        """Stop announcing and withdraw, by ``by`` (event-loop time) whatever hangs."""
        if self._task is not None:
            self._task.cancel()
            # An announcement that ignores its cancellation is left behind at ``by``.
            await asyncio.wait({self._task}, timeout=seconds_until(by))
        try:
            async with asyncio.timeout_at(by):
                await self.registry.withdraw(self.instance)
        except Exception as exc:
            logger.warning(
                "iambus worker %s: could not withdraw it from the registry (it counts as "
                "live for up to %ss more): %s",
                self.instance.id,
                ANNOUNCE_TTL,
                exc,
            )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_TTL / 3)
            await self._announce()

    async def _announce(self) -> None:
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                await self.registry.announce(self.instance)
        except Exception as exc:
            if not self._failing:
                logger.warning(
                    "iambus worker %s: could not announce it in the registry (senders and "
                    "'iambus status' may not see it; retrying every %ss): %s",
                    self.instance.id,
                    ANNOUNCE_TTL / 3,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            logger.info("iambus worker %s: announced in the registry again", self.instance.id)
        self._failing = False


def _stopping() -> bool:
    """Whether the running task is being cancelled (a stop), not hit by a handler's own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Ages:
    """How long queries waited, told across hosts whose clocks disagree.

    A query carries its send time (``created_at``) on its sender's clock, and its sender
    (``"<service>@<host>"``). From a sender on this host (one clock) its age is read
    directly. From another host it is read against the least (arrival - send time) lately
    seen from the same sender clock: that is the skew plus the quickest passage, so the
    age found is never more than the true one, and a skewed clock never makes a fresh
    query look old. A sender's least is learnt again every ``RELEARN`` seconds, so a clock
    that was set back is followed. That least says nothing of a backlog read oldest
    first (each query is the quickest yet), so an age is also never less than the one
    this host's clock reads, less ``SKEW`` seconds of skew allowed between hosts.
    """

    def __init__(self, host: str) -> None:
        self._host = host
        self._least: dict[str, tuple[float, float]] = {}  # sender -> (least, since)

    def age(self, envelope: Envelope, now: float) -> float:
        offset = now - envelope.created_at
        stated = envelope.headers.get(SENDER)
        if stated and stated.rpartition("@")[2] == self._host and offset > -SKEW:
            # One clock (a query sent "in the future" says it is not one: read it below).
            return max(offset, 0.0)
        # The sender's "<service>@<host>", or its reply address from a sender that does
        # not say (one process): either way, one clock.
        sender = stated or envelope.reply_to or ""
        # Never less than its age on this host's clock less the skew allowed: a backlog
        # read oldest first makes each query the quickest seen, which says nothing.
        at_least = max(offset - SKEW, 0.0)
        known = self._least.get(sender)
        if known is not None and now - known[1] < RELEARN:
            if offset >= known[0]:
                return max(offset - known[0], at_least)
            self._least[sender] = (offset, known[1])
            return at_least
        if known is None and len(self._least) >= SENDERS:
            del self._least[next(iter(self._least))]  # the oldest
        self._least[sender] = (offset, now)
        return at_least


class _Slot(Followups):
    """The background work of one delivery, and the worker slot the delivery holds: a
    place in ``concurrency`` (the semaphore) and in what the worker fetches (``_free``).

    While the handler, or background work it queued, awaits an answer of its own service
    (``Remote.request``), the slot is lent: the request needs a slot of this same worker,
    and with every slot held by a delivery waiting so, none would be left to answer it.
    It is taken back (waiting for a free one) before the handler goes on.
    """

    __slots__ = ("_counted", "_ended", "_held", "_lent", "_taking", "_worker")

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker
        self._counted = True  # the fetch counted it in the worker's _free
        self._held = False  # holds a place in the worker's semaphore
        self._lent = 0  # how many of its awaits lend it now
        self._ended = False
        self._taking: asyncio.Future[None] | None = None  # a wait for a place under way

    async def take(self) -> None:
        if self._ended:
            return
        if not self._counted:
            self._worker._free -= 1
            self._counted = True
        if self._held:
            return
        running = self._worker._running
        if self._taking is None and not running.locked():
            await running.acquire()  # a place is free: taken at once, without a task
            self._got()
            return
        # One wait for a place per delivery, shared: two of its tasks taking the slot
        # back at once (both asked their own service) must not take two places.
        if self._taking is None:
            self._taking = asyncio.ensure_future(self._acquire())
        try:
            await asyncio.shield(self._taking)
        except asyncio.CancelledError:
            if self._ended and not _stopping():
                return  # the delivery ended (end() called the wait off): nothing to take
            raise

    async def _acquire(self) -> None:
        try:
            await self._worker._running.acquire()
        finally:
            self._taking = None
        self._got()

    def _got(self) -> None:
        """A place was acquired for this slot: keep it, unless it is no longer wanted."""
        if self._held or self._ended:  # the delivery ended meanwhile: not ours to keep
            self._worker._running.release()
            return
        self._held = True
        if self._lent:  # lent again while waiting for a place
            self._give()

    def end(self) -> None:
        if self._taking is not None:
            self._taking.cancel()  # a take still waiting for a place: no longer wanted
        self._give()
        self._ended = True

    @contextlib.asynccontextmanager
    async def lend(self) -> AsyncIterator[None]:
        self._lent += 1
        if self._lent == 1:
            self._give()
        try:
            yield
        finally:
            self._lent -= 1
            if not self._lent:
                await self.take()

    def _give(self) -> None:
        if self._held:
            self._held = False
            self._worker._running.release()
        if self._counted:
            self._counted = False
            self._worker._release(1)


def _safe_delay(policy: Retry, attempt: int) -> float:
    """The policy's delay, or its first backoff when computing the delay fails."""
    try:
        delay = policy.delay(attempt)
    except Exception:
        delay = None
    if isinstance(delay, int | float) and delay >= 0:
        return float(delay)
    backoff = policy.backoff
    return float(backoff) if isinstance(backoff, int | float) and backoff >= 0 else 1.0


class _Settling:
    """A delivery that remembers whether a settle call was made on it, and returned
    (and tells the telemetry, if any, how it was settled)."""

    __slots__ = ("called", "delivery", "done", "processing", "telemetry")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.called = self.done = False
        self.telemetry: Telemetry | None = None
        self.processing: Processing | None = None

    def failed(self, exc: BaseException) -> None:
        """The handler (or decoding) raised ``exc``: the telemetry records it."""
        if self.processing is not None:
            self.processing.error = exc

    def _settle(
        self, outcome: Outcome, delay: float | None = None
    ) -> AbstractContextManager[object]:
        assert self.telemetry is not None
        assert self.processing is not None
        return self.telemetry.settle(Settlement(self.processing, outcome, delay))

    @property
    def envelope(self) -> Envelope:
        return self.delivery.envelope

    @property
    def attempt(self) -> int:
        return self.delivery.attempt

    async def ack(self) -> None:
        self.called = True
        if self.telemetry is None:
            await self.delivery.ack()
        else:
            with self._settle("ack"):
                await self.delivery.ack()
        self.done = True

    async def retry(self, delay: float) -> None:
        self.called = True
        if self.telemetry is None:
            await self.delivery.retry(delay)
        else:
            with self._settle("retry", delay):
                await self.delivery.retry(delay)
        self.done = True

    async def dead_letter(self, failure: Failure) -> None:
        self.called = True
        if self.telemetry is None:
            await self.delivery.dead_letter(failure)
        else:
            with self._settle("dead_letter"):
                await self.delivery.dead_letter(failure)
        self.done = True


def _about(fields: dict[str, Any]) -> str:
    """The fields of a log line in its text too: `` [id=... correlation=... ...]``."""
    return (
        f" [id={fields['message_id']} correlation={fields['correlation_id']} "
        f"handler={fields['handler']} attempt={fields['attempt']}/{fields['attempts']} "
        f"service={fields['service']}]"
    )


def _failure(exc: BaseException, attempts: int, handler: str | None) -> Failure:
    kind = type(exc)
    frames = traceback.format_exception(exc)
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still gets its dead letter
        message = f"<{kind.__qualname__}: str() failed>"
    return Failure(
        error_type=f"{kind.__module__}.{kind.__qualname__}",
        message=message,
        traceback="".join(frames)[-4000:],  # an excerpt: the innermost frames
        attempts=attempts,
        handler=handler,
    )
