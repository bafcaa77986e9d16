import asyncio
from dataclasses import dataclass

import pytest

from iambus import AbstractHandler, Context, Dispatcher, ImproperlyConfigured, RegistrationClosed


@dataclass(frozen=True, slots=True)
class Ping:
    n: int


@dataclass(frozen=True, slots=True)
class Pinged:
    n: int


@dataclass(frozen=True, slots=True)
class Count:
    pass


def recorder(log: list[str], name: str):
    async def mw(message, call_next, context: Context):
        log.append(f"{name}>")
        result = await call_next(message)
        log.append(f"<{name}")
        return result

    return mw


async def test_global_middleware_runs_outside_router_middleware_in_order_added():
    log: list[str] = []
    dp = Dispatcher()

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> int:
        log.append("handler")
        return query.n

    dp.add_middleware(recorder(log, "g1"))
    dp.add_middleware(recorder(log, "g2"))
    dp.queries.add_middleware(recorder(log, "q1"))
    dp.commands.add_middleware(recorder(log, "c1"))  # not for queries

    assert await dp.query(Ping(5)) == 5
    assert log == ["g1>", "g2>", "q1>", "handler", "<q1", "<g2", "<g1"]


async def test_middleware_wraps_event_handlers_too_and_sees_the_context():
    contexts: list[Context] = []
    dp = Dispatcher()

    async def capture(message, call_next, context):
        contexts.append(context)
        return await call_next(message)

    dp.add_middleware(capture)

    @dp.events.register(Pinged)
    async def first(event: Pinged) -> None:
        pass

    @dp.events.register(Pinged)
    async def second(event: Pinged) -> None:
        pass

    @dp.commands.register(Ping)
    async def ping(command: Ping) -> Pinged:
        return Pinged(command.n)

    await dp.execute(Ping(1), key="order-1")
    mod = __name__
    assert contexts == [
        Context("command", f"{mod}.{ping.__qualname__}", "order-1"),
        Context("event", f"{mod}.{first.__qualname__}", "order-1"),
        Context("event", f"{mod}.{second.__qualname__}", "order-1"),
    ]


async def test_middleware_can_replace_the_message_the_result_or_stop_the_call():
    dp = Dispatcher()
    calls: list[int] = []

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> int:
        calls.append(query.n)
        return query.n

    async def rewrite(message, call_next, context):
        if message.n < 0:
            return "refused"  # the handler never runs
        return await call_next(Ping(message.n * 10)) + 1

    dp.add_middleware(rewrite)
    assert await dp.query(Ping(2)) == 21
    assert await dp.query(Ping(-1)) == "refused"
    assert calls == [20]


async def test_middleware_can_retry():
    dp = Dispatcher()
    attempts = 0

    @dp.commands.register(Ping)
    async def flaky(command: Ping) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("try again")
        return "ok"

    async def retry(message, call_next, context):
        for _ in range(5):
            try:
                return await call_next(message)
            except ConnectionError:
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    dp.commands.add_middleware(retry)
    assert await dp.execute(Ping(1)) == "ok"
    assert attempts == 3


async def test_events_are_emitted_only_after_the_whole_chain_succeeded():
    dp = Dispatcher()
    seen: list[object] = []

    class Counting(AbstractHandler):
        async def handle(self, command: Count) -> int:
            await self.add_event(Pinged(1))
            return 1

    dp.commands.bind(Count, Counting)

    @dp.commands.register(Ping)
    async def ping(command: Ping) -> Pinged:
        return Pinged(command.n)

    @dp.events.register(Pinged)
    async def on_pinged(event: Pinged) -> None:
        seen.append(event)

    async def failing_commit(message, call_next, context):
        await call_next(message)
        raise RuntimeError("commit failed")

    dp.commands.add_middleware(failing_commit)
    with pytest.raises(RuntimeError, match="commit failed"):
        await dp.execute(Ping(1))
    with pytest.raises(RuntimeError, match="commit failed"):
        await dp.execute(Count())
    assert seen == []


async def test_middleware_must_be_async_and_added_before_start():
    dp = Dispatcher()

    def sync_mw(message, call_next, context):
        return call_next(message)

    with pytest.raises(ImproperlyConfigured, match="async"):
        dp.add_middleware(sync_mw)

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> int:
        return 1

    dp.start()

    async def mw(message, call_next, context):
        return await call_next(message)

    with pytest.raises(RegistrationClosed, match="middleware"):
        dp.add_middleware(mw)
    with pytest.raises(RegistrationClosed, match="middleware"):
        dp.queries.add_middleware(mw)


async def test_callable_object_middleware():
    dp = Dispatcher()

    class Tag:
        async def __call__(self, message, call_next, context):
            return ("tagged", await call_next(message))

    dp.add_middleware(Tag())

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> int:
        return 1

    assert await dp.query(Ping(1)) == ("tagged", 1)


async def test_a_retried_chain_publishes_the_events_of_the_successful_attempt_only():
    dp = Dispatcher()
    published: list[Pinged] = []
    attempt = 0

    class Counting(AbstractHandler):
        async def handle(self, command: Count) -> int:
            nonlocal attempt
            attempt += 1
            await self.add_event(Pinged(attempt))
            return attempt

    async def retry(message, call_next, context):
        try:
            return await call_next(message)
        except RuntimeError:
            return await call_next(message)

    async def commit_fails_once(message, call_next, context):
        result = await call_next(message)
        if result == 1:
            raise RuntimeError("commit failed")
        return result

    dp.commands.add_middleware(retry)
    dp.commands.add_middleware(commit_fails_once)
    dp.commands.bind(Count, Counting)

    @dp.events.register(Pinged)
    async def on_pinged(event: Pinged) -> None:
        published.append(event)

    assert await dp.execute(Count()) == 2
    assert published == [Pinged(2)]


async def test_a_partial_of_an_async_function_is_a_middleware():
    import functools

    dp = Dispatcher()

    async def tag(label, message, call_next, context):
        return (label, await call_next(message))

    dp.add_middleware(functools.partial(tag, "tagged"))

    @dp.queries.register(Ping)
    async def ping(query: Ping) -> int:
        return 1

    assert await dp.query(Ping(1)) == ("tagged", 1)
