"""A job enqueued in the caller's transaction exists if and only if that transaction commits."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, select
from sqlalchemy.orm import Session

from taskpg import ConfigurationError, TaskPG


@pytest.fixture
def orders(pg_dsn: str, app: TaskPG):  # type: ignore[no-untyped-def]
    engine = create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    metadata = MetaData(schema=app.schema)
    table = Table("orders", metadata, Column("id", Integer, primary_key=True), Column("item", Text))
    metadata.create_all(engine)
    yield engine, table
    engine.dispose()


def jobs_for(db: psycopg.Connection, schema: str, job_id: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".jobs WHERE id = %s', (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("commit", [True, False])
def test_sqlalchemy_session(app: TaskPG, orders, db: psycopg.Connection, commit: bool) -> None:  # type: ignore[no-untyped-def]
    engine, table = orders

    @app.task
    def ship(order_id: int) -> None:
        return None

    with Session(engine) as session:
        session.execute(table.insert().values(id=1, item="book"))
        handle = ship.apply_async(args=(1,), session=session)
        # Not visible outside the transaction before it commits.
        assert jobs_for(db, app.schema, handle.id) == 0
        if commit:
            session.commit()
        else:
            session.rollback()
    assert jobs_for(db, app.schema, handle.id) == (1 if commit else 0)
    with engine.connect() as conn:
        assert len(conn.execute(select(table)).all()) == (1 if commit else 0)


@pytest.mark.parametrize("commit", [True, False])
def test_sqlalchemy_connection_and_bulk(app: TaskPG, orders, db: psycopg.Connection, commit: bool) -> None:  # type: ignore[no-untyped-def]
    engine, _ = orders

    @app.task
    def ship(order_id: int) -> None:
        return None

    with engine.connect() as conn:
        one = ship.apply_async(args=(1,), session=conn)
        many = ship.delay_many([(2,), (3,)], session=conn)
        if commit:
            conn.commit()
        else:
            conn.rollback()
    expected = 1 if commit else 0
    assert [jobs_for(db, app.schema, i) for i in [one.id, *many]] == [expected] * 3


@pytest.mark.parametrize("commit", [True, False])
def test_psycopg_connection(app: TaskPG, pg_dsn: str, db: psycopg.Connection, commit: bool) -> None:
    @app.task
    def ship(order_id: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:
        handle = ship.apply_async(args=(1,), connection=conn)
        ids = ship.delay_many([(2,), (3,)], connection=conn)
        if commit:
            conn.commit()
        else:
            conn.rollback()
    expected = 1 if commit else 0
    assert [jobs_for(db, app.schema, i) for i in [handle.id, *ids]] == [expected] * 3


@pytest.mark.parametrize("first", ["delay_many", "throttled", "unique"])
def test_first_statement_of_a_fresh_transaction_does_not_commit_on_its_own(
    app: TaskPG, pg_dsn: str, db: psycopg.Connection, first: str
) -> None:
    @app.task(throttle_key="{n}", throttle="5/h")
    def throttled(n: int) -> None:
        return None

    @app.task(unique_key="{n}")
    def unique(n: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:  # nothing run on it yet: no transaction open
        if first == "delay_many":
            unique.delay_many([(1,), (2,)], connection=conn)
        elif first == "throttled":
            throttled.apply_async(args=(1,), connection=conn)
        else:
            unique.apply_async(args=(1,), connection=conn)
        conn.rollback()
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".jobs').fetchone() == (0,)
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".throttle_windows').fetchone() == (0,)


def test_wrong_connection_types_are_refused(app: TaskPG) -> None:
    @app.task
    def ship() -> None:
        return None

    with pytest.raises(ConfigurationError, match="psycopg 3 connection"):
        ship.apply_async(connection=object())
    with pytest.raises(ConfigurationError, match=r"postgresql\+psycopg"):
        ship.apply_async(session=object())
