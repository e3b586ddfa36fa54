"""Pruning finished jobs: by age per state (and optionally by count), with per-queue overrides.

Defaults: succeeded and cancelled jobs are kept 24 hours, dead jobs 7 days (long enough to look
at them and retry them). Beat runs the pruning; nothing else deletes jobs.

Where autovacuum cannot look after the jobs table (off on the server, or disabled on the table),
beat's chore also vacuums and analyzes it: without that, the space of pruned and finished rows is
never reused and the planner never gets statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .job import JobState

if TYPE_CHECKING:
    from .store import Store

HOUR = 3600.0
DAY = 24 * HOUR
BATCH = 10_000
#: How long fired periodic ticks are kept (the newest of each schedule always stays).
TICKS_KEPT = 7 * DAY
PRUNED_STATES = (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True)
class Retention:
    """How long finished jobs of each state are kept; ``max_count`` caps each state per queue."""

    succeeded: float = DAY
    dead: float = 7 * DAY
    cancelled: float = DAY
    max_count: int | None = None

    def __post_init__(self) -> None:
        for state in PRUNED_STATES:
            if self.age(state) < 0:
                raise ValueError(f"retention {state} must be >= 0 seconds")
        if self.max_count is not None and self.max_count < 0:
            raise ValueError("retention max_count must be >= 0")

    def age(self, state: JobState) -> float:
        """Seconds a finished job in ``state`` is kept."""
        age: float = getattr(self, state.value)
        return age


def prune(store: Store, rules: dict[str | None, Retention]) -> int:
    """Apply the rules (key None = every queue without its own rule); returns jobs deleted."""
    overridden = [queue for queue in rules if queue is not None]
    deleted = 0

    for queue, rule in rules.items():
        others = [] if queue is not None else overridden
        for state in PRUNED_STATES:
            while True:
                count = store.prune_by_age(state, rule.age(state), queue, others, BATCH)
                deleted += count
                if count < BATCH:
                    break
            while rule.max_count is not None:
                count = store.prune_by_count(state, rule.max_count, queue, others, BATCH)
                deleted += count
                if count < BATCH:
                    break
    store.prune_ticks(TICKS_KEPT)
    store.prune_limits()
    return deleted


def vacuum_unless_autovacuum(store: Store) -> bool:
    """``VACUUM (ANALYZE)`` the jobs table when autovacuum does not; True when it ran."""
    if store.autovacuum_active():
        return False
    store.vacuum_jobs()
    return True
