"""``taskpg worker``: claim jobs in batches, run them in a pool, write outcomes back in batches.

One fetch loop per worker process. It sleeps until LISTEN/NOTIFY says a queue it serves has work,
a pool slot frees up, or the poll interval passes (the safety net), then claims as many jobs as
it has room for. Around it run the worker's background loops (``loops.BackgroundLoop``): the
listener, the stager (promotes due scheduled jobs every ``stage_interval``), the heartbeat (and
rescue), the completer (writes outcomes) and, with Redis, the buffer's flusher. Shutdown: stop
claiming, hand back claimed-but-unstarted jobs at once, let running jobs finish within ``grace``
seconds; a second signal (or the end of the grace period) puts the still-running jobs back and exits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import events, signals
from .completer import Completer, write_outcomes
from .connections import reconnecting
from .events import EventPublisher
from .executor import Executor
from .flusher import Flusher
from .heartbeat import Heartbeat
from .job import JobState
from .limiter import RateLimiter
from .listener import Listener
from .metrics import WorkerMetrics
from .metrics import serve as serve_metrics
from .options import validate_queue_name
from .pools import POOL_CHOICES, AsyncPool, Pool, PoolSetup, ThreadPool
from .processes import ProcessPool
from .stager import Stager
from .starts import StartLog
from .store import WorkerInfo

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from http.server import ThreadingHTTPServer
    from types import FrameType

    from .job import ClaimedJob, Outcome
    from .parts import AppParts


logger = logging.getLogger("taskpg.worker")

PREFETCH_MULTIPLIER = 4  # default buffer: 4 jobs per slot, as Celery's worker_prefetch_multiplier
#: With the default (automatic) prefetch, very short jobs get a deeper buffer: enough to hold about this
#: much work per slot, up to AUTO_PREFETCH_MAX jobs. Each claim and each batch of outcomes costs one
#: statement whatever its size, so tiny jobs are cheaper in bigger batches; longer jobs keep 4 per slot.
BUFFERED_WORK_SECONDS = 0.02
AUTO_PREFETCH_MAX = 256
CAP_RECHECK = 0.05  # seconds between claims while a capped queue is full
TIME_LIMIT_POOLS = ("processes", "threads")
#: The fetch loop looks at least this often whether the worker's background loops are alive.
SUPERVISE_EVERY = 1.0


@dataclass
class WorkerSettings:
    """Knobs of one worker process (the ``taskpg worker`` options)."""

    queues: list[str] = field(default_factory=lambda: ["default"])
    concurrency: int = 10
    pool: str = "threads"
    prefetch: int | None = None  # extra jobs buffered beyond `concurrency`; None = automatic (see prefetch_for)
    max_claim: int = 200  # most jobs claimed by one query
    poll_interval: float = 2.0  # safety net when no NOTIFY arrives
    stage_interval: float = 0.5  # how often due scheduled jobs are promoted
    heartbeat_interval: float = 5.0
    rescue_after: float = 30.0  # a worker silent this long has its jobs rescued
    grace: float = 30.0  # seconds running jobs get to finish at shutdown
    modules: list[str] = field(default_factory=list)  # imported by the processes pool's children
    flush_buffer: bool = True  # run the Redis buffer flusher in this worker when the app has redis_url
    #: Where the threads and async pools run tasks that declare a time_limit: "processes" (a child
    #: process, killed at the limit, so the limit is exact; needs ``modules``) or "threads" (in the pool,
    #: where a hard limit fails the attempt but cannot stop the function).
    time_limit_pool: str = "processes"
    #: Serve Prometheus metrics of this worker on this port (``GET /metrics``); None: no metrics.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Publish job events (started, and each written outcome) for ``app.events()``; also on when the
    #: app has ``events=True`` (``taskpg worker -E``).
    events: bool = False

    def __post_init__(self) -> None:
        self.queues = [validate_queue_name(q) for q in self.queues]
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rescue_after <= self.heartbeat_interval * 2:
            raise ValueError("rescue_after must be more than twice the heartbeat interval")
        if self.time_limit_pool not in TIME_LIMIT_POOLS:
            raise ValueError(f"time_limit_pool={self.time_limit_pool!r}: expected one of {TIME_LIMIT_POOLS}")

    def prefetch_for(self, mean_run_time: float | None) -> int:
        """Jobs buffered beyond ``concurrency``: the ``prefetch`` setting, or automatically 4 per slot
        (Celery's default), deepened for jobs that take well under ``BUFFERED_WORK_SECONDS`` to about
        that much work per slot, never more than ``AUTO_PREFETCH_MAX``."""
        if self.prefetch is not None:
            return self.prefetch
        default = PREFETCH_MULTIPLIER * self.concurrency
        if not mean_run_time:
            return default
        wanted = math.ceil(self.concurrency * BUFFERED_WORK_SECONDS / mean_run_time)
        return max(default, min(wanted, AUTO_PREFETCH_MAX))

    def capacity(self, mean_run_time: float | None = None) -> int:
        """Most jobs held at once: running plus buffered."""
        return self.concurrency + self.prefetch_for(mean_run_time)

    def refill_at(self, mean_run_time: float | None = None) -> int:
        """Claim again once this many places are free: half the prefetch buffer (one slot when
        prefetch=0), so the runners still have buffered jobs while the next claim is on its way."""
        return max(1, self.prefetch_for(mean_run_time) // 2)


class Worker:
    """Runs jobs of the given queues until stopped. ``run()`` blocks and returns an exit code."""

    def __init__(self, app: AppParts, settings: WorkerSettings | None = None, **options: Any) -> None:
        self.settings = settings or WorkerSettings(**options)
        self.store = app.store
        self.tasks = app.tasks
        self.queues = app.queues  # queue limits: concurrency caps and rate limits
        self.id = f"{uuid.uuid4()}"
        self._stop = threading.Event()  # stop claiming
        self._abort = threading.Event()  # stop waiting for running jobs
        self._wake = threading.Event()
        self._wanted = True  # a claim may find work
        self._at_cap = False  # the last claim was held back by a queue's concurrency cap
        self._held: dict[str, str] = {}  # job id -> lease, claimed and not yet written back
        self._held_lock = threading.Lock()
        self._claims = self.store.dedicated("claims", for_claims=True)
        self.limiter = RateLimiter.build(self.store, self.queues, app.redis_url)
        self.executor = Executor(self.tasks, self.id, app.max_payload_bytes)
        self.flusher = Flusher(app) if self.settings.flush_buffer and app.redis_url is not None else None
        self.completer: Completer | None = None
        self.pool: Pool | None = None
        self.started = threading.Event()
        self.listener = Listener(self.store, self.settings.queues, self._wake_for_work, self._stop)
        self.metrics = None if self.settings.metrics_port is None else WorkerMetrics(self._running, self._prefetched)
        self._metrics_server: ThreadingHTTPServer | None = None
        wants_events = self.settings.events or getattr(app, "send_events", False)
        self.publisher = EventPublisher(self.store) if wants_events else None
        self.stager = Stager(self.store, self.settings.stage_interval, self._wake_for_work, self._stop)
        self.start_log = StartLog(self.store, self.id, stop_event=self._stop)  # what rescue charges an attempt to
        self.broken: list[str] = []  # background loops that died or got stuck: the worker stops, exit code 1

    @property
    def listening(self) -> threading.Event:
        """Set while the LISTEN connection is up (cleared during a reconnect)."""
        return self.listener.connected

    @contextlib.contextmanager
    def in_background(self, timeout: float = 30.0) -> Iterator[Worker]:
        """Run the worker in a thread for the ``with`` block, then stop it gracefully.

        For scripts, tests and notebooks; a deployment runs ``taskpg worker`` instead.
        """
        thread = threading.Thread(target=self.run, name="taskpg-worker", daemon=True)
        thread.start()
        if not self.started.wait(timeout):
            raise TimeoutError("the worker did not start")
        try:
            yield self
        finally:
            self.stop()
            thread.join(timeout)

    # -- control ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """First call: graceful stop. Second call: abort (running jobs are put back)."""
        if self._stop.is_set():
            logger.warning("second stop request: aborting running jobs")
            self._abort.set()
        else:
            logger.info("stopping: no new jobs; waiting up to %s s for running ones", self.settings.grace)
            self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s", signal.Signals(signum).name)
        self.stop()

    def _room(self) -> int:
        """Places free for claiming. Back-pressure: once more outcomes wait to be written than the
        worker can hold, the excess takes places too, so slow writes slow claiming down."""
        assert self.pool is not None and self.completer is not None
        capacity = self.settings.capacity(self.pool.mean_run_time)
        unwritten_excess = max(0, self.completer.pending() - capacity)
        return capacity - self.pool.in_flight() - unwritten_excess

    def _refill_at(self) -> int:
        assert self.pool is not None
        return self.settings.refill_at(self.pool.mean_run_time)

    def _on_free(self) -> None:
        """A job left the pool or an outcome was written: wake the fetch loop once a claim fits."""
        if not self._wake.is_set() and self._room() >= self._refill_at():
            self._wake.set()  # Event.set takes a lock and notifies: only when the loop may sleep

    def _wake_for_work(self) -> None:
        self._wanted = True
        self._wake.set()

    # -- main loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Work until stopped; returns 0 after a clean stop, 1 if running jobs had to be put back."""
        s = self.settings
        self.store.check_schema()
        if self.metrics is not None and s.metrics_port is not None:  # first: a port in use stops nothing started
            self._metrics_server = serve_metrics(self.metrics.render, s.metrics_host, s.metrics_port)
            logger.info("worker %s serves metrics at http://%s:%d/metrics", self.id, s.metrics_host, s.metrics_port)
        signals.worker_init.send(sender=self)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.completer = Completer(self.store, self.tasks, on_written=self._forget, on_applied=self._tell_outcomes)
        setup = PoolSetup(
            self.executor,
            s.concurrency,
            self._on_outcome,
            self._on_free,
            self.limiter,
            tuple(s.modules),
            # A job that waited long enough to have been rescued during a pause is checked before it starts.
            lease_held=self.store.lease_held,
            stale_after=s.rescue_after / 2,
            on_dropped=self._drop,
            on_start=self._job_started,
            on_finished=None if self.metrics is None else self.metrics.job_finished,
            time_limits_in_children=self._time_limits_in_children(),
        )
        self.pool = make_pool(s.pool, setup)
        info = WorkerInfo(self.id, socket.gethostname(), os.getpid(), list(s.queues), s.concurrency)
        # The heartbeat has a stop of its own: it goes on until the last outcome is written, so that a
        # worker finishing its jobs within --grace is not taken for dead and its jobs run twice.
        heartbeat = Heartbeat(self.store, self.tasks, info, s.heartbeat_interval, s.rescue_after, self._held_ids)
        loops = [self.listener, self.stager, self.start_log, *([self.flusher] if self.flusher else [])]
        self._supervised = [self.completer, heartbeat, *loops]
        for loop in self._supervised:
            loop.supervisor = self._loop_died
        heartbeat.start()
        for loop in loops:
            loop.start()
        if self.publisher is not None:
            self.publisher.start()
        logger.info(
            "worker %s ready: queues=%s concurrency=%d pool=%s", self.id, ",".join(s.queues), s.concurrency, s.pool
        )
        self.started.set()
        signals.worker_ready.send(sender=self)
        try:
            self._fetch_loop()
        finally:
            if self.flusher is not None:
                self.flusher.stop()
            code = self._shutdown()
            if self.publisher is not None:  # after the last outcome is written: it tells those too
                self.publisher.stop()
                self.publisher.join(5)
            heartbeat.stop()
            for loop in [*loops, heartbeat]:
                loop.join(5)
            heartbeat.unregister()
        return code

    def _time_limits_in_children(self) -> bool:
        """Whether tasks with a time_limit run in child processes (see WorkerSettings.time_limit_pool)."""
        s = self.settings
        if s.pool == "processes" or s.time_limit_pool != "processes":
            return False
        if s.modules:
            return True
        limited = sorted(t.name for t in self.tasks.values() if t.options.time_limit is not None)
        if limited:
            logger.warning(
                "tasks %s have a time_limit, but this worker knows no module to import in a child process "
                "(modules=, the -A module): their hard limit fails the attempt without stopping the function",
                ", ".join(limited),
            )
        return False

    # -- supervision -----------------------------------------------------------------------------

    def _loop_died(self, loop: Any) -> None:
        """A background loop ended on its own: stop claiming, hand back, exit non-zero."""
        if self._stop.is_set() and loop.error is None:
            return
        self._broken(loop.name, f"stopped: {loop.error!r}" if loop.error is not None else "its thread ended")

    def _broken(self, name: str, why: str) -> None:
        if name in self.broken:
            return
        self.broken.append(name)
        logger.error(
            "the worker's %s loop %s; the worker stops claiming, hands back its jobs and exits with code 1", name, why
        )
        if not self._stop.is_set():
            self.stop()

    def _supervise(self) -> None:
        """Loops that keep failing with errors no reconnect mends count as broken too."""
        now = time.monotonic()
        for loop in self._supervised:
            since = loop.failing_since
            if since is not None and now - since > self.settings.rescue_after:
                self._broken(loop.name, f"has failed for over {self.settings.rescue_after:g} s")

    def _fetch_loop(self) -> None:
        s = self.settings
        last_claim = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._supervise()
            assert self.pool is not None
            room = self._room()  # when outcome writes slow down, claiming slows down too
            # Refill in batches: wait until a batch worth of room is free (one slot when prefetch=0).
            if room >= self._refill_at() and (self._wanted or now - last_claim >= s.poll_interval):
                self._wanted = False  # a NOTIFY arriving during the claim sets it again
                asked = min(room, s.max_claim)
                jobs = self._claiming(functools.partial(self._claim, asked))
                last_claim = now
                if jobs:
                    self.pool.submit(jobs)
                if len(jobs) == asked:
                    self._wanted = True
                    continue
            if self._at_cap:  # room under a queue's cap comes back without a NOTIFY: look again soon
                self._wanted = True
                self._wake.wait(CAP_RECHECK)
            else:
                self._wake.wait(min(s.poll_interval, SUPERVISE_EVERY))
            self._wake.clear()

    def _claiming(self, work: Callable[[], list[ClaimedJob]]) -> list[ClaimedJob]:
        """A claim, retried across lost connections until it succeeds or the worker stops."""
        try:
            return reconnecting(work, "claiming jobs", self._claims.reset, self._stop)
        except Exception:
            if self._stop.is_set():
                return []
            raise

    def _claim(self, limit: int) -> list[ClaimedJob]:
        store = self.store.on(self._claims.conn)
        capped = [self.queues[q] for q in self.settings.queues if self._capped(q)]
        free = [q for q in self.settings.queues if not self._capped(q)]
        max_bytes = self.executor.max_payload_bytes
        jobs = store.claim(free, limit, self.id, max_bytes) if free else []
        self._at_cap = False
        for queue in capped:
            if len(jobs) < limit:
                assert queue.concurrency is not None
                claimed = store.claim_capped(queue.name, queue.concurrency, limit - len(jobs), self.id, max_bytes)
                jobs += claimed.jobs
                self._at_cap = self._at_cap or claimed.at_cap
        jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id))  # RETURNING keeps no order
        with self._held_lock:
            self._held.update((job.id, job.lease) for job in jobs)
        return jobs

    def _capped(self, queue: str) -> bool:
        options = self.queues.get(queue)
        return options is not None and options.concurrency is not None

    def _held_ids(self) -> list[str]:
        with self._held_lock:
            return list(self._held)

    def _on_outcome(self, outcome: Outcome) -> None:
        assert self.completer is not None
        self.start_log.jobs_finished([outcome.job.id])
        self.completer.add(outcome)

    def _tell_outcomes(self, applied: list[Outcome]) -> None:
        """The outcomes that changed their jobs are committed: their events can be told."""
        if self.publisher is not None:
            self.publisher.add(event for outcome in applied for event in events.of_outcome(outcome))

    def _job_started(self, job: ClaimedJob) -> None:
        self.start_log.job_started(job)
        if self.metrics is not None:
            self.metrics.job_started(job)
        if self.publisher is not None:
            self.publisher.add([events.started(job)])

    def _running(self) -> int:
        return 0 if self.pool is None else len(self.pool.running())

    def _prefetched(self) -> int:
        return 0 if self.pool is None else max(0, self.pool.in_flight() - self._running())

    def _drop(self, job: ClaimedJob) -> None:
        """A buffered job turned out to be rescued elsewhere: it is not this worker's any more."""
        with self._held_lock:
            self._held.pop(job.id, None)

    def _forget(self, written: list[Outcome]) -> None:
        """Outcomes are in the database: these jobs are no longer held by this worker."""
        soon = False
        with self._held_lock:
            for outcome in written:
                self._held.pop(outcome.job.id, None)
                soon = soon or (outcome.state is JobState.SCHEDULED and outcome.delay < self.settings.stage_interval)
        if soon:  # due before the stager's next round (a rate-limited start, a short retry): wake it
            self.stager.wake()
        self._on_free()

    # -- shutdown --------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        assert self.pool is not None and self.completer is not None
        unstarted = self.pool.take_unstarted()
        for job in unstarted:
            self._on_outcome(self.executor.handed_back(job))
        if unstarted:
            logger.warning("handed back %d claimed job(s) that had not started", len(unstarted))
        deadline = time.monotonic() + self.settings.grace
        while self.pool.in_flight() > 0 and time.monotonic() < deadline and not self._abort.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
        code = 0
        still_running = self.pool.running()
        if still_running:
            code = 1
            logger.warning("putting back %d job(s) still running at shutdown", len(still_running))
            for job in still_running:
                reason = "the worker stopped before the job finished"
                self._on_outcome(self.executor.failed(job, "WorkerShutdown", reason))
        # A writer that keeps failing is not waited for: what it holds is rescued once this worker is gone.
        self.completer.close(timeout=1.0 if self.completer.failing_since is not None else 30.0)
        if not self.completer.running:
            self._write_directly(self.completer.take_unwritten())
        unwritten = self.completer.pending()
        if unwritten:
            code = 1
            logger.error(
                "%d outcome(s) could not be written before exit; their jobs will be rescued after --rescue-after",
                unwritten,
            )
        if self.broken:
            code = 1
        self.pool.close()
        self._claims.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        logger.info("worker %s stopped", self.id)
        signals.worker_shutdown.send(sender=self)
        return code

    def _write_directly(self, outcomes: list[Outcome]) -> None:
        """Write outcomes the completer left (it died) on a pooled connection, trying for ``grace``."""
        if not outcomes:
            return
        try:
            reconnecting(
                lambda: write_outcomes(self.store, outcomes, self.tasks),
                "writing the outcomes the outcome writer left",
                reset=lambda: None,
                give_up_after=self.settings.grace,
            )
        except Exception as exc:
            logger.error("could not write %d outcome(s) at shutdown: %s", len(outcomes), exc)
            self.broken.append("shutdown")
            return
        self._forget(outcomes)


def make_pool(kind: str, setup: PoolSetup) -> Pool:
    """Build the pool named by ``--pool``."""
    pools: dict[str, Callable[[PoolSetup], Pool]] = {
        "threads": ThreadPool,
        "async": AsyncPool,
        "processes": ProcessPool,
    }
    if kind not in pools:
        raise ValueError(f"unknown pool {kind!r}: expected one of {', '.join(POOL_CHOICES)}")
    return pools[kind](setup)
