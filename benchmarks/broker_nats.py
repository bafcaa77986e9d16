"""NATS JetStream for benchmarks/broker.py: raw nats-py, FastStream's NATS broker, iambus.

See broker_common.py for what a builder returns and what every run verifies.

Checks read JetStream's own counters: a throughput run ends when every event was
handled *and* every consumer on the run's streams shows nothing pending and
nothing awaiting an ack (``num_pending``, ``num_ack_pending``); after the
consumer stopped that must still hold, the streams must store every event, and
iambus's dead-letter stream must be empty. Raw and FastStream request/reply go
over core NATS (nothing to ack); iambus sends requests through its stream, so
its request consumer must end with nothing pending or unacked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker_common import (
    ANSWER,
    BATCH,
    REPLY_TIMEOUT,
    STALL_SECONDS,
    FreshNames,
    GetUser,
    Impl,
    PageViewed,
    SettledChecks,
    ThroughputStats,
    Tracker,
    VerificationError,
    build_iambus,
    build_iambus_keyed,
    event_fields,
    poll_until,
    stop_task,
    timed_publish,
    timed_requests,
    version,
)

TITLE = "NATS JetStream"
DEFAULT_URL = "nats://127.0.0.1:4222"
CLIENT = "nats-py"  # the distribution of the raw client, for the header
FETCH_TIMEOUT = 0.1  # seconds a pull waits when the stream has nothing for it

VERIFIED = (
    "each event handled exactly once (by sequence number); every consumer on the run's "
    "streams at 0 pending and 0 awaiting ack, before and after the consumer stopped, every "
    "event stored, iambus's dead-letter stream empty; every reply is checked."
)


# -- run context and checks --------------------------------------------------------------


@dataclass
class Ctx(FreshNames, SettledChecks):
    url: str
    suffix: str
    nc: Any  # nats.aio.client.Client of the harness' checks and clean-up
    js: Any
    _counter: int = 0

    def iambus_url(self, namespace: str) -> str:
        return f"{self.url}{'&' if '?' in self.url else '?'}namespace={namespace}"

    async def streams(self, scope: str) -> list[Any]:
        return [s for s in await self.js.streams_info() if scope in s.config.name]

    async def _complaint(self, scope: str, need_consumer: bool) -> str | None:
        problems, consumers = [], 0
        for stream in await self.streams(scope):
            name = stream.config.name
            if _dead_letters(name):
                if stream.state.messages:
                    problems.append(f"{name} holds {stream.state.messages} dead letter(s)")
                continue
            for info in await self.js.consumers_info(name):
                consumers += 1
                if info.num_pending or info.num_ack_pending:
                    problems.append(
                        f"{name}/{info.name}: {info.num_pending} not delivered, "
                        f"{info.num_ack_pending} not acked"
                    )
        if need_consumer and not consumers:
            problems.append(f"found no consumer on a stream holding {scope!r}")
        return "; ".join(problems) or None

    # The Checks protocol (broker_common), by scope: every stream whose name holds it.

    async def settled(self, scope: str, what: str, when: str, need_consumer: bool) -> None:
        complaint = await poll_until(
            lambda: self._complaint(scope, need_consumer), STALL_SECONDS, 0.0002
        )
        if complaint is not None:
            raise VerificationError(f"{what}: {when}: {complaint}")

    async def stored(self, scope: str) -> int:
        return sum(
            s.state.messages for s in await self.streams(scope) if not _dead_letters(s.config.name)
        )

    async def cleanup(self, scope: str) -> int:
        streams = await self.streams(scope)
        for stream in streams:
            await self.js.delete_stream(stream.config.name)
        return len(streams)


async def open_ctx(url: str, suffix: str, options: Any) -> Ctx:
    import nats

    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    js = nc.jetstream()
    await js.account_info()  # fail now if JetStream is not enabled
    return Ctx(url=url, suffix=suffix, nc=nc, js=js)


async def close_ctx(ctx: Ctx) -> None:
    await ctx.nc.close()


async def environment(ctx: Ctx) -> list[str]:
    info = ctx.nc._server_info  # what the server sent on connect
    return [
        f"- nats-server {info.get('version', '?')} (JetStream, file storage) at {ctx.url}; "
        f"nats-py {version('nats-py')} (raw, faststream and iambus all drive nats-py)",
    ]


# -- raw: nats-py, the baseline ------------------------------------------------------------


async def build_raw(ctx: Ctx) -> Impl:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType

    nc = await nats.connect(ctx.url)
    js = nc.jetstream()

    async def on_viewed(event: dict[str, Any], tracker: Tracker) -> None:
        tracker.hit(event["seq"])

    async def get_user(query: dict[str, Any]) -> int:
        return ANSWER

    async def consume(psub: Any, tracker: Tracker, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                messages = await psub.fetch(BATCH, timeout=FETCH_TIMEOUT)
            except TimeoutError:
                continue
            for message in messages:
                await on_viewed(json.loads(message.data), tracker)
                await message.ack()

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        stream = ctx.name("raw-tp")
        subject = f"{stream}.events"
        try:
            await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE)
            psub = await js.pull_subscribe(
                subject,
                durable="c1",
                stream=stream,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
            )
            tracker, stop = Tracker(n), asyncio.Event()
            task = asyncio.create_task(consume(psub, tracker, stop))

            async def publish(seq: int) -> None:
                await js.publish(subject, json.dumps(event_fields(seq)).encode())  # PubAck

            try:
                stats = await timed_publish(ctx, tracker, stream, "raw", n, in_flight, publish)
            finally:
                await stop_task(task, stop, grace=FETCH_TIMEOUT + 2)
                await psub.unsubscribe()
            await ctx.verify_after(tracker, stream, "raw")
            return stats
        finally:
            await ctx.cleanup(stream)

    async def latency(n: int) -> list[float]:
        subject = f"{ctx.name('raw-rr')}.requests"

        async def respond(message: Any) -> None:
            result = await get_user(json.loads(message.data))
            await message.respond(json.dumps({"result": result}).encode())

        sub = await nc.subscribe(subject, cb=respond)
        body = json.dumps({"user_id": 1}).encode()
        samples: list[float] = []
        try:
            for i in range(n):
                t0 = time.perf_counter()
                try:
                    reply = await nc.request(subject, body, timeout=REPLY_TIMEOUT)
                except TimeoutError:
                    raise VerificationError(
                        f"raw: request {i} got no reply in {REPLY_TIMEOUT} s"
                    ) from None
                t1 = time.perf_counter()
                answer = json.loads(reply.data)
                if answer != {"result": ANSWER}:
                    raise VerificationError(f"raw: request {i} got {answer!r}")
                samples.append(t1 - t0)
        finally:
            await sub.unsubscribe()
        return samples

    async def close() -> None:
        await nc.close()

    return Impl(
        name="raw",
        version=version("nats-py"),
        throughput=throughput,
        latency=latency,
        close=close,
        notes=[
            "raw: one `nats.connect(url)` client. Throughput: a stream (file storage) per "
            "measurement; the producer calls `await js.publish(subject, json)` (awaits the "
            "PubAck) with a sliding window of tasks; a durable pull consumer (explicit acks) "
            f"loops `fetch({BATCH}, timeout={FETCH_TIMEOUT})`, `json.loads` + "
            "`await handler(dict)` + `await msg.ack()` per message. Request/reply: core NATS, "
            "`await nc.request(subject, json, timeout=2)`; the responder is a plain "
            "subscription calling `msg.respond(json)`."
        ],
    )


# -- FastStream ---------------------------------------------------------------------------


async def build_faststream(ctx: Ctx) -> Impl:
    from faststream.nats import JStream, NatsBroker, PullSub

    def make_broker() -> Any:
        # logger=None: FastStream otherwise logs two INFO lines per message.
        return NatsBroker(ctx.url, logger=None)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        name = ctx.name("faststream-tp")
        subject = f"{name}.events"
        stream = JStream(name, subjects=[subject])
        tracker = Tracker(n)
        broker = make_broker()

        @broker.subscriber(
            subject,
            stream=stream,
            durable="c1",
            pull_sub=PullSub(batch_size=BATCH, timeout=FETCH_TIMEOUT),
        )
        async def on_viewed(event: PageViewed) -> None:
            tracker.hit(event.seq)

        publisher = broker.publisher(subject, stream=stream)
        try:
            await asyncio.wait_for(broker.start(), 10)
            try:

                async def publish(seq: int) -> None:
                    await publisher.publish(event_fields(seq))

                stats = await timed_publish(ctx, tracker, name, "faststream", n, in_flight, publish)
            finally:
                await broker.stop()
            await ctx.verify_after(tracker, name, "faststream")
            return stats
        finally:
            await ctx.cleanup(name)

    async def latency(n: int) -> list[float]:
        subject = f"{ctx.name('faststream-rr')}.requests"
        broker = make_broker()

        @broker.subscriber(subject)
        async def get_user(query: GetUser) -> int:
            return ANSWER

        query = {"user_id": 1}
        samples: list[float] = []
        await asyncio.wait_for(broker.start(), 10)
        try:

            async def ask() -> Any:
                response = await broker.request(query, subject, timeout=REPLY_TIMEOUT)
                result = await response.decode()
                return result

            samples.extend(await timed_requests(n, "faststream", ask))
        finally:
            await broker.stop()
        return samples

    return Impl(
        name="faststream",
        version=version("faststream"),
        throughput=throughput,
        latency=latency,
        notes=[
            "faststream: `NatsBroker(url, logger=None)` (a fresh broker per measurement, "
            "started before the clock); `@broker.subscriber(subject, stream=JStream(name, "
            f"subjects=[subject]), durable='c1', pull_sub=PullSub(batch_size={BATCH}, "
            f"timeout={FETCH_TIMEOUT}))` with the handler's argument annotated as the "
            "`PageViewed` dataclass, default ack policy (one ack per message after the "
            "handler); events sent with `broker.publisher(subject, stream=stream).publish(dict)` "
            "(a JetStream publish awaiting its PubAck); request/reply over core NATS: a plain "
            "`@broker.subscriber(subject)` returning the answer and `await broker.request(dict, "
            "subject, timeout=2)` + `await response.decode()`."
        ],
    )


BUILDERS: list[tuple[str, Callable[[Ctx], Awaitable[Impl]]]] = [
    ("raw", build_raw),
    ("faststream", build_faststream),
    ("iambus", build_iambus),
    ("iambus-keyed", build_iambus_keyed),
]


def _dead_letters(stream: str) -> bool:
    """Whether ``stream`` is an iambus dead-letter stream (``D_<namespace>``)."""
    return stream.startswith("D_")
