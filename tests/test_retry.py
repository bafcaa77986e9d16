import pytest

from iambus import ImproperlyConfigured
from iambus.retry import Retry


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = Retry(backoff=0.5, factor=2, max_backoff=3, jitter=False)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_waits_half_to_all_of_the_delay() -> None:
    policy = Retry(backoff=1.0, factor=1, jitter=True)
    delays = [policy.delay(1) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 100  # really random, so consumers do not retry in lockstep


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"attempts": 0}, r"Retry\.attempts must be an int of at least 1, got 0"),
        ({"attempts": 2.5}, r"Retry\.attempts must be an int of at least 1, got 2\.5"),
        ({"attempts": True}, r"Retry\.attempts must be an int of at least 1, got True"),
        ({"backoff": -1}, r"Retry\.backoff must be seconds \(a number >= 0\), got -1"),
        ({"backoff": float("nan")}, r"Retry\.backoff must be seconds \(a number >= 0\), got nan"),
        ({"factor": float("inf")}, r"Retry\.factor must be a number >= 0, got inf"),
        ({"max_backoff": "10"}, r"Retry\.max_backoff must be seconds .*, got '10'"),
        ({"jitter": "no"}, r"Retry\.jitter must be True or False, got 'no'"),
    ],
)
def test_bad_policies_are_named(options: dict[str, object], match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        Retry(**options)  # type: ignore[arg-type]


def test_the_most_specific_policy_wins() -> None:
    from dataclasses import dataclass

    from iambus import Dispatcher

    @dataclass
    class Charge:
        pass

    @dataclass
    class Refund:
        pass

    @dataclass
    class Notify:
        pass

    dp = Dispatcher(
        transport="memory://",
        service="billing",
        routes={Charge: "billing", Refund: "billing", Notify: "billing"},
        retry=Retry(attempts=2),
        retry_for={Refund: Retry(attempts=7)},
    )

    async def charge(command: Charge) -> None: ...
    async def refund(command: Refund) -> None: ...
    async def notify(command: Notify) -> None: ...

    dp.commands.bind(Charge, charge, retry=Retry(attempts=9))
    dp.commands.bind(Refund, refund)
    dp.commands.bind(Notify, notify)
    dp.start()
    attempts = {sub.message: sub.retry.attempts for sub in dp._table.subscriptions}
    assert attempts == {Charge: 9, Refund: 7, Notify: 2}
    with pytest.raises(ImproperlyConfigured, match="must be a Retry"):
        Dispatcher().commands.bind(Charge, charge, retry=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": 3}, "retry must be a Retry(...), e.g. Retry(attempts=5, backoff=0.5)"),
        ({"retry": {"attempts": 3}}, "retry must be a Retry(...)"),
        ({"retry_for": {"Charge": 3}}, "retry_for['Charge'] must be a Retry(...)"),
        (
            {"retry_for": {"Charge": Retry(), "Refund": "10"}},
            "retry_for['Refund'] must be a Retry",
        ),
        ({"retry_for": [Retry()]}, "retry_for must map message types (or names) to Retry(...)"),
    ],
)
def test_a_policy_that_is_not_a_retry_is_refused_at_construction(
    options: dict[str, object], message: str
) -> None:
    from iambus import Dispatcher

    with pytest.raises(ImproperlyConfigured) as info:
        Dispatcher(transport="memory://", **options)  # type: ignore[arg-type]
    text = str(info.value)
    assert message in text
    bad = options.get("retry", options.get("retry_for"))
    if isinstance(bad, dict) and "retry_for" in options:
        bad = next(v for v in bad.values() if not isinstance(v, Retry))
    assert repr(bad) in text  # the value that was given
