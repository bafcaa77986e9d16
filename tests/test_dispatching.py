import asyncio
import contextvars
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

import pytest

from iambus import (
    Command,
    Context,
    Dispatcher,
    DispatcherStopped,
    HandlerDoesNotExist,
    ImproperlyConfigured,
    Limits,
    Query,
    RegistrationClosed,
    Retry,
    Timeouts,
    WouldDeadlock,
    contract,
)
from iambus.codecs import JsonCodec
from iambus.dispatching import _STOPPING
from iambus.errors import TransportError
from iambus.transports.memory import MemoryTransport

from .processes import until


@dataclass(frozen=True, slots=True)
class GetUser(Query[str]):
    user_id: int


@dataclass(frozen=True, slots=True)
class Rename(Command[int]):
    name: str


@dataclass(frozen=True, slots=True)
class Renamed:
    name: str


@dataclass(frozen=True, slots=True)
class Base:
    n: int


@dataclass(frozen=True, slots=True)
class Child(Base):
    pass


class Boom(Exception):
    pass


# -- start, implicit start, stop ------------------------------------------------------


def test_start_without_running_loop_closes_registration():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "ann"

    dp.start()
    assert dp.started
    with pytest.raises(RegistrationClosed, match="has started"):
        dp.queries.bind(Rename, get_user)
    assert asyncio.run(dp.query(GetUser(1))) == "ann"


def test_start_with_nothing_registered_warns_and_keeps_registration_open(caplog):
    dp = Dispatcher()
    with caplog.at_level(logging.WARNING, logger="iambus"):
        dp.start()
    assert "no handlers registered" in caplog.text
    assert not dp.started

    async def get_user(query: GetUser) -> str:
        return "bob"

    dp.queries.bind(GetUser, get_user)  # still open
    assert asyncio.run(dp.query(GetUser(1))) == "bob"


async def test_first_send_starts_implicitly():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return f"user {query.user_id}"

    assert not dp.started
    assert await dp.query(GetUser(3)) == "user 3"
    assert dp.started
    with pytest.raises(RegistrationClosed):
        dp.events.bind(Renamed, get_user)


async def test_sending_after_stop_raises_and_start_reopens():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "x"

    async with dp:
        assert await dp.query(GetUser(1)) == "x"
    for send in (
        dp.query(GetUser(1)),
        dp.handle(GetUser(1)),
        dp.publish(Renamed("a")),
        dp.execute(Rename("a")),
    ):
        with pytest.raises(DispatcherStopped, match=r"dp\.start"):
            await send
    dp.start()
    assert await dp.query(GetUser(1)) == "x"


# -- sending ------------------------------------------------------------------------


async def test_query_and_execute_return_results_and_raise_handler_errors():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        if query.user_id < 0:
            raise Boom("no such user")
        return "ann"

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return len(command.name)

    assert await dp.query(GetUser(1)) == "ann"
    assert await dp.execute(Rename("abcd")) == 4
    with pytest.raises(Boom, match="no such user"):
        await dp.query(GetUser(-1))


async def test_missing_handlers_raise_handler_does_not_exist_naming_the_type():
    dp = Dispatcher()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return 1

    with pytest.raises(HandlerDoesNotExist, match=r"no query handler .*GetUser"):
        await dp.query(GetUser(1))
    with pytest.raises(HandlerDoesNotExist, match=r"it has a command handler"):
        await dp.query(Rename("x"))
    with pytest.raises(HandlerDoesNotExist, match=r"no command handler .*GetUser"):
        await dp.execute(GetUser(1))
    with pytest.raises(HandlerDoesNotExist, match=r"no event, command or query handler .*Renamed"):
        await dp.handle(Renamed("x"))
    with pytest.raises(HandlerDoesNotExist, match="'nobody'"):
        await dp.handle("nobody", wait_for_response=True)
    await dp.publish(Renamed("x"))  # an event with no handlers is fine for publish


async def test_handle_looks_in_events_then_commands_then_queries():
    dp = Dispatcher()
    seen = []

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        seen.append(event)

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return 7

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "ann"

    @dp.events.register("on startup")
    async def on_start() -> None:
        seen.append("started")

    assert await dp.handle(Rename("x"), wait_for_response=True) == 7
    assert await dp.handle(GetUser(1), wait_for_response=True) == "ann"
    assert await dp.handle(Renamed("y"), wait_for_response=True) is None
    assert await dp.handle("on startup", wait_for_response=True) is None
    assert seen == [Renamed("y"), "started"]


async def test_handle_without_wait_queues_and_returns_before_handling():
    dp = Dispatcher()
    gate = asyncio.Event()
    done = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await gate.wait()
        done.append(command.name)
        return 1

    assert await dp.handle(Rename("a")) is None
    assert done == []
    gate.set()
    await dp.join()
    assert done == ["a"]


async def test_string_messages_are_their_own_key():
    dp = Dispatcher()
    seen = []

    @dp.events.register("on startup")
    async def on_start() -> None:
        seen.append("start")

    @dp.queries.register("ping")
    async def ping() -> str:
        return "pong"

    await dp.publish("on startup")
    await dp.publish("on shutdown")  # nobody listens: fine
    assert await dp.query("ping") == "pong"
    assert seen == ["start"]


async def test_event_handlers_of_a_base_class_receive_subclasses():
    dp = Dispatcher()
    seen = []

    @dp.events.register(Base)
    async def on_base(event: Base) -> None:
        seen.append(("base", type(event).__name__))

    @dp.events.register(Child)
    async def on_child(event: Child) -> None:
        seen.append(("child", type(event).__name__))

    @dp.events.register(object)
    async def on_anything(event: object) -> None:
        seen.append(("object", type(event).__name__))

    await dp.publish(Child(1))
    await dp.publish(Base(2))
    await dp.publish(Child(3))
    assert seen == [
        ("child", "Child"),
        ("base", "Child"),
        ("object", "Child"),
        ("base", "Base"),
        ("object", "Base"),
        ("child", "Child"),
        ("base", "Child"),
        ("object", "Child"),
    ]
    # resolved once per type and cached, not per message
    assert Child in dp._event_cache


# -- cascaded events ------------------------------------------------------------------


async def test_returned_event_is_published_before_execute_returns():
    dp = Dispatcher()
    seen = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> Renamed:
        return Renamed(command.name)

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        await asyncio.sleep(0)
        seen.append(event.name)

    assert await dp.execute(Rename("zed")) == Renamed("zed")
    assert seen == ["zed"]


async def test_events_are_not_emitted_when_the_handler_raises():
    dp = Dispatcher()
    seen = []

    @dp.commands.register(Rename, response_event=Renamed)
    async def rename(command: Rename) -> Renamed:
        raise Boom("db down")

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        seen.append(event)

    with pytest.raises(Boom):
        await dp.execute(Rename("x"))
    assert seen == []


async def test_cascaded_handler_failure_goes_to_error_handler_not_to_the_caller():
    reported = []

    async def on_error(exc: BaseException, message: object, context: Context) -> None:
        reported.append((type(exc).__name__, message, context.kind, context.handler))

    dp = Dispatcher(error_handler=on_error)

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> Renamed:
        return Renamed(command.name)

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        raise Boom("mail server down")

    assert await dp.execute(Rename("x")) == Renamed("x")
    assert reported == [("Boom", Renamed("x"), "event", f"{__name__}.{on_renamed.__qualname__}")]


# -- event fan-out ---------------------------------------------------------------------


async def test_publish_runs_handlers_concurrently_when_they_wait():
    dp = Dispatcher()
    order = []
    first_waiting = asyncio.Event()

    @dp.events.register(Renamed)
    async def slow(event: Renamed) -> None:
        order.append("slow start")
        first_waiting.set()
        await asyncio.sleep(0.01)
        order.append("slow end")

    @dp.events.register(Renamed)
    async def waits_for_slow(event: Renamed) -> None:
        # deadlocks if handlers ran one after another
        await asyncio.wait_for(first_waiting.wait(), 1)
        order.append("second")

    @dp.events.register(Renamed)
    async def quick(event: Renamed) -> None:
        order.append("quick")

    await dp.publish(Renamed("x"))
    # every handler started and finished while the slow one was still waiting
    assert order[0] == "slow start"
    assert order[-1] == "slow end"
    assert sorted(order[1:3]) == ["quick", "second"]


async def test_publish_runs_all_handlers_and_raises_a_group_of_failures():
    dp = Dispatcher()
    ran = []

    @dp.events.register(Renamed)
    async def fails_now(event: Renamed) -> None:
        ran.append("now")
        raise Boom("first")

    @dp.events.register(Renamed)
    async def succeeds(event: Renamed) -> None:
        await asyncio.sleep(0)
        ran.append("ok")

    @dp.events.register(Renamed)
    async def fails_later(event: Renamed) -> None:
        await asyncio.sleep(0)
        ran.append("later")
        raise ValueError("second")

    with pytest.raises(ExceptionGroup, match=r"2 of 3 handler\(s\) of .*Renamed failed") as info:
        await dp.publish(Renamed("x"))
    assert sorted(ran) == ["later", "now", "ok"]
    assert [type(e) for e in info.value.exceptions] == [Boom, ValueError]


async def test_single_failing_event_handler_raises_a_group_too():
    dp = Dispatcher()

    @dp.events.register(Renamed)
    async def fails(event: Renamed) -> None:
        raise Boom("x")

    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Renamed("x"))
    assert info.group_contains(Boom)


async def test_handlers_see_the_senders_context_variables():
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    dp = Dispatcher()
    seen = []

    async def waits(event: Renamed) -> None:
        await asyncio.sleep(0)  # from here on, the others start as tasks
        seen.append(("waits", request_id.get()))

    async def after(event: Renamed) -> None:
        seen.append(("after", request_id.get()))

    dp.events.bind(Renamed, waits)
    dp.events.bind(Renamed, after)
    request_id.set("req-7")
    await dp.publish(Renamed("x"))
    assert sorted(seen) == [("after", "req-7"), ("waits", "req-7")]


async def test_timeouts_inside_event_handlers_do_not_cancel_the_publisher():
    # Handlers run in the sending task or in tasks of their own, never in a borrowed
    # one: asyncio.timeout() in a handler cancels that handler only.
    dp = Dispatcher()
    outcome = []

    async def times_out(event: Renamed) -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        except TimeoutError:
            outcome.append("timed out")

    async def other(event: Renamed) -> None:
        await asyncio.sleep(0.03)
        outcome.append("other")

    async def third(event: Renamed) -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    dp.events.bind(Renamed, times_out)
    dp.events.bind(Renamed, other)
    dp.events.bind(Renamed, third)
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Renamed("x"))
    assert sorted(outcome) == ["other", "timed out"]
    assert [type(e) for e in info.value.exceptions] == [TimeoutError]
    assert asyncio.current_task().cancelling() == 0


async def test_task_groups_inside_event_handlers_raise_their_group():
    dp = Dispatcher()

    async def fails() -> None:
        raise Boom("child")

    async def with_group(event: Renamed) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fails())
            await asyncio.sleep(1)

    async def other(event: Renamed) -> None:
        await asyncio.sleep(0)

    dp.events.bind(Renamed, other)
    dp.events.bind(Renamed, with_group)
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Renamed("x"))
    [inner] = info.value.exceptions
    assert isinstance(inner, ExceptionGroup)
    assert [type(e) for e in inner.exceptions] == [Boom]
    assert asyncio.current_task().cancelling() == 0


async def test_cancelling_a_publish_cancels_its_waiting_handlers():
    dp = Dispatcher()
    cancelled = []
    started = asyncio.Event()

    async def waits(event: Renamed) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    dp.events.bind(Renamed, waits)
    dp.events.bind(Renamed, waits)
    task = asyncio.create_task(dp.publish(Renamed("x")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == [True, True]


# -- background work ------------------------------------------------------------------


async def test_failing_background_handler_goes_to_error_handler_and_workers_survive():
    reported = []

    async def on_error(exc: BaseException, message: object, context: Context) -> None:
        reported.append((str(exc), message, context))

    dp = Dispatcher(limits=Limits(background=1), error_handler=on_error)
    handled = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        if command.name == "bad":
            raise Boom("bad name")
        handled.append(command.name)
        return 1

    await dp.handle(Rename("bad"), key="k1")
    await dp.handle(Rename("good"))
    await dp.join()
    assert handled == ["good"]
    name = f"{__name__}.{rename.__qualname__}"
    assert reported == [("bad name", Rename("bad"), Context("command", name, "k1"))]


async def test_default_error_handler_logs_message_type_and_handler(caplog):
    dp = Dispatcher()

    @dp.events.register(Renamed)
    async def explode(event: Renamed) -> None:
        raise Boom("kaput")

    with caplog.at_level(logging.ERROR, logger="iambus"):
        await dp.handle(Renamed("x"))
        await dp.join()
    record = caplog.records[-1]
    assert "explode" in record.getMessage()
    assert "Renamed" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is Boom


async def test_a_failing_error_handler_is_logged_and_the_error_still_reported(caplog):
    async def broken(exc: BaseException, message: object, context: Context) -> None:
        raise RuntimeError("error handler bug")

    dp = Dispatcher(error_handler=broken)

    @dp.events.register(Renamed)
    async def explode(event: Renamed) -> None:
        raise Boom("kaput")

    with caplog.at_level(logging.ERROR, logger="iambus"):
        await dp.handle(Renamed("x"))
        await dp.join()
    text = caplog.text
    assert "error_handler" in text
    assert "error handler bug" in text
    assert "kaput" in text


async def test_sync_error_handler_is_called():
    reported = []
    dp = Dispatcher(error_handler=lambda exc, message, context: reported.append(str(exc)))

    @dp.events.register(Renamed)
    async def explode(event: Renamed) -> None:
        raise Boom("kaput")

    await dp.handle(Renamed("x"))
    await dp.join()
    assert reported == ["kaput"]


async def test_key_orders_awaited_and_background_sends_alike():
    dp = Dispatcher(limits=Limits(background=4))
    log = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(0.001 * (5 - int(command.name[-1])))
        log.append(command.name)
        return int(command.name[-1])

    await dp.handle(Rename("k0"), key="k")
    await dp.handle(Rename("k1"), key="k")
    # an awaited send with the same key waits its turn behind the queued ones
    assert await dp.execute(Rename("k2"), key="k") == 2
    assert log == ["k0", "k1", "k2"]
    assert await dp.handle(Rename("k3"), key="k", wait_for_response=True) == 3


async def test_awaited_keyed_query_and_publish_raise_like_unkeyed_ones():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        raise Boom("gone")

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        raise Boom("gone too")

    with pytest.raises(Boom, match="gone"):
        await dp.query(GetUser(1), key="user-1")
    with pytest.raises(ExceptionGroup):
        await dp.publish(Renamed("x"), key="user-1")
    with pytest.raises(HandlerDoesNotExist):
        await dp.execute(GetUser(1), key="user-1")


async def test_stop_drains_queued_work():
    dp = Dispatcher(limits=Limits(background=2))
    done = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(0.002)
        done.append(command.name)
        return 1

    async with dp:
        for i in range(10):
            await dp.handle(Rename(str(i)))
    assert sorted(done) == [str(i) for i in range(10)]


async def test_stop_timeout_cancels_what_is_left_and_says_so(caplog):
    dp = Dispatcher(limits=Limits(background=1))

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(10)
        return 1

    dp.start()
    await dp.handle(Rename("a"))
    await dp.handle(Rename("b"))
    with caplog.at_level(logging.WARNING, logger="iambus"):
        await dp.stop(timeout=0.05)
    assert "timed out" in caplog.text
    assert "2 background message(s)" in caplog.text


async def test_stop_timeout_holds_when_background_work_ignores_its_cancellation(caplog):
    dp = Dispatcher(limits=Limits(background=1))
    released = asyncio.Event()

    @dp.commands.register(Rename)
    async def stubborn(command: Rename) -> int:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue  # ignores its cancellation
        return 1

    dp.start()
    await dp.handle(Rename("a"))
    await asyncio.sleep(0)  # it runs
    began = time.monotonic()
    try:
        # Waiting for the cancelled job once had no bound: stop() never returned.
        with caplog.at_level(logging.WARNING, logger="iambus"):
            await asyncio.wait_for(dp.stop(timeout=0.5), 15)
        took = time.monotonic() - began
    finally:
        released.set()
    assert took < 0.5 + 3, f"stop(0.5) took {took:.1f}s"
    assert "1 background job(s) ignored their cancellation; left behind" in caplog.text


async def test_a_bad_stop_timeout_is_refused_and_leaves_the_dispatcher_stoppable():
    # Once the state was changed before the timeout was read: a TypeError, and every
    # later stop() (async with's own exit too) waited for a shutdown never signalled.
    dp = Dispatcher(transport=MemoryTransport(), service="users", routes={Rename: "users"})

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return 1

    await dp.__aenter__()
    for bad in ("5", -1, math.nan):
        with pytest.raises(ImproperlyConfigured, match=r"timeout.* got") as caught:
            await dp.stop(bad)  # type: ignore[arg-type]
        assert "seconds" in str(caught.value)
    assert await dp.execute(Rename("still open")) == 1
    await asyncio.wait_for(dp.stop(timeout=1), 5)
    with pytest.raises(DispatcherStopped):
        await dp.execute(Rename("stopped"))


async def test_a_second_signal_still_gives_back_what_the_worker_holds():
    # Once the forced stop left Worker.stop before its transport.leave(): on a transport
    # passed in (left open), the aborted handler's message waited for claim_after.
    transport = MemoryTransport(claim_after=30.0)
    seen: list[str] = []
    started, again = asyncio.Event(), asyncio.Event()

    def instance(name: str) -> Dispatcher:
        dp = Dispatcher(transport=transport, service="users", routes={Rename: "users"})

        @dp.commands.register(Rename)
        async def rename(command: Rename) -> int:
            seen.append(name)
            if name == "first":
                started.set()
                await asyncio.sleep(60)
            again.set()
            return 1

        return dp

    first, second = instance("first"), instance("second")
    await first.__aenter__()
    await first.send(Rename("a"))
    await asyncio.wait_for(started.wait(), 5)
    async with second:
        first._on_signal(signal.SIGTERM)  # a graceful stop begins (30 s shutdown_timeout)
        await asyncio.sleep(0)  # the stop task starts: it drains
        assert first._draining is not None
        first._on_signal(signal.SIGTERM)  # a second signal: stop now
        assert first._stop_task is not None
        await asyncio.wait_for(first._stop_task, 5)
        await asyncio.wait_for(again.wait(), 5)  # given back at once, not after 30 s
    assert seen[:2] == ["first", "second"]


class HangingClose(MemoryTransport):
    """A broker whose connection never finishes closing."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()

    async def close(self) -> None:
        self.closing.set()
        await asyncio.sleep(60)


async def test_a_second_signal_while_the_transport_closes_stops_at_once(caplog):
    # Once the drain was marked over before the close: a second signal then did
    # nothing, and stop() waited for the close until its deadline (here 30 s + 4 s).
    dp = Dispatcher(transport="memory://", service="users", routes={Rename: "users"})
    transport = HangingClose()
    assert dp.remote is not None
    dp.remote.transport = transport  # made from a URL: the dispatcher closes it

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return 1

    await dp.__aenter__()
    dp._on_signal(signal.SIGTERM)
    await asyncio.wait_for(transport.closing.wait(), 10)
    with caplog.at_level(logging.WARNING, logger="iambus"):
        dp._on_signal(signal.SIGTERM)
        assert dp._stop_task is not None
        await asyncio.wait_for(dp._stop_task, 5)
    assert "interrupted by a second signal; left behind" in caplog.text
    with pytest.raises(DispatcherStopped):
        await dp.execute(Rename("stopped"))


class FlakyDeclare(MemoryTransport):
    """A broker that fails once while the worker declares its groups (going down)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def declare(self, address: str, group: str, *, from_start: bool) -> None:
        if self.failures:
            self.failures -= 1
            raise TransportError(f"{self.url}: connection lost while declaring")
        await super().declare(address, group, from_start=from_start)


async def test_a_start_that_failed_in_the_worker_can_be_retried():
    # Once the dispatcher kept the worker whose start() raised: entering again (a
    # supervisor's retry of run()) skipped the start, and nothing was ever consumed.
    dp = Dispatcher(transport=FlakyDeclare(), service="users", routes={Rename: "users"})
    handled: list[str] = []
    got = asyncio.Event()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        handled.append(command.name)
        got.set()
        return 1

    with pytest.raises(TransportError, match="connection lost while declaring"):
        await dp.__aenter__()
    await dp.__aenter__()  # the retry: the broker is back
    try:
        await dp.send(Rename("a"))
        await asyncio.wait_for(got.wait(), 5)
    finally:
        await dp.stop(timeout=1)
    assert set(handled) == {"a"}  # at least once


async def test_handlers_may_send_while_the_dispatcher_drains():
    dp = Dispatcher()
    seen = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(0.01)
        await dp.handle(Renamed(command.name))
        return 1

    @dp.events.register(Renamed)
    async def on_renamed(event: Renamed) -> None:
        seen.append(event.name)

    dp.start()
    await dp.handle(Rename("late"))
    await dp.stop()
    assert seen == ["late"]


async def test_wait_for_shutdown_returns_after_stop():
    dp = Dispatcher()

    @dp.events.register("tick")
    async def tick() -> None:
        pass

    dp.start()
    waiter = asyncio.create_task(dp.wait_for_shutdown())
    await asyncio.sleep(0)
    assert not waiter.done()
    await dp.stop()
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(dp.wait_for_shutdown(), 1)  # already stopped: returns at once


async def test_signals_are_opt_in():
    dp = Dispatcher()

    @dp.events.register("tick")
    async def tick() -> None:
        pass

    loop = asyncio.get_running_loop()
    async with dp:
        # nothing installed: the default SIGTERM handler is still the loop-less default
        assert not loop.remove_signal_handler(signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_listen_for_signals_stops_gracefully_on_signal(signum):
    dp = Dispatcher(listen_for_signals=True)
    done = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(0.02)
        done.append(command.name)
        return 1

    async with dp:
        await dp.handle(Rename("in flight"))
        os.kill(os.getpid(), signum)
        await asyncio.wait_for(dp.wait_for_shutdown(), 2)
        assert done == ["in flight"]  # drained before shutdown was signalled
        with pytest.raises(DispatcherStopped):
            await dp.handle(Rename("after"))
    # handlers are removed again: the loop no longer has one for this signal
    assert not asyncio.get_running_loop().remove_signal_handler(signum)


def test_default_dispatcher_is_a_dispatcher():
    import iambus

    assert isinstance(iambus.dispatcher, Dispatcher)


def test_background_engine_follows_the_event_loop():
    dp = Dispatcher()
    seen = []

    @dp.events.register("tick")
    async def tick() -> None:
        seen.append(1)

    async def main() -> None:
        await dp.handle("tick")
        await dp.join()

    asyncio.run(main())
    asyncio.run(main())  # a new loop gets new workers
    assert seen == [1, 1]


async def test_an_event_handler_returning_its_event_does_not_republish_it():
    dp = Dispatcher()
    calls = []

    @dp.events.register(Renamed)
    async def passthrough(event: Renamed) -> Renamed:
        calls.append(event)
        return event

    @dp.events.register(Renamed)
    async def other(event: Renamed) -> None:
        calls.append("other")

    async def mw(message, call_next, context):
        return await call_next(message)

    await dp.publish(Renamed("x"))
    assert calls == [Renamed("x"), "other"]

    dp2 = Dispatcher()
    dp2.events.bind(Renamed, passthrough)
    dp2.events.add_middleware(mw)  # the non-plain path guards too
    calls.clear()
    await dp2.publish(Renamed("y"))
    assert calls == [Renamed("y")]


async def test_a_stopping_dispatcher_turns_away_outside_senders_and_restarts():
    dp = Dispatcher()
    gate = asyncio.Event()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await gate.wait()
        return 1

    dp.start()
    await dp.handle(Rename("slow"))
    stopping = asyncio.create_task(dp.stop())
    await until(lambda: dp._state == _STOPPING, 5, "the dispatcher to be stopping")
    with pytest.raises(DispatcherStopped, match="is stopping"):
        await dp.handle(Rename("too late"))
    with pytest.raises(DispatcherStopped, match="is stopping"):
        await dp.execute(Rename("too late"))
    with pytest.raises(DispatcherStopped, match="is stopping"):
        dp.start()  # no restart while draining
    gate.set()
    await stopping
    dp.start()  # once stopped, it reopens
    assert dp.started


async def test_awaiting_a_send_on_the_handlers_own_key_is_refused_not_a_hang():
    dp = Dispatcher()
    outcome = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        if command.name == "outer":
            try:
                await dp.execute(Rename("inner"), key="k")
            except WouldDeadlock as exc:
                outcome.append(str(exc))
            await dp.handle(Rename("queued"), key="k")  # without waiting: fine
        outcome.append(command.name)
        return 1

    await asyncio.wait_for(dp.execute(Rename("outer"), key="k"), 1)
    await dp.join()
    assert "with the same key" in outcome[0]
    assert "dp.handle(message, key='k')" in outcome[0]
    assert outcome[1:] == ["outer", "queued"]


def test_queued_work_lost_with_the_event_loop_is_logged(caplog):
    dp = Dispatcher()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(10)
        return 1

    async def main() -> None:
        await dp.handle(Rename("a"))
        await dp.handle(Rename("b"))
        # returns without stop(): asyncio.run cancels the workers

    with caplog.at_level(logging.WARNING, logger="iambus"):
        asyncio.run(main())
    assert "event loop is ending with 2 background message(s)" in caplog.text
    assert "dp.stop()" in caplog.text


async def test_catch_all_event_handlers_do_not_turn_results_into_events():
    dp = Dispatcher()
    audited = []

    @dp.events.register(object)
    async def audit(event: object) -> None:
        audited.append(event)

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "ann"

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> Renamed:
        return Renamed(command.name)

    assert await dp.query(GetUser(1)) == "ann"
    assert await dp.execute(Rename("x")) == Renamed("x")
    assert audited == []  # neither a str nor Renamed has handlers of its own
    await dp.publish(Renamed("y"))
    assert audited == [Renamed("y")]  # a published event does reach catch-all handlers


async def test_background_event_reports_each_failing_handler():
    reported = []

    async def on_error(exc: BaseException, message: object, context: Context) -> None:
        reported.append((str(exc), context.handler.rsplit(".", 1)[-1], context.key))

    dp = Dispatcher(error_handler=on_error)
    ran = []

    @dp.events.register(Renamed)
    async def fails_now(event: Renamed) -> None:
        raise Boom("now")

    @dp.events.register(Renamed)
    async def fails_after_waiting(event: Renamed) -> None:
        await asyncio.sleep(0)
        raise Boom("later")

    @dp.events.register(Renamed)
    async def works(event: Renamed) -> None:
        await asyncio.sleep(0)
        ran.append(event.name)

    await dp.handle(Renamed("x"), key="k")
    await dp.join()
    assert ran == ["x"]
    assert sorted(reported) == [("later", "fails_after_waiting", "k"), ("now", "fails_now", "k")]


async def test_an_awaited_keyed_send_still_queued_at_stop_timeout_is_cancelled():
    dp = Dispatcher(limits=Limits(background=1))

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(10)
        return 1

    dp.start()
    await dp.handle(Rename("running"), key="k")
    waiting = asyncio.create_task(dp.execute(Rename("queued"), key="k"))
    await until(lambda: dp._engine.pending == 2, 5, "the second send to be queued")
    await dp.stop(timeout=0.01)
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_handler_may_clean_up_when_its_publish_is_cancelled():
    dp = Dispatcher()
    started = asyncio.Event()
    cleaned = []

    async def waits(event: Renamed) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # async clean-up while being cancelled
            cleaned.append(event.name)
            raise

    async def quick(event: Renamed) -> None:
        pass

    dp.events.bind(Renamed, waits)
    dp.events.bind(Renamed, quick)
    task = asyncio.create_task(dp.publish(Renamed("x")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["x"]


def test_signal_handlers_wait_for_a_loop_when_started_without_one():
    dp = Dispatcher(listen_for_signals=True)

    @dp.events.register("tick")
    async def tick() -> None:
        pass

    dp.start()  # no running loop yet: nothing to install on

    async def main() -> None:
        await dp.handle("tick")  # first use inside the loop installs them
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(dp.wait_for_shutdown(), 2)

    asyncio.run(main())
    with pytest.raises(DispatcherStopped):
        asyncio.run(dp.publish("tick"))


async def test_handle_prefers_a_command_or_query_over_catch_all_event_handlers():
    dp = Dispatcher()
    seen = []

    @dp.events.register(object)
    async def audit(event: object) -> None:
        seen.append(("audit", event))

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "ann"

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        seen.append(("rename", command))
        return 1

    assert await dp.handle(GetUser(1), wait_for_response=True) == "ann"
    assert await dp.handle(Rename("a"), wait_for_response=True) == 1
    await dp.handle(Renamed("b"), wait_for_response=True)  # no own handler: catch-all
    assert seen == [("rename", Rename("a")), ("audit", Renamed("b"))]


async def test_join_from_a_background_handler_is_refused_and_stop_is_deferred():
    dp = Dispatcher()
    outcome = []

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        if command.name == "join":
            with pytest.raises(WouldDeadlock, match="wait for that handler itself"):
                await dp.join()
            outcome.append("refused")
        else:
            await dp.stop()  # returns at once; the stop happens once this returns
            outcome.append("stop requested")
        return 1

    await dp.handle(Rename("join"))
    await dp.join()
    await dp.handle(Rename("stop"))
    await asyncio.wait_for(dp.wait_for_shutdown(), 2)
    assert outcome == ["refused", "stop requested"]


@pytest.mark.parametrize("key", [["t"], 7, b"k"])
async def test_a_key_must_be_a_string(key):
    dp = Dispatcher()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        return 1

    with pytest.raises(TypeError, match="key must be a string"):
        await dp.handle(Rename("a"), key=key)
    with pytest.raises(TypeError, match="key must be a string"):
        await dp.execute(Rename("a"), key=key)
    await asyncio.wait_for(dp.join(), 1)  # nothing was left half-queued


async def test_a_keyed_send_whose_caller_left_still_reports_its_failure():
    reported = []

    async def on_error(exc: BaseException, message: object, context: Context) -> None:
        reported.append((str(exc), context.key))

    dp = Dispatcher(error_handler=on_error)

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        await asyncio.sleep(0.02)
        raise Boom("declined")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dp.execute(Rename("a"), key="card"), 0.005)
    await dp.join()
    assert reported == [("declined", "card")]


async def test_wait_for_shutdown_from_before_the_start_is_woken():
    dp = Dispatcher()

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser) -> str:
        return "x"

    waiter = asyncio.create_task(dp.wait_for_shutdown())
    await asyncio.sleep(0)
    await dp.query(GetUser(1))  # implicit start
    await dp.stop()
    await asyncio.wait_for(waiter, 1)


class _NotACodec:
    content_type = "text/plain"

    def encode(self, value):  # no decode
        return b""


class _NoLeave:
    """A transport of before leave() and the members with defaults joined Transport."""

    url = "custom://"
    claim_after = 30.0

    async def open(self): ...
    async def close(self): ...
    async def send(self, address, envelope): ...
    async def declare(self, address, group, *, from_start): ...
    async def receive(self, address, group, *, consumer, limit, wait): ...
    async def request(self, address, envelope, *, timeout): ...
    async def reply(self, to, envelope): ...
    async def dead_letters(self, *, limit=100): ...
    async def replay(self, ids): ...
    async def purge(self, ids=None): ...


# Each bad value of each option: the error names the option, what it accepts, and the
# value it got.
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"limits": 32}, r"limits must be a Limits\(...\), e\.g\. .*, got 32"),
        ({"timeouts": 10.0}, r"timeouts must be a Timeouts\(...\), e\.g\. .*, got 10\.0"),
        ({"listen_for_signals": "yes"}, r"listen_for_signals must be True or False, got 'yes'"),
        ({"listen_for_signals": 1}, r"listen_for_signals must be True or False, got 1"),
        ({"service": ""}, r"service must be a non-empty name \(a str\), got ''"),
        ({"service": "  "}, r"service must be a non-empty name \(a str\), got '  '"),
        ({"service": 7}, r"service must be a non-empty name \(a str\), got 7"),
        (
            {"routes": ["billing.*"]},
            r"routes must be a mapping of message classes, message names or 'module\.\*' "
            r"patterns to the names of the services that own them, got \['billing\.\*'\]",
        ),
        (
            {"transport": "memory://", "routes": {"Ping": ""}},
            r"routes\['Ping'\] must be the name of the service that owns it, got ''",
        ),
        ({"codec": "json"}, r"codec must be a Codec: an object with a content_type .*got 'json'"),
        ({"codec": _NotACodec()}, r"codec must be a Codec: .*decode\(data, into, \*, name\)"),
        ({"codec": JsonCodec}, r"codec must be a Codec \(an instance: JsonCodec\(\)\)"),
        (
            {"transport": object()},
            r"transport must be a Transport or a transport URL such as 'redis://127\.0\.0\.1"
            r":6379/0' \(it has no url, claim_after, .*, open, .*, leave, tune, join; subclass "
            r"iambus\.transports\.Transport to inherit client_name, .*, join\), got <object",
        ),
        (
            {"transport": _NoLeave()},
            r"transport must be a Transport .*\(it has no client_name, partitions, "
            r"capabilities, leave, tune, join; subclass iambus\.transports\.Transport to "
            r"inherit client_name, partitions, capabilities, tune, join\)",
        ),
        ({"transport": MemoryTransport}, r"transport must be .*\(an instance, not the class"),
        ({"transport": "mqtt://x"}, r"unknown transport URL 'mqtt://x'; iambus knows memory://"),
        ({"error_handler": "log"}, r"error_handler must be callable as fn\(exc, message, context"),
        ({"events_router_cls": dict}, r"events_router_cls must be a subclass of EventRouter"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ImproperlyConfigured, match=match):
        Dispatcher(**options)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Limits(concurrency=0), r"limits\.concurrency must be an int of at least 1, got 0"),
        (lambda: Limits(background="4"), r"limits\.background must be an int .*, got '4'"),
        (lambda: Limits(background=True), r"limits\.background must be an int .*, got True"),
        (lambda: Limits(max_pending=2.5), r"limits\.max_pending must be an int .*, got 2\.5"),
        (lambda: Timeouts(request=0), r"timeouts\.request must be seconds \(a number > 0\), got 0"),
        (lambda: Timeouts(request=math.nan), r"timeouts\.request must be seconds .*, got nan"),
        (lambda: Timeouts(request=None), r"timeouts\.request must be seconds .*, got None"),
        (
            lambda: Timeouts(shutdown=-1),
            r"timeouts\.shutdown must be seconds \(a number >= 0\) or None for no limit, got -1",
        ),
        (lambda: Timeouts(shutdown=math.inf), r"timeouts\.shutdown must be seconds .*, got inf"),
    ],
)
def test_bad_limits_and_timeouts_are_named(make, match):
    with pytest.raises(ImproperlyConfigured, match=match):
        make()


async def test_limits_and_timeouts_are_what_the_dispatcher_uses(caplog):
    limits, timeouts = Limits(background=1, max_pending=2), Timeouts(shutdown=0.05)
    dp = Dispatcher(limits=limits, timeouts=timeouts)
    started = asyncio.Event()

    @dp.commands.register(Rename)
    async def rename(command: Rename) -> int:
        started.set()
        await asyncio.Event().wait()  # never returns
        return 0

    async with dp:
        await dp.handle(Rename("a"))  # runs on the one background worker...
        await started.wait()
        second = asyncio.ensure_future(dp.handle(Rename("b")))  # ...this one is pending...
        third = asyncio.ensure_future(dp.handle(Rename("c")))  # ...and this one waits
        await asyncio.sleep(0)
        assert second.done()
        assert not third.done()
        third.cancel()
    # Leaving the block stopped the dispatcher within timeouts.shutdown, saying so.
    assert "stop timed out after 0.05s" in caplog.text
    assert (dp.limits, dp.timeouts) == (limits, timeouts)


@pytest.mark.parametrize(
    ("old", "value", "new", "now"),
    [
        ("engine_workers", 2, "limits=Limits(background=...)", lambda dp: dp.limits.background),
        ("max_pending", 5, "limits=Limits(max_pending=...)", lambda dp: dp.limits.max_pending),
        ("concurrency", 4, "limits=Limits(concurrency=...)", lambda dp: dp.limits.concurrency),
        ("request_timeout", 3.0, "timeouts=Timeouts(request=...)", lambda dp: dp.timeouts.request),
        (
            "shutdown_timeout",
            None,
            "timeouts=Timeouts(shutdown=...)",
            lambda dp: dp.timeouts.shutdown,
        ),
        ("retries", {"Charge": Retry(attempts=3)}, "retry_for=...", lambda dp: dp.retry_for),
    ],
)
def test_the_old_option_names_still_work_and_warn(old, value, new, now):
    expected = f"Dispatcher(...) option {old} is deprecated; use {new} instead"
    with pytest.warns(DeprecationWarning, match=re.escape(expected)) as warned:
        dp = Dispatcher(**{old: value})
    assert warned[0].filename == __file__  # the warning points at the caller
    assert now(dp) == value
    with pytest.warns(DeprecationWarning, match=f"attribute {old} is deprecated"):
        assert getattr(dp, old) == value


def test_old_limits_are_checked_under_their_old_names_and_combine():
    with (
        pytest.warns(DeprecationWarning, match="engine_workers is deprecated"),
        pytest.raises(ImproperlyConfigured, match="engine_workers must be an int of at least 1"),
    ):
        Dispatcher(engine_workers=0)
    with pytest.warns(DeprecationWarning, match="is deprecated") as warned:
        dp = Dispatcher(engine_workers=2, max_pending=7, request_timeout=1.5)
    assert len(warned) == 3
    assert dp.limits == Limits(background=2, max_pending=7)
    assert dp.timeouts == Timeouts(request=1.5)


def test_an_old_name_and_its_group_together_are_refused():
    with (
        pytest.warns(DeprecationWarning, match="concurrency is deprecated"),
        pytest.raises(ImproperlyConfigured, match=r"concurrency= is the old name of limits\."),
    ):
        Dispatcher(limits=Limits(), concurrency=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'engine_threads'"):
        Dispatcher(engine_threads=4)  # type: ignore[call-arg]


async def test_setting_an_old_attribute_sets_its_group():
    dp = Dispatcher(transport="memory://")
    with pytest.warns(DeprecationWarning, match="shutdown_timeout is deprecated"):
        dp.shutdown_timeout = 5.0
    with pytest.warns(DeprecationWarning, match="concurrency is deprecated"):
        dp.concurrency = 3
    assert dp.timeouts.shutdown == 5.0
    assert dp.limits.concurrency == 3
    dp.timeouts = Timeouts(request=2.0)  # the request timeout of the transport's requests
    assert dp.remote is not None
    assert dp.remote.request_timeout == 2.0


def _refund(module: str) -> type:
    """A class named ``Refund`` defined in ``module``: same wire name, another class."""

    @dataclass(frozen=True, slots=True)
    class Refund:
        order_id: int

    Refund.__module__ = module
    Refund.__qualname__ = "Refund"
    return Refund


def test_two_routed_classes_of_one_wire_name_fail_the_start() -> None:
    v1, v2 = _refund("billing.v1"), _refund("billing.v2")
    # A dispatcher that only sends them: both routed by class.
    routes: dict[type | str, str] = {v1: "billing", v2: "billing"}
    sender = Dispatcher(transport="memory://", service="shop", routes=routes)
    with pytest.raises(
        ImproperlyConfigured,
        match=r"named 'Refund' on the wire: billing\.v1\.Refund and billing\.v2\.Refund.*"
        r"@iambus\.contract\('\.\.\.'\)",
    ):
        sender.start()
    assert not sender.started  # nothing half-started: fix the name and start again

    # One handled here (routed by its module), the other routed by class.
    owner = Dispatcher(
        transport="memory://", service="billing", routes={"billing.*": "billing", v2: "billing"}
    )

    async def refund(command: Any) -> None:
        pass

    owner.commands.bind(v1, refund)
    with pytest.raises(ImproperlyConfigured, match=r"billing\.v2\.Refund and billing\.v1\.Refund"):
        owner.start()

    # Named apart, they start.
    contract("billing.Refund.v2")(v2)
    Dispatcher(transport="memory://", service="shop", routes=routes).start()
