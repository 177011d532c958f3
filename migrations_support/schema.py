"""Tables, index and DDL steps of revisions 040 and 041."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

ACTIVE_STATUSES = ("pending", "queued", "running", "waiting")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "timed_out")
KEY_INDEX_NAME = "workflow_runs_active_run_key_uniq"
# A partial index of the runs still without a key. The walker reads its
# batches from it, so each batch is an index range scan however many runs
# are keyed already, and it shrinks to nothing as the backfill finishes.
CANDIDATE_INDEX_NAME = "workflow_runs_run_key_null_idx"
LEDGER_TABLE_NAME = "workflow_run_key_backfill_ledger"

metadata = sa.MetaData()


def runs_columns_040() -> list[sa.Column[object]]:
    """Return new Column objects for workflow_runs as revision 040 creates it."""
    return [
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("workflow_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Text),
        sa.Column("trigger", postgresql.JSONB),
        sa.Column("event_id", sa.Text),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
    ]


def key_columns() -> list[sa.Column[object]]:
    """Return new Column objects for the two columns revision 041 adds."""
    return [sa.Column("run_key", sa.Text), sa.Column("run_key_normalized", sa.Text)]


def ledger_columns() -> list[sa.Column[object]]:
    """Return new Column objects for the backfill ledger."""
    return [
        sa.Column("run_id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("run_key", sa.Text, nullable=False),
        sa.Column("run_key_normalized", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column(
            "assigned_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
    ]


# The table as revision 041 leaves it, for building statements.
workflow_runs = sa.Table("workflow_runs", metadata, *runs_columns_040(), *key_columns())
ledger = sa.Table(LEDGER_TABLE_NAME, metadata, *ledger_columns())


def is_active(status: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    """Return the condition for an active run, as the partial index spells it."""
    return status.in_(ACTIVE_STATUSES)
