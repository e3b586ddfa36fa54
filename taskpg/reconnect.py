"""Retrying database work across connection loss (Postgres restarts, network blips)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
import tenacity

logger = logging.getLogger("taskpg.worker")
T = TypeVar("T")

#: Errors that mean "the connection is gone", not "the statement is wrong".
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def reconnecting(
    work: Callable[[], T],
    what: str,
    reset: Callable[[], None],
    stop: threading.Event | None = None,
    max_wait: float = 5.0,
) -> T:
    """Run ``work``; on a connection error call ``reset`` and try again with exponential backoff.

    Tries until it succeeds, or (when ``stop`` is given) until ``stop`` is set, in which case the
    last error is raised. The first try is a plain call: the retry machinery is only built once a
    connection has been lost (this runs once per claim and per batch of outcomes).
    """
    try:
        return work()
    except CONNECTION_ERRORS as exc:
        if stop is not None and stop.is_set():
            raise
        logger.warning("lost the database while %s (%s); retrying", what, exc)
        reset()

    def should_stop(state: tenacity.RetryCallState) -> bool:
        return stop is not None and stop.is_set()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "lost the database while %s (%s); retrying in %.1f s",
            what,
            error,
            state.next_action.sleep if state.next_action else 0,
        )
        reset()

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(CONNECTION_ERRORS),
        wait=tenacity.wait_exponential(multiplier=0.05, max=max_wait) + tenacity.wait_random(0, 0.1),
        stop=should_stop,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(work)
