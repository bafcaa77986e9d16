import math
import os
import random
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from iambus.envelope import Envelope, new_id
from iambus.errors import SerializationError


def test_ids_are_uuid7_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    parsed = [uuid.UUID(i) for i in ids]
    assert {u.version for u in parsed} == {7}
    millis = [u.int >> 80 for u in parsed]
    assert millis == sorted(millis)
    assert abs(millis[0] / 1000 - time.time()) < 5


def _random_bits(envelope_id: str) -> int:
    return uuid.UUID(envelope_id).int & ((1 << 80) - 1)


def test_ids_do_not_follow_a_seed_of_the_global_random() -> None:
    # Two processes seeding `random` alike (reproducible tests) must not repeat ids: a
    # broker deduplicating by id (NATS) would drop the second process's messages.
    random.seed(42)
    first = [_random_bits(new_id()) for _ in range(5)]
    random.seed(42)
    second = [_random_bits(new_id()) for _ in range(5)]
    assert not set(first) & set(second)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    # In a fresh interpreter: forking this one, which may run threads, would warn.
    script = """
import os, random, uuid
from iambus.envelope import new_id
random.seed(7)
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, new_id().encode())
    os._exit(0)
os.close(write)
child = os.read(read, 100).decode()
os.wait()
print(child, new_id())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=20
    ).stdout.split()
    assert _random_bits(out[0]) != _random_bits(out[1])


def test_fields_round_trip() -> None:
    envelope = Envelope(
        name="OrderPlaced",
        payload=b'{"id":7}',
        correlation_id="c",
        causation_id="d",
        reply_to="r",
        key="order-7",
        headers={"tenant": "acme"},
    )
    fields = envelope.to_fields()
    as_redis_returns_them = {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()
    }
    assert Envelope.from_fields(as_redis_returns_them) == envelope
    assert Envelope.from_fields(fields) == envelope


def test_minimal_envelope_has_no_optional_fields() -> None:
    fields = Envelope(name="Ping", payload=b"{}").to_fields()
    assert set(fields) == {"id", "name", "ct", "at", "payload"}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"name": "x", "payload": "{}", "at": "1"}, "'id' is missing"),
        ({"id": "1", "name": "x", "payload": "{}", "at": "soon"}, "could not convert"),
        ({"id": "1", "name": "x", "payload": "{}", "at": "1", "headers": "[1]"}, "headers"),
        ({"id": "1", "name": "x", "payload": "{}", "at": "1", "headers": "{"}, "malformed"),
        # decoded JSON with the payload as bytes: the fast path, same checks
        ({"id": "1", "name": "x", "payload": b"{}", "at": "soon"}, "could not convert"),
        ({"id": "1", "name": "x", "payload": b"{}", "at": "1", "headers": "[1]"}, "headers"),
        ({"id": "1", "name": "x", "payload": b"{}", "at": "1", "headers": "{"}, "malformed"),
        ({"id": "1", "payload": b"{}", "at": "1"}, "'name' is missing"),
    ],
)
def test_malformed_fields_are_a_serialization_error(fields: dict[str, str], match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        Envelope.from_fields(fields)


def test_bytes_fields_as_a_driver_returns_them_are_checked_the_same() -> None:
    good = {
        k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in Envelope(name="Ping", payload=b"{}", key="k").to_fields().items()
    }
    assert Envelope.from_fields(good).key == "k"
    with pytest.raises(SerializationError, match="'at' is missing"):
        Envelope.from_fields({k: v for k, v in good.items() if k != b"at"})
    with pytest.raises(SerializationError, match="headers"):
        Envelope.from_fields({**good, b"headers": b'{"a": 1}'})


def test_decoded_json_fields_of_other_types_take_the_general_path() -> None:
    envelope = Envelope(name="Ping", payload=b"{}", key="k", headers={"a": "b"})
    fields = {**envelope.to_fields(), "corr": b"c"}  # bytes where JSON gives str
    assert Envelope.from_fields(fields) == Envelope(
        name="Ping",
        payload=b"{}",
        key="k",
        headers={"a": "b"},
        id=envelope.id,
        created_at=envelope.created_at,
        correlation_id="c",
    )
    as_text = {**envelope.to_fields(), "payload": "{}"}  # a str payload is encoded
    assert Envelope.from_fields(as_text) == envelope


@pytest.mark.parametrize("at", ["1e999", "-1e999", "inf", "nan", "Infinity", 1e999, math.nan])
@pytest.mark.parametrize("form", ["text", "bytes", "mixed"])
def test_a_time_that_is_no_finite_number_is_a_serialization_error(
    at: str | float, form: str
) -> None:
    # float() reads "1e999" as inf and "nan" as nan: such an envelope passed, and a query
    # with a deadline read from it poisoned how old its sender's queries look (every one
    # after it "expired" unanswered); RabbitMQ cannot even stamp it (int(inf)).
    fields: dict[Any, Any] = {"id": "1", "name": "x", "payload": b"{}", "at": at}
    if form == "bytes" and isinstance(at, str):
        fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    elif form == "mixed":
        fields["corr"] = b"c"  # the general path
    with pytest.raises(SerializationError, match="'at' is no finite time"):
        Envelope.from_fields(fields)
