"""Give every existing workflow run a key, in committed batches.

Knobs (RUN_KEY_BACKFILL_* variables or -x arguments) set dry run, batch
size, cap, conflict policy, timeouts and the metrics file; see README.md.

Revision ID: 042_backfill_workflow_run_keys
Revises: 041_workflow_run_keys
"""

from alembic import op

from migrations_support import backfill

revision = "042_backfill_workflow_run_keys"
down_revision = "041_workflow_run_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    backfill.upgrade(op.get_context())


def downgrade() -> None:
    backfill.downgrade(op.get_context())
