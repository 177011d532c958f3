"""Add run_key, run_key_normalized, their partial unique index and the ledger.

Revision ID: 041_workflow_run_keys
Revises: 040_workflow_runs
"""

from alembic import op

from migrations_support import backfill, ddl

revision = "041_workflow_run_keys"
down_revision = "040_workflow_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    context = op.get_context()
    settings = backfill.settings_for(context)
    ddl.add_key_columns(op, context, settings)
    ddl.create_key_index(op, context, settings)


def downgrade() -> None:
    context = op.get_context()
    ddl.drop_key_schema(op, context, backfill.settings_for(context))
