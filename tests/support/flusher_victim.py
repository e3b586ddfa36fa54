"""A flusher process for the crash tests: it stops dead at one step and waits to be killed.

Environment: TASKPG_DSN, TASKPG_SCHEMA, TASKPG_REDIS_URL, VICTIM_STEP (moved | copying | committed).
"""

from __future__ import annotations

import os
import sys
import time

from taskpg import TaskPG
from taskpg.flusher import Flusher

app = TaskPG(os.environ["TASKPG_DSN"], schema=os.environ["TASKPG_SCHEMA"], redis_url=os.environ["TASKPG_REDIS_URL"])


@app.task(name="crash.item")
def item(n: int) -> None:
    return None


def stop_at(step: str) -> None:
    if step == os.environ["VICTIM_STEP"]:
        print(f"AT {step}", flush=True)
        time.sleep(600)  # the test kills us here


if __name__ == "__main__":
    Flusher(app, batch_size=int(os.environ.get("VICTIM_BATCH", "5000")), lock_ttl=1.0, on_step=stop_at).drain()
    sys.exit(3)  # never reached in the tests: it is killed first
