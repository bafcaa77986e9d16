"""The background engine: a bounded pool of workers with per-key ordering.

``dp.handle(message)`` (without ``wait_for_response``) and any send with a ``key`` go
through here. The rules:

* at most ``workers`` jobs run at once;
* jobs with the same key run one at a time, in the order they were put; a key with
  queued jobs never blocks another key (only the head of each key's lane is ever in the
  ready queue, so a free worker always finds other keys' work);
* at most ``max_pending`` jobs are queued or running; ``put`` waits for room
  (backpressure) — except when called from a job itself, which would deadlock a full pool
  waiting on its own workers; such a put is admitted over the limit;
* a job that raises never ends its worker;
* once closing, ``put`` refuses new jobs (``DispatcherStopped``), waiting producers are
  turned away too, and every job not run to its end is counted and its awaiting caller,
  if any, cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from .envelope import Envelope, current_envelope
from .errors import DispatcherStopped

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

JobFn = Callable[[Any, Any], Awaitable[Any]]
# (what to run, message, key, future for an awaiting caller or None, the envelope being
# handled when the job was put: its handler's sends keep that conversation's ids)
Job = tuple[JobFn, Any, Any, "asyncio.Future[Any] | None", Envelope | None]
# Called with (exception, message, key) when an awaited job fails after its caller left.
Orphaned = Callable[[BaseException, Any, Any], Awaitable[None]]

in_worker: contextvars.ContextVar[bool] = contextvars.ContextVar("iambus_in_worker", default=False)
# The key of the job the current worker runs (None outside keyed jobs).
current_key: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "iambus_current_key", default=None
)


def outside_workers() -> contextvars.Context:
    """A copy of the current context as seen outside any worker (for tasks of our own)."""
    context = contextvars.copy_context()
    context.run(in_worker.set, False)
    context.run(current_key.set, None)
    context.run(current_envelope.set, None)
    return context


class Engine:
    def __init__(self, *, workers: int, max_pending: int, orphaned: Orphaned) -> None:
        self.loop = asyncio.get_running_loop()
        self._workers = workers
        self._max_pending = max_pending
        self._orphaned = orphaned
        self._ready: asyncio.Queue[Job] = asyncio.Queue()
        self._lanes: dict[Hashable, deque[Job]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = 0
        self._room: deque[asyncio.Future[None]] = deque()
        self._idle: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    async def put(self, job: Job, key: Hashable | None) -> None:
        if not in_worker.get():
            while self._pending >= self._max_pending and not self._closing:
                await self._wait_for_room()
        if self._closing:
            raise DispatcherStopped(
                "the dispatcher is stopping and takes no new messages; send before dp.stop()"
            )
        if not self._tasks:
            self._start()
        self._pending += 1
        if key is None:
            self._ready.put_nowait(job)
        elif (lane := self._lanes.get(key)) is not None:
            lane.append(job)
        else:
            self._lanes[key] = deque()
            self._ready.put_nowait(job)

    async def _wait_for_room(self) -> None:
        room = self.loop.create_future()
        self._room.append(room)
        try:
            await room
        except asyncio.CancelledError:
            # Woken, then cancelled before it could use the room: pass the wake-up on,
            # or the next producer would wait for a room that is already free.
            if room.done() and not room.cancelled():
                self._wake_one()
            raise
        finally:
            if room in self._room:
                self._room.remove(room)

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
            _cancel(self._ready.get_nowait())
        for lane in self._lanes.values():
            for job in lane:
                _cancel(job)
        self._lanes.clear()
        self._pending = 0
        self._wake_idle()
        return left

    def _start(self) -> None:
        context = outside_workers()
        context.run(in_worker.set, True)
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
            fn, message, key, future, envelope = job
            token = current_key.set(key)
            conversation = current_envelope.set(envelope)
            try:
                if future is None:
                    await fn(message, key)
                elif not future.cancelled():
                    await self._answer(fn, message, key, future)
            except asyncio.CancelledError:
                if me.cancelling():
                    _cancel(job)
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
                current_envelope.reset(conversation)
                current_key.reset(token)
                self._finish(key)
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
            lane = self._lanes.get(key)
            if lane:
                self._ready.put_nowait(lane.popleft())
            elif lane is not None:
                del self._lanes[key]
        self._pending -= 1
        self._wake_one()
        if not self._pending:
            self._wake_idle()

    def _wake_one(self) -> None:
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                return

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


def _cancel(job: Job) -> None:
    future = job[3]
    if future is not None and not future.done():
        future.cancel()
