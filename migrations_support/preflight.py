"""Checks the command line makes before its first batch: revision 041's schema.

The command line reads the schema, never the Alembic version table, so it
works the same whether 041 was applied by ``alembic upgrade`` or stamped
on a database that already had the columns.
"""

from __future__ import annotations

import sqlalchemy as sa

from migrations_support.errors import BackfillError
from migrations_support.schema import KEY_INDEX_NAME, LEDGER_TABLE_NAME, workflow_runs

SCHEMA_REVISION = "041_workflow_run_keys"
UPGRADE_COMMAND = f"alembic upgrade {SCHEMA_REVISION}"

_INDEX_VALIDITY = sa.text(
    "SELECT i.indisvalid FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
)


def _missing_schema(what: str) -> BackfillError:
    return BackfillError(
        f"{what}: revision {SCHEMA_REVISION} is not applied; "
        f"run `{UPGRADE_COMMAND}` first"
    )


def check_key_schema(connection: sa.Connection) -> None:
    """Raise ``BackfillError`` unless revision 041's columns, ledger and index exist.

    An INVALID index (a concurrent build that was interrupted) counts as
    missing: upgrading to 041 again rebuilds it.
    """
    with connection.begin():
        inspector = sa.inspect(connection)
        if not inspector.has_table(workflow_runs.name):
            raise _missing_schema(f"table {workflow_runs.name} not found")
        columns = {column["name"] for column in inspector.get_columns("workflow_runs")}
        for name in ("run_key", "run_key_normalized"):
            if name not in columns:
                raise _missing_schema(f"{workflow_runs.name} has no {name} column")
        if not inspector.has_table(LEDGER_TABLE_NAME):
            raise _missing_schema(f"ledger table {LEDGER_TABLE_NAME} not found")
        index_valid = connection.execute(
            _INDEX_VALIDITY, {"name": KEY_INDEX_NAME}
        ).scalar()
    if index_valid is None:
        raise _missing_schema(f"index {KEY_INDEX_NAME} not found")
    if not index_valid:
        raise _missing_schema(
            f"index {KEY_INDEX_NAME} is INVALID (an interrupted concurrent build)"
        )


def check_writable(connection: sa.Connection) -> None:
    """Raise ``BackfillError`` when the session cannot write, as on a replica.

    A hot standby, or a role or database with default_transaction_read_only
    on, rejects the first batch anyway; this check names the cause first.
    """
    with connection.begin():
        in_recovery, read_only = connection.execute(
            sa.select(
                sa.func.pg_is_in_recovery(),
                sa.func.current_setting("transaction_read_only"),
            )
        ).one()
    if in_recovery or read_only == "on":
        cause = "a hot standby" if in_recovery else "transaction_read_only is on"
        raise BackfillError(
            f"the database is read-only ({cause}): a run that writes keys must "
            "connect to the primary; only --dry-run runs on a replica"
        )
