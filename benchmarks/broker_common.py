"""What every broker of benchmarks/broker.py shares: messages, results, checks, iambus.

A broker module (``broker_redis``, ``broker_rabbitmq``, ``broker_nats``, ``broker_kafka``)
provides

* ``TITLE`` and ``DEFAULT_URL``;
* ``open_ctx(url, suffix, options) -> ctx``: connects the harness' own checker
  client; the ctx implements :class:`Checks` (broker-side verification and
  clean-up, by a *scope*: a name every resource of one measurement contains);
* ``BUILDERS``: ``[(name, build)]``, ``build(ctx) -> Impl``, in column order;
* ``environment(ctx) -> list[str]``: header lines (server and client versions).

Every ``Impl`` carries two coroutine functions:

* ``throughput(n, in_flight) -> ThroughputStats``: publish ``n`` events
  (``~PAYLOAD_BYTES`` of JSON each) with at most ``in_flight`` publishes
  outstanding, while a consumer in the same process (its own task) handles and
  acks them. It verifies that every event was handled exactly once (by sequence
  number) and that nothing is left unacked, and raises
  :class:`VerificationError` if not.
* ``latency(n) -> list[float]``: ``n`` sequential request/reply round trips,
  one duration in seconds each; every reply is checked.

and may carry a third, ``keyed_slow(n, in_flight) -> ThroughputStats``: the same
as ``throughput`` with ``KEYS`` keys and a handler that waits ``SLOW_HANDLER``
seconds, each key's order checked, timing the consumer alone: the handlers wait at
the tracker's gate until every event was sent (broker_kafka's second scenario). A builder
that cannot run on this checkout raises :class:`Unavailable`; its cells say why.

Each call uses fresh names (the run's random suffix plus a counter), so rounds
do not see each other's messages, and deletes what it made when it ends; the
harness deletes whatever is left under the run's suffix at exit.

Handlers are async and trivial: the event handler records the event's sequence
number, the query handler returns ``ANSWER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ANSWER = 42
PAYLOAD_BYTES = 200  # target size of one event, JSON-encoded
BATCH = 100  # batch size / prefetch of the consumers we configure
STALL_SECONDS = 10.0  # fail a run that makes no progress for this long
REPLY_TIMEOUT = 2.0  # seconds a single request may take


class VerificationError(AssertionError):
    """A run lost, duplicated or failed to ack messages: it has no valid number."""


class Unavailable(Exception):
    """An implementation this checkout cannot run (e.g. iambus has no such transport yet)."""


# -- messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageViewed:
    seq: int
    user_id: int
    page: str
    referrer: str
    ts: float
    pad: str


@dataclass(frozen=True, slots=True)
class GetUser:
    user_id: int


_PAGE, _REFERRER, _TS = (
    "/products/widgets/42",
    "https://example.com/search?q=widgets",
    1764000000.125,
)


def _pad_length() -> int:
    probe = {
        "seq": 10_000,
        "user_id": 123,
        "page": _PAGE,
        "referrer": _REFERRER,
        "ts": _TS,
        "pad": "",
    }
    return max(0, PAYLOAD_BYTES - len(json.dumps(probe)))


PAD = "x" * _pad_length()


def event_fields(seq: int) -> dict[str, Any]:
    """The event as a plain dict (what goes on the wire as JSON, ~200 bytes)."""
    return {
        "seq": seq,
        "user_id": seq % 1000,
        "page": _PAGE,
        "referrer": _REFERRER,
        "ts": _TS,
        "pad": PAD,
    }


# -- results -------------------------------------------------------------------------


@dataclass
class ThroughputStats:
    n: int
    elapsed: float  # first publish (or the gate opening) -> last event handled (and acked)
    publish_elapsed: float  # first publish -> last publish accepted

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


Throughput = Callable[[int, int], Awaitable[ThroughputStats]]
Latency = Callable[[int], Awaitable[list[float]]]


@dataclass
class Impl:
    name: str
    version: str
    throughput: Throughput | None = None
    latency: Latency | None = None
    notes: list[str] = field(default_factory=list)
    keyed_slow: Throughput | None = None
    close: Callable[[], Awaitable[None]] | None = None


class Checks(Protocol):
    """Broker-side checks and clean-up of one run's resources, by scope (a name part)."""

    suffix: str

    def namespace(self, what: str) -> str:
        """A fresh scope for one measurement; contains the run's suffix."""
        ...

    def iambus_url(self, namespace: str) -> str:
        """The transport URL an iambus dispatcher of that namespace is given."""
        ...

    async def finish(self, tracker: Tracker, scope: str, what: str) -> float:
        """Wait until every event was handled and acked; return the perf_counter then."""
        ...

    async def verify_after(self, tracker: Tracker, scope: str, what: str) -> None:
        """Once the consumer is stopped: nothing handled twice, nothing left unacked."""
        ...

    async def verify_requests(self, scope: str, what: str) -> None:
        """Once the responder is stopped: no request left unacked (where they are acked)."""
        ...

    async def cleanup(self, scope: str) -> int:
        """Delete what holds ``scope`` in its name; return how many things were deleted."""
        ...


# -- checks ---------------------------------------------------------------------------


class FreshNames:
    """``name``/``namespace`` for a ctx with a ``suffix`` and a ``_counter`` field."""

    suffix: str
    _counter: int

    def name(self, what: str) -> str:
        """A fresh name (no dots): bench-<suffix>-<what><counter>."""
        self._counter += 1
        return f"bench-{self.suffix}-{what}{self._counter}"

    namespace = name


class SettledChecks:
    """The Checks protocol's waits for a broker whose counters say when a scope is settled.

    A ctx provides ``settled`` (poll until nothing of the scope is left undelivered or
    unacked, else raise :class:`VerificationError`) and ``stored`` (how many events the
    scope's streams or topics hold); this derives ``finish`` (the clock stops once the
    broker shows everything acked), ``verify_after`` and ``verify_requests``.
    """

    STORED = "messages in the streams"  # what ``stored`` counts, for the error

    async def settled(self, scope: str, what: str, when: str, need_consumer: bool) -> None:
        raise NotImplementedError

    async def stored(self, scope: str) -> int:
        raise NotImplementedError

    async def finish(self, tracker: Tracker, scope: str, what: str) -> float:
        await tracker.wait(what)
        await self.settled(scope, what, "with the consumer running", True)
        return time.perf_counter()

    async def verify_after(self, tracker: Tracker, scope: str, what: str) -> None:
        tracker.check(what)
        await self.settled(scope, what, "after the consumer stopped", True)
        if (stored := await self.stored(scope)) < tracker.n:
            raise VerificationError(f"{what}: {stored:,} {self.STORED}, expected {tracker.n:,}")

    async def verify_requests(self, scope: str, what: str) -> None:
        await self.settled(scope, what, "requests after the responder stopped", False)


class Tracker:
    """Counts handled events by sequence number; flags duplicates and strays.

    Sequence number ``n`` is the priming event some modules send (and wait for) before
    the clock starts: it sets ``primed`` and is not counted. ``held=True`` closes the
    gate: handlers that ``await admit(seq)`` wait until :func:`timed_publish` has sent
    every event and opens it (the clock then times the consumer alone).
    """

    def __init__(self, n: int, *, held: bool = False) -> None:
        self.n = n
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()
        self.seen = bytearray(n)
        self.handled = 0
        self.duplicates = 0
        self.strays = 0
        self.done = asyncio.Event()
        self.primed = asyncio.Event()

    async def admit(self, seq: int) -> None:
        """Wait for the gate (the priming event passes)."""
        if seq != self.n and not self.gate.is_set():
            await self.gate.wait()

    def hit(self, seq: int) -> None:
        if seq == self.n:
            self.primed.set()
            return
        if not 0 <= seq < self.n:
            self.strays += 1
            return
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.handled += 1
        if self.handled == self.n:
            self.done.set()

    async def wait(self, what: str) -> None:
        """Wait until all n were handled; fail after STALL_SECONDS without progress."""
        last = -1
        while not self.done.is_set():
            if self.handled == last:
                raise VerificationError(
                    f"{what}: handled {self.handled:,} of {self.n:,} events, "
                    f"no progress for {STALL_SECONDS:.0f} s (messages lost?)"
                )
            last = self.handled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), STALL_SECONDS)

    def check(self, what: str) -> None:
        problems = []
        if self.handled != self.n:
            problems.append(f"handled {self.handled:,} of {self.n:,}")
        if self.duplicates:
            problems.append(f"{self.duplicates:,} handled more than once")
        if self.strays:
            problems.append(f"{self.strays:,} unknown sequence numbers")
        if problems:
            raise VerificationError(f"{what}: " + ", ".join(problems))


async def pump(n: int, in_flight: int, publish: Callable[[int], Awaitable[Any]]) -> None:
    """Call publish(0..n-1) with at most in_flight calls outstanding (sliding window)."""
    window = asyncio.Semaphore(in_flight)
    running: set[asyncio.Task[Any]] = set()
    failed: list[BaseException] = []

    def finished(task: asyncio.Task[Any]) -> None:
        running.discard(task)
        window.release()
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]

    for seq in range(n):
        await window.acquire()
        if failed:
            break
        task = asyncio.ensure_future(publish(seq))
        running.add(task)
        task.add_done_callback(finished)
    if running:
        await asyncio.wait(running)
    if failed:
        raise failed[0]


async def poll_until(
    probe: Callable[[], Awaitable[str | None]], timeout: float, interval: float
) -> str | None:
    """Call probe() until it returns None (all good); after timeout return its last complaint."""
    deadline = time.perf_counter() + timeout
    while True:
        complaint = await probe()
        if complaint is None or time.perf_counter() > deadline:
            return complaint
        await asyncio.sleep(interval)


async def stop_task(task: asyncio.Task[Any], stop: asyncio.Event, grace: float = 2.0) -> None:
    """Ask a consumer loop to stop (it notices within one poll), cancel it if it hangs."""
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=grace)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# -- iambus: the same code on every broker, only the URL differs ----------------------


def import_ours() -> Any:
    """Import this repository's iambus, preferring the working tree's src/."""
    src = ROOT / "src"
    if (src / "iambus").is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import iambus

    if not hasattr(iambus, "Dispatcher"):
        raise ImportError(f"iambus at {getattr(iambus, '__file__', '?')} has no Dispatcher")
    return iambus


def iambus_version() -> str:
    try:
        iambus = import_ours()
    except Exception:
        return version("iambus")
    return str(getattr(iambus, "__version__", None) or version("iambus"))


async def timed_publish(
    ctx: Checks,
    tracker: Tracker,
    scope: str,
    what: str,
    n: int,
    in_flight: int,
    publish: Callable[[int], Awaitable[Any]],
) -> ThroughputStats:
    """Publish ``n`` events (``in_flight`` at most) and wait until all were handled.

    The clock runs from the first publish; with the tracker's gate held, from the moment
    the gate opens, once every event was sent.
    """
    start = time.perf_counter()
    await pump(n, in_flight, publish)
    publishing = time.perf_counter() - start
    if not tracker.gate.is_set():  # the consumer alone: from the gate opening
        tracker.gate.set()
        start = time.perf_counter()
    end = await ctx.finish(tracker, scope, what)
    return ThroughputStats(n, end - start, publishing)


async def timed_requests(n: int, what: str, ask: Callable[[], Awaitable[Any]]) -> list[float]:
    """Send ``n`` requests one after another; their latencies, each answer checked."""
    samples: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        result = await ask()
        t1 = time.perf_counter()
        if result != ANSWER:
            raise VerificationError(f"{what}: request {i} got {result!r}")
        samples.append(t1 - t0)
    return samples


KEYS = 50  # the keyed column spreads its events over this many keys
SLOW_HANDLER = 0.001  # seconds the handler of the keyed_slow scenario waits
PRIME_TIMEOUT = 30.0  # seconds a priming event may take (a consumer group joining)


class KeyOrder:
    """Checks that each key's events (key = seq % KEYS) are handled in publishing order."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last: dict[int, int] = {}
        self.violations: list[tuple[int, int]] = []

    def hit(self, seq: int, n: int) -> None:
        if seq >= n:  # the priming event
            return
        before = self.last.get(seq % KEYS, -1)
        if seq < before:
            self.violations.append((before, seq))
        self.last[seq % KEYS] = seq

    def check(self) -> None:
        if self.violations:
            before, seq = self.violations[0]
            raise VerificationError(
                f"{self.what}: {len(self.violations)} events handled before an earlier one "
                f"of their key, e.g. seq {seq} after {before}"
            )


def per_key(publish: Callable[[int], Awaitable[Any]]) -> Callable[[int], Awaitable[None]]:
    """``publish`` with one key's publishes (key = seq % KEYS) one after another.

    A key's order is its publishes' order: one key's publishes must not overlap, so each
    waits for the one before it of its key (the window still holds `in_flight`
    publishes, of different keys).
    """
    previous: dict[int, asyncio.Future[None]] = {}

    async def publish_in_order(seq: int) -> None:
        done = asyncio.get_running_loop().create_future()
        before = previous.get(seq % KEYS)
        previous[seq % KEYS] = done
        try:
            if before is not None:
                await before
            await publish(seq)
        finally:
            done.set_result(None)

    return publish_in_order


async def prime(tracker: Tracker, what: str, publish: Callable[[int], Awaitable[Any]]) -> None:
    """Send the priming event (seq n) and wait until it was handled: the consumer is live."""
    await publish(tracker.n)
    try:
        await asyncio.wait_for(tracker.primed.wait(), PRIME_TIMEOUT)
    except TimeoutError:
        raise VerificationError(
            f"{what}: the priming event was not handled within {PRIME_TIMEOUT:.0f} s"
        ) from None


async def build_iambus(ctx: Checks) -> Impl:
    """iambus publishing without a key: no ordering, every instance takes anything."""
    return await build_iambus_with(ctx, keyed=False)


async def build_iambus_keyed(ctx: Checks) -> Impl:
    """iambus publishing with ``key=`` over ``KEYS`` keys: what per-key ordering costs."""
    return await build_iambus_with(ctx, keyed=True)


async def build_iambus_with(
    ctx: Checks, *, keyed: bool, primed: bool = False, slow: bool = False, queries: bool = True
) -> Impl:
    """The iambus column; ``primed``: send and await one event before each clock starts;
    ``slow``: also the ``keyed_slow`` scenario (keyed columns only); ``queries``: measure
    request/reply (unkeyed columns only)."""
    iambus = import_ours()
    name = "iambus-keyed" if keyed else "iambus"

    def make_dispatcher(
        namespace: str, tracker: Tracker | None, delay: float = 0.0, order: KeyOrder | None = None
    ) -> Any:
        dp = iambus.Dispatcher(
            transport=ctx.iambus_url(namespace),
            service="bench",
            routes={PageViewed: "bench", GetUser: "bench"},
        )

        @dp.events.register(PageViewed)
        async def on_viewed(event: PageViewed) -> None:
            if delay and tracker is not None:
                await tracker.admit(event.seq)
                await asyncio.sleep(delay)
            if tracker is not None:
                tracker.hit(event.seq)
                if order is not None:  # the key is seq % KEYS: each key's seqs come in order
                    order.hit(event.seq, tracker.n)

        @dp.queries.register(GetUser)
        async def get_user(query: GetUser) -> int:
            return ANSWER

        return dp

    # Fail at build time (not in the middle of a timed round) if the API is not there.
    make_dispatcher(ctx.namespace("probe"), None)

    async def run(n: int, in_flight: int, what: str, delay: float) -> ThroughputStats:
        namespace = ctx.namespace("tp")
        tracker, order = Tracker(n, held=delay > 0), KeyOrder(what)
        try:
            dp = make_dispatcher(namespace, tracker, delay, order if keyed else None)
            async with dp:

                async def send(seq: int) -> None:
                    if keyed:
                        await dp.publish(PageViewed(**event_fields(seq)), key=f"user-{seq % KEYS}")
                    else:
                        await dp.publish(PageViewed(**event_fields(seq)))

                if primed:
                    await prime(tracker, what, send)
                publish = per_key(send) if keyed else send
                stats = await timed_publish(ctx, tracker, namespace, what, n, in_flight, publish)
            await ctx.verify_after(tracker, namespace, what)
            order.check()
            return stats
        finally:
            await ctx.cleanup(namespace)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, name, 0.0)

    async def keyed_slow(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, f"{name} (1 ms handler)", SLOW_HANDLER)

    async def latency(n: int) -> list[float]:
        namespace = ctx.namespace("rr")
        query = GetUser(1)
        samples: list[float] = []
        try:
            dp = make_dispatcher(namespace, None)
            async with dp:

                async def ask() -> Any:
                    result = await dp.query(query, timeout=REPLY_TIMEOUT)
                    return result

                samples.extend(await timed_requests(n, name, ask))
            await ctx.verify_requests(namespace, name)
            return samples
        finally:
            await ctx.cleanup(namespace)

    if keyed:
        return Impl(
            name=name,
            version=iambus_version(),
            throughput=throughput,
            keyed_slow=keyed_slow if slow else None,
            notes=[
                f"iambus-keyed: the same, with `dp.publish(event, key=f'user-{{seq % {KEYS}}}')`:"
                " each key's events are handled one at a time in order (checked), different "
                "keys in parallel (up to the transport's partitions); no request/reply column."
            ],
        )
    return Impl(
        name=name,
        version=iambus_version(),
        throughput=throughput,
        latency=latency if queries else None,
        notes=[
            "iambus: `Dispatcher(transport=url + '?namespace=<fresh>', service='bench', "
            "routes={PageViewed: 'bench', GetUser: 'bench'})` (a fresh dispatcher per "
            "measurement, entered with `async with` before the clock); "
            "`await dp.publish(PageViewed(...))` with the same sliding window, "
            "`await dp.query(GetUser(1), timeout=2)`. Acks are checked on everything whose "
            "name contains the namespace."
        ],
    )
