"""How long a full engine takes to let many waiting producers in (``max_pending``).

    .venv-bench/bin/python benchmarks/backpressure.py                  # 10k, 30k, 100k
    .venv-bench/bin/python benchmarks/backpressure.py --waiters 1000,5000 --rounds 3

Each round starts N producer tasks at once, each doing ``await dp.handle(Job(n))`` on a
dispatcher whose engine has room for ``--max-pending`` jobs (default 100): all but that
many wait for room. The clock runs from the first producer's start until every job has
run (``dp.join()``). Handlers are trivial, so what is measured is the engine's
bookkeeping: letting a waiter in and running its job. It prints, per N, the median
drain time, the time per producer (flat when the cost is linear in N) and the producers
let in per second. To compare two trees, run the script once with each on
``PYTHONPATH`` (``PYTHONPATH=/path/to/other/src``): it prints which iambus it imported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass

from report import cpu_model, humanize

import iambus
from iambus import Dispatcher, Limits


@dataclass(frozen=True, slots=True)
class Job:
    n: int


async def drain(waiters: int, max_pending: int, workers: int) -> float:
    done = 0
    dp = Dispatcher(limits=Limits(max_pending=max_pending, background=workers))

    @dp.commands.register(Job)
    async def run(job: Job) -> None:
        nonlocal done
        done += 1

    async with dp:
        started = time.perf_counter()
        producers = [asyncio.create_task(dp.handle(Job(n))) for n in range(waiters)]
        await asyncio.gather(*producers)
        await dp.join()
        elapsed = time.perf_counter() - started
    if done != waiters:
        raise AssertionError(f"{done} of {waiters} jobs ran")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--waiters",
        default="10000,30000,100000",
        help="comma-separated producer counts (default: 10000,30000,100000)",
    )
    parser.add_argument("--max-pending", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8, help="limits.background")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        counts = [int(part) for part in args.waiters.split(",")]
    except ValueError:
        parser.error(f"--waiters takes comma-separated integers, got {args.waiters!r}")

    async def go() -> list[str]:
        rows = []
        for waiters in counts:
            times = []
            for _ in range(args.rounds):
                gc.collect()
                times.append(await drain(waiters, args.max_pending, args.workers))
            median = statistics.median(times)
            rows.append(
                f"| {waiters:,} | {median:.3f} s | {median / waiters * 1e6:.1f} µs "
                f"| {humanize(waiters / median)}/s |"
            )
        return rows

    rows = asyncio.run(go())
    print("# iambus backpressure: many producers waiting for room\n")
    print(f"- Python {platform.python_version()} on {platform.platform()}")
    print(f"- CPU: {cpu_model()}")
    print(f"- iambus from {iambus.__file__.rsplit('/', 1)[0]}")
    print(
        f"- Limits(max_pending={args.max_pending}, background={args.workers}), "
        f"median of {args.rounds} round(s)\n"
    )
    print("| waiting producers | drain time | per producer | producers/s |")
    print("|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
