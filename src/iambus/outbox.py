"""The outbox: messages written in the sender's database transaction, sent after commit.

A unit of work (``unit_of_work``) does not hand its messages to the transport: it writes
each as one row of the outbox table, in the transaction of the handler's own writes, so
both commit or neither does. The relay (``relay``) sends committed rows to the transport
with their envelope unchanged (same id: a resend is recognisably the same message), then
deletes them.

Ordering. Every row gets a ``lane`` (one of ``LANES``): its key's lane, or a random one
for a message without a key. One relay at a time holds a lane (an advisory lock), and
sends a key's rows one after the other in ``position`` order. Writers of one key
serialise on an advisory lock of that key taken just before their rows get their
positions, so that, per key, position order is commit order: rows of one key are sent in
the order they were committed, whichever relay sends them. (The lock is held until
commit; transactions writing rows of one key queue behind each other, as they would on
the row of the aggregate they change.)

Nothing is skipped. The relay keeps no high-water mark: each pass reads every committed
row still in the table. A long transaction that commits rows with lower positions than
rows already sent is read on the next pass (its commit's ``NOTIFY``, or polling).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .database import Database
from .envelope import Envelope
from .errors import SerializationError

__all__ = ["LANES", "Outgoing", "envelope_of", "lane_of", "write"]

LANES = 16  # lanes of one outbox table: fixed, as rows already written carry theirs


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a unit of work sends: where to, and its envelope."""

    address: str
    envelope: Envelope


def lane_of(key: str | None) -> int:
    """The lane of a message with ``key``: the same for every row of one key."""
    if key is None:
        return random.randrange(LANES)
    return zlib.crc32(key.encode()) % LANES


def key_lock(database: Database, key: str) -> int:
    """The advisory lock (one bigint) writers of ``key`` in ``database``'s outbox share."""
    digest = hashlib.blake2b(f"{database.outbox}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _insert(database: Database, locked: bool, notify: bool) -> str:
    # One statement per row: the NOTIFY (delivered at commit; repeats within one
    # transaction fold into one) and, for a keyed row, the key's lock, are taken in the
    # FROM clause, so before the row is formed and its position drawn.
    taken = ["pg_notify($12, '')"] if notify else []
    if locked:
        taken.append(f"pg_advisory_xact_lock(${12 + len(taken)}::bigint)")
    source = f" FROM (SELECT {', '.join(taken)}) AS taken" if taken else ""
    return (
        f"INSERT INTO {database.outbox} (lane, address, message_id, name, message_key, "
        f"payload, content_type, correlation_id, causation_id, headers, created_at) "
        f"SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10::jsonb, '{{}}'), $11{source}"
    )


async def write(
    conn: Any, database: Database, outgoing: Sequence[Outgoing], *, notify: bool = True
) -> None:
    """Write ``outgoing`` as outbox rows on the asyncpg connection ``conn``, in the
    transaction it is in (the caller's; its commit sends them).

    ``notify``: the transaction also sends the relays' ``NOTIFY``, delivered at its
    commit. False: the caller wakes the relays itself once it has committed
    (``Database.notify_relays()``), which keeps the commit out of PostgreSQL's one lock
    for notifying commits (held through the commit's WAL flush, so notifying
    transactions commit one at a time, across the whole server).
    """
    if not outgoing:
        return
    plain: list[tuple[Any, ...]] = []
    keyed: list[tuple[Any, ...]] = []
    channel: tuple[str, ...] = (database.channel,) if notify else ()
    for out in outgoing:
        e = out.envelope
        row = (
            lane_of(e.key),
            out.address,
            e.id,
            e.name,
            e.key,
            e.payload,
            e.content_type,
            e.correlation_id,
            e.causation_id,
            json.dumps(dict(e.headers)) if e.headers else None,  # (most have none)
            e.created_at,
            *channel,
        )
        if e.key is None:
            plain.append(row)
        else:
            keyed.append((*row, key_lock(database, e.key)))
    # Keyed rows are written in the order of their key's lock: two transactions locking
    # two keys in opposite orders would deadlock. The sort is stable, so the rows of one
    # key keep the order they were sent in.
    keyed.sort(key=lambda row: row[-1])
    if keyed:
        await _run(conn, _insert(database, True, notify), keyed)
    if plain:
        await _run(conn, _insert(database, False, notify), plain)


async def _run(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if len(rows) == 1:
        await conn.execute(sql, *rows[0])
    else:
        await conn.executemany(sql, rows)


_ENVELOPE_FIELDS = (
    "name",
    "payload",
    "content_type",
    "id",
    "correlation_id",
    "causation_id",
    "created_at",
    "reply_to",
    "key",
    "headers",
)
# The relay rebuilds an envelope per row: the frozen dataclass's __init__ (one
# object.__setattr__ per field) costs about 2 µs, a tenth of the relay's own time per
# row; setting the slots through their descriptors, 0.6 µs. Every field is set; a field
# added to Envelope stops this module from importing until it is set here too.
_new = object.__new__
(
    _set_name,
    _set_payload,
    _set_content_type,
    _set_id,
    _set_correlation_id,
    _set_causation_id,
    _set_created_at,
    _set_reply_to,
    _set_key,
    _set_headers,
) = (vars(Envelope)[name].__set__ for name in _ENVELOPE_FIELDS)
if tuple(f.name for f in dataclasses.fields(Envelope)) != _ENVELOPE_FIELDS:
    raise ImportError(f"envelope_of() does not set every field of {Envelope!r}")

# What the relay selects, in this order, to rebuild a row's envelope with envelope_of().
ROW_COLUMNS = (
    "position, address, message_id, name, message_key, payload, content_type, "
    "correlation_id, causation_id, headers, created_at, attempts"
)


def envelope_of(row: Mapping[str, Any]) -> Envelope:
    """The envelope an outbox row holds (a ``SerializationError`` naming the row if a
    column does not hold what a writer of this version writes)."""
    try:
        headers = row["headers"]
        if headers == "{}":  # what most rows hold (asyncpg gives jsonb as its text)
            headers = {}
        else:
            if isinstance(headers, str):
                headers = json.loads(headers)
            if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                raise ValueError(f"headers must be a JSON object of strings, got {headers!r}")
        payload = row["payload"]
        created_at = row["created_at"]
        if type(payload) is not bytes or type(created_at) is not float:
            payload, created_at = bytes(payload), float(created_at)
        envelope = _new(Envelope)
        _set_name(envelope, row["name"])
        _set_payload(envelope, payload)
        _set_content_type(envelope, row["content_type"])
        _set_id(envelope, row["message_id"])
        _set_correlation_id(envelope, row["correlation_id"])
        _set_causation_id(envelope, row["causation_id"])
        _set_created_at(envelope, created_at)
        _set_reply_to(envelope, None)
        _set_key(envelope, row["message_key"])
        _set_headers(envelope, headers)
        return envelope
    except (KeyError, TypeError, ValueError) as exc:
        position = row.get("position") if hasattr(row, "get") else None
        raise SerializationError(
            f"outbox row {position} does not hold an envelope iambus can send: {exc}"
        ) from exc
