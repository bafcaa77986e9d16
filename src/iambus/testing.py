"""Testing helpers: waiting for what a test sent, and the transport conformance suite.

Test an app of several services (docs/testing.md has a full example)::

    from iambus.testing import FakeClock, watch

    async def test_an_order_is_paid():
        clock = FakeClock()
        watched = watch(orders, billing, clock=clock)   # before they start
        async with orders, billing:
            await orders.send(PlaceOrder(1))
            done = await watched.settled(timeout=5)      # cascades, retries, the outbox
        assert done.handled("billing") == ["ChargeCard"]
        assert clock.delays == [0.5]                     # retried at once, delay recorded

Check your own transport against the contract every iambus transport keeps::

    from iambus.testing import check_transport

    async def test_my_transport():
        transport = MyTransport(..., claim_after=0.3)   # a short reclaim time keeps it quick
        await transport.open()
        try:
            await check_transport(transport)
        finally:
            await transport.close()

``check_transport`` runs the checks of the base seam, of the ``Capability`` flags the
transport declares and of the optional parts it has (``Requester``, ``DeadLetterStore``,
``Registry``, ``Monitor``); it skips the others and returns them, each with why.

Each check uses addresses and groups with a random suffix, so it can run against a shared
broker. ``TRANSPORT_CHECKS`` maps each check's name to its function, to run them one by
one (e.g. ``pytest.mark.parametrize``, with ``skip_reason`` to skip what does not apply).
A failing check raises ``AssertionError`` saying what the transport did wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .dispatching import Dispatcher
from .envelope import Envelope
from .errors import DeadLettered, ImproperlyConfigured, NotSettled, bad_option
from .partitions import partition
from .transports import (
    Capability,
    DeadLetter,
    DeadLetterCounter,
    DeadLetterStore,
    Delivery,
    Failure,
    Instance,
    Monitor,
    Registry,
    Requester,
    Transport,
    _lacking,
    _lacks,
    _members,
)

__all__ = [
    "TRANSPORT_CHECKS",
    "FakeClock",
    "Pending",
    "Settled",
    "Settlement",
    "Watch",
    "check_transport",
    "skip_reason",
    "watch",
]

logger = logging.getLogger(__name__)

Check = Callable[[Transport], Awaitable[None]]

_NOTHING = Capability(0)

# What each check needs beyond the base seam: the capabilities a transport must declare,
# the optional parts it must have. Filled in by @_needs.
_NEEDS: dict[str, tuple[Capability, tuple[type, ...]]] = {}


def _needs(declared: Capability = _NOTHING, *parts: type) -> Callable[[Check], Check]:
    """Mark a check as applying only to a transport that declares ``declared`` and has
    ``parts``; run directly on another, it fails saying why."""

    def mark(check: Check) -> Check:
        name = check.__name__.removeprefix("check_")
        _NEEDS[name] = (declared, parts)

        @functools.wraps(check)
        async def checked(transport: Transport) -> None:
            reason = skip_reason(transport, name)
            assert reason is None, f"{reason} (check_transport skips this check for it)"
            await check(transport)

        return checked

    return mark


def _declares(transport: Transport, capability: Capability) -> bool:
    return capability in transport.capabilities


def _flags(capabilities: Capability) -> str:
    return ", ".join(f"Capability.{flag.name}" for flag in capabilities)


def _names(prefix: str) -> tuple[str, str, str]:
    suffix = uuid.uuid4().hex[:10]
    return f"test.{prefix}.{suffix}", f"g1.{suffix}", f"g2.{suffix}"


def _envelope(n: int, **fields: object) -> Envelope:
    return Envelope(name="Ping", payload=f'{{"n":{n}}}'.encode(), **fields)  # type: ignore[arg-type]


def _payload_n(envelope: Envelope) -> int:
    return int(json.loads(envelope.payload)["n"])


def _n(delivery: Delivery) -> int:
    return _payload_n(delivery.envelope)


async def _receive_all(
    transport: Transport, address: str, group: str, count: int, *, consumer: str = "c1"
) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived (or 5 s passed)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        got += await transport.receive(
            address, group, consumer=consumer, limit=count - len(got), wait=0.5
        )
    assert len(got) == count, f"expected {count} deliveries on {address}/{group}, got {len(got)}"
    return list(got)


async def _nothing(transport: Transport, address: str, group: str, *, wait: float = 0.3) -> None:
    extra = await transport.receive(address, group, consumer="c-check", limit=10, wait=wait)
    assert not extra, f"{address}/{group}: expected no delivery, got {extra!r}"


async def check_send_receive_ack(transport: Transport) -> None:
    """Envelopes arrive once, whole, with attempt 1; an ack settles them.

    Envelopes without a key keep their send order (``Capability.SEND_ORDER``); a keyed
    one may travel apart from them (its order is its key's), so it is compared whole but
    not placed among them.
    """
    address, group, _ = _names("basic")
    await transport.declare(address, group, from_start=False)
    sent = [
        _envelope(0),
        _envelope(1, correlation_id="corr-1", causation_id="cause-1", key="k-1"),
        _envelope(2, reply_to="somewhere", headers={"tenant": "acme", "trace": "x y"}),
        _envelope(3),
    ]
    for envelope in sent:
        await transport.send(address, envelope)
    got = await _receive_all(transport, address, group, len(sent))
    envelopes = [d.envelope for d in got]
    assert sorted(envelopes, key=_payload_n) == sent, "envelopes changed in transit"
    if _declares(transport, Capability.SEND_ORDER):
        unkeyed = [e for e in envelopes if e.key is None]
        assert unkeyed == [e for e in sent if e.key is None], "envelopes came out of order"
    assert [d.attempt for d in got] == [1] * len(sent), "first deliveries must have attempt 1"
    for delivery in got:
        await delivery.ack()
    await _nothing(transport, address, group)


async def check_every_group_gets_every_envelope(transport: Transport) -> None:
    """Each group on an address receives each envelope once."""
    address, g1, g2 = _names("groups")
    await transport.declare(address, g1, from_start=False)
    await transport.declare(address, g2, from_start=False)
    await transport.declare(address, g2, from_start=False)  # declaring twice is harmless
    for n in range(4):
        await transport.send(address, _envelope(n))
    for group in (g1, g2):
        got = await _receive_all(transport, address, group, 4)
        assert sorted(d.envelope.payload for d in got) == [_envelope(n).payload for n in range(4)]
        for delivery in got:
            await delivery.ack()
        await _nothing(transport, address, group)


async def check_consumers_of_a_group_compete(transport: Transport) -> None:
    """Within one group, each envelope goes to one consumer, not to each.

    Delivery is at least once: an envelope whose ack comes after ``claim_after`` (a
    stalled machine) may reach the other consumer too, so repeats are allowed, but not
    every consumer getting every envelope.
    """
    address, group, _ = _names("compete")
    await transport.declare(address, group, from_start=False)
    sent = {_envelope(n).payload for n in range(20)}
    for n in range(20):
        await transport.send(address, _envelope(n))
    seen: dict[str, list[bytes]] = {"a": [], "b": []}
    deadline = time.monotonic() + 3
    while {*seen["a"], *seen["b"]} != sent and time.monotonic() < deadline:
        for name in seen:  # in turns, a few at a time: each must get its own share
            for delivery in await transport.receive(
                address, group, consumer=name, limit=3, wait=0.2
            ):
                seen[name].append(delivery.envelope.payload)
                await delivery.ack()
    assert {*seen["a"], *seen["b"]} == sent, "every envelope must reach a consumer of the group"
    both = set(seen["a"]) & set(seen["b"])
    assert len(both) < len(sent) // 2, (
        f"consumers of one group must share the envelopes, not each get them: "
        f"{len(both)} of {len(sent)} went to both"
    )


async def check_from_start(transport: Transport) -> None:
    """A group declared ``from_start`` gets earlier envelopes; one declared without does not."""
    address, g1, g2 = _names("start")
    await transport.send(address, _envelope(1))
    await transport.declare(address, g1, from_start=True)
    await transport.declare(address, g2, from_start=False)
    got = await _receive_all(transport, address, g1, 1)
    assert got[0].envelope.payload == _envelope(1).payload
    await got[0].ack()
    await _nothing(transport, address, g2)


async def check_retry_goes_to_one_group_after_its_delay(transport: Transport) -> None:
    """``retry(delay)`` redelivers to that group only, with attempt + 1, and not before
    ``delay`` (the delay only for a transport declaring ``Capability.DELAYED_RETRY``)."""
    delayed = _declares(transport, Capability.DELAYED_RETRY)
    address, g1, g2 = _names("retry")
    await transport.declare(address, g1, from_start=False)
    await transport.declare(address, g2, from_start=False)
    await transport.send(address, _envelope(7))
    [first] = await _receive_all(transport, address, g1, 1)
    [other] = await _receive_all(transport, address, g2, 1)
    await other.ack()
    retried_at = time.monotonic()
    await first.retry(0.4 if delayed else 0.0)
    [again] = await _receive_all(transport, address, g1, 1)
    waited = time.monotonic() - retried_at
    assert not delayed or waited >= 0.35, (
        f"the retry came after {waited:.3f}s, before its 0.4s delay "
        f"(the transport declares Capability.DELAYED_RETRY)"
    )
    assert again.attempt == 2, f"a retried delivery must have attempt 2, got {again.attempt}"
    assert again.envelope == first.envelope
    await again.retry(0.0)
    [third] = await _receive_all(transport, address, g1, 1)
    assert third.attempt == 3
    await third.ack()
    await _nothing(transport, address, g1)
    await _nothing(transport, address, g2, wait=0.1)  # the group that acked never sees it again


@_needs(_NOTHING, DeadLetterStore)
async def check_dead_letters(transport: Transport) -> None:
    """``dead_letter`` parks with the failure and acks; replay goes to that group only.
    (For a ``DeadLetterStore``.)"""
    assert isinstance(transport, DeadLetterStore)
    address, g1, g2 = _names("dead")
    await transport.declare(address, g1, from_start=False)
    await transport.declare(address, g2, from_start=False)
    envelope = _envelope(9, correlation_id="c-9")
    await transport.send(address, envelope)
    [delivery] = await _receive_all(transport, address, g1, 1)
    [other] = await _receive_all(transport, address, g2, 1)
    await other.ack()
    failure = Failure("builtins.ValueError", "bad card", "Traceback ...\nValueError", attempts=3)
    await delivery.dead_letter(failure)
    await _nothing(transport, address, g1)

    [letter] = [d for d in await transport.dead_letters(limit=1000) if d.address == address]
    assert (letter.group, letter.envelope, letter.failure) == (g1, envelope, failure), letter
    assert letter.failed_at > 0

    assert await transport.replay([letter.id]) == 1
    [replayed] = await _receive_all(transport, address, g1, 1)
    assert replayed.envelope == envelope
    assert replayed.attempt == 1, "a replayed envelope starts counting attempts again"
    await replayed.ack()
    await _nothing(transport, address, g2, wait=0.1)
    assert [d for d in await transport.dead_letters(limit=1000) if d.address == address] == []

    await transport.send(address, _envelope(10))
    [delivery] = await _receive_all(transport, address, g1, 1)
    await delivery.dead_letter(failure)
    [letter] = [d for d in await transport.dead_letters(limit=1000) if d.address == address]
    assert await transport.purge([letter.id]) == 1
    assert await transport.purge([letter.id]) == 0
    assert await transport.replay([letter.id]) == 0


@_needs(Capability.RECLAIM)
async def check_unacked_deliveries_are_reclaimed(transport: Transport) -> None:
    """A delivery its consumer never settles goes to another consumer after ``claim_after``.
    (For a transport declaring ``Capability.RECLAIM``.)"""
    claim_after = _short_claim_after(transport)
    address, group, _ = _names("reclaim")
    await transport.declare(address, group, from_start=False)
    await transport.send(address, _envelope(3))
    [lost] = await _receive_all(transport, address, group, 1, consumer="crashed")
    [found] = await _receive_all(transport, address, group, 1, consumer="alive")
    assert found.envelope == lost.envelope
    assert found.attempt == 2, f"a reclaimed delivery must have attempt 2, got {found.attempt}"
    await found.ack()
    await _nothing(transport, address, group, wait=claim_after + 0.3)


async def check_receive_waits_but_not_forever(transport: Transport) -> None:
    """``receive`` returns [] after ``wait`` when idle, and early when an envelope arrives."""
    address, group, _ = _names("wait")
    await transport.declare(address, group, from_start=False)
    started = time.monotonic()
    assert await transport.receive(address, group, consumer="c", limit=5, wait=0.2) == []
    assert 0.15 <= time.monotonic() - started < 2, "an idle receive must honour its wait"

    async def late_send() -> None:
        await asyncio.sleep(0.1)
        await transport.send(address, _envelope(1))

    sender = asyncio.create_task(late_send())
    started = time.monotonic()
    got: Sequence[Delivery] = []
    while not got and time.monotonic() - started < 3:
        got = await transport.receive(address, group, consumer="c", limit=5, wait=3)
    await sender
    assert len(got) == 1
    assert time.monotonic() - started < 2.5, "receive must return when an envelope arrives"
    await got[0].ack()


@_needs(_NOTHING, Requester)
async def check_request_reply(transport: Transport) -> None:
    """A request gets the reply sent to its ``reply_to``; no reply is a TimeoutError.
    (For a ``Requester``.)"""
    assert isinstance(transport, Requester)
    address, group, _ = _names("request")
    await transport.declare(address, group, from_start=True)

    async def responder() -> None:
        [delivery] = await _receive_all(transport, address, group, 1)
        request = delivery.envelope
        assert request.reply_to, "request() must set reply_to on the request it sends"
        answer = Envelope(name="Pong", payload=request.payload, correlation_id=request.id)
        await transport.reply(request.reply_to, answer)
        await delivery.ack()

    serving = asyncio.create_task(responder())
    request = _envelope(5)
    reply = await transport.request(address, request, timeout=5)
    await serving
    assert (reply.name, reply.payload, reply.correlation_id) == (
        "Pong",
        request.payload,
        request.id,
    )

    silent, _, _ = _names("silent")
    started = time.monotonic()
    try:
        await transport.request(silent, _envelope(6), timeout=0.3)
    except TimeoutError:
        pass
    else:  # pragma: no cover - only a broken transport gets here
        raise AssertionError("a request nobody answers must raise TimeoutError")
    assert time.monotonic() - started < 2, "a request must give up after its timeout"
    # a reply to a requester that gave up is dropped, not an error
    await transport.reply(request.reply_to or "nobody-waits-here", _envelope(0))


def _distinct_keys(transport: Transport, count: int) -> list[str]:
    """``count`` keys in different partitions of ``transport`` (so none waits for another)."""
    partitions = transport.partitions
    keys: list[str] = []
    taken: set[int] = set()
    n = 0
    while len(keys) < count:
        key = f"key-{n}"
        n += 1
        slot = partition(key, partitions) if partitions else n
        if slot not in taken:
            taken.add(slot)
            keys.append(key)
    return keys


@_needs(Capability.KEY_ORDER)
async def check_keys_keep_their_order(transport: Transport) -> None:
    """Envelopes of one key go out one at a time, in send order; other keys run meanwhile.
    (For a transport declaring ``Capability.KEY_ORDER``.)"""
    # Deliveries are held across two receives: keep well inside claim_after.
    wait = min(0.2, transport.claim_after / 4)
    address, group, _ = _names("keyed")
    await transport.declare(address, group, from_start=False)
    keys = _distinct_keys(transport, 3)
    per_key = 6
    for n in range(per_key):
        for key in keys:
            await transport.send(address, _envelope(n, key=key))
    await transport.send(address, _envelope(100))  # no key: never held up by keyed ones
    seen: dict[str | None, list[int]] = {key: [] for key in (*keys, None)}
    most_at_once = 0
    deadline = time.monotonic() + 15
    while sum(map(len, seen.values())) < per_key * len(keys) + 1:
        assert time.monotonic() < deadline, f"deliveries missing after 15 s; got {seen}"
        out: list[Delivery] = []
        for consumer in ("c1", "c2"):  # two consumers of the group, both holding theirs
            out += await transport.receive(address, group, consumer=consumer, limit=10, wait=wait)
        held = [d.envelope.key for d in out if d.envelope.key is not None]
        assert len(held) == len(set(held)), f"one key delivered twice at once: {sorted(held)}"
        most_at_once = max(most_at_once, len(held))
        for delivery in reversed(out):  # settling out of order must not matter
            assert delivery.attempt == 1, f"{delivery!r} was redelivered"
            seen[delivery.envelope.key].append(_n(delivery))
            await delivery.ack()
    for key in keys:
        assert seen[key] == list(range(per_key)), f"key {key!r} out of order: {seen[key]}"
    assert seen[None] == [100]
    assert most_at_once > 1, "envelopes of different keys must be delivered in parallel"
    await _nothing(transport, address, group)


@_needs(Capability.KEY_ORDER)
async def check_a_retry_holds_its_key(transport: Transport) -> None:
    """A retried keyed envelope comes back before its key's next one; a dead letter doesn't.
    (For a transport declaring ``Capability.KEY_ORDER``.)"""
    wait = min(0.3, transport.claim_after / 3)
    address, group, _ = _names("keyretry")
    await transport.declare(address, group, from_start=False)
    [key] = _distinct_keys(transport, 1)
    for n in range(3):
        await transport.send(address, _envelope(n, key=key))
    [first] = await _receive_all(transport, address, group, 1)
    assert (_n(first), first.attempt) == (0, 1)
    held = await transport.receive(address, group, consumer="c2", limit=10, wait=wait)
    assert held == [], f"the key's next envelope went out while its first was: {held!r}"
    await first.retry(0.2)
    [again] = await _receive_all(transport, address, group, 1)
    assert (_n(again), again.attempt) == (0, 2), f"expected n=0 attempt 2, got {again!r}"
    failure = Failure("builtins.ValueError", "bad", "", attempts=2)
    await again.dead_letter(failure)
    [second] = await _receive_all(transport, address, group, 1)
    assert (_n(second), second.attempt) == (1, 1), f"expected n=1 attempt 1, got {second!r}"
    await second.ack()
    [third] = await _receive_all(transport, address, group, 1)
    assert _n(third) == 2
    await third.ack()
    await _nothing(transport, address, group)
    if isinstance(transport, DeadLetterStore):
        letters = [d.id for d in await transport.dead_letters(limit=1000) if d.address == address]
        assert len(letters) == 1, f"expected the one dead letter of {address}, got {letters}"
        assert await transport.purge(letters) == 1


@_needs(Capability.KEY_ORDER | Capability.RECLAIM)
async def check_a_lost_key_passes_on_in_order(transport: Transport) -> None:
    """A key whose delivery is never settled passes on after ``claim_after``, in order.
    (For a transport declaring ``Capability.KEY_ORDER`` and ``Capability.RECLAIM``.)"""
    claim_after = _short_claim_after(transport)
    address, group, _ = _names("keylost")
    await transport.declare(address, group, from_start=False)
    [key] = _distinct_keys(transport, 1)
    for n in range(3):
        await transport.send(address, _envelope(n, key=key))
    [lost] = await _receive_all(transport, address, group, 1, consumer="crashed")
    assert _n(lost) == 0
    early = await transport.receive(
        address, group, consumer="alive", limit=10, wait=claim_after / 3
    )
    assert early == [], f"the key moved on before claim_after: {early!r}"
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + claim_after + 10
    while len(got) < 3 and time.monotonic() < deadline:
        for delivery in await transport.receive(
            address, group, consumer="alive", limit=10, wait=0.5
        ):
            got.append((_n(delivery), delivery.attempt))
            await delivery.ack()
    assert got == [(0, 2), (1, 1), (2, 1)], f"expected n=0 (attempt 2), 1, 2; got {got}"
    await _nothing(transport, address, group, wait=claim_after + 0.3)


@_needs(_NOTHING, Registry)
async def check_registry(transport: Transport) -> None:
    """``announce`` makes an instance live and its groups known; ``withdraw`` ends it,
    its groups stay known. (For a ``Registry``.)"""
    assert isinstance(transport, Registry)
    address, g1, g2 = _names("registry")
    suffix = g1.rpartition(".")[2]
    one = Instance(f"one-{suffix}", f"h-1-{suffix}", "h", 1, time.time(), ((address, g1),))
    two = Instance(
        f"two-{suffix}", f"h-2-{suffix}", "h", 2, time.time(), ((address, g2), (address + ".x", g2))
    )

    async def live() -> dict[str, Instance]:
        return {i.id: i for i in await transport.instances() if i.id in (one.id, two.id)}

    assert await live() == {}
    await transport.announce(one)
    await transport.announce(two)
    await transport.announce(one)  # again: a refresh, still one instance
    assert await live() == {one.id: one, two.id: two}
    known = await transport.groups()
    assert known.get((address, g1)) == one.service, known
    assert known.get((address, g2)) == known.get((address + ".x", g2)) == two.service, known
    await transport.withdraw(one)
    assert await live() == {two.id: two}, "a withdrawn instance must not be live"
    assert (await transport.groups()).get((address, g1)) == one.service, "groups stay known"
    await transport.withdraw(two)
    await transport.withdraw(two)  # twice: harmless
    assert await live() == {}


@_needs(_NOTHING, Monitor)
async def check_backlog(transport: Transport) -> None:
    """``backlog`` counts what waits for a group, what is out with a consumer and what
    waits out a retry's delay; None only where the broker cannot tell. (For a
    ``Monitor``.)"""
    assert isinstance(transport, Monitor)
    address, g1, g2 = _names("backlog")
    await transport.declare(address, g1, from_start=False)
    empty = await transport.backlog(address, g1)
    assert empty.waiting == 0, f"a new group has nothing: {empty}"
    assert empty.in_flight in (0, None), f"a new group has nothing: {empty}"
    assert empty.retrying in (0, None), f"a new group has nothing: {empty}"
    for n in range(3):
        await transport.send(address, _envelope(n))
    deadline = time.monotonic() + 5
    while (backlog := await transport.backlog(address, g1)).waiting != 3:
        assert time.monotonic() < deadline, f"3 sent, none received: expected 3 waiting, {backlog}"
        await asyncio.sleep(0.05)
    [first] = await _receive_all(transport, address, g1, 1)
    backlog = await transport.backlog(address, g1)
    assert backlog.waiting is not None, backlog
    assert backlog.waiting <= 2, backlog
    if backlog.in_flight is not None:  # a consumer may hold more than it was handed
        assert backlog.in_flight >= 1, backlog
        assert backlog.waiting + backlog.in_flight == 3, backlog
    await first.retry(30.0)
    backlog = await transport.backlog(address, g1)
    if backlog.retrying is not None:
        assert backlog.retrying == 1, f"one delivery waits out its retry: {backlog}"
    assert backlog.in_flight is None or backlog.in_flight <= 2, backlog
    assert (await transport.backlog(address, g2)).waiting == 0, "an unknown group has nothing"


async def check_leave_gives_back_at_once(transport: Transport) -> None:
    """What a consumer that leaves held goes to the others at once, its key with it.

    ``leave(consumer)`` (a worker stopping) must not make its unsettled delivery wait for
    ``claim_after``: it comes again (attempt 2) — and, on a transport declaring
    ``Capability.KEY_ORDER``, before its key's next envelope. Leaving as a consumer the
    transport never saw does nothing.
    """
    claim_after = _short_claim_after(transport)
    keyed = _declares(transport, Capability.KEY_ORDER)
    address, group, _ = _names("leave")
    await transport.declare(address, group, from_start=False)
    await transport.leave("never-seen")
    [key] = _distinct_keys(transport, 1) if keyed else [None]
    for n in range(2):
        await transport.send(address, _envelope(n, key=key))
    [held] = await _receive_all(transport, address, group, 1, consumer="leaving")
    taken = time.monotonic()
    assert _n(held) == 0
    await transport.leave("leaving")
    got: list[tuple[int, int]] = []
    # A reclaim could only come claim_after after the broker handed the delivery out
    # (just before ``taken``): until then, only leave() can have passed it on.
    while len(got) < 2 and time.monotonic() < taken + 0.9 * claim_after:
        for delivery in await transport.receive(
            address, group, consumer="staying", limit=10, wait=0.05
        ):
            got.append((_n(delivery), delivery.attempt))
            await delivery.ack()
    assert (got if keyed else sorted(got)) == [(0, 2), (1, 1)], (
        f"after leave(), expected n=0 (attempt 2){' then' if keyed else ' and'} n=1 within "
        f"claim_after ({claim_after}s), not after it; got {got}"
    )
    await _nothing(transport, address, group, wait=claim_after + 0.3)


def _short_claim_after(transport: Transport) -> float:
    claim_after = transport.claim_after
    assert 0 < claim_after <= 2, "run the checks with claim_after between 0 and 2 seconds"
    return claim_after


TRANSPORT_CHECKS: dict[str, Check] = {
    check.__name__.removeprefix("check_"): check
    for check in (
        check_send_receive_ack,
        check_every_group_gets_every_envelope,
        check_consumers_of_a_group_compete,
        check_from_start,
        check_retry_goes_to_one_group_after_its_delay,
        check_dead_letters,
        check_unacked_deliveries_are_reclaimed,
        check_receive_waits_but_not_forever,
        check_request_reply,
        check_keys_keep_their_order,
        check_a_retry_holds_its_key,
        check_a_lost_key_passes_on_in_order,
        check_registry,
        check_backlog,
        check_leave_gives_back_at_once,
    )
}

# The optional parts: a transport has all of a part's methods, or none.
_PARTS = (Requester, DeadLetterStore, DeadLetterCounter, Registry, Monitor)


def skip_reason(transport: Transport, check: str) -> str | None:
    """Why ``check_transport`` skips the check named ``check`` for ``transport`` — a
    ``Capability`` it does not declare, an optional part it has not — or None when the
    check applies. To run ``TRANSPORT_CHECKS`` one by one::

        if (reason := skip_reason(transport, check)) is not None:
            pytest.skip(reason)
    """
    if check not in TRANSPORT_CHECKS:
        raise ValueError(f"no transport check {check!r}; there are {', '.join(TRANSPORT_CHECKS)}")
    declared, parts = _NEEDS.get(check, (_NOTHING, ()))
    undeclared = declared & ~transport.capabilities
    missing = [part.__name__ for part in parts if not isinstance(transport, part)]
    why = [f"declares no {_flags(undeclared)}"] if undeclared else []
    if missing:
        why.append(f"is no {' nor '.join(missing)} (an optional part)")
    return f"{type(transport).__name__} {' and '.join(why)}" if why else None


async def check_transport(transport: Transport) -> dict[str, str]:
    """Run against an opened ``transport`` every conformance check that applies to it;
    return those it skipped, each with why (see ``skip_reason``).

    Raises ``AssertionError`` naming the first check the transport fails — saying so when
    it fails a capability it declares — or what it lacks of the seam: a member of
    ``Transport``, part of an optional protocol.
    """
    kind = type(transport).__name__
    lacking = _lacking(transport)
    assert lacking is None, f"{kind} is no Transport: {lacking}"
    capabilities: Any = transport.capabilities
    assert isinstance(capabilities, Capability), (
        f"{kind}.capabilities must be Capability flags (e.g. Capability.RECLAIM | "
        f"Capability.KEY_ORDER, or Capability(0) for none), got {capabilities!r}"
    )
    for part in _PARTS:
        lacks = _lacks(transport, part)
        assert len(lacks) in (0, len(_members(part))), (
            f"{kind} has part of {part.__name__} but no {', '.join(lacks)}: an optional "
            f"part is all its methods or none of them"
        )
    skipped: dict[str, str] = {}
    for name, check in TRANSPORT_CHECKS.items():
        reason = skip_reason(transport, name)
        if reason is not None:
            skipped[name] = reason
            logger.info("iambus.testing: skipped %r: %s", name, reason)
            continue
        try:
            await check(transport)
        except AssertionError as exc:
            declared, _ = _NEEDS.get(name, (_NOTHING, ()))
            which = f", which it declares ({_flags(declared)})" if declared else ""
            raise AssertionError(f"{kind} fails {name!r}{which}: {exc}") from exc
    return skipped


# -- waiting for what a test sent: watch() and FakeClock ----------------------------------


class FakeClock:
    """Virtual time for the delays a retry asks for: ``watch(dp, clock=FakeClock())``.

    Each delay a worker asks its transport for (``Retry`` backoffs) is recorded in
    ``delays`` and the retry goes back to the broker with no delay, so a test of retries
    takes no real time. With ``auto=False`` a retry is instead held until the test moves
    virtual time past it with ``advance(seconds)``; ``Watch.settled()`` returns meanwhile,
    listing it in ``Settled.waiting``.
    """

    def __init__(self, *, auto: bool = True) -> None:
        if not isinstance(auto, bool):
            raise bad_option("FakeClock(auto=...)", auto, "True or False")
        self.auto = auto
        self.now = 0.0
        """Virtual seconds since the clock was made: moved by ``advance`` (and, with
        ``auto``, to each retry's due time as it goes)."""
        self.delays: list[float] = []
        """Every delay asked for, in the order asked."""
        self._held: list[tuple[float, asyncio.Future[None], Callable[[], None]]] = []

    def advance(self, seconds: float) -> None:
        """Move virtual time ``seconds`` on: the held retries now due go to the broker."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise bad_option("FakeClock.advance(seconds)", seconds, "a number of seconds >= 0")
        self.now += seconds
        due = [(waiter, go) for at, waiter, go in self._held if at <= self.now]
        self._held = [held for held in self._held if held[0] > self.now]
        for waiter, go in due:
            if not waiter.done():
                go()  # at once: a settled() called next must see it under way
                waiter.set_result(None)

    def _hold(self, delay: float, go: Callable[[], None]) -> asyncio.Future[None] | None:
        """Record ``delay``; None when it passes at once (``auto``), else a future done
        once it is due (``go`` is called as it is released)."""
        self.delays.append(delay)
        due = self.now + delay
        if self.auto:
            self.now = max(self.now, due)
            return None
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(self._forget)  # released, or called off (a worker stops)
        self._held.append((due, waiter, go))
        return waiter

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        self._held = [held for held in self._held if held[1] is not waiter]

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now}, delays={self.delays}, auto={self.auto})"


@dataclass(frozen=True, slots=True)
class Pending:
    """A message sent (or received) for a group of a watched dispatcher, not settled."""

    name: str
    id: str
    address: str
    group: str
    attempt: int
    """The delivery attempt last seen (0: not received yet)."""
    state: str
    """``"sent"`` (not received yet), ``"handling"``, ``"retrying"`` (waiting out its
    delay on the broker) or ``"held by the clock"`` (a ``FakeClock(auto=False)``)."""

    def __str__(self) -> str:
        attempt = f"attempt {self.attempt}" if self.attempt else "not received yet"
        return f"{self.name} (id {self.id}) for group {self.group!r}: {attempt}, {self.state}"


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one delivery to one group was settled."""

    name: str
    id: str
    address: str
    group: str
    attempt: int
    outcome: str
    """``"acked"``, ``"retried"`` or ``"dead-lettered"``."""
    delay: float | None = None
    """For a retry: the delay the worker asked for (a ``FakeClock`` passed none on)."""
    failure: Failure | None = None
    """For a dead letter: why."""

    def __str__(self) -> str:
        why = f": {self.failure.error_type}: {self.failure.message}" if self.failure else ""
        return (
            f"{self.name} (id {self.id}) for group {self.group!r}, attempt {self.attempt}: "
            f"{self.outcome}{why}"
        )


@dataclass(frozen=True, slots=True)
class Settled:
    """What ``Watch.settled()`` saw settled since the previous call (or the watch began)."""

    settlements: tuple[Settlement, ...]
    waiting: tuple[Pending, ...] = ()
    """Retries a ``FakeClock(auto=False)`` holds until it is advanced."""
    parked: int = 0
    """Outbox rows of the watched dispatchers parked since the previous call (rows parked
    before the watch began are not counted): the relay could not send them (a payload
    that no longer decodes, a broker refusing them); ``iambus outbox list`` shows why."""

    @property
    def acked(self) -> tuple[Settlement, ...]:
        return tuple(s for s in self.settlements if s.outcome == "acked")

    @property
    def retried(self) -> tuple[Settlement, ...]:
        return tuple(s for s in self.settlements if s.outcome == "retried")

    @property
    def dead_lettered(self) -> tuple[Settlement, ...]:
        return tuple(s for s in self.settlements if s.outcome == "dead-lettered")

    def handled(self, group: str | None = None) -> list[str]:
        """Names of the messages acked (by ``group`` only, if given), in order."""
        return [s.name for s in self.acked if group is None or s.group == group]


@dataclass(slots=True)
class _Entry:
    name: str
    id: str
    address: str
    group: str
    expected: int = 1  # sends to this group not settled yet
    attempt: int = 0
    state: str = "sent"

    def pending(self) -> Pending:
        return Pending(self.name, self.id, self.address, self.group, self.attempt, self.state)


class _Ledger:
    """What the recording transports of one watch saw: groups, pending, settlements."""

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        self.sent: dict[str, list[Envelope]] = {}  # per address, for groups declared later
        self.pending: dict[tuple[str, str], _Entry] = {}
        self.settlements: list[Settlement] = []
        self.version = 0  # moves on every send, receive and settlement
        self._changed: asyncio.Event | None = None
        self.on_open: Callable[[], Awaitable[None]] | None = None  # a watched transport opens

    def changed(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def touch(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def busy(self) -> list[Pending]:
        return [e.pending() for e in self.pending.values() if e.state != _HELD]

    def held(self) -> list[Pending]:
        return [e.pending() for e in self.pending.values() if e.state == _HELD]

    async def quiet(self) -> None:
        while self.busy():
            await self.changed().wait()

    def declared(self, address: str, group: str, from_start: bool) -> None:
        groups = self.groups.setdefault(address, set())
        if group in groups:
            return
        groups.add(group)
        if from_start:  # a new group that reads the backlog: earlier sends are its too
            for envelope in self.sent.get(address, ()):
                self._expect(address, group, envelope)
        self.touch()

    def sending(self, address: str, envelope: Envelope) -> None:
        self.sent.setdefault(address, []).append(envelope)
        for group in self.groups.get(address, ()):
            self._expect(address, group, envelope)
        self.touch()

    def not_sent(self, address: str, envelope: Envelope) -> None:
        sent = self.sent.get(address, [])
        if envelope in sent:
            sent.remove(envelope)
        for group in self.groups.get(address, ()):
            self._done(group, envelope.id)
        self.touch()

    def replaying(self, address: str, group: str, envelope: Envelope) -> None:
        """A dead letter of ``group`` is replayed: that group handles it again."""
        self._expect(address, group, envelope)
        self.touch()

    def not_replayed(self, group: str, envelope: Envelope) -> None:
        self._done(group, envelope.id)
        self.touch()

    def received(self, address: str, group: str, delivery: Delivery) -> None:
        envelope = delivery.envelope
        entry = self.pending.get((group, envelope.id))
        if entry is None:  # sent before the watch, or a redelivery after its ack
            entry = self.pending[group, envelope.id] = _Entry(
                envelope.name, envelope.id, address, group
            )
        entry.attempt, entry.state = delivery.attempt, "handling"
        self.touch()

    def settled(
        self,
        address: str,
        group: str,
        delivery: Delivery,
        outcome: str,
        delay: float | None = None,
        failure: Failure | None = None,
    ) -> None:
        envelope = delivery.envelope
        self.settlements.append(
            Settlement(
                envelope.name,
                envelope.id,
                address,
                group,
                delivery.attempt,
                outcome,
                delay,
                failure,
            )
        )
        if outcome != "retried":
            self._done(group, envelope.id)
        self.touch()

    def mark(self, group: str, id: str, state: str) -> None:
        entry = self.pending.get((group, id))
        if entry is not None:
            entry.state = state
            self.touch()

    def _expect(self, address: str, group: str, envelope: Envelope) -> None:
        entry = self.pending.get((group, envelope.id))
        if entry is None:
            self.pending[group, envelope.id] = _Entry(envelope.name, envelope.id, address, group)
        else:
            entry.expected += 1

    def _done(self, group: str, id: str) -> None:
        entry = self.pending.get((group, id))
        if entry is None:
            return  # settled twice (at least once: a reclaimed delivery acked late)
        entry.expected -= 1
        if entry.expected <= 0:
            del self.pending[group, id]
        else:
            entry.attempt, entry.state = 0, "sent"


_HELD = "held by the clock"


class _RecordedDelivery:
    """A delivery whose settlement the ledger hears of (and whose delay the clock takes)."""

    __slots__ = ("_address", "_group", "_held", "_ledger", "_recording", "delivery")

    def __init__(
        self, delivery: Delivery, address: str, group: str, recording: _Recording, consumer: str
    ) -> None:
        self.delivery = delivery
        self._address, self._group, self._recording = address, group, recording
        self._ledger = recording._ledger
        self._held = recording._held.setdefault(consumer, set())

    @property
    def envelope(self) -> Envelope:
        return self.delivery.envelope

    @property
    def attempt(self) -> int:
        return self.delivery.attempt

    async def ack(self) -> None:
        await self.delivery.ack()
        self._ledger.settled(self._address, self._group, self.delivery, "acked")

    async def retry(self, delay: float) -> None:
        clock = self._recording._clock
        if clock is None:
            await self._retry(delay, delay, None)
            return
        retrying = functools.partial(self._ledger.mark, self._group, self.envelope.id, "retrying")
        due = clock._hold(delay, retrying)
        if due is None:
            await self._retry(delay, 0.0, None)
            return
        # Held until the test advances the clock, by a task of its own: the worker goes
        # on (its slot is free); a worker that stops gives the delivery back.
        self._ledger.mark(self._group, self.envelope.id, _HELD)
        task = asyncio.get_running_loop().create_task(self._retry(delay, 0.0, due))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _retry(self, asked: float, delay: float, due: asyncio.Future[None] | None) -> None:
        if due is not None:
            try:
                await due
            except asyncio.CancelledError:
                due.cancel()
                self._ledger.mark(self._group, self.envelope.id, "given back")
                raise
        self._ledger.mark(self._group, self.envelope.id, "retrying")
        try:
            await self.delivery.retry(delay)
        except Exception:
            if due is None:
                raise
            logger.exception("iambus.testing: a retry the clock released failed")
            return
        self._ledger.settled(self._address, self._group, self.delivery, "retried", asked)

    async def dead_letter(self, failure: Failure) -> None:
        await self.delivery.dead_letter(failure)
        self._ledger.settled(
            self._address, self._group, self.delivery, "dead-lettered", failure=failure
        )


class _Recording(Transport):
    """A transport that passes everything to ``inner`` and tells a ledger what it sends,
    declares and settles. Made by ``_recording`` with the optional parts ``inner`` has."""

    def __init__(self, inner: Transport, ledger: _Ledger, clock: FakeClock | None) -> None:
        self.inner, self._ledger, self._clock = inner, ledger, clock
        self._held: dict[str, set[asyncio.Task[None]]] = {}  # retries the clock holds

    def __repr__(self) -> str:
        return f"<watched {self.inner!r}>"

    # Attributes of the seam, read (and client_name set) on the inner transport.
    url = property(lambda self: self.inner.url)
    claim_after = property(lambda self: self.inner.claim_after)
    partitions = property(lambda self: self.inner.partitions)
    capabilities = property(lambda self: self.inner.capabilities)

    @property
    def client_name(self) -> str | None:
        return self.inner.client_name

    @client_name.setter
    def client_name(self, name: str | None) -> None:
        self.inner.client_name = name

    async def open(self) -> None:
        await self.inner.open()
        if self._ledger.on_open is not None:
            await self._ledger.on_open()

    async def close(self) -> None:
        await self._let_go(list(self._held))
        await self.inner.close()

    async def _let_go(self, consumers: list[str]) -> None:
        """Call off the retries the clock holds for ``consumers``: their deliveries are
        given back by the transport (``leave``), or come back after ``claim_after``."""
        tasks = [task for consumer in consumers for task in self._held.pop(consumer, ())]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def tune(self, *, concurrency: int) -> None:
        self.inner.tune(concurrency=concurrency)

    async def send(self, address: str, envelope: Envelope) -> None:
        self._ledger.sending(address, envelope)
        try:
            await self.inner.send(address, envelope)
        except BaseException:
            self._ledger.not_sent(address, envelope)
            raise

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        await self.inner.declare(address, group, from_start=from_start)
        self._ledger.declared(address, group, from_start)

    async def receive(
        self, address: str, group: str, *, consumer: str, limit: int, wait: float
    ) -> Sequence[Delivery]:
        deliveries = await self.inner.receive(
            address, group, consumer=consumer, limit=limit, wait=wait
        )
        recorded = []
        for delivery in deliveries:
            self._ledger.received(address, group, delivery)
            recorded.append(_RecordedDelivery(delivery, address, group, self, consumer))
        return recorded

    async def leave(self, consumer: str) -> None:
        await self._let_go([consumer])
        await self.inner.leave(consumer)

    async def join(self) -> None:
        """Every message of the watched groups settled (or held by the clock)."""
        await self._ledger.quiet()


class _RecordingRequester:
    inner: Any
    _ledger: _Ledger

    async def request(self, address: str, envelope: Envelope, *, timeout: float) -> Envelope:
        # Pending for the group that answers it until that group settles it: a request
        # that timed out unanswered stays listed by settled().
        self._ledger.sending(address, envelope)
        answer: Envelope = await self.inner.request(address, envelope, timeout=timeout)
        return answer

    async def reply(self, to: str, envelope: Envelope) -> None:
        await self.inner.reply(to, envelope)


class _RecordingDeadLetters:
    inner: Any
    _ledger: _Ledger

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = await self.inner.dead_letters(limit=limit)
        return letters

    async def replay(self, ids: Sequence[str]) -> int:
        # A replayed letter is pending for its group until that group settles it again:
        # settled() waits for its handling, not only for the replay.
        # (A group no watched dispatcher consumes is not waited for, as for any send.)
        wanted = set(ids)
        ledger = self._ledger
        letters = [
            d
            for d in await self.inner.dead_letters(limit=1_000_000)
            if d.id in wanted and d.group in ledger.groups.get(d.address, ())
        ]
        for letter in letters:
            ledger.replaying(letter.address, letter.group, letter.envelope)
        kept: set[str] = {letter.id for letter in letters}  # (until the replay says)
        try:
            replayed: int = await self.inner.replay(ids)
            if letters:  # those still in the store were not replayed (taken meanwhile)
                kept = {d.id for d in await self.inner.dead_letters(limit=1_000_000)}
        finally:
            for letter in letters:
                if letter.id in kept:
                    ledger.not_replayed(letter.group, letter.envelope)
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        purged: int = await self.inner.purge(ids)
        return purged


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


_RECORDING_CLASSES: dict[tuple[type, ...], type[_Recording]] = {}


def _recording(inner: Transport, ledger: _Ledger, clock: FakeClock | None) -> _Recording:
    """A ``_Recording`` around ``inner`` that has exactly the optional parts ``inner`` has
    (a protocol's ``isinstance`` reads the class, so each set of parts has its class)."""
    parts = tuple(part for part in _PARTS if isinstance(inner, part))
    cls = _RECORDING_CLASSES.get(parts)
    if cls is None:
        namespace: dict[str, Any] = {}
        bases: list[type] = []
        for part in parts:
            if part is Requester:
                bases.append(_RecordingRequester)
                continue
            if part is DeadLetterStore:
                bases.append(_RecordingDeadLetters)
                continue
            for name in _members(part):
                namespace[name] = _delegate(name)
        cls = type("_Recording", (*bases, _Recording), namespace)
        _RECORDING_CLASSES[parts] = cls
    return cls(inner, ledger, clock)


class Watch:
    """Follows every message the watched dispatchers send through their transports, so a
    test can wait until all of it — and all it caused — is handled. See ``watch()``."""

    def __init__(self, dispatchers: Sequence[Dispatcher], clock: FakeClock | None) -> None:
        self.dispatchers = tuple(dispatchers)
        self.clock = clock
        self._ledger = _Ledger()
        self._seen = 0  # settlements already returned by settled()
        self._backlog = 0  # outbox rows waiting, as last seen
        self._parked: set[tuple[int, int]] = set()  # outbox rows parked, as last seen
        self._reported: set[tuple[int, int]] = set()  # ... told by settled() already
        self._before: set[tuple[int, int]] | None = None  # ... when the watch began
        self._ledger.on_open = self._begin

    @property
    def pending(self) -> list[Pending]:
        """What is sent or delivered to a watched group and not settled yet."""
        return [entry.pending() for entry in self._ledger.pending.values()]

    async def settled(self, *, timeout: float = 5.0, dead_letters: bool = False) -> Settled:
        """Wait until every message sent through a watched dispatcher's transport — and
        every message its handlers sent in turn, through each watched group that consumes
        it, retries and outbox rows included — is settled (acked or dead-lettered), and
        every watched dispatcher's background work has run. Returns what was settled since
        the last call.

        Raises ``NotSettled`` listing what is still pending after ``timeout`` seconds,
        and ``DeadLettered`` if a message was dead-lettered or an outbox row parked (the
        relay could not send it) since the watch began, unless ``dead_letters`` is True
        (then find them in ``Settled.dead_lettered`` and ``Settled.parked``).
        """
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise bad_option("settled(timeout=...)", timeout, "a number of seconds > 0")
        for dp in self.dispatchers:
            if not dp.started:
                raise ImproperlyConfigured(
                    f"settled() on a dispatcher that was never started ({_describe(dp)}): "
                    f"its messages would never be handled; start it first (async with dp:)"
                )
        try:
            async with asyncio.timeout(timeout):
                await self._quiet()
        except TimeoutError:
            raise NotSettled(self._unsettled(timeout)) from None
        settlements = tuple(self._ledger.settlements[self._seen :])
        self._seen = len(self._ledger.settlements)
        new = self._parked - self._reported - (self._before or set())
        self._reported |= new
        parked = len(new)
        result = Settled(settlements, tuple(self._ledger.held()), parked)
        if parked and not dead_letters:
            raise DeadLettered(
                f"{parked} outbox row(s) were parked: the relay could not send them (see "
                f"them with `iambus outbox list`; pass settled(dead_letters=True) to "
                f"expect them)"
            )
        if result.dead_lettered and not dead_letters:
            lines = "\n".join(f"  {s}" for s in result.dead_lettered)
            raise DeadLettered(
                f"{len(result.dead_lettered)} message(s) were dead-lettered:\n{lines}\n"
                f"(pass settled(dead_letters=True) to expect them)"
            )
        return result

    async def _quiet(self) -> None:
        ledger = self._ledger
        while True:
            version = ledger.version
            await ledger.quiet()
            for dp in self.dispatchers:
                await dp.join()  # its background work (and, under the watch, the ledger)
            self._backlog, self._parked = await self._outbox()
            if self._backlog:
                # The relay sends the rows (a NOTIFY woke it): look again once it did, or
                # shortly, for rows whose messages no watched group consumes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await ledger.changed().wait()
                continue
            if ledger.version == version and not ledger.busy():
                return

    async def _begin(self) -> None:
        """When a watched dispatcher starts: the rows parked already, not to be told."""
        if self._before is None:
            self._before = set()
            self._before |= (await self._outbox())[1]

    async def _outbox(self) -> tuple[int, set[tuple[int, int]]]:
        """The watched outboxes' rows waiting, and those parked (database, position)."""
        from .relay import outbox_status

        backlog = 0
        parked: set[tuple[int, int]] = set()
        for database in dict.fromkeys(
            dp.database for dp in self.dispatchers if dp.database is not None and dp.relay
        ):
            assert database is not None
            status = await outbox_status(database)
            backlog += status.backlog
            if status.parked:
                async with database.connection() as conn:
                    positions = await conn.fetch(
                        f"SELECT position FROM {database.outbox} WHERE parked_at IS NOT NULL"
                    )
                parked.update((id(database), row["position"]) for row in positions)
        return backlog, parked

    def _unsettled(self, timeout: float) -> str:
        busy = self._ledger.busy()
        lines = [f"not settled after {timeout}s:"]
        lines += [f"  {pending}" for pending in busy]
        if self._backlog:
            lines.append(f"  {self._backlog} outbox row(s) not sent yet (is a relay running?)")
        elif not busy:
            lines.append("  no message is pending: background work (dp.join()) is not done")
        for dp in self.dispatchers:
            if dp.started and not dp.running:
                lines.append(f"  {_describe(dp)} is stopped: it handles nothing")
        for pending in self._ledger.held():
            lines.append(f"  (held by the clock, not waited for: {pending})")
        return "\n".join(lines)


def watch(*dispatchers: Dispatcher, clock: FakeClock | None = None) -> Watch:
    """Watch what ``dispatchers`` send and settle, to wait until all of it is handled::

        bus = watch(orders, billing, clock=FakeClock())   # before they start
        async with orders, billing:
            await orders.send(PlaceOrder(...))
            done = await bus.settled(timeout=5)          # cascades and retries too
        assert done.handled("billing") == ["OrderPlaced"]

    Each dispatcher's transport is wrapped in a recording one (``dp.remote.transport``),
    so call it before the dispatchers start, and give it every dispatcher of the test
    that consumes: messages count as pending for the groups the watched dispatchers
    declared. With ``clock``, retry delays go through the ``FakeClock``.
    """
    if not dispatchers:
        raise TypeError("watch() needs the dispatchers to watch: watch(dp_a, dp_b, ...)")
    if clock is not None and not isinstance(clock, FakeClock):
        raise bad_option("watch(clock=...)", clock, "a FakeClock() or None")
    watcher = Watch(dispatchers, clock)
    for dp in dispatchers:
        if not isinstance(dp, Dispatcher):
            raise TypeError(f"watch() takes Dispatchers, got {dp!r}")
        if dp.remote is None:
            raise ImproperlyConfigured(
                f"watch() follows messages through a transport, and {_describe(dp)} has "
                f"none; for in-process work await dp.join(), or pass "
                f"Dispatcher(transport='memory://', ...)"
            )
        if dp.started:
            raise ImproperlyConfigured(
                f"watch() {_describe(dp)} before it starts (before `async with dp:` or its "
                f"first send): a started worker holds the transport it started with"
            )
        if isinstance(dp.remote.transport, _Recording):
            raise ImproperlyConfigured(f"{_describe(dp)} is watched already: watch it once")
    for dp in dispatchers:
        assert dp.remote is not None
        dp.remote.transport = _recording(dp.remote.transport, watcher._ledger, clock)
    return watcher


def _describe(dp: Dispatcher) -> str:
    return f"the dispatcher of service {dp.service!r}" if dp.service else "a dispatcher"
