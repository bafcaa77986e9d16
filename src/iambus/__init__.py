"""iambus: an asyncio message bus for events, commands and queries.

``import iambus`` does no work and imports no broker driver.
"""

from .codecs import Codec, JsonCodec
from .dispatching import Dispatcher, Limits, Timeouts
from .envelope import Envelope, current_envelope
from .errors import (
    DeadLettered,
    DispatcherStopped,
    HandlerAlreadyBound,
    HandlerDoesNotExist,
    HandlerIsSync,
    HandlerSignatureError,
    IambusError,
    ImproperlyConfigured,
    MessageRefused,
    NotSettled,
    ProviderConflict,
    RegistrationClosed,
    RemoteError,
    RequestTimeout,
    SerializationError,
    TransactionFailed,
    TransportError,
    TransportRefused,
    WouldDeadlock,
)
from .handlers import AbstractHandler, Handler, HandlerProtocol
from .messages import Command, Query, contract
from .middleware import CallNext, Context, Middleware
from .providers import Factory, Singleton
from .retry import Retry
from .routers import EventRouter, RequestRouter
from .status import GroupStatus, Status, status
from .transports import Transport, connect
from .transports.memory import MemoryTransport

__version__ = "0.3.0.dev0"

dispatcher = Dispatcher()
"""A ready default dispatcher: ``from iambus import dispatcher as dp``."""

__all__ = [
    "AbstractHandler",
    "CallNext",
    "Codec",
    "Command",
    "Context",
    "DeadLettered",
    "Dispatcher",
    "DispatcherStopped",
    "Envelope",
    "EventRouter",
    "Factory",
    "GroupStatus",
    "Handler",
    "HandlerAlreadyBound",
    "HandlerDoesNotExist",
    "HandlerIsSync",
    "HandlerProtocol",
    "HandlerSignatureError",
    "IambusError",
    "ImproperlyConfigured",
    "JsonCodec",
    "Limits",
    "MemoryTransport",
    "MessageRefused",
    "Middleware",
    "NotSettled",
    "ProviderConflict",
    "Query",
    "RegistrationClosed",
    "RemoteError",
    "RequestRouter",
    "RequestTimeout",
    "Retry",
    "SerializationError",
    "Singleton",
    "Status",
    "Timeouts",
    "TransactionFailed",
    "Transport",
    "TransportError",
    "TransportRefused",
    "WouldDeadlock",
    "__version__",
    "connect",
    "contract",
    "current_envelope",
    "dispatcher",
    "status",
]
