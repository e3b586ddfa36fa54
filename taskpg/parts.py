"""What the worker, the beat and the flusher read from an app, as a Protocol.

``TaskPG`` is one; the components take it (``Worker(app)``, ``Beat(app)``, ``Flusher(app)``) but
depend only on these parts, so none of them imports the app module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .limiter import QueueOptions
    from .periodic import Schedule
    from .retention import Retention
    from .store import Store
    from .task import TaskRegistry


class AppParts(Protocol):
    """The store, the task registry and the settings a component runs with."""

    schema: str
    tasks: TaskRegistry
    queues: dict[str, QueueOptions]
    retention: dict[str | None, Retention]
    redis_url: str | None
    max_payload_bytes: int

    @property
    def buffer_lists(self) -> tuple[str, ...]: ...

    @property
    def store(self) -> Store: ...

    def schedules(self) -> list[Schedule]: ...
