"""iambus.logs: the fields of a worker's lines about failures, retries and dead letters,
the JSON formatter (``iambus worker --log-format json`` on a real broker, each line
parsed), and no password in any line."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from iambus import Command, Dispatcher, Query, RemoteError
from iambus.envelope import Envelope
from iambus.logs import FIELDS, JsonFormatter, TextFormatter, message_fields, scrub
from iambus.retry import Retry

from .conftest import Bus
from .processes import Cluster, until


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str]):
    order_id: int


ROUTES: dict[type | str, str] = {ChargeCard: "billing", GetInvoice: "billing"}


def about(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The worker's lines about one message, in order."""
    return [r for r in caplog.records if getattr(r, "outcome", None) is not None]


@pytest.mark.parametrize("bus", ["memory", "redis"], indirect=True)
async def test_each_failure_retry_and_dead_letter_is_one_line_with_the_fields(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    billing = Dispatcher(
        transport=bus.transport(),
        service="billing",
        routes=ROUTES,
        retry=Retry(attempts=2, backoff=0),
    )
    orders = Dispatcher(transport=bus.transport(), service="orders", routes=ROUTES)

    @billing.commands.register(ChargeCard)
    async def charge(command: ChargeCard) -> None:
        raise ValueError(f"card declined: {command.amount}")

    @billing.queries.register(GetInvoice)
    async def invoice(query: GetInvoice) -> str:
        raise LookupError("no such order")

    caplog.set_level(logging.WARNING, logger="iambus.worker")
    async with billing, orders:
        with pytest.raises(RemoteError):
            await orders.execute(ChargeCard(5), timeout=10)
        with pytest.raises(RemoteError):
            await orders.query(GetInvoice(1), timeout=10)
        await orders.remote.transport.send(  # type: ignore[union-attr]
            "command.ChargeCard", Envelope(name="ChargeCard", payload=b"not json")
        )

        def undecodable() -> bool:
            return any(r.outcome == "undecodable" for r in about(caplog))  # type: ignore[attr-defined]

        await until(undecodable, 10, "the undecodable line")
    retry, dead, failed, bad = about(caplog)
    handler = charge.__qualname__
    for record in (retry, dead, failed, bad):
        assert set(FIELDS) <= set(vars(record))  # every field, always (None if unknown)
        assert record.service == "billing"  # type: ignore[attr-defined]
    assert (retry.outcome, retry.levelname, retry.attempt, retry.attempts) == (  # type: ignore[attr-defined]
        "retry",
        "WARNING",
        1,
        2,
    )
    assert retry.retry_delay == 0  # type: ignore[attr-defined]
    assert (dead.outcome, dead.levelname, dead.attempt) == ("dead_letter", "ERROR", 2)  # type: ignore[attr-defined]
    for record in (retry, dead):
        assert record.message_name == "ChargeCard"  # type: ignore[attr-defined]
        assert record.message_kind == "command"  # type: ignore[attr-defined]
        assert record.handler.endswith(handler)  # type: ignore[attr-defined]
        assert (record.error_type, record.error) == (  # type: ignore[attr-defined]
            "builtins.ValueError",
            "card declined: 5",
        )
    assert retry.message_id == dead.message_id  # type: ignore[attr-defined]
    assert retry.correlation_id == dead.correlation_id is not None  # type: ignore[attr-defined]
    # ... and in the text.
    text = dead.getMessage()
    assert f"id={dead.message_id} correlation={dead.correlation_id}" in text  # type: ignore[attr-defined]
    assert "attempt=2/2 service=billing" in text
    assert "ValueError: card declined: 5" in text
    assert (failed.outcome, failed.message_kind, failed.error_type) == (  # type: ignore[attr-defined]
        "failed",
        "query",
        "builtins.LookupError",
    )
    assert "answered with the error, not retried" in failed.getMessage()
    assert (bad.outcome, bad.handler, bad.message_name) == ("undecodable", None, "ChargeCard")  # type: ignore[attr-defined]


def test_the_json_formatter_writes_one_object_with_the_fields() -> None:
    envelope = Envelope(name="ChargeCard", payload=b"{}", correlation_id="c-1")
    fields = message_fields(
        envelope,
        outcome="retry",
        kind="command",
        service="billing",
        handler="app.charge",
        attempt=1,
        attempts=3,
        retry_delay=0.5,
        error=ValueError("declined"),
    )
    logger = logging.getLogger("iambus.test_logs")
    try:
        raise ValueError("declined")
    except ValueError:
        exc_info = sys.exc_info()
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "retrying %s", ("x",), exc_info, extra=fields
    )
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING"
    assert parsed["logger"] == "iambus.test_logs"
    assert parsed["message"] == "retrying x"
    assert parsed["time"].endswith("+00:00")
    assert parsed["message_id"] == envelope.id
    assert parsed["correlation_id"] == "c-1"
    assert (parsed["attempt"], parsed["attempts"], parsed["retry_delay"]) == (1, 3, 0.5)
    assert parsed["error_type"] == "builtins.ValueError"
    assert 'raise ValueError("declined")' in parsed["exception"]
    assert line.count("\n") == 0  # one line, the traceback inside the string
    # A line about no message: only the basics, no null fields.
    plain = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "hello", (), None)
    assert set(json.loads(JsonFormatter().format(plain))) == {"time", "level", "logger", "message"}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://app:s3cret@db:6379/0", "redis://app:***@db:6379/0"),
        ("failed: postgresql://postgres:s3cret@127.0.0.1/x!", "failed: postgresql://postgres:***@127.0.0.1/x!"),
        ("amqp://:s3cret@h/ and amqp://u:s3cret@h/", "amqp://:***@h/ and amqp://u:***@h/"),
        ("nats://s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("http://127.0.0.1:8080/path@x redis://u@h", "http://127.0.0.1:8080/path@x redis://u@h"),
        ("no url here", "no url here"),
        ("redis://app:p@ss@h/0 x", "redis://app:***@h/0 x"),
        ("tls://s3cret@h:4222", "tls://***@h:4222"),
        ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=***&db=1"),
    ],
)  # fmt: skip
def test_scrub_masks_the_password_of_every_url_in_a_line(text: str, shown: str) -> None:
    assert scrub(text) == shown


def test_both_formatters_mask_a_password_whoever_logs_it() -> None:
    logger = logging.getLogger("a.driver")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "cannot reach %s", ("redis://u:s3cret@h",), None
    )
    for formatter in (TextFormatter("%(message)s"), JsonFormatter()):
        assert "s3cret" not in formatter.format(record)
        assert "redis://u:***@h" in formatter.format(record)


APP = """
from dataclasses import dataclass

from iambus import Command, Dispatcher
from iambus.retry import Retry


@dataclass(frozen=True, slots=True)
class ChargeCard(Command[None]):
    amount: int


dp = Dispatcher(
    transport=config["url"], service="billing", routes={ChargeCard: "billing"},
    retry=Retry(attempts=2, backoff=0),
)


@dp.commands.register(ChargeCard)
async def charge(command: ChargeCard) -> None:
    record("charge", "command", command.amount)
    raise ValueError("declined")
"""


async def test_the_worker_command_logs_json_lines_without_the_password(tmp_path: Path) -> None:
    from .conftest import require

    require("rabbitmq")  # its URL carries a password: guest:guest
    async with Cluster("rabbitmq", tmp_path, APP, claim_after=5.0) as cluster:
        cluster.watch("command.ChargeCard", "billing", from_start=True)
        cluster.spawn("w", options=["--log-format", "json", "--log-level", "DEBUG"])
        await cluster.ready("w")
        sent = Envelope(name="ChargeCard", payload=b'{"amount": 3}', correlation_id="corr-9")
        await cluster.transport.send("command.ChargeCard", sent)
        await until(lambda: '"dead_letter"' in cluster.output("w"), 20, "the dead letter's line")
        assert (await cluster.stop("w")) == {"w": 0}
    out = cluster.output("w")
    assert "guest:guest" not in out
    assert "amqp://guest:***@127.0.0.1:5672/" in out  # the worker's start line
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line
    outcomes = {line.get("outcome"): line for line in lines}
    retry, dead = outcomes["retry"], outcomes["dead_letter"]
    for line in (retry, dead):
        assert line["message_id"] == sent.id
        assert line["correlation_id"] == "corr-9"
        assert line["message_name"] == "ChargeCard"
        assert line["handler"] == "app.charge"
        assert line["service"] == "billing"
        assert line["logger"] == "iambus.worker"
    assert (retry["attempt"], dead["attempt"]) == (1, 2)
    assert {line["level"] for line in lines} >= {"INFO", "WARNING", "ERROR"}


def test_a_json_line_keeps_a_stack_and_a_record_whose_exception_was_formatted_before() -> None:
    logger = logging.getLogger("iambus.test")
    stacked = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "here", (), None)
    stacked.stack_info = "Stack (most recent call last):\n  frame"
    assert json.loads(JsonFormatter().format(stacked))["stack"].endswith("frame")
    formatted = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "oops", (), None)
    formatted.exc_text = "Traceback: redis://app:s3cret@h/0 failed"
    assert json.loads(JsonFormatter().format(formatted))["exception"] == (
        "Traceback: redis://app:***@h/0 failed"
    )


def test_an_error_whose_str_fails_still_gets_its_fields() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    fields = message_fields(
        Envelope(name="Charge", payload=b"{}"),
        outcome="failed",
        kind="command",
        service="billing",
        handler="charge",
        attempt=1,
        error=Unprintable(),
    )
    assert fields["error"].endswith("Unprintable: str() failed>")
