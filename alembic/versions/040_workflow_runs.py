"""The workflow_runs table as it exists before run keys.

A database that already has the table is stamped at this revision
(``alembic stamp 040_workflow_runs``) and upgraded from there.

Revision ID: 040_workflow_runs
Revises:
"""

from alembic import op

from migrations_support import ddl

revision = "040_workflow_runs"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ddl.create_runs_table(op)


def downgrade() -> None:
    ddl.drop_runs_table(op, op.get_context())
