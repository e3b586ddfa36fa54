"""taskpg: a Celery-style task queue on PostgreSQL."""

from .app import TaskPG, TaskRegistry
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
from .job import JobState, Status
from .result import AsyncResult
from .task import Request, Task

__all__ = [
    "AsyncResult",
    "ConfigurationError",
    "DatabaseUnavailable",
    "JobState",
    "NotRegistered",
    "PayloadDecodeError",
    "Reject",
    "Request",
    "Retry",
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
]
__version__ = "0.1.0"
