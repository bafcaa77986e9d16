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
    ├── RemoteError                   a remote handler failed; carries its type name and message
    └── RequestTimeout                no answer to a remote query in time (also a TimeoutError)

Messages say what was wrong, where (the handler's qualified name, the parameter, the
message type) and how to fix it. Catch ``IambusError`` to catch them all.
"""

from __future__ import annotations

__all__ = [
    "DispatcherStopped",
    "HandlerAlreadyBound",
    "HandlerDoesNotExist",
    "HandlerIsSync",
    "HandlerSignatureError",
    "IambusError",
    "ImproperlyConfigured",
    "ProviderConflict",
    "RegistrationClosed",
    "RemoteError",
    "RequestTimeout",
    "SerializationError",
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


class TransportRefused(TransportError):
    """The broker refused us for a reason that retrying will not fix.

    Wrong credentials, or permissions the user lacks: fix the URL or the broker's
    access rules. A worker meeting it while receiving stops, instead of retrying
    forever (``iambus worker`` exits with status 1).
    """


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
