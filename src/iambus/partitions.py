"""Partition keys: messages with the same key handled one at a time, in order, cluster-wide.

``await dp.publish(event, key="order-42")`` (likewise ``execute``, ``query`` and
``handle``) gives the envelope a *key*. Over a transport, every subscription (each event
handler's group, each owning service) then handles the envelopes of one key one at a
time and in the order they were sent, across all instances of the service, while
envelopes of other keys, and envelopes without a key, run in parallel.

Brokers do this by *partition*: a key belongs to partition ``partition(key, count)``
(CRC-32 of its UTF-8 bytes, modulo ``count``), and each (group, partition) has at most
one delivery out at a time, in the whole cluster. So keys that share a partition also
share its order, and a group works on at most ``count`` keyed envelopes at once. The
count is a transport setting (``partitions=``, or ``?partitions=`` in the URL; 16 by
default) and must be the same for every process of a namespace: changing it moves keys
to other partitions, which breaks the order of what is in flight at the change.
``MemoryTransport`` orders each key on its own (it needs no partitions).

What a key's order survives, on every transport:

* a **retry** keeps the partition: the retried envelope is redelivered, after its
  delay, before anything sent after it with the same key;
* a **dead letter** releases it: the next envelope of the key follows;
* a **crash** (or a handler slower than ``claim_after``) hands the partition to another
  instance after ``claim_after``, starting again with the delivery that was out. That
  delivery may then have been handled twice (at-least-once), but never after its
  successor.

What it does not cover: envelopes without a key; a key's envelopes sent concurrently by
two senders (their order is the order the broker stored them); and, on brokers, keys
that collide in a partition, which wait for each other.
"""

from __future__ import annotations

import zlib

from .errors import ImproperlyConfigured

__all__ = ["PARTITIONS", "check_partitions", "partition", "partitions_option"]

PARTITIONS = 16
"""The default number of partitions per group."""

_MAX_PARTITIONS = 1024


def partition(key: str, count: int) -> int:
    """The partition of ``key`` among ``count``: stable across processes and versions."""
    return zlib.crc32(key.encode()) % count


def check_partitions(count: object) -> int:
    """``count`` as a partition count, or ``ImproperlyConfigured`` saying what is allowed."""
    value = 0  # not a count
    if isinstance(count, int) and not isinstance(count, bool):
        value = count
    elif isinstance(count, str) and count.strip().isdigit():  # from a URL
        value = int(count)
    if not 1 <= value <= _MAX_PARTITIONS:
        raise ImproperlyConfigured(
            f"partitions must be a whole number from 1 to {_MAX_PARTITIONS}, got {count!r}; "
            f"every process of a namespace must use the same count (default {PARTITIONS})"
        )
    return value


def partitions_option(given: int | None, query: dict[str, str]) -> int:
    """A transport's partition count: ``given`` (its keyword), else ``?partitions=`` of its
    URL, else ``PARTITIONS``; checked. Takes ``partitions`` out of ``query`` (the URL's
    parsed query, which then goes to the driver without it)."""
    in_url = query.pop("partitions", None)
    if given is not None:
        return check_partitions(given)
    return check_partitions(PARTITIONS if in_url is None else in_url)
