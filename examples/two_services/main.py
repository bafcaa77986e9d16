"""Two services talking through Redis, both run by this one process.

    python examples/two_services/main.py

Redis on 127.0.0.1:6379 (or set IAMBUS_REDIS_URL). Orders takes a command and publishes
an event; billing reacts to the event and answers a query about it. Each run uses a
namespace of its own, whose keys are deleted at the end. README.md shows how to run each
service as a process of its own instead.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

if __package__ in (None, ""):  # run as a file: make `examples.two_services` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.two_services import billing, orders
from examples.two_services.shared import REDIS_URL, GetInvoice, PlaceOrder

from iambus import Dispatcher
from iambus.transports.redis import RedisTransport


def with_namespace(url: str, namespace: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query), namespace=namespace)
    return parts._replace(query=urlencode(query)).geturl()


async def invoice_of(dp: Dispatcher, order_id: int, timeout: float = 10.0) -> str:
    """Ask billing for the invoice until it has one (it comes once OrderPlaced arrives)."""
    deadline = time.monotonic() + timeout
    while (answer := await dp.query(GetInvoice(order_id), timeout=5)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"billing did not invoice order {order_id} in {timeout}s")
        await asyncio.sleep(0.05)
    return answer


async def main() -> None:
    url = with_namespace(REDIS_URL, f"two-services-{uuid.uuid4().hex[:8]}")
    try:
        # Two dispatchers, as two processes would have: each starts a worker for the
        # messages its service owns or handles, and sends the rest through Redis.
        async with orders.create(url) as orders_dp, billing.create(url):
            command = PlaceOrder(order_id=1, amount_cents=4200)
            print(f"main: sending {command} to orders")
            # Routed: a request through Redis; orders' worker answers with the result.
            placed = await orders_dp.execute(command)
            answer = await invoice_of(orders_dp, 1)
            print(f"main: orders answered {placed}")
            print(f"main: billing answered GetInvoice(order_id=1): {answer}")
    finally:
        keys = RedisTransport(url)
        await keys.open()
        await keys.destroy()
        await keys.close()
    print("main: both services stopped, and the run's keys deleted")


if __name__ == "__main__":
    asyncio.run(main())
