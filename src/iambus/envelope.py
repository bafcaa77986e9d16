"""The envelope: what travels through a transport around an encoded message.

::

    Envelope(
        id="0193...",                # unique and time-ordered (a UUIDv7)
        name="OrderPlaced",          # the message's contract name
        payload=b'{"order_id":7}',   # the encoded message
        content_type="application/json",
        correlation_id="0193...",    # the conversation: inherited from the message being handled
        causation_id="0193...",      # the id of the message whose handler sent this one
        created_at=1764158400.123,   # unix time, seconds
        reply_to=None,               # where a query's answer goes
        key="order-7",               # the partition (ordering) key, if any
        headers={"tenant": "acme"},  # user headers: str to str
    )

The delivery attempt is not in the envelope: it is counted by the broker and given with
each delivery (``Delivery.attempt``), so it survives restarts and counts across
instances.
"""

from __future__ import annotations

import contextvars
import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

from .errors import SerializationError

__all__ = ["Envelope", "current_envelope", "finite_time", "new_id"]


# The envelope whose handler is running (set by the worker), for correlation.
current_envelope: contextvars.ContextVar[Envelope | None] = contextvars.ContextVar(
    "iambus_current_envelope", default=None
)


# Envelope ids draw from a generator of their own, seeded from the OS and reseeded in
# every forked child: a program seeding the global `random` (for reproducible tests,
# say) must not make two processes produce the same ids, which a broker that
# deduplicates by id (NATS) would then drop.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))

# One encoder for every envelope: json.dumps with separators builds a new one per call.
_compact = json.JSONEncoder(separators=(",", ":")).encode

# What Envelope.from_fields reads: to_fields()'s str keys, a driver's bytes, or a mix.
Fields = Mapping[str, bytes | str] | Mapping[bytes, bytes | str] | Mapping[bytes | str, bytes | str]


def new_id() -> str:
    """A UUIDv7: 48 bits of unix milliseconds, then randomness; sorts by creation time."""
    millis = time.time_ns() // 1_000_000
    value = (millis & (1 << 48) - 1) << 80 | _ids.getrandbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _New:
    """The default of ``id``, ``created_at`` and ``headers``: a new one per envelope."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<new>"


_NEW: Any = _New()


@dataclass(frozen=True, slots=True)
class Envelope:
    """An encoded message with its metadata."""

    name: str
    payload: bytes
    content_type: str = "application/json"
    id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    created_at: float = field(default_factory=time.time)
    reply_to: str | None = None
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    # Written out, not generated: a frozen dataclass's __init__ sets each field through
    # object.__setattr__, ~2.5x the cost of the slots' own setters used here, and every
    # message sent or received builds an envelope. Same parameters, same defaults.
    def __init__(
        self,
        name: str,
        payload: bytes,
        content_type: str = "application/json",
        id: str = _NEW,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        created_at: float = _NEW,
        reply_to: str | None = None,
        key: str | None = None,
        headers: Mapping[str, str] = _NEW,
    ) -> None:
        _set_name(self, name)
        _set_payload(self, payload)
        _set_content_type(self, content_type)
        _set_id(self, new_id() if id is _NEW else id)
        _set_correlation_id(self, correlation_id)
        _set_causation_id(self, causation_id)
        _set_created_at(self, time.time() if created_at is _NEW else created_at)
        _set_reply_to(self, reply_to)
        _set_key(self, key)
        _set_headers(self, {} if headers is _NEW else headers)

    def to_fields(self) -> dict[str, bytes | str]:
        """Flat string fields, as stored in a Redis stream entry or sent as AMQP headers."""
        fields: dict[str, bytes | str] = {
            "id": self.id,
            "name": self.name,
            "ct": self.content_type,
            "at": repr(self.created_at),
            "payload": self.payload,
        }
        if self.correlation_id is not None:
            fields["corr"] = self.correlation_id
        if self.causation_id is not None:
            fields["cause"] = self.causation_id
        if self.reply_to is not None:
            fields["reply"] = self.reply_to
        if self.key is not None:
            fields["key"] = self.key
        if self.headers:
            headers = self.headers
            fields["headers"] = _compact(headers if type(headers) is dict else dict(headers))
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> Envelope:
        """The inverse of ``to_fields``; a missing or malformed field is a SerializationError."""
        if b"id" in fields:  # the bytes keys a driver returns: read them as they are
            return _from_bytes(cls, fields)  # type: ignore[arg-type]
        if type(fields) is dict:  # decoded JSON, mostly: str keys and values
            envelope = _from_text(cls, fields)
            if envelope is not None:
                return envelope
        return _from_any(cls, fields)


# Envelope.__init__'s setters: each field's slot descriptor.
_slots = vars(Envelope)
_set_name = _slots["name"].__set__
_set_payload = _slots["payload"].__set__
_set_content_type = _slots["content_type"].__set__
_set_id = _slots["id"].__set__
_set_correlation_id = _slots["correlation_id"].__set__
_set_causation_id = _slots["causation_id"].__set__
_set_created_at = _slots["created_at"].__set__
_set_reply_to = _slots["reply_to"].__set__
_set_key = _slots["key"].__set__
_set_headers = _slots["headers"].__set__


def _from_any(cls: type[Envelope], fields: Fields) -> Envelope:
    # The general path: any mix of bytes and str; names what is wrong.
    try:
        get = {_text(k): v for k, v in fields.items()}.get
        payload = _required(get("payload"), "payload")
        headers = get("headers")
        envelope = cls(
            id=_text(_required(get("id"), "id")),
            name=_text(_required(get("name"), "name")),
            payload=payload.encode() if isinstance(payload, str) else payload,
            content_type=_text(get("ct") or "application/json"),
            created_at=finite_time(_number(_required(get("at"), "at")), "the field 'at'"),
            correlation_id=_optional(get("corr")),
            causation_id=_optional(get("cause")),
            reply_to=_optional(get("reply")),
            key=_optional(get("key")),
            headers=json.loads(headers) if headers else {},
        )
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
        raise SerializationError(f"malformed envelope {dict(fields)!r:.300}: {exc!s:.300}") from exc
    return _checked(envelope)


def _from_bytes(cls: type[Envelope], fields: Mapping[bytes, bytes]) -> Envelope:
    # The per-message path of a consumer: direct lookups, no intermediate dict.
    try:
        headers = fields.get(b"headers")
        corr, cause = fields.get(b"corr"), fields.get(b"cause")
        reply, key = fields.get(b"reply"), fields.get(b"key")
        envelope = cls(
            id=fields[b"id"].decode(),
            name=fields[b"name"].decode(),
            payload=fields[b"payload"],
            content_type=(fields.get(b"ct") or b"application/json").decode(),
            created_at=finite_time(fields[b"at"], "at"),
            correlation_id=corr.decode() if corr is not None else None,
            causation_id=cause.decode() if cause is not None else None,
            reply_to=reply.decode() if reply is not None else None,
            key=key.decode() if key is not None else None,
            headers=json.loads(headers) if headers else {},
        )
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError, RecursionError):
        return _from_any(cls, fields)  # (names what is wrong)
    return _checked(envelope) if headers else envelope


def _from_text(cls: type[Envelope], fields: dict[str, bytes | str]) -> Envelope | None:
    # Decoded JSON plus the payload: taken as it is when every field has its type (None
    # otherwise: the general path names the problem).
    get = fields.get
    payload, headers, at = get("payload"), get("headers"), get("at")
    name, ct = get("name"), get("ct") or "application/json"
    envelope_id, corr, cause = get("id"), get("corr"), get("cause")
    reply, key = get("reply"), get("key")
    if (
        type(payload) is not bytes
        or type(envelope_id) is not str
        or type(name) is not str
        or type(at) is not str
        or type(ct) is not str
        or not all(v is None or type(v) is str for v in (corr, cause, reply, key, headers))
    ):
        return None
    try:
        envelope = cls(
            id=envelope_id,
            name=name,
            payload=payload,
            content_type=ct,
            created_at=finite_time(at, "at"),
            correlation_id=corr,  # type: ignore[arg-type]
            causation_id=cause,  # type: ignore[arg-type]
            reply_to=reply,  # type: ignore[arg-type]
            key=key,  # type: ignore[arg-type]
            headers=json.loads(headers) if headers else {},
        )
    except (ValueError, RecursionError):
        return None  # the general path names what is wrong
    return _checked(envelope) if headers else envelope


def _checked(envelope: Envelope) -> Envelope:
    if not _string_map(envelope.headers):
        raise SerializationError(
            f"malformed envelope headers {envelope.headers!r}: expected a JSON object of strings"
        )
    return envelope


def _string_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    # Decoded JSON from elsewhere may hold anything: a list as a correlation id would
    # pass through and break whoever looks it up.
    raise TypeError(f"expected text, got {type(value).__name__} {value!r}")


def finite_time(value: object, what: str) -> float:
    """``value`` (a number, or its text) as seconds since the epoch; a ``ValueError``
    naming ``what`` for one that is no number or no finite one (``float()`` reads
    "1e999" as inf and "nan" as nan: no time a message was sent or failed at; an age or
    a deadline read from it would be infinite, or never compare), an ``OverflowError``
    for an integer too large for a float."""
    at = float(value)  # type: ignore[arg-type]  # (what is no number raises)
    if not isfinite(at):
        raise ValueError(f"{what} is no finite time: {value!r:.40}")
    return at


def _number(value: object) -> str | float:
    return value if isinstance(value, int | float) else _text(value)


def _required(value: bytes | str | None, name: str) -> bytes | str:
    if value is None:
        raise ValueError(f"the field {name!r} is missing")
    return value


def _optional(value: bytes | str | None) -> str | None:
    return None if value is None else _text(value)
