"""The sending side: envelopes, typed results, remote errors, timeouts."""

import asyncio
from dataclasses import dataclass
from datetime import date

import pytest

from iambus import Dispatcher, ImproperlyConfigured, Query, RequestTimeout
from iambus.envelope import Envelope
from iambus.remote import current_envelope
from iambus.transports.memory import MemoryTransport


@dataclass(frozen=True, slots=True)
class Holiday:
    day: date
    name: str


@dataclass(frozen=True, slots=True)
class GetHolidays(Query[list[Holiday]]):
    year: int


@dataclass(frozen=True, slots=True)
class Untyped:
    n: int


async def test_query_results_are_decoded_into_the_declared_type() -> None:
    transport = MemoryTransport()
    routes = {GetHolidays: "calendar", Untyped: "calendar"}
    server = Dispatcher(transport=transport, service="calendar", routes=routes)
    client = Dispatcher(transport=transport, service="web", routes=routes)

    @server.queries.register(GetHolidays)
    async def holidays(query: GetHolidays) -> list[Holiday]:
        return [Holiday(date(query.year, 12, 25), "Christmas")]

    @server.queries.register(Untyped)
    async def untyped(query: Untyped) -> dict[str, int]:
        return {"n": query.n}

    async with server:
        assert await client.query(GetHolidays(2026)) == [Holiday(date(2026, 12, 25), "Christmas")]
        assert await client.query(Untyped(3)) == {"n": 3}  # no Query[R]: plain JSON
        # handle(..., wait_for_response=True) of a routed query is the same request
        assert await client.handle(Untyped(4), wait_for_response=True) == {"n": 4}


async def test_envelopes_carry_key_headers_and_a_deadline_for_queries() -> None:
    transport = MemoryTransport()
    client = Dispatcher(transport=transport, service="web", routes={Untyped: "calendar"})
    await transport.declare("query.Untyped", "calendar", from_start=True)
    asking = asyncio.create_task(client.query(Untyped(1), key="k-1", timeout=5))
    [delivery] = await transport.receive("query.Untyped", "calendar", consumer="c", limit=1, wait=2)
    envelope = delivery.envelope
    assert (envelope.name, envelope.key, envelope.correlation_id) == ("Untyped", "k-1", envelope.id)
    assert float(envelope.headers["deadline"]) > envelope.created_at
    await transport.reply(
        envelope.reply_to or "",
        Envelope(
            name="x", payload=b"7", correlation_id=envelope.id, headers={"iambus-status": "ok"}
        ),
    )
    assert await asking == 7


async def test_a_local_query_timeout_is_a_request_timeout() -> None:
    dp = Dispatcher()

    @dp.queries.register(Untyped)
    async def slow(query: Untyped) -> int:
        await asyncio.sleep(1)
        return 1

    with pytest.raises(RequestTimeout, match=r"no answer within 0\.05s"):
        await dp.query(Untyped(1), timeout=0.05)

    @dataclass
    class Raises:
        pass

    dp2 = Dispatcher()

    @dp2.queries.register(Raises)
    async def raises(query: Raises) -> int:
        raise TimeoutError("the handler's own")

    with pytest.raises(TimeoutError, match="the handler's own") as info:
        await dp2.query(Raises(), timeout=5)
    assert not isinstance(info.value, RequestTimeout)


def test_a_routed_event_handler_needs_a_service_name() -> None:
    dp = Dispatcher(transport="memory://", routes={Untyped: "calendar"})

    @dp.events.register(Untyped)
    async def on_untyped(event: Untyped) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"need a service name .*service=\.\.\."):
        dp.start()


def test_service_must_be_a_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="service must be a non-empty name"):
        Dispatcher(transport="memory://", service="")


def test_no_envelope_outside_a_handler() -> None:
    assert current_envelope.get() is None
