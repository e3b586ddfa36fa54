"""Pruning finished jobs: by age per state (and optionally by count), with per-queue overrides.

Defaults: succeeded and cancelled jobs are kept 24 hours, dead jobs 7 days (long enough to look
at them and retry them). Beat runs the pruning; nothing else deletes jobs.

Where autovacuum cannot look after the jobs table (off on the server, or disabled on the table),
beat's chore also vacuums and analyzes it: without that, the space of pruned and finished rows is
never reused and the planner never gets statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from .broker import Database

HOUR = 3600.0
DAY = 24 * HOUR
BATCH = 10_000


@dataclass(frozen=True)
class Retention:
    """How long finished jobs of each state are kept; ``max_count`` caps each state per queue."""

    succeeded: float = DAY
    dead: float = 7 * DAY
    cancelled: float = DAY
    max_count: int | None = None

    def __post_init__(self) -> None:
        for name in ("succeeded", "dead", "cancelled"):
            if getattr(self, name) < 0:
                raise ValueError(f"retention {name} must be >= 0 seconds")
        if self.max_count is not None and self.max_count < 0:
            raise ValueError("retention max_count must be >= 0")


def prune(db: Database, rules: dict[str | None, Retention]) -> int:
    """Apply the rules (key None = every queue without its own rule); returns jobs deleted."""
    overridden = [queue for queue in rules if queue is not None]
    deleted = 0
    with db.connection() as conn:
        for queue, rule in rules.items():
            others = [] if queue is not None else overridden
            for state in ("succeeded", "dead", "cancelled"):
                params = {"state": state, "queue": queue, "other_queues": others, "batch": BATCH}
                while True:
                    count = conn.execute(db.queries.prune_by_age, {**params, "age": getattr(rule, state)}).rowcount
                    deleted += count
                    if count < BATCH:
                        break
                while rule.max_count is not None:
                    count = conn.execute(db.queries.prune_by_count, {**params, "keep": rule.max_count}).rowcount
                    deleted += count
                    if count < BATCH:
                        break
        conn.execute(db.queries.prune_ticks, {"age": 7 * DAY})
        conn.execute(db.queries.prune_limits)
    return deleted


def autovacuum_active(db: Database) -> bool:
    """Whether autovacuum looks after the jobs table (server setting, statistics, table option)."""
    table = sql.Identifier(db.queries.schema, "jobs").as_string()
    with db.connection() as conn:
        row = conn.execute(db.queries.autovacuum_active, {"table": table}).fetchone()
    return bool(row and row[0])


def vacuum_unless_autovacuum(db: Database) -> bool:
    """``VACUUM (ANALYZE)`` the jobs table when autovacuum does not; True when it ran."""
    if autovacuum_active(db):
        return False
    with db.connection() as conn:  # autocommit: VACUUM cannot run inside a transaction
        conn.execute(db.queries.vacuum_jobs)
    return True
