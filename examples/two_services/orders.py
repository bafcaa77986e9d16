"""Service orders: takes orders, and announces each one with an event.

Run it as a worker of its own (see README.md)::

    python -m iambus worker examples.two_services.orders:dp --transport redis://...
"""

from __future__ import annotations

from iambus import Dispatcher

from .shared import REDIS_URL, ROUTES, OrderPlaced, PlaceOrder


async def place_order(command: PlaceOrder) -> OrderPlaced:
    print(f"orders: placed order {command.order_id}; publishing OrderPlaced")
    # The event returned is published once this handler has succeeded. It is routed, so
    # it goes to Redis; the command is acked only after that.
    return OrderPlaced(command.order_id, command.amount_cents)


def create(transport: str = REDIS_URL) -> Dispatcher:
    """The orders service's dispatcher on ``transport``."""
    dp = Dispatcher(transport=transport, service="orders", routes=ROUTES)
    dp.commands.bind(PlaceOrder, place_order)
    return dp


dp = create()  # what `iambus worker examples.two_services.orders:dp` runs
