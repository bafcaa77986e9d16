"""The relay: sends the outbox's committed rows to the transport, then deletes them.

::

    from iambus.relay import Relay

    relay = Relay(database, transport)          # both opened and closed by their owner
    await relay.start()                         # runs in the background
    ...
    await relay.stop(loop.time() + 10)          # by this event-loop time at the latest

``iambus relay --transport URL --database DSN`` runs one as a process of its own. Any
number of relays may run on one outbox at once. docs/outbox.md tells the design.

A *pass* first asks which lanes (of the outbox's ``LANES``) hold rows to send: one
statement, outside any transaction, all that an idle pass costs. Then it takes every one
of those lanes no other relay holds, each with an advisory lock
(``pg_try_advisory_xact_lock``) held by a transaction of its own on that connection for
the whole pass, so two relays never send the same lane's rows at once, and sends them
in *batches* on a second connection, each one READ COMMITTED transaction (whatever the
database's default; so is the lanes'). A batch reads the oldest ``batch`` rows of the lanes in
``position`` order (and no more than ``BATCH_BYTES`` of payload, one row at least),
sends each with its envelope unchanged, deletes the sent ones and commits. It is read
``CHUNK`` rows at a time from one cursor (one snapshot, as one select would read it),
each chunk while the rows before it are being sent, and the sent rows are deleted
``DELETE_CHUNK`` at a time while the others are sent: the connection works while the
broker does. A batch starts sends for ``BATCH_SECONDS`` at most (or half the server's
``idle_in_transaction_session_timeout``, if shorter): then it commits what was sent, so
a slow broker never keeps a transaction open long.

A full batch hands over to the next one of the pass: once all but half a batch of its
rows are on their way, it deletes those sent and commits, and the next batch reads its
rows while the last ones are still being sent (they are deleted by the next batch's
transaction once their sends return). The broker's pipe never drains between two
batches, and the statements between them (the commit, the next select) overlap the
sends. Its lanes stay locked meanwhile (their transaction is not the batch's), so no
other relay reads the rows in flight; the next batch's select leaves out the rows the
pass has in hand (read, not yet deleted), and nothing else. A pass ends when a batch is
not full, a send fails, a stop or a batch's time cuts it, or after ``PASS_SECONDS``:
its last batch waits for every send and commits, then the lanes' transaction ends,
which releases them (as a rollback does, or a connection closed). If the lanes'
connection is closed under a pass, no send starts any more, and the pass fails once
those under way have returned and were committed. (Not a session's locks, which would
outlive each commit on one connection: behind a transaction-pooling proxy, a session's
next transaction may run on another server connection, the locks staying in the first.)
A pass that ended with a full batch is followed by another.

A key's rows are all in its lane, so they go out in ``position`` order: per key, the
order the writers committed them (see ``outbox``). The rows of one key are sent one
after the other (each send returns once the broker has the message), across the
batches of a pass too, while other keys' rows and rows without a key are sent at the
same time, up to ``in_flight`` at once: a broker's round trip is paid per key, not per
row. (A key's next row is not sent before the broker has confirmed the one before,
even where one connection keeps the order on the wire, as NATS's does: a message the
broker refuses, or whose answer never comes, must not let the key's next one through,
as a later message the broker took cannot be taken back, and the earlier one, sent
again, would come after it.)

No high-water mark: every batch reads every committed row still in the table but those
in hand, so a row a long transaction commits late, with a position lower than rows
already sent, is read by the next batch, or the next pass (the ``NOTIFY`` after its
commit wakes the relays). Per key it comes before the key's rows not yet read: they
committed after it.

Wake-up: a connection of its own ``LISTEN``s on the outbox's channel; each commit that
wrote rows is followed by a ``NOTIFY`` (``Database.notify_relays``, or in the
transaction: ``outbox.write``) and a pass starts at once. Polling every ``poll`` seconds
is the fallback, and runs whether or not the relay listens (behind a transaction-pooling
proxy ``LISTEN`` appears to work and no notification ever arrives).

Connections: one listens, one makes the passes, one purges the inbox now and then (a
task of its own: ``inbox.purge``). Each is asked of the database's pool with a timeout
(``ACQUIRE_TIMEOUT``): a pool too small for the handlers and the relay fails the pass
with an error saying so, logged once, instead of a relay that waits without a word.

Failures never stop a relay. A send that fails (``TransportError``, or any error) ends
its key's chain: the key's later rows wait behind it, in order; the other keys go on.
If the broker took nothing in the pass, it is an outage: the relay retries after a
growing delay (``RETRY_FIRST`` doubling up to ``RETRY_CAP``) and logs once per outage. A
database error (a lost connection) is handled the same way. If the broker took other
rows, the refused row is charged a failed attempt (``attempts``, with ``last_error``,
committed with the pass); its ``FAILED_SENDS``-th parks it (a row too large for the
broker is refused for ever, and would hold its key up). A row that can never be sent
(its envelope does not decode, or the transport rejects it with ``SerializationError``,
``ImproperlyConfigured`` or ``MessageRefused``: too large for the broker) is parked at
once. A parked row is kept in the table with the
reason, logged at ERROR, counted by ``outbox_status``, and sent again once
``release``\\ d (``iambus outbox retry``). A relay killed mid-batch loses nothing: its
transaction rolls back and the batch is sent again (the same envelope ids: duplicates a
consumer's inbox recognises).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import inbox
from .database import Database
from .errors import (
    ImproperlyConfigured,
    MessageRefused,
    SerializationError,
    TransportError,
    check_count,
    check_flag,
    check_seconds,
)
from .outbox import LANES, ROW_COLUMNS, envelope_of
from .telemetry import Observer, Sending, Telemetry, system_of
from .transports import Transport

__all__ = ["OutboxStatus", "ParkedRow", "Relay", "outbox_status", "parked", "release"]

logger = logging.getLogger(__name__)

RETRY_FIRST = 0.1
"""Seconds before the first retry after a failed pass (or a lost ``LISTEN``); doubled
after each failure that follows, up to ``RETRY_CAP``."""
RETRY_CAP = 10.0
LISTEN_CHECK = 30.0
"""Seconds between two checks that the quiet ``LISTEN`` connection still answers (a
connection the server closed is noticed at once; a silent network loss by this check)."""
LISTEN_CHECK_TIMEOUT = 10.0
START_LISTEN_WAIT = 5.0
"""How long ``start()`` waits for the first ``LISTEN`` before it goes on with polling."""
BATCH_SECONDS = 1.0
"""Seconds a batch starts sends for, at most (and half the server's
``idle_in_transaction_session_timeout``, if shorter): what was sent is committed, and
the next pass goes on, so a slow broker never holds a transaction open for long."""
BATCH_BYTES = 16 * 1024 * 1024
"""Payload bytes a batch reads at most (and one row, however large): ``batch`` rows of
large messages would otherwise all be in memory at once."""
CHUNK = 250
"""Rows a batch reads at a time (the next chunk is read while the rows before it are
sent)."""
DELETE_CHUNK = 1000
"""Rows sent in a batch after which they are deleted, while its other sends go on; the
rest are deleted after each chunk read and as the batch commits. (A statement is a round
trip, whose system calls cost the relay's process as much CPU as several sends: with
250, batches of 1000 took 6-10 % more CPU per row, ``benchmarks/relay_ab.py``.)"""
ACQUIRE_TIMEOUT = 10.0
"""Seconds the relay waits for a connection of the database's pool; then the pass fails
(logged once, naming the pool's size as the likely cause) and is tried again."""
FAILED_SENDS = 5
"""Failed sends after which a row is parked, counted only in passes where the broker took
other rows (a broker that takes nothing is an outage, and parks nothing)."""
SEND_TIMEOUT = 30.0
"""Seconds a batch waits for news of its sends once it has read its rows: when none of
them returned meanwhile (a broker gone silent, a connection the network lost without a
word), they are given up (cancelled; their rows stay, and are sent again by a later
pass, each charged a failed attempt as a refused row is when the broker took a send
begun after it), so that its lanes and its transaction are not held for as long as they
hang."""
PASS_SECONDS = 1.0
"""Seconds a pass goes on from batch to batch for, at most: then it ends (its sends
returned, its lanes unlocked), and the next pass takes the lanes with rows, those that
filled meanwhile and those another relay let go of with them."""
STOP_MOMENT = 0.05
"""Seconds ``stop()`` waits at least, however late its deadline: an idle relay stops in
far less, and is not cut short (no warning, no connection closed)."""
STOP_GRACE = 1.0
"""Seconds a relay cut short at its deadline gets to unwind (its connections are closed
first, so that nothing waits for the database)."""


class Relay:
    """Sends the committed outbox rows of ``database`` to ``transport``; see the module
    docstring.

    ``batch``: rows read (and deleted) per transaction. ``poll``: seconds between two
    passes when no notification comes. ``listen``: wake up on the outbox's ``NOTIFY``
    (off: poll only). ``purge_every``: seconds between two purges of old inbox records
    (``inbox.purge``). ``in_flight``: sends outstanding at once within a batch (rows of
    different keys; one key's rows are sent one after the other). ``observers``: the
    telemetry that watches its sends (see ``iambus.telemetry``; a dispatcher's relay gets
    the dispatcher's). The relay neither opens nor closes the transport or the database.
    """

    def __init__(
        self,
        database: Database,
        transport: Transport,
        *,
        batch: int = 1000,
        poll: float = 1.0,
        listen: bool = True,
        purge_every: float = 3600.0,
        in_flight: int = 100,
        observers: Sequence[Observer] = (),
    ) -> None:
        if not isinstance(database, Database):
            raise ImproperlyConfigured(
                f"database must be an iambus.database.Database, got {database!r}"
            )
        self.database = database
        self.transport = transport
        self.batch = check_count("batch", batch)
        self.poll = check_seconds("poll", poll)
        self.listen = check_flag("listen", listen)
        self.purge_every = check_seconds("purge_every", purge_every)
        self.in_flight = check_count("in_flight", in_flight)
        self.telemetry = Telemetry.of(*observers)
        self._system = system_of(transport.url)
        outbox = database.outbox
        # The lanes that hold rows to send: one statement, outside any transaction (an
        # idle pass is this one statement), one probe of the lane index per lane.
        self._busy_sql = (
            f"SELECT array_agg(g.lane) FROM generate_series(0, {LANES - 1}) AS g(lane) "
            f"WHERE EXISTS (SELECT FROM {outbox} AS o "
            f"WHERE o.lane = g.lane AND o.parked_at IS NULL)"
        )
        # Of those, the lanes no other relay holds, each locked until the transaction
        # that holds them for the pass ends; the server's idle-in-transaction timeout (a
        # batch sends within half of it, and a pass lasts no longer).
        self._lock_sql = (
            "SELECT (SELECT array_agg(lane) FROM unnest($2::int[]) AS lane "
            "WHERE pg_try_advisory_xact_lock($1::int, lane)), "
            "extract(epoch FROM current_setting('idle_in_transaction_session_timeout')"
            "::interval)::float8"
        )
        # For a batch's transaction only, no sorts: the select below then walks the
        # primary key in position order and stops after ``batch`` rows. The planner
        # would otherwise, with statistics taken while the outbox was nearly empty (its
        # usual state), read and sort the whole backlog for every batch (70 ms a batch
        # for a backlog of 100,000 rows, instead of under 1 ms).
        self._plan_sql = (
            "SELECT set_config('enable_sort', 'off', true), "
            "set_config('max_parallel_workers_per_gather', '0', true)"
        )
        # The oldest rows of those lanes, up to ``batch`` rows and as many as fit in
        # BATCH_BYTES of payload (the first one always: a batch always progresses),
        # except those the pass has in hand already (read by one of its earlier batches
        # and not yet deleted: positions $4, all at most $5, so that the rows above
        # cost no look at the array).
        self._select_sql = (
            f"SELECT * FROM (SELECT {ROW_COLUMNS}, sum(octet_length(payload)) "
            f"OVER (ORDER BY position) AS upto FROM {outbox} WHERE lane = ANY($1::int[]) "
            f"AND parked_at IS NULL AND (position > $5 OR position <> ALL($4::bigint[])) "
            f"ORDER BY position LIMIT $2) AS head "
            f"WHERE upto - octet_length(payload) < $3 ORDER BY position"
        )
        self._delete_sql = f"DELETE FROM {outbox} WHERE position = ANY($1::bigint[])"
        self._park_sql = (
            f"UPDATE {outbox} SET parked_at = now(), last_error = $2, "
            f"attempts = attempts + 1 WHERE position = $1"
        )
        self._charge_sql = (
            f"UPDATE {outbox} SET attempts = attempts + 1, last_error = $2, "
            f"parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END "
            f"WHERE position = $1 RETURNING attempts"
        )
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # a notification came, or stop() was called
        self._idle = asyncio.Event()  # the loop waits between passes (tests watch it)
        self._listening = False
        self._held: set[Any] = set()  # connections in use, closed by a stop cut short
        self._cut = False  # a stop was cut short: its connections were closed

    def __repr__(self) -> str:
        return f"<Relay {self.database.outbox} -> {self.transport.url}>"

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def listening(self) -> bool:
        """Whether a connection listens for the outbox's notifications right now."""
        return self._listening

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the tables, then relay in the background until ``stop()``.

        Raises ``ImproperlyConfigured`` when the tables are missing or of another shape
        (``Database.check``), and the driver's error when the database cannot be reached.
        Returns once the relay listens (or has failed to, and polls).
        """
        if self._task is not None:
            raise ImproperlyConfigured(f"{self!r} is already running: stop() it first")
        await self.database.check()
        self._stopping.clear()
        self._cut = False
        if self.listen:
            ready = asyncio.Event()
            self._listener = asyncio.create_task(self._listen(ready), name="iambus-relay-listen")
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(START_LISTEN_WAIT):
                        await ready.wait()
            except BaseException:  # cancelled: nothing would ever stop the listener
                listener, self._listener = self._listener, None
                listener.cancel()
                await asyncio.wait([listener])
                raise
        self._task = asyncio.create_task(self._run(), name="iambus-relay")
        self._purger = asyncio.create_task(self._purge_every(), name="iambus-relay-purge")

    async def stop(self, deadline: float | None = None) -> None:
        """Stop relaying: the batch being sent ends once the sends in flight have returned
        (the rows sent are deleted). ``deadline`` (event-loop time; None: no limit) is
        when the relay is cut short instead: its connections are closed, its transaction
        rolls back and the rows of that batch are sent again by the next relay. It
        returns by ``deadline + STOP_GRACE`` at the latest (a deadline already past
        still gives the relay ``STOP_MOMENT`` to stop as an idle one does)."""
        tasks = [t for t in (self._task, self._listener, self._purger) if t is not None]
        self._task = self._listener = self._purger = None
        if not tasks:
            return
        self._stopping.set()
        self._wake.set()
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(deadline - loop.time(), STOP_MOMENT)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if not pending:
            _retrieve(tasks)
            self._stopping.clear()  # run_once() works on a stopped relay
            return
        logger.warning(
            "relay %s: cut short at its stop deadline; the batch it was sending stays in "
            "the outbox and is sent again (duplicates with the same envelope ids)",
            self.database.outbox,
        )
        self._cut = True
        for conn in list(self._held):
            conn.terminate()  # nothing waits for the database: its side rolls back
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
        if pending:  # (they end once they see the stop: it stays set)
            logger.warning("relay %s: still unwinding after its stop", self.database.outbox)
        else:
            self._stopping.clear()  # run_once() works on a stopped relay
        _retrieve([task for task in tasks if task.done()])

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- passes -------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Send every row committed before this call (except parked ones and the lanes
        another relay holds at the time); return how many were sent.

        Raises the transport's or the database's error when one ends the pass, after
        the rows sent so far were deleted.
        """
        sent = 0
        more = True
        while more:
            count, more = await self._pass()
            sent += count
        return sent

    async def _pass(self) -> tuple[int, bool]:
        """Batches from every lane with rows no other relay holds, while they fill up:
        (rows sent, whether more may wait)."""
        if self._stopping.is_set():
            return 0, False
        run: _Pass | None = None
        async with self._connection() as holder:
            busy = await holder.fetchval(self._busy_sql)
            if not busy:
                return 0, False  # nothing to send: the one statement of an idle pass
            # The lanes are held by a transaction of their own for the whole pass, and
            # released when it ends (committed, rolled back, or its connection closed),
            # while the batches commit on another connection. (Not by a session's locks:
            # behind a transaction-pooling proxy, the next transaction may run in
            # another session, and the locks stay behind in the first.)
            # The batches' connection first: the lanes are never held while the relay
            # waits for a connection (other relays would wait for them meanwhile).
            try:
                async with (
                    self._connection() as conn,
                    holder.transaction(isolation="read_committed"),
                ):
                    lanes, idle_limit = await holder.fetchrow(
                        self._lock_sql, self.database.lock_space, busy
                    )
                    if not lanes:
                        return 0, False  # other relays hold every lane with rows
                    run = _Pass(self, conn, holder, lanes, idle_limit)
                    await run.run()
            except Exception as exc:
                if not (_lost(holder) or (run is not None and run.lost)):
                    raise
                raise ConnectionError(
                    f"the database closed a connection of the relay during a batch (it "
                    f"was terminated, the server restarted, or it was idle in its "
                    f"transaction longer than the server's "
                    f"idle_in_transaction_session_timeout): {type(exc).__name__}: {exc}"
                ) from exc
        assert run is not None
        if run.failure is not None and not run.sent:
            # The broker failed: the rows stay, each key's in order, for the retry.
            raise run.failure
        return run.sent, run.more

    async def _charge(self, conn: Any, failed: list[tuple[Any, Exception]]) -> None:
        """Rows the broker refused while it took others: one more failed attempt each;
        the ``FAILED_SENDS``-th parks the row (one too large for the broker fails for
        ever). One warning for the pass, not one per row."""
        charged = []
        for row, exc in failed:
            reason = f"{type(exc).__name__}: {exc}"
            attempts = await conn.fetchval(self._charge_sql, row["position"], reason, FAILED_SENDS)
            if attempts is None:
                continue  # deleted meanwhile (by hand): nothing to charge, nor to roll back
            charged.append((row, exc, attempts))
            if attempts >= FAILED_SENDS:
                self._log_parked(row, reason)
        if not charged:
            return
        row, exc, attempts = charged[0]
        logger.warning(
            "relay %s: %d row(s) failed to send while other rows went out: they stay, in "
            "order, and a row is parked after %d such failures (the first: row %s, message "
            "%s to %s, failure %d: %s: %s)",
            self.database.outbox,
            len(charged),
            FAILED_SENDS,
            row["position"],
            row["message_id"],
            row["address"],
            attempts,
            type(exc).__name__,
            exc,
        )

    async def _park(self, conn: Any, row: Any, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        await conn.execute(self._park_sql, row["position"], reason)
        self._log_parked(row, reason)

    def _log_parked(self, row: Any, reason: str) -> None:
        logger.error(
            "relay %s: outbox row %s (message %s, %s to %s) cannot be sent and is parked: "
            "%s. It stays in the table, counted as parked by `iambus status --database`; "
            "fix what the error names (a row changed by hand, a broker's limit), then "
            "release it with `iambus outbox retry --database DSN %s`",
            self.database.outbox,
            row["position"],
            row["message_id"],
            row["name"],
            row["address"],
            reason,
            row["position"],
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        async with self.database.connection(ACQUIRE_TIMEOUT) as conn:
            self._held.add(conn)
            try:
                yield conn
            finally:
                self._held.discard(conn)

    # -- the background loop ------------------------------------------------------------

    async def _run(self) -> None:
        where = f"relay {self.database.outbox} -> {self.transport.url}"
        sending = _Outage(
            f"{where}: a pass failed",
            "the rows not sent stay in the outbox, in order",
            f"{where}: relaying again",
        )
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                sent, more = await self._pass()
            except Exception as exc:
                if self._cut:  # the stop closed its connections: no failure of the pass
                    logger.debug("%s: the pass cut short by the stop ended with %r", where, exc)
                    return
                delay = sending.failed(exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                continue
            if sent:  # (a pass that found the failing lanes held by another relay: not yet)
                sending.ended()
            if more:
                continue
            self._idle.set()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await self._wake.wait()
            finally:
                self._idle.clear()

    async def _purge_every(self) -> None:
        """Purge the inbox at start, then every ``purge_every`` seconds: a task of its
        own, so that relaying goes on meanwhile."""
        while not self._stopping.is_set():
            await self._purge()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.purge_every):
                    await self._stopping.wait()

    async def _purge(self) -> None:
        try:
            async with self._connection() as conn:
                purged = await inbox.purge(conn, self.database, stopping=self._stopping)
        except Exception as exc:  # the next purge tries again; relaying goes on
            logger.warning(
                "relay %s: purging the inbox %s failed: %s",
                self.database.outbox,
                self.database.inbox,
                exc,
            )
            return
        if purged:
            logger.info("relay: purged %d inbox record(s) past their retention", purged)

    async def _listen(self, ready: asyncio.Event) -> None:
        where = f"relay {self.database.outbox}"
        listening = _Outage(
            f"{where}: listening on {self.database.channel!r} failed",
            f"the relay polls every {self.poll:g} s meanwhile",
            f"{where}: listening again",
        )
        while not self._stopping.is_set():
            try:
                async with self._connection() as conn:
                    await self._listen_on(conn, listening, ready)
                if self._stopping.is_set():
                    return
                raise ConnectionError("the database closed the listening connection")
            except Exception as exc:
                delay = listening.failed(exc)
            ready.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _listen_on(self, conn: Any, listening: _Outage, ready: asyncio.Event) -> None:
        """Listen on ``conn`` until it is lost or the relay stops."""
        channel = self.database.channel
        lost = asyncio.Event()

        def closed(_: object) -> None:
            lost.set()

        def notified(*_: object) -> None:
            self._wake.set()

        conn.add_termination_listener(closed)
        try:
            await conn.add_listener(channel, notified)
            self._listening = True
            listening.ended()
            ready.set()
            self._wake.set()  # rows committed while nobody listened
            await self._hold(conn, lost)
        finally:
            self._listening = False
            if not lost.is_set():  # (a closed connection has forgotten its listeners)
                with contextlib.suppress(Exception):
                    conn.remove_termination_listener(closed)
                    await conn.remove_listener(channel, notified)

    async def _hold(self, conn: Any, lost: asyncio.Event) -> None:
        """Keep listening on ``conn`` until it is lost or the relay stops."""
        while not (lost.is_set() or self._stopping.is_set()):
            waits = [asyncio.ensure_future(lost.wait()), asyncio.ensure_future(self._wake_stop())]
            try:
                done, _ = await asyncio.wait(
                    waits, timeout=LISTEN_CHECK, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiting in waits:
                    waiting.cancel()
            if not done:
                async with asyncio.timeout(LISTEN_CHECK_TIMEOUT):
                    await conn.execute("SELECT 1")

    async def _wake_stop(self) -> None:
        await self._stopping.wait()


def _lost(conn: Any) -> bool:
    """Whether ``conn`` was closed under us (a pool's proxy of one is detached)."""
    try:
        return bool(conn.is_closed())
    except Exception:
        return True


def _time_for(idle_limit: float | None) -> float:
    """Seconds a batch may send for, given the server's idle-in-transaction timeout."""
    if not idle_limit:  # 0: none
        return BATCH_SECONDS
    return min(BATCH_SECONDS, idle_limit / 2)


def _retrieve(tasks: list[asyncio.Task[None]]) -> None:
    """Collect how ``tasks`` ended (an error on the way out of a stop cut short is
    expected: its connection was closed under it)."""
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("relay: %s ended with %r", task.get_name(), task.exception())


@dataclass(slots=True)
class _Sent:
    """What the sends of one batch (one transaction) came to."""

    sent: list[int] = field(default_factory=list)  # positions
    parked: list[tuple[Any, Exception]] = field(default_factory=list)
    failed: list[tuple[Any, Exception]] = field(default_factory=list)  # the broker refused
    deleted: int = 0  # of ``sent``, deleted so far (in the batch's transaction)
    cut: bool = False  # the batch's time ran out before every row was sent
    full: bool = False  # the batch read all it may (rows or bytes): more may wait


class _Pass:
    """The batches of one pass, each a transaction of ``conn``, while ``holder``'s
    transaction holds the pass's ``lanes``. A batch's rows are read ``CHUNK`` at a time
    from one cursor, each chunk while the rows before it are sent, and deleted
    ``DELETE_CHUNK`` at a time as they are sent, in the batch's transaction.

    The rows of one key form a chain, sent one after the other by one sender; rows of
    the key read while its chain is being sent join the chain. Rows without a key are a
    chain each. Up to ``in_flight`` senders take the chains in position order. A send
    that fails ends its key's chain, and the key's rows read after it are left in the
    table behind it; a stop ends every chain before its next send, and so does the end
    of the batch's ``seconds`` once a row was sent (what was sent is committed).

    A full batch hands over to the next one without waiting for its sends: once all
    but ``handover`` of its rows have been started, it deletes those sent and commits,
    and the next batch begins while the rest are still being sent (they are deleted
    by the transaction open when their send returns). The lanes stay locked meanwhile
    (by ``holder``), so no other relay reads the rows in flight; the next batch's
    select leaves out the rows the pass has in hand (read, not yet deleted), and its
    rows of a key join the key's chain. The pass ends, every send returned, with a
    batch that is not full, a failed send, a stop, a cut, or after ``PASS_SECONDS``
    (and if ``holder`` is closed under it: its lanes are free then, so no send starts,
    and the pass raises once those under way have returned and were committed)."""

    def __init__(
        self, relay: Relay, conn: Any, holder: Any, lanes: list[int], idle_limit: float | None
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.holder = holder
        self.lanes = lanes
        self.idle_limit = idle_limit
        self.loop = asyncio.get_running_loop()
        self.began = self.loop.time()
        self.seconds = _time_for(idle_limit)
        self.until = self.began + self.seconds  # when the batch stops starting sends
        self.outcome = _Sent()  # of the batch being sent (its transaction is open)
        self.chains: collections.deque[list[Any]] = collections.deque()
        self.keys: dict[str, list[Any]] = {}  # the chain of a key, until it is sent
        self.failed: set[str] = set()  # keys whose chain a failed send ended
        self.in_hand: set[int] = set()  # positions read, not deleted by a commit yet
        self.unstarted = 0  # rows read whose send has not started
        self.unstarted_bytes = 0  # ... their payloads' size
        self.budget = BATCH_BYTES  # the bytes of payload the batch being read may take
        # Rows still to start when a full batch hands over: enough for the sends to go on
        # through the commit and the next select (at 20-40k sends/s, half a batch of
        # 1000 is 12-25 ms of sends; fewer let the broker's pipe run low meanwhile, on
        # a busy machine).
        self.handover = max(1, relay.batch // 2)
        self.senders: list[asyncio.Task[None]] = []
        self.active = 0  # senders running
        self.open_chains = 0  # chains not sent to their end yet
        self.arrived = asyncio.Event()  # rows were read (or the last of them)
        self.changed = asyncio.Event()  # a sender has news for the batch (see _send)
        self.read = 0  # rows the batch being read has read
        self.returned = 0  # sends returned (the batch waits for news of them)
        self.cursor: Any = None
        self.done = False  # the batch reads no more rows
        self.sent = 0  # rows sent and deleted by committed batches
        self.failure: Exception | None = None  # the first send that failed
        self.given_up: TransportError | None = None  # why its hung sends were cancelled
        self.begun = 0  # sends begun: each send's number, in the order they began
        self.taken = 0  # the number of the latest begun send the broker took
        self.more = False  # the last batch was full or cut: more may wait
        self.unlocked = False  # ``holder`` was closed: the lanes are free
        self.lost = False  # the pass failed as a connection of it was closed

    async def run(self) -> None:
        """Read, send, delete and commit batches."""
        relay, conn = self.relay, self.conn
        self.holder.add_termination_listener(self._unlock)
        if _lost(self.holder):  # closed before it listened (a raw connection says nothing)
            self._unlock(self.holder)
        try:
            while True:
                # READ COMMITTED whatever the database's default: each statement sees
                # what committed before it, so the select sees the deletes of the relay
                # that held a lane until just before this one took it.
                async with conn.transaction(isolation="read_committed"):
                    await conn.execute(relay._plan_sql)
                    handing = await self._batch()
                    outcome = self.outcome
                    if handing:  # what is sent from now on is the next batch's
                        self.outcome = _Sent()
                        self.until = self.loop.time() + self.seconds
                        self.done = False  # (senders out of rows wait for the next)
                    await self._settle(outcome)
                self.sent += len(outcome.sent)
                self.in_hand.difference_update(outcome.sent)  # deleted, committed
                self.in_hand.difference_update(row["position"] for row, _ in outcome.parked)
                if not handing:
                    self.more = outcome.full or outcome.cut
                    break
                if self.idle_limit:  # the holder's transaction is not idle for long
                    await self.holder.execute("SELECT 1")
            if self.unlocked:
                raise ConnectionError("the connection that held the pass's lanes was closed")
            for task in self.senders:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]  # (a sender's bug, not lost)
        except BaseException:
            self.lost = self.unlocked or _lost(conn) or _lost(self.holder)
            raise
        finally:
            # A read or a delete failed, or the pass is cancelled: no sender outlives it.
            stray = [task for task in self.senders if not task.done()]
            for task in stray:
                task.cancel()
            await asyncio.gather(*stray, return_exceptions=True)
            if not _lost(self.holder):
                self.holder.remove_termination_listener(self._unlock)

    def _unlock(self, _: object) -> None:
        self.unlocked = True
        self.changed.set()

    async def _batch(self) -> bool:
        """Read the batch's rows, send them (with those the batch before handed over)
        and delete them as they are sent. True: the next batch takes over the sends
        still under way; False: every send has returned, and the pass ends."""
        relay = self.relay
        self.read = 0
        # The bytes the batch may read: what the rows in hand leave of BATCH_BYTES (at
        # least half of it: a batch hands over only then, see _handing).
        self.budget = max(1, BATCH_BYTES - self.unstarted_bytes)
        self.cursor = await self.conn.cursor(
            relay._select_sql,
            self.lanes,
            relay.batch,
            self.budget,
            list(self.in_hand),
            max(self.in_hand, default=0),
        )
        self.done = False
        while not self.done:
            await self._read()
            await self._delete(self.outcome)
        self.arrived.set()
        outcome = self.outcome
        while True:
            self.changed.clear()
            if self._handing() and self._goes_on():
                return True
            if not self.active:
                return False
            returned = self.returned
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.changed.wait()
            except TimeoutError:
                if self.returned == returned:
                    self._give_up()
                continue
            if len(outcome.sent) - outcome.deleted >= DELETE_CHUNK:
                await self._delete(outcome)

    def _give_up(self) -> None:
        """Cancel the sends under way: none returned within ``SEND_TIMEOUT``."""
        hung = [task for task in self.senders if not task.done()]
        error = TransportError(
            f"{len(hung)} send(s) did not return within {SEND_TIMEOUT:g} s: given up "
            f"(their rows stay in the outbox, and are sent again)"
        )
        logger.warning("relay %s: %s", self.relay.database.outbox, error)
        if self.failure is None:
            self.failure = error
        self.given_up = error
        for task in hung:
            task.cancel()

    def _handing(self) -> bool:
        """Whether few enough rows are left to start for the batch to hand over: half a
        batch, and half of ``BATCH_BYTES`` (a batch full by bytes has few rows, and the
        rows in hand must stay within about one batch's bytes)."""
        return self.unstarted <= self.handover and self.unstarted_bytes <= BATCH_BYTES // 2

    def _goes_on(self) -> bool:
        """Whether another batch follows this one in the pass."""
        outcome = self.outcome
        return (
            outcome.full
            and not outcome.cut
            and self.failure is None
            and not self.relay._stopping.is_set()
            and not self.unlocked
            and self.loop.time() - self.began < PASS_SECONDS
        )

    async def _settle(self, outcome: _Sent) -> None:
        """Delete the rest of the batch's sent rows, park and charge the others (the
        caller commits)."""
        relay = self.relay
        await self._delete(outcome)
        for row, exc in outcome.parked:
            await relay._park(self.conn, row, exc)
        # The broker takes the other rows: those it refused are charged an attempt
        # (committed with the deletes), and parked after FAILED_SENDS. With nothing sent
        # in the pass it is an outage, nobody's fault.
        if outcome.failed and (self.sent or outcome.sent):
            await relay._charge(self.conn, outcome.failed)

    async def _read(self) -> None:
        relay = self.relay
        rows = await self.cursor.fetch(CHUNK)
        self.read += len(rows)
        outcome = self.outcome
        outcome.full = self.read >= relay.batch or (bool(rows) and rows[-1]["upto"] >= self.budget)
        self.done = len(rows) < CHUNK or outcome.full or relay._stopping.is_set()
        if not self.done and self.loop.time() >= self.until:
            self.done = outcome.cut = True  # rows may wait unread: the next pass goes on
        chains, keys, failed, in_hand = self.chains, self.keys, self.failed, self.in_hand
        opened = started = size = 0
        for row in rows:
            key = row["message_key"]
            if key is None:
                chains.append([row])
                opened += 1
            elif key in failed:
                continue  # behind a row of its key that failed: it waits in the table
            elif (chain := keys.get(key)) is not None:
                chain.append(row)  # its sender comes to it, in order
            else:
                keys[key] = chain = [row]
                chains.append(chain)
                opened += 1
            in_hand.add(row["position"])
            started += 1
            size += len(row["payload"])
        self.open_chains += opened
        self.unstarted += started
        self.unstarted_bytes += size
        # A sender per chain not sent yet, up to in_flight (a sender takes the next
        # chain once it has sent one).
        while self.active < min(relay.in_flight, self.open_chains):
            self.active += 1
            self.senders.append(asyncio.create_task(self._sender()))
        self.arrived.set()

    async def _delete(self, outcome: _Sent) -> None:
        sent = outcome.sent
        if len(sent) > outcome.deleted:
            chunk = sent[outcome.deleted :]
            await self.conn.execute(self.relay._delete_sql, chunk)
            outcome.deleted += len(chunk)

    async def _sender(self) -> None:
        try:
            await self._send()
        finally:
            self.active -= 1
            if not self.active:
                self.changed.set()

    async def _send(self) -> None:
        """Send chains until none is left. ``changed`` is set when ``DELETE_CHUNK``
        more rows were sent, and when all but ``handover`` rows read were started."""
        relay = self.relay
        send = relay.transport.send
        telemetry = relay.telemetry
        stopping = relay._stopping
        now = self.loop.time
        chains, keys = self.chains, self.keys
        handover, half = self.handover, BATCH_BYTES // 2
        while True:
            while chains:
                chain = chains.popleft()
                key = chain[0]["message_key"]
                for row in chain:  # (rows read meanwhile join a key's chain)
                    if stopping.is_set() or self.unlocked:
                        return
                    outcome = self.outcome
                    if outcome.sent and now() >= self.until:
                        outcome.cut = True
                        return
                    # One more row started: the batch hands over once all but
                    # ``handover`` rows (and half of BATCH_BYTES) are (see _handing).
                    size = len(row["payload"])
                    unstarted = self.unstarted = self.unstarted - 1
                    left = self.unstarted_bytes = self.unstarted_bytes - size
                    if (
                        unstarted <= handover
                        and left <= half
                        and (unstarted == handover or left + size > half)
                    ):
                        self.changed.set()  # (it was not handing before this row)
                    self.begun += 1
                    begun = self.begun
                    try:
                        try:
                            if telemetry is None:
                                await send(row["address"], envelope_of(row))
                            else:
                                await self._observed(telemetry, row)
                        except asyncio.CancelledError as exc:
                            task = asyncio.current_task()
                            if task is None or task.cancelling():
                                if self.given_up is not None:
                                    if key is not None:
                                        self.failed.add(key)  # (its next rows wait)
                                    if self.taken > begun:
                                        # Given up while the broker took a send begun
                                        # after it: a failed attempt of its row like a
                                        # refusal (parked after FAILED_SENDS): a row
                                        # whose send always hangs must not hold its key
                                        # up for ever. (Not when the broker went silent
                                        # as it was under way: an outage, nobody's fault.)
                                        self.outcome.failed.append((row, self.given_up))
                                raise  # the relay's own: it stops
                            # A driver that cancelled its own future (its connection
                            # closed): a failed send, not the relay's end.
                            raise TransportError(f"the send was cancelled: {exc!r}") from exc
                        finally:
                            self.returned += 1  # (news: the batch waits SEND_TIMEOUT for it)
                    except (SerializationError, ImproperlyConfigured, MessageRefused) as exc:
                        self.outcome.parked.append((row, exc))  # the chain goes on
                    except Exception as exc:
                        self.outcome.failed.append((row, exc))
                        if self.failure is None:
                            self.failure = exc
                        if key is not None:
                            self.failed.add(key)
                        break  # the key's next rows wait behind this one
                    else:
                        self.taken = max(self.taken, begun)
                        # (the batch open now: the one before may have committed)
                        outcome = self.outcome
                        sent = outcome.sent
                        sent.append(row["position"])
                        if len(sent) - outcome.deleted == DELETE_CHUNK:
                            self.changed.set()
                if key is not None and keys.get(key) is chain:
                    del keys[key]  # (no await since its last row: none joins it now)
                self.open_chains -= 1
            if self.done:
                return
            self.arrived.clear()
            await self.arrived.wait()

    async def _observed(self, telemetry: Telemetry, row: Any) -> None:
        to, envelope = row["address"], envelope_of(row)
        kind = to.partition(".")[0]
        sending = Sending("send", self.relay._system, kind, to, to, envelope, relayed=True)
        with telemetry.send(sending) as envelope:
            await self.relay.transport.send(to, envelope)


class _Outage:
    """Logs a failure once per outage (WARNING) and its end (INFO); says how long to wait
    before the next attempt (``RETRY_FIRST``, doubling up to ``RETRY_CAP``)."""

    def __init__(self, failing: str, meanwhile: str, again: str) -> None:
        self.failing = failing  # "<what> failed"
        self.meanwhile = meanwhile  # what happens until it works again
        self.again = again  # "<what works again>"
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: Exception) -> float:
        self.failures += 1
        error = f"{type(exc).__name__}: {exc}"
        if self.failures == 1:
            self.since = asyncio.get_running_loop().time()
            logger.warning(
                "%s: %s; %s (trying again with growing delays, up to %g s; logged once "
                "until it works again)",
                self.failing,
                error,
                self.meanwhile,
                RETRY_CAP,
            )
        else:
            logger.debug("%s again: %s", self.failing, error)
        return float(min(RETRY_FIRST * 2 ** (self.failures - 1), RETRY_CAP))

    def ended(self) -> None:
        if self.failures:
            logger.info(
                "%s, after %d failed attempt(s) over %.1f s",
                self.again,
                self.failures,
                asyncio.get_running_loop().time() - self.since,
            )
            self.failures = 0


# -- what the outbox holds ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What an outbox holds: ``iambus status --database DSN`` prints it."""

    backlog: int
    """Rows waiting to be sent (parked ones excluded)."""
    oldest_age: float | None
    """Seconds since the oldest waiting row was written (by the database's clock); None
    when none waits. A growing age means no relay runs, or it cannot send."""
    parked: int
    """Rows that cannot be sent, kept with the reason (``iambus outbox list``)."""


async def outbox_status(database: Database) -> OutboxStatus:
    """The backlog, the oldest waiting row's age and the parked rows of ``database``'s
    outbox."""
    async with database.connection() as conn:
        row = await conn.fetchrow(
            f"SELECT count(*) FILTER (WHERE parked_at IS NULL) AS backlog, "
            f"count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, "
            f"extract(epoch FROM now() - min(stored_at) FILTER (WHERE parked_at IS NULL))"
            f"::float8 AS oldest_age FROM {database.outbox}"
        )
    oldest = row["oldest_age"]
    return OutboxStatus(
        backlog=int(row["backlog"]),
        oldest_age=None if oldest is None else max(float(oldest), 0.0),
        parked=int(row["parked"]),
    )


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """An outbox row the relay could not send, kept with the reason."""

    position: int
    message_id: str
    name: str
    address: str
    key: str | None
    attempts: int
    """Its failed attempts: sends the broker refused while it took other rows, and the
    times it was parked for a reason that needs no second try."""
    error: str
    parked_at: float
    """Unix time."""


async def parked(database: Database, *, limit: int = 100) -> list[ParkedRow]:
    """The parked rows of ``database``'s outbox, oldest position first, at most ``limit``."""
    check_count("limit", limit)
    async with database.connection() as conn:
        rows = await conn.fetch(
            f"SELECT position, message_id, name, address, message_key, attempts, "
            f"coalesce(last_error, '') AS error, extract(epoch FROM parked_at)::float8 AS at "
            f"FROM {database.outbox} WHERE parked_at IS NOT NULL ORDER BY position LIMIT $1",
            limit,
        )
    return [
        ParkedRow(
            position=row["position"],
            message_id=row["message_id"],
            name=row["name"],
            address=row["address"],
            key=row["message_key"],
            attempts=row["attempts"],
            error=row["error"],
            parked_at=row["at"],
        )
        for row in rows
    ]


async def release(database: Database, positions: Sequence[int] | None = None) -> list[int]:
    """Give parked rows back to the relays (all of them with None); the positions
    released. A row that was not parked is left as it is (and not listed)."""
    async with database.connection() as conn:
        rows = await conn.fetch(
            f"UPDATE {database.outbox} SET parked_at = NULL "
            f"WHERE parked_at IS NOT NULL AND ($1::bigint[] IS NULL OR position = ANY($1)) "
            f"RETURNING position",
            None if positions is None else list(positions),
        )
        if rows:
            await conn.execute("SELECT pg_notify($1, '')", database.channel)
    return sorted(row["position"] for row in rows)
