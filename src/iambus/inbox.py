"""The inbox: which messages a handler has already applied, kept in the handler's database.

A handler run in a unit of work on a command or event from a transport first records
(envelope id, its subscription's group — ``"<service>.<handler>[#n]"`` for an event, the
service for a command; stored in the ``handler`` column) in the inbox table, in the same
transaction as its writes. A redelivery of
that message (the broker's at-least-once) finds the record and is acked without running
the handler again; one delivered twice at once waits on the first's uncommitted record,
then finds it. If the handler fails, its transaction rolls back, record included, and the
message is retried as any other. So a message's effects in the database are applied once.

Records are kept ``Database(inbox_retention=...)`` seconds (a week by default), longer
than any broker redelivers a message; ``purge`` deletes older ones (the relay does it
once an hour).
"""

from __future__ import annotations

from typing import Any

from .database import Database

__all__ = ["claim", "purge"]


async def claim(conn: Any, database: Database, message_id: str, handler: str) -> bool:
    """Record that ``handler`` (a subscription's group) applies message ``message_id``, in
    ``conn``'s transaction; False when it was recorded already (a redelivery: skip it)."""
    status = await conn.execute(
        f"INSERT INTO {database.inbox} (message_id, handler) VALUES ($1, $2) "
        f"ON CONFLICT DO NOTHING",
        message_id,
        handler,
    )
    return bool(status == "INSERT 0 1")


async def purge(conn: Any, database: Database) -> int:
    """Delete the inbox records older than the retention; how many were deleted."""
    status = await conn.execute(
        f"DELETE FROM {database.inbox} WHERE handled_at < now() - make_interval(secs => $1)",
        database.inbox_retention,
    )
    return int(status.rpartition(" ")[2] or 0)
