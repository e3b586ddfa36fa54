"""Throttled enqueues from a spawned process (the 8-process throttle test)."""

from __future__ import annotations

from taskpg import TaskPG


def enqueue_throttled(dsn: str, schema: str, calls: int, keys: int) -> int:
    """Enqueue ``calls`` throttled calls spread over ``keys`` users; returns how many got in."""
    app = TaskPG(dsn, schema=schema)

    @app.task(name="limits.notify_user", throttle_key="user:{user_id}", throttle="1/h")
    def notify_user(user_id: int, attempt: int) -> None:
        return None

    admitted = sum(0 if notify_user.delay(n % keys, n).throttled else 1 for n in range(calls))
    app.close()
    return admitted
