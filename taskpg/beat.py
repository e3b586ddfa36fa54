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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import signals
from .enqueue import insert_job
from .flusher import Flusher
from .loops import BackgroundLoop
from .retention import prune, vacuum_unless_autovacuum

if TYPE_CHECKING:
    from types import FrameType

    from .parts import AppParts
    from .periodic import Schedule
    from .retention import Retention
    from .store import Store

logger = logging.getLogger("taskpg.beat")

Clock = Callable[[], dt.datetime]
#: The first maintenance round comes this soon after start (once a leader is elected).
FIRST_CHORES_AFTER = 5.0


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Fired:
    schedule: str
    tick: dt.datetime
    job_id: str


class Beat(BackgroundLoop):
    """The scheduler loop. ``tick(now)`` does one round and can be driven by a test clock;
    ``run()`` schedules until stopped, in the calling thread."""

    def __init__(
        self,
        app: AppParts,
        *,
        clock: Clock = utc_now,
        interval: float = 0.25,
        leader_election: bool = True,
        prune_every: float = 60.0,
        flush_buffer: bool = True,
    ) -> None:
        super().__init__("beat", app.store, connection="beat")
        self.tasks = app.tasks
        self.clock = clock
        self.interval = interval
        self.leader_election = leader_election
        self.leader_key = f"taskpg:{app.schema}:beat"
        self.schedules = {s.name: s for s in app.schedules()}
        for schedule in self.schedules.values():
            app.tasks[schedule.task]  # an unknown task fails now (NotRegistered), not at the first tick
        self.is_leader = False
        self.chores = Maintenance(app.store, app.retention, prune_every, lambda: self.is_leader)
        self.flusher = Flusher(app) if flush_buffer and app.redis_url is not None else None
        self._last: dict[str, dt.datetime] = {}  # newest tick handled, per schedule
        self._next: dict[str, dt.datetime] = {}  # when each schedule is next due

    # -- one round ---------------------------------------------------------------------------------

    def on_connect(self) -> None:
        # A new session holds no lock, and what the old one knew may be stale.
        self.is_leader = False
        self._last.clear()
        self._next.clear()

    def lead(self) -> bool:
        """Try to become (or stay) the leader; True while this beat holds the lock."""
        if not self.leader_election:
            return True
        own = self.own  # first: a new connection ends leadership
        if not self.is_leader:
            self.is_leader = own.try_lead(self.leader_key)
            if self.is_leader:
                logger.warning("beat %s is now the leader", id(self))
        return self.is_leader

    def _load_last(self, now: dt.datetime) -> None:
        """The newest handled tick of each schedule; a schedule seen for the first time starts now."""
        missing = [name for name in self.schedules if name not in self._last]
        if not missing:
            return
        own = self.own
        for state in own.last_ticks(missing):
            self._last[state.schedule] = state.last_tick
        for name in missing:
            if name not in self._last:
                own.claim_tick(name, now, None)
                self._last[name] = now

    def tick(self, now: dt.datetime | None = None) -> list[Fired]:
        """Fire every due tick of every schedule at ``now``; returns the ticks this beat fired."""
        now = now or self.clock()
        self.store.check_schema()
        self.own  # noqa: B018 - open the connection first: a new one clears the tick caches
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
                    self.signals.emit("fired")
                self._last[schedule.name] = max(self._last[schedule.name], tick)
            self._next[schedule.name] = schedule.next_after(max(now, self._last[schedule.name]))
        return fired

    def _fire(self, schedule: Schedule, tick: dt.datetime) -> str | None:
        planned = self.tasks[schedule.task].build_job(schedule.args, schedule.kwargs)
        job = planned.job
        with self.own.transaction() as tx:
            if not tx.claim_tick(schedule.name, tick, job.id):
                return None  # another beat fired this tick
            holder = insert_job(tx, job, planned.guard)
            if holder != job.id:  # a unique twin stands for this tick, or a throttle turned it away
                tx.set_tick_job(schedule.name, tick, holder)
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

    def step(self) -> float:
        if self.lead():
            self.tick()
        return min(self.interval, self.next_tick_in(self.clock()) + 0.001)

    def on_failure(self, exc: Exception) -> None:
        if self.needs_reconnect(exc):
            self.is_leader = False  # the session, and the lock with it, is gone

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def run(self) -> int:
        """Schedule until stopped (SIGTERM/SIGINT when run in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        signals.beat_init.send(sender=self)
        helpers = [self.chores, *([self.flusher] if self.flusher else [])]
        for helper in helpers:
            helper.start()
        logger.info("beat ready with %d schedule(s)", len(self.schedules))
        try:
            self.run_here()  # closing the connection at the end passes the lock to another beat
        finally:
            for helper in helpers:
                helper.stop()
            for helper in helpers:
                helper.join(10)
        return 0

    def stop(self) -> None:
        super().stop()
        self.chores.stop()

    def maintain(self) -> int:
        """One round of chores now (see ``Maintenance.maintain``)."""
        return self.chores.maintain()


class Maintenance(BackgroundLoop):
    """The leader's chores, every ``every`` seconds, in their own thread (a long prune or VACUUM
    never delays a tick): prune by retention, then vacuum where autovacuum does not."""

    def __init__(
        self, store: Store, retention: dict[str | None, Retention], every: float, is_leader: Callable[[], bool]
    ) -> None:
        super().__init__("maintenance", store)
        self.retention = retention
        self.every = every
        self.is_leader = is_leader
        self._first = True

    def step(self) -> float:
        if self._first:  # soon after start, once a leader is elected
            self._first = False
            return min(self.every, FIRST_CHORES_AFTER)
        if self.is_leader():
            self.maintain()
        return self.every

    def maintain(self) -> int:
        """Prune finished jobs, VACUUM (ANALYZE) the jobs table if autovacuum is off. Returns how
        many jobs were pruned."""
        deleted = prune(self.store, self.retention)
        if deleted:
            logger.info("pruned %d finished job(s)", deleted)
        if vacuum_unless_autovacuum(self.store):
            logger.info("vacuumed the jobs table (autovacuum does not look after it)")
        self.signals.emit("maintained")
        return deleted


def describe_schedules(
    store: Store, schedules: Sequence[Schedule], now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Each schedule with its last fired tick and its next tick (for ``taskpg beat --list``)."""
    now = now or utc_now()
    last = {t.schedule: t.last_fired for t in store.last_ticks([s.name for s in schedules])} if schedules else {}
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
