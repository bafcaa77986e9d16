"""Redis Streams for benchmarks/broker.py: raw redis-py, FastStream's Redis broker, iambus.

See broker_common.py for what a builder returns and what every run verifies.
Here the checks read the consumer groups: a throughput run ends when every event
was handled *and* no stream of its scope shows a pending entry (XINFO GROUPS),
and after the consumer stopped nothing may be pending and every entry must be
stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from broker_common import (
    ANSWER,
    BATCH,
    REPLY_TIMEOUT,
    STALL_SECONDS,
    GetUser,
    Impl,
    PageViewed,
    ThroughputStats,
    Tracker,
    VerificationError,
    build_iambus,
    build_iambus_keyed,
    event_fields,
    pump,
    stop_task,
    timed_requests,
    version,
)

TITLE = "Redis Streams"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
CLIENT = "redis"  # the distribution of the raw client, for the header
GROUP = "bench"
READ_COUNT = BATCH  # XREADGROUP COUNT for the consumers we configure
BLOCK_MS = 100  # XREADGROUP BLOCK for the consumers we configure

_version = version


def client_url(url: str, in_flight: int) -> str:
    """The URL every implementation connects with: the given one plus a pool size.

    redis-py (8.x) caps a connection pool at 100 connections by default and raises
    MaxConnectionsError past that instead of waiting; with 100 publishes in flight
    plus a blocking consumer read (and FastStream's per-request pub/sub) a client
    needs a few more.  Every implementation gets the same URL, so the same pool.
    """
    if "max_connections=" in url:
        return url
    size = max(128, in_flight + 28)
    return f"{url}{'&' if '?' in url else '?'}max_connections={size}"


# -- run context and checks -------------------------------------------------------------


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

    def iambus_url(self, namespace: str) -> str:
        # the namespace is a transport setting: a URL parameter, like max_connections
        return f"{self.url}{'&' if '?' in self.url else '?'}namespace={namespace}"

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

    # The Checks protocol (broker_common), by scope: every stream whose name holds it.

    async def finish(self, tracker: Tracker, scope: str, what: str) -> float:
        async def streams() -> list[str]:
            return await self.streams_matching(f"*{scope}*")

        return await finish(self, tracker, streams, what)

    async def verify_after(self, tracker: Tracker, scope: str, what: str) -> None:
        await verify_after(self, tracker, await self.streams_matching(f"*{scope}*"), what)

    async def verify_requests(self, scope: str, what: str) -> None:
        if left := await self.pending(await self.streams_matching(f"*{scope}*")):
            raise VerificationError(f"{what}: {left} requests not acked")

    async def cleanup(self, scope: str) -> int:
        return await self.delete_matching(f"*{scope}*")


async def open_ctx(url: str, suffix: str, options: Any) -> Ctx:
    from redis.asyncio import Redis

    checker = Redis.from_url(url)
    await checker.ping()
    return Ctx(
        url=client_url(url, options.in_flight),
        suffix=suffix,
        checker=checker,
        raw_reply=options.raw_reply,
    )


async def close_ctx(ctx: Ctx) -> None:
    await ctx.checker.aclose()


async def environment(ctx: Ctx) -> list[str]:
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    info = await ctx.checker.info("server")
    parser = "hiredis" if HIREDIS_AVAILABLE else "pure Python"
    return [
        f"- Redis {info.get('redis_version', '?')} at {ctx.url}; redis-py {redis.__version__}, "
        f"parser: {parser} (same client settings for all)",
    ]


VERIFIED = (
    "each event handled exactly once (by sequence number), no entry pending in any "
    "consumer group, all entries stored; every reply is checked."
)


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _stop_task(task: asyncio.Task[Any], stop: asyncio.Event) -> None:
    await stop_task(task, stop, grace=2 * BLOCK_MS / 1000 + 1)


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

                async def ask() -> Any:
                    response = await broker.request(query, stream=stream, timeout=REPLY_TIMEOUT)
                    result = await response.decode()
                    return result

                samples.extend(await timed_requests(n, "faststream", ask))
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


BUILDERS: list[tuple[str, Callable[[Ctx], Awaitable[Impl]]]] = [
    ("raw", build_raw),
    ("faststream", build_faststream),
    ("iambus", build_iambus),
    ("iambus-keyed", build_iambus_keyed),
]
