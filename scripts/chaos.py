"""A black-box chaos run of iambus on each broker; see docs/guarantees.md and scripts/chaos.

Per broker: 3 ``iambus worker chaos_app:create`` processes; this process sends keyed commands
(numbered per key), events and poison commands (whose handler always fails) while workers
are SIGKILLed and restarted and their broker connections killed; then it waits for the
drain and prints one row per broker. It exits 1 if a message was lost, a poison message
did not end dead-lettered, a key was handled out of order, or a worker exited by itself.
Duplicates are reported, not failed: delivery is at least once.

Everything is on 127.0.0.1, in a namespace of its own that is deleted at the end; every
wait is bounded, and every worker still alive at the end is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_app import ROUTES, Bump, Noted, Poison  # the messages (no dispatcher is made)

from iambus import Command, Dispatcher
from iambus.errors import TransportError
from iambus.transports import Capability, Transport, connect

HERE = Path(__file__).resolve().parent  # on sys.path, as the folder of the script run

BROKERS = {
    "redis": ("redis://127.0.0.1:6379/0", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672/", 5672),
    "nats": ("nats://127.0.0.1:4222", 4222),
    # Tansu, the test broker, refuses the idempotent producer (docs/kafka.md).
    "kafka": ("kafka://127.0.0.1:9092?idempotent=false", 9092),
}
WORKERS = ("w1", "w2", "w3")


def broker_url(broker: str, namespace: str) -> str:
    """``broker``'s URL with ``namespace`` in its query."""
    base = BROKERS[broker][0]
    return f"{base}{'&' if '?' in base else '?'}namespace={namespace}"


WORKER = ("-m", "iambus", "worker", "chaos_app:create")
READY = "iambus worker "  # what the command logs once its worker has declared every group
CLAIM_AFTER = 3.0  # a worker that died leaves its deliveries to the others after this


@dataclass(frozen=True, slots=True)
class Plan:
    keys: int
    per_key: int
    events: int
    poison: int
    window: float  # seconds the sending (and the chaos) lasts
    flood: int  # events sent all at once at the end, just before the last SIGKILL
    every: float  # seconds between two chaos actions
    drain: float  # at most this long to wait for the drain


SHORT = Plan(keys=16, per_key=40, events=300, poison=12, window=25, flood=300, every=3.0, drain=60)
FULL = Plan(
    keys=40, per_key=150, events=3000, poison=60, window=180, flood=1000, every=4.0, drain=240
)


@dataclass
class Row:
    broker: str
    sent: int = 0
    handled: int = 0
    lost: int = 0
    duplicated: int = 0
    order: int = 0
    poison: str = ""
    poison_ok: bool = False
    kills: int = 0
    conn_kills: int = 0
    exits: str = ""
    unexpected: int = 0
    drain: float | None = None
    send_failed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and self.poison_ok
            and not self.order
            and not self.unexpected
            and not self.send_failed
            and self.drain is not None
        )


# -- workers ------------------------------------------------------------------------------


class Workers:
    """The processes of one kind in a run (workers, here): started, SIGKILLed, restarted,
    stopped. Each gets ``settings`` as JSON in ``IAMBUS_CHAOS``, runs in the run's folder
    with this folder on its import path, and writes its output to ``<role>.<n>.out``.

    ``ready``: what a process prints once it is ready. A process that exits with status 0
    after it was ready has ``finished`` its work when ``finish`` is set (it is not
    restarted); any other exit this script did not cause is ``unexpected``, and the
    process is restarted, unless it ended before it was ready with output naming one of
    ``refusals``: a start refused by a service that was down, counted in ``refused``.
    """

    def __init__(
        self,
        run: Path,
        settings: dict[str, Any],
        command: tuple[str, ...] = WORKER,
        *,
        ready: str = READY,
        finish: bool = False,
        refusals: tuple[str, ...] = ("connect failed",),
    ) -> None:
        self.run, self.settings, self.command = run, settings, command
        self.ready_text, self.finish, self.refusals = ready, finish, refusals
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()
        self.exits: list[int] = []  # of every process that ended, as it ended
        self.unexpected: list[str] = []
        self.killing: set[int] = set()  # pids this script SIGKILLed
        self.refused = 0  # starts that found a service down
        self.finished: set[str] = set()

    def output(self, role: str) -> Path:
        return self.run / f"{role}.{self.starts[role]}.out"

    def start(self, role: str) -> None:
        self.starts[role] += 1
        env = {**os.environ, "IAMBUS_CHAOS": json.dumps(self.settings)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        with open(self.output(role), "wb") as out:
            self.procs[role] = subprocess.Popen(
                [sys.executable, *self.command],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.run,
                env=env,
            )

    async def ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for role in list(self.procs):
            while role in self.procs and self.ready_text not in self.said(role):
                self.reap()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{role} did not start in {timeout:g} s; see {self.output(role)}"
                    )
                await asyncio.sleep(0.1)

    def said(self, role: str) -> str:
        return self.output(role).read_text(errors="replace")

    def reap(self) -> None:
        """Note processes that ended; restart those that ended by themselves (a failure),
        except those that finished their work."""
        for role, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            self.exits.append(code)
            del self.procs[role]
            if proc.pid in self.killing:
                continue
            said = self.said(role)
            if self.finish and code == 0 and self.ready_text in said:
                self.finished.add(role)
                continue
            if self.ready_text not in said and any(text in said for text in self.refusals):
                # Started while a service was down (a broker restarting, a database
                # connection terminated): the command refuses to start then, as it
                # should. Not a crash; said in the notes.
                self.refused += 1
            else:
                where = self.output(role)
                self.unexpected.append(f"{role} exited by itself with {code} (see {where})")
            self.start(role)

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        self.killing.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.reap()

    async def stop(self, timeout: float = 30) -> dict[str, int]:
        """SIGTERM each; wait for it (SIGKILL after ``timeout``); their exit codes."""
        self.reap()
        procs = dict(self.procs)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for _ in range(int(timeout * 10)):
            if all(p.poll() is not None for p in procs.values()):
                break
            await asyncio.sleep(0.1)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()
        codes = {role: proc.returncode for role, proc in procs.items()}
        self.exits += codes.values()
        return codes


def broker_sockets(pid: int, port: int) -> list[int]:
    """The local ports of the established TCP connections of ``pid`` to ``port``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
                ports.append(int(local.split(":")[1], 16))
    return ports


async def kill_connections(broker: str, pid: int, admin: Any) -> int:
    """Kill the broker connections of worker ``pid``, the broker's way; how many went."""
    port = BROKERS[broker][1]
    local_ports = broker_sockets(pid, port)
    for local in local_ports:
        if broker == "redis":  # the server closes the client: CLIENT KILL
            with contextlib.suppress(Exception):
                await admin.execute_command("CLIENT", "KILL", "ADDR", f"127.0.0.1:{local}")
        elif broker == "rabbitmq":  # the server closes the connection, as an operator would
            # (close_connection takes the connection's Erlang pid, found by its name)
            name = f"127.0.0.1:{local} -> 127.0.0.1:{port}"
            listing = ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "name"]
            for line in (await run(listing)).splitlines():
                pid_of, _, named = line.partition("\t")
                if named.strip() == name:
                    await run(["rabbitmqctl", "close_connection", pid_of.strip(), "iambus chaos"])
        else:
            # NATS 2.9 kicks a client only through the system account, and the monitoring
            # endpoint is not enabled here; Kafka has no such call at all: the socket is
            # aborted under the worker instead (ss -K, root), which the client sees as a
            # dropped connection.
            await run(
                ["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port), "sport", "=", str(local)]
            )
    # Count what is gone (a reconnection has a new local port): an action that did nothing
    # (no rights for ss -K, say) is not reported as a kill.
    for _ in range(20):
        left = set(local_ports) & set(broker_sockets(pid, port))
        if not left:
            break
        await asyncio.sleep(0.1)
    return len(local_ports) - len(left)


async def run(command: list[str], timeout: float = 30) -> str:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ""
    return out.decode(errors="replace")


# -- one broker -------------------------------------------------------------------------


async def hand_over(dp: Dispatcher, message: object, key: str | None = None) -> None:
    """Give ``message`` to the broker without waiting for its handler."""
    send = getattr(dp, "send", None)  # where it exists, send() hands over and returns
    if send is not None:
        await send(message, key=key)
    elif isinstance(message, Command):
        await dp.execute(message, key=key)  # a routed command: returns once the broker has it
    else:
        await dp.publish(message, key=key)


async def send_all(dp: Dispatcher, plan: Plan, row: Row, sent: set[tuple[str, ...]]) -> None:
    async def one(message: object, ident: tuple[str, ...], key: str | None = None) -> None:
        # A send that raised may still have been stored: sending it again is safe (a
        # duplicate at worst, which the handler records as such).
        for attempt in range(40):  # up to 20 s: a broker restarting
            try:
                await hand_over(dp, message, key)
            except TransportError:
                if attempt == 39:
                    row.send_failed += 1
                    return
                await asyncio.sleep(0.5)
            else:
                sent.add(ident)
                return

    async def paced(items: list[tuple[object, tuple[str, ...], str | None]], burst: int) -> None:
        # In bursts spread over the window: a kill then finds work in flight.
        for start in range(0, len(items), burst):
            for message, ident, key in items[start : start + burst]:
                await one(message, ident, key)
            await asyncio.sleep(plan.window * burst / len(items) * random.uniform(0.5, 1.5))

    def keyed(k: int) -> list[tuple[object, tuple[str, ...], str | None]]:
        key = f"k{k:02d}"
        return [(Bump(key, seq), ("bump", key, str(seq)), key) for seq in range(plan.per_key)]

    noted = [(Noted(n), ("event", str(n)), None) for n in range(plan.events + plan.flood)]
    events, flood = noted[: plan.events], noted[plan.events :]
    poison = [(Poison(n), ("poison", str(n)), None) for n in range(plan.poison)]
    await asyncio.gather(
        *(paced(keyed(k), 8) for k in range(plan.keys)), paced(events, 40), paced(poison, 1)
    )
    # The flood: all at once, so that the last SIGKILL finds a backlog in flight.
    await asyncio.gather(*(one(message, ident, key) for message, ident, key in flood))


async def chaos(broker: str, workers: Workers, plan: Plan, row: Row, admin: Any) -> None:
    """Until cancelled: every ``plan.every`` s, SIGKILL a worker or kill its connections."""
    rng = random.Random()
    for n in range(10_000):
        await asyncio.sleep(plan.every * rng.uniform(0.5, 1.5))
        workers.reap()
        role = rng.choice(sorted(workers.procs))
        if n % 2 == 0:
            workers.kill(role)
            row.kills += 1
            await asyncio.sleep(0.5)
            workers.start(role)
        else:
            row.conn_kills += await kill_connections(broker, workers.procs[role].pid, admin)


def read_records(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().split("\n")[:-1]]  # whole lines only


def order_violations(records: list[list[str]], *, replays: bool) -> tuple[int, list[str]]:
    """Per key, in the order handlers finished: seq n may repeat (a redelivery), but never
    come after n+1 was handled, nor before n-1 was.

    ``replays``: a broker that moves whole partitions (Kafka: no ``Capability.RECLAIM``)
    replays a partition from its lowest unsettled offset after a crash, so a key's
    handled messages may come again after its later ones — in their order: going back
    to one handled before, then climbing one by one (docs/kafka.md)."""
    top: dict[str, int] = defaultdict(lambda: -1)
    last: dict[str, int] = defaultdict(lambda: -1)
    bad: list[str] = []
    for kind, *rest in records:
        if kind != "bump":
            continue
        key, seq = rest[0], int(rest[1])
        if replays:
            if seq > last[key] + 1:
                bad.append(f"{key}: #{seq} right after #{last[key]}")
        elif seq < top[key]:
            bad.append(f"{key}: #{seq} after #{top[key]}")
        elif seq > top[key] + 1:
            bad.append(f"{key}: #{seq} before #{top[key] + 1}")
        top[key] = max(top[key], seq)
        last[key] = seq
    return len(bad), bad


async def poison_dead(transport: Transport) -> set[str]:
    """The poison messages in the dead-letter store (riding out a broker restart, 30 s)."""
    for attempt in range(60):
        try:
            letters = await transport.dead_letters(limit=100_000)
            break
        except TransportError:
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    return {
        str(json.loads(letter.envelope.payload)["n"])
        for letter in letters
        if letter.envelope.name.endswith("Poison")
    }


async def admin_for(broker: str) -> Any:
    if broker != "redis":
        return None
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(BROKERS["redis"][0])


async def clean(broker: str, namespace: str, transport: Transport) -> None:
    """Delete the run's namespace; a few tries (the broker may be restarting), then say so."""
    for attempt in range(3):
        try:
            await transport.open()  # (again, if it was lost)
            if broker == "rabbitmq":
                # The transport deletes only what it declared: the queues of the workers
                # go by name (the management CLI lists them).
                command = ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"]
                listing = await run(command)
                channel = await transport._ready(transport._admin)  # type: ignore[attr-defined]
                for name in listing.split():
                    if name.startswith(f"{namespace}."):
                        await channel.queue_delete(name)
            await asyncio.wait_for(transport.destroy(), 30)  # type: ignore[attr-defined]
            return
        except Exception as exc:
            if attempt == 2:
                print(f"   could not delete namespace {namespace} on {broker}: {exc!r}")
                return
            await asyncio.sleep(5)


async def one_broker(broker: str, plan: Plan, keep: bool) -> Row:
    row = Row(broker)
    namespace = f"chaos-{uuid.uuid4().hex[:10]}"
    url = broker_url(broker, namespace)
    run_dir = Path(tempfile.mkdtemp(prefix=f"iambus-chaos-{broker}-"))
    settings = {"url": url, "claim_after": CLAIM_AFTER, "log": str(run_dir / "handled")}
    workers = Workers(run_dir, settings)
    admin = await admin_for(broker)
    transport = connect(url, claim_after=CLAIM_AFTER)
    sent: set[tuple[str, ...]] = set()
    print(f"== {broker}: 3 workers, namespace {namespace}, files in {run_dir}", flush=True)
    # What the sender's own drivers log (reconnects and such) goes to a file of the run.
    log = logging.FileHandler(run_dir / "sender.log")
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log)
    try:
        for role in WORKERS:
            workers.start(role)
        await workers.ready()
        async with Dispatcher(transport=transport, routes=ROUTES) as dp:
            sending = asyncio.ensure_future(send_all(dp, plan, row, sent))
            chaotic = asyncio.ensure_future(chaos(broker, workers, plan, row, admin))
            try:
                await asyncio.wait_for(asyncio.shield(sending), plan.window * 3 + 60)
            finally:
                chaotic.cancel()
                sending.cancel()
                await asyncio.gather(chaotic, sending, return_exceptions=True)
            # The drain: from the last send until everything sent is handled (and every
            # poison message dead-lettered). It begins with one last SIGKILL, with
            # deliveries in flight, to be handed over to the others.
            print(f"== {broker}: sent {len(sent)}; draining", flush=True)
            began = time.monotonic()
            workers.reap()
            workers.kill(random.choice(sorted(workers.procs)))
            row.kills += 1
            for role in WORKERS:
                if role not in workers.procs:
                    workers.start(role)
            want = {ident for ident in sent if ident[0] != "poison"}
            want_poison = {ident[1] for ident in sent if ident[0] == "poison"}
            while time.monotonic() - began < plan.drain:
                workers.reap()
                handled = {tuple(r[:-1]) for r in read_records(run_dir / "handled")}
                if want <= handled and want_poison <= await poison_dead(transport):
                    row.drain = time.monotonic() - began
                    break
                await asyncio.sleep(0.2)
            await workers.ready()  # a SIGTERM before then would find no handler installed
            codes = await workers.stop()
            if any(codes.values()):
                row.notes.append(f"exit codes on SIGTERM: {codes}")
                row.unexpected += sum(1 for code in codes.values() if code)
            records = read_records(run_dir / "handled")
            done = Counter(tuple(r[:-1]) for r in records if r[0] != "poison")
            dead = await poison_dead(transport)
    finally:
        for proc in workers.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        await clean(broker, namespace, transport)
        with contextlib.suppress(Exception):
            await transport.close()
        if admin is not None:
            await admin.aclose()
        logging.getLogger().removeHandler(log)
        log.close()
    row.sent = len(sent)
    row.handled = len(done.keys() & want)
    row.lost = len(want - done.keys())
    row.duplicated = sum(n - 1 for n in done.values())
    row.order, bad = order_violations(
        records, replays=Capability.RECLAIM not in transport.capabilities
    )
    row.poison = f"{len(dead & want_poison)}/{len(want_poison)}"
    row.poison_ok = want_poison <= dead
    row.unexpected += len(workers.unexpected)
    if workers.refused:
        row.notes.append(
            f"{workers.refused} worker start(s) found the broker down (restarted by someone "
            f"else?) and exited 1, as `iambus worker` does; started again"
        )
    row.notes += workers.unexpected + bad[:5]
    if unexpected := done.keys() - want:
        row.notes.append(f"handled but never sent: {sorted(unexpected)[:5]}")
    if row.lost:
        row.notes.append(f"lost: {sorted(want - done.keys())[:10]}")
    row.exits = " ".join(f"{code}x{n}" for code, n in sorted(Counter(workers.exits).items()))
    if row.ok and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


# -- the report -------------------------------------------------------------------------


HEAD = (
    "broker",
    "sent",
    "handled (unique)",
    "lost",
    "duplicated",
    "order violations",
    "poison dead-lettered",
    "SIGKILLs / connections killed",
    "worker exit codes",
)


def cells(r: Row) -> tuple[object, ...]:
    kills = f"{r.kills} / {r.conn_kills}"
    return (r.broker, r.sent, r.handled, r.lost, r.duplicated, r.order, r.poison, kills, r.exits)


def markdown(
    head: tuple[str, ...], cells: Callable[[Any], tuple[object, ...]], rows: list[Any]
) -> str:
    """The table of a chaos run: a line per broker's row, ``cells(row)`` then the drain
    (``row.drain``: seconds, or None) and the result (``row.ok``)."""
    lines = ["| " + " | ".join((*head, "drain", "result")) + " |", "|" + " --- |" * (len(head) + 2)]
    for row in rows:
        drain = f"{row.drain:.1f} s" if row.drain is not None else "did not drain"
        line = (*cells(row), drain, "ok" if row.ok else "FAILED")
        lines.append("| " + " | ".join(map(str, line)) + " |")
    return "\n".join(lines)


async def each_broker(
    argv: list[str],
    prog: str,
    doc: str,
    one: Callable[[str, Any, bool], Awaitable[Any]],
    plans: tuple[Any, Any],
    table: tuple[tuple[str, ...], Callable[[Any], tuple[object, ...]]],
    failed: Callable[..., Any],
    short: str,
) -> int:
    """The command line of a chaos run (this one, scripts/outbox_chaos.py): for each broker
    asked (all by default), ``one(broker, plan, keep)`` with the short or the full one of
    ``plans`` gives its row (``ok``, ``drain``, ``notes``), or ``failed(broker, notes=...)``
    (the row's class) one for a run that could not even start; prints each one's notes, then the
    ``markdown`` table of the rows (``table``: its head and cells). Exit status 1 unless
    every row is ok."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), action="append", help="(repeatable)")
    parser.add_argument("--short", action="store_true", help=short)
    parser.add_argument("--keep", action="store_true", help="keep the run's files even if ok")
    args = parser.parse_args(argv)
    rows = []
    started = time.monotonic()
    for broker in args.broker or sorted(BROKERS):
        began = time.monotonic()
        try:
            row = await one(broker, plans[0] if args.short else plans[1], args.keep)
        except Exception as exc:  # a run that could not even start is a failure, said so
            row = failed(broker, notes=[f"{type(exc).__name__}: {exc}"])
        rows.append(row)
        print(f"== {broker}: {'ok' if row.ok else 'FAILED'} in {time.monotonic() - began:.0f} s")
        for note in row.notes:
            print(f"   {note}")
    print()
    print(markdown(*table, rows))
    print(f"\n{'short' if args.short else 'full'} run, {time.monotonic() - started:.0f} s in all")
    return 0 if all(row.ok for row in rows) else 1


async def main(argv: list[str]) -> int:
    short = "about a minute per broker"
    return await each_broker(
        argv, "scripts/chaos", __doc__, one_broker, (SHORT, FULL), (HEAD, cells), Row, short
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
