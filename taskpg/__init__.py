"""taskpg: a Celery-style task queue on PostgreSQL."""

from .app import TaskPG
from .beat import Beat
from .canvas import Signature, chain, chord, group, signature
from .exceptions import (
    ChordError,
    ConfigurationError,
    DatabaseUnavailable,
    JobExpired,
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
from .result import AsyncResult, GroupResult
from .task import Task, TaskRegistry
from .worker import Worker, WorkerSettings

__all__ = [
    "AsyncResult",
    "Beat",
    "ChordError",
    "ConfigurationError",
    "DatabaseUnavailable",
    "GroupResult",
    "JobExpired",
    "JobState",
    "NotRegistered",
    "PayloadDecodeError",
    "Reject",
    "Request",
    "Retry",
    "Schedule",
    "SchemaNotReady",
    "SerializationError",
    "Signature",
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
    "chain",
    "chord",
    "group",
    "signature",
]
__version__ = "0.1.0"
