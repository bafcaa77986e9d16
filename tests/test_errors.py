"""Errors: one tree under IambusError, all importable from ``iambus``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest

import iambus
from iambus import errors
from iambus.errors import (
    DeadLettered,
    DispatcherStopped,
    HandlerAlreadyBound,
    HandlerDoesNotExist,
    HandlerIsSync,
    HandlerSignatureError,
    IambusError,
    ImproperlyConfigured,
    MessageRefused,
    NotSettled,
    ProviderConflict,
    RegistrationClosed,
    RemoteError,
    RequestTimeout,
    SerializationError,
    TransactionFailed,
    TransportError,
    TransportRefused,
    WouldDeadlock,
)

ALL_ERRORS = [
    DeadLettered,
    DispatcherStopped,
    HandlerAlreadyBound,
    HandlerDoesNotExist,
    HandlerIsSync,
    HandlerSignatureError,
    IambusError,
    ImproperlyConfigured,
    MessageRefused,
    NotSettled,
    ProviderConflict,
    RegistrationClosed,
    RemoteError,
    RequestTimeout,
    SerializationError,
    TransactionFailed,
    TransportError,
    TransportRefused,
    WouldDeadlock,
]

IMPROPERLY_CONFIGURED = [
    HandlerIsSync,
    HandlerSignatureError,
    HandlerAlreadyBound,
    ProviderConflict,
    RegistrationClosed,
]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Unhandled:
    pass


def defined_errors() -> list[type]:
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    ]


def test_every_error_class_is_known_to_this_test() -> None:
    assert sorted(defined_errors(), key=lambda c: c.__name__) == ALL_ERRORS


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_derives_from_iambus_error(cls: type) -> None:
    assert issubclass(cls, IambusError)
    assert issubclass(cls, Exception)  # `except Exception` catches them


@pytest.mark.parametrize("cls", IMPROPERLY_CONFIGURED, ids=lambda c: c.__name__)
def test_improperly_configured_family(cls: type) -> None:
    assert issubclass(cls, ImproperlyConfigured)


@pytest.mark.parametrize(
    "cls",
    [HandlerDoesNotExist, DispatcherStopped, SerializationError, WouldDeadlock],
    ids=lambda c: c.__name__,
)
def test_runtime_errors_are_not_configuration_errors(cls: type) -> None:
    assert not issubclass(cls, ImproperlyConfigured)


@pytest.mark.parametrize("cls", [NotSettled, DeadLettered], ids=lambda c: c.__name__)
def test_a_failing_testing_helper_fails_the_test(cls: type) -> None:
    # iambus.testing's settled() raises them: a test runner shows them as failures.
    assert issubclass(cls, AssertionError)
    assert issubclass(cls, IambusError)


def test_iambus_error_is_the_root() -> None:
    assert IambusError.__bases__ == (Exception,)
    assert ImproperlyConfigured.__bases__ == (IambusError,)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_importable_from_iambus_and_listed_in_all(cls: type) -> None:
    assert getattr(iambus, cls.__name__) is cls
    assert cls.__name__ in iambus.__all__
    assert cls.__name__ in errors.__all__


def test_errors_all_lists_exactly_the_error_classes() -> None:
    assert sorted(errors.__all__) == sorted(c.__name__ for c in ALL_ERRORS)


def test_every_name_in_iambus_all_is_importable() -> None:
    missing = [name for name in iambus.__all__ if not hasattr(iambus, name)]
    assert missing == []


# -- raised errors are caught as IambusError ------------------------------------------


def test_registration_errors_are_caught_as_iambus_error() -> None:
    dp = iambus.Dispatcher()

    def sync(message: Ping) -> None: ...

    with pytest.raises(IambusError):
        dp.events.bind(Ping, sync)


async def test_missing_handler_names_the_message_and_the_fix() -> None:
    dp = iambus.Dispatcher()

    @dp.queries.register(Ping)
    async def ping() -> str:
        return "pong"

    with pytest.raises(
        HandlerDoesNotExist,
        match=rf"no query handler is bound for {__name__}\.Unhandled; "
        r"bind one with @dp\.queries\.register",
    ):
        await dp.query(Unhandled())
    with pytest.raises(
        HandlerDoesNotExist,
        match=rf"no command handler is bound for {__name__}\.Ping \(it has a query handler",
    ):
        await dp.execute(Ping())


async def test_sending_after_stop_raises_dispatcher_stopped() -> None:
    dp = iambus.Dispatcher()

    @dp.queries.register(Ping)
    async def ping() -> str:
        return "pong"

    async with dp:
        assert await dp.query(Ping()) == "pong"

    with pytest.raises(DispatcherStopped, match=r"dispatcher was stopped.*call dp\.start\(\)"):
        await dp.query(Ping())


def test_a_message_refused_is_a_transport_error_but_no_refusal_of_the_connection() -> None:
    # Caught where a failed send is (TransportError); not TransportRefused, which stops a
    # worker for good: one message too large must not stop anything.
    assert issubclass(MessageRefused, TransportError)
    assert not issubclass(MessageRefused, TransportRefused)
