"""Kafka for benchmarks/broker.py: raw aiokafka, FastStream's Kafka broker, iambus.

See broker_common.py for what a builder returns and what every run verifies.

Checks read the brokers' own offsets: a throughput run ends when every event was
handled *and* every consumer group of the run's topics has committed, on every
partition, the partition's high watermark (nothing read and not committed);
after the consumer stopped that must still hold, and iambus's dead-letter topic
(``<namespace>-dead``) must be empty. The high watermark is read from a fetch
response, not from ListOffsets: Tansu 0.6.0 answers "latest" with the base
offset of the last batch, short of the end. (Tansu also lists consumer group
ids percent-encoded: they are decoded before their offsets are read.)

Topics are made here (a produce to a missing topic fails on Tansu) with
``PARTITIONS`` partitions and deleted when a measurement ends (each measurement
has its own producer: Tansu creates a topic a metadata request names, even a
deleted one, and a producer keeps asking for the topics it sent to); iambus
creates its own, told ``partitions=PARTITIONS`` in its URL. Every consumer
starts in a fresh consumer group, and each measurement first sends one priming
event and waits for it, so that the group's join is not on the clock. Producers
use ``acks=all`` without idempotence (Tansu refuses an idempotent producer).

There is no request/reply column: Kafka has no reply channel of its own, and
iambus's Kafka transport does not answer queries yet.

A second scenario, ``keyed_slow``: a handler that waits 1 ms, events keyed over
``KEYS`` keys in ``PARTITIONS`` partitions, each key's order checked; it times the
consumer alone: every event is sent while the handlers wait at a gate, and the
clock runs from the gate's opening until all are handled and committed. Raw
aiokafka runs a task per partition, each handling its records in order and
committing them per batch; FastStream runs its in-order concurrent consumer (``max_workers=4``
with ``AckPolicy.ACK``: one consumer per worker in the group, each handling its
partitions one message at a time and committing after each); iambus-keyed runs
keys concurrently within a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from broker_common import (
    BATCH,
    KEYS,
    SLOW_HANDLER,
    STALL_SECONDS,
    FreshNames,
    Impl,
    KeyOrder,
    PageViewed,
    SettledChecks,
    ThroughputStats,
    Tracker,
    Unavailable,
    VerificationError,
    build_iambus_with,
    event_fields,
    import_ours,
    per_key,
    poll_until,
    prime,
    stop_task,
    timed_publish,
    version,
)

TITLE = "Kafka"
DEFAULT_URL = "kafka://127.0.0.1:9092"
CLIENT = "aiokafka"  # the distribution of the raw client, for the header
PARTITIONS = 4  # partitions of every topic of a run (iambus: ?partitions=4)
FETCH_MS = 100  # getmany timeout of the raw consumer
# How long the broker may hold a fetch that found nothing: iambus's consumers ask for
# 100 ms, aiokafka's default is 500. Tansu does not answer such a fetch early when a
# record comes: a consumer that caught up with the producer waits ~115 ms for the next
# record at 500 and ~17 ms at 100, so every consumer of a run is given the same.
FETCH_WAIT_MS = 100
POLL_INTERVAL = 0.005  # seconds between two reads of the committed offsets

VERIFIED = (
    "each event handled exactly once (by sequence number); on every partition of the run's "
    "topics, every consumer group committed up to the high watermark, before and after the "
    "consumer stopped; iambus's dead-letter topic empty; keyed runs: each key's events "
    "handled in the order they were sent."
)


# -- run context and checks --------------------------------------------------------------


@dataclass
class Ctx(FreshNames, SettledChecks):
    url: str  # kafka://host:port[,host:port]
    bootstrap: str
    suffix: str
    admin: Any  # aiokafka.admin.AIOKafkaAdminClient of the harness' checks and clean-up
    probe: Any  # AIOKafkaConsumer without a group: reads high watermarks
    readers: dict[str, Any] = field(default_factory=dict)  # group -> consumer (committed)
    _counter: int = 0

    def iambus_url(self, namespace: str) -> str:
        glue = "&" if "?" in self.url else "?"
        return f"{self.url}{glue}namespace={namespace}&partitions={PARTITIONS}&idempotent=false"

    async def create_topic(self, topic: str) -> None:
        from aiokafka.admin import NewTopic

        answer = await self.admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        errors = [e for _, e, *_ in answer.topic_errors if e]
        if errors:
            raise RuntimeError(f"creating topic {topic}: error code {errors[0]}")

    async def topics(self, scope: str) -> list[str]:
        return sorted(t for t in await self.admin.list_topics() if scope in t)

    async def groups(self, scope: str) -> list[str]:
        # Tansu 0.6.0 lists group ids percent-encoded ("<locals>" as "%3Clocals%3E", in
        # iambus's group names); its offsets are under the id as the consumer gave it.
        listed = [unquote(g) for g, *_ in await self.admin.list_consumer_groups()]
        return sorted(g for g in listed if scope in g)

    async def highwaters(self, topics: list[str]) -> dict[Any, int]:
        """Each partition's high watermark, from fetch responses (see the module doc)."""
        from aiokafka import TopicPartition

        if not topics:
            return {}
        tps = [
            TopicPartition(info["topic"], part["partition"])
            for info in await self.admin.describe_topics(topics)
            for part in info["partitions"]
        ]
        if {tp.topic for tp in tps} != set(topics):
            raise VerificationError(
                f"found no partitions of {set(topics) - {tp.topic for tp in tps}}"
            )
        self.probe.assign(tps)
        await self.probe.seek_to_end(*tps)
        deadline = time.perf_counter() + STALL_SECONDS
        while any(self.probe.highwater(tp) is None for tp in tps):
            if time.perf_counter() > deadline:
                raise VerificationError(f"no high watermark for {tps} in {STALL_SECONDS} s")
            await self.probe.getmany(*tps, timeout_ms=20, max_records=10_000)
        return {tp: self.probe.highwater(tp) for tp in tps}

    async def committed(self, group: str, tps: list[Any]) -> dict[Any, int | None]:
        from aiokafka import AIOKafkaConsumer

        reader = self.readers.get(group)
        if reader is None:  # in the group, never subscribed: it only reads offsets
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False
            )
            await reader.start()
            self.readers[group] = reader
        return {tp: await reader.committed(tp) for tp in tps}

    async def _complaint(
        self, topics: list[str], groups: list[str], high: dict[Any, int], need_group: bool
    ) -> str | None:
        problems: list[str] = []
        for topic in topics:
            tps = [tp for tp in high if tp.topic == topic]
            stored = sum(high[tp] for tp in tps)
            if _dead_letters(topic):
                if stored:
                    problems.append(f"{topic} holds {stored} dead letter(s)")
                continue
            if _bookkeeping(topic):
                continue  # iambus's own records, read by no group
            readers = 0
            for group in groups:
                offsets = await self.committed(group, tps)
                if all(o is None for o in offsets.values()):
                    continue  # this group does not read this topic
                readers += 1
                behind = sum(high[tp] - (offsets[tp] or 0) for tp in tps)
                if behind > 0:
                    problems.append(f"{topic}, group {group}: {behind} not committed")
            if stored and not readers:
                problems.append(f"{topic}: {stored} records, no group committed any")
        if need_group and not groups:
            problems.append("found no consumer group")
        return "; ".join(problems) or None

    # The Checks protocol (broker_common), by scope: every topic and group holding it.

    STORED = "records in the topics"

    async def settled(self, scope: str, what: str, when: str, need_consumer: bool) -> None:
        topics, groups = await self.topics(scope), await self.groups(scope)
        high = await self.highwaters(topics)
        complaint = await poll_until(
            lambda: self._complaint(topics, groups, high, need_consumer),
            STALL_SECONDS,
            POLL_INTERVAL,
        )
        if complaint is not None:
            raise VerificationError(f"{what}: {when}: {complaint}")

    async def stored(self, scope: str) -> int:
        topics = [t for t in await self.topics(scope) if not _dead_letters(t)]
        return sum((await self.highwaters(topics)).values())

    async def cleanup(self, scope: str) -> int:
        self.probe.unsubscribe()  # drop the partitions a check assigned it
        for group in [g for g in self.readers if scope in g]:
            await self.readers.pop(group).stop()
        topics = await self.topics(scope)
        if topics:
            await self.admin.delete_topics(topics)
        return len(topics)


async def open_ctx(url: str, suffix: str, options: Any) -> Ctx:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    bootstrap = urlsplit(url).netloc
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    probe = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    try:
        await probe.start()
    except Exception:
        await admin.close()
        raise
    return Ctx(url=url, bootstrap=bootstrap, suffix=suffix, admin=admin, probe=probe)


async def close_ctx(ctx: Ctx) -> None:
    for reader in ctx.readers.values():
        await reader.stop()
    await ctx.probe.stop()
    await ctx.admin.close()


async def environment(ctx: Ctx) -> list[str]:
    return [
        f"- a Kafka broker at {ctx.bootstrap}; topics of {PARTITIONS} partitions, "
        f"replication 1; aiokafka {version('aiokafka')} (raw, faststream and iambus all "
        "drive aiokafka)",
    ]


def _dead_letters(topic: str) -> bool:
    """Whether ``topic`` is an iambus dead-letter topic (``<namespace>-dead``)."""
    return topic.endswith("-dead")


def _bookkeeping(topic: str) -> bool:
    """Whether ``topic`` holds iambus's own records, which no consumer group reads: the
    registry (``<namespace>-live``, ``<namespace>-groups``) and reply topics
    (``<namespace>-reply-<id>``)."""
    return topic.endswith(("-live", "-groups")) or "-reply-" in topic


def _key(seq: int) -> bytes:
    return f"user-{seq % KEYS}".encode()


# -- raw: aiokafka, the baseline -----------------------------------------------------------


async def build_raw(ctx: Ctx) -> Impl:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async def consume(
        consumer: Any, handle: Callable[[Any], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=FETCH_MS, max_records=BATCH)
            for records in batch.values():
                for record in records:
                    await handle(record)
            if batch:
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})

    async def consume_partitions(
        consumer: Any, handle: Callable[[Any], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        """A task per assigned partition: its records in order, partitions concurrently."""

        async def one(tp: Any) -> None:
            while not stop.is_set():
                batch = await consumer.getmany(tp, timeout_ms=FETCH_MS, max_records=BATCH)
                if records := batch.get(tp):
                    for record in records:
                        await handle(record)
                    await consumer.commit({tp: records[-1].offset + 1})

        tasks: dict[Any, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                for tp in consumer.assignment():  # a single member: every partition, once
                    if tp not in tasks:
                        tasks[tp] = asyncio.create_task(one(tp))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), FETCH_MS / 1000)
            await asyncio.gather(*tasks.values())
        finally:
            for task in tasks.values():
                task.cancel()

    async def run(n: int, in_flight: int, what: str, keyed: bool, delay: float) -> ThroughputStats:
        topic = ctx.name("raw-tp")
        tracker, order = Tracker(n, held=delay > 0), KeyOrder(what)

        async def handle(record: Any) -> None:
            event = json.loads(record.value)
            if delay:
                await tracker.admit(event["seq"])
                await asyncio.sleep(delay)
            tracker.hit(event["seq"])
            if keyed:
                order.hit(event["seq"], n)

        # A fresh producer per measurement: a producer asks for the metadata of every topic
        # it sent to, and Tansu creates a topic that is asked for, even a deleted one.
        producer = AIOKafkaProducer(
            bootstrap_servers=ctx.bootstrap, acks="all", enable_idempotence=False
        )

        async def send(seq: int) -> None:
            body = json.dumps(event_fields(seq)).encode()
            await producer.send_and_wait(topic, body, key=_key(seq) if keyed else None)

        try:
            await ctx.create_topic(topic)
            await producer.start()
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=ctx.bootstrap,
                group_id=f"{topic}.g",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_WAIT_MS,
            )
            await consumer.start()
            stop = asyncio.Event()
            loop = consume_partitions if keyed else consume
            task = asyncio.create_task(loop(consumer, handle, stop))
            try:
                await prime(tracker, what, send)
                publish = per_key(send) if keyed else send
                stats = await timed_publish(ctx, tracker, topic, what, n, in_flight, publish)
            finally:
                await stop_task(task, stop, grace=FETCH_MS / 1000 + 2)
                await consumer.stop()
            await ctx.verify_after(tracker, topic, what)
            order.check()
            return stats
        finally:
            await producer.stop()
            await ctx.cleanup(topic)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, "raw", False, 0.0)

    async def keyed_slow(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, "raw (1 ms handler)", True, SLOW_HANDLER)

    return Impl(
        name="raw",
        version=version("aiokafka"),
        throughput=throughput,
        keyed_slow=keyed_slow,
        notes=[
            "raw: an `AIOKafkaProducer(acks='all', enable_idempotence=False)` per measurement "
            "(started before the clock); "
            "`await producer.send_and_wait(topic, json)` with a sliding window of tasks. "
            "Consumer: `AIOKafkaConsumer(topic, group_id=<fresh>, enable_auto_commit=False, "
            f"auto_offset_reset='earliest', fetch_max_wait_ms={FETCH_WAIT_MS})` looping "
            f"`getmany(timeout_ms={FETCH_MS}, "
            f"max_records={BATCH})`, `json.loads` + `await handler(dict)` per record, then "
            "`await consumer.commit({tp: last offset + 1})` for the batch (after handling). "
            "1 ms handler: keyed sends (`key=b'user-<seq % 50>'`, Kafka's default "
            "partitioner: 13/12/13/12 keys per partition), and a task per assigned partition "
            f"looping `getmany(tp, max_records={BATCH})`, handling its records in order, "
            "committing that partition after each batch.",
        ],
    )


# -- FastStream ---------------------------------------------------------------------------


async def build_faststream(ctx: Ctx) -> Impl:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    async def run(n: int, in_flight: int, what: str, keyed: bool, delay: float) -> ThroughputStats:
        topic = ctx.name("faststream-tp")
        tracker, order = Tracker(n, held=delay > 0), KeyOrder(what)
        # logger=None: FastStream otherwise logs two INFO lines per message.
        broker = KafkaBroker(
            ctx.bootstrap,
            logger=None,
            acks="all",
            enable_idempotence=False,
            allow_auto_create_topics=False,  # the harness made the topic
        )
        subscriber = broker.subscriber(
            topic,
            group_id=f"{topic}.g",
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_WAIT_MS,
            ack_policy=AckPolicy.ACK,
            max_workers=PARTITIONS if keyed else 1,
        )

        @subscriber
        async def on_viewed(event: PageViewed) -> None:
            if delay:
                await tracker.admit(event.seq)
                await asyncio.sleep(delay)
            tracker.hit(event.seq)
            if keyed:
                order.hit(event.seq, n)

        publisher = broker.publisher(topic)

        async def send(seq: int) -> None:
            await publisher.publish(event_fields(seq), key=_key(seq) if keyed else None)

        try:
            await ctx.create_topic(topic)
            await asyncio.wait_for(broker.start(), 10)
            try:
                await prime(tracker, what, send)
                if keyed:
                    await _all_assigned(subscriber, what)
                publish = per_key(send) if keyed else send
                stats = await timed_publish(ctx, tracker, topic, what, n, in_flight, publish)
            finally:
                await broker.stop()
            await ctx.verify_after(tracker, topic, what)
            order.check()
            return stats
        finally:
            await ctx.cleanup(topic)

    async def throughput(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, "faststream", False, 0.0)

    async def keyed_slow(n: int, in_flight: int) -> ThroughputStats:
        return await run(n, in_flight, "faststream (1 ms handler)", True, SLOW_HANDLER)

    return Impl(
        name="faststream",
        version=version("faststream"),
        throughput=throughput,
        keyed_slow=keyed_slow,
        notes=[
            "faststream: `KafkaBroker(bootstrap, logger=None, acks='all', "
            "enable_idempotence=False)` (a fresh broker per measurement, started before the "
            "clock); `@broker.subscriber(topic, group_id=<fresh>, auto_offset_reset="
            f"'earliest', fetch_max_wait_ms={FETCH_WAIT_MS}, ack_policy=AckPolicy.ACK)` "
            "(at least once: auto-commit off, "
            "`consumer.commit()` after each handled message) with the handler's argument "
            "annotated as the `PageViewed` dataclass; events sent with "
            "`broker.publisher(topic).publish(dict)` (awaits the broker's ack). 1 ms handler: "
            f"keyed sends and `max_workers={PARTITIONS}` with `AckPolicy.ACK`, FastStream's "
            "concurrent at-least-once mode (`ConcurrentBetweenPartitionsSubscriber`: "
            f"{PARTITIONS} consumers in the group, each partition in order); the clock starts "
            "once every partition is assigned."
        ],
    )


async def _all_assigned(subscriber: Any, what: str) -> None:
    """Wait until FastStream's consumers share every partition (the group settled)."""

    def assigned() -> list[int]:
        return [len(c.assignment()) for c in getattr(subscriber, "consumer_subgroup", [])]

    deadline = time.perf_counter() + 30
    while sum(assigned()) < PARTITIONS or 0 in assigned():
        if time.perf_counter() > deadline:
            raise VerificationError(f"{what}: partitions assigned {assigned()} after 30 s")
        await asyncio.sleep(0.05)


# -- iambus --------------------------------------------------------------------------------


def _iambus_missing(ctx: Ctx) -> str | None:
    """Why this checkout's iambus cannot run on Kafka, or None."""
    import_ours()
    from iambus.errors import ImproperlyConfigured
    from iambus.transports import connect

    try:
        connect(ctx.iambus_url("probe"))  # not opened: nothing is made on the broker
    except ImproperlyConfigured as exc:
        if "unknown transport URL" in str(exc):
            return "no kafka transport"
        raise
    except ImportError as exc:
        return f"the kafka transport needs {exc.name or 'its driver'}"
    return None


async def build_iambus(ctx: Ctx) -> Impl:
    """iambus publishing without a key (see broker_common)."""
    if (missing := _iambus_missing(ctx)) is not None:
        raise Unavailable(missing)
    return await build_iambus_with(ctx, keyed=False, primed=True, queries=False)


async def build_iambus_keyed(ctx: Ctx) -> Impl:
    """iambus with ``key=``, and the 1 ms handler scenario (see broker_common)."""
    if (missing := _iambus_missing(ctx)) is not None:
        raise Unavailable(missing)
    return await build_iambus_with(ctx, keyed=True, primed=True, slow=True)


BUILDERS: list[tuple[str, Callable[[Ctx], Awaitable[Impl]]]] = [
    ("raw", build_raw),
    ("faststream", build_faststream),
    ("iambus", build_iambus),
    ("iambus-keyed", build_iambus_keyed),
]
