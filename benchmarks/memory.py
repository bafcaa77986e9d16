"""Memory held per queued fire-and-forget message, next to a bare queue of the same jobs.

    .venv/bin/python benchmarks/memory.py            # 50,000 messages per row
    .venv/bin/python benchmarks/memory.py --n 200000

A dispatcher with one background worker, blocked on a gate, queues N messages sent with
``dp.handle(message)`` (no key), with one key shared by all, and with a new key per
message. ``tracemalloc`` counts what the queue holds (the messages themselves are built
before counting, so only the bus's own bookkeeping is measured), then what is still held
once the queue has drained. The baseline row is the least any queue needs: an
``asyncio.Queue`` of ``(handler, message, key)`` tuples.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from iambus import Dispatcher, Limits


@dataclass(frozen=True, slots=True)
class Ping:
    n: int


async def measure(
    fill: Callable[[], Awaitable[None]], drain: Callable[[], Awaitable[None]]
) -> tuple[int, int]:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    await fill()
    gc.collect()
    queued = tracemalloc.get_traced_memory()[0] - before
    await drain()
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - before
    return queued, left


async def bare_queue(messages: list[Ping]) -> tuple[int, int]:
    queue: asyncio.Queue[tuple[object, Ping, str | None]] = asyncio.Queue()

    async def handler(message: Ping) -> None:
        return None

    async def fill() -> None:
        for message in messages:
            queue.put_nowait((handler, message, None))

    async def drain() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            await handler(job[1])

    return await measure(fill, drain)


async def dispatcher(messages: list[Ping], keys: list[str | None]) -> tuple[int, int]:
    gate = asyncio.Event()
    dp = Dispatcher(limits=Limits(background=1, max_pending=len(messages) + 10))

    @dp.events.register(Ping)
    async def on_ping(event: Ping) -> None:
        if event.n < 0:
            await gate.wait()

    async with dp:
        await dp.handle(Ping(-1))  # occupies the one worker until the gate opens
        await asyncio.sleep(0)

        async def fill() -> None:
            for message, key in zip(messages, keys, strict=True):
                await dp.handle(message, key=key)

        async def drain() -> None:
            gate.set()
            await dp.join()

        return await measure(fill, drain)


async def run(n: int) -> list[tuple[str, int, int]]:
    messages = [Ping(i) for i in range(n)]
    new_keys: list[str | None] = [f"key-{i}" for i in range(n)]
    rows = [("asyncio.Queue of job tuples (baseline)", *await bare_queue(messages))]
    rows.append(("dp.handle(message)", *await dispatcher(messages, [None] * n)))
    rows.append(("dp.handle(message, key=one shared key)", *await dispatcher(messages, ["k"] * n)))
    rows.append(("dp.handle(message, key=a new key each)", *await dispatcher(messages, new_keys)))
    del new_keys
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="messages queued per row")
    args = parser.parse_args()
    tracemalloc.start()
    rows = asyncio.run(run(args.n))
    tracemalloc.stop()
    base = rows[0][1] / args.n
    print(f"Python {platform.python_version()}, {args.n:,} messages queued behind a busy worker\n")
    print(
        "| how it is queued | bytes per queued message | vs baseline "
        "| bytes per message left after the drain |"
    )
    print("|---|---:|---:|---:|")
    for name, queued, left in rows:
        per = queued / args.n
        print(f"| {name} | {per:,.0f} | {per / base:.2f}x | {max(left, 0) / args.n:,.1f} |")


if __name__ == "__main__":
    main()
