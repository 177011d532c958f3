"""DDL steps of revisions 040 and 041, built on Alembic's own operations.

Every step that takes a lock writers wait for runs under lock_timeout, so
a long transaction holding ``workflow_runs`` makes the step give up and
retry after a pause instead of queueing every writer behind it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import DBAPIError

from migrations_support import offline
from migrations_support.errors import BackfillError
from migrations_support.schema import (
    ACTIVE_STATUSES,
    CANDIDATE_INDEX_NAME,
    KEY_INDEX_NAME,
    LEDGER_TABLE_NAME,
    key_columns,
    ledger_columns,
    runs_columns_040,
)
from migrations_support.settings import BackfillSettings

log = logging.getLogger(__name__)

LOCK_ATTEMPTS = 5
LOCK_BACKOFF_S = 0.5
LOCK_NOT_AVAILABLE = "55P03"


def key_index_predicate() -> sa.TextClause:
    """Return the partial index's WHERE clause: active runs that have a key."""
    statuses = ", ".join(f"'{status}'" for status in ACTIVE_STATUSES)
    return sa.text(f"status IN ({statuses}) AND run_key_normalized IS NOT NULL")


def create_runs_table(op: Operations) -> None:
    """Create ``workflow_runs`` as it was before the run keys."""
    op.create_table("workflow_runs", *runs_columns_040())
    op.create_index(
        "workflow_runs_workflow_id_created_at_idx",
        "workflow_runs",
        ["workflow_id", "created_at"],
    )


def drop_runs_table(op: Operations, context: MigrationContext) -> None:
    """Drop ``workflow_runs``, but only while it contains no runs."""
    if context.as_sql:
        op.execute(offline.refuse_if_runs_exist())
    else:
        assert context.bind is not None
        count = context.bind.execute(
            sa.text("SELECT count(*) FROM workflow_runs")
        ).scalar()
        if count:
            raise BackfillError(
                f"workflow_runs contains {count} runs: downgrading below "
                "040_workflow_runs would drop them, so it is allowed only on an "
                "empty table"
            )
    op.drop_table("workflow_runs")


@contextlib.contextmanager
def _index_build_timeouts(bind: sa.Connection, timeout_ms: int) -> Iterator[None]:
    """Set lock_timeout and turn statement_timeout off, then restore both.

    lock_timeout bounds each wait of the build. statement_timeout is off
    because a concurrent build blocks no writer however long it runs, and a
    limit meant for application queries (a role default, say) would cancel
    it and leave an INVALID index behind.
    """
    names = ("lock_timeout", "statement_timeout")
    previous = {
        name: bind.execute(sa.select(sa.func.current_setting(name))).scalar_one()
        for name in names
    }
    bind.execute(
        sa.select(
            sa.func.set_config("lock_timeout", f"{timeout_ms}ms", False),
            sa.func.set_config("statement_timeout", "0", False),
        )
    )
    try:
        yield
    finally:
        bind.execute(
            sa.select(
                *(sa.func.set_config(name, previous[name], False) for name in names)
            )
        )


def _with_lock_retries(
    description: str, settings: BackfillSettings, step: Callable[[], None]
) -> None:
    """Run ``step``, retrying with growing pauses when its lock wait times out."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            step()
            return
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            if attempt == LOCK_ATTEMPTS:
                break
            pause_s = LOCK_BACKOFF_S * 2 ** (attempt - 1)
            log.warning(
                "%s: lock not granted within lock_timeout=%dms (attempt %d of %d); "
                "retrying in %.1f s",
                description,
                settings.lock_timeout_ms,
                attempt,
                LOCK_ATTEMPTS,
                pause_s,
            )
            time.sleep(pause_s)
    raise BackfillError(
        f"{description}: could not lock workflow_runs within "
        f"lock_timeout={settings.lock_timeout_ms}ms in {LOCK_ATTEMPTS} attempts; "
        "a long-running transaction holds it (see pg_stat_activity), "
        "end it or retry later"
    )


def add_key_columns(
    op: Operations, context: MigrationContext, settings: BackfillSettings
) -> None:
    """Add the two key columns and the ledger table under lock_timeout."""

    def add() -> None:
        # IF NOT EXISTS lets 041 run again after an interrupted index build,
        # which happens after these steps have committed.
        for column in key_columns():
            op.add_column("workflow_runs", column, if_not_exists=True)
        op.create_table(LEDGER_TABLE_NAME, *ledger_columns(), if_not_exists=True)

    if context.as_sql:
        op.execute(f"SET LOCAL lock_timeout = '{settings.lock_timeout_ms}ms'")
        add()
        return
    bind = context.bind
    assert bind is not None

    def add_in_savepoint() -> None:
        # A savepoint lets a timed-out attempt roll back without ending the
        # migration's transaction.
        with bind.begin_nested():
            bind.execute(
                sa.select(
                    sa.func.set_config(
                        "lock_timeout", f"{settings.lock_timeout_ms}ms", True
                    )
                )
            )
            add()

    _with_lock_retries("adding the run key columns", settings, add_in_savepoint)


def _index_is_invalid(bind: sa.Connection, name: str) -> bool:
    query = sa.text(
        "SELECT NOT i.indisvalid FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
    )
    return bool(bind.execute(query, {"name": name}).scalar())


def create_key_index(
    op: Operations, context: MigrationContext, settings: BackfillSettings
) -> None:
    """Build the key and candidate indexes CONCURRENTLY, replacing INVALID ones.

    An interrupted concurrent build leaves an INVALID index that PostgreSQL
    keeps updating but never uses; it is dropped and built again.
    """
    with context.autocommit_block():
        if context.as_sql:
            op.execute(f"SET lock_timeout = '{settings.lock_timeout_ms}ms'")
            op.execute("SET statement_timeout = 0")
            for name, create in _INDEXES:
                offline.emit_drop_invalid_index(context, name)
                create(op)
            op.execute("RESET lock_timeout")
            op.execute("RESET statement_timeout")
            return
        bind = context.bind
        assert bind is not None
        with _index_build_timeouts(bind, settings.lock_timeout_ms):
            for name, create in _INDEXES:
                rebuild = functools.partial(_rebuild_index, op, bind, name, create)
                _with_lock_retries(f"building index {name}", settings, rebuild)


def _rebuild_index(
    op: Operations,
    bind: sa.Connection,
    name: str,
    create: Callable[[Operations], None],
) -> None:
    if _index_is_invalid(bind, name):
        log.warning("dropping INVALID index %s left by an interrupted build", name)
        op.drop_index(name, table_name="workflow_runs", postgresql_concurrently=True)
    create(op)


def _create_key_index(op: Operations) -> None:
    op.create_index(
        KEY_INDEX_NAME,
        "workflow_runs",
        ["workflow_id", "run_key_normalized"],
        unique=True,
        postgresql_concurrently=True,
        postgresql_where=key_index_predicate(),
        if_not_exists=True,
    )


def _create_candidate_index(op: Operations) -> None:
    op.create_index(
        CANDIDATE_INDEX_NAME,
        "workflow_runs",
        ["id"],
        postgresql_concurrently=True,
        postgresql_where=sa.text("run_key IS NULL"),
        if_not_exists=True,
    )


_INDEXES: list[tuple[str, Callable[[Operations], None]]] = [
    (KEY_INDEX_NAME, _create_key_index),
    (CANDIDATE_INDEX_NAME, _create_candidate_index),
]


def drop_key_schema(
    op: Operations, context: MigrationContext, settings: BackfillSettings
) -> None:
    """Drop the indexes CONCURRENTLY, then the ledger and the key columns."""
    with context.autocommit_block():
        if context.as_sql:
            op.execute(f"SET lock_timeout = '{settings.lock_timeout_ms}ms'")
        for name, _ in _INDEXES:
            op.drop_index(
                name,
                table_name="workflow_runs",
                postgresql_concurrently=True,
                if_exists=True,
            )
        if context.as_sql:
            op.execute("RESET lock_timeout")

    def drop() -> None:
        op.drop_table(LEDGER_TABLE_NAME, if_exists=True)
        op.drop_column("workflow_runs", "run_key_normalized", if_exists=True)
        op.drop_column("workflow_runs", "run_key", if_exists=True)

    if context.as_sql:
        op.execute(f"SET LOCAL lock_timeout = '{settings.lock_timeout_ms}ms'")
        drop()
        return
    bind = context.bind
    assert bind is not None

    def drop_in_savepoint() -> None:
        with bind.begin_nested():
            bind.execute(
                sa.select(
                    sa.func.set_config(
                        "lock_timeout", f"{settings.lock_timeout_ms}ms", True
                    )
                )
            )
            drop()

    _with_lock_retries("dropping the run key columns", settings, drop_in_savepoint)
