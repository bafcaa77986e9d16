"""``RedisTransport``: Redis Streams (``pip install 'iambus[redis]'``).

``redis://127.0.0.1:6379/0?namespace=shop&partitions=16`` — every key starts with the
namespace (default ``iambus``). How the seam maps onto Redis:

* an address is a stream ``<ns>:<address>``; a group is a consumer group on it, created
  at ``$`` (new entries) or ``0`` (``from_start``), with ``MKSTREAM``;
* ``receive`` reads with ``XREADGROUP`` in batches, blocking at most ``block`` seconds per
  call, from the stream and from the group's own *direct* stream ``<ns>:<address>@<group>``
  (where replayed dead letters go, so that they reach that group only);
* ``retry(delay)`` parks the entry under the consumer ``__retry__`` and records its due
  time in the sorted set ``<ns>:due:<address>@<group>`` — one Lua script, so nothing is
  lost in between; due entries are claimed back (``XCLAIM``) by the next ``receive``,
  which looks every ``block`` seconds and as soon as the due set says one is due (more
  due than it has room for: the receive after it looks again at once);
* the attempt is Redis's own delivery counter of the entry in the group's pending list:
  it survives restarts and counts across instances;
* an entry a consumer neither acks nor retries for ``claim_after`` seconds (a crash,
  a ``SIGKILL``) is claimed by another consumer (``XPENDING IDLE`` + ``XCLAIM``, which
  re-checks the idle time, so two consumers never both win it);
* ``dead_letter`` adds the entry and its failure to ``<ns>:dead`` and acks it in one
  ``MULTI``; ``replay`` moves a dead letter to its group's direct stream;
* ``request`` / ``reply`` use a pub/sub channel per transport instance; ``reply`` returns
  once its ``PUBLISH`` is done and raises if it failed (a user without the channel
  right, say), so a delivery is acked only after its reply went out;
* the registry (``announce`` / ``instances``): the hash ``<ns>:instances`` (id ->
  instance), their expiries in the sorted set ``<ns>:instances:until`` (Redis's clock:
  one Lua script drops the expired ones and records or reads), the groups in the hash
  ``<ns>:groups``;
* concurrent sends, and concurrent replies and acks, are coalesced: all issued while a
  flush is in flight go out together in the next one (one pipeline, each command's error
  its own sender's only), which is what makes throughput close to the raw client's.
  ``close()`` lets the sends, replies and acks issued before it go out (``CLOSE_WAIT`` =
  5 s at most; those still waiting then fail with ``TransportError``), refuses those
  issued after, and leaves no task of the transport running.

Per-key ordering (``iambus.partitions``): an envelope with a ``key`` goes to the
*partition stream* ``<ns>:<address>#<n>``, ``n = partition(key, partitions)``, and a
*pointer* entry (``@p = n``) to the address's stream, in the same pipeline. ``declare``
creates the group on the stream, the direct stream and all ``partitions`` partition
streams (one Lua script; so ``partitions`` small streams per address, made even if no
key is ever sent). The lock is the group's pending list: it holds at most one entry of
each partition stream, and every step that reads or changes that is one Lua script, so
the rule holds across all consumers and processes:

* a consumer that reads pointers runs *take* (which also acks them): per partition
  named, if the group has nothing of it pending, its next entry is read
  (``XREADGROUP COUNT 1``), in stream order; else nothing — the settle hands it on.
  The keyed delivery takes its pointer's place in what ``receive`` returns;
* ``ack`` / ``dead_letter`` of a keyed delivery (one script: dead letter, ``XACK``)
  add a pointer for that group only (``@g``) when the partition holds more for it, so a
  consumer blocked on the stream wakes up and takes the next entry;
* ``retry`` parks it as above: still pending, so the partition stays blocked until the
  entry is claimed back when due (attempt + 1) and settled;
* every ``min(claim_after / 2, 5)`` s, a receive with room (per transport and group)
  *sweeps* the partition streams that have entries, before reading the stream (so that
  a backlog of unkeyed envelopes, filling every receive, cannot put it off): a keyed
  delivery left unsettled for ``claim_after`` is claimed (``XCLAIM``: attempt + 1)
  and comes first, then the rest in order; an entry whose pointer was lost (trimmed,
  a connection dropped between the two ``XADD``) is picked up. The reclaim of unkeyed
  deliveries runs as often; either looks again at the next receive when it found as
  many as the receive had room for, so a dead consumer's whole batch comes back at once;
* only the holder of a keyed delivery (same consumer, same delivery count) settles it:
  the ack, retry or dead letter of a handler that outlived ``claim_after`` is ignored
  and logged, so it never releases the partition while the new holder has the entry
  out (their two runs of it may overlap; the next entry waits for the new holder);
* ``replay`` of a keyed dead letter appends it to the partition stream it came from
  (recorded in the dead letter, so a replaying process with another ``partitions``
  still finds it) marked ``@g`` with its group, behind what the partition holds; other
  groups ack and skip it;
* ``close()`` parks the deliveries it handed out and saw no settle of (a stopping
  worker's cancelled handlers), keyed or not, as retries due at once, so that they (and
  their partitions) pass on within ``block`` seconds, counted (attempt + 1), not after
  ``claim_after``; ``leave(consumer)`` does the same for one consumer's, on a transport
  that stays open.

No leases: any consumer of the group takes any free partition whose pointer it reads,
so one instance may hold many (up to all) partitions of a group at once. Limits: keyed
and unkeyed envelopes are not ordered relative to each other; a hand-over pointer is
read (and skipped) by every other group of the address too; a crashed holder's
partition waits ``claim_after`` plus up to one sweep interval. Every process of a
namespace must use the same ``partitions``: a pointer to a partition this transport did
not declare is logged (once) and acked, and its entries wait for a transport that has
it.

Trimming: each stream is capped near ``max_length`` entries (``XADD MAXLEN ~``, default
1,000,000). Entries stay in the stream after they are acked, until the cap pushes them
out; a group lagging more than ``max_length`` entries behind would lose the oldest, so
size it well above any backlog you expect (pointers count toward the address's
stream). Driver errors surface as ``TransportError``. A command without Redis's answer
for ``timeout`` (default 10, also ``?timeout=``) plus ``block`` seconds fails, and its
connection is dropped (a connection that died silently); the connect timeout is
``timeout``; TCP keepalive is on; the reply listener pings a quiet subscription (see
docs/redis.md). The Lua scripts touch several keys
each: the transport needs a single Redis (or a replicated primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..envelope import Envelope, finite_time
from ..errors import (
    ImproperlyConfigured,
    SerializationError,
    TransportError,
    TransportRefused,
    check_count,
    check_name,
    check_seconds,
)
from ..partitions import partition, partitions_option
from . import (
    ANNOUNCE_TTL,
    UNREADABLE,
    Backlog,
    Capability,
    DeadLetter,
    Delivery,
    Failure,
    Instance,
    Transport,
    client_name,
    redact,
    url_seconds,
)

try:
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("the Redis transport needs redis-py: pip install 'iambus[redis]'") from exc

__all__ = ["RedisTransport"]

logger = logging.getLogger(__name__)

RETRY_OWNER = "__retry__"
CLOSE_WAIT = 5.0  # seconds close() waits for the sends and acks in flight
CANCEL_AGAIN = 0.1  # seconds before a task that ignored its cancellation is cancelled again
TIMEOUT = 10.0  # default seconds a command may go without Redis's answer (beyond its block)
KEEPALIVE_MAX = 32767  # seconds: the longest TCP keepalive idle time and interval (Linux)
# Driver options the transport derives from its own timeout (and block): not in the URL.
_DERIVED = ("socket_timeout", "socket_connect_timeout")

# A send waiting in the coalescer: stream, fields, and for a keyed one its pointer
# (the address's stream, the pointer's fields).
_Send = tuple[str, dict[str, bytes | str], tuple[str, dict[str, str]] | None]

# An ack or a reply waiting in the coalescer: (stream, group, entry id) or
# (reply channel, None, the reply's bytes). Each gets its own command's result, or error.
_Settle = tuple[str, str | None, bytes]

# Claim due retries: KEYS = stream, direct stream, due set; ARGV = group, consumer, limit,
# the prefix of the partition streams. Members of the due set are "<mark>:<id>", the mark
# naming the stream that holds the entry: "m" the stream, "d" the direct stream, "p<n>"
# partition stream n. Returns the entries claimed and the ms until the next member is
# due (0: more are due now; -1: none waits).
_CLAIM_DUE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, ARGV[3])
local out = {}
for _, member in ipairs(members) do
  redis.call('ZREM', KEYS[3], member)
  local colon = string.find(member, ':', 1, true)
  local mark, id = string.sub(member, 1, colon - 1), string.sub(member, colon + 1)
  local key = KEYS[1]
  if mark == 'd' then
    key = KEYS[2]
  elseif mark ~= 'm' then
    key = ARGV[4] .. string.sub(mark, 2)
  end
  local claimed = redis.call('XCLAIM', key, ARGV[1], ARGV[2], 0, id)
  if claimed[1] then
    local pending = redis.call('XPENDING', key, ARGV[1], id, id, 1)
    table.insert(out, {mark, claimed[1][1], claimed[1][2], pending[1][4]})
  end
end
local next = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
if next then return {out, math.max(tonumber(next) - now_ms, 0)} end
return {out, -1}
"""

# Claim abandoned deliveries: KEYS = stream, direct stream;
# ARGV = group, consumer, min idle ms, limit, the retry owner to skip. Looks consumer by
# consumer, so that entries parked for a retry never crowd out a crashed consumer's. The
# caller's own entries count too: an ack lost with a killed connection must come back.
_RECLAIM = """
local out = {}
local marks = {'m', 'd'}
local limit = tonumber(ARGV[4])
for k, key in ipairs(KEYS) do
  local consumers = redis.call('XINFO', 'CONSUMERS', key, ARGV[1])
  for _, info in ipairs(consumers) do
    local name, pending = nil, 0
    for i = 1, #info, 2 do
      if info[i] == 'name' then name = info[i + 1] end
      if info[i] == 'pending' then pending = tonumber(info[i + 1]) end
    end
    if name ~= ARGV[5] and pending > 0 and #out < limit then
      local entries = redis.call(
        'XPENDING', key, ARGV[1], 'IDLE', ARGV[3], '-', '+', limit - #out, name)
      for _, entry in ipairs(entries) do
        local claimed = redis.call('XCLAIM', key, ARGV[1], ARGV[2], ARGV[3], entry[1])
        if claimed[1] then
          table.insert(out, {marks[k], claimed[1][1], claimed[1][2], entry[4] + 1})
        end
      end
    end
  end
end
return out
"""

# Park an entry for a retry: KEYS = stream holding it, due set;
# ARGV = group, id, delay ms, member, the retry owner, and for a keyed delivery its
# consumer and delivery count: parked only if it is still that consumer's (returns 0 if not).
_PARK_FOR_RETRY = """
if ARGV[6] then
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)[1]
  if not held or held[2] ~= ARGV[6] or held[4] ~= tonumber(ARGV[7]) then return 0 end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], 0, ARGV[2], 'JUSTID')
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[4])
return 1
"""

# Create a group on every stream of an address, idempotently: KEYS = stream, direct
# stream, partition streams; ARGV = group, where it starts (the direct stream: at "0").
_DECLARE = """
for i, key in ipairs(KEYS) do
  local start = ARGV[2]
  if i == 2 then start = '0' end
  local made = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], start, 'MKSTREAM')
  if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP', 1, true) then
    return made
  end
end
return #KEYS
"""

# Take keyed entries for a group: KEYS = the stream, then partition streams; ARGV = group,
# consumer, claim ms, the retry owner, limit, then ids of pointers on the stream to ack.
# The group has at most one entry of a partition stream pending. With none, the next
# entry is read (entries replayed to another group, marked "@g", are acked and skipped);
# with one that its consumer left for claim ms (not one parked for a retry), it is
# claimed. Returns {index of the partition stream, id, fields, delivery count} each.
_TAKE = """
local group, consumer, parked = ARGV[1], ARGV[2], ARGV[4]
local claim_ms, limit = tonumber(ARGV[3]), tonumber(ARGV[5])
local out = {}
for i = 2, #KEYS do
  if #out >= limit then break end
  local key = KEYS[i]
  if redis.call('XLEN', key) > 0 then
    local free = true
    local held = redis.call('XPENDING', key, group, '-', '+', 1)[1]
    if held then
      free = false
      if held[2] ~= parked and held[3] >= claim_ms then
        local claimed = redis.call('XCLAIM', key, group, consumer, claim_ms, held[1])
        if claimed[1] then
          table.insert(out, {i - 1, claimed[1][1], claimed[1][2], held[4] + 1})
        else
          free = true -- trimmed away while pending: XCLAIM dropped it from the group
        end
      end
    end
    local skipped = 0
    while free and skipped < 1000 do
      local read = redis.call(
        'XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', key, '>')
      if not read then break end
      local entry = read[1][2][1]
      local target = nil
      for f = 1, #entry[2], 2 do
        if entry[2][f] == '@g' then target = entry[2][f + 1] end
      end
      if target == nil or target == group then
        table.insert(out, {i - 1, entry[1], entry[2], 1})
        break
      end
      redis.call('XACK', key, group, entry[1])
      skipped = skipped + 1
    end
  end
end
if #ARGV > 5 then redis.call('XACK', KEYS[1], group, unpack(ARGV, 6)) end
return out
"""

# Settle a keyed delivery: KEYS = its partition stream, the stream, the dead-letter
# stream; ARGV = group, id, consumer, delivery count, partition, max length, then (to
# dead-letter it) the dead letter's fields and values. Only the delivery's holder may
# settle it: returns 0 if it is no longer pending with that consumer and count. Once
# acked, if the partition stream has more for the group, a pointer for the group wakes
# one of its consumers.
_RELEASE = """
local group = ARGV[1]
local held = redis.call('XPENDING', KEYS[1], group, ARGV[2], ARGV[2], 1)[1]
if not held or held[2] ~= ARGV[3] or held[4] ~= tonumber(ARGV[4]) then return 0 end
if #ARGV > 6 then redis.call('XADD', KEYS[3], '*', unpack(ARGV, 7)) end
redis.call('XACK', KEYS[1], group, ARGV[2])
local last = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = nil, nil
  for f = 1, #info, 2 do
    if info[f] == 'name' then name = info[f + 1] end
    if info[f] == 'last-delivered-id' then delivered = info[f + 1] end
  end
  if name == group then last = delivered end
end
if last and redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)[1] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', '@p', ARGV[5], '@g', group)
end
return 1
"""

# The registry: KEYS = the instances hash (id -> instance), their expiries (a sorted set,
# Redis's clock), the groups hash ([address, group] -> service); ARGV = id, the
# instance ("" to only read), its time to live in ms, then group, service pairs. Drops
# the expired instances, records this one, returns the live ones.
_ANNOUNCE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[1], id) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms) end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[1])
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HVALS', KEYS[1])
"""

# A group's backlog: KEYS = the stream, the direct stream, the due set, the partition
# streams; ARGV = group, how many entries of the stream to look at for pointers. Returns
# waiting (lag, less the pointers among the unread entries of the stream; -1: unknown),
# pending, due.
_BACKLOG = """
local function info(key)
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) ~= 'table' or groups.err then return nil end
  for _, g in ipairs(groups) do
    local t = {}
    for i = 1, #g, 2 do t[g[i]] = g[i + 1] end
    if t['name'] == ARGV[1] then return t end
  end
  return nil
end
local waiting, pending, known = 0, 0, true
local main = nil
for i, key in ipairs(KEYS) do
  if i ~= 3 then
    local t = info(key)
    if t then
      pending = pending + t['pending']
      if t['lag'] then waiting = waiting + t['lag'] else known = false end
      if i == 1 then main = t end
    end
  end
end
if known and main and #KEYS > 3 and main['lag'] > 0 then
  local count = math.min(main['lag'], tonumber(ARGV[2]))
  local after = '(' .. main['last-delivered-id']
  local entries = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', count)
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == '@p' then
        waiting = waiting - 1
        break
      end
    end
  end
end
if not known then waiting = -1 end
return {waiting, pending, redis.call('ZCARD', KEYS[3])}
"""
POINTERS_COUNTED = 10_000  # unread entries of a stream looked at for pointers by backlog()

# A pointer entry on an address's stream: "@p" = the partition, "@g" = the one group it
# is for (a hand-over), absent when it is for every group (a send).
_POINTER = "@p"
_TARGET = "@g"
_PARTITION = "dl.partition"  # in a keyed dead letter: the partition it came from
_AS_BYTES = {name: name.encode() for name in (_POINTER, _TARGET, _PARTITION)}
DEAD_PAGE = 1000  # dead letters counted per XRANGE


class RedisTransport(Transport):
    """Redis Streams transport; see the module docstring."""

    capabilities = (
        Capability.RECLAIM | Capability.KEY_ORDER | Capability.DELAYED_RETRY | Capability.SEND_ORDER
    )
    partitions: int  # always partitioned (see iambus.partitions)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str | None = None,
        claim_after: float = 60.0,
        block: float = 1.0,
        max_length: int = 1_000_000,
        max_connections: int = 64,
        partitions: int | None = None,
        timeout: float | None = None,
        client_name: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        for driver_option in _DERIVED:
            if driver_option in query:
                raise ImproperlyConfigured(
                    f"{redact(url)}: {driver_option} is set by the transport from its timeout "
                    f"and block; give ?timeout=SECONDS (or timeout=...) instead"
                )
        if namespace is not None:
            check_name("namespace", namespace)
        self.namespace = namespace or query.pop("namespace", None) or "iambus"
        if ":" in self.namespace or not self.namespace:
            raise ImproperlyConfigured(f"a Redis namespace may not contain ':': {self.namespace!r}")
        self.partitions = partitions_option(partitions, query)
        in_url = query.pop("timeout", None)
        self.timeout = _timeout_option(timeout, in_url, url)
        self._driver_url = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = redact(url)
        self.client_name = client_name  # None: the dispatcher's service names it on open
        self.claim_after = check_seconds("claim_after", claim_after)
        self.block = check_seconds("block", block)
        self.max_length = check_count("max_length", max_length)
        self.max_connections = check_count("max_connections", max_connections)
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._reply_channel = f"{self.namespace}:reply:{uuid.uuid4().hex}"
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncio.Future[None] | None = None
        self._sends = _Coalescer(self._flush_sends)
        self._acks = _Coalescer(self._flush_acks)  # and the replies
        self._closing = False  # close() drained the coalescers: no new send, reply, ack
        self._last_reclaim: dict[tuple[str, str], float] = {}
        self._last_sweep: dict[tuple[str, str], float] = {}
        self._next_due_check: dict[tuple[str, str], float] = {}
        self._lanes: dict[str, list[str]] = {}  # address -> its partition streams
        self._strays: set[tuple[str, int]] = set()  # pointers to undeclared partitions
        # Deliveries handed out and not yet settled, handed on by close() and leave():
        # (address, group, mark, entry id) -> (consumer, attempt).
        self._holding: dict[tuple[str, str, str, bytes], tuple[str, int]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._redis is not None:
            return
        # A blocking pool: beyond max_connections, a command waits for a connection
        # instead of failing (redis-py's default pool raises at its limit).
        pool = aioredis.BlockingConnectionPool.from_url(
            self._driver_url,
            max_connections=self.max_connections,
            timeout=None,
            client_name=self.client_name or client_name(),  # CLIENT SETNAME on each
            # A connection that dies silently (a NAT or firewall dropping it, a host gone
            # without a RST) would leave a command waiting as long as TCP retransmits
            # (~15 min). The longest answer the transport waits for is an XREADGROUP
            # blocking `block` seconds; `timeout` more and the command fails, and redis-py
            # drops the connection, so the next command connects again.
            socket_timeout=self.timeout + self.block,
            socket_connect_timeout=self.timeout,
            socket_keepalive=True,  # an idle pooled connection's death is noticed too
            socket_keepalive_options=_keepalive(self.timeout),
        )
        client = aioredis.Redis(connection_pool=pool)
        async with self._translate("connect"):
            await client.ping()
        self._redis = client
        self._closing = False
        self._scripts = {
            "claim_due": client.register_script(_CLAIM_DUE),
            "reclaim": client.register_script(_RECLAIM),
            "park": client.register_script(_PARK_FOR_RETRY),
            "declare": client.register_script(_DECLARE),
            "take": client.register_script(_TAKE),
            "release": client.register_script(_RELEASE),
        }

    async def close(self) -> None:
        # Sends and acks issued before close() go out (their flushes are not left running).
        unsent = TransportError(f"{self.url}: closed before it could send or ack")
        for coalescer in (self._sends, self._acks):
            await coalescer.drain(CLOSE_WAIT, unsent)
        # Nothing new from here on: its flush would outlive close(), its reply be lost.
        self._closing = True
        # The reply listener last: one a request started meanwhile is stopped too.
        if self._listener is not None:
            await _cancelled(self._listener)
        if self._listening is not None and not self._listening.done():
            # (cancelled before it had subscribed: the request waiting for that fails)
            self._listening.set_exception(TransportError(f"{self.url}: closed while waiting"))
        self._listener = self._listening = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransportError(f"{self.url}: closed while waiting"))
        if self._redis is not None and self._holding:
            holding, self._holding = self._holding, {}
            await self._hand_on(holding)
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose(close_connection_pool=True)

    async def leave(self, consumer: str) -> None:
        """Hand on the deliveries ``consumer`` holds, as ``close()`` does for all: they
        (and the partitions of the keyed ones) pass on within ``block`` seconds, not after
        ``claim_after``."""
        mine = {where: held for where, held in self._holding.items() if held[0] == consumer}
        if not mine or self._redis is None:
            return
        for where in mine:
            del self._holding[where]
        await self._hand_on(mine)

    async def _hand_on(self, holding: dict[tuple[str, str, str, bytes], tuple[str, int]]) -> None:
        """Park the deliveries ``holding`` (a stopping worker's cancelled handlers) as
        retries due now: another consumer claims each (attempt + 1) at its next check for
        due retries, instead of it (and a keyed one's partition) waiting ``claim_after``.
        One claimed by another consumer meanwhile (its count moved on) is left alone."""

        async def hand_on(
            address: str, group: str, mark: str, entry_id: bytes, consumer: str, attempt: int
        ) -> None:
            member = f"{mark}:{_text(entry_id)}"
            args = [group, entry_id, 0, member, RETRY_OWNER, consumer, attempt]
            keys = [self._key(address, group, mark), self._due(address, group)]
            try:
                async with self._translate("hand on"):
                    await self._scripts["park"](keys=keys, args=args)
            except TransportError as exc:
                logger.warning(
                    "iambus: closing, could not hand entry %s on %s on (it passes on "
                    "after claim_after): %s",
                    _text(entry_id),
                    address,
                    exc,
                )

        await asyncio.gather(*(hand_on(*where, *holder) for where, holder in holding.items()))

    async def destroy(self) -> int:
        """Delete every key of this namespace (tests, tear-downs). Returns how many."""
        client = self._client()
        deleted = 0
        async with self._translate("destroy"):
            async for key in client.scan_iter(match=f"{self.namespace}:*", count=500):
                deleted += await client.delete(key)
        return deleted

    # -- keys -------------------------------------------------------------------------

    def _stream(self, address: str) -> str:
        return f"{self.namespace}:{address}"

    def _direct(self, address: str, group: str) -> str:
        return f"{self.namespace}:{address}@{group}"

    def _due(self, address: str, group: str) -> str:
        return f"{self.namespace}:due:{address}@{group}"

    def _dead(self) -> str:
        return f"{self.namespace}:dead"

    def _lane_prefix(self, address: str) -> str:
        return f"{self.namespace}:{address}#"

    def _lane(self, address: str, partition: int) -> str:
        return f"{self._lane_prefix(address)}{partition}"

    def _lanes_of(self, address: str) -> list[str]:
        lanes = self._lanes.get(address)
        if lanes is None:
            lanes = self._lanes[address] = [self._lane(address, n) for n in range(self.partitions)]
        return lanes

    # -- sending and receiving --------------------------------------------------------

    async def send(self, address: str, envelope: Envelope) -> None:
        self._open_for("send")
        if envelope.key is None:
            await self._sends.add((self._stream(address), envelope.to_fields(), None))
            return
        # Keyed: to its partition stream, and a pointer to it on the address's stream.
        lane = partition(envelope.key, self.partitions)
        pointer = (self._stream(address), {_POINTER: str(lane)})
        await self._sends.add((self._lane(address, lane), envelope.to_fields(), pointer))

    async def _flush_sends(self, items: list[_Send]) -> list[Any]:
        if len(items) == 1 and items[0][2] is None:  # alone: a plain command costs less
            stream, fields, _ = items[0]
            async with self._translate("XADD"):
                one: Any = fields
                return [
                    await self._client().xadd(stream, one, maxlen=self.max_length, approximate=True)
                ]
        async with self._translate("XADD"), self._client().pipeline(transaction=False) as pipe:
            for stream, fields, pointer in items:
                # Any: redis-py's annotation of the fields mapping changes between releases
                entry: Any = fields
                pipe.xadd(stream, entry, maxlen=self.max_length, approximate=True)
                if pointer is not None:
                    entry = pointer[1]
                    pipe.xadd(pointer[0], entry, maxlen=self.max_length, approximate=True)
            results: list[Any] = await pipe.execute()
        if len(results) == len(items):
            return results
        out, at = [], 0
        for _, _, pointer in items:  # each item's own XADD, not its pointer's
            out.append(results[at])
            at += 1 if pointer is None else 2
        return out

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        self._client()
        keys = [self._stream(address), self._direct(address, group), *self._lanes_of(address)]
        async with self._translate("XGROUP CREATE"):
            await self._scripts["declare"](keys=keys, args=[group, "0" if from_start else "$"])

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        self._client()  # a closed transport says so before anything else
        deadline = time.monotonic() + wait
        while True:
            try:
                out = await self._receive_once(address, group, consumer, limit, deadline)
            except TransportError as exc:
                if "NOGROUP" not in str(exc.__cause__):
                    raise
                # The group is gone (FLUSHDB, a restart without persistence): declare it
                # again from the start of what the stream holds now, and go on.
                logger.warning(
                    "iambus: group %s on %s was lost; declaring it again", group, address
                )
                await self.declare(address, group, from_start=True)
                continue
            if out or time.monotonic() >= deadline:
                return out

    async def _receive_once(
        self, address: str, group: str, consumer: str, limit: int, deadline: float
    ) -> list[Delivery]:
        stream, direct, due = (
            self._stream(address),
            self._direct(address, group),
            self._due(address, group),
        )
        rows: list[Any] = []
        now = time.monotonic()
        # Due retries (and replays, on the group's direct stream) are looked for every
        # `block` seconds, and sooner when the due set says one is due sooner (or more are
        # due than this receive had room for, which the next one claims at once): a
        # retry is late by at most `block` (when another process parked it), and a busy
        # consumer with none due does not pay a round trip per batch.
        checked_due = now >= self._next_due_check.get((address, group), 0.0)
        if checked_due:
            self._next_due_check[address, group] = now + self.block  # retries parked
            # meanwhile lower it; so does what the due set says below
            async with self._translate("claim due retries"):
                claimed, wait_ms = await self._scripts["claim_due"](
                    keys=[stream, direct, due],
                    args=[group, consumer, limit, self._lane_prefix(address)],
                )
            rows += claimed
            if wait_ms >= 0:
                next_due = time.monotonic() + wait_ms / 1000
                known = self._next_due_check[address, group]
                self._next_due_check[address, group] = min(known, next_due)
        # Abandoned deliveries are looked for every min(claim_after / 2, 5) seconds, by a
        # receive that has room for them.
        now = time.monotonic()
        every = min(self.claim_after / 2, 5.0)
        if len(rows) < limit and now - self._last_reclaim.get((address, group), 0) > every:
            self._last_reclaim[address, group] = now
            room = limit - len(rows)
            async with self._translate("reclaim"):
                reclaimed = await self._scripts["reclaim"](
                    keys=[stream, direct],
                    args=[group, consumer, int(self.claim_after * 1000), room, RETRY_OWNER],
                )
            rows += reclaimed
            if len(reclaimed) >= room:
                # As many as it had room for: more may be abandoned (a dead consumer's
                # whole batch), and the next receive looks again at once, not after
                # `every` (a quiet subscription asks for one at a time).
                self._last_reclaim[address, group] = 0.0
        # The sweep of the partitions, likewise: before the stream, which a backlog of
        # unkeyed envelopes would keep filling every receive with.
        swept: list[Delivery] = []
        if len(rows) < limit and now - self._last_sweep.get((address, group), 0) > every:
            self._last_sweep[address, group] = now
            room = limit - len(rows)
            swept += await self._take(address, group, consumer, self._lanes_of(address), [], room)
            if len(swept) >= room:
                self._last_sweep[address, group] = 0.0  # more may wait: sweep again next time
        room = limit - len(rows) - len(swept)
        if room > 0 and checked_due:
            rows += await self._read(group, direct, "d", consumer, room, None)
            room = limit - len(rows) - len(swept)
        if room > 0:
            now = time.monotonic()
            # No longer than until the next check for due retries, so none waits on it.
            until_due = self._next_due_check[address, group] - now
            wait = min(deadline - now, self.block, until_due)
            block = None if rows or swept else max(int(wait * 1000), 1)
            rows += await self._read(group, stream, "m", consumer, room, block)
        return swept + await self._deliveries(address, group, consumer, rows)

    async def _read(
        self, group: str, key: str, mark: str, consumer: str, count: int, block: int | None
    ) -> list[Any]:
        async with self._translate("XREADGROUP"):
            read = await self._client().xreadgroup(
                group, consumer, streams={key: ">"}, count=count, block=block
            )
        return [
            (mark, entry_id, fields, 1)
            for _, entries in _streams(read)
            for entry_id, fields in entries
            if fields  # a trimmed entry still pending has no fields
        ]

    async def _deliveries(
        self, address: str, group: str, consumer: str, rows: list[Any]
    ) -> list[Delivery]:
        """Deliveries of ``rows`` (mark, id, fields, delivery count); pointers taken in place."""
        out: list[Delivery | int] = []
        pointers: list[bytes] = []
        lanes: list[int] = []
        for mark, entry_id, flat, count in rows:
            fields = _pairs(flat)
            mark = _text(mark)
            lane = _field(fields, _POINTER) if mark == "m" else None
            if lane is None:
                delivery = await self._delivery(
                    address, group, consumer, mark, entry_id, fields, int(count)
                )
                if delivery is not None:
                    out.append(delivery)
                continue
            pointers.append(entry_id)
            target = _field(fields, _TARGET)
            if target is not None and target != group:
                continue  # another group's hand-over
            n = int(lane) if lane.isdigit() else -1
            if not 0 <= n < self.partitions:
                self._stray(address, n)
            elif n not in lanes:
                lanes.append(n)
                out.append(n)  # where its entry goes, if the partition is free
        if not pointers:
            return cast(list[Delivery], out)
        taken = await self._take(
            address, group, consumer, [self._lane(address, n) for n in lanes], pointers, len(lanes)
        )
        by_lane = {int(d._mark[1:]): d for d in taken}
        return [d for d in (by_lane.get(x) if isinstance(x, int) else x for x in out) if d]

    async def _take(
        self,
        address: str,
        group: str,
        consumer: str,
        lanes: list[str],
        pointers: list[bytes],
        limit: int,
    ) -> list[_RedisDelivery]:
        """The next entries of free partition ``lanes`` (and stale ones); acks ``pointers``."""
        async with self._translate("take keyed"):
            rows = await self._scripts["take"](
                keys=[self._stream(address), *lanes],
                args=[
                    group,
                    consumer,
                    int(self.claim_after * 1000),
                    RETRY_OWNER,
                    limit,
                    *pointers,
                ],
            )
        prefix = len(self._lane_prefix(address))
        out: list[_RedisDelivery] = []
        for index, entry_id, fields, count in rows:
            mark = "p" + lanes[int(index) - 1][prefix:]
            delivery = await self._delivery(
                address, group, consumer, mark, entry_id, _pairs(fields), int(count)
            )
            if delivery is not None:
                out.append(delivery)
        return out

    def _stray(self, address: str, lane: int) -> None:
        if (address, lane) not in self._strays:
            self._strays.add((address, lane))
            logger.error(
                "iambus: a pointer on %s names partition %s, but this transport has "
                "partitions=%d: give every process of namespace %r the same partitions; "
                "the keyed envelopes of that partition wait until then",
                address,
                lane,
                self.partitions,
                self.namespace,
            )

    async def _delivery(
        self,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        fields: Any,
        attempt: int,
    ) -> _RedisDelivery | None:
        """A delivery, or None when the entry is not an envelope: that one is parked at once."""
        try:
            delivery = _RedisDelivery(
                self, address, group, consumer, mark, entry_id, fields, attempt
            )
            self._holding[address, group, mark, entry_id] = (consumer, attempt)
            return delivery
        except SerializationError as exc:
            raw = {_text(k): _text(v) for k, v in _pairs(fields).items()}
            logger.error(
                "iambus: %s on %s is no envelope; dead-lettered: %s", _text(entry_id), address, exc
            )
            # Parked as a well-formed envelope carrying the raw fields, so that listing
            # the dead letters never trips over it.
            parked = Envelope(
                name=raw.get("name", "?"),
                payload=json.dumps(raw).encode(),
                content_type="application/x-iambus-raw-fields",
            )
            failure = Failure("iambus.errors.SerializationError", str(exc), "", attempt)
            await self._park_fields(
                address, group, consumer, mark, entry_id, attempt, parked.to_fields(), failure
            )
            return None

    # -- settling (called by deliveries) ----------------------------------------------

    def _key(self, address: str, group: str, mark: str) -> str:
        if mark == "m":
            return self._stream(address)
        if mark == "d":
            return self._direct(address, group)
        return self._lane(address, int(mark[1:]))

    async def _ack(
        self, address: str, group: str, consumer: str, mark: str, entry_id: bytes, attempt: int
    ) -> None:
        self._open_for("ack")
        await self._acks.add((self._key(address, group, mark), group, entry_id))
        self._let_go(address, group, mark, entry_id, consumer, attempt)

    async def _flush_acks(self, items: list[_Settle]) -> list[Any]:
        """Each item's result, or the error of its own command (as a value): a reply that
        could not be published fails its sender only, never an ack batched with it."""
        key, group, data = items[0]
        if len(items) == 1:
            async with self._translate("XACK" if group else "PUBLISH reply"):
                if group is None:
                    await self._client().publish(key, data)
                else:
                    await self._client().xack(key, group, data)
            return [None]
        # Pipeline order: the replies, then one XACK per stream and group. Its results are
        # errors as values, each handed to the items of its own command.
        replies = [n for n, (_, group, _) in enumerate(items) if group is None]
        batches: dict[tuple[str, str], list[int]] = {}
        for n, (key, group, _) in enumerate(items):
            if group is not None:
                batches.setdefault((key, group), []).append(n)
        pipe = self._client().pipeline(transaction=False)
        async with self._translate("PUBLISH reply, XACK"), pipe:
            for n in replies:
                pipe.publish(items[n][0], items[n][2])
            for (key, group), ns in batches.items():
                pipe.xack(key, group, *(items[n][2] for n in ns))
            results: list[Any] = await pipe.execute(raise_on_error=False)
        out: list[Any] = [None] * len(items)
        commands = [[n] for n in replies] + list(batches.values())
        for ns, result in zip(commands, results, strict=True):
            for n in ns:
                if isinstance(result, Exception):
                    out[n] = self._translated("XACK" if items[n][1] else "PUBLISH reply", result)
                else:
                    out[n] = result
        return out

    async def _release(
        self,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        attempt: int,
        dead: dict[str, Any] | None = None,
    ) -> None:
        """Ack (or dead-letter) a keyed delivery, and hand its partition on."""
        args: list[Any] = [group, entry_id, consumer, attempt, mark[1:], self.max_length]
        for name, value in (dead or {}).items():
            args += [name, value]
        keys = [self._key(address, group, mark), self._stream(address), self._dead()]
        async with self._translate("dead-letter" if dead else "ack"):
            settled = await self._scripts["release"](keys=keys, args=args)
        self._let_go(address, group, mark, entry_id, consumer, attempt)
        if not settled:
            self._not_held(address, group, consumer, entry_id, "dead-letter" if dead else "ack")

    def _let_go(
        self, address: str, group: str, mark: str, entry_id: bytes, consumer: str, attempt: int
    ) -> None:
        where = (address, group, mark, entry_id)
        if self._holding.get(where) == (consumer, attempt):  # not a later claim of it
            del self._holding[where]

    def _not_held(
        self, address: str, group: str, consumer: str, entry_id: bytes, what: str
    ) -> None:
        logger.warning(
            "iambus: %s of keyed entry %s on %s for group %s by %s ignored: it was handed to "
            "another consumer (its handler ran longer than claim_after=%ss, or the consumer "
            "was taken for dead), which settles it now",
            what,
            _text(entry_id),
            address,
            group,
            consumer,
            self.claim_after,
        )

    async def _retry(
        self,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        attempt: int,
        delay: float,
    ) -> None:
        member = f"{mark}:{_text(entry_id)}"
        args: list[Any] = [group, entry_id, int(max(delay, 0) * 1000), member, RETRY_OWNER]
        if mark[0] == "p":  # keyed: only while it is still this consumer's
            args += [consumer, attempt]
        async with self._translate("retry"):
            parked = await self._scripts["park"](
                keys=[self._key(address, group, mark), self._due(address, group)], args=args
            )
        self._let_go(address, group, mark, entry_id, consumer, attempt)
        if not parked:
            self._not_held(address, group, consumer, entry_id, "retry")
            return
        due_at = time.monotonic() + max(delay, 0)
        known = self._next_due_check.get((address, group), due_at)
        self._next_due_check[address, group] = min(known, due_at)

    async def _park(
        self,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        attempt: int,
        envelope: Envelope,
        failure: Failure,
    ) -> None:
        await self._park_fields(
            address, group, consumer, mark, entry_id, attempt, envelope.to_fields(), failure
        )

    async def _park_fields(
        self,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        attempt: int,
        fields: Any,
        failure: Failure,
    ) -> None:
        record = {
            **fields,
            "dl.address": address,
            "dl.group": group,
            "dl.at": repr(time.time()),
            "dl.failure": json.dumps(
                {
                    "error_type": failure.error_type,
                    "message": failure.message,
                    "traceback": failure.traceback,
                    "attempts": failure.attempts,
                    "handler": failure.handler,
                }
            ),
        }
        if mark[0] == "p":
            record[_PARTITION] = mark[1:]  # where a replay puts it back, whatever its count
            await self._release(address, group, consumer, mark, entry_id, attempt, record)
            return
        async with (
            self._translate("dead-letter"),
            self._client().pipeline(transaction=True) as pipe,
        ):
            pipe.xadd(self._dead(), record)
            pipe.xack(self._key(address, group, mark), group, entry_id)
            await pipe.execute()
        self._let_go(address, group, mark, entry_id, consumer, attempt)

    # -- request/reply --------------------------------------------------------------

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._open_for("request")  # no listener started on a closing transport
        await self._listen()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting[envelope.id] = future
        try:
            await self.send(address, _with_reply_to(envelope, self._reply_channel))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(envelope.id, None)

    async def reply(self, to: str, envelope: Envelope) -> None:
        self._open_for("reply")
        fields = envelope.to_fields()
        payload = fields.pop("payload")
        assert isinstance(payload, bytes)
        header = json.dumps({k: v for k, v in fields.items() if isinstance(v, str)})
        # Awaited, and its error raised: the caller acks the delivery only after this
        # returns, so a delivery whose reply was not published stays unacked.
        await self._acks.add((to, None, header.encode() + b"\n" + payload))

    async def _listen(self) -> None:
        if self._listening is None:
            self._listening = asyncio.get_running_loop().create_future()
            self._listener = asyncio.get_running_loop().create_task(self._receive_replies())
        await asyncio.shield(self._listening)

    async def _receive_replies(self) -> None:
        listening = self._listening
        assert listening is not None
        while True:
            pubsub = self._client().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._reply_channel)
                if not listening.done():
                    listening.set_result(None)
                async for message in _messages(pubsub, self.timeout):
                    try:
                        answer = _reply_of(message)
                    except SerializationError as exc:
                        # One bad message must not cost the others: the listener stays.
                        logger.warning("iambus: a reply on %s is no envelope: %s", self.url, exc)
                        continue
                    waiting = self._waiting.get(answer.correlation_id or "")
                    if waiting is not None and not waiting.done():
                        waiting.set_result(answer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not listening.done():
                    error = TransportError(f"{self.url}: subscribing for replies failed: {exc}")
                    error.__cause__ = exc
                    listening.set_exception(error)
                    # The next request starts a new listener instead of failing forever.
                    self._listening = self._listener = None
                    return
                logger.warning(
                    "iambus: reply listener on %s lost: %s; resubscribing", self.url, exc
                )
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    # Any: aclose() is typed only in some redis-py releases
                    closing: Any = pubsub
                    await closing.aclose()

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        async with self._translate("XRANGE"):
            rows: Any = await self._client().xrange(self._dead(), count=limit)
        letters = (_dead_letter(self._dead(), entry_id, fields) for entry_id, fields in rows)
        return [letter for letter in letters if letter is not None]

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        # Paged through the dead-letter stream reading two fields of each entry: nothing
        # is decoded, and one page is held at a time, however many there are.
        counts: Counter[tuple[str, str]] = Counter()
        client, start = self._client(), "-"
        while True:
            async with self._translate("XRANGE"):
                rows: Any = await client.xrange(self._dead(), min=start, count=DEAD_PAGE)
            for _, fields in rows:
                address = fields.get(b"dl.address", fields.get("dl.address"))
                group = fields.get(b"dl.group", fields.get("dl.group"))
                if address is not None and group is not None:
                    counts[_text(address), _text(group)] += 1
            if len(rows) < DEAD_PAGE:
                return dict(counts)
            start = f"({_text(rows[-1][0])}"

    async def replay(self, ids: Sequence[str]) -> int:
        client = self._client()
        replayed = 0
        for letter_id in ids:
            async with self._translate("replay"):
                rows: Any = await client.xrange(self._dead(), min=letter_id, max=letter_id)
                if not rows:
                    continue
                letter = _dead_letter(self._dead(), *rows[0])
                if letter is None:
                    continue
                fields: Any = letter.envelope.to_fields()
                async with client.pipeline(transaction=True) as pipe:
                    if letter.envelope.key is None:
                        pipe.xadd(self._direct(letter.address, letter.group), fields)
                    else:  # behind what its partition holds, for its group only
                        # The partition it was taken from, not this process's idea of it
                        # (the dlq CLI may not know the workers' count).
                        lane = _field(rows[0][1], _PARTITION) or str(
                            partition(letter.envelope.key, self.partitions)
                        )
                        target: Any = {_TARGET: letter.group}
                        pipe.xadd(
                            self._lane(letter.address, int(lane)),
                            {**fields, **target},
                            maxlen=self.max_length,
                            approximate=True,
                        )
                        pipe.xadd(
                            self._stream(letter.address),
                            {_POINTER: lane, **target},
                            maxlen=self.max_length,
                            approximate=True,
                        )
                    pipe.xdel(self._dead(), letter_id)
                    await pipe.execute()
            replayed += 1
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        client = self._client()
        async with self._translate("purge"):
            if ids is None:
                count: int = await client.xlen(self._dead())
                await client.delete(self._dead())
                return count
            if not ids:
                return 0
            deleted: int = await client.xdel(self._dead(), *ids)
            return deleted

    # -- registry and backlog ---------------------------------------------------------

    def _registry_keys(self) -> list[str]:
        ns = self.namespace
        return [f"{ns}:instances", f"{ns}:instances:until", f"{ns}:groups"]

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._client().register_script(source)
        return script

    async def _registry(self, *args: Any) -> list[Instance]:
        script = self._script("announce", _ANNOUNCE)
        async with self._translate("registry"):
            rows: Any = await script(keys=self._registry_keys(), args=list(args))
        live: list[Instance] = []
        for row in rows:
            try:
                live.append(Instance.from_json(row))
            except ValueError as exc:
                logger.warning("iambus: %s: skipping a registry entry: %s", self.url, exc)
        return live

    async def announce(self, instance: Instance) -> None:
        pairs: list[str] = []
        for consumed in instance.consumes:
            pairs += [json.dumps(consumed), instance.service]
        await self._registry(instance.id, instance.to_json(), int(ANNOUNCE_TTL * 1000), *pairs)

    async def withdraw(self, instance: Instance) -> None:
        instances, until, _ = self._registry_keys()
        async with self._translate("withdraw"), self._client().pipeline() as pipe:
            pipe.hdel(instances, instance.id)
            pipe.zrem(until, instance.id)
            await pipe.execute()

    async def instances(self) -> list[Instance]:
        return await self._registry("", "", 0)

    async def groups(self) -> dict[tuple[str, str], str]:
        async with self._translate("HGETALL"):
            rows: Any = await self._client().hgetall(self._registry_keys()[2])
        known: dict[tuple[str, str], str] = {}
        for field, service in rows.items():
            with contextlib.suppress(ValueError, TypeError):
                address, group = json.loads(field)
                known[(str(address), str(group))] = _text(service)
        return known

    async def backlog(self, address: str, group: str) -> Backlog:
        keys = [
            self._stream(address),
            self._direct(address, group),
            self._due(address, group),
            *self._lanes_of(address),
        ]
        script = self._script("backlog", _BACKLOG)
        async with self._translate("backlog"):
            waiting, pending, due = await script(keys=keys, args=[group, POINTERS_COUNTED])
        return Backlog(
            waiting=None if waiting < 0 else int(waiting),
            in_flight=max(int(pending) - int(due), 0),
            retrying=int(due),
        )

    # -- internals --------------------------------------------------------------------

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise TransportError(f"{self.url} is not open; await transport.open() first")
        return self._redis

    def _open_for(self, what: str) -> None:
        self._client()  # a closed transport says so
        if self._closing:
            raise TransportError(
                f"{self.url}: closing, cannot {what} any more; {what} before close()"
            )

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise self._translated(what, exc) from exc

    def _translated(self, what: str, exc: Exception) -> TransportError:
        """The ``TransportError`` for a driver error ``exc`` of ``what``."""
        if isinstance(exc, AuthenticationError | NoPermissionError):
            error: TransportError = TransportRefused(
                f"{self.url}: {what} refused: {exc} (check the user and password in the URL, "
                f"and the user's ACL rules)"
            )
        elif isinstance(exc, RedisTimeoutError):
            error = TransportError(
                f"{self.url}: {what} failed: no answer within {self.timeout + self.block:g} s "
                f"(timeout={self.timeout:g} + block={self.block:g}); the connection was "
                f"dropped and the next command connects again. Check the network path to "
                f"Redis; if Redis is only slow, raise the transport's timeout (?timeout=)"
            )
        else:
            error = TransportError(f"{self.url}: {what} failed: {exc}")
        error.__cause__ = exc
        return error


class _RedisDelivery:
    __slots__ = (
        "_address",
        "_consumer",
        "_entry_id",
        "_group",
        "_mark",
        "_transport",
        "attempt",
        "envelope",
    )

    def __init__(
        self,
        transport: RedisTransport,
        address: str,
        group: str,
        consumer: str,
        mark: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        attempt: int,
    ) -> None:
        self._transport = transport
        self._address = address
        self._group = group
        self._consumer = consumer
        self._mark = mark  # "m" the stream, "d" the direct stream, "p<n>" partition n
        self._entry_id = entry_id
        self.envelope = Envelope.from_fields(fields)
        self.attempt = attempt

    async def ack(self) -> None:
        if self._mark[0] == "p":
            await self._transport._release(
                self._address, self._group, self._consumer, self._mark, self._entry_id, self.attempt
            )
        else:
            await self._transport._ack(
                self._address, self._group, self._consumer, self._mark, self._entry_id, self.attempt
            )

    async def retry(self, delay: float) -> None:
        await self._transport._retry(
            self._address,
            self._group,
            self._consumer,
            self._mark,
            self._entry_id,
            self.attempt,
            delay,
        )

    async def dead_letter(self, failure: Failure) -> None:
        await self._transport._park(
            self._address,
            self._group,
            self._consumer,
            self._mark,
            self._entry_id,
            self.attempt,
            self.envelope,
            failure,
        )

    def __repr__(self) -> str:
        return f"<delivery {self.envelope.name} #{self.attempt} to {self._group}@{self._address}>"


class _Coalescer:
    """Sends an item at once when nothing is in flight, else batches it with the others.

    Idle, a send costs one round trip and no extra task; under load, everything added
    while a flush is in flight goes out together in the next one (one pipeline). The
    task of that flush is held, and ``drain()`` (on close) waits for it. A result that is
    an exception is raised to that item's sender only.
    """

    def __init__(self, flush: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._flush = flush
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._error: TransportError | None = None  # drain()'s, for a flush it cancels
        self._items: list[Any] = []
        self._futures: list[asyncio.Future[Any]] = []

    def add(self, item: Any) -> Awaitable[Any]:
        if not self._busy:
            self._busy = True
            self._idle.clear()
            return self._alone(item)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._futures.append(future)
        return future

    async def drain(self, timeout: float, error: TransportError) -> None:
        """Wait (``timeout`` s at most) for the flushes in flight and those queued behind
        them; then fail with ``error`` what is still waiting, and end the flush task."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        futures, self._items, self._futures = self._futures, [], []
        _fail(futures, error)
        self._error = error
        while (task := self._task) is not None:  # (a send may have come in meanwhile)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._error = None

    async def _alone(self, item: Any) -> Any:
        try:
            result = (await self._flush([item]))[0]
        finally:
            self._next()
        if isinstance(result, Exception):
            raise result
        return result

    def _next(self) -> None:
        self._task = None
        if not self._items:
            self._busy = False
            self._idle.set()
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        self._task = asyncio.get_running_loop().create_task(self._batch(items, futures))

    async def _batch(self, items: list[Any], futures: list[asyncio.Future[Any]]) -> None:
        try:
            results = await self._flush(items)
        except Exception as exc:
            _fail(futures, exc)
        except BaseException:  # cancelled: drain() gave up on it, its error goes to all
            _fail(futures, self._error or TransportError("sending was cancelled"))
            raise
        else:
            for future, result in zip(futures, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._next()


def _timeout_option(given: float | None, in_url: str | None, url: str) -> float:
    """The ``timeout`` option: the keyword when given (as ``namespace`` and ``partitions``),
    else ``?timeout=`` of the URL, else ``TIMEOUT``."""
    if given is not None or in_url is None:
        return check_seconds("timeout", TIMEOUT if given is None else given)
    return url_seconds(in_url, url, "timeout")


def _keepalive(timeout: float) -> dict[int, int]:
    """TCP keepalive: a dead idle connection is closed after about ``2 * timeout``."""
    interval = max(1, math.ceil(timeout / 3))
    # Linux refuses (EINVAL: no connection at all) an idle time or interval above
    # 32767 s; a longer timeout keeps probing at that bound.
    idle, interval = min(math.ceil(timeout), KEEPALIVE_MAX), min(interval, KEEPALIVE_MAX)
    wanted = {"TCP_KEEPIDLE": idle, "TCP_KEEPINTVL": interval, "TCP_KEEPCNT": 3}
    # (macOS names TCP_KEEPIDLE TCP_KEEPALIVE; a platform may lack any of them)
    names = {**wanted, "TCP_KEEPALIVE": wanted["TCP_KEEPIDLE"]}
    return {getattr(socket, name): value for name, value in names.items() if hasattr(socket, name)}


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for its end. Cancelled again as long as it runs: on Python
    3.11 redis-py's ``asyncio.wait_for`` around a socket write drops a cancellation that
    comes as the write ends, and the task goes on."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN)
    if not task.cancelled():
        task.exception()  # retrieved: no "never retrieved" warning


def _fail(futures: list[asyncio.Future[Any]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _field(fields: dict[Any, Any], name: str) -> str | None:
    """A field's value as text, whether the driver returned bytes or text keys."""
    value = fields.get(_AS_BYTES[name])
    if value is None:
        value = fields.get(name)
    return None if value is None else _text(value)


def _pairs(flat: Any) -> dict[bytes, bytes]:
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _streams(read: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    if not read:
        return []
    if isinstance(read, dict):  # RESP3
        return list(read.items())
    return [(key, entries) for key, entries in read]


async def _messages(pubsub: Any, timeout: float) -> AsyncIterator[bytes]:
    """The messages of ``pubsub``. A subscription only reads, so a connection that died
    silently would look like a quiet channel forever: after ``timeout`` s without a word
    it is pinged, and without the pong ``timeout`` s later it is given up."""
    heard = time.monotonic()
    pinged: float | None = None
    while True:
        message = await pubsub.get_message(timeout=1.0)
        now = time.monotonic()
        if message is not None:
            heard, pinged = now, None
            if message.get("type") == "message":
                yield message["data"]
        elif pinged is not None and now - pinged > timeout:
            raise TransportError(f"no answer to a PING within {timeout:g} s")
        elif pinged is None and now - heard > timeout:
            pinged = now
            await pubsub.ping()


def _reply_of(message: bytes) -> Envelope:
    """The envelope of a reply (``reply``: a JSON line of its fields, then the payload)."""
    header, newline, payload = message.partition(b"\n")
    try:
        fields = json.loads(header) if newline else None
    except ValueError as exc:
        raise SerializationError(f"malformed envelope line {header[:200]!r}: {exc}") from exc
    if not isinstance(fields, dict):
        raise SerializationError(
            f"no envelope: expected a JSON object, a newline and the payload; got {message[:80]!r}"
        )
    fields["payload"] = payload
    return Envelope.from_fields(fields)


def _with_reply_to(envelope: Envelope, channel: str) -> Envelope:
    import dataclasses

    return dataclasses.replace(envelope, reply_to=channel)


def _dead_letter(stream: str, entry_id: Any, fields: Any) -> DeadLetter | None:
    """The dead letter of an entry of ``stream``; None (logged) for an entry that is none."""
    try:
        get = {_text(k): v for k, v in fields.items()}
        failure = json.loads(get.pop("dl.failure"))
        address, group = _text(get.pop("dl.address")), _text(get.pop("dl.group"))
        failed = finite_time(_text(get.pop("dl.at")), "dl.at")
        get.pop(_PARTITION, None)
        return DeadLetter(
            id=_text(entry_id),
            address=address,
            group=group,
            envelope=Envelope.from_fields(get),
            failure=Failure(**failure),
            failed_at=failed,
        )
    except UNREADABLE as exc:
        logger.error(
            "iambus: dead letter %s in %s is unreadable (skipped; `XDEL %s %s` deletes it): %r",
            _text(entry_id),
            stream,
            stream,
            _text(entry_id),
            exc,
        )
        return None
