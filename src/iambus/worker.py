"""The worker: runs a dispatcher's handlers on messages from its transport.

``async with dp:`` (or ``await dp.run()``, or ``iambus worker module:dp``) starts it when
the dispatcher has a transport and handlers for routed messages. It subscribes:

* each event handler to its event, as group ``"<service>.<handler>"`` (new events only);
* the service to each command and query it owns, as group ``"<service>"`` (backlog too).

For every delivery it decodes the message, runs the handler (with middleware and
cascades, exactly as in-process), and only then settles it:

* success: events the handler emitted have been handed to the transport; then **ack**.
  A query's answer is sent to its requester first.
* failure: **retry** after the policy's backoff (that handler only); after the last
  attempt, **dead-letter** with the error type, message, traceback excerpt and attempts,
  and report it to the ``error_handler``. A failing query is answered with the error and
  not retried: its caller is waiting.
* a payload that does not decode: dead-letter at once, with the reason.

At most ``concurrency`` handlers run at once. On stop it fetches nothing more, lets the
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
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import in_worker, outside_workers
from .envelope import Envelope, current_envelope
from .errors import SerializationError, TransportError
from .handlers import Kind
from .messages import MessageKey, describe
from .remote import Remote
from .retry import Retry
from .transports import Delivery, Failure

if TYPE_CHECKING:
    from .dispatching import Route

__all__ = ["StopDeadline", "Subscription", "Worker"]

logger = logging.getLogger(__name__)

Report = Callable[[BaseException, Any, Any], Any]
RECEIVE_WAIT = 1.0  # seconds one receive may wait: also how long a stop may take to begin
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
class Subscription:
    """One handler (event) or one service (command, query) consuming one address."""

    kind: Kind
    address: str
    group: str
    message: MessageKey
    route: Route
    retry: Retry
    from_start: bool

    def describe(self) -> str:
        return f"{self.kind} {describe(self.message)} -> {self.route.name} [{self.group}]"


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
    ) -> None:
        self.remote = remote
        self.subscriptions = subscriptions
        self.concurrency = concurrency
        self.batch = batch
        self._report = report
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._free = concurrency
        self._room = asyncio.Event()
        self._running = asyncio.Semaphore(concurrency)
        self._loops: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._busy: set[Subscription] = set()

    async def start(self) -> None:
        # A transport may size itself by the worker (RabbitMQ: its consumers' prefetch).
        tune = getattr(self.remote.transport, "tune", None)
        if tune is not None:
            tune(concurrency=self.concurrency)
        await self.remote.open()
        for sub in self.subscriptions:
            await self.remote.transport.declare(sub.address, sub.group, from_start=sub.from_start)
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._consume(sub), name=f"iambus-consume-{sub.group}")
            for sub in self.subscriptions
        ]
        lines = "\n".join(f"  {sub.describe()}" for sub in self.subscriptions)
        logger.info(
            "iambus worker %s (service %s) on %s, %d at once:\n%s",
            self.consumer,
            self.remote.service,
            self.remote.transport.url,
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

    async def _consume(self, sub: Subscription) -> None:
        transport = self.remote.transport
        loop = asyncio.get_running_loop()
        # Handlers run marked as "in a worker": while the dispatcher drains they may
        # still send (what they send is part of the work), and a stop() from one of them
        # is deferred instead of waiting for itself.
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
            except Exception:
                logger.exception("iambus: receiving %s failed; retrying in 1s", sub.address)
                await asyncio.sleep(1.0)
                continue
            self._free -= len(deliveries)
            if deliveries:
                self._busy.add(sub)
            else:
                self._busy.discard(sub)
            for delivery in deliveries:
                task = loop.create_task(self._process(sub, delivery), context=context.copy())
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if deliveries:
                # Let the handlers just started run first (up to their first wait): the
                # next receive's own work would otherwise delay a query's answer.
                await asyncio.sleep(0)

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
        try:
            async with self._running:
                await self._handle(sub, delivery, envelope)
        except asyncio.CancelledError:
            raise  # stopping: left unacked, redelivered after claim_after
        except Exception:
            # The transport failed while settling: the delivery stays pending and is
            # redelivered after claim_after, so nothing is lost.
            logger.exception(
                "iambus: could not settle %s %s (attempt %d); it will be redelivered",
                sub.kind,
                envelope.name,
                delivery.attempt,
            )
        finally:
            self._release(1)

    async def _handle(self, sub: Subscription, delivery: Delivery, envelope: Envelope) -> None:
        if sub.kind == "query" and _expired(envelope):
            await delivery.ack()  # the requester has given up: nobody would read the answer
            return
        try:
            message = self.remote.decode(envelope, sub.message)
        except SerializationError as exc:
            if sub.kind == "query" and envelope.reply_to:
                # The requester waits: tell it now rather than let it time out.
                await self.remote.transport.reply(
                    envelope.reply_to, self.remote.failure(envelope, exc)
                )
            await delivery.dead_letter(_failure(exc, delivery.attempt, None))
            logger.error(
                "iambus: %s %s (id %s) does not decode; dead-lettered: %s",
                sub.kind,
                envelope.name,
                envelope.id,
                exc,
            )
            return
        token = current_envelope.set(envelope)
        try:
            result = await sub.route.run(message, envelope.key)
        except Exception as exc:
            await self._failed(sub, delivery, message, exc)
            return
        finally:
            current_envelope.reset(token)
        if sub.kind == "query" and envelope.reply_to:
            try:
                answer = self.remote.answer(envelope, result)
            except SerializationError as exc:
                await self._failed(sub, delivery, message, exc)  # answered with the error
                return
            await self.remote.transport.reply(envelope.reply_to, answer)
        await delivery.ack()

    async def _failed(
        self, sub: Subscription, delivery: Delivery, message: Any, exc: Exception
    ) -> None:
        envelope = delivery.envelope
        context = sub.route.context_for(envelope.key)
        if sub.kind == "query":
            if envelope.reply_to:
                await self.remote.transport.reply(
                    envelope.reply_to, self.remote.failure(envelope, exc)
                )
            await delivery.ack()
            await self._report(exc, message, context)
            return
        if isinstance(exc, TransportError):
            # Emitting the handler's events failed: the handler's work is not complete.
            logger.warning("iambus: %s: %s", sub.route.name, exc)
        if delivery.attempt < sub.retry.attempts:
            delay = sub.retry.delay(delivery.attempt)
            logger.warning(
                "iambus: %s failed on %s (attempt %d of %d), retrying in %.2fs: %s: %s",
                sub.route.name,
                envelope.name,
                delivery.attempt,
                sub.retry.attempts,
                delay,
                type(exc).__name__,
                exc,
            )
            await delivery.retry(delay)
            return
        await delivery.dead_letter(_failure(exc, delivery.attempt, sub.route.name))
        logger.error(
            "iambus: %s failed on %s %d times; dead-lettered (id %s)",
            sub.route.name,
            envelope.name,
            delivery.attempt,
            envelope.id,
        )
        await self._report(exc, message, context)


def _expired(envelope: Envelope) -> bool:
    deadline = envelope.headers.get("deadline")
    try:
        return deadline is not None and float(deadline) < time.time()
    except ValueError:
        return False


def _failure(exc: BaseException, attempts: int, handler: str | None) -> Failure:
    kind = type(exc)
    frames = traceback.format_exception(exc)
    return Failure(
        error_type=f"{kind.__module__}.{kind.__qualname__}",
        message=str(exc),
        traceback="".join(frames)[-4000:],  # an excerpt: the innermost frames
        attempts=attempts,
        handler=handler,
    )
