"""The implementations compared by benchmarks/broker.py, over Redis Streams.

Every ``build_*`` coroutine takes the run's :class:`Ctx` and returns an
:class:`Impl` carrying two coroutine functions:

* ``throughput(n, in_flight) -> ThroughputStats``: publish ``n`` events
  (``~PAYLOAD_BYTES`` of JSON each) with at most ``in_flight`` publishes
  outstanding, while a consumer in the same process (its own task) handles and
  acks them.  Timed from the first publish until every event has been handled
  *and* its stream shows no pending entry.  It verifies that every event was
  handled exactly once and acked, and raises :class:`VerificationError` if not.
* ``latency(n) -> list[float]``: ``n`` sequential request/reply round trips,
  one duration in seconds each; every reply is checked.

Each call uses fresh keys (the run's random suffix plus a counter), so rounds
do not see each other's messages; it deletes the keys it made when it ends,
and the harness deletes whatever is left under the run's suffix at exit.

Handlers are async and trivial: the event handler records the event's
sequence number, the query handler returns ``ANSWER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ANSWER = 42
PAYLOAD_BYTES = 200  # target size of one event, JSON-encoded
GROUP = "bench"
READ_COUNT = 100  # XREADGROUP COUNT for the consumers we configure
BLOCK_MS = 100  # XREADGROUP BLOCK for the consumers we configure
STALL_SECONDS = 10.0  # fail a run that makes no progress for this long
REPLY_TIMEOUT = 2.0  # seconds a single request may take


class VerificationError(AssertionError):
    """A run lost, duplicated or failed to ack messages: it has no valid number."""


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


# -- run context, results, checks ------------------------------------------------------


@dataclass
class ThroughputStats:
    n: int
    elapsed: float  # first publish -> last ack observed
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
    close: Callable[[], Awaitable[None]] | None = None


@dataclass
class Ctx:
    """What every builder gets: where Redis is, the run's key prefix, a checker client."""

    url: str
    suffix: str  # random per run; every key we make contains it
    checker: Any  # redis.asyncio.Redis used only by the harness' checks
    raw_reply: str = "pubsub"  # raw request/reply channel: "pubsub" or "list"
    _counter: int = 0

    def key(self, *parts: str) -> str:
        """A fresh key name: iambus-bench:<suffix>:<parts>:<counter>."""
        self._counter += 1
        return ":".join(("iambus-bench", self.suffix, *parts, str(self._counter)))

    def namespace(self, what: str) -> str:
        self._counter += 1
        return f"bench-{self.suffix}-{what}{self._counter}"

    async def delete_matching(self, pattern: str) -> int:
        keys = [k async for k in self.checker.scan_iter(match=pattern, count=1000)]
        if keys:
            await self.checker.delete(*keys)
        return len(keys)

    async def streams_matching(self, pattern: str) -> list[str]:
        return [
            k.decode() if isinstance(k, bytes) else k
            async for k in self.checker.scan_iter(match=pattern, count=1000, _type="stream")
        ]

    async def pending(self, streams: Iterable[str]) -> int:
        """Entries delivered to a consumer group but not acked, over all groups."""
        total = 0
        for stream in streams:
            groups = await self.checker.xinfo_groups(stream)
            if not groups:
                raise VerificationError(f"stream {stream} has no consumer group")
            total += sum(int(g["pending"]) for g in groups)
        return total


class Tracker:
    """Counts handled events by sequence number; flags duplicates and strays."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.handled = 0
        self.duplicates = 0
        self.strays = 0
        self.done = asyncio.Event()

    def hit(self, seq: int) -> None:
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


async def finish(
    ctx: Ctx,
    tracker: Tracker,
    streams: Callable[[], Awaitable[list[str]]],
    what: str,
) -> float:
    """Wait for every event to be handled and acked; return the perf_counter then."""
    await tracker.wait(what)
    names = await streams()
    if not names:
        raise VerificationError(f"{what}: found no stream to check for pending entries")
    deadline = time.perf_counter() + STALL_SECONDS
    while True:
        left = await ctx.pending(names)
        now = time.perf_counter()
        if left == 0:
            return now
        if now > deadline:
            raise VerificationError(f"{what}: {left:,} entries still pending (not acked)")
        await asyncio.sleep(0.0002)


async def verify_after(ctx: Ctx, tracker: Tracker, streams: list[str], what: str) -> None:
    """Once the consumer is stopped: nothing handled twice, nothing pending, all stored."""
    tracker.check(what)
    left = await ctx.pending(streams)
    if left:
        raise VerificationError(f"{what}: {left:,} entries pending after the consumer stopped")
    stored = 0
    for stream in streams:
        stored += await ctx.checker.xlen(stream)
    if stored < tracker.n:
        raise VerificationError(f"{what}: streams hold {stored:,} entries, expected {tracker.n:,}")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _stop_task(task: asyncio.Task[Any], stop: asyncio.Event) -> None:
    """Ask a consumer loop to stop (it notices within one BLOCK), cancel if it hangs."""
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=2 * BLOCK_MS / 1000 + 1)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- raw: redis-py, the baseline ---------------------------------------------------------


async def build_raw(ctx: Ctx) -> Impl:
    from redis.asyncio import Redis

    client = Redis.from_url(ctx.url)
    await client.ping()

    async def on_viewed(event: dict[str, Any], tracker: Tracker) -> None:
        tracker.hit(event["seq"])

    async def get_user(query: dict[str, Any]) -> int:
        return ANSWER

    async def consume(stream: str, tracker: Tracker, stop: asyncio.Event) -> None:
        while not stop.is_set():
            reply = await client.xreadgroup(
                GROUP, "c1", {stream: ">"}, count=READ_COUNT, block=BLOCK_MS
            )
            for _name, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    await on_viewed(json.loads(fields[b"d"]), tracker)
                    ids.append(entry_id)
                if ids:
                    await client.xack(stream, GROUP, *ids)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        stream = ctx.key("raw", "events")
        try:
            await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
            tracker, stop = Tracker(n), asyncio.Event()
            consumer = asyncio.create_task(consume(stream, tracker, stop))

            async def publish(seq: int) -> None:
                await client.xadd(stream, {"d": json.dumps(event_fields(seq))})

            try:
                start = time.perf_counter()
                await pump(n, in_flight, publish)
                published = time.perf_counter()

                async def streams() -> list[str]:
                    return [stream]

                end = await finish(ctx, tracker, streams, "raw")
            finally:
                await _stop_task(consumer, stop)
            await verify_after(ctx, tracker, [stream], "raw")
            return ThroughputStats(n, end - start, published - start)
        finally:
            await ctx.checker.delete(stream)

    async def respond(stream: str, stop: asyncio.Event, send: Callable[..., Any]) -> None:
        while not stop.is_set():
            reply = await client.xreadgroup(
                GROUP, "r1", {stream: ">"}, count=READ_COUNT, block=BLOCK_MS
            )
            for _name, entries in reply or ():
                pipe = client.pipeline(transaction=False)
                ids = []
                for entry_id, fields in entries:
                    result = await get_user(json.loads(fields[b"d"]))
                    body = json.dumps({"corr": _text(fields[b"corr"]), "result": result})
                    send(pipe, fields[b"reply"], body)
                    ids.append(entry_id)
                pipe.xack(stream, GROUP, *ids)
                await pipe.execute()

    async def latency(n: int) -> list[float]:
        stream = ctx.key("raw", "requests")
        reply_key = ctx.key("raw", "replies")
        query = json.dumps({"user_id": 1})
        pubsub = None
        try:
            await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
            stop = asyncio.Event()
            if ctx.raw_reply == "pubsub":
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(reply_key)

                def send(pipe: Any, to: bytes, body: str) -> None:
                    pipe.publish(to, body)

                async def receive() -> bytes | None:
                    deadline = time.perf_counter() + REPLY_TIMEOUT
                    while (left := deadline - time.perf_counter()) > 0:
                        msg = await pubsub.get_message(timeout=left)
                        if msg is not None and msg["type"] == "message":
                            return msg["data"]
                    return None

            else:

                def send(pipe: Any, to: bytes, body: str) -> None:
                    pipe.lpush(to, body)

                async def receive() -> bytes | None:
                    got = await client.blpop([reply_key], timeout=REPLY_TIMEOUT)
                    return None if got is None else got[1]

            responder = asyncio.create_task(respond(stream, stop, send))
            samples: list[float] = []
            try:
                for i in range(n):
                    corr = str(i)
                    t0 = time.perf_counter()
                    await client.xadd(stream, {"d": query, "corr": corr, "reply": reply_key})
                    body = await receive()
                    t1 = time.perf_counter()
                    if body is None:
                        raise VerificationError(
                            f"raw: request {i} got no reply in {REPLY_TIMEOUT} s"
                        )
                    answer = json.loads(body)
                    if answer != {"corr": corr, "result": ANSWER}:
                        raise VerificationError(f"raw: request {i} got {answer!r}")
                    samples.append(t1 - t0)
            finally:
                await _stop_task(responder, stop)
            if left := await ctx.pending([stream]):
                raise VerificationError(f"raw: {left} requests not acked")
            return samples
        finally:
            if pubsub is not None:
                await pubsub.aclose()
            await ctx.checker.delete(stream, reply_key)

    async def close() -> None:
        await client.aclose()

    reply_how = (
        "the requester is subscribed once to its own pub/sub channel, the responder PUBLISHes"
        if ctx.raw_reply == "pubsub"
        else "the requester BLPOPs its own list, the responder LPUSHes"
    )
    return Impl(
        name="raw",
        version=_version("redis"),
        throughput=throughput,
        latency=latency,
        close=close,
        notes=[
            "raw: one `redis.asyncio.Redis.from_url(url)` client (its connection pool; "
            "concurrent commands use separate pooled connections). Throughput: producer XADDs "
            "`{d: json}` with a sliding window of tasks; the consumer task loops XREADGROUP "
            f"COUNT {READ_COUNT} BLOCK {BLOCK_MS}, `json.loads` + `await handler(dict)` per "
            "entry, then one XACK for the batch. Request/reply: XADD `{d, corr, reply}`; the "
            "responder task XREADGROUPs, calls the handler and sends the reply and the XACK "
            f"in one pipelined round trip; reply channel: {reply_how}."
        ],
    )


# -- FastStream ---------------------------------------------------------------------------


async def build_faststream(ctx: Ctx) -> Impl:
    from faststream.redis import RedisBroker, StreamSub

    version = _version("faststream")

    def make_broker() -> Any:
        # logger=None: FastStream otherwise logs two INFO lines per message.
        return RedisBroker(ctx.url, logger=None)

    def stream_sub(stream: str, consumer: str) -> Any:
        return StreamSub(
            stream,
            group=GROUP,
            consumer=consumer,
            max_records=READ_COUNT,
            polling_interval=BLOCK_MS,
        )

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        stream = ctx.key("faststream", "events")
        tracker = Tracker(n)
        broker = make_broker()

        @broker.subscriber(stream=stream_sub(stream, "c1"))
        async def on_viewed(event: PageViewed) -> None:
            tracker.hit(event.seq)

        publisher = broker.publisher(stream=stream)
        try:
            await asyncio.wait_for(broker.start(), 10)
            try:

                async def publish(seq: int) -> None:
                    await publisher.publish(event_fields(seq))

                start = time.perf_counter()
                await pump(n, in_flight, publish)
                published = time.perf_counter()

                async def streams() -> list[str]:
                    return [stream]

                end = await finish(ctx, tracker, streams, "faststream")
            finally:
                await broker.stop()
            await verify_after(ctx, tracker, [stream], "faststream")
            return ThroughputStats(n, end - start, published - start)
        finally:
            await ctx.checker.delete(stream)

    async def latency(n: int) -> list[float]:
        stream = ctx.key("faststream", "requests")
        broker = make_broker()

        @broker.subscriber(stream=stream_sub(stream, "r1"))
        async def get_user(query: GetUser) -> int:
            return ANSWER

        query = {"user_id": 1}
        samples: list[float] = []
        try:
            await asyncio.wait_for(broker.start(), 10)
            try:
                for i in range(n):
                    t0 = time.perf_counter()
                    response = await broker.request(query, stream=stream, timeout=REPLY_TIMEOUT)
                    result = await response.decode()
                    t1 = time.perf_counter()
                    if result != ANSWER:
                        raise VerificationError(f"faststream: request {i} got {result!r}")
                    samples.append(t1 - t0)
            finally:
                await broker.stop()
            if left := await ctx.pending([stream]):
                raise VerificationError(f"faststream: {left} requests not acked")
            return samples
        finally:
            await ctx.checker.delete(stream)

    return Impl(
        name="faststream",
        version=version,
        throughput=throughput,
        latency=latency,
        notes=[
            "faststream: `RedisBroker(url, logger=None)` (a fresh broker per measurement, "
            "started before the clock), `@broker.subscriber(stream=StreamSub(name, group, "
            f"consumer, max_records={READ_COUNT}, polling_interval={BLOCK_MS}))` with the "
            "handler's argument annotated as the `PageViewed` / `GetUser` dataclass "
            "(FastDepends validates it), default ack policy (XACK per message after the "
            "handler), one worker (default `max_workers`); events sent with "
            "`broker.publisher(stream=...).publish(dict)`; request/reply with "
            "`await broker.request(dict, stream=..., timeout=2)` + `await response.decode()`: "
            "per request FastStream SUBSCRIBEs a fresh pub/sub channel, XADDs, waits for the "
            "handler's return value PUBLISHed there, then UNSUBSCRIBEs."
        ],
    )


# -- iambus: this repository (its Redis transport is being written) ------------------------


def import_ours() -> Any:
    """Import this repository's iambus, preferring the working tree's src/."""
    src = ROOT / "src"
    if (src / "iambus").is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import iambus

    if not hasattr(iambus, "Dispatcher"):
        raise ImportError(f"iambus at {getattr(iambus, '__file__', '?')} has no Dispatcher")
    return iambus


async def build_iambus(ctx: Ctx) -> Impl:
    iambus = import_ours()
    version = getattr(iambus, "__version__", None) or _version("iambus")

    def make_dispatcher(namespace: str, tracker: Tracker | None) -> Any:
        separator = "&" if "?" in ctx.url else "?"
        dp = iambus.Dispatcher(
            # the namespace is a transport setting: a URL parameter, like max_connections
            transport=f"{ctx.url}{separator}namespace={namespace}",
            service="bench",
            routes={PageViewed: "bench", GetUser: "bench"},
        )

        @dp.events.register(PageViewed)
        async def on_viewed(event: PageViewed) -> None:
            if tracker is not None:
                tracker.hit(event.seq)

        @dp.queries.register(GetUser)
        async def get_user(query: GetUser) -> int:
            return ANSWER

        return dp

    # Fail at build time (not in the middle of a timed round) if the API is not there.
    make_dispatcher(ctx.namespace("probe"), None)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        namespace = ctx.namespace("tp")
        pattern = f"*{namespace}*"
        tracker = Tracker(n)
        try:
            dp = make_dispatcher(namespace, tracker)
            async with dp:

                async def publish(seq: int) -> None:
                    await dp.publish(PageViewed(**event_fields(seq)))

                start = time.perf_counter()
                await pump(n, in_flight, publish)
                published = time.perf_counter()

                async def streams() -> list[str]:
                    return await ctx.streams_matching(pattern)

                end = await finish(ctx, tracker, streams, "iambus")
            await verify_after(ctx, tracker, await ctx.streams_matching(pattern), "iambus")
            return ThroughputStats(n, end - start, published - start)
        finally:
            await ctx.delete_matching(pattern)

    async def latency(n: int) -> list[float]:
        namespace = ctx.namespace("rr")
        pattern = f"*{namespace}*"
        query = GetUser(1)
        samples: list[float] = []
        try:
            dp = make_dispatcher(namespace, None)
            async with dp:
                for i in range(n):
                    t0 = time.perf_counter()
                    result = await dp.query(query, timeout=REPLY_TIMEOUT)
                    t1 = time.perf_counter()
                    if result != ANSWER:
                        raise VerificationError(f"iambus: request {i} got {result!r}")
                    samples.append(t1 - t0)
            if left := await ctx.pending(await ctx.streams_matching(pattern)):
                raise VerificationError(f"iambus: {left} requests not acked")
            return samples
        finally:
            await ctx.delete_matching(pattern)

    return Impl(
        name="iambus",
        version=str(version),
        throughput=throughput,
        latency=latency,
        notes=[
            "iambus: `Dispatcher(transport=url, service='bench', routes={PageViewed: 'bench', "
            "GetUser: 'bench'}, namespace=...)` (a fresh dispatcher per measurement, entered "
            "with `async with` before the clock); `await dp.publish(PageViewed(...))` with the "
            "same sliding window, `await dp.query(GetUser(1), timeout=2)`. Acks are checked on "
            "every stream whose name contains the namespace."
        ],
    )


def version_of(name: str) -> str:
    """The installed version behind an implementation, for the header."""
    if name == "iambus":
        try:
            iambus = import_ours()
        except Exception:
            return _version("iambus")
        return str(getattr(iambus, "__version__", None) or _version("iambus"))
    return _version({"raw": "redis"}.get(name, name))


BUILDERS: list[tuple[str, Callable[[Ctx], Awaitable[Impl]]]] = [
    ("raw", build_raw),
    ("faststream", build_faststream),
    ("iambus", build_iambus),
]
