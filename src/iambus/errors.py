"""Every error iambus raises, in one place.

The tree::

    IambusError
    ├── ImproperlyConfigured          wrong set-up, found at registration or start
    │   ├── HandlerIsSync             the handler is not a coroutine function
    │   ├── HandlerSignatureError     the handler cannot receive the message as bound
    │   ├── HandlerAlreadyBound       a second handler for one command or query
    │   ├── ProviderConflict          one provider name, two providers
    │   └── RegistrationClosed        binding or adding middleware after start
    ├── HandlerDoesNotExist           a message that needs a handler has none
    ├── DispatcherStopped             sending to a dispatcher that is stopping or stopped
    ├── WouldDeadlock                 awaiting a send that can only run after the caller
    ├── SerializationError            a message or result that cannot be encoded or decoded
    ├── TransportError                the broker failed or is unreachable (cause: driver error)
    │   └── TransportRefused          the broker refused us: credentials, permissions
    ├── TransactionFailed             a unit of work's transaction failed before it could commit
    ├── RemoteError                   a remote handler failed; carries its type name and message
    ├── RequestTimeout                no answer to a remote query in time (also a TimeoutError)
    ├── NotSettled                    iambus.testing: messages still pending (AssertionError)
    └── DeadLettered                  iambus.testing: a message was dead-lettered (same)

Messages say what was wrong, where (the handler's qualified name, the parameter, the
message type) and how to fix it. Catch ``IambusError`` to catch them all. Options are
checked when the object taking them is built, all in one wording:
``"<option> must be <what is allowed>, got <the value>"``.
"""

from __future__ import annotations

import math
from typing import overload

__all__ = [
    "DeadLettered",
    "DispatcherStopped",
    "HandlerAlreadyBound",
    "HandlerDoesNotExist",
    "HandlerIsSync",
    "HandlerSignatureError",
    "IambusError",
    "ImproperlyConfigured",
    "MessageRefused",
    "NotSettled",
    "ProviderConflict",
    "RegistrationClosed",
    "RemoteError",
    "RequestTimeout",
    "SerializationError",
    "TransactionFailed",
    "TransportError",
    "TransportRefused",
    "WouldDeadlock",
]


class IambusError(Exception):
    """Base class of every error raised by iambus."""


class ImproperlyConfigured(IambusError):
    """The dispatcher, a router or a handler is set up in a way that cannot work."""


class HandlerIsSync(ImproperlyConfigured):
    """A handler (function, ``__call__`` or ``handle``) is not ``async def``."""


class HandlerSignatureError(ImproperlyConfigured):
    """A handler's parameters cannot receive the message with the arguments bound to it."""


class HandlerAlreadyBound(ImproperlyConfigured):
    """A command or query already has its one handler."""


class ProviderConflict(ImproperlyConfigured):
    """A provider name is reused with another provider type or another function."""


class RegistrationClosed(ImproperlyConfigured):
    """The dispatcher has started: its handler maps and middleware are final."""


class HandlerDoesNotExist(IambusError):
    """No handler is bound for a message that needs one."""


class DispatcherStopped(IambusError):
    """The dispatcher is stopping or stopped and takes no more messages from outside."""


class WouldDeadlock(IambusError):
    """The send would wait for work that cannot start before the waiting caller ends."""


class SerializationError(IambusError):
    """A message (or a query result) cannot be encoded, or a payload cannot be decoded.

    The message says which message name and which field, and what was expected.
    """


class TransportError(IambusError):
    """The broker failed or could not be reached; the driver's exception is the cause."""


class MessageRefused(TransportError):
    """The broker, or its client, refuses this one message for good: larger than it
    takes, say. Sending it again fails the same way; other messages go through. The
    outbox's relay parks such a row at once."""


class TransportRefused(TransportError):
    """The broker refused us for a reason that retrying will not fix.

    Wrong credentials, or permissions the user lacks: fix the URL or the broker's
    access rules. A worker meeting it while receiving stops, instead of retrying
    forever (``iambus worker`` exits with status 1).
    """


class TransactionFailed(IambusError):
    """A unit of work's transaction failed before its outbox rows could be written: a
    statement in it raised (and was caught), so PostgreSQL rejects every further one.
    The cause is the driver's error; the unit rolls back (or, joined, leaves the rollback
    to its owner)."""


class RemoteError(IambusError):
    """A handler in another process failed while answering.

    ``error_type`` is the remote exception's qualified type name (e.g.
    ``"billing.errors.CardDeclined"``) and ``remote_message`` its message.
    """

    def __init__(self, message: str, *, error_type: str, remote_message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.remote_message = remote_message


class RequestTimeout(IambusError, TimeoutError):
    """A remote query got no answer within its timeout."""


class NotSettled(IambusError, AssertionError):
    """``iambus.testing.Watch.settled()``: messages were still pending at its timeout;
    the message lists each (name, id, group, attempt, state)."""


class DeadLettered(IambusError, AssertionError):
    """``iambus.testing.Watch.settled()``: a message was dead-lettered, and the test did
    not say it expects that (``settled(dead_letters=True)``)."""


# -- checking options -------------------------------------------------------------------
# Every option of a Dispatcher, a transport and the worker is checked when it is built,
# with these, so that each message names the option, what it accepts and what it got.


def bad_option(option: str, value: object, allowed: str) -> ImproperlyConfigured:
    """The error for ``option`` set to ``value``, which is not ``allowed``."""
    return ImproperlyConfigured(f"{option} must be {allowed}, got {value!r}")


def check_count(option: str, value: object, *, least: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``least``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= least:
        return value
    raise bad_option(option, value, f"an int of at least {least}")


@overload
def check_seconds(option: str, value: object, *, zero: bool = False) -> float: ...


@overload
def check_seconds(option: str, value: object, *, zero: bool = False, none: str) -> float | None: ...


def check_seconds(
    option: str, value: object, *, zero: bool = False, none: str | None = None
) -> float | None:
    """``value`` if it is a finite number of seconds above 0 (or 0 too, with ``zero``);
    or None, where ``none`` says what None means."""
    if value is None and none is not None:
        return None
    if _finite(value, zero):
        return value  # type: ignore[return-value]
    allowed = f"seconds (a number {'>= 0' if zero else '> 0'})"
    raise bad_option(option, value, allowed if none is None else f"{allowed} or None for {none}")


def check_number(option: str, value: object, *, zero: bool = False) -> float:
    """``value`` if it is a finite number above 0 (or 0 too, with ``zero``)."""
    if _finite(value, zero):
        return value  # type: ignore[return-value]
    raise bad_option(option, value, f"a number {'>= 0' if zero else '> 0'}")


def _finite(value: object, zero: bool) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 or (zero and value == 0))
    )


def check_flag(option: str, value: object) -> bool:
    """``value`` if it is True or False (not merely truthy)."""
    if isinstance(value, bool):
        return value
    raise bad_option(option, value, "True or False")


def check_name(option: str, value: object) -> str:
    """``value`` if it is a non-empty str that is not only spaces."""
    if isinstance(value, str) and value.strip():
        return value
    raise bad_option(option, value, "a non-empty name (a str)")
