"""``taskpg beat``: enqueue periodic jobs, exactly one per tick, however many beats run.

Correctness comes from the database: claiming a tick inserts (schedule, tick) into
``periodic_ticks``, whose primary key lets exactly one claimant in, and the tick's job is inserted
in the same transaction. Leadership (a session advisory lock) only spares the followers the work:
if two beats both believed they led, the key would still stop a double tick. A leader that dies
(even SIGKILL) ends its session, which frees the lock; a follower takes over within
``interval`` seconds.

Beat also prunes finished jobs (``app.retention``) and runs the Redis buffer flusher when the app
has one.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg

from .broker import connect
from .enqueue import insert_job
from .periodic import Schedule
from .reconnect import CONNECTION_ERRORS
from .retention import prune, vacuum_unless_autovacuum

if TYPE_CHECKING:
    from .app import TaskPG

logger = logging.getLogger("taskpg.beat")

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Fired:
    schedule: str
    tick: dt.datetime
    job_id: str


class Beat:
    """The scheduler loop. ``tick(now)`` does one round and can be driven by a test clock."""

    def __init__(
        self,
        app: TaskPG,
        *,
        clock: Clock = utc_now,
        interval: float = 0.25,
        leader_election: bool = True,
        prune_every: float = 60.0,
        flush_buffer: bool = True,
    ) -> None:
        self.app = app
        self.clock = clock
        self.interval = interval
        self.leader_election = leader_election
        self.prune_every = prune_every
        self.flush_buffer = flush_buffer
        self.schedules = {s.name: s for s in app.schedules()}
        for schedule in self.schedules.values():
            app.tasks[schedule.task]  # an unknown task fails now (NotRegistered), not at the first tick
        self.is_leader = False
        self.started = threading.Event()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._last: dict[str, dt.datetime] = {}  # newest tick handled, per schedule
        self._next: dict[str, dt.datetime] = {}  # when each schedule is next due

    # -- one round ---------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.app.db.dsn)
            self.is_leader = False
            self._last.clear()
            self._next.clear()
        return self._conn

    def lead(self) -> bool:
        """Try to become (or stay) the leader; True while this beat holds the lock."""
        if not self.leader_election:
            return True
        if not self.is_leader:
            key = f"taskpg:{self.app.schema}:beat"
            row = self._connection().execute(self.app.db.queries.try_beat_leader, {"key": key}).fetchone()
            self.is_leader = bool(row and row[0])
            if self.is_leader:
                logger.warning("beat %s is now the leader", id(self))
        return self.is_leader

    def _load_last(self, now: dt.datetime) -> None:
        """The newest handled tick of each schedule; a schedule seen for the first time starts now."""
        q = self.app.db.queries
        conn = self._connection()
        missing = [name for name in self.schedules if name not in self._last]
        if not missing:
            return
        for name, last_tick, _ in conn.execute(q.last_ticks, {"schedules": missing}).fetchall():
            self._last[name] = last_tick
        for name in missing:
            if name not in self._last:
                conn.execute(q.claim_tick, {"schedule": name, "tick": now, "job_id": None})
                self._last[name] = now

    def tick(self, now: dt.datetime | None = None) -> list[Fired]:
        """Fire every due tick of every schedule at ``now``; returns the ticks this beat fired."""
        now = now or self.clock()
        self.app.db.check_schema()
        self._load_last(now)
        fired: list[Fired] = []
        for schedule in self.schedules.values():
            upcoming = self._next.get(schedule.name)
            if upcoming is not None and now < upcoming:
                continue  # nothing due yet: skip the cron arithmetic
            for tick in schedule.due(self._last[schedule.name], now):
                job_id = self._fire(schedule, tick)
                if job_id is not None:
                    fired.append(Fired(schedule.name, tick, job_id))
                self._last[schedule.name] = max(self._last[schedule.name], tick)
            self._next[schedule.name] = schedule.next_after(max(now, self._last[schedule.name]))
        return fired

    def _fire(self, schedule: Schedule, tick: dt.datetime) -> str | None:
        task = self.app.tasks[schedule.task]
        job, guard = task._prepare(schedule.args, schedule.kwargs, None, None, None, None)
        conn = self._connection()
        with conn.transaction():
            claimed = conn.execute(
                self.app.db.queries.claim_tick, {"schedule": schedule.name, "tick": tick, "job_id": job.id}
            ).fetchone()
            if claimed is None:
                return None  # another beat fired this tick
            holder = insert_job(self.app.db, job, conn, guard)
            if holder != job.id:  # a unique twin stands for this tick, or a throttle turned it away
                conn.execute(
                    self.app.db.queries.set_tick_job, {"schedule": schedule.name, "tick": tick, "job_id": holder}
                )
                return holder
        logger.info("fired %s for tick %s as job %s", schedule.name, tick.isoformat(), job.id)
        return job.id

    def next_tick_in(self, now: dt.datetime) -> float:
        """Seconds until the soonest upcoming tick of any schedule."""
        if not self.schedules:
            return self.interval
        soonest = min(s.next_after(now) for s in self.schedules.values())
        return max(0.0, (soonest - now).total_seconds())

    # -- the loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def run(self) -> int:
        """Schedule until stopped (SIGTERM/SIGINT when run in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        if self.flush_buffer and self.app.redis_url is not None:
            from .flusher import start_background

            start_background(self.app, self._stop)
        chores = threading.Thread(target=self._maintain, name="taskpg-maintenance", daemon=True)
        chores.start()
        logger.info("beat ready with %d schedule(s)", len(self.schedules))
        self.started.set()
        while not self._stop.is_set():
            try:
                if self.lead():
                    self.tick()
            except CONNECTION_ERRORS as exc:
                logger.warning("beat lost the database (%s); reconnecting", exc)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                self.is_leader = False
                self._stop.wait(1.0)
                continue
            self._stop.wait(min(self.interval, self.next_tick_in(self.clock()) + 0.001))
        if self._conn is not None:
            self._conn.close()  # ends the session: the lock passes to another beat
        return 0

    def _maintain(self) -> None:
        """The leader's chores, every ``prune_every`` seconds, in their own thread (a long prune or
        VACUUM never delays a tick): prune by retention, then vacuum where autovacuum does not."""
        wait = min(self.prune_every, 5.0)  # the first round soon after start, once a leader is elected
        while not self._stop.wait(wait):
            wait = self.prune_every
            if not self.is_leader:
                continue
            try:
                self.maintain()
            except Exception:  # the database away, say: the next round tries again
                logger.exception("maintenance failed; trying again in %s s", self.prune_every)

    def maintain(self) -> int:
        """One round of chores: prune finished jobs, VACUUM (ANALYZE) the jobs table if autovacuum is
        off. Returns how many jobs were pruned."""
        deleted = prune(self.app.db, self.app.retention)
        if deleted:
            logger.info("pruned %d finished job(s)", deleted)
        if vacuum_unless_autovacuum(self.app.db):
            logger.info("vacuumed the jobs table (autovacuum does not look after it)")
        return deleted


def describe_schedules(app: TaskPG, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Each schedule with its last fired tick and its next tick (for ``taskpg beat --list``)."""
    now = now or utc_now()
    schedules = app.schedules()
    last: dict[str, dt.datetime | None] = {}
    if schedules:
        with app.db.connection() as conn:
            rows = conn.execute(app.db.queries.last_ticks, {"schedules": [s.name for s in schedules]}).fetchall()
        last = {name: fired for name, _, fired in rows}
    return [
        {
            "name": s.name,
            "task": s.task,
            "when": s.describe(),
            "catch_up": s.catch_up,
            "last": last.get(s.name),
            "next": s.next_after(now),
        }
        for s in schedules
    ]
