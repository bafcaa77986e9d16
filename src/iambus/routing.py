"""Routing: which messages leave the process, and which service owns them.

Configuration, not handler code, decides it. A dispatcher given a transport takes
``routes``: a mapping from a message type, a message name, or a module (``"billing.*"``
matches every message class defined in ``billing`` and its submodules) to the name of
the service that owns those messages::

    Dispatcher(
        transport="redis://127.0.0.1:6379/0",
        service="orders",
        routes={
            OrderPlaced: "orders",         # an event orders publishes
            "billing.messages.*": "billing",  # billing's commands, queries and events
        },
    )

A message with a route travels through the transport; one without stays in-process.

* A routed **command** or **query** is handled by its owner service only: instances of
  that service compete for it. A dispatcher of another service that binds a handler for
  it is a configuration error (``ImproperlyConfigured`` at start).
* A routed **event** is delivered once to every subscribing *handler* of every service:
  each handler is its own subscription (``"<service>.<handler>"``), so a failing handler
  is retried alone and never re-runs handlers that already succeeded.

The most specific route wins: the exact type, then its message name, then the longest
module prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import bad_option
from .messages import MessageKey, describe, message_name

__all__ = ["Routes", "address"]


def address(kind: str, name: str) -> str:
    """The transport address of messages of ``kind`` named ``name``: ``"event.OrderPlaced"``."""
    return f"{kind}.{name}"


class Routes:
    """Resolved routing configuration: message -> owning service."""

    __slots__ = ("_by_key", "_by_name", "_modules", "_resolved")

    def __init__(self, routes: Mapping[Any, str] | None = None) -> None:
        self._by_key: dict[type, str] = {}
        self._by_name: dict[str, str] = {}
        self._modules: list[tuple[str, str]] = []
        self._resolved: dict[MessageKey, str | None] = {}
        for target, service in (routes or {}).items():
            if not isinstance(service, str) or not service.strip():
                raise bad_option(
                    f"routes[{target!r}]", service, "the name of the service that owns it"
                )
            if isinstance(target, type):
                self._by_key[target] = service
            elif isinstance(target, str) and target.endswith(".*"):
                self._modules.append((target[:-2], service))
            elif isinstance(target, str) and target:
                self._by_name[target] = service
            else:
                raise bad_option(
                    "each key of routes",
                    target,
                    "a message class, a message name or a 'module.*' pattern",
                )
        self._modules.sort(key=lambda item: -len(item[0]))  # longest prefix first

    def __bool__(self) -> bool:
        return bool(self._by_key or self._by_name or self._modules)

    def types(self) -> list[type]:
        """The message classes routed by class (not by name or module)."""
        return list(self._by_key)

    def patterns(self) -> list[str]:
        """The modules routed by a ``'module.*'`` pattern, longest first."""
        return [prefix for prefix, _ in self._modules]

    def owner(self, key: MessageKey) -> str | None:
        """The service owning ``key``, or None when it stays in-process. Cached."""
        try:
            return self._resolved[key]
        except KeyError:
            pass
        owner = self._by_key.get(key) if isinstance(key, type) else None
        if owner is None:
            owner = self._by_name.get(message_name(key))
        if owner is None and isinstance(key, type):
            module = key.__module__
            for prefix, service in self._modules:
                if module == prefix or module.startswith(prefix + "."):
                    owner = service
                    break
        self._resolved[key] = owner
        return owner

    def describe(self, key: MessageKey) -> str:
        owner = self.owner(key)
        return f"{describe(key)} -> {owner}" if owner else f"{describe(key)} (in-process)"
