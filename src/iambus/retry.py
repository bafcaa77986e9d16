"""Retry policies for messages received from a transport.

A handler that fails on a message from a broker is retried — that message, for that
handler only — after a delay that grows exponentially, with jitter so that many failing
consumers do not retry in lockstep. After ``attempts`` deliveries the message is
dead-lettered with the error. The attempt count is kept by the broker, so it survives
restarts and counts across all instances of a service::

    Dispatcher(transport=..., retry=Retry(attempts=5, backoff=0.5))     # every handler
    Dispatcher(transport=..., retry_for={ChargeCard: Retry(attempts=10)})  # one message type
    @dp.commands.register(ChargeCard, retry=Retry(attempts=3))          # one handler

The most specific wins: handler, then message type, then the dispatcher's ``retry``.
In-process sends are not retried: their caller, or the ``error_handler``, sees the error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import bad_option, check_count, check_flag, check_number, check_seconds

__all__ = ["Retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how soon to retry a failing message."""

    attempts: int = 5
    """Deliveries in all, the first included; 1 means never retry."""
    backoff: float = 0.5
    """Seconds before the first retry."""
    factor: float = 2.0
    """Each further retry waits this many times longer..."""
    max_backoff: float = 60.0
    """...but never longer than this."""
    jitter: bool = True
    """Wait a random 50-100 % of the computed delay."""

    def __post_init__(self) -> None:
        check_count("Retry.attempts", self.attempts)
        check_seconds("Retry.backoff", self.backoff, zero=True)
        check_number("Retry.factor", self.factor, zero=True)
        check_seconds("Retry.max_backoff", self.max_backoff, zero=True)
        check_flag("Retry.jitter", self.jitter)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after delivery number ``attempt`` failed."""
        delay = min(self.max_backoff, self.backoff * self.factor ** max(attempt - 1, 0))
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay


def checked_policy(option: str, value: Retry | None) -> Retry | None:
    """``value`` if it is a ``Retry`` or None; else ImproperlyConfigured naming ``option``."""
    if value is not None and not isinstance(value, Retry):
        raise bad_option(
            option,
            value,
            "a Retry(...), e.g. Retry(attempts=5, backoff=0.5), or None for the policy further out",
        )
    return value
