"""Codecs: how a message becomes bytes on the wire, and comes back as its Python type.

A ``Codec`` has a ``content_type`` and two methods::

    codec = JsonCodec()
    body = codec.encode(OrderPlaced(order_id=7, items=[...]))    # bytes (UTF-8 JSON)
    event = codec.decode(body, OrderPlaced, name="OrderPlaced")  # an OrderPlaced again
    books = codec.decode(body, list[Book], name="ListBooks result")

``JsonCodec`` is the default and needs only the standard library. Encoding follows the
value; decoding follows the type you ask for (a class, or a type expression such as
``list[Book]``, ``Book | None`` or ``dict[str, int]``) and validates as it goes:
dataclasses, Optional and unions, lists, tuples, sets, dicts, ``datetime``, ``date``,
``time``, ``UUID``, ``Decimal``, enums, ``bytes``, ``Literal``, ``NewType``, ``Any``, and
pydantic v2 models and msgspec Structs when those libraries are in use. What a type needs
is worked out once, the first time the type is seen, and cached.

Anything that cannot be encoded or decoded raises ``SerializationError`` naming the
message, the field path (``OrderPlaced.items[2].price``) and what was expected. Unknown
fields in a payload are ignored, so producers may add fields before consumers know them.

Another format plugs in by implementing ``Codec``. See docs/codecs.md for the JSON
representation of each type.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import math
import sys
import types
import typing
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    MutableSequence,
    Sequence,
)
from collections.abc import MutableSet as AbstractMutableSet
from collections.abc import Set as AbstractSet
from datetime import date, datetime, time
from decimal import Decimal
from operator import attrgetter, itemgetter
from typing import Any, Literal, Protocol, TypeVar, Union, runtime_checkable
from uuid import UUID

from .errors import SerializationError

__all__ = ["Codec", "JsonCodec"]


@runtime_checkable
class Codec(Protocol):
    """Turns a message (or a query result) into bytes, and bytes back into a value.

    ``decode(data, into, name=...)`` returns a value of ``into``, which is a class or a
    type expression (``list[Book]``, ``Book | None``); ``name`` is the message name used
    in error messages. Both methods raise ``SerializationError`` on failure.
    """

    content_type: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes, into: Any, *, name: str) -> Any: ...


class JsonCodec:
    """The default codec: JSON (UTF-8), with the standard library only.

    ``JsonCodec()`` holds no state; the plans it compiles per type are shared by every
    instance.
    """

    __slots__ = ()
    content_type: str = "application/json"

    def __repr__(self) -> str:
        return "JsonCodec()"

    def encode(self, value: Any) -> bytes:
        try:
            tree = _encode(value)
        except _Failure as failure:
            raise failure.error("encode", type(value).__qualname__) from failure.cause
        except RecursionError as exc:
            raise _too_deep(value) from exc
        except Exception as exc:  # from the value's own code: a field, a Mapping's items()
            raise _unreadable(value, exc).error("encode", type(value).__qualname__) from exc
        try:
            return _dumps(tree).encode()
        except ValueError as exc:  # (UnicodeEncodeError too) json, or UTF-8, cannot write it
            raise _unwritable(value, tree, exc).error("encode", type(value).__qualname__) from exc
        except RecursionError as exc:  # a tree msgspec built in C may be deeper than _encode goes
            raise _too_deep(value) from exc

    def decode(self, data: bytes, into: Any, *, name: str) -> Any:
        try:
            try:
                decoder = _DECODERS.get(into, _MISSING)
            except TypeError:  # an unhashable type expression
                decoder = _MISSING
            if decoder is _MISSING:
                decoder = _decoder_for(into)
            try:
                value = _loads(data.decode())  # JSON between systems is UTF-8 (RFC 8259)
            except UnicodeDecodeError as exc:
                raise SerializationError(
                    f"cannot decode {name}: the payload is not UTF-8 text, as JSON between "
                    f"systems must be ({exc}); the sender must encode its text as UTF-8"
                ) from exc
            except json.JSONDecodeError as exc:
                raise SerializationError(f"cannot decode {name}: invalid JSON: {exc}") from exc
            except ValueError as exc:  # int(): a number with more digits than Python reads
                raise _too_long_in(data, into, name, exc) from exc
            except _NonFiniteConstant as exc:
                raise _nonfinite_in(data, into, name, exc.args[0]) from None
            except AttributeError as exc:  # data.decode(): not bytes
                raise SerializationError(
                    f"cannot decode {name}: expected the payload as bytes, got "
                    f"{type(data).__qualname__}; pass bytes (text.encode(), bytes(view))"
                ) from exc
            return value if decoder is None else decoder(value)
        except _Failure as failure:
            raise failure.error("decode", name) from failure.cause
        except RecursionError as exc:
            raise SerializationError(f"cannot decode {name}: nested too deeply") from exc


# Compact separators, real UTF-8 rather than \u escapes, and no NaN (not JSON). The
# encoded tree is built fresh by _encode, so it cannot be cyclic: skip that check.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


def _json_writer() -> Callable[[Any], str]:
    """``_ENCODER.encode``, without the C encoder it builds anew on every call.

    ``JSONEncoder.encode`` makes a fresh C encoder (``json.encoder.c_make_encoder``)
    for each value: ~0.6 µs of the ~2 µs a small message takes. Built once here with the
    arguments ``JSONEncoder`` gives it, and checked against it on a sample; the plain
    ``encode`` when this Python has no such C encoder, or it writes anything else.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return _ENCODER.encode
    try:
        chunks = make(
            None,  # no cycle check (check_circular=False)
            _ENCODER.default,
            json.encoder.encode_basestring,  # (ensure_ascii=False)
            None,  # no indent
            _ENCODER.key_separator,
            _ENCODER.item_separator,
            _ENCODER.sort_keys,
            _ENCODER.skipkeys,
            _ENCODER.allow_nan,
        )
    except TypeError:  # pragma: no cover - another signature than CPython 3.11-3.14's
        return _ENCODER.encode
    join = "".join

    def write(value: Any) -> str:
        return join(chunks(value, 0))

    sample = {"a": [1, 2.5, -0.0, True, None, '\u00e9"\n\U0001f600'], "b": {"c": 1e300}}
    try:
        same = write(sample) == _ENCODER.encode(sample)
    except Exception:  # pragma: no cover - as above
        same = False
    return write if same else _ENCODER.encode


class _NonFiniteConstant(Exception):
    """NaN, Infinity or -Infinity in a payload (not a ValueError: _loads retries those)."""


def _refuse_constant(constant: str) -> Any:
    raise _NonFiniteConstant(constant)


class _Constant(str):
    """Marks where a NaN or an Infinity was (the error path's second reading only)."""


class _LongNumber(str):
    """Marks an integer with more digits than ``int()`` reads (as above)."""


def _int_or_long(digits: str) -> Any:
    try:
        return int(digits)
    except ValueError:
        return _LongNumber(digits)


def _payload_path(data: bytes, into: Any, marker: type[str]) -> tuple[str, str] | None:
    """Where in ``data`` (read as ``into``) the first value ``json`` refused is, and its
    text: the payload is read again with the refused values as markers."""
    try:
        tree = json.loads(data, parse_constant=_Constant, parse_int=_int_or_long)
        found = _find_in_json(tree, into, lambda value: value if type(value) is marker else None)
    except (ValueError, RecursionError):  # invalid after it too, or deep: say no more
        return None
    return None if found is None else ("".join(found[0]), found[1])


def _nonfinite_in(data: bytes, into: Any, name: str, constant: str) -> SerializationError:
    found = _payload_path(data, into, _Constant)
    where = found[0] if found is not None else ""
    return SerializationError(
        f"cannot decode {name}{where}: the payload holds {constant}, which is not JSON "
        "(JSON has no NaN or Infinity); the sender must write a finite number, or null"
    )


def _too_long_in(data: bytes, into: Any, name: str, exc: ValueError) -> SerializationError:
    found = _payload_path(data, into, _LongNumber)
    if found is None:
        return SerializationError(f"cannot decode {name}: invalid JSON: {exc}")
    where, digits = found
    return SerializationError(
        f"cannot decode {name}{where}: the payload holds an integer {_too_many_digits(digits)}; "
        "the sender must send it as a string (a str or Decimal field), or raise the limit "
        "with sys.set_int_max_str_digits() in the receiver"
    )


def _too_many_digits(digits: str) -> str:
    return (
        f"of {len(digits.lstrip('-'))} digits, more than Python reads as an int "
        f"(sys.get_int_max_str_digits() is {sys.get_int_max_str_digits()})"
    )


_dumps = _json_writer()
# Python reads NaN, Infinity and -Infinity by default; they are not JSON, and this codec
# refuses to write them, so it refuses to read them too. Called only when a payload
# holds one: no cost to any other.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_read = _DECODER.decode
# The decoder's scanner (C): one JSON value at an index, and the index after it.
_scan: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads``, quicker on the common case (no whitespace around the value):
    ``JSONDecoder.decode`` runs a regular expression on each side of it. Anything
    else (whitespace, trailing data, invalid JSON) takes the full path, which also
    makes the error message."""
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return _read(text)
    return value if end == len(text) else _read(text)


_Encoder = Callable[[Any], Any]
# A decoder checks and converts one JSON value; None stands for "any JSON value as is".
_Decoder = Callable[[Any], Any]

_NoneType = type(None)
_MISSING: Any = object()


class _Failure(Exception):
    """Why a value could not be encoded or decoded, and where (innermost segment first)."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.segments: list[str] = []

    def error(self, action: str, root: str) -> SerializationError:
        path = root + "".join(reversed(self.segments))
        return SerializationError(f"cannot {action} {path}: {self.reason}")


# --- encoding: follows the value's type ---------------------------------------------

# Values that json handles as they are.
_NATIVE = frozenset({str, int, bool, float, _NoneType})
_ENCODERS: dict[type, _Encoder] = {}


def _encode(value: Any) -> Any:
    cls = type(value)
    if cls in _NATIVE:
        return value
    encoder = _ENCODERS.get(cls) or _encoder_for(cls)
    return encoder(value)


def _encoder_for(cls: type) -> _Encoder:
    encoder = _make_encoder(cls)
    _ENCODERS[cls] = encoder
    return encoder


def _make_encoder(cls: type) -> _Encoder:
    if issubclass(cls, enum.Enum):
        return _encode_enum
    if issubclass(cls, str | int | float):  # subclasses: json writes them as the base type
        return _same
    if dataclasses.is_dataclass(cls):
        return _dataclass_encoder(cls)
    if issubclass(cls, datetime | date | time):
        return _isoformat
    if issubclass(cls, UUID | Decimal):
        return str
    if issubclass(cls, bytes | bytearray):
        return _encode_bytes
    if issubclass(cls, list | tuple | set | frozenset):
        return _encode_items
    if issubclass(cls, Mapping):
        return _encode_mapping
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(cls, pydantic.BaseModel):
        return _encode_pydantic
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and issubclass(cls, msgspec.Struct):
        return _msgspec_encoder(msgspec)
    raise _Failure(
        f"{_describe(cls)} is not a dataclass, a pydantic model or a msgspec Struct; "
        "make it a dataclass, or pass a codec that can encode it"
    )


def _same(value: Any) -> Any:
    return value


def _encode_enum(value: enum.Enum) -> Any:
    return _encode(value._value_)


def _isoformat(value: date | time) -> str:
    return value.isoformat()


def _encode_bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _dataclass_encoder(cls: type) -> _Encoder:
    names = tuple(field.name for field in dataclasses.fields(cls))
    if not names:
        return lambda value: {}
    # One C call fetches every field (a tuple; a bare value when there is one field).
    get: Callable[[Any], Any] = attrgetter(*names)
    single = len(names) == 1

    def encode(value: Any) -> dict[str, Any]:
        values = get(value)
        if single:
            values = (values,)
        if _NATIVE.issuperset(map(type, values)):  # (the common case, in C: no loop here)
            return dict(zip(names, values, strict=True))
        out = {}
        for name, item in zip(names, values, strict=True):
            cls = type(item)
            if cls in _NATIVE:
                out[name] = item
                continue
            try:
                out[name] = (_ENCODERS.get(cls) or _encoder_for(cls))(item)
            except _Failure as failure:
                failure.segments.append("." + name)
                raise
        return out

    return encode


def _encode_items(value: Iterable[Any]) -> list[Any]:
    try:
        return [item if type(item) in _NATIVE else _encode(item) for item in value]
    except _Failure as failure:
        failure.segments.append(f"[{_failing_index(_encode, value)}]")
        raise


def _encode_mapping(value: Mapping[Any, Any]) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        text = key if type(key) is str else _encode_key(key)
        try:
            out[text] = item if type(item) in _NATIVE else _encode(item)
        except _Failure as failure:
            failure.segments.append(_key_segment(text))
            raise
    if len(out) != len(value):  # two keys wrote the same text: one value would be lost
        raise _Failure(_colliding(value))
    return out


def _colliding(value: Mapping[Any, Any]) -> str:
    seen: dict[str, Any] = {}
    for key in value:
        text = key if type(key) is str else _encode_key(key)
        if text in seen:
            return (
                f"the dict keys {seen[text]!r} and {key!r} are both written as {text!r}, so "
                "one value would be lost; use keys that differ as text (all str, or all int)"
            )
        seen[text] = key
    return f"the mapping changed while it was encoded ({len(value)} keys)"


def _encode_key(key: Any) -> str:
    raw = key._value_ if isinstance(key, enum.Enum) else key
    if isinstance(raw, str | int | UUID) and not isinstance(raw, bool):
        try:
            return str(raw)
        except ValueError as exc:  # an int with more digits than Python turns into text
            raise _Failure(_key_reason(raw, _unwritable_number(raw)), exc) from exc
    raise _Failure(
        f"cannot encode the dict key {key!r} ({_describe(type(key))}): "
        "keys must be str, int, UUID, or an Enum with str or int values"
    )


def _encode_pydantic(value: Any) -> Any:
    try:
        return value.model_dump(mode="json")
    except Exception as exc:
        # pydantic finds cycles itself: "Circular reference detected (id repeated)".
        fix = (
            "; break the cycle, e.g. send an id in place of the value"
            if "Circular reference" in str(exc)
            else ""
        )
        raise _Failure(f"pydantic cannot encode it: {exc}{fix}", exc) from exc


def _msgspec_encoder(msgspec: types.ModuleType) -> _Encoder:
    to_builtins = msgspec.to_builtins

    def encode(value: Any) -> Any:
        try:
            return to_builtins(value)
        except (TypeError, ValueError) as exc:
            raise _Failure(f"msgspec cannot encode it: {exc}", exc) from exc

    return encode


# --- encode errors: found after the fact, so that encoding checks nothing up front ------


def _unwritable(value: Any, tree: Any, exc: ValueError) -> _Failure:
    """Why json (or UTF-8, for a ``UnicodeEncodeError``) could not write ``tree``, the
    encoding of ``value``, and where.

    Looks for the first value of the kind that can raise ``exc``: in ``value``, whose
    parts name themselves (a field, a key); else in ``tree`` (a part pydantic or msgspec
    built). Anything else keeps ``exc``'s own text.
    """
    check = _lone_surrogate if isinstance(exc, UnicodeEncodeError) else _unwritable_number
    try:
        found = _find_in_value(value, check)
        if found is None or found[1] is None:
            found = _find_in_json(tree, Any, check)
    except Exception:  # the value's own code, or a tree deeper than the stack (msgspec's)
        found = None
    if found is None or found[1] is None:
        return _Failure(str(exc), exc)
    failure = _Failure(found[1], exc)
    failure.segments.extend(reversed(found[0]))
    return failure


def _unreadable(value: Any, exc: Exception) -> _Failure:
    """Where reading ``value`` raised ``exc`` (its own code: a property, a field never set,
    a Mapping's ``items()``), found by reading it again in the order ``_encode`` does."""
    try:
        found = _find_in_value(value, _nothing_wrong)
    except Exception:  # it failed otherwise this time
        found = None
    segments = found[0] if found is not None else []
    # An attribute error naming the field itself (not one a property's code ran into).
    if isinstance(exc, AttributeError) and segments[-1:] == [f".{exc.name}"]:
        reason = (
            f"the field is not set ({exc}): the object was made without its __init__ "
            "(object.__new__, say) or the attribute deleted; set every field before sending it"
        )
    else:
        reason = f"reading it raised {type(exc).__name__}: {exc}"
    failure = _Failure(reason, exc)
    failure.segments.extend(reversed(segments))
    return failure


def _nothing_wrong(value: Any) -> None:
    return None


class _Unreadable(Exception):
    """Reading a part of a value raised (the error path's second reading only)."""

    def __init__(self, segment: str) -> None:
        super().__init__(segment)
        self.segment = segment


# The first part of a value that a check explains, or that raised when read: its path
# (segments, outermost first) and the check's reason, or None where reading raised.
_Found = tuple[list[str], str | None]


def _find_in_value(value: Any, check: Callable[[Any], str | None]) -> _Found | None:
    """The first value (or dict key) in ``value``, in the order ``_encode`` reads them,
    that ``check`` explains or whose reading raises, and its path."""
    reason = check(value)
    if reason is not None:
        return [], reason
    children = _children(value)
    if children is None:
        return None
    try:
        for segment, child, key in children:
            if key is not _MISSING:
                reason = check(key._value_ if isinstance(key, enum.Enum) else key)
                if reason is not None:
                    return [], _key_reason(key, reason)
            found = _find_in_value(child, check)
            if found is not None:
                found[0].insert(0, segment)
                return found
    except _Unreadable as unreadable:
        return ([unreadable.segment] if unreadable.segment else []), None
    return None


def _unwritable_number(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return (
            f"JSON has no NaN or Infinity (got {float(value)!r}); send a finite number, "
            "or None where there is no value"
        )
    if isinstance(value, int):
        try:
            int.__repr__(value)
        except ValueError:
            return (
                f"the int has about {int(abs(value).bit_length() * math.log10(2)) + 1} digits, "
                "more than Python writes as text (sys.get_int_max_str_digits() is "
                f"{sys.get_int_max_str_digits()}); make the field a Decimal or a str, or "
                "raise the limit with sys.set_int_max_str_digits() in sender and receiver"
            )
    return None


def _lone_surrogate(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return (
            f"the str holds a lone surrogate ({value[exc.start]!r} at index {exc.start}), "
            "which UTF-8 cannot encode (decoding with errors='surrogateescape' makes them); "
            "clean it with text.encode('utf-8', 'replace').decode(), or send the raw data "
            "as bytes"
        )
    return None


def _key_reason(key: Any, reason: str | None) -> str:
    if isinstance(key, int):  # (one too long to show)
        return f"the dict key: {reason}"
    text = repr(key)
    return f"the dict key {text[:40] + '...' if len(text) > 43 else text}: {reason}"


def _too_deep(value: Any) -> SerializationError:
    root = type(value).__qualname__
    try:
        where = _cycle(value)
    except Exception:  # the value's own code failed again (its RecursionError, say)
        where = None
    if where is not None:
        return SerializationError(
            f"cannot encode {root}{where}: a circular reference (this refers back to a value "
            "that contains it); JSON cannot express one: break the cycle, e.g. send an id "
            "in place of the value"
        )
    return SerializationError(
        f"cannot encode {root}: nested too deeply (more levels than Python's recursion "
        "limit allows); flatten it, e.g. into a list of items that refer to their parent"
    )


def _cycle(value: Any) -> str | None:
    """The path at which ``value`` first contains one of its own containers, or None.

    Iterative: it runs after a RecursionError. Follows what _encode follows: dataclass
    fields, enum values, lists, tuples, sets, mappings, msgspec Struct fields. Each level
    keeps its own segment (the path is joined once, if found: a path per level would take
    memory in the square of the depth, a GB for a linked list 20,000 long), and the walk
    stops past ten times the recursion limit: a value made as it is read (a Mapping whose
    items are new objects at every level) can be endless, and is nested too deeply anyway.
    """
    children = _children(value)
    if children is None:
        return None
    stack = [(value, "", children)]
    open_ids = {id(value)}
    done: set[int] = set()  # shared, and already searched
    deepest = 10 * sys.getrecursionlimit()
    while stack:
        node, _, children = stack[-1]
        for segment, child, _ in children:
            if id(child) in open_ids:
                return "".join(level[1] for level in stack) + segment
            if id(child) in done:
                continue
            grandchildren = _children(child)
            if grandchildren is not None:
                if len(stack) >= deepest:
                    return None
                open_ids.add(id(child))
                stack.append((child, segment, grandchildren))
                break
        else:
            stack.pop()
            open_ids.discard(id(node))
            done.add(id(node))
    return None


def _children(value: Any) -> Iterator[tuple[str, Any, Any]] | None:
    """The parts ``_encode`` reads from ``value``, in its order: (path segment, part, dict
    key or _MISSING); None for a value without parts. A read that raises raises
    ``_Unreadable`` with the segment it was for."""
    if isinstance(value, str | bytes | bytearray | int | float) and not isinstance(
        value, enum.Enum
    ):
        return None
    if isinstance(value, enum.Enum):
        return iter([("", value._value_, _MISSING)])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _attributes(value, [field.name for field in dataclasses.fields(value)])
    if isinstance(value, list | tuple | set | frozenset):
        return ((f"[{index}]", item, _MISSING) for index, item in enumerate(value))
    if isinstance(value, Mapping):
        return _items(value)
    names = getattr(type(value), "__struct_fields__", None)  # a msgspec Struct
    if type(names) is tuple:
        return _attributes(value, names)
    fields = getattr(type(value), "__pydantic_fields__", None)  # a pydantic model
    if type(fields) is dict:
        return _attributes(value, list(fields))
    return None


def _attributes(value: Any, names: Iterable[str]) -> Iterator[tuple[str, Any, Any]]:
    for name in names:
        try:
            item = getattr(value, name)
        except Exception as exc:
            raise _Unreadable("." + name) from exc
        yield "." + name, item, _MISSING


def _items(value: Mapping[Any, Any]) -> Iterator[tuple[str, Any, Any]]:
    try:
        for key, item in value.items():
            yield _key_segment(_key_text(key)), item, key
    except _Unreadable:
        raise
    except Exception as exc:
        raise _Unreadable("") from exc


def _key_text(key: Any) -> str:
    """A dict key as ``_encode_key`` writes it (the error path: never raises)."""
    raw = key._value_ if isinstance(key, enum.Enum) else key
    try:
        return str(raw)
    except Exception:  # an int too long to write, or the key's own __str__
        return "..."


def _key_segment(key: str) -> str:
    """How a dict key shows in a path: ``['sku']``, and a long one cut: ``['abc'...]``."""
    return f"[{key!r}]" if len(key) <= 40 else f"[{key[:40]!r}...]"


def _find_in_json(
    tree: Any, into: Any, check: Callable[[Any], str | None]
) -> tuple[list[str], str] | None:
    """The path to the first value (or object key) in a JSON tree that ``check``
    explains, and its explanation. ``into``, the type the tree is read as (or Any),
    tells a field (``.name``) from a dict key (``['key']``)."""
    if type(tree) is dict:
        for key, item in tree.items():
            reason = check(key)
            if reason is not None:
                return [], _key_reason(key, reason)
            segment, item_type = _json_member(into, key)
            found = _find_in_json(item, item_type, check)
            if found is not None:
                found[0].insert(0, segment)
                return found
        return None
    if type(tree) is list:
        for index, item in enumerate(tree):
            found = _find_in_json(item, _json_item_type(into, index), check)
            if found is not None:
                found[0].insert(0, f"[{index}]")
                return found
        return None
    reason = check(tree)
    return None if reason is None else ([], reason)


# Reading a type expression for the error paths only (a path through a payload): the
# decoders compiled for the hot path keep no such map.


def _json_member(into: Any, key: str) -> tuple[str, Any]:
    """The path segment of ``key`` in a JSON object read as ``into``, and the type of
    its value."""
    into = _shaped(into, _is_object)
    fields = _json_fields(into)
    if fields is not None:
        return ("." + key, fields[key]) if key in fields else (_key_segment(key), Any)
    args = typing.get_args(into)
    return _key_segment(key), args[1] if len(args) == 2 else Any


def _json_item_type(into: Any, index: int) -> Any:
    into = _shaped(into, _is_array)
    args = typing.get_args(into)
    if typing.get_origin(into) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args[index] if index < len(args) else Any
    return args[0] if args else Any


def _shaped(tp: Any, fits: Callable[[type], bool]) -> Any:
    """``tp`` without Annotated, NewType or a type alias; of a union, the first member
    whose class ``fits`` (Any if none does)."""
    if isinstance(tp, typing.NewType):
        return _shaped(tp.__supertype__, fits)
    if isinstance(tp, TypeVar):
        return Any if tp.__bound__ is None else _shaped(tp.__bound__, fits)
    alias_type = getattr(typing, "TypeAliasType", None)  # Python >= 3.12
    if alias_type is not None and isinstance(tp, alias_type):  # pragma: no cover
        return _shaped(tp.__value__, fits)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _shaped(typing.get_args(tp)[0], fits)
    if origin is Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            member = _shaped(arg, fits)
            cls = typing.get_origin(member) or member
            if isinstance(cls, type) and fits(cls):
                return member
        return Any
    return tp


def _is_object(cls: type) -> bool:
    return issubclass(cls, Mapping) or _json_fields(cls) is not None


def _is_array(cls: type) -> bool:
    return issubclass(cls, list | tuple | set | frozenset | Sequence | AbstractSet) and not (
        issubclass(cls, str | bytes | bytearray)
    )


def _json_fields(tp: Any) -> dict[str, Any] | None:
    """The fields of a dataclass, pydantic model or msgspec Struct by their JSON names,
    with their types; None for any other type."""
    cls = typing.get_origin(tp) or tp
    if not isinstance(cls, type):
        return None
    if dataclasses.is_dataclass(cls):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            hints = {}
        typevars = dict(zip(getattr(cls, "__parameters__", ()), typing.get_args(tp), strict=False))
        return {
            field.name: _substitute(hints.get(field.name, Any), typevars)
            for field in dataclasses.fields(cls)
        }
    pydantic_fields = getattr(cls, "__pydantic_fields__", None)
    if type(pydantic_fields) is dict:
        return {info.alias or name: info.annotation for name, info in pydantic_fields.items()} | {
            name: info.annotation for name, info in pydantic_fields.items()
        }
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and issubclass(cls, msgspec.Struct):
        return {field.encode_name: field.type for field in msgspec.structs.fields(cls)}
    return None


# --- decoding: follows the type asked for --------------------------------------------

# The plans, by type expression. Python finds ``int | str == str | int``, but a union is
# tried in the order written, so a type expression with a union in it is cached apart, under
# a key that keeps the order of every argument.
_DECODERS: dict[Any, _Decoder | None] = {}
_ORDERED_DECODERS: dict[Any, _Decoder | None] = {}

# While compiling: ordered key -> (type expression, decoder).
_Pending = dict[Any, tuple[Any, _Decoder | None]]


def _decoder_for(into: Any) -> _Decoder | None:
    key = _ordered_key(into)
    try:
        if key in _ORDERED_DECODERS:
            return _ORDERED_DECODERS[key]
    except TypeError:  # unhashable: compile it, but it cannot be cached
        return _build(into, {})
    # Compile into a scratch dict and publish only whole plans: a dataclass that fails
    # half-way must not leave behind decoders that refer to it.
    pending: _Pending = {}
    decoder = _compile(into, pending)
    for pending_key, (tp, compiled) in pending.items():
        if _has_union(tp):
            _ORDERED_DECODERS[pending_key] = compiled
        else:
            _DECODERS[tp] = compiled
    return decoder


def _compile(tp: Any, pending: _Pending) -> _Decoder | None:
    key = _ordered_key(tp)
    try:
        if tp in _DECODERS:
            return _DECODERS[tp]
        if key in _ORDERED_DECODERS:
            return _ORDERED_DECODERS[key]
        if key in pending:
            return pending[key][1]
    except TypeError:  # unhashable: compile it, but it cannot be cached
        return _build(tp, pending)
    decoder = _build(tp, pending)
    pending[key] = (tp, decoder)
    return decoder


def _ordered_key(tp: Any) -> Any:
    if isinstance(tp, type):
        return tp
    args = getattr(tp, "__args__", None)
    if type(args) is not tuple:
        return tp
    return (tp, *[_ordered_key(arg) for arg in args])


def _has_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return True
    return any(_has_union(arg) for arg in typing.get_args(tp))


def _build(tp: Any, pending: _Pending) -> _Decoder | None:
    if tp is Any or tp is object:
        return None
    if tp is None or tp is _NoneType:
        return _decode_none
    if isinstance(tp, typing.NewType):
        return _compile(tp.__supertype__, pending)
    if isinstance(tp, TypeVar):
        return None if tp.__bound__ is None else _compile(tp.__bound__, pending)
    alias_type = getattr(typing, "TypeAliasType", None)  # `type X = ...`, Python >= 3.12
    if alias_type is not None and isinstance(tp, alias_type):  # pragma: no cover
        return _compile(tp.__value__, pending)
    origin = typing.get_origin(tp)
    if origin is not None:
        return _build_generic(tp, origin, typing.get_args(tp), pending)
    if isinstance(tp, type):
        return _build_class(tp, pending)
    raise _unsupported(tp)


def _build_generic(
    tp: Any, origin: Any, args: tuple[Any, ...], pending: _Pending
) -> _Decoder | None:
    if origin is typing.Annotated:
        return _compile(args[0], pending)
    if origin is Union or origin is types.UnionType:
        return _union_decoder(tp, args, pending)
    if origin is Literal:
        return _literal_decoder(args)
    if origin in (list, Sequence, MutableSequence):
        return _items_decoder(tp, list, _compile(args[0] if args else Any, pending))
    if origin in (set, AbstractMutableSet):
        return _items_decoder(tp, set, _compile(args[0] if args else Any, pending))
    if origin in (frozenset, AbstractSet):
        return _items_decoder(tp, frozenset, _compile(args[0] if args else Any, pending))
    if origin is tuple:
        if tp is typing.Tuple or (len(args) == 2 and args[1] is Ellipsis):  # noqa: UP006
            return _items_decoder(tp, tuple, _compile(args[0] if args else Any, pending))
        return _fixed_tuple_decoder(tp, [_compile(arg, pending) for arg in args])
    if origin in (dict, Mapping, MutableMapping):
        key, value = args or (Any, Any)
        return _dict_decoder(tp, _compile_key(key), _compile(value, pending))
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        return _dataclass_decoder(tp, origin, args, pending)
    raise _unsupported(tp)


def _build_class(cls: type, pending: _Pending) -> _Decoder | None:
    if issubclass(cls, enum.Enum):
        return _enum_decoder(cls)
    simple = _SIMPLE.get(cls)
    if simple is not None:
        return simple
    if dataclasses.is_dataclass(cls):
        return _dataclass_decoder(cls, cls, (), pending)
    if cls in _BARE:
        return _compile(_BARE[cls], pending)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(cls, pydantic.BaseModel):
        return _pydantic_decoder(cls, pydantic)
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and issubclass(cls, msgspec.Struct):
        return _msgspec_decoder(cls, msgspec)
    for base in (str, int, float):
        if issubclass(cls, base):  # class UserId(str): check the base type, then wrap
            return _subclass_decoder(cls, _SIMPLE[base])
    raise _unsupported(cls)


# A bare container holds anything.
_BARE: dict[type, Any] = {
    list: list[Any],
    set: set[Any],
    frozenset: frozenset[Any],
    tuple: tuple[Any, ...],
    dict: dict[Any, Any],
}


def _unsupported(tp: Any) -> _Failure:
    return _Failure(
        f"{_describe(tp)} is not a dataclass, a pydantic model, a msgspec Struct or another "
        "supported type; make it a dataclass, or pass a codec that can decode it"
    )


def _expected(what: str, value: Any, cause: BaseException | None = None) -> _Failure:
    return _Failure(f"expected {what}, got {_got(value)}", cause)


# Simple types: the JSON type is checked exactly (``type(x) is int``, so a bool is not an
# int), except that a float also accepts an integer.


def _decode_none(value: Any) -> None:
    if value is not None:
        raise _expected("null", value)


def _decode_str(value: Any) -> str:
    if type(value) is str:
        return value
    raise _expected("str", value)


def _decode_int(value: Any) -> int:
    if type(value) is int:
        return value
    raise _expected("int", value)


def _decode_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise _expected("bool", value)


def _decode_float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _expected("float", value)


def _parser(parse: Callable[[Any], Any], what: str, *, accept_int: bool = False) -> _Decoder:
    def decode(value: Any) -> Any:
        if type(value) is str or (accept_int and type(value) is int):
            try:
                return parse(value)
            except (ValueError, ArithmeticError) as exc:  # decimal.InvalidOperation
                raise _expected(what, value, exc) from exc
        raise _expected(what, value)

    return decode


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


_decode_uuid = _parser(UUID, "UUID (a string)")

_SIMPLE: dict[type, _Decoder] = {
    str: _decode_str,
    int: _decode_int,
    bool: _decode_bool,
    float: _decode_float,
    datetime: _parser(datetime.fromisoformat, "datetime (an ISO 8601 string)"),
    date: _parser(date.fromisoformat, "date (an ISO 8601 string)"),
    time: _parser(time.fromisoformat, "time (an ISO 8601 string)"),
    UUID: _decode_uuid,
    Decimal: _parser(Decimal, "Decimal (a decimal string)", accept_int=True),
    bytes: _parser(_b64decode, "bytes (a base64 string)"),
}


def _subclass_decoder(cls: type, base: _Decoder) -> _Decoder:
    return lambda value: cls(base(value))


def _enum_decoder(cls: type[enum.Enum]) -> _Decoder:
    members = {(type(m._value_), m._value_): m for m in cls}
    value_types = {type(m._value_) for m in cls}
    choices = ", ".join(_json_text(m._value_) for m in cls)
    what = f"{cls.__qualname__} (one of {choices})"

    def decode(value: Any) -> enum.Enum:
        try:
            return members[type(value), value]
        except (KeyError, TypeError):
            pass
        if type(value) in value_types:  # a Flag combination, or a _missing_ hook
            try:
                return cls(value)
            except ValueError as exc:
                raise _expected(what, value, exc) from exc
        raise _expected(what, value)

    return decode


def _literal_decoder(args: tuple[Any, ...]) -> _Decoder:
    allowed = {}
    for arg in args:
        raw = arg._value_ if isinstance(arg, enum.Enum) else arg
        allowed[type(raw), raw] = arg
    what = "one of " + ", ".join(_json_text(raw) for _, raw in allowed)

    def decode(value: Any) -> Any:
        try:
            return allowed[type(value), value]
        except (KeyError, TypeError):
            raise _expected(what, value) from None

    return decode


def _union_decoder(tp: Any, args: tuple[Any, ...], pending: _Pending) -> _Decoder | None:
    nullable = _NoneType in args
    members = [(arg, _compile(arg, pending)) for arg in args if arg is not _NoneType]
    if any(decoder is None for _, decoder in members):
        return None  # Any in a union accepts everything
    decoders = [decoder for _, decoder in members if decoder is not None]
    if nullable and len(decoders) == 1:
        only = decoders[0]
        return lambda value: None if value is None else only(value)
    what = _describe(tp)

    def decode(value: Any) -> Any:
        if value is None and nullable:
            return None
        notes = []
        for (arg, _), decoder in zip(members, decoders, strict=True):
            try:
                return decoder(value)
            except _Failure as failure:
                if failure.segments:  # the shape fitted but a field did not: say which
                    where = "".join(reversed(failure.segments))
                    notes.append(f"as {_describe(arg)}: {where}: {failure.reason}")
        details = f" ({'; '.join(notes)})" if notes else ""
        raise _Failure(f"expected {what}, got {_got(value)}{details}")

    return decode


def _failing_index(convert: Callable[[Any], Any], items: Iterable[Any]) -> int:
    """The index of the first item that ``convert`` rejects (the error path only)."""
    for index, item in enumerate(items):
        try:
            convert(item)
        except _Failure:
            return index
    return -1  # pragma: no cover - converters are deterministic


def _items_decoder(tp: Any, kind: type, item: _Decoder | None) -> _Decoder:
    what = f"{_describe(tp)} (an array)"

    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _expected(what, value)
        if item is None:
            items = value
        else:
            try:
                items = [item(x) for x in value]
            except _Failure as failure:
                failure.segments.append(f"[{_failing_index(item, value)}]")
                raise
        if kind is list:
            return items
        try:
            return kind(items)
        except TypeError as exc:  # set members must be hashable
            raise _Failure(f"cannot build a {_describe(tp)}: {exc}", exc) from exc

    return decode


def _fixed_tuple_decoder(tp: Any, items: list[_Decoder | None]) -> _Decoder:
    what = f"{_describe(tp)} (an array of {len(items)})"

    def decode(value: Any) -> tuple[Any, ...]:
        if type(value) is not list or len(value) != len(items):
            got = f"an array of {len(value)}" if type(value) is list else _got(value)
            raise _Failure(f"expected {what}, got {got}")
        out = []
        for index, (decoder, x) in enumerate(zip(items, value, strict=True)):
            try:
                out.append(x if decoder is None else decoder(x))
            except _Failure as failure:
                failure.segments.append(f"[{index}]")
                raise
        return tuple(out)

    return decode


def _compile_key(tp: Any) -> _Decoder | None:
    """Decoders for dict keys, which JSON always writes as strings."""
    if isinstance(tp, typing.NewType):
        return _compile_key(tp.__supertype__)
    if tp is str or tp is Any:
        return None
    if tp is int:
        return _decode_int_key
    if tp is UUID:
        return _decode_uuid
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members: list[enum.Enum] = list(tp)
        by_text = {str(m._value_): m for m in members}
        what = f"{tp.__qualname__} key (one of {', '.join(map(repr, by_text))})"

        def decode(key: str) -> Any:
            try:
                return by_text[key]
            except KeyError:
                raise _expected(what, key) from None

        return decode
    if typing.get_origin(tp) is Literal and all(type(a) is str for a in typing.get_args(tp)):
        return _literal_decoder(typing.get_args(tp))
    raise _Failure(
        f"cannot decode dict keys into {_describe(tp)}: keys must be str, int, UUID, an Enum "
        "or a Literal of strings"
    )


def _decode_int_key(key: str) -> int:
    try:
        number = int(key)
    except ValueError as exc:
        if key.lstrip("-").isdigit():  # decimal, but longer than int() reads
            raise _Failure(
                f"the key is an integer {_too_many_digits(key)}; make the key a str, or raise "
                "the limit with sys.set_int_max_str_digits() in the receiver",
                exc,
            ) from exc
        number = None
    if number is None or str(number) != key:
        raise _expected("int key (a decimal string)", key)
    return number


def _dict_decoder(tp: Any, key: _Decoder | None, item: _Decoder | None) -> _Decoder:
    what = f"{_describe(tp)} (an object)"

    def decode(value: Any) -> dict[Any, Any]:
        if type(value) is not dict:
            raise _expected(what, value)
        if key is None and item is None:
            return value
        out = {}
        for text, x in value.items():
            try:
                out[text if key is None else key(text)] = x if item is None else item(x)
            except _Failure as failure:
                failure.segments.append(_key_segment(text))
                raise
        return out

    return decode


def _dataclass_decoder(tp: Any, cls: type, args: tuple[Any, ...], pending: _Pending) -> _Decoder:
    # (field name, JSON type taken as is, decoder, required), filled in below: the decoder
    # is registered first so that a recursive type (children: list[Tree]) finds itself.
    plan: list[tuple[str, type | None, _Decoder | None, bool]] = []
    what = f"{_describe(tp)} (an object)"
    # When every field is a plain str, int, bool or float (filled in below): the fields'
    # names, their types, and a C call fetching their values from the JSON object.
    fast: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
    names: tuple[str, ...] = ()
    exact_types: tuple[type, ...] = ()

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise _expected(what, value)
        kwargs = None
        if fast is not None:
            # Every field a str, int, bool or float, each there with exactly its type:
            # taken as they are, checked in C (anything else: the loop below says why).
            try:
                raws = fast(value)
            except KeyError:
                raws = ()
            if tuple(map(type, raws)) == exact_types:
                # (no other key in it: the object itself is the keyword arguments)
                kwargs = value if len(value) == len(names) else dict(zip(names, raws, strict=True))
        if kwargs is None:
            kwargs = {}
            for name, exact, decoder, required in plan:
                raw = value.get(name, _MISSING)
                if type(raw) is exact:  # a str, int, bool or float field: no call needed
                    kwargs[name] = raw
                    continue
                if raw is _MISSING:
                    if required:
                        failure = _Failure("missing required field")
                        failure.segments.append("." + name)
                        raise failure
                    continue  # the dataclass fills in its default
                if decoder is None:
                    kwargs[name] = raw
                    continue
                try:
                    kwargs[name] = decoder(raw)
                except _Failure as failure:
                    failure.segments.append("." + name)
                    raise
        try:
            return cls(**kwargs)
        except Exception as exc:  # __post_init__ validation, typically
            raise _Failure(f"{cls.__qualname__}() rejected it: {exc!r}", exc) from exc

    pending[_ordered_key(tp)] = (tp, decode)
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise _Failure(
            f"cannot resolve the type hints of {cls.__qualname__}: {exc!r}; define the "
            "types it refers to at module level",
            exc,
        ) from exc
    typevars = dict(zip(getattr(cls, "__parameters__", ()), args, strict=False))
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints.get(field.name, Any)
        if typevars:
            hint = _substitute(hint, typevars)
        try:
            decoder = _compile(hint, pending)
        except _Failure as failure:
            failure.segments.append("." + field.name)
            raise
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        exact = hint if hint in (str, int, bool, float) else None
        plan.append((field.name, exact, decoder, required))
    if plan and all(exact is not None for _, exact, _, _ in plan):
        names = tuple(name for name, _, _, _ in plan)
        exact_types = tuple(exact for _, exact, _, _ in plan if exact is not None)
        getter = itemgetter(*names)
        fast = getter if len(names) > 1 else lambda value: (getter(value),)
    return decode


def _substitute(hint: Any, typevars: dict[Any, Any]) -> Any:
    """``list[T]`` with ``{T: Book}`` gives ``list[Book]``."""
    if isinstance(hint, TypeVar):
        return typevars.get(hint, hint)
    params = getattr(hint, "__parameters__", ())
    if params and typing.get_origin(hint) is not None:
        return hint[tuple(typevars.get(p, p) for p in params)]
    return hint


def _pydantic_decoder(cls: type, pydantic: types.ModuleType) -> _Decoder:
    validation_error = pydantic.ValidationError
    validate = cls.model_validate  # type: ignore[attr-defined]

    def decode(value: Any) -> Any:
        try:
            return validate(value)
        except validation_error as exc:
            first = exc.errors()[0]
            reason = first["msg"]
            if first["type"] != "missing":
                reason += f", got {_got(first['input'])}"
            if exc.error_count() > 1:
                reason += f" (and {exc.error_count() - 1} more)"
            failure = _Failure(reason, exc)
            failure.segments.extend(reversed(_pydantic_path(cls, first["loc"])))
            raise failure from exc

    return decode


def _pydantic_path(cls: type, loc: Iterable[int | str]) -> list[str]:
    """A pydantic error's location as path segments: ``('lines', 0, 'qty')`` is
    ``.lines[0].qty``, and a dict's key is ``['key']``. Of a union (``int | list[int]``)
    pydantic names the member tried (``'list[int]'``): not a segment."""
    segments = []
    tp: Any = cls
    for part in loc:
        if type(part) is int:
            segments.append(f"[{part}]")
            tp = _json_item_type(tp, part)
            continue
        members = _union_members(tp)
        if len(members) > 1:  # the member's tag
            tp = next((m for m in members if part in (_describe(m), _tag(m))), Any)
            continue
        segment, tp = _json_member(tp, str(part))
        segments.append(segment)
    return segments


def _union_members(tp: Any) -> list[Any]:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return [arg for arg in typing.get_args(tp) if arg is not _NoneType]
    return [tp]


def _tag(tp: Any) -> str | None:
    name = getattr(tp, "__name__", None)
    return name if isinstance(name, str) else None


def _msgspec_decoder(cls: type, msgspec: types.ModuleType) -> _Decoder:
    convert = msgspec.convert
    validation_error = msgspec.ValidationError

    def decode(value: Any) -> Any:
        try:
            return convert(value, cls)
        except validation_error as exc:
            # "Expected `int`, got `str` - at `$.items[0].price`"
            reason, found, where = str(exc).partition(" - at `$")
            failure = _Failure(reason, exc)
            if found:
                failure.segments.append(where.rstrip("`"))
            raise failure from exc

    return decode


# --- error message helpers ---------------------------------------------------------------

_JSON_KINDS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _got(value: Any) -> str:
    """How a JSON value is shown in an error: its JSON kind, and a short excerpt."""
    if value is None:
        return "null"
    if type(value) is dict:
        return "an object"
    if type(value) is list:
        return "an array"
    kind = _JSON_KINDS.get(type(value), type(value).__qualname__)
    text = _json_text(value)
    return f"{kind} {text[:40] + '...' if len(text) > 43 else text}"


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _describe(tp: Any) -> str:
    """A short readable name for a type expression: ``list[Book]``, ``int | None``."""
    if tp is None or tp is _NoneType:
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None and args:
        inner = ", ".join("..." if arg is Ellipsis else _describe(arg) for arg in args)
        return f"{_describe(origin)}[{inner}]"
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp)
