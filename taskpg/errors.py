"""Failures as stored data, and back: recording a task's exception, rebuilding it for ``get()``.

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

from .exceptions import TaskError

_rebuilt_classes: dict[tuple[str, str], type[TaskError]] = {}


def describe(
    exc: BaseException, attempt: int, worker_id: str | None = None, *, with_traceback: bool = True
) -> dict[str, Any]:
    """The JSON record of one failed attempt."""
    cls = type(exc)
    return {
        "attempt": attempt,
        "type": cls.__qualname__,
        "module": cls.__module__,
        "message": _storable(str(exc)),
        "traceback": _storable("".join(traceback.format_exception(cls, exc, exc.__traceback__)))
        if with_traceback
        else None,
        "worker": worker_id,
        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def _storable(text: str) -> str:
    """Postgres text and jsonb cannot hold NUL characters."""
    return text.replace("\x00", "\\x00")


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
