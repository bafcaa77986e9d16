"""Retry policies for messages received from a transport.

A handler that fails on a message from a broker is retried — that message, for that
handler only — after a delay that grows exponentially, with jitter so that many failing
consumers do not retry in lockstep. After ``attempts`` deliveries the message is
dead-lettered with the error. The attempt count is kept by the broker, so it survives
restarts and counts across all instances of a service::

    Dispatcher(transport=..., retry=Retry(attempts=5, backoff=0.5))     # every handler
    Dispatcher(transport=..., retries={ChargeCard: Retry(attempts=10)})  # one message type
    @dp.commands.register(ChargeCard, retry=Retry(attempts=3))          # one handler

The most specific wins: handler, then message type, then the dispatcher's ``retry``.
In-process sends are not retried: their caller, or the ``error_handler``, sees the error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import ImproperlyConfigured

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
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ImproperlyConfigured(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("backoff", "factor", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ImproperlyConfigured(f"Retry.{name} must be a number >= 0, got {value!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after delivery number ``attempt`` failed."""
        delay = min(self.max_backoff, self.backoff * self.factor ** max(attempt - 1, 0))
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay


def checked_policy(option: str, value: Retry | None) -> Retry | None:
    """``value`` if it is a ``Retry`` or None; else ImproperlyConfigured naming ``option``."""
    if value is not None and not isinstance(value, Retry):
        raise ImproperlyConfigured(
            f"{option} must be a Retry(...), e.g. Retry(attempts=5, backoff=0.5), or None "
            f"for the policy further out; got {value!r} ({type(value).__name__})"
        )
    return value
