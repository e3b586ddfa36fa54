"""A task module for the beat subprocess tests: a per-second schedule that catches up every tick."""

from __future__ import annotations

import os

from taskpg import TaskPG

app = TaskPG(os.environ.get("TASKPG_DSN"), schema=os.environ.get("TASKPG_SCHEMA"))


@app.task(name="beat.every_second", every=1, catch_up="all")
def every_second() -> None:
    return None
