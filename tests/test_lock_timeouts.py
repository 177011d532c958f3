"""Lock timeouts of revisions 041 and 042, measured from other real sessions.

Writers in other sessions must never wait behind a migration for much
longer than the lock timeout, and the backfill must take no lock that
blocks writers. The timeouts the project sets apply to its own statements
only: a role default or an earlier session setting does not leak into
them, and none of them leaks out.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from migrations_support import database, ddl, demo_data
from migrations_support.backfill import run_walk
from migrations_support.errors import BackfillError
from migrations_support.settings import BackfillSettings
from tests.helpers import current_revision, insert_runs, make_run, upgrade_to_041
from tests.processes import start_alembic

LOCK_TIMEOUT_MS = 400
# Time a writer may take beyond the lock timeout: the INSERT itself, and
# scheduling on a busy two-core machine that runs other test suites.
WRITER_SLACK_S = 0.35
# Lock modes that conflict with ROW EXCLUSIVE, the lock INSERT, UPDATE and
# DELETE take: holding or requesting one of them makes writers wait.
WRITER_BLOCKING_MODES = frozenset(
    {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"}
)


class InsertProbe(threading.Thread):
    """Inserts one run at a time in its own session and records each latency."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.latencies_s: list[float] = []
        self.errors: list[BaseException] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            with self.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            ) as connection:
                while not self.stop_event.is_set():
                    started = time.monotonic()
                    connection.execute(
                        sa.text(
                            "INSERT INTO workflow_runs (id, workflow_id, status) "
                            "VALUES (gen_random_uuid(), 'probe', 'succeeded')"
                        )
                    )
                    self.latencies_s.append(time.monotonic() - started)
                    time.sleep(0.005)
        except BaseException as error:  # reported by stop()
            self.errors.append(error)

    def stop(self) -> None:
        """Stop inserting and wait for the thread to end."""
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive()


@pytest.fixture
def insert_probe(engine: sa.Engine) -> Iterator[InsertProbe]:
    """An InsertProbe for the test to start, stopped at the end of the test."""
    probe = InsertProbe(engine)
    yield probe
    probe.stop_event.set()
    probe.join(10)


@pytest.fixture
def fast_lock_retries(alembic_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three lock attempts with 0.1 s and 0.2 s pauses, and a 400 ms lock timeout.

    It depends on ``alembic_cfg``, which removes every knob variable first.
    """
    monkeypatch.setattr(ddl, "LOCK_ATTEMPTS", 3)
    monkeypatch.setattr(ddl, "LOCK_BACKOFF_S", 0.1)
    monkeypatch.setenv("RUN_KEY_BACKFILL_LOCK_TIMEOUT", f"{LOCK_TIMEOUT_MS}ms")


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == ddl.__name__ and record.levelno == logging.WARNING
    ]


def table_columns(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        return {
            column["name"]
            for column in sa.inspect(connection).get_columns("workflow_runs")
        }


def test_access_share_conflicts_with_add_column(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    # ADD COLUMN needs ACCESS EXCLUSIVE, which conflicts with every mode,
    # even the ACCESS SHARE a plain SELECT takes.
    command.upgrade(alembic_cfg, "040_workflow_runs")
    with engine.connect() as holder, engine.connect() as other:
        holder.execute(sa.text("LOCK TABLE workflow_runs IN ACCESS SHARE MODE"))
        other.execute(sa.text("SET lock_timeout = '100ms'"))
        with pytest.raises(sa.exc.OperationalError) as error:
            other.execute(
                sa.text("ALTER TABLE workflow_runs ADD COLUMN probe_column text")
            )
        holder.rollback()
    assert getattr(error.value.orig, "sqlstate", None) == "55P03"


@pytest.mark.usefixtures("fast_lock_retries")
def test_add_columns_gives_up_without_blocking_writers(
    alembic_cfg: Config,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    insert_probe: InsertProbe,
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    caplog.set_level(logging.WARNING, logger="migrations_support")
    insert_probe.start()

    with engine.connect() as holder:
        holder.execute(sa.text("LOCK TABLE workflow_runs IN ACCESS SHARE MODE"))
        started = time.monotonic()
        with pytest.raises(BackfillError) as error:
            command.upgrade(alembic_cfg, "head")
        elapsed_s = time.monotonic() - started
        holder.rollback()
    insert_probe.stop()

    assert str(error.value) == (
        "adding the run key columns: could not lock workflow_runs within "
        f"lock_timeout={LOCK_TIMEOUT_MS}ms in 3 attempts; a long-running "
        "transaction holds it (see pg_stat_activity), end it or retry later"
    )
    assert retry_warnings(caplog) == [
        "adding the run key columns: lock not granted within "
        f"lock_timeout={LOCK_TIMEOUT_MS}ms (attempt {attempt} of 3); "
        f"retrying in {pause_s:.1f} s"
        for attempt, pause_s in ((1, 0.1), (2, 0.2))
    ]
    # Three waits of 400 ms and pauses of 0.1 s and 0.2 s.
    assert elapsed_s >= 3 * LOCK_TIMEOUT_MS / 1000 + 0.3
    assert current_revision(engine) == "040_workflow_runs"
    assert "run_key" not in table_columns(engine)

    assert insert_probe.errors == []
    assert len(insert_probe.latencies_s) > 20
    # Writers queue behind the waiting ALTER TABLE, so some INSERT waits
    # for most of a lock timeout, but never much longer.
    assert max(insert_probe.latencies_s) > LOCK_TIMEOUT_MS / 1000 / 2
    assert max(insert_probe.latencies_s) < LOCK_TIMEOUT_MS / 1000 + WRITER_SLACK_S


@pytest.mark.usefixtures("fast_lock_retries")
def test_add_columns_succeeds_on_retry(
    alembic_cfg: Config,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(partition_key="p")])
    # A pause long enough for the holder to end its transaction in it.
    monkeypatch.setattr(ddl, "LOCK_BACKOFF_S", 1.0)
    caplog.set_level(logging.WARNING, logger="migrations_support")
    first_retry = threading.Event()

    class RetrySignal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            first_retry.set()

    signal = RetrySignal(logging.WARNING)
    logging.getLogger(ddl.__name__).addHandler(signal)
    holder = engine.connect()
    holder.execute(sa.text("LOCK TABLE workflow_runs IN ACCESS SHARE MODE"))

    def end_holder_after_first_retry() -> None:
        first_retry.wait(30)
        holder.rollback()
        holder.close()

    releaser = threading.Thread(target=end_holder_after_first_retry)
    releaser.start()
    try:
        command.upgrade(alembic_cfg, "head")
    finally:
        first_retry.set()
        releaser.join(30)
        logging.getLogger(ddl.__name__).removeHandler(signal)

    assert retry_warnings(caplog) == [
        "adding the run key columns: lock not granted within "
        f"lock_timeout={LOCK_TIMEOUT_MS}ms (attempt 1 of 3); retrying in 1.0 s"
    ]
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
    assert {"run_key", "run_key_normalized"} <= table_columns(engine)


@pytest.mark.usefixtures("fast_lock_retries")
def test_index_build_retries_then_rebuilds(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    insert_probe: InsertProbe,
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(partition_key=f"p{n}") for n in range(20)])
    insert_probe.start()

    # CREATE INDEX CONCURRENTLY waits for every transaction whose snapshot
    # is older than its own, and that wait counts against lock_timeout.
    with engine.connect().execution_options(
        isolation_level="REPEATABLE READ"
    ) as reader:
        reader.execute(sa.text("SELECT 1"))
        with pytest.raises(BackfillError) as error:
            command.upgrade(alembic_cfg, "head")
        reader.rollback()
    insert_probe.stop()

    assert str(error.value) == (
        f"building index {ddl.KEY_INDEX_NAME}: could not lock workflow_runs within "
        f"lock_timeout={LOCK_TIMEOUT_MS}ms in 3 attempts; a long-running "
        "transaction holds it (see pg_stat_activity), end it or retry later"
    )
    assert current_revision(engine) == "040_workflow_runs"
    with engine.connect() as connection:
        valid = connection.execute(
            sa.text(
                "SELECT indisvalid FROM pg_index "
                "WHERE indexrelid = CAST(:name AS regclass)"
            ),
            {"name": ddl.KEY_INDEX_NAME},
        ).scalar_one()
    assert valid is False
    # The build never blocks writers, not even while it waits.
    assert insert_probe.errors == []
    assert max(insert_probe.latencies_s) < WRITER_SLACK_S

    command.upgrade(alembic_cfg, "head")

    with engine.connect() as connection:
        indexes = connection.execute(
            sa.text(
                "SELECT c.relname, i.indisvalid FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'workflow_runs'::regclass ORDER BY 1"
            )
        ).all()
    assert [tuple(row) for row in indexes] == [
        ("workflow_runs_active_run_key_uniq", True),
        ("workflow_runs_pkey", True),
        ("workflow_runs_run_key_null_idx", True),
        ("workflow_runs_workflow_id_created_at_idx", True),
    ]
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def test_backfill_takes_no_lock_that_blocks_writers(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    with psycopg.connect(_libpq_url(database_url)) as connection:
        demo_data.load_runs(connection, 20_000)
    command.upgrade(alembic_cfg, "041_workflow_run_keys")

    runner = start_alembic(
        database_url,
        tmp_path,
        "backfill",
        "upgrade",
        "head",
        knobs={"batch_size": "200"},
    )
    samples: list[tuple[int, str, str, bool]] = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as sampler:
        while runner.popen.poll() is None:
            samples.extend(
                tuple(row)  # type: ignore[misc]
                for row in sampler.execute(
                    sa.text(
                        "SELECT l.pid, c.relname, l.mode, l.granted FROM pg_locks l "
                        "JOIN pg_class c ON c.oid = l.relation "
                        "WHERE l.locktype = 'relation' AND l.pid <> pg_backend_pid() "
                        "AND l.database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database())"
                    )
                )
            )
            time.sleep(0.002)
    assert runner.wait(timeout_s=10) == 0, runner.stderr()[-2000:]

    blocking = [sample for sample in samples if sample[2] in WRITER_BLOCKING_MODES]
    assert blocking == []
    # The sampler saw batches at work: their row locks on workflow_runs
    # and the ledger.
    modes = {(relname, mode) for _, relname, mode, _ in samples}
    assert ("workflow_runs", "RowShareLock") in modes
    assert ("workflow_runs", "RowExclusiveLock") in modes
    assert ("workflow_run_key_backfill_ledger", "RowExclusiveLock") in modes
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def _libpq_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


# -- timeouts stay scoped to the project's statements ----------------------

ROLE_LOCK_TIMEOUT = "1min"
DATABASE_STATEMENT_TIMEOUT = "45s"
KNOB_LOCK_TIMEOUT = "750ms"
KNOB_STATEMENT_TIMEOUT = "1500ms"
_SETTINGS_QUERY = (
    "SELECT current_user, current_setting('lock_timeout'), "
    "current_setting('statement_timeout'), current_setting('jit')"
)


@pytest.fixture
def role_with_defaults(server_url: URL, database_url: URL) -> Iterator[URL]:
    """URL of a role that owns the test database and has its own timeouts.

    The role has lock_timeout=1min in this database and the database has
    statement_timeout=45s, so a setting that leaks in shows up.
    """
    role = f"runkeys_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    name = database_url.database
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(sa.text(f'ALTER DATABASE "{name}" OWNER TO {role}'))
        connection.execute(
            sa.text(
                f'ALTER ROLE {role} IN DATABASE "{name}" '
                f"SET lock_timeout = '{ROLE_LOCK_TIMEOUT}'"
            )
        )
        connection.execute(
            sa.text(
                f'ALTER DATABASE "{name}" '
                f"SET statement_timeout = '{DATABASE_STATEMENT_TIMEOUT}'"
            )
        )
    try:
        yield database_url.set(username=role)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
            connection.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


class SettingsSpy:
    """Records the timeouts in force for statements and for closing sessions.

    After each statement that names ``workflow_runs`` it reads the settings
    on the same connection, inside the same transaction, so a ``SET LOCAL``
    of that transaction is still visible. When a pooled connection is
    returned (for NullPool, just before it closes) it reads the session's
    settings.
    """

    def __init__(self) -> None:
        self.statements: list[tuple[str, str, str, str, str]] = []
        self.sessions: list[tuple[str, str, str, str]] = []

    def after_cursor_execute(
        self,
        conn: sa.Connection,
        cursor: Any,
        statement: str,
        *args: object,
    ) -> None:
        # Alembic's version stamp names revision 040_workflow_runs; it is
        # Alembic's statement, not the project's.
        if "workflow_runs" not in statement or "alembic_version" in statement:
            return
        user, lock_timeout, statement_timeout, jit = cursor.connection.execute(
            _SETTINGS_QUERY
        ).fetchone()
        first_line = " ".join(statement.split())[:60]
        self.statements.append((user, first_line, lock_timeout, statement_timeout, jit))

    def checkin(self, dbapi_connection: Any, record: object) -> None:
        if dbapi_connection is None or dbapi_connection.closed:
            return
        row = dbapi_connection.execute(_SETTINGS_QUERY).fetchone()
        dbapi_connection.rollback()
        self.sessions.append(tuple(row))

    def __enter__(self) -> SettingsSpy:
        sa.event.listen(sa.Engine, "after_cursor_execute", self.after_cursor_execute)
        sa.event.listen(sa.pool.Pool, "checkin", self.checkin)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sa.event.remove(sa.Engine, "after_cursor_execute", self.after_cursor_execute)
        sa.event.remove(sa.pool.Pool, "checkin", self.checkin)


def test_timeouts_scoped_to_own_statements(
    role_with_defaults: URL,
    alembic_cfg: Config,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = role_with_defaults.username
    monkeypatch.setenv(
        database.URL_VARIABLE, role_with_defaults.render_as_string(hide_password=False)
    )
    role_engine = database.create_engine(role_with_defaults)
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(role_engine, [make_run(partition_key=f"p{n}") for n in range(5)])
    with role_engine.connect() as connection:
        defaults = tuple(connection.execute(sa.text(_SETTINGS_QUERY)).one())
    assert defaults[1:3] == (ROLE_LOCK_TIMEOUT, DATABASE_STATEMENT_TIMEOUT)
    monkeypatch.setenv("RUN_KEY_BACKFILL_LOCK_TIMEOUT", KNOB_LOCK_TIMEOUT)
    monkeypatch.setenv("RUN_KEY_BACKFILL_STATEMENT_TIMEOUT", KNOB_STATEMENT_TIMEOUT)

    with SettingsSpy() as spy:
        command.upgrade(alembic_cfg, "head")
        command.downgrade(alembic_cfg, "041_workflow_run_keys")

    # Each kind of statement of 041, 042 and the downgrade of 042, with the
    # (lock_timeout, statement_timeout, jit) values it ran under.
    seen = [
        (line, lock, statement, jit) for _, line, lock, statement, jit in spy.statements
    ]
    assert {user for user, *_ in spy.statements} == {role}
    by_kind: dict[str, set[tuple[str, str, str]]] = {}
    for line, lock, statement, jit in seen:
        by_kind.setdefault(_statement_kind(line), set()).add((lock, statement, jit))
    jit_default = defaults[3]
    assert by_kind == {
        "add columns": {(KNOB_LOCK_TIMEOUT, DATABASE_STATEMENT_TIMEOUT, jit_default)},
        "create index": {(KNOB_LOCK_TIMEOUT, "0", jit_default)},
        "analyze": {(KNOB_LOCK_TIMEOUT, KNOB_STATEMENT_TIMEOUT, "off")},
        "key batch": {(KNOB_LOCK_TIMEOUT, KNOB_STATEMENT_TIMEOUT, "off")},
        "walker query": {(KNOB_LOCK_TIMEOUT, KNOB_STATEMENT_TIMEOUT, "off")},
        "revert batch": {(KNOB_LOCK_TIMEOUT, KNOB_STATEMENT_TIMEOUT, jit_default)},
    }
    # Every session the migrations opened ends with the role's defaults.
    role_sessions = [session for session in spy.sessions if session[0] == role]
    assert len(role_sessions) >= 4
    assert set(role_sessions) == {defaults}
    role_engine.dispose()


def _statement_kind(first_line: str) -> str:
    """Return the kind of project statement that starts with ``first_line``."""
    if first_line.startswith("ALTER TABLE workflow_runs ADD"):
        return "add columns"
    if first_line.startswith(("CREATE UNIQUE INDEX CONCURRENTLY", "CREATE INDEX")):
        return "create index"
    if first_line.startswith("ANALYZE"):
        return "analyze"
    if first_line.startswith("WITH snapshot AS"):
        return "key batch"
    if first_line.startswith("WITH removed AS"):
        return "revert batch"
    return "walker query"


def test_walk_keeps_earlier_session_settings(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(partition_key="p")])

    with engine.connect() as connection:
        connection.execute(sa.text("SET lock_timeout = '7s'"))
        connection.execute(sa.text("SET statement_timeout = '9s'"))
        connection.commit()
        before = tuple(connection.execute(sa.text(_SETTINGS_QUERY)).one())
        connection.commit()
        result = run_walk(connection, BackfillSettings(), io.StringIO())
        after = tuple(connection.execute(sa.text(_SETTINGS_QUERY)).one())

    assert result.counters.updated == 1
    assert before[1:3] == ("7s", "9s")
    # The walk's SET LOCAL values (2s, 30s, jit off) ended with each batch.
    assert after == before
