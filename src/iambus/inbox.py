"""The inbox: which messages a handler has already applied, kept in the handler's database.

A handler run in a unit of work on a command or event from a transport first records
(envelope id, its subscription's group — ``"<service>.<handler>[#n]"`` for an event, the
service for a command; stored in the ``handler`` column) in the inbox table, in the same
transaction as its writes. A redelivery of
that message (the broker's at-least-once) finds the record and is acked without running
the handler again; one delivered twice at once waits on the first's uncommitted record,
then finds it. If the handler fails, its transaction rolls back, record included, and the
message is retried as any other. So a message's effects in the database are applied once.

A command whose requester waits for its result (a routed ``execute()``) also keeps the
answer it is sent in its record (``keep_answer``), in the same transaction; a redelivery
the record skips is answered with it (``kept_answer``), so a requester whose first answer
was lost (its worker died after the commit, or a middleware failed after it) still gets
the result instead of a timeout.

Records are kept ``Database(inbox_retention=...)`` seconds (a week by default), longer
than any broker redelivers a message; ``purge`` deletes older ones (each relay does it
once an hour, in a task of its own, in chunks, skipped while another relay purges).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .database import Database

__all__ = ["claim", "claim_again", "keep_answer", "kept_answer", "purge"]

PURGE_CHUNK = 10_000  # records deleted per statement
PURGE_LOCK = -1  # the second key of the purge's advisory lock (the relays' lanes are 0..15)


async def claim(conn: Any, database: Database, message_id: str, handler: str) -> bool:
    """Record that ``handler`` (a subscription's group) applies message ``message_id``, in
    ``conn``'s transaction; False when it was recorded already (a redelivery: skip it)."""
    # handled_at set here, not by the column's default (a table made elsewhere may have
    # another): claim_again knows this transaction's record by it.
    status = await conn.execute(
        f"INSERT INTO {database.inbox} (message_id, handler, handled_at) "
        f"VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
        message_id,
        handler,
    )
    return bool(status == "INSERT 0 1")


async def claim_again(conn: Any, database: Database, message_id: str, handler: str) -> bool:
    """``claim`` once more in the transaction that claimed it (a middleware running the
    handler again): True while the record is this transaction's, made again if a
    savepoint rolled it back; False when a record of another transaction took its place
    meanwhile (a redelivery that waited on the first record, then committed its own)."""
    # A record this transaction made has its start time: now() (another's, its own).
    return bool(
        await conn.fetchval(
            f"WITH made AS (INSERT INTO {database.inbox} (message_id, handler, handled_at) "
            f"VALUES ($1, $2, now()) ON CONFLICT DO NOTHING RETURNING 1) "
            f"SELECT EXISTS (SELECT FROM made) OR EXISTS (SELECT FROM {database.inbox} "
            f"WHERE message_id = $1 AND handler = $2 AND handled_at = now())",
            message_id,
            handler,
        )
    )


async def keep_answer(
    conn: Any, database: Database, message_id: str, handler: str, answer: tuple[bytes, str]
) -> None:
    """Keep ``answer`` (payload, content type: what the requester of command
    ``message_id`` is sent) in ``handler``'s record of it, claimed in ``conn``'s
    transaction."""
    await conn.execute(
        f"UPDATE {database.inbox} SET answer = $3, answer_type = $4 "
        f"WHERE message_id = $1 AND handler = $2",
        message_id,
        handler,
        *answer,
    )


async def kept_answer(
    conn: Any, database: Database, message_id: str, handler: str
) -> tuple[bytes, str] | None:
    """The answer kept in ``handler``'s record of ``message_id`` (payload, content type),
    or None: none was kept (an event, a command without a result, a record of an older
    version, or a result that did not encode)."""
    row = await conn.fetchrow(
        f"SELECT answer, answer_type FROM {database.inbox} WHERE message_id = $1 AND handler = $2",
        message_id,
        handler,
    )
    if row is None or row["answer"] is None:
        return None
    return bytes(row["answer"]), row["answer_type"]


async def purge(conn: Any, database: Database, *, stopping: asyncio.Event | None = None) -> int:
    """Delete the inbox records older than the retention; how many were deleted.

    In statements of ``PURGE_CHUNK`` records, each its own transaction, so that no lock
    is held long; each takes a transaction-scoped advisory lock, and the purge ends when
    another purge (another relay's) holds it. ``stopping`` set ends it between two
    statements."""
    sql = (
        f"DELETE FROM {database.inbox} WHERE (SELECT pg_try_advisory_xact_lock($1::int, "
        f"{PURGE_LOCK})) AND ctid IN (SELECT ctid FROM {database.inbox} "
        f"WHERE handled_at < now() - make_interval(secs => $2) LIMIT $3)"
    )
    purged = 0
    while stopping is None or not stopping.is_set():
        status = await conn.execute(sql, database.lock_space, database.inbox_retention, PURGE_CHUNK)
        deleted = int(status.rpartition(" ")[2] or 0)
        purged += deleted
        if deleted < PURGE_CHUNK:
            break
    return purged
