"""Entry points of revision 042: the backfill and its revert.

``upgrade`` walks the candidates with ``BatchWalker``, prints the counters
and decides whether 042 may be stamped: a dry run never is, and neither is
a run that stopped at its cap with candidates left. ``downgrade`` reverts
the keys recorded in the ledger, in batches.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext

from migrations_support import batches, offline
from migrations_support.errors import BackfillError
from migrations_support.metrics import render, write_metrics_file
from migrations_support.output import candidate_line
from migrations_support.settings import BackfillSettings, load_settings
from migrations_support.walker import BatchSink, BatchWalker, WalkResult

log = logging.getLogger(__name__)

SETTINGS_ATTRIBUTE = "backfill_settings"
REVISION = "042_backfill_workflow_run_keys"
CATCH_UP_COMMAND = "workflow-run-key-backfill"
FAILED_IDS_SHOWN = 10


def settings_for(context: MigrationContext) -> BackfillSettings:
    """Return the settings env.py validated, or read them now."""
    config = context.config
    if config is not None and SETTINGS_ATTRIBUTE in config.attributes:
        settings: BackfillSettings = config.attributes[SETTINGS_ATTRIBUTE]
        return settings
    return load_settings(os.environ)


def run_walk(
    connection: sa.Connection,
    settings: BackfillSettings,
    out: TextIO,
    on_batch: BatchSink | None = None,
) -> WalkResult:
    """Walk the candidates, print dry-run lines and the counters to ``out``.

    ``on_batch`` is passed to ``BatchWalker``: it receives each batch's
    counts in place of the walker's batch log line.
    """

    def print_candidate(row: sa.Row) -> None:
        out.write(candidate_line(row) + "\n")

    log.info("backfill starting: %s", settings.describe())
    sink = print_candidate if settings.dry_run else None
    walker = BatchWalker(connection, settings, on_candidate=sink, on_batch=on_batch)
    result = walker.run()
    out.write(render(result.counters, settings.dry_run))
    out.flush()
    if settings.metrics_file is not None:
        write_metrics_file(settings.metrics_file, result.counters, settings.dry_run)
    if result.remaining_ids and not result.stopped_at_cap:
        shown = ", ".join(str(run_id) for run_id in result.remaining_ids)
        log.warning(
            "%d runs inserted without a key during the walk still lack one "
            "(first: %s); run `%s` to key them",
            result.remaining,
            shown,
            CATCH_UP_COMMAND,
        )
    if result.failed_ids:
        shown = ", ".join(
            str(run_id) for run_id in result.failed_ids[:FAILED_IDS_SHOWN]
        )
        log.warning(
            "%d runs could not be keyed after retries (first: %s); run `%s` to key "
            "them once whatever held them is gone",
            len(result.failed_ids),
            shown,
            CATCH_UP_COMMAND,
        )
    return result


def check_stamp_allowed(
    result: WalkResult, settings: BackfillSettings, continue_command: str
) -> None:
    """Raise ``BackfillError`` when the backfill must not count as done."""
    if settings.dry_run:
        raise BackfillError(
            f"dry run: {result.counters.updated} keys would be written and "
            f"{result.counters.skipped} runs skipped; nothing was written, so "
            f"{REVISION} is not stamped"
        )
    if result.stopped_at_cap and result.remaining > 0:
        raise BackfillError(
            f"stopped at max_updates={settings.max_updates}: {result.remaining} runs "
            f"still lack a key; run `{continue_command}` again to continue"
        )


def upgrade(context: MigrationContext) -> None:
    """Run the backfill as revision 042."""
    settings = settings_for(context)
    if context.as_sql:
        offline.emit_backfill(context, settings)
        return
    # The backfill commits batch by batch, so it must not run inside the
    # migration's transaction; autocommit_block commits what came before.
    with context.autocommit_block():
        assert context.bind is not None
        with context.bind.engine.connect() as connection:
            result = run_walk(connection, settings, sys.stdout)
    check_stamp_allowed(result, settings, "alembic upgrade head")


def revert(connection: sa.Connection, settings: BackfillSettings) -> tuple[int, int]:
    """Revert the ledger's keys in batches.

    Returns the count of ledger rows removed and of runs set back to NULL.
    """
    statement = batches.revert_batch_statement(
        sa.bindparam("batch_limit", type_=sa.Integer)
    )
    removed_total = reverted_total = 0
    while True:
        started = time.monotonic()
        with connection.begin():
            connection.execute(
                sa.select(
                    sa.func.set_config(
                        "lock_timeout", f"{settings.lock_timeout_ms}ms", True
                    ),
                    sa.func.set_config(
                        "statement_timeout", f"{settings.statement_timeout_ms}ms", True
                    ),
                )
            )
            row = connection.execute(
                statement, {"batch_limit": settings.batch_size}
            ).one()
        removed, reverted = int(row.removed), int(row.reverted)
        if removed == 0:
            break
        removed_total += removed
        reverted_total += reverted
        log.info(
            "revert batch: %d ledger rows removed, %d runs set back to NULL (%.0f ms)",
            removed,
            reverted,
            (time.monotonic() - started) * 1000,
        )
    log.info(
        "revert finished: %d ledger rows removed, %d runs set back to NULL; "
        "%d keyed runs kept keys the application wrote",
        removed_total,
        reverted_total,
        removed_total - reverted_total,
    )
    return removed_total, reverted_total


def downgrade(context: MigrationContext) -> None:
    """Revert revision 042 through the ledger."""
    settings = settings_for(context)
    if context.as_sql:
        offline.emit_revert(context, settings)
        return
    with context.autocommit_block():
        assert context.bind is not None
        with context.bind.engine.connect() as connection:
            revert(connection, settings)
