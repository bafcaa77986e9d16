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
* a job that raises never ends its worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

JobFn = Callable[[Any, Any], Awaitable[Any]]
# (what to run, message, key, future for an awaiting caller or None)
Job = tuple[JobFn, Any, Any, "asyncio.Future[Any] | None"]

in_worker: contextvars.ContextVar[bool] = contextvars.ContextVar("iambus_in_worker", default=False)
# The key of the job the current worker runs (None outside keyed jobs).
current_key: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "iambus_current_key", default=None
)


class Engine:
    def __init__(self, *, workers: int, max_pending: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._workers = workers
        self._max_pending = max_pending
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
        if self._pending >= self._max_pending and not in_worker.get():
            while self._pending >= self._max_pending:
                room = self.loop.create_future()
                self._room.append(room)
                try:
                    await room
                finally:
                    if room in self._room:
                        self._room.remove(room)
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

    async def join(self) -> None:
        """Return once no job is queued or running (including jobs put meanwhile)."""
        while self._pending:
            if self._idle is None or self._idle.done():
                self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    async def close(self) -> int:
        """Cancel the workers; return how many jobs were left unfinished."""
        left = self._pending
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        while not self._ready.empty():
            _, _, _, future = self._ready.get_nowait()
            if future is not None and not future.done():
                future.cancel()
        for lane in self._lanes.values():
            for _, _, _, future in lane:
                if future is not None and not future.done():
                    future.cancel()
        self._lanes.clear()
        self._pending = 0
        self._wake_idle()
        return left

    def _start(self) -> None:
        context = contextvars.copy_context()
        context.run(in_worker.set, True)
        self._tasks = [
            self.loop.create_task(self._work(), name=f"iambus-worker-{n}", context=context.copy())
            for n in range(self._workers)
        ]

    async def _work(self) -> None:
        ready = self._ready
        me = asyncio.current_task()
        assert me is not None
        while True:
            try:
                fn, message, key, future = await ready.get()
            except asyncio.CancelledError:
                self._lost_with_the_loop()
                raise
            token = current_key.set(key)
            try:
                if future is None:
                    await fn(message, key)
                elif not future.cancelled():
                    try:
                        result = await fn(message, key)
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(result)
            except asyncio.CancelledError:
                if me.cancelling():
                    self._lost_with_the_loop()
                    raise  # the engine is closing, or the event loop is ending
                # A handler raised CancelledError of its own: a failure of that job only.
                logger.error("iambus: a background job for %r was cancelled", message)
                if future is not None and not future.done():
                    future.cancel()
            except Exception:
                # Job functions report their handlers' errors themselves; this is a
                # last line of defence so that a worker never dies.
                logger.exception("iambus: unexpected error in a background job for %r", message)
            finally:
                current_key.reset(token)
                self._finish(key)

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

    def _finish(self, key: Hashable | None) -> None:
        if key is not None:
            lane = self._lanes.get(key)
            if lane:
                self._ready.put_nowait(lane.popleft())
            elif lane is not None:
                del self._lanes[key]
        self._pending -= 1
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                break
        if not self._pending:
            self._wake_idle()

    def _wake_idle(self) -> None:
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
