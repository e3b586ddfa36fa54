"""taskpg: a Celery-style task queue on PostgreSQL."""

from .app import TaskPG
from .beat import Beat
from .exceptions import (
    ConfigurationError,
    DatabaseUnavailable,
    NotRegistered,
    PayloadDecodeError,
    Reject,
    Retry,
    SchemaNotReady,
    SerializationError,
    Snooze,
    SoftTimeLimitExceeded,
    TaskError,
    TaskpgError,
    TaskRevoked,
    TimeLimitExceeded,
    TimeoutError,
)
from .job import JobState, Request, Status
from .periodic import Schedule
from .result import AsyncResult
from .task import Task, TaskRegistry
from .worker import Worker, WorkerSettings

__all__ = [
    "AsyncResult",
    "Beat",
    "ConfigurationError",
    "DatabaseUnavailable",
    "JobState",
    "NotRegistered",
    "PayloadDecodeError",
    "Reject",
    "Request",
    "Retry",
    "Schedule",
    "SchemaNotReady",
    "SerializationError",
    "Snooze",
    "SoftTimeLimitExceeded",
    "Status",
    "Task",
    "TaskError",
    "TaskPG",
    "TaskRegistry",
    "TaskRevoked",
    "TaskpgError",
    "TimeLimitExceeded",
    "TimeoutError",
    "Worker",
    "WorkerSettings",
]
__version__ = "0.1.0"
