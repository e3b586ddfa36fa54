"""The stager: make scheduled jobs whose time has come available.

It runs when the next scheduled job is due (the promote statement says when that is), and at
least every ``interval`` seconds for jobs scheduled since. Every worker runs one; the statement
skips rows another stager holds (``FOR UPDATE SKIP LOCKED``), so several never wait on each other.
Promoted jobs wake their queues' workers by NOTIFY, and ``on_promoted`` tells this worker's fetch
loop at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .loops import BackgroundLoop

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from .store import Store

#: Most jobs promoted by one statement.
PROMOTE_BATCH = 10_000
#: The shortest wait between two rounds (due rows another stager holds are left to it meanwhile).
MIN_WAIT = 0.005


class Stager(BackgroundLoop):
    def __init__(
        self,
        store: Store,
        interval: float,
        on_promoted: Callable[[], None],
        stop_event: threading.Event | None = None,
    ) -> None:
        # The claim's planner setting: the promote walks jobs_scheduled_idx in run_at order too.
        super().__init__("stager", store, connection="stager", for_claims=True, stop_event=stop_event)
        self.interval = interval
        self.on_promoted = on_promoted

    def step(self) -> float:
        promoted = self.own.promote_due(PROMOTE_BATCH)
        if promoted.count:
            self.on_promoted()
            self.signals.emit("promoted")
        if promoted.count == PROMOTE_BATCH:
            return 0.0  # more may be due
        if promoted.next_due_in is None:
            return self.interval
        return min(self.interval, max(promoted.next_due_in, MIN_WAIT))
