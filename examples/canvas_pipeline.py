"""An order pipeline as a canvas: a chain, a chord that gathers parallel work, and callbacks on failure.

For each order: reserve its items in parallel (a group), total them up once every reservation is done (the
chord's body, run exactly once), charge the total, then mail a receipt (a chain). An order whose card is
declined stops at the charge; its error callback records the failure. The whole pipeline of an order is written
in one transaction, and Postgres moves it forward as each step ends.

    TASKPG_DSN=postgresql://postgres@127.0.0.1:5432/test python examples/canvas_pipeline.py

With real workers: ``taskpg worker -A examples.canvas_pipeline``, then enqueue with ``pipeline(order).delay()``.
"""

from __future__ import annotations

import os
from typing import Any

from taskpg import TaskPG, Worker, chain, chord

app = TaskPG(schema=os.environ.get("TASKPG_SCHEMA", "taskpg_canvas"))
PRICES = {"book": 12, "pen": 2, "lamp": 30}


@app.task
def reserve(item: str, quantity: int) -> int:
    """Reserve stock for one line of the order; returns its price."""
    return PRICES[item] * quantity


@app.task
def total(prices: list[int]) -> int:
    """The chord's body: every line's price, in the order of the lines."""
    return sum(prices)


@app.task(max_retries=0)
def charge(amount: int, order: int) -> dict[str, Any]:
    if order == 13:
        raise ValueError(f"card declined for order {order}")
    return {"order": order, "charged": amount}


@app.task
def receipt(payment: dict[str, Any]) -> str:
    return f"receipt: order {payment['order']}, {payment['charged']} EUR"


@app.task
def record_failure(job_id: str, order: int) -> str:
    """link_error callback: gets the failed job's id first."""
    error = app.AsyncResult(job_id).result
    return f"order {order} failed: {error}"


def pipeline(order: int, lines: list[tuple[str, int]]) -> Any:
    """reserve every line in parallel | total | charge | receipt, with a callback if the charge fails."""
    reservations = chord([reserve.s(item, quantity) for item, quantity in lines], total.s())
    charging = charge.s(order).set(link_error=record_failure.s(order))
    return chain(reservations, charging, receipt.s())


def main() -> None:
    app.migrate()
    orders = {
        7: [("book", 2), ("pen", 3)],
        13: [("lamp", 1)],
    }
    handles = {order: pipeline(order, lines).delay() for order, lines in orders.items()}
    with Worker(app, concurrency=4).in_background():
        print(handles[7].get(timeout=30))
        try:
            handles[13].get(timeout=30)
        except ValueError as exc:
            print(f"order 13 stopped: {exc}")
        charged = handles[13].parent  # the charge step of order 13
        assert charged is not None
        (callback,) = charged.children
        print(callback.get(timeout=30))
    app.close()


if __name__ == "__main__":
    main()
