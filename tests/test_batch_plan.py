"""Plans of the batch statements, which must read each batch through an index.

A sequential scan would read the whole table once per batch, which makes
the walk quadratic in the number of runs.
"""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from migrations_support import batches, demo_data
from migrations_support.schema import workflow_runs
from migrations_support.settings import BackfillSettings
from migrations_support.walker import BatchWalker

DEMO_RUNS = 3000
BATCH_SIZE = BackfillSettings().batch_size
# The candidates are read from workflow_runs without an alias, while the key
# lookups read it as "holder" and the UPDATE as "workflow_runs_1". Either
# the candidate index or the primary key serves the range on id. A bitmap
# scan would not do there, because it returns the rows unordered and every
# row in the range would be sorted to find the first batch.
CANDIDATE_READ = re.compile(r"Index (?:Only )?Scan using \w+ on workflow_runs\s+\(")


@pytest.fixture
def demo_engine(alembic_cfg: Config, database_url: URL, engine: sa.Engine) -> sa.Engine:
    """Engine on a database at 041 with demo runs loaded and analyzed."""
    command.upgrade(alembic_cfg, "041_workflow_run_keys")
    conninfo = database_url.set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
        demo_data.load_runs(conn, DEMO_RUNS)
    return engine


def explain(
    connection: sa.Connection, statement: sa.Executable, params: dict[str, object]
) -> str:
    """Run EXPLAIN on ``statement`` as the walker sends it; return the plan."""

    def prefix_explain(*args: object) -> tuple[object, object]:
        sql, parameters = args[2], args[3]
        return f"EXPLAIN {sql}", parameters

    # The hook receives the final SQL text, including the constants that
    # SQLAlchemy renders only at execution time.
    sa.event.listen(connection, "before_cursor_execute", prefix_explain, retval=True)
    try:
        rows = connection.execute(statement, params).all()
    finally:
        sa.event.remove(connection, "before_cursor_execute", prefix_explain)
    connection.rollback()
    return "\n".join(str(row[0]) for row in rows)


def next_lower_id(connection: sa.Connection) -> uuid.UUID:
    """Return the id of the first run still without a key."""
    query = (
        sa.select(workflow_runs.c.id)
        .where(workflow_runs.c.run_key.is_(None))
        .order_by(workflow_runs.c.id)
        .limit(1)
    )
    run_id = connection.execute(query).scalar_one()
    connection.rollback()
    return uuid.UUID(str(run_id))


def batch_params(lower_id: uuid.UUID) -> dict[str, object]:
    """Return the walker's parameters for a batch from ``lower_id``."""
    return {
        "lower_id": lower_id,
        "batch_limit": BATCH_SIZE,
        "excluded_ids": [],
        "pending_workflow_ids": [],
        "pending_keys": [],
        "pending_run_ids": [],
    }


STATEMENTS = {
    "key": lambda: batches.key_batch_statement(batches.bound_inputs(), "suffix"),
    "preview": lambda: batches.preview_batch_statement(
        batches.bound_inputs(), "suffix", batches.bound_pending()
    ),
    "derive": lambda: batches.derive_batch_statement(batches.bound_inputs()),
}


@pytest.mark.parametrize("keyed_first", [0, DEMO_RUNS // 2])
@pytest.mark.parametrize("statement_name", list(STATEMENTS))
def test_batch_reads_runs_from_index(
    demo_engine: sa.Engine, statement_name: str, keyed_first: int
) -> None:
    with demo_engine.connect() as connection:
        if keyed_first:
            settings = BackfillSettings(max_updates=keyed_first)
            BatchWalker(connection, settings).run()
        params = batch_params(next_lower_id(connection))
        plan = explain(connection, STATEMENTS[statement_name](), params)

    assert "Seq Scan on workflow_runs" not in plan
    assert CANDIDATE_READ.search(plan), plan
