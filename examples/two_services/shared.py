"""The contracts between the services: the messages, and which service owns each.

Both services import this module. Messages travel by name (the class name here), so a
service written elsewhere only needs classes of the same names and fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from iambus import Command, Query

REDIS_URL = os.environ.get("IAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    """Orders took an order: whoever cares reacts (billing invoices it)."""

    order_id: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class PlaceOrder(Command[OrderPlaced]):
    """Orders: take an order; ``execute()`` returns the event it published."""

    order_id: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class GetInvoice(Query[str | None]):
    """Billing: the invoice of an order, or None while there is none yet."""

    order_id: int


# Who owns what: a command or query goes to its owner; an event, from its owner, to
# every service with a handler for it. A message not listed here stays in-process.
ROUTES: dict[type | str, str] = {
    PlaceOrder: "orders",
    OrderPlaced: "orders",
    GetInvoice: "billing",
}
