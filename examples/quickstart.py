"""Quickstart: define tasks, enqueue them, run a worker, read the results.

Run it with a database (or none: taskpg then starts an embedded Postgres under ./.taskpg):

    TASKPG_DSN=postgresql://postgres@127.0.0.1:5432/test python examples/quickstart.py

In a real deployment the worker is its own process: ``taskpg worker -A examples.quickstart``.
"""

from __future__ import annotations

import os

from taskpg import TaskPG, Worker

app = TaskPG(schema=os.environ.get("TASKPG_SCHEMA", "taskpg_quickstart"))


@app.task(queue="math")
def add(a: int, b: int) -> int:
    return a + b


@app.task(queue="math", autoretry_for=(ZeroDivisionError,), max_retries=2, retry_backoff=0.1)
def divide(a: float, b: float) -> float:
    return a / b


def main() -> None:
    app.migrate()  # creates or upgrades taskpg's tables (same as `taskpg migrate`)

    single = add.delay(2, 3)
    many = add.delay_many([(n, n) for n in range(100)])  # one COPY
    failing = divide.delay(1, 0)

    with Worker(app, queues=["math"], concurrency=4, grace=5).in_background():
        print("2 + 3 =", single.get(timeout=30))
        print("sum of 100 doubled numbers =", sum(app.AsyncResult(i).get(timeout=30) for i in many if i))
        try:
            failing.get(timeout=30)
        except ZeroDivisionError as exc:
            print("divide(1, 0) failed after retries:", exc, "| status:", failing.status)
    app.close()


if __name__ == "__main__":
    main()
