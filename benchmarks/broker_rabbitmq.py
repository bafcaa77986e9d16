"""RabbitMQ for benchmarks/broker.py: raw aio-pika, FastStream's RabbitMQ broker, iambus.

See broker_common.py for what a builder returns and what every run verifies.

Checks are broker-side: AMQP cannot list queues nor count unacked deliveries, so
the harness asks ``rabbitmqctl list_queues`` (set ``RABBITMQCTL`` to another
command, e.g. ``"docker exec rmq rabbitmqctl"``). A throughput run is timed
until its last event was handled; then, while the consumer still runs, every
queue of the run must come to 0 ready and 0 unacked messages (so every delivery
was acked, not requeued), and once the consumer has stopped, still nothing may
be there (a delivery left unacked would be back as ready) and iambus's
dead-letter stream must be empty. Every reply is checked; request queues must be
empty and fully acked after the responder stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    poll_until,
    stop_task,
    timed_publish,
    timed_requests,
    version,
)

TITLE = "RabbitMQ"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
CLIENT = "aio-pika"  # the distribution of the raw client, for the header
PREFETCH = BATCH
ACK_EVERY = BATCH // 2  # raw: ack (multiple=True) at least every this many deliveries
PERSISTENT = 2
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

VERIFIED = (
    "each event handled exactly once (by sequence number); every queue of the run at 0 ready "
    "and 0 unacked while the consumer still runs, and again after it stopped (`rabbitmqctl "
    "list_queues`); iambus's dead-letter stream empty; every reply is checked."
)


# -- run context and checks --------------------------------------------------------------


@dataclass
class Ctx:
    url: str
    suffix: str
    queue_type: str  # every column's queues: "classic" or "quorum" (iambus: ?queue_type=)
    connection: Any  # aio_pika connection of the harness' checks and clean-up
    channel: Any
    ctl: list[str]
    _counter: int = 0
    server: dict[str, Any] = field(default_factory=dict)

    def name(self, *parts: str) -> str:
        """A fresh queue name: iambus-bench.<suffix>.<parts>.<counter>."""
        self._counter += 1
        return ".".join(("iambus-bench", self.suffix, *parts, str(self._counter)))

    def namespace(self, what: str) -> str:
        self._counter += 1
        return f"bench-{self.suffix}-{what}{self._counter}"

    def iambus_url(self, namespace: str) -> str:
        joint = "&" if "?" in self.url else "?"
        return f"{self.url}{joint}namespace={namespace}&queue_type={self.queue_type}"

    @property
    def queue_arguments(self) -> dict[str, Any] | None:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None

    async def _ctl(self, *args: str) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            *self.ctl,
            "-q",
            "--formatter",
            "json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(self.ctl)} {' '.join(args)}: {err.decode().strip()}")
        return json.loads(out or b"[]")

    async def queues(self, scope: str) -> list[dict[str, Any]]:
        rows = await self._ctl(
            "list_queues", "name", "type", "messages_ready", "messages_unacknowledged", "messages"
        )
        return [row for row in rows if scope in row["name"]]

    async def _complaint(self, scope: str) -> str | None:
        """What is not settled in the scope's queues, or None."""
        problems = []
        for q in await self.queues(scope):
            if q["type"] == "stream":  # iambus's dead letters: records, never consumed
                if q["name"].endswith(".registry"):
                    continue  # the registry of live workers, not dead letters
                if q["messages"]:
                    problems.append(f"{q['name']} holds {q['messages']} dead letter(s)")
            elif q["messages_ready"] or q["messages_unacknowledged"]:
                problems.append(
                    f"{q['name']}: {q['messages_ready']} ready, "
                    f"{q['messages_unacknowledged']} unacked"
                )
        return "; ".join(problems) or None

    async def _settled(self, scope: str, what: str, when: str) -> None:
        if not await self.queues(scope):
            raise VerificationError(f"{what}: found no queue holding {scope!r} to check")
        complaint = await poll_until(lambda: self._complaint(scope), STALL_SECONDS, 0.05)
        if complaint is not None:
            raise VerificationError(f"{what}: {when}: {complaint}")

    # The Checks protocol (broker_common), by scope: every queue whose name holds it.

    async def finish(self, tracker: Tracker, scope: str, what: str) -> float:
        await tracker.wait(what)
        end = time.perf_counter()
        await self._settled(scope, what, "with the consumer running")
        return end

    async def verify_after(self, tracker: Tracker, scope: str, what: str) -> None:
        tracker.check(what)
        await self._settled(scope, what, "after the consumer stopped")

    async def verify_requests(self, scope: str, what: str) -> None:
        await self._settled(scope, what, "requests after the responder stopped")

    async def cleanup(self, scope: str) -> int:
        deleted = 0
        for q in await self.queues(scope):
            await self.channel.queue_delete(q["name"])
            deleted += 1
        for x in await self._ctl("list_exchanges", "name"):
            if scope in x["name"]:
                await self.channel.exchange_delete(x["name"])
                deleted += 1
        return deleted


def _rabbitmqctl() -> list[str]:
    if command := os.environ.get("RABBITMQCTL"):
        return shlex.split(command)
    found = shutil.which("rabbitmqctl") or next(
        (
            p
            for p in ("/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if found is None:
        raise RuntimeError(
            "the RabbitMQ checks need rabbitmqctl (AMQP cannot count unacked deliveries): "
            "put it on PATH or set RABBITMQCTL"
        )
    return [found]


async def open_ctx(url: str, suffix: str, options: Any) -> Ctx:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    ctx = Ctx(
        url=url,
        suffix=suffix,
        queue_type=options.amqp_queue,
        connection=connection,
        channel=channel,
        ctl=_rabbitmqctl(),
    )
    await ctx._ctl("list_queues", "name")  # fail now if rabbitmqctl cannot reach the node
    ctx.server = dict(connection.transport.connection.server_properties)
    return ctx


async def close_ctx(ctx: Ctx) -> None:
    await ctx.connection.close()


async def environment(ctx: Ctx) -> list[str]:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    server = f"RabbitMQ {text(ctx.server.get('version', '?'))}"
    if erlang := ctx.server.get("platform"):
        server += f" ({text(erlang)})"
    return [
        f"- {server} at {_redact(ctx.url)}; aio-pika {version('aio-pika')}, "
        f"aiormq {version('aiormq')}, pamqp {version('pamqp')} (raw, faststream and iambus "
        "all drive aio-pika)",
        f"- queues: durable {ctx.queue_type} queues in every column (iambus: "
        f"`?queue_type={ctx.queue_type}` for its groups' queues; its own default is quorum)",
    ]


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


# -- raw: aio-pika, the baseline -----------------------------------------------------------


async def build_raw(ctx: Ctx) -> Impl:
    import aio_pika

    connection = await aio_pika.connect(ctx.url)

    async def on_viewed(event: dict[str, Any], tracker: Tracker) -> None:
        tracker.hit(event["seq"])

    async def get_user(query: dict[str, Any]) -> int:
        return ANSWER

    async def consume(inbox: asyncio.Queue[Any], tracker: Tracker, stop: asyncio.Event) -> None:
        # Handle what has arrived (up to the prefetch), then one ack(multiple=True) for it.
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(inbox.get(), 0.1)
            except TimeoutError:
                continue
            message, since_ack = first, 0
            while True:
                await on_viewed(json.loads(message.body), tracker)
                since_ack += 1
                if inbox.empty() or since_ack >= ACK_EVERY:
                    await message.ack(multiple=True)
                    since_ack = 0
                if inbox.empty():
                    break
                message = inbox.get_nowait()

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        name = ctx.name("raw", "events")
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        try:
            await consumer.set_qos(prefetch_count=PREFETCH)
            queue = await consumer.declare_queue(name, durable=True, arguments=ctx.queue_arguments)
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            tracker, stop = Tracker(n), asyncio.Event()

            async def deliver(message: Any) -> None:
                inbox.put_nowait(message)

            tag = await queue.consume(deliver, no_ack=False)
            task = asyncio.create_task(consume(inbox, tracker, stop))
            exchange = publisher.default_exchange

            async def publish(seq: int) -> None:
                body = json.dumps(event_fields(seq)).encode()
                message = aio_pika.Message(
                    body, delivery_mode=PERSISTENT, content_type="application/json"
                )
                await exchange.publish(message, routing_key=name)  # waits for the confirm

            try:
                stats = await timed_publish(ctx, tracker, name, "raw", n, in_flight, publish)
            finally:
                await stop_task(task, stop)
                await queue.cancel(tag)
                await consumer.close()
            await ctx.verify_after(tracker, name, "raw")
            return stats
        finally:
            await publisher.close()
            if not consumer.is_closed:
                await consumer.close()
            await ctx.cleanup(name)

    async def latency(n: int) -> list[float]:
        name = ctx.name("raw", "requests")
        requester = await connection.channel(publisher_confirms=True)
        responder = await connection.channel(publisher_confirms=False)
        try:
            await responder.set_qos(prefetch_count=PREFETCH)
            queue = await responder.declare_queue(name, durable=True, arguments=ctx.queue_arguments)
            replies = responder.default_exchange

            async def respond(message: Any) -> None:
                result = await get_user(json.loads(message.body))
                body = json.dumps({"result": result}).encode()
                await replies.publish(
                    aio_pika.Message(body, correlation_id=message.correlation_id),
                    routing_key=message.reply_to,
                    mandatory=False,
                )
                await message.ack()

            serving = await queue.consume(respond, no_ack=False)

            waiting: dict[str, asyncio.Future[bytes]] = {}

            async def on_reply(message: Any) -> None:
                future = waiting.pop(message.correlation_id or "", None)
                if future is not None and not future.done():
                    future.set_result(message.body)

            reply_queue = await requester.get_queue(DIRECT_REPLY_TO, ensure=False)
            await reply_queue.consume(on_reply, no_ack=True)
            exchange = requester.default_exchange
            body = json.dumps({"user_id": 1}).encode()
            loop = asyncio.get_running_loop()
            samples: list[float] = []
            try:
                for i in range(n):
                    corr = str(i)
                    t0 = time.perf_counter()
                    future = waiting[corr] = loop.create_future()
                    await exchange.publish(
                        aio_pika.Message(
                            body,
                            correlation_id=corr,
                            reply_to=DIRECT_REPLY_TO,
                            delivery_mode=PERSISTENT,
                            content_type="application/json",
                        ),
                        routing_key=name,
                    )
                    try:
                        answer = json.loads(await asyncio.wait_for(future, REPLY_TIMEOUT))
                    except TimeoutError:
                        raise VerificationError(
                            f"raw: request {i} got no reply in {REPLY_TIMEOUT} s"
                        ) from None
                    t1 = time.perf_counter()
                    if answer != {"result": ANSWER}:
                        raise VerificationError(f"raw: request {i} got {answer!r}")
                    samples.append(t1 - t0)
            finally:
                await queue.cancel(serving)
            await ctx.verify_requests(name, "raw")
            return samples
        finally:
            await requester.close()
            await responder.close()
            await ctx.cleanup(name)

    async def close() -> None:
        await connection.close()

    return Impl(
        name="raw",
        version=version("aio-pika"),
        throughput=throughput,
        latency=latency,
        close=close,
        notes=[
            "raw: one `aio_pika.connect(url)` connection; a channel per role. Throughput: "
            "the producer publishes persistent JSON messages to a durable queue through the "
            "default exchange on a channel with publisher confirms (each publish awaits its "
            "confirm), with a sliding window of tasks; the consumer channel has prefetch "
            f"{PREFETCH} and manual acks; deliveries go to an asyncio.Queue, a consumer task "
            "runs `json.loads` + `await handler(dict)` on what has arrived and acks it with "
            f"one `ack(multiple=True)` (at least every {ACK_EVERY}). Request/reply: a "
            "persistent request to a durable queue with a confirm and `reply_to` = direct "
            "reply-to, the responder (prefetch 100, manual ack after replying) publishes the "
            "reply to the default exchange without confirm; replies matched by correlation id."
        ],
    )


# -- FastStream ---------------------------------------------------------------------------


async def build_faststream(ctx: Ctx) -> Impl:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    def make_broker() -> Any:
        # logger=None: FastStream otherwise logs two INFO lines per message.
        return RabbitBroker(ctx.url, logger=None, default_channel=Channel(prefetch_count=PREFETCH))

    def queue_of(name: str) -> Any:
        return RabbitQueue(name, durable=True, arguments=ctx.queue_arguments)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        name = ctx.name("faststream", "events")
        tracker = Tracker(n)
        broker = make_broker()

        @broker.subscriber(queue_of(name))
        async def on_viewed(event: PageViewed) -> None:
            tracker.hit(event.seq)

        publisher = broker.publisher(queue_of(name), persist=True)
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
        name = ctx.name("faststream", "requests")
        broker = make_broker()

        @broker.subscriber(queue_of(name))
        async def get_user(query: GetUser) -> int:
            return ANSWER

        query = {"user_id": 1}
        samples: list[float] = []
        try:
            await asyncio.wait_for(broker.start(), 10)
            try:

                async def ask() -> Any:
                    response = await broker.request(
                        query, queue=name, timeout=REPLY_TIMEOUT, persist=True
                    )
                    result = await response.decode()
                    return result

                samples.extend(await timed_requests(n, "faststream", ask))
            finally:
                await broker.stop()
            await ctx.verify_requests(name, "faststream")
            return samples
        finally:
            await ctx.cleanup(name)

    return Impl(
        name="faststream",
        version=version("faststream"),
        throughput=throughput,
        latency=latency,
        notes=[
            "faststream: `RabbitBroker(url, logger=None, default_channel=Channel("
            f"prefetch_count={PREFETCH}))` (publisher confirms on, its default; a fresh broker "
            "per measurement, started before the clock), `@broker.subscriber(RabbitQueue(name, "
            "durable=True))` with the handler's argument annotated as the `PageViewed` / "
            "`GetUser` dataclass, default ack policy (one ack per message after the handler); "
            "events sent with `broker.publisher(queue, persist=True).publish(dict)`; "
            "request/reply with `await broker.request(dict, queue=..., timeout=2, persist=True)` "
            "+ `await response.decode()` (direct reply-to)."
        ],
    )


BUILDERS: list[tuple[str, Callable[[Ctx], Awaitable[Impl]]]] = [
    ("raw", build_raw),
    ("faststream", build_faststream),
    ("iambus", build_iambus),
    ("iambus-keyed", build_iambus_keyed),
]
