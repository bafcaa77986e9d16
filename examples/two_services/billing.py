"""Service billing: invoices every order placed, and tells anyone an order's invoice.

Run it as a worker of its own (see README.md)::

    python -m iambus worker examples.two_services.billing:dp --transport redis://...
"""

from __future__ import annotations

from iambus import Dispatcher

from .shared import REDIS_URL, ROUTES, GetInvoice, OrderPlaced

# Billing's own state. A real service keeps it in its database (and, since delivery is
# at least once, writes it idempotently: invoicing an order twice changes nothing here).
invoices: dict[int, str] = {}


async def invoice(event: OrderPlaced) -> None:
    invoices[event.order_id] = f"INV-{event.order_id} for {event.amount_cents / 100:.2f} EUR"
    print(f"billing: invoiced order {event.order_id}: {invoices[event.order_id]}")


async def get_invoice(query: GetInvoice) -> str | None:
    return invoices.get(query.order_id)


def create(transport: str = REDIS_URL) -> Dispatcher:
    """The billing service's dispatcher on ``transport``."""
    dp = Dispatcher(transport=transport, service="billing", routes=ROUTES)
    dp.events.bind(OrderPlaced, invoice)  # subscribed as group "billing.<module>.invoice"
    dp.queries.bind(GetInvoice, get_invoice)
    return dp


dp = create()  # what `iambus worker examples.two_services.billing:dp` runs
