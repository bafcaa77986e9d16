"""iambus: an asyncio message bus for events, commands and queries.

``import iambus`` does no work and imports no broker driver.
"""

from .dispatching import Dispatcher
from .errors import (
    DispatcherStopped,
    HandlerAlreadyBound,
    HandlerDoesNotExist,
    HandlerIsSync,
    HandlerSignatureError,
    IambusError,
    ImproperlyConfigured,
    ProviderConflict,
    RegistrationClosed,
    RemoteError,
    RequestTimeout,
    SerializationError,
    TransportError,
    TransportRefused,
    WouldDeadlock,
)
from .handlers import AbstractHandler, Handler, HandlerProtocol
from .messages import Command, Query
from .middleware import CallNext, Context, Middleware
from .providers import Factory, Singleton
from .routers import EventRouter, RequestRouter

__version__ = "0.3.0.dev0"

dispatcher = Dispatcher()
"""A ready default dispatcher: ``from iambus import dispatcher as dp``."""

__all__ = [
    "AbstractHandler",
    "CallNext",
    "Command",
    "Context",
    "Dispatcher",
    "DispatcherStopped",
    "EventRouter",
    "Factory",
    "Handler",
    "HandlerAlreadyBound",
    "HandlerDoesNotExist",
    "HandlerIsSync",
    "HandlerProtocol",
    "HandlerSignatureError",
    "IambusError",
    "ImproperlyConfigured",
    "Middleware",
    "ProviderConflict",
    "Query",
    "RegistrationClosed",
    "RemoteError",
    "RequestRouter",
    "RequestTimeout",
    "SerializationError",
    "Singleton",
    "TransportError",
    "TransportRefused",
    "WouldDeadlock",
    "__version__",
    "dispatcher",
]
