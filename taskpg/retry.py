"""When to run a failed job again: a pure function of the attempt number (and randomness).

Celery's knobs: ``retry_backoff`` (True = 1 s base, or a base in seconds) doubles the delay each
attempt up to ``retry_backoff_max``; ``retry_jitter`` picks a random delay between 0 and that
value ("full jitter", as Celery does). ``retry_policy`` takes any tenacity wait strategy instead
(``tenacity.wait_exponential(multiplier=2, max=60) + tenacity.wait_random(0, 1)``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tenacity

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_RETRY_DELAY = 180.0  # Celery's default_retry_delay, used by self.retry() without countdown
DEFAULT_BACKOFF_MAX = 600.0  # Celery's retry_backoff_max


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before attempt ``n + 1`` after attempt ``n`` failed."""

    backoff: float | None = None  # base seconds for exponential backoff; None = fixed delay
    backoff_max: float = DEFAULT_BACKOFF_MAX
    jitter: bool = True
    default_delay: float = DEFAULT_RETRY_DELAY
    wait: Callable[[tenacity.RetryCallState], float] | None = None  # a tenacity wait strategy

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if self.wait is not None:
            return float(self.wait(_retry_state(attempt)))
        if self.backoff is None:
            return self.default_delay
        delay = min(self.backoff_max, self.backoff * 2.0 ** max(0, attempt - 1))
        if self.jitter:
            delay = rand() * delay
        return delay


def _retry_state(attempt: int) -> tenacity.RetryCallState:
    """The minimal tenacity state a wait strategy reads: the attempt number."""
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state
