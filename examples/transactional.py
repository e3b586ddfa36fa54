"""Transactional enqueue: a job exists if and only if the transaction that wrote it commits.

Run it against a Postgres you can write to (no worker is needed):

    TASKPG_DSN=postgresql://postgres@127.0.0.1:5432/test python examples/transactional.py

TASKPG_DSN must be a URL (``postgresql://...``); TASKPG_SCHEMA picks the Postgres schema (default
``taskpg_example``). The program migrates taskpg's tables into that schema, creates an ``orders`` table next to
them, and then, in one SQLAlchemy Session transaction each:

1. inserts order 1, enqueues ``ship_order(1)`` with ``session=``, and commits;
2. inserts order 2, enqueues ``ship_order(2)`` with ``session=``, and rolls back.

It prints how many orders and jobs each transaction left behind (1 and 1, then 0 and 0), then drops the
``orders`` table. The committed job stays in the queue until a worker for the ``shipping`` queue runs it.
"""

from __future__ import annotations

import os

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    TableClause,
    Text,
    Uuid,
    column,
    create_engine,
    func,
    select,
    table,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from taskpg import TaskPG

DSN = os.environ.get("TASKPG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = os.environ.get("TASKPG_SCHEMA", "taskpg_example")

app = TaskPG(DSN, schema=SCHEMA)


@app.task(name="shop.ship_order", queue="shipping")
def ship_order(order_id: int) -> None:
    print(f"shipping order {order_id}")


metadata = MetaData(schema=SCHEMA)
orders = Table("orders", metadata, Column("id", Integer, primary_key=True), Column("item", Text, nullable=False))
# taskpg's jobs table, for counting rows with plain SQL.
jobs = table("jobs", column("id", Uuid(as_uuid=False)), schema=SCHEMA)


def place_order(engine: Engine, order_id: int, item: str, *, commit: bool) -> str:
    """Insert an order and enqueue its shipping job in one transaction; return the job id."""
    with Session(engine) as session:
        session.execute(orders.insert().values(id=order_id, item=item))
        handle = ship_order.apply_async(args=(order_id,), session=session)
        if commit:
            session.commit()
        else:
            session.rollback()
    return handle.id


def count(engine: Engine, tbl: TableClause, row_id: object) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tbl).where(tbl.c.id == row_id)).scalar_one()


def main() -> None:
    app.migrate()  # creates the schema and taskpg's tables (what `taskpg migrate` does)
    # Transactional enqueue needs SQLAlchemy on psycopg 3: postgresql+psycopg://
    engine = create_engine(make_url(DSN).set(drivername="postgresql+psycopg"))
    metadata.create_all(engine)
    try:
        job_id = place_order(engine, 1, "book", commit=True)
        print(f"committed: {count(engine, orders, 1)} order(s), {count(engine, jobs, job_id)} job(s)")
        job_id = place_order(engine, 2, "lamp", commit=False)
        print(f"rolled back: {count(engine, orders, 2)} order(s), {count(engine, jobs, job_id)} job(s)")
    finally:
        metadata.drop_all(engine)
        engine.dispose()
        app.close()


if __name__ == "__main__":
    main()
