"""Structured logs: the fields of iambus's log lines, a JSON formatter, and redaction.

Every line a worker logs about one message's failure, retry or dead letter carries the
same fields as ``logging`` *extra* attributes (``record.message_id``, ...), named in
``FIELDS``, besides saying them in its text:

* ``outcome``: what happened — ``"retry"``, ``"dead_letter"``, ``"failed"`` (a query
  answered with its error, a command whose answer could not be sent, an attempt whose
  settling failed), ``"expired"`` (a query its caller gave up on), ``"undecodable"``;
* ``message_id``, ``correlation_id``, ``message_name``, ``message_kind``;
* ``handler`` (None when the message never reached one), ``attempt``, ``attempts``
  (the retry policy's maximum), ``retry_delay`` (seconds, on a retry), ``service``;
* ``error_type`` and ``error`` (the exception's qualified name and text).

A handler of your own reads them (``getattr(record, "message_id", None)``); the
``JsonFormatter`` writes them. ``iambus worker --log-format json`` uses it::

    import logging

    from iambus.logs import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)

No line carries a secret: iambus shows every transport URL and database DSN through
``iambus.transports.redact``, and both formatters of this module (the worker command's
text and JSON) also mask any ``scheme://user:password@`` left in a line's text — say,
in a driver's error message.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from .envelope import Envelope

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "message_fields", "scrub"]

FIELDS = (
    "outcome",
    "message_id",
    "correlation_id",
    "message_name",
    "message_kind",
    "handler",
    "attempt",
    "attempts",
    "retry_delay",
    "service",
    "error_type",
    "error",
)
"""The extra fields iambus sets on a log line about one message, in this order."""

# What every LogRecord has: anything else on a record came as ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
# A password in a URL's userinfo: ``scheme://user:password@`` (the user part kept). It
# runs to the last ``@`` before a ``/``: it may hold an ``@`` itself (a ``/`` in it must
# be percent-encoded, or ``host:port/path@x`` could not be told from it).
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s/]*@")
# A NATS token: ``nats://TOKEN@host`` (a user without a password is the secret there).
_TOKEN = re.compile(r"\b(?P<head>(?:nats|tls)://)[^\s:/@]+@")
# A secret in a URL's query: ``?password=...``, ``&token=...``.
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pass|token|secret)=)[^\s&#]+", re.I)


def scrub(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it
    replaced by ``***`` (``redis://app:***@host/0``), a NATS token too
    (``nats://***@host``), and a ``password=``/``token=`` in a URL's query."""
    if "://" not in text:
        return text
    text = _TOKEN.sub(r"\g<head>***@", _USERINFO.sub(r"\g<head>***@", text))
    return _QUERY.sub(r"\g<head>***", text)


def message_fields(
    envelope: Envelope,
    *,
    outcome: str,
    kind: str,
    service: str | None,
    handler: str | None,
    attempt: int,
    attempts: int | None = None,
    retry_delay: float | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """The ``extra=`` of a log line about ``envelope`` (see ``FIELDS``)."""
    fields: dict[str, Any] = {
        "outcome": outcome,
        "message_id": envelope.id,
        "correlation_id": envelope.correlation_id,
        "message_name": envelope.name,
        "message_kind": kind,
        "handler": handler,
        "attempt": attempt,
        "attempts": attempts,
        "retry_delay": retry_delay,
        "service": service,
        "error_type": None,
        "error": None,
    }
    if error is not None:
        kind_of = type(error)
        fields["error_type"] = f"{kind_of.__module__}.{kind_of.__qualname__}"
        fields["error"] = _text(error)
    return fields


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # an exception whose __str__ fails still gets its line
        return f"<{type(error).__qualname__}: str() failed>"


class TextFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose lines never show a URL's password (``scrub``)."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, then the record's extra fields (iambus's ``FIELDS`` and any of your
    own, None values left out), then ``exception`` (its traceback) and ``stack``
    when there are. Passwords in URLs are masked (``scrub``)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and value is not None and name not in line:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return scrub(json.dumps(line, default=str, ensure_ascii=False))
