"""Failures as stored data, and back: the one builder of failure records, and rebuilding them for ``get()``.

A failure record is the JSON object appended to a job's ``errors`` array for one failed attempt::

    {"attempt": 2, "type": "ValueError", "module": "builtins", "message": "...", "traceback": "...",
     "worker": "<worker id>", "at": "2026-01-01T08:00:00+00:00"}

Every record comes from ``record`` (failures taskpg itself decides: unknown task, time limit, lost
worker, rejected envelope...) or ``from_exception`` (a task's own exception); the rescue statement
completes ``sql_template`` with the row's attempt, worker and time.

Rebuilding never imports anything named by stored data (see Celery's CVE-2021-23727): a builtin
exception type is rebuilt as itself, a class already imported by this process is used if its
constructor accepts the message, and anything else becomes a ``TaskError`` subclass that carries
the original name and module.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import sys
import traceback
from typing import Any

from . import codec
from .exceptions import TaskError

#: The module named by failures that taskpg records itself (no user exception behind them).
TASKPG_MODULE = "taskpg.exceptions"

_rebuilt_classes: dict[tuple[str, str], type[TaskError]] = {}


def record(
    error_type: str,
    message: str,
    attempt: int,
    worker: str | None = None,
    *,
    module: str = TASKPG_MODULE,
    traceback_text: str | None = None,
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """The record of one failed attempt."""
    return {
        "attempt": attempt,
        "type": error_type,
        "module": module,
        "message": codec.storable_text(message),
        "traceback": None if traceback_text is None else codec.storable_text(traceback_text),
        "worker": worker,
        "at": (at or dt.datetime.now(dt.timezone.utc)).isoformat(),
    }


def from_exception(
    exc: BaseException, attempt: int, worker: str | None = None, *, with_traceback: bool = True
) -> dict[str, Any]:
    """The record of an attempt that raised ``exc``."""
    cls = type(exc)
    return record(
        cls.__qualname__,
        str(exc),
        attempt,
        worker,
        module=cls.__module__,
        traceback_text="".join(traceback.format_exception(cls, exc, exc.__traceback__)) if with_traceback else None,
    )


def sql_template(error_type: str, message: str) -> str:
    """The fixed part of a record built in SQL, as JSON text: the statement adds the row's
    ``attempt``, ``worker`` and ``at`` (see RESCUE_JOBS)."""
    fixed = record(error_type, message, 0)
    for key in ("attempt", "worker", "at"):
        del fixed[key]
    return codec.dumps(fixed)


def rebuild(error: dict[str, Any]) -> BaseException:
    """An exception of the recorded type (or a stand-in of the same name) with the recorded message."""
    name = str(error.get("type") or "TaskError")
    module = str(error.get("module") or "builtins")
    message = str(error.get("message") or "")
    cls = _known_class(module, name)
    exc: BaseException | None = None
    if cls is not None:
        try:
            exc = cls(message)
        except Exception:
            exc = None
    if exc is None:
        exc = _stand_in(module, name)(message)
    with contextlib.suppress(AttributeError):  # a few exception types refuse new attributes
        exc.remote_traceback = error.get("traceback")  # type: ignore[attr-defined]
    return exc


def _known_class(module: str, qualname: str) -> type[BaseException] | None:
    owner: Any = builtins if module == "builtins" else sys.modules.get(module)
    for part in qualname.split("."):
        owner = getattr(owner, part, None)
    if isinstance(owner, type) and issubclass(owner, Exception):
        return owner
    return None


def _stand_in(module: str, qualname: str) -> type[TaskError]:
    key = (module, qualname)
    if key not in _rebuilt_classes:
        name = qualname.rsplit(".", 1)[-1] if qualname.isidentifier() or "." in qualname else "TaskError"
        cls = type(name, (TaskError,), {"__module__": module, "__qualname__": qualname})
        _rebuilt_classes[key] = cls
    return _rebuilt_classes[key]
