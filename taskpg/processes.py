"""The processes pool: each runner thread drives one child process (spawned, importing the task
modules), so that hard time limits are exact (a child past its ``time_limit`` is killed).

The parent prepares each job (registration, arguments, rate limits) and sends the decoded call;
the child looks the task up in its own registry and runs it, enforcing ``soft_time_limit`` with
SIGALRM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import signal
from typing import TYPE_CHECKING, Any

from .exceptions import ChildProcessDied, SoftTimeLimitExceeded, TimeLimitExceeded
from .executor import Executor
from .job import Outcome
from .pools import Runner, RunnerPool, Running
from .task import Task, TaskRegistry

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .executor import Call
    from .job import ClaimedJob
    from .pools import PoolSetup
    from .task import Request

logger = logging.getLogger("taskpg.worker")
CHILD_START_TIMEOUT = 120.0  # seconds a child process may take to import the task modules


class ProcessPool(RunnerPool):
    """Each runner thread drives one child process (spawned, importing the task modules).

    The parent prepares the job (registration, arguments, rate limits) and sends the decoded call;
    the child enforces ``soft_time_limit`` with SIGALRM; the parent kills a child that passes
    ``time_limit`` and starts a new one, so hard limits are exact.
    """

    kind = "processes"

    def __init__(self, setup: PoolSetup):
        if not setup.modules:
            raise ValueError("the processes pool needs the importable module(s) that define the tasks (-A)")
        self._modules = list(setup.modules)
        self._children: dict[int, _Child] = {}
        super().__init__(setup)
        for runner in self._runners:  # start the children now: their imports take a while
            self._children.setdefault(id(runner), _Child(self._modules, self.executor))

    def _run_one(self, runner: Runner, job: ClaimedJob) -> None:
        prepared = self.prepare(job)  # checks registration, arguments and rate limits before the child
        if prepared is None:
            return
        if isinstance(prepared, Outcome):
            self._finished(prepared)
            return
        started = self._started(prepared)
        child = self._children.get(id(runner))
        if child is None:
            child = self._children[id(runner)] = _Child(self._modules, self.executor)
        with runner.lock:
            runner.current = Running(prepared, started, runner.thread)
        outcome = child.run(prepared, self.executor)
        with runner.lock:
            runner.current = None
        self._finished(outcome, started)

    def close(self) -> None:
        super().close()
        for child in self._children.values():
            child.stop()


class _Child:
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
            target=_child_main,
            args=(child_conn, self._modules, self._worker_id, self._max_payload),
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
            return executor.conclude(call, exc=ChildProcessDied("the child process running the task died"))
        logger.warning("job %s passed its time_limit of %s s: killing its child process", call.job.id, limit)
        self._restart()
        return executor.conclude(call, exc=TimeLimitExceeded(f"{call.task.name} ran past its time_limit of {limit} s"))

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


def _child_main(conn: Connection, modules: list[str], worker_id: str | None, max_payload: int) -> None:
    """Child process: import the task modules, then run the jobs the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    tasks = TaskRegistry()
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, Task):
                tasks.update(value.app.tasks)
            elif isinstance(getattr(value, "tasks", None), TaskRegistry):  # an app whose tasks live elsewhere
                tasks.update(value.tasks)
    executor = Executor(tasks, worker_id, max_payload)

    def on_alarm(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send("ready")
    while True:
        sent: tuple[ClaimedJob, Request] | None = conn.recv()
        if sent is None:
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
