"""The background engine, through the dispatcher API users call."""

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from iambus import Dispatcher, Limits


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    seq: int
    delay: float = 0.0


def make_dispatcher(log: list[tuple[str, int]], **options: object) -> Dispatcher:
    dp = Dispatcher(**options)  # type: ignore[arg-type]

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        await asyncio.sleep(job.delay)
        log.append((job.key, job.seq))

    return dp


async def test_same_key_runs_in_order_with_many_workers():
    log: list[tuple[str, int]] = []
    dp = make_dispatcher(log, limits=Limits(background=8))
    rng = random.Random(7)
    for seq in range(200):
        key = f"k{seq % 5}"
        await dp.handle(Job(key, seq, rng.random() / 1000), key=key)
    await dp.join()
    assert len(log) == 200
    for k in range(5):
        seqs = [seq for key, seq in log if key == f"k{k}"]
        assert seqs == sorted(seqs)


async def test_a_busy_key_does_not_block_other_keys():
    gate = asyncio.Event()
    fast_done = asyncio.Event()
    log: list[str] = []
    dp = Dispatcher(limits=Limits(background=2))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        if job.key == "slow":
            await gate.wait()
        log.append(f"{job.key}{job.seq}")
        if log == ["fast0", "fast1", "fast2"]:
            fast_done.set()

    for seq in range(3):
        await dp.handle(Job("slow", seq), key="slow")
    for seq in range(3):
        await dp.handle(Job("fast", seq), key="fast")
    # the slow key's queued jobs hold no worker: the second worker serves "fast"
    await asyncio.wait_for(fast_done.wait(), 1)
    assert log == ["fast0", "fast1", "fast2"]
    gate.set()
    await dp.join()
    assert log[3:] == ["slow0", "slow1", "slow2"]


async def test_workers_bound_concurrency():
    running = 0
    peak = 0
    dp = Dispatcher(limits=Limits(background=3))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.002)
        running -= 1

    for seq in range(20):
        await dp.handle(Job("x", seq))
    await dp.join()
    assert peak == 3


async def test_max_pending_makes_handle_wait():
    gate = asyncio.Event()
    dp = Dispatcher(limits=Limits(background=1, max_pending=3))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        await gate.wait()

    for seq in range(3):
        await dp.handle(Job("x", seq))
    fourth = asyncio.create_task(dp.handle(Job("x", 3)))
    await asyncio.sleep(0.01)
    assert not fourth.done()  # backpressure: no room until one finishes
    gate.set()
    await asyncio.wait_for(fourth, 1)
    await dp.join()


async def test_a_handler_may_queue_work_when_the_pool_is_full():
    # Handlers that send in the background from a full pool would deadlock waiting on
    # their own workers; their sends are admitted over the limit instead.
    log: list[tuple[str, int]] = []
    dp = Dispatcher(limits=Limits(background=1, max_pending=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        log.append((job.key, job.seq))
        if job.seq < 3:
            await dp.handle(Job(job.key, job.seq + 1))

    await dp.handle(Job("chain", 0))
    await asyncio.wait_for(dp.join(), 1)
    assert log == [("chain", 0), ("chain", 1), ("chain", 2), ("chain", 3)]


async def test_a_handler_cancelling_itself_does_not_kill_the_worker(caplog):
    log: list[tuple[str, int]] = []
    dp = Dispatcher(limits=Limits(background=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        if job.seq == 0:
            raise asyncio.CancelledError
        log.append((job.key, job.seq))

    await dp.handle(Job("x", 0))
    await dp.handle(Job("x", 1))
    await asyncio.wait_for(dp.join(), 1)
    assert log == [("x", 1)]
    assert "cancelled" in caplog.text


async def test_join_waits_for_work_queued_by_work():
    log: list[tuple[str, int]] = []
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        await asyncio.sleep(0.001)
        log.append((job.key, job.seq))
        if job.seq < 5:
            await dp.handle(Job(job.key, job.seq + 1))

    await dp.handle(Job("a", 0))
    await dp.join()
    assert [seq for _, seq in log] == [0, 1, 2, 3, 4, 5]


async def test_an_awaited_keyed_send_running_at_stop_timeout_is_cancelled():
    import pytest

    dp = Dispatcher()

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        await asyncio.sleep(10)

    dp.start()
    waiting = asyncio.create_task(dp.execute(Job("k", 0), key="k"))
    await asyncio.sleep(0.01)
    await dp.stop(timeout=0.02)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 1)


async def test_a_cancelled_producer_passes_its_room_on():
    gate = asyncio.Event()
    dp = Dispatcher(limits=Limits(max_pending=1, background=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        if job.seq == 1:
            await gate.wait()

    await dp.handle(Job("x", 1))
    first = asyncio.create_task(dp.handle(Job("x", 2)))
    second = asyncio.create_task(dp.handle(Job("x", 3)))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.sleep(0)  # the job finishes and wakes `first`...
    first.cancel()  # ...which is cancelled before it can take the room
    await asyncio.wait_for(second, 1)  # the room went to the next producer
    await dp.join()


async def test_a_handler_swallowing_cancellation_does_not_hang_stop():
    log: list[tuple[str, int]] = []
    dp = Dispatcher(limits=Limits(background=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append((job.key, job.seq))  # swallowed: returns normally

    dp.start()
    await dp.handle(Job("x", 0))
    await dp.handle(Job("x", 1))
    await asyncio.wait_for(dp.stop(timeout=0.02), 2)
    assert log == [("x", 0)]  # the queued job was not started after the stop


async def test_producers_waiting_for_room_get_it_first_come_first_served():
    gate = asyncio.Event()
    log: list[tuple[str, int]] = []
    dp = Dispatcher(limits=Limits(max_pending=1, background=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        if job.key == "blocker":
            await gate.wait()
        log.append((job.key, job.seq))

    await dp.handle(Job("blocker", 0))
    waiting = []
    for seq in range(5):
        waiting.append(asyncio.create_task(dp.handle(Job("waiter", seq))))
        await asyncio.sleep(0)  # each producer queues up for room, in this order
    gate.set()
    await asyncio.sleep(0)  # the blocker finishes: its place goes to the first waiter...
    # ...and a producer arriving before that waiter resumes does not take it: it queues
    # up behind every waiter. (Awaited directly: wait_for() would defer it to a task.)
    await dp.handle(Job("late", 0))
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    await dp.join()
    assert log == [("blocker", 0)] + [("waiter", seq) for seq in range(5)] + [("late", 0)]


async def test_producers_giving_up_on_room_lose_no_wake_up_of_the_others():
    gate = asyncio.Event()
    log: list[int] = []
    dp = Dispatcher(limits=Limits(max_pending=1, background=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        if job.seq < 0:
            await gate.wait()
        log.append(job.seq)

    await dp.handle(Job("x", -1))
    producers = []
    for seq in range(300):
        producers.append(asyncio.create_task(dp.handle(Job("x", seq))))
        await asyncio.sleep(0)
    # Most give up waiting (a timeout, a client gone): among them long runs, enough to
    # make the engine sweep them out; the rest must still get in, in order.
    kept = {seq for seq in range(300) if seq % 7 == 0 or seq > 280}
    for seq, producer in enumerate(producers):
        if seq not in kept:
            producer.cancel()
    gate.set()
    await asyncio.wait_for(asyncio.gather(*(producers[seq] for seq in sorted(kept))), 2)
    await asyncio.wait_for(dp.join(), 2)
    assert log == [-1, *sorted(kept)]
    # the engine has room again: a new producer is not kept waiting
    await asyncio.wait_for(dp.handle(Job("x", 1000)), 1)
    await asyncio.wait_for(dp.join(), 1)


async def test_producers_waiting_for_room_at_stop_are_turned_away():
    import pytest

    from iambus import DispatcherStopped

    dp = Dispatcher(limits=Limits(max_pending=1))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        await asyncio.sleep(10)

    dp.start()
    await dp.handle(Job("x", -1))
    producers = []
    for seq in range(200):
        producers.append(asyncio.create_task(dp.handle(Job("x", seq))))
        await asyncio.sleep(0)
    for producer in producers[:150:2]:
        producer.cancel()  # some gave up before the stop
    await dp.stop(timeout=0.02)
    for producer in producers[:150:2]:
        with pytest.raises(asyncio.CancelledError):
            await producer
    for producer in producers[1:150:2] + producers[150:]:
        with pytest.raises(DispatcherStopped):
            await asyncio.wait_for(producer, 1)


async def test_follow_ups_of_a_delivery_dropped_at_close_are_reported_lost():
    # The transport worker acks a delivery only if wait() says its follow-ups all ran;
    # one cancelled mid-run, or never started, by a closing engine did not.
    from iambus.engine import Engine, Followups, followups

    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow(message: object, key: object) -> None:
        started.set()
        await gate.wait()

    async def orphaned(exc: BaseException, message: object, key: object) -> None:
        raise AssertionError("no awaited job here")

    engine = Engine(workers=1, max_pending=10, orphaned=orphaned)
    running, queued = Followups(), Followups()
    followups.set(running)
    await engine.put(slow, "running", None, None)
    followups.set(queued)
    await engine.put(slow, "queued", None, None)
    followups.set(None)
    await asyncio.wait_for(started.wait(), 1)
    assert await engine.close() == 2
    assert await asyncio.wait_for(running.wait(), 1) is False
    assert await asyncio.wait_for(queued.wait(), 1) is False

    done = Followups()  # for contrast: follow-ups that ran
    engine = Engine(workers=1, max_pending=10, orphaned=orphaned)
    gate.set()
    followups.set(done)
    await engine.put(slow, "quick", None, None)
    followups.set(None)
    assert await asyncio.wait_for(done.wait(), 1) is True
    await engine.close()


async def test_start_task_runs_a_coroutine_that_never_waits_at_once_where_python_can() -> None:
    import contextvars
    import sys

    from iambus.engine import start_task

    seen = contextvars.ContextVar("seen", default="outside")
    context = contextvars.copy_context()
    context.run(seen.set, "given")

    async def quick() -> str:
        return seen.get()

    task = start_task(quick(), context=context)
    # 3.12+: eager, finished before start_task returned; 3.11: a plain task, not run yet.
    assert task.done() is (sys.version_info >= (3, 12))
    assert await task == "given"  # in the context given, either way

    async def slow() -> str:
        await asyncio.sleep(0)
        return "slept"

    waiting = start_task(slow())
    assert not waiting.done()
    assert await waiting == "slept"


async def test_start_task_uses_the_task_factory_set_on_the_loop() -> None:
    from iambus.engine import start_task

    loop = asyncio.get_running_loop()
    made: list[asyncio.Task[object]] = []

    def factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def quick() -> int:
        return 1

    loop.set_task_factory(factory)
    try:
        task = start_task(quick())
        assert made == [task]
        assert not task.done()  # the factory's plain task, not an eager one
        assert await task == 1
    finally:
        loop.set_task_factory(None)
