"""Signals with Celery's names and arguments: ``from taskpg import signals``.

Connect a receiver with ``@signals.task_failure.connect`` (or ``.connect(fn, sender=...)``). A receiver
gets ``sender`` and the signal's named arguments as keywords; accept ``**kwargs`` so that arguments added
later do not break it. A receiver that raises is logged (logger ``taskpg.signals``) and never breaks the
job, the enqueue or the worker. With no receiver connected, sending costs one attribute test.

``sender`` filtering: a receiver connected with ``sender=X`` gets only the sends whose sender is ``X``, or
whose sender is a task named ``X``, or a task name equal to ``X``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger("taskpg.signals")


class Signal:
    """A named hook: ``connect`` receivers, ``send`` to call them all."""

    def __init__(self, name: str, arguments: tuple[str, ...] = ()) -> None:
        self.name = name
        #: The named arguments each send passes (besides ``sender``), as documented.
        self.arguments = arguments
        self._receivers: list[tuple[Callable[..., Any], Any]] = []
        #: Whether any receiver is connected (senders skip building arguments when none is): a plain
        #: attribute, kept up to date by connect/disconnect, so that the test costs one attribute read.
        self.receivers = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"

    @overload
    def connect(self, receiver: Callable[..., Any], *, sender: Any = None) -> Callable[..., Any]: ...

    @overload
    def connect(
        self, receiver: None = None, *, sender: Any = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...

    def connect(self, receiver: Callable[..., Any] | None = None, *, sender: Any = None) -> Any:
        """Connect ``receiver`` (or use as ``@signal.connect`` / ``@signal.connect(sender=...)``).
        Connecting the same receiver and sender twice connects it once."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            with self._lock:
                if (fn, sender) not in self._receivers:
                    self._receivers = [*self._receivers, (fn, sender)]
                    self.receivers = True
            return fn

        return add if receiver is None else add(receiver)

    def disconnect(self, receiver: Callable[..., Any], *, sender: Any = None) -> bool:
        """Disconnect ``receiver`` (connected with this ``sender``); True if it was connected."""
        with self._lock:
            kept = [entry for entry in self._receivers if entry != (receiver, sender)]
            found = len(kept) != len(self._receivers)
            self._receivers = kept
            self.receivers = bool(kept)
        return found

    def send(self, sender: Any = None, **named: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every matching receiver with ``sender`` and ``named``; returns (receiver, result) pairs,
        the result being the exception for a receiver that raised."""
        replies: list[tuple[Callable[..., Any], Any]] = []
        for receiver, wanted in self._receivers:  # a copy-on-write list: safe while others connect
            if wanted is not None and not _matches(wanted, sender):
                continue
            try:
                replies.append((receiver, receiver(signal=self, sender=sender, **named)))
            except Exception as exc:
                logger.exception("signal %s: receiver %r raised; carrying on", self.name, receiver)
                replies.append((receiver, exc))
        return replies


def _matches(wanted: Any, sender: Any) -> bool:
    if wanted is sender or wanted == sender:
        return True
    return isinstance(wanted, str) and getattr(sender, "name", None) == wanted


# -- enqueue (sender: the task's name) ------------------------------------------------------------------

#: Before a job is written (or pushed to the buffer). ``headers``: id, task, queue, eta, priority, via.
before_task_publish = Signal("before_task_publish", ("body", "exchange", "routing_key", "headers", "properties"))
#: After the job was written (or pushed), in the enqueuing process.
after_task_publish = Signal("after_task_publish", ("body", "exchange", "routing_key", "headers"))

# -- execution (sender: the task) ----------------------------------------------------------------------

task_prerun = Signal("task_prerun", ("task_id", "task", "args", "kwargs"))
#: ``state``: the Celery state of this attempt's outcome (SUCCESS, RETRY, FAILURE, ...).
task_postrun = Signal("task_postrun", ("task_id", "task", "args", "kwargs", "retval", "state"))
task_success = Signal("task_success", ("result",))
#: The job is dead after this attempt (not retried): ``exception``, ``traceback`` (text), ``einfo``.
task_failure = Signal("task_failure", ("task_id", "exception", "args", "kwargs", "traceback", "einfo"))
#: The attempt failed and the job will run again: ``request``, ``reason`` (the exception), ``einfo``.
task_retry = Signal("task_retry", ("request", "reason", "einfo"))
#: A job was revoked (``AsyncResult.revoke()`` cancelled it): ``request``, ``terminated``, ``signum``, ``expired``.
task_revoked = Signal("task_revoked", ("request", "terminated", "signum", "expired"))
#: A worker claimed a job of a task it does not know (sender: None): ``name``, ``id``, ``message``, ``exc``.
task_unknown = Signal("task_unknown", ("name", "id", "message", "exc"))

# -- processes (sender: the worker or the beat) ---------------------------------------------------------

worker_init = Signal("worker_init")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
#: In each child process of the processes pool (and of the children that run time-limited jobs), after
#: it imported the task modules (sender: None).
worker_process_init = Signal("worker_process_init")
beat_init = Signal("beat_init")

__all__ = [
    "Signal",
    "after_task_publish",
    "beat_init",
    "before_task_publish",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_retry",
    "task_revoked",
    "task_success",
    "task_unknown",
    "worker_init",
    "worker_process_init",
    "worker_ready",
    "worker_shutdown",
]
