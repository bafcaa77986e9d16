"""The background engine: a bounded pool of workers with per-key ordering.

``dp.handle(message)`` (without ``wait_for_response``) and any send with a ``key`` go
through here. The rules:

* at most ``workers`` jobs run at once;
* jobs with the same key run one at a time, in the order they were put; a key with
  queued jobs never blocks another key (only the head of each key's lane is ever in the
  ready queue, so a free worker always finds other keys' work);
* at most ``max_pending`` jobs are queued or running; ``put`` waits for room
  (backpressure), first come first served — except when called from a job itself, which
  would deadlock a full pool waiting on its own workers; such a put is admitted over the
  limit. A handler run by the transport worker is no job: it waits for room like any
  producer;
* a job that raises never ends its worker;
* a job put while ``followups`` holds a ``Followups`` (the transport worker sets one per
  delivery) is counted there, and so is every job it puts in turn: the worker acks the
  delivery once they have all run;
* once closing, ``put`` refuses new jobs (``DispatcherStopped``), waiting producers are
  turned away too, and every job not run to its end is counted, its awaiting caller, if
  any, cancelled, and its ``Followups`` marked lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, TypeVar

from .envelope import Envelope, current_envelope
from .errors import DispatcherStopped
from .unit_of_work import current_unit

__all__ = ["Engine", "Followups"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_eager = getattr(asyncio, "eager_task_factory", None)


def start_task(
    coro: Coroutine[Any, Any, T], *, context: contextvars.Context | None = None
) -> asyncio.Task[T]:
    """A task running ``coro`` (in ``context``, if given), started eagerly where Python
    can (3.12+): its first step runs at once, so a coroutine that never waits finishes
    here, without being scheduled, and the task is done when this returns. A task factory
    set on the loop is used as it is (3.11: plain tasks)."""
    loop = asyncio.get_running_loop()
    if _eager is not None and loop.get_task_factory() is None:
        task: asyncio.Task[T] = _eager(loop, coro, context=context)
        return task
    return loop.create_task(coro, context=context)


JobFn = Callable[[Any, Any], Awaitable[Any]]
# Called with (exception, message, key) when an awaited job fails after its caller left.
Orphaned = Callable[[BaseException, Any, Any], Awaitable[None]]

# Two flags, two meanings:
# ``in_worker``: this code is part of the work ``dp.stop()`` drains — an engine job, or a
# handler the transport worker runs. It may still send while the dispatcher stops, and a
# ``stop()`` or ``join()`` from it would wait for itself.
_SMALL_DICT = sys.getsizeof(dict.fromkeys(range(8)))

in_worker: contextvars.ContextVar[bool] = contextvars.ContextVar("iambus_in_worker", default=False)
# ``in_job``: this code runs inside an engine job. Its puts are admitted over
# ``max_pending``: waiting for room only the engine's own workers can make could deadlock.
in_job: contextvars.ContextVar[bool] = contextvars.ContextVar("iambus_in_job", default=False)
# The key of the job the current worker runs (None outside keyed jobs).
current_key: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "iambus_current_key", default=None
)


class Followups:
    """The engine jobs one broker delivery's handler put, and the jobs those put in turn.

    The transport worker sets one in ``followups`` before it runs a delivery's handler
    and acks the delivery only once ``wait()`` says they all ran: work in an in-memory
    queue is not acked away from the broker, where it would be lost with the process.
    """

    __slots__ = ("_done", "_left", "_lost")

    def __init__(self) -> None:
        self._left = 0
        self._lost = False
        self._done: asyncio.Future[None] | None = None

    def add(self) -> None:
        self._left += 1

    def finish(self) -> None:
        self._left -= 1
        if not self._left:
            self._wake()

    def lose(self) -> None:
        """A job counted here will not run to its end: the engine closed first."""
        self._lost = True
        self._wake()

    @property
    def idle(self) -> bool:
        """Whether ``wait()`` would return True at once: no job left, none dropped."""
        return not self._left and not self._lost

    async def wait(self) -> bool:
        """Return once every job counted here has run: True; False once one was dropped."""
        while self._left and not self._lost:
            self._done = asyncio.get_running_loop().create_future()
            await self._done
        return not self._lost

    def _wake(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def lend(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered while work counted here awaits an answer of its own service: the
        transport worker lends the delivery's slot meanwhile (``worker._Slot``)."""
        return contextlib.nullcontext()


followups: contextvars.ContextVar[Followups | None] = contextvars.ContextVar(
    "iambus_followups", default=None
)

# (what to run, message, key, future for an awaiting caller or None, the envelope being
# handled when the job was put — its handler's sends keep that conversation's ids —, the
# delivery's Followups it counts towards or None)
Job = tuple[JobFn, Any, Any, "asyncio.Future[Any] | None", Envelope | None, Followups | None]


def outside_workers() -> contextvars.Context:
    """A copy of the current context as seen outside any worker (for tasks of our own)."""
    context = contextvars.copy_context()
    context.run(in_worker.set, False)
    context.run(in_job.set, False)
    context.run(current_key.set, None)
    context.run(current_envelope.set, None)
    context.run(followups.set, None)
    # A task of ours outlives the code that started it: a unit of work open there has
    # ended by the time the task sends (it would collect into a unit that never flushes).
    context.run(current_unit.set, None)
    return context


class Engine:
    def __init__(self, *, workers: int, max_pending: int, orphaned: Orphaned) -> None:
        self.loop = asyncio.get_running_loop()
        self._workers = workers
        self._max_pending = max_pending
        self._orphaned = orphaned
        self._ready: asyncio.Queue[Job] = asyncio.Queue()
        # Per key with a job queued or running: the jobs waiting behind it, or None while
        # there are none (most keys: a deque costs ~600 bytes, None nothing).
        self._lanes: dict[Hashable, deque[Job] | None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = 0
        # Producers waiting for room, first come first served. A waiter is admitted by
        # handing it a freed place (counted in _pending before it resumes), so a producer
        # arriving meanwhile cannot take it. One that gave up waiting stays in the deque,
        # cancelled, until a wake-up skips it (or a compaction, when they pile up): no
        # removal from the middle, so waking and leaving are O(1) however many wait.
        self._room: deque[asyncio.Future[None]] = deque()
        self._withdrawn = 0  # waiters cancelled since the last compaction
        self._idle: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Jobs queued or running (and places handed to producers about to put)."""
        return self._pending

    async def put(
        self, fn: JobFn, message: Any, key: Hashable | None, future: asyncio.Future[Any] | None
    ) -> None:
        if self._closing:
            raise _stopping()
        room = self._room
        while room and room[0].done():
            room.popleft()  # a waiter that gave up
        if (self._pending >= self._max_pending or room) and not in_job.get():
            await self._wait_for_room()  # returns with a place counted in _pending
        else:
            self._pending += 1
        if not self._tasks:
            self._start()
        tracker = followups.get()
        if tracker is not None:
            tracker.add()
        job = (fn, message, key, future, current_envelope.get(), tracker)
        if key is None:
            self._ready.put_nowait(job)
        elif key in (lanes := self._lanes):
            lane = lanes[key]
            if lane is None:
                lanes[key] = deque((job,))
            else:
                lane.append(job)
        else:
            lanes[key] = None
            self._ready.put_nowait(job)

    async def _wait_for_room(self) -> None:
        room = self.loop.create_future()
        self._room.append(room)
        try:
            await room
        except asyncio.CancelledError:
            if room.cancelled():
                # Gave up while waiting: left in the deque, skipped when reached. Many
                # gave up (a stuck engine, producers with timeouts): drop them in one
                # pass, whose cost the cancellations since the last pass pay for.
                self._withdrawn += 1
                if self._withdrawn > 64 and self._withdrawn * 2 > len(self._room):
                    self._room = deque(r for r in self._room if not r.done())
                    self._withdrawn = 0
            elif not self._closing:
                # Admitted, then cancelled before it could use its place: pass it on, or
                # the next producer would wait for a place that is already free.
                self._release()
            raise
        if self._closing:
            raise _stopping()

    async def join(self) -> None:
        """Return once no job is queued or running (including jobs put meanwhile)."""
        while self._pending:
            if self._idle is None or self._idle.done():
                self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    async def close(self, within: float | None = None) -> int:
        """Cancel the workers; return how many jobs were left unfinished.

        Waits ``within`` seconds at most (None: no limit) for the workers to end: a job
        that ignores its cancellation is left behind."""
        left = self._pending
        self._closing = True
        while self._room:  # producers waiting for room: they get DispatcherStopped
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
        self._withdrawn = 0
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=within)
            if stuck:
                logger.warning(
                    "iambus: %d background job(s) ignored their cancellation; left behind",
                    len(stuck),
                )
        self._tasks.clear()
        while not self._ready.empty():
            _drop(self._ready.get_nowait())
        for lane in self._lanes.values():
            for job in lane or ():
                _drop(job)
        self._lanes = {}
        self._pending = 0
        self._wake_idle()
        return left

    def _start(self) -> None:
        context = outside_workers()
        context.run(in_worker.set, True)
        context.run(in_job.set, True)
        self._tasks = [
            self.loop.create_task(self._work(), name=f"iambus-worker-{n}", context=context.copy())
            for n in range(self._workers)
        ]

    async def _work(self) -> None:
        ready = self._ready
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            try:
                job = await ready.get()
            except asyncio.CancelledError:
                self._lost_with_the_loop()
                raise
            fn, message, key, future, envelope, tracker = job
            token = current_key.set(key)
            conversation = current_envelope.set(envelope)
            counted = followups.set(tracker)  # what this job puts counts for its delivery
            try:
                if future is None:
                    await fn(message, key)
                elif not future.cancelled():
                    await self._answer(fn, message, key, future)
            except asyncio.CancelledError:
                if me.cancelling():
                    _drop(job)
                    self._lost_with_the_loop()
                    raise  # the engine is closing, or the event loop is ending
                # A handler raised CancelledError of its own: a failure of that job only.
                logger.error("iambus: a background job for %r was cancelled", message)
                _cancel(job)
            except Exception:
                # Job functions report their handlers' errors themselves; this is a
                # last line of defence so that a worker never dies.
                logger.exception("iambus: unexpected error in a background job for %r", message)
            finally:
                followups.reset(counted)
                current_envelope.reset(conversation)
                current_key.reset(token)
                self._finish(key)
                if tracker is not None:
                    tracker.finish()  # after _drop(), if dropped: lost stays lost
            if me.cancelling():
                # Cancelled while the job swallowed the cancellation: stop all the same.
                self._lost_with_the_loop()
                raise asyncio.CancelledError

    async def _answer(self, fn: JobFn, message: Any, key: Any, future: asyncio.Future[Any]) -> None:
        try:
            result = await fn(message, key)
        except Exception as exc:
            if future.done():
                await self._orphaned(exc, message, key)  # the caller left: still reported
            else:
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    def _finish(self, key: Hashable | None) -> None:
        if key is not None:
            lanes = self._lanes
            lane = lanes.get(key)
            if lane:
                self._ready.put_nowait(lane.popleft())
                if not lane:
                    lanes[key] = None
            else:
                lanes.pop(key, None)
                # A dict keeps its size once emptied: after a burst of many keys, let
                # the table go instead of holding it for good.
                if not lanes and sys.getsizeof(lanes) > _SMALL_DICT:
                    self._lanes = {}
        self._release()

    def _release(self) -> None:
        # One place is free: hand it to the first waiting producer, if the limit allows
        # (jobs' own puts may have taken the count over it), else let it go.
        if self._pending <= self._max_pending:
            room = self._room
            while room:
                waiter = room.popleft()
                if not waiter.done():  # else it gave up waiting: skip it
                    waiter.set_result(None)  # the place passes on: _pending unchanged
                    return
        self._pending -= 1
        if not self._pending:
            self._wake_idle()

    def _lost_with_the_loop(self) -> None:
        # Workers cancelled by someone else than close(): the event loop is shutting
        # down (asyncio.run() returning) with work still queued. Say so, once.
        if not self._closing and self._pending:
            self._closing = True
            logger.warning(
                "iambus: the event loop is ending with %d background message(s) queued or "
                "running; they are lost. Await dp.stop() (or use `async with dp`) before "
                "the loop ends to let them finish",
                self._pending,
            )

    def _wake_idle(self) -> None:
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)


def _stopping() -> DispatcherStopped:
    return DispatcherStopped(
        "the dispatcher is stopping and takes no new messages; send before dp.stop()"
    )


def _cancel(job: Job) -> None:
    future = job[3]
    if future is not None and not future.done():
        future.cancel()


def _drop(job: Job) -> None:
    # Not run to its end: its awaiting caller is cancelled, its delivery is not acked.
    _cancel(job)
    tracker = job[5]
    if tracker is not None:
        tracker.lose()
