"""Child processes that run one call at a time, so that a hard time limit is exact: a child past its
``time_limit`` is killed and replaced.

A child is spawned (not forked), imports the task modules (the worker's ``-A``), and runs what the
parent sends: the job and its decoded call (the parent prepared it already). It enforces
``soft_time_limit`` with SIGALRM. ``ChildPool`` keeps idle children for reuse: the processes pool runs
every job in one, the threads and async pools only the jobs whose task has a ``time_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import signal
import threading
from typing import TYPE_CHECKING, Any

from . import logs, signals
from .exceptions import ChildProcessDied, SoftTimeLimitExceeded, TimeLimitExceeded
from .executor import Executor
from .job import Outcome
from .task import Task, TaskRegistry, current_request

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .executor import Call
    from .job import ClaimedJob, Request

logger = logging.getLogger("taskpg.worker")
CHILD_START_TIMEOUT = 120.0  # seconds a child process may take to import the task modules


class ChildPool:
    """Up to ``size`` children, started when first needed and reused; ``run`` blocks its caller."""

    def __init__(self, modules: list[str], executor: Executor, size: int) -> None:
        self.modules = modules
        self.executor = executor
        self.size = size
        self._idle: list[Child] = []
        self._all: list[Child] = []
        self._lock = threading.Lock()
        self._free = threading.Semaphore(size)

    def warm(self) -> None:
        """Start every child now (their imports take a while)."""
        with self._lock:
            while len(self._all) < self.size:
                child = Child(self.modules, self.executor)
                self._all.append(child)
                self._idle.append(child)

    def run(self, call: Call) -> Outcome:
        """Run the call in an idle child (starting one if none is idle) and return its outcome."""
        with self._free:
            with self._lock:
                child = self._idle.pop() if self._idle else None
                if child is None:
                    child = Child(self.modules, self.executor)
                    self._all.append(child)
            try:
                return child.run(call, self.executor)
            finally:
                with self._lock:
                    self._idle.append(child)

    def close(self) -> None:
        with self._lock:
            children, self._all, self._idle = self._all, [], []
        for child in children:
            child.stop()


class Child:
    """One child process and the pipe to it."""

    def __init__(self, modules: list[str], executor: Executor) -> None:
        self._modules = modules
        self._worker_id = executor.worker_id
        self._max_payload = executor.max_payload_bytes
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=child_main,
            args=(child_conn, self._modules, self._worker_id, self._max_payload, logs.settings()),
            daemon=True,
            name="taskpg-child",
        )
        self._process.start()
        child_conn.close()
        self._ready = False

    def _wait_ready(self) -> None:
        """Wait for the child to finish importing, so start-up time never counts against a time limit."""
        if not self._ready:
            if not self._conn.poll(CHILD_START_TIMEOUT) or self._conn.recv() != "ready":
                raise EOFError("the child process did not start")
            self._ready = True

    def run(self, call: Call, executor: Executor) -> Outcome:
        limit = call.task.options.time_limit
        try:
            self._wait_ready()
            self._conn.send((call.job, call.request))
            if self._conn.poll(limit):
                outcome: Outcome = self._conn.recv()
                return outcome
        except (EOFError, OSError, BrokenPipeError):
            self._restart()
            return executor.settle(call, exc=ChildProcessDied("the child process running the task died"))
        logger.warning("job %s passed its time_limit of %s s: killing its child process", call.job.id, limit)
        self._restart()
        return executor.settle(call, exc=TimeLimitExceeded(f"{call.task.name} ran past its time_limit of {limit} s"))

    def _restart(self) -> None:
        self._process.kill()
        self._process.join(5)
        self._conn.close()
        self._start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()


def child_main(
    conn: Connection,
    modules: list[str],
    worker_id: str | None,
    max_payload: int,
    log_settings: tuple[str, str] | None = None,
) -> None:
    """Child process: import the task modules, then run the jobs the parent sends. It logs as the
    parent does (``log_settings``: the CLI's level and format), never blocking a job on a log line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    if log_settings is not None:
        logs.configure(*log_settings, current_request)
    tasks = TaskRegistry()
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, Task):
                tasks.update(value.app.tasks)
            elif isinstance(getattr(value, "tasks", None), TaskRegistry):  # an app whose tasks live elsewhere
                tasks.update(value.tasks)
    executor = Executor(tasks, worker_id, max_payload)
    signals.worker_process_init.send(sender=None)

    def on_alarm(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send("ready")
    while True:
        sent: tuple[ClaimedJob, Request] | None = conn.recv()
        if sent is None:
            logs.flush()  # the lines still queued, for at most 2 s
            return
        prepared = executor.adopt(*sent)  # the parent decoded and checked the arguments already
        if isinstance(prepared, Outcome):
            conn.send(prepared)
            continue
        options = prepared.task.options
        if executor.is_async(prepared):  # cancelled by asyncio at its limit; an alarm would hit the loop
            outcome = asyncio.run(executor.run_async(prepared, options.soft_time_limit or options.time_limit))
        else:
            if options.soft_time_limit:
                signal.setitimer(signal.ITIMER_REAL, options.soft_time_limit)
            try:
                outcome = executor.run_sync(prepared)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(outcome)
