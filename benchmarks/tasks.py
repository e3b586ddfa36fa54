"""The benchmark's tasks: ``python -m taskpg worker -A benchmarks.tasks`` loads the app below.

The app reads TASKPG_DSN / TASKPG_SCHEMA (the worker processes get both); in-process runs build
an app per schema with :func:`make_app`. Task names are fixed, so rows seeded by raw SQL name them.
"""

from __future__ import annotations

import os
from typing import Any

from taskpg import TaskPG

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
NOOP = "benchmarks.noop"
ASYNC_NOOP = "benchmarks.async_noop"


def noop(*args: object, **kwargs: object) -> None:
    """Does nothing: the benchmark measures the queue, not the work."""


async def async_noop(*args: object, **kwargs: object) -> None:
    """Does nothing, as a coroutine (for the async pool)."""


def make_app(dsn: str, schema: str, redis_url: str | None = None, **options: Any) -> TaskPG:
    """An app on ``schema`` with the no-op tasks registered (default task options; ``options`` go
    to :class:`TaskPG`)."""
    app = TaskPG(dsn, schema=schema, redis_url=redis_url, **options)
    app.task(name=NOOP)(noop)
    app.task(name=ASYNC_NOOP)(async_noop)
    return app


app = make_app(
    os.environ.get("TASKPG_DSN", DEFAULT_DSN),
    os.environ.get("TASKPG_SCHEMA", "taskpg"),
    os.environ.get("TASKPG_REDIS_URL"),
)
