"""SQL for ``alembic upgrade --sql``: what the online steps do, as a script.

The script is for psql (``psql -v ON_ERROR_STOP=1 -f``), never inside one
transaction, because the index build and the batches commit on their own.
"""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext

from migrations_support.errors import BackfillError
from migrations_support.schema import KEY_INDEX_NAME
from migrations_support.settings import BackfillSettings


def refuse_if_runs_exist() -> str:
    """Return a DO block that stops the script while workflow_runs holds runs."""
    return (
        "DO $$\nBEGIN\n"
        "  IF EXISTS (SELECT 1 FROM workflow_runs) THEN\n"
        "    RAISE EXCEPTION 'workflow_runs holds runs: downgrading below "
        "040_workflow_runs would drop them, so it is allowed only on an empty table';\n"
        "  END IF;\nEND\n$$"
    )


def drop_invalid_index_sql() -> str:
    """Return psql input that drops the key index when it is INVALID.

    DROP INDEX CONCURRENTLY cannot run inside a DO block, so psql's
    ``\\gexec`` runs the statement the query returns, only when it returns one.
    psql rejects ``\\gexec;``, so the text must be written without the
    statement terminator that ``op.execute`` appends.
    """
    return (
        "SELECT format('DROP INDEX CONCURRENTLY %I.%I', n.nspname, c.relname)\n"
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid\n"
        "JOIN pg_namespace n ON n.oid = c.relnamespace\n"
        f"WHERE c.relname = '{KEY_INDEX_NAME}' AND n.nspname = current_schema()\n"
        "AND NOT i.indisvalid \\gexec"
    )


def emit_drop_invalid_index(context: MigrationContext) -> None:
    """Write the INVALID-index repair to the script, as psql input."""
    context.impl.static_output(drop_invalid_index_sql())


def emit_backfill(context: MigrationContext, settings: BackfillSettings) -> None:
    """Emit the batched backfill as a PL/pgSQL loop."""
    raise BackfillError("offline mode (--sql) does not support the backfill yet")


def emit_revert(context: MigrationContext, settings: BackfillSettings) -> None:
    """Emit the ledger-based revert as a PL/pgSQL loop."""
    raise BackfillError("offline mode (--sql) does not support the revert yet")
