"""Where jobs run: a pool of threads (default) or an asyncio event loop (child processes: processes.py).

Every pool takes claimed jobs into a small local buffer, runs them with the executor and hands
each Outcome to ``on_outcome``. ``take_unstarted()`` returns the buffered jobs that have not
started (handed back to Postgres at shutdown). Time limits:

- threads: ``soft_time_limit`` raises SoftTimeLimitExceeded inside the task's thread (at the next
  Python bytecode); at ``time_limit`` the attempt is failed, the thread is abandoned (reported in
  the log; Python cannot kill a thread) and a fresh thread takes its place.
- processes: soft limit by SIGALRM in the child, hard limit by killing the child: exact.
- async: past the limit the coroutine is cancelled and the attempt fails.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .children import ChildPool
from .exceptions import ConfigurationError, SoftTimeLimitExceeded, TimeLimitExceeded
from .executor import Call, Executor, Ran
from .job import ClaimedJob, JobState, Outcome

if TYPE_CHECKING:
    from .limiter import RateLimiter

logger = logging.getLogger("taskpg.worker")

OutcomeSink = Callable[[Outcome], None]
#: A job whose rate-limited start is at most this many seconds away waits for it in its runner. One put
#: back until a later start comes back this long before it and waits in place too, so that it starts on
#: time (claims and promotions take a few ms, and vary) and the starts stay spaced as reserved.
WAIT_IN_PLACE = 0.2
POOL_CHOICES = ("threads", "processes", "async")
RUN_TIME_WEIGHT = 0.05  # weight of the newest job in the mean run time (about the last 20 jobs)


@dataclass(frozen=True)
class PoolSetup:
    """What every pool is built with."""

    executor: Executor
    concurrency: int
    on_outcome: OutcomeSink  # told each job's outcome
    on_free: Callable[[], None]  # told when a job left the pool
    limiter: RateLimiter | None = None  # asked before a rate-limited job starts
    modules: tuple[str, ...] = ()  # what the processes pool's children import (the -A module)
    #: A job that waited in the buffer longer than ``stale_after`` seconds is started only if
    #: ``lease_held(job)`` says its attempt still holds it (it may have been rescued meanwhile).
    lease_held: Callable[[ClaimedJob], bool] | None = None
    stale_after: float = math.inf
    on_dropped: Callable[[ClaimedJob], None] = lambda job: None  # told about a job not started for that
    #: Told as each job starts (the start log; it blocks for a suspect job until its start is written).
    on_start: Callable[[ClaimedJob], None] = lambda job: None
    #: Told each outcome and how long the attempt ran (None: it never ran); the worker's metrics.
    on_finished: Callable[[Outcome, float | None], None] | None = None
    #: Run the calls of tasks that declare a ``time_limit`` in child processes (needs ``modules``), so
    #: that the hard limit really stops them (children.py), and suspect jobs (rescued before), so that
    #: one that kills its process takes no other job along. Off: they run in the pool like the others.
    time_limits_in_children: bool = False


class Pool:
    """Common bookkeeping: how many jobs are buffered or running, the rate-limit decision before a
    job starts, and the start/finish log lines."""

    kind = "base"

    def __init__(self, setup: PoolSetup):
        self.executor = setup.executor
        self.limiter = setup.limiter
        self.concurrency = setup.concurrency
        self._on_outcome = setup.on_outcome
        self._on_free = setup.on_free
        self._lock = threading.Lock()
        self._in_flight = 0  # buffered + running
        self.mean_run_time: float | None = None  # seconds per job, recent jobs weighing most
        self._setup = setup
        self._claimed_at: dict[str, float] = {}  # job id -> when it entered the buffer
        isolate = setup.time_limits_in_children or self.kind == "processes"
        self._children = ChildPool(list(setup.modules), setup.executor, setup.concurrency) if isolate else None

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def submit(self, jobs: Iterable[ClaimedJob]) -> None:
        jobs = list(jobs)
        now = time.monotonic()
        with self._lock:
            self._in_flight += len(jobs)
            self._claimed_at.update((job.id, now) for job in jobs)
        self._enqueue(jobs)

    def _claimed_at_of(self, job: ClaimedJob) -> float | None:
        """When the job entered the buffer (taken once, as the job leaves it)."""
        with self._lock:
            return self._claimed_at.pop(job.id, None)

    def _stale(self, since: float | None) -> bool:
        """Whether a job claimed at ``since`` waited long enough to have been rescued meanwhile."""
        return since is not None and time.monotonic() - since > self._setup.stale_after

    def _lease_lost(self, job: ClaimedJob) -> bool:
        """Ask the database whether a stale job's attempt still holds it; True drops the job."""
        check = self._setup.lease_held
        if check is None:
            return False
        try:
            held = check(job)
        except Exception as exc:  # cannot tell: run it (at least once), its outcome is fenced by its lease
            logger.warning("job %s: could not check its lease (%s); starting it", job.id, exc)
            return False
        if not held:
            logger.warning("job %s was rescued while it waited in this worker's buffer; not starting it", job.id)
            self._setup.on_dropped(job)
            self._finished(None)
        return not held

    def _finished(self, outcome: Outcome | None, started: float | None = None) -> None:
        """A job left the pool: report its outcome (None = dropped, e.g. abandoned) and free its slot."""
        if started is not None:
            self._time_run(time.monotonic() - started)
        if outcome is not None:
            seconds = None if started is None else time.monotonic() - started
            log_outcome(outcome, seconds)
            if self._setup.on_finished is not None:
                self._setup.on_finished(outcome, seconds)
            self._on_outcome(outcome)
        with self._lock:
            self._in_flight -= 1
        self._on_free()

    def isolated(self, call: Call) -> bool:
        """Whether the call runs in a child process (children.py): a task with a time_limit, and a job
        whose worker died before while holding it (if it kills its process, it takes no other job along)."""
        return self._children is not None and (call.task.options.time_limit is not None or call.job.suspect)

    def needs_admission(self, call: Call) -> bool:
        """Whether the call must pass a rate limit before it starts (a decision that may do I/O, or wait)."""
        return self.limiter is not None and self.limiter.applies_to(call.task, call.job.queue)

    def admit(self, call: Call) -> Call | Outcome:
        """The call once its rate limits let it start (after waiting in place for a start at most
        WAIT_IN_PLACE away), else the outcome that puts it back until its reserved start."""
        if not self.needs_admission(call):
            return call
        assert self.limiter is not None
        job = call.job
        if job.slot_at is not None:  # back for the start reserved for it: wait for it, do not ask again
            # On the wall clock: the limiter's clock (Postgres' or Redis') and the worker's agree (NTP);
            # a worker whose clock is off by more than the tolerance only ever takes new reservations.
            until = job.slot_at - time.time()
            if -self.limiter.tolerance(call.task, job.queue) <= until <= WAIT_IN_PLACE:
                time.sleep(max(0.0, until))
                return call
            # Claimed too late for it (busy runners, a slow promotion) or early (retried by hand): a
            # start that late would crowd the ones reserved after it, so it reserves a new one.
            logger.debug("job %s: %.3f s from its reserved start; reserving a new one", job.id, until)
        try:
            slot = self.limiter.admit(call.task, call.request.args, call.request.kwargs, job.queue)
        except ConfigurationError as exc:  # e.g. a rate_limit_key that cannot be rendered for these arguments
            return self.executor.dead(job, "ConfigurationError", str(exc))
        except Exception as exc:  # the limiter's store is unreachable: try again shortly
            logger.warning("job %s: rate limiter unavailable (%s); retrying in 1 s", job.id, exc)
            return self.executor.deferred(job, 1.0)
        if slot is None:
            return call
        if slot.wait <= WAIT_IN_PLACE:  # its start comes in a moment: cheaper to wait here than to put it back
            time.sleep(slot.wait)
            return call
        # Later: back to the queue until just before its reserved start, attempt refunded.
        return self.executor.reserved(job, slot.wait, slot.at, WAIT_IN_PLACE)

    def prepare(self, job: ClaimedJob) -> Call | Outcome | None:
        """Check the job and take its rate-limit decision: a Call to run, an Outcome already, or None
        when the job is no longer this worker's (rescued while it waited; dropped)."""
        since = self._claimed_at_of(job)
        if self._stale(since) and self._lease_lost(job):
            return None
        prepared = self.executor.prepare(job)
        return prepared if isinstance(prepared, Outcome) else self.admit(prepared)

    def _time_run(self, seconds: float) -> None:
        """Fold one job's run time into ``mean_run_time`` (an exponentially weighted mean)."""
        mean = self.mean_run_time
        self.mean_run_time = seconds if mean is None else mean + RUN_TIME_WEIGHT * (seconds - mean)

    def _started(self, call: Call, told: bool = False) -> float:
        """The job starts now (``told``: on_start already ran for it); returns the start time."""
        if not told:
            self._setup.on_start(call.job)
        logger.debug("job %s %s attempt %d started", call.job.id, call.job.task, call.job.attempt)
        return time.monotonic()

    def _enqueue(self, jobs: list[ClaimedJob]) -> None:
        raise NotImplementedError

    def take_unstarted(self) -> list[ClaimedJob]:
        raise NotImplementedError

    def running(self) -> list[ClaimedJob]:
        """Jobs that are executing right now."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the pool's threads/processes once nothing is running (or at abort)."""
        if self._children is not None:
            self._children.close()


# -- threads ---------------------------------------------------------------------------------


@dataclass
class Running:
    call: Call
    started: float
    thread: threading.Thread
    soft_sent: bool = False
    abandoned: bool = False
    isolated: bool = False  # runs in a child process, which enforces its own limits


@dataclass
class Runner:
    thread: threading.Thread
    current: Running | None = None
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunnerPool(Pool):
    """N runner threads fed from a local queue; subclasses say how one job runs (``_run_one``)."""

    def __init__(self, setup: PoolSetup):
        super().__init__(setup)
        self._queue: queue.SimpleQueue[ClaimedJob | None] = queue.SimpleQueue()
        self._runners: list[Runner] = []
        self._stopping = threading.Event()
        for _ in range(self.concurrency):
            self._spawn_runner()

    def _spawn_runner(self) -> None:
        runner = Runner(thread=threading.Thread(target=lambda: self._run(runner), daemon=True))
        runner.thread.name = f"taskpg-runner-{len(self._runners)}"
        self._runners.append(runner)
        runner.thread.start()

    def _enqueue(self, jobs: list[ClaimedJob]) -> None:
        for job in jobs:
            self._queue.put(job)

    def _run(self, runner: Runner) -> None:
        while not runner.retired:
            try:
                job = self._queue.get()
                if job is None:
                    return
                self._run_one(runner, job)
            except SoftTimeLimitExceeded:  # a soft limit that landed just after its task returned
                continue

    def _run_one(self, runner: Runner, job: ClaimedJob) -> None:
        prepared = self.prepare(job)
        if prepared is None:
            return
        if isinstance(prepared, Outcome):
            self._finished(prepared)
            return
        started = self._started(prepared)
        isolated = self.isolated(prepared)
        with runner.lock:
            runner.current = Running(prepared, started, runner.thread, isolated=isolated)
        if isolated:
            assert self._children is not None
            ran = Ran(self._children.run(prepared))  # its signals were sent in the child
        else:
            ran = self._run_here(prepared)
        with runner.lock:
            running, runner.current = runner.current, None
        if running is not None and running.abandoned:
            logger.warning("job %s finished after its time limit; its late outcome is discarded", job.id)
            return  # the watchdog already failed this attempt (and told the signals), and freed the slot
        # The signals after the time limit's clock stopped: a slow receiver cannot fail a finished job.
        self._finished(self.executor.tell(prepared, ran) if not isolated else ran.outcome, started)

    def _run_here(self, call: Call) -> Ran:
        """Run a call that is not isolated in a child, in this runner thread (its outcome's signals not sent)."""
        raise NotImplementedError

    def take_unstarted(self) -> list[ClaimedJob]:
        taken: list[ClaimedJob] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                taken.append(job)
        with self._lock:
            self._in_flight -= len(taken)
        return taken

    def running(self) -> list[ClaimedJob]:
        jobs = []
        for runner in self._runners:
            with runner.lock:
                if runner.current is not None and not runner.current.abandoned:
                    jobs.append(runner.current.call.job)
        return jobs

    def close(self) -> None:
        super().close()
        self._stopping.set()
        for _ in self._runners:
            self._queue.put(None)


class ThreadPool(RunnerPool):
    """Runner threads run sync tasks; ``async def`` tasks go to one shared event loop. A watchdog
    thread enforces time limits."""

    kind = "threads"

    def __init__(self, setup: PoolSetup):
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(setup)
        self._watchdog = threading.Thread(target=self._watch, name="taskpg-watchdog", daemon=True)
        self._watchdog.start()

    def _run_here(self, call: Call) -> Ran:
        return self._run_on_loop(call) if self.executor.is_async(call) else self.executor.attempt_sync(call)

    def _run_on_loop(self, call: Call) -> Ran:
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    self._loop = _start_loop_thread()
        limit = call.task.options.soft_time_limit or call.task.options.time_limit
        future = asyncio.run_coroutine_threadsafe(self.executor.attempt_async(call, limit), self._loop)
        return future.result()

    def _watch(self) -> None:
        """Enforce time limits of running sync jobs."""
        while not self._stopping.wait(0.05):
            now = time.monotonic()
            overdue: list[tuple[Runner, Running]] = []
            for runner in list(self._runners):
                with runner.lock:
                    running = runner.current
                    if running is None or running.abandoned or running.isolated or self.executor.is_async(running.call):
                        continue  # children enforce their own limits; async tasks are cancelled by wait_for
                    options = running.call.task.options
                    elapsed = now - running.started
                    if options.time_limit is not None and elapsed >= options.time_limit:
                        running.abandoned = True  # under the lock: the runner's late outcome is discarded
                        overdue.append((runner, running))
                    elif (
                        options.soft_time_limit is not None
                        and elapsed >= options.soft_time_limit
                        and (not running.soft_sent)
                    ):
                        running.soft_sent = True
                        _raise_in_thread(running.thread, SoftTimeLimitExceeded)
            for runner, running in overdue:  # outside the lock: the signals' receivers run here
                self._abandon(runner, running)

    def _abandon(self, runner: Runner, running: Running) -> None:
        """Hard limit in a thread: fail the attempt now and replace the stuck thread."""
        runner.retired = True
        job = running.call.job
        limit = running.call.task.options.time_limit
        logger.warning(
            "job %s %s passed its time_limit of %s s; the attempt is failed and thread %s is abandoned "
            "(threads cannot be killed: use --pool processes to enforce time limits exactly)",
            job.id,
            job.task,
            limit,
            running.thread.name,
        )
        exc = TimeLimitExceeded(f"{job.task} ran past its time_limit of {limit} s")
        self._finished(self.executor.settle(running.call, exc=exc), running.started)
        self._spawn_runner()

    def close(self) -> None:
        super().close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def _start_loop_thread() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="taskpg-event-loop", daemon=True).start()
    return loop


# -- asyncio -----------------------------------------------------------------------------------


class AsyncPool(Pool):
    """One event loop running up to N jobs at once; sync tasks run in the loop's thread pool."""

    kind = "async"

    def __init__(self, setup: PoolSetup):
        super().__init__(setup)
        self._loop = _start_loop_thread()
        self._queue: asyncio.Queue[ClaimedJob | None] = asyncio.run_coroutine_threadsafe(
            _make_queue(), self._loop
        ).result()
        self._running: dict[str, ClaimedJob] = {}
        for _ in range(self.concurrency):
            asyncio.run_coroutine_threadsafe(self._consume(), self._loop)

    def _enqueue(self, jobs: list[ClaimedJob]) -> None:
        for job in jobs:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, job)

    async def _consume(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            since = self._claimed_at_of(job)
            if self._stale(since) and await asyncio.to_thread(self._lease_lost, job):  # I/O: off the loop
                continue
            prepared = self.executor.prepare(job)
            if isinstance(prepared, Call) and self.needs_admission(prepared):
                prepared = await asyncio.to_thread(self.admit, prepared)  # I/O and waits: off the loop
            if isinstance(prepared, Outcome):
                self._finished(prepared)
                continue
            if job.suspect:  # its start is written before it runs: I/O, off the loop
                await asyncio.to_thread(self._setup.on_start, job)
            started = self._started(prepared, told=job.suspect)
            self._running[job.id] = job
            options = prepared.task.options
            try:
                if self.isolated(prepared):
                    assert self._children is not None
                    outcome = await asyncio.to_thread(self._children.run, prepared)
                elif self.executor.is_async(prepared):
                    outcome = await self.executor.run_async(prepared, options.soft_time_limit or options.time_limit)
                else:
                    outcome = await asyncio.to_thread(self.executor.run_sync, prepared)
            finally:
                self._running.pop(job.id, None)
            self._finished(outcome, started)

    def take_unstarted(self) -> list[ClaimedJob]:
        async def drain() -> list[ClaimedJob]:
            taken = []
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    taken.append(job)
            return taken

        taken = asyncio.run_coroutine_threadsafe(drain(), self._loop).result()
        with self._lock:
            self._in_flight -= len(taken)
        return taken

    def running(self) -> list[ClaimedJob]:
        return list(self._running.values())

    def close(self) -> None:
        super().close()
        for _ in range(self.concurrency):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

        async def finish() -> None:  # let the consumers see their stop marker before the loop stops
            await asyncio.sleep(0)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.wait(pending, timeout=1.0)
            for task in pending:
                task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(finish(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


async def _make_queue() -> asyncio.Queue[ClaimedJob | None]:
    return asyncio.Queue()


def log_outcome(outcome: Outcome, seconds: float | None) -> None:
    """One line per finished attempt (``seconds`` is None for a job that never ran): success at INFO,
    a retry at WARNING and a dead job at ERROR, both with the error, a dead job with its traceback."""
    error = outcome.error
    if outcome.state == JobState.DEAD:
        level = logging.ERROR
    elif error and not outcome.refund:
        level = logging.WARNING
    else:
        level = logging.DEBUG if seconds is None else logging.INFO
    if not logger.isEnabledFor(level):  # the common case at the default level: no line, no formatting
        return
    job, error = outcome.job, error or {}
    took = "without running" if seconds is None else f"in {seconds * 1000:.1f} ms"
    where = f"job {job.id} {job.task} attempt {job.attempt}"
    failure = f"{error.get('type')}: {error.get('message')}" if error else ""
    if outcome.state == JobState.DEAD:
        trace = error.get("traceback")
        logger.error("%s dead %s: %s%s", where, took, failure, f"\n{trace.rstrip()}" if trace else "")
    elif error and outcome.state in (JobState.SCHEDULED, JobState.AVAILABLE) and not outcome.refund:
        logger.warning("%s failed %s: %s; retrying in %.1f s", where, took, failure, outcome.delay)
    elif seconds is None:  # never ran, no error: held back by a rate limit
        logger.debug("%s put back for %.2f s (rate limit)", where, outcome.delay)
    elif outcome.snoozed:
        logger.info("%s snoozed %s; again in %.1f s", where, took, outcome.delay)
    else:
        logger.info("%s %s %s", where, JobState(outcome.state).value, took)
