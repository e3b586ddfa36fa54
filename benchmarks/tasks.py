"""The benchmark's tasks: ``python -m taskpg worker -A benchmarks.tasks`` loads the app below.

The app reads TASKPG_DSN / TASKPG_SCHEMA (the worker processes get both); in-process runs build
an app per schema with :func:`make_app`. Task names are fixed, so rows seeded by raw SQL name them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from taskpg import TaskPG

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
NOOP = "benchmarks.noop"
ASYNC_NOOP = "benchmarks.async_noop"
#: Rate-limited tasks (W9), by name: the limit each is registered with.
RATE_LIMITED = {"benchmarks.rate_20_per_s": "20/s", "benchmarks.rate_20000_per_m": "20000/m"}


def noop(*args: object, **kwargs: object) -> None:
    """Does nothing: the benchmark measures the queue, not the work."""


async def async_noop(*args: object, **kwargs: object) -> None:
    """Does nothing, as a coroutine (for the async pool)."""


def started_at(*args: object, **kwargs: object) -> float:
    """When the body began (epoch seconds), kept as the job's result: W9 reads the starts from it."""
    return time.time()


def make_app(dsn: str, schema: str, redis_url: str | None = None, **options: Any) -> TaskPG:
    """An app on ``schema`` with the no-op tasks registered (default task options; ``options`` go
    to :class:`TaskPG`)."""
    app = TaskPG(dsn, schema=schema, redis_url=redis_url, **options)
    app.task(name=NOOP)(noop)
    app.task(name=ASYNC_NOOP)(async_noop)
    for name, limit in RATE_LIMITED.items():
        app.task(name=name, rate_limit=limit)(started_at)
    return app


app = make_app(
    os.environ.get("TASKPG_DSN", DEFAULT_DSN),
    os.environ.get("TASKPG_SCHEMA", "taskpg"),
    os.environ.get("TASKPG_REDIS_URL"),
)
