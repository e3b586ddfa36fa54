"""Exceptions raised by taskpg.

The tree::

    TaskpgError                      base of every taskpg error
    ├── ConfigurationError           bad task option, bad DSN/schema name, missing extra
    ├── NotRegistered                a task name the app does not know
    ├── SerializationError           args/kwargs that are not JSON, or over the size limit
    ├── PayloadDecodeError           a stored payload that cannot be decoded
    ├── SchemaNotReady               database not migrated to this version: run `taskpg migrate`
    ├── DatabaseUnavailable          Postgres cannot be reached (after one retry on a fresh connection)
    ├── TimeoutError                 AsyncResult.get() gave up waiting
    ├── TaskRevoked                  AsyncResult.get() on a revoked job
    ├── SoftTimeLimitExceeded        raised inside a task when its soft_time_limit passes
    ├── TimeLimitExceeded            recorded when an attempt passes its time_limit
    ├── ChildProcessDied             recorded when a processes-pool child dies mid-attempt
    └── TaskError                    base of rebuilt task failures raised by AsyncResult.get()

Control flow raised *inside* tasks (not errors of taskpg itself)::

    TaskControl
    ├── Retry(countdown, exc)        retry this attempt later (what ``self.retry()`` raises)
    ├── Snooze(seconds)              run again later without spending an attempt
    └── Reject(reason)               give up now: the job goes dead
"""

from __future__ import annotations

import builtins
import math


class TaskpgError(Exception):
    """Base class of every error raised by taskpg itself."""


class ConfigurationError(TaskpgError, ValueError):
    """A setting or task option has a value taskpg cannot use."""


class NotRegistered(TaskpgError, KeyError):
    """The task name is not registered with this app."""

    def __str__(self) -> str:
        name = str(self.args[0]) if self.args else ""
        if " " in name:  # already a full message (e.g. rebuilt from a stored error)
            return name
        return f"task {name!r} is not registered with this app"


class SerializationError(TaskpgError, TypeError):
    """Arguments that cannot be stored as JSON (or are too large)."""


class PayloadDecodeError(TaskpgError, ValueError):
    """A stored payload that cannot be decoded."""


class SchemaNotReady(TaskpgError):
    """The database schema is missing or at another revision than this taskpg needs."""


class DatabaseUnavailable(TaskpgError):
    """Postgres could not be reached, even on a fresh connection.

    For an enqueue: the job was not written, unless the connection died after the server had
    committed it (it then exists; enqueueing again with the same id would be a no-op).
    """


class TimeoutError(TaskpgError, builtins.TimeoutError):
    """Waiting for a result took longer than the timeout."""


class TaskError(TaskpgError):
    """A task failed; raised by ``AsyncResult.get()`` when the original type cannot be rebuilt."""


def _finite_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class TaskControl(Exception):
    """Base of the exceptions a task raises to steer its own job."""


class Retry(TaskControl):
    """Retry the job later. Raised by ``self.retry()``; may also be raised directly."""

    def __init__(
        self,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> None:
        if countdown is not None and not _finite_seconds(countdown):
            raise ValueError(f"Retry countdown must be a finite number of seconds >= 0, not {countdown!r}")
        super().__init__(countdown, exc)
        self.countdown = countdown
        self.exc = exc
        self.max_retries = max_retries

    def __str__(self) -> str:
        reason = f": {self.exc!r}" if self.exc is not None else ""
        when = f" in {self.countdown}s" if self.countdown is not None else ""
        return f"retry{when}{reason}"


class Snooze(TaskControl):
    """Run the job again after ``seconds`` without spending an attempt."""

    def __init__(self, seconds: float) -> None:
        if not _finite_seconds(seconds):
            raise ValueError(f"Snooze seconds must be a finite number >= 0, not {seconds!r}")
        super().__init__(seconds)
        self.seconds = float(seconds)


class Reject(TaskControl):
    """Give up on the job at once: it goes dead with this reason, whatever attempts remain."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


class TaskRevoked(TaskpgError):
    """``AsyncResult.get()`` on a job that was revoked before it ran."""


class JobExpired(TaskRevoked):
    """The job's ``expires`` time passed before a worker started it: it was revoked, never run."""


class ChordError(TaskpgError):
    """A chord's header member ended dead or revoked: the chord's body never runs, and its handle raises this."""


class ChildProcessDied(TaskpgError):
    """The processes pool's child running an attempt died (crash, OOM kill); the attempt failed."""


class SoftTimeLimitExceeded(TaskpgError):
    """Raised inside a running task when its ``soft_time_limit`` passes; the task may catch it."""


class TimeLimitExceeded(TaskpgError):
    """An attempt ran past its ``time_limit`` and was failed."""
