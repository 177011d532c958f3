"""DATABASE_URL handling, passwords, the encoding check and the runner lock."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from migrations_support import database, embedded
from migrations_support.errors import BackfillError
from tests.helpers import current_revision, insert_runs, make_run

PASSWORD = "p%w@rd/x:y"
ENCODED_PASSWORD = "p%25w%40rd%2Fx%3Ay"


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://app@db.internal:5432/runs",
        "postgresql://app@db.internal:5432/runs",
        "postgresql+psycopg://app@db.internal:5432/runs",
    ],
)
def test_postgres_schemes_use_psycopg(raw: str) -> None:
    url = database.parse_database_url(raw)
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "db.internal"
    assert url.database == "runs"


def test_percent_encoded_password_decoded() -> None:
    url = database.parse_database_url(f"postgresql://app:{ENCODED_PASSWORD}@h/runs")
    assert url.password == PASSWORD
    assert database.describe_url(url) == "postgresql+psycopg://app:***@h/runs"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            None,
            "DATABASE_URL is not set: set it to postgresql://user:password@host:5432/dbname",
        ),
        (
            "  ",
            "DATABASE_URL is not set: set it to postgresql://user:password@host:5432/dbname",
        ),
        (
            "not a url",
            "DATABASE_URL is not a valid database URL: expected "
            "postgresql://user:password@host:5432/dbname",
        ),
        (
            "mysql://app:secret@h/runs",
            "DATABASE_URL has scheme 'mysql': expected postgresql:// "
            "(this project runs on PostgreSQL with psycopg 3)",
        ),
        (
            "postgresql://app:secret@h",
            "DATABASE_URL names no database: expected "
            "postgresql://user:password@host:5432/dbname",
        ),
    ],
)
def test_unusable_url_messages(raw: str | None, message: str) -> None:
    with pytest.raises(BackfillError) as error:
        database.parse_database_url(raw)
    assert str(error.value) == message
    assert "secret" not in str(error.value)


def test_upgrade_without_url_fails(
    alembic_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")
    assert str(error.value) == (
        "DATABASE_URL is not set: set it to postgresql://user:password@host:5432/dbname"
    )


def test_connection_failure_hides_password(
    alembic_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 1 on loopback refuses connections at once.
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://app:{ENCODED_PASSWORD}@127.0.0.1:1/runs"
    )
    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")
    message = str(error.value)
    assert message.startswith(
        "could not connect to the database in DATABASE_URL "
        "(postgresql+psycopg://app:***@127.0.0.1:1/runs): "
    )
    assert "\n" not in message
    assert PASSWORD not in message
    assert ENCODED_PASSWORD not in message


@pytest.fixture
def password_database(server_url: URL) -> Iterator[URL]:
    """A database and role that only a password (with %, @, / and :) opens.

    It edits pg_hba.conf, so it runs only on the embedded server the tests
    started themselves, never on a server given in TEST_DATABASE_URL.
    """
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("changes pg_hba.conf, so it runs only on the embedded server")
    name = f"test_{uuid.uuid4().hex[:12]}"
    role = f"app_{uuid.uuid4().hex[:8]}"
    embedded.create_database(server_url, name)
    admin = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    with admin.connect() as connection:
        hba_file = Path(connection.execute(sa.text("SHOW hba_file")).scalar_one())
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
        connection.execute(sa.text(f'ALTER DATABASE "{name}" OWNER TO {role}'))
        original = hba_file.read_text()
        hba_file.write_text(f"local {name} {role} scram-sha-256\n" + original)
        connection.execute(sa.text("SELECT pg_reload_conf()"))
    try:
        yield server_url.set(database=name, username=role, password=PASSWORD)
    finally:
        hba_file.write_text(original)
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT pg_reload_conf()"))
        embedded.drop_database(server_url, name)
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


def test_password_login_and_no_password_in_output(
    password_database: URL,
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = password_database.render_as_string(hide_password=False)
    assert ENCODED_PASSWORD in raw
    caplog.set_level(logging.DEBUG)

    monkeypatch.setenv("DATABASE_URL", raw.replace(ENCODED_PASSWORD, "wrong"))
    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")
    assert "password authentication failed" in str(error.value)

    monkeypatch.setenv("DATABASE_URL", raw)
    command.upgrade(alembic_cfg, "head")

    engine = database.create_engine(password_database)
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
    engine.dispose()
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text, str(error.value)):
        assert PASSWORD not in text
        assert ENCODED_PASSWORD not in text


def test_non_utf8_database_rejected_before_writes(
    server_url: URL, alembic_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    with admin.connect() as connection:
        connection.execute(
            sa.text(
                f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        )
    try:
        url = server_url.set(database=name)
        monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
        with pytest.raises(BackfillError) as error:
            command.upgrade(alembic_cfg, "head")
        assert str(error.value) == (
            "database encoding is LATIN1: run keys need a UTF8 database "
            "(NFKC normalization is defined only there); nothing was written"
        )
        engine = database.create_engine(url)
        with engine.connect() as connection:
            assert not sa.inspect(connection).has_table("alembic_version")
            assert not sa.inspect(connection).has_table("workflow_runs")
        engine.dispose()
    finally:
        embedded.drop_database(server_url, name)
        admin.dispose()


def test_advisory_lock_makes_second_runner_wait(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(partition_key="a")])
    holder = engine.connect()
    holder.execute(sa.select(sa.func.pg_advisory_lock(database.ADVISORY_LOCK_KEY)))
    holder.commit()

    import threading

    finished = threading.Event()

    def run_upgrade() -> None:
        command.upgrade(alembic_cfg, "head")
        finished.set()

    worker = threading.Thread(target=run_upgrade)
    worker.start()
    assert not finished.wait(1.5)
    assert current_revision(engine) == "040_workflow_runs"

    holder.execute(sa.select(sa.func.pg_advisory_unlock(database.ADVISORY_LOCK_KEY)))
    holder.commit()
    holder.close()
    worker.join(30)

    assert finished.is_set()
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
