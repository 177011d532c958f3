"""Kill ``alembic upgrade head`` with SIGKILL again and again, then finish it.

The same 200,000 demo runs go into two databases copied from one
template. One is upgraded without interruption, and the other is killed
at random points 20 times, rerun after each kill and then upgraded to
the end. Both must end with the same keys and ledger, no run's key may
change between kills, and no other column of any run may change.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from migrations_support import demo_data, embedded
from tests.helpers import counter_values
from tests.processes import AlembicProcess, start_alembic, wait_until

RUNS = 200_000
KILLS = 20
STARTED_041 = "Running upgrade 040_workflow_runs -> 041_workflow_run_keys"
STARTED_BACKFILL = "backfill starting"

# Each checksum is one query over rows in id order, so equal checksums mean
# equal rows.
OTHER_COLUMNS_CHECKSUM = (
    "SELECT md5(string_agg(ROW(id, workflow_id, status, partition_key, trigger, "
    "event_id, created_at, updated_at)::text, ',' ORDER BY id)) FROM workflow_runs"
)
KEYS_CHECKSUM = (
    "SELECT md5(string_agg(ROW(id, run_key, run_key_normalized)::text, ',' "
    "ORDER BY id)) FROM workflow_runs"
)
LEDGER_CHECKSUM = (
    "SELECT md5(string_agg(ROW(run_id, run_key, run_key_normalized, source)::text, "
    "',' ORDER BY run_id)) FROM workflow_run_key_backfill_ledger"
)
# Runs whose key does not match their ledger row, and ledger rows without a
# run: zero whenever every batch wrote its keys and ledger rows together.
LEDGER_MISMATCHES = """
SELECT count(*) FROM workflow_runs r
FULL JOIN workflow_run_key_backfill_ledger l ON l.run_id = r.id
WHERE r.id IS NULL
   OR (r.run_key IS NULL) <> (l.run_id IS NULL)
   OR (l.run_id IS NOT NULL
       AND (r.run_key, r.run_key_normalized)
           IS DISTINCT FROM (l.run_key, l.run_key_normalized))
"""
# Ledger rows seen after an earlier kill that are gone or changed since.
CHANGED_SINCE_SEEN = """
SELECT count(*) FROM seen s
LEFT JOIN workflow_run_key_backfill_ledger l USING (run_id)
WHERE (l.run_key, l.run_key_normalized, l.source, l.assigned_at)
      IS DISTINCT FROM (s.run_key, s.run_key_normalized, s.source, s.assigned_at)
"""
REMEMBER_SEEN = """
INSERT INTO seen SELECT run_id, run_key, run_key_normalized, source, assigned_at
FROM workflow_run_key_backfill_ledger ON CONFLICT (run_id) DO NOTHING
"""


def libpq_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def query_one(url: URL, sql: str) -> object:
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute(sql).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def two_copies(server_url: URL, tmp_path: Path) -> Iterator[tuple[URL, URL]]:
    """Two databases with the same demo runs at revision 040: (killed, reference).

    The runs are generated and loaded once into a template database, and
    ``CREATE DATABASE ... TEMPLATE`` copies its files twice.
    """
    suffix = uuid.uuid4().hex[:8]
    template, killed, reference = (
        f"test_crash_{role}_{suffix}" for role in ("template", "killed", "reference")
    )
    template_url = embedded.create_database(server_url, template)
    admin = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        schema = start_alembic(
            template_url, tmp_path, "template", "upgrade", "040_workflow_runs"
        )
        assert schema.wait(timeout_s=120) == 0, schema.stderr()
        with psycopg.connect(libpq_url(template_url)) as connection:
            assert demo_data.load_runs(connection, RUNS) == RUNS
        with admin.connect() as connection:
            for name in (killed, reference):
                connection.execute(
                    sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                )
        yield server_url.set(database=killed), server_url.set(database=reference)
    finally:
        for name in (template, killed, reference):
            embedded.drop_database(server_url, name)
        admin.dispose()


def run_to_end(url: URL, tmp_path: Path, name: str) -> tuple[AlembicProcess, float]:
    """Run ``alembic upgrade head`` to the end; return it and its walk time.

    The walk time, in seconds, runs from the "backfill starting" line to
    the exit of the process.
    """
    runner = start_alembic(url, tmp_path, name, "upgrade", "head")
    wait_until(
        lambda: STARTED_BACKFILL in runner.stderr() or runner.popen.poll() is not None,
        timeout_s=300,
        description=f"{name} to start the backfill",
    )
    started = time.monotonic()
    assert runner.wait(timeout_s=600) == 0, runner.stderr()[-3000:]
    return runner, time.monotonic() - started


def kill_at_random_point(
    url: URL, tmp_path: Path, name: str, marker: str, delay_s: float
) -> None:
    """Start ``alembic upgrade head``, SIGKILL it ``delay_s`` after ``marker``."""
    runner = start_alembic(url, tmp_path, name, "upgrade", "head")
    wait_until(
        lambda: marker in runner.stderr() or runner.popen.poll() is not None,
        timeout_s=300,
        description=f"{name} to log {marker!r}",
    )
    time.sleep(delay_s)
    assert runner.popen.poll() is None, f"{name} ended before its kill"
    runner.popen.send_signal(signal.SIGKILL)
    assert runner.wait(timeout_s=60) == -signal.SIGKILL


def check_after_kill(checker: psycopg.Connection[tuple[object, ...]]) -> int:
    """Check what a kill must leave intact; return the count of keyed runs.

    ``checker`` keeps every ledger row it has seen in a temporary table, so
    a key that a later run changed or removed shows up.
    """
    ledger_exists = checker.execute(
        "SELECT to_regclass('workflow_run_key_backfill_ledger') IS NOT NULL"
    ).fetchone()
    assert ledger_exists is not None
    if not ledger_exists[0]:
        return 0
    checker.execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS seen (run_id uuid PRIMARY KEY, "
        "run_key text, run_key_normalized text, source text, assigned_at timestamptz)"
    )
    assert fetch_count(checker, LEDGER_MISMATCHES) == 0
    assert fetch_count(checker, CHANGED_SINCE_SEEN) == 0
    checker.execute(REMEMBER_SEEN)
    return fetch_count(checker, "SELECT count(*) FROM workflow_run_key_backfill_ledger")


def fetch_count(connection: psycopg.Connection[tuple[object, ...]], sql: str) -> int:
    row = connection.execute(sql).fetchone()
    assert row is not None
    return int(str(row[0]))


@pytest.mark.slow
def test_killed_backfill_resumes_to_same_result(
    two_copies: tuple[URL, URL], tmp_path: Path
) -> None:
    killed_url, reference_url = two_copies
    other_columns_before = query_one(killed_url, OTHER_COLUMNS_CHECKSUM)

    reference, walk_s = run_to_end(reference_url, tmp_path, "reference")
    assert counter_values(reference.stdout())["updated"] == RUNS

    # Delays up to 1.5 * walk_s / KILLS add up to about three quarters of
    # the walk, and each run spends part of its delay before its first
    # batch. So every kill lands while runs are left to key, on a fast or a
    # slow server alike.
    seed = random.randrange(2**32)
    print(f"kill delays use random.Random({seed})")
    delays = random.Random(seed)
    keyed_after_kill: list[int] = []
    with psycopg.connect(libpq_url(killed_url), autocommit=True) as checker:
        for kill in range(KILLS):
            # The first kill aims at revision 041, while it adds the columns
            # or builds the indexes CONCURRENTLY.
            marker = STARTED_041 if kill == 0 else STARTED_BACKFILL
            delay_s = delays.uniform(0, 0.5 if kill == 0 else 1.5 * walk_s / KILLS)
            kill_at_random_point(killed_url, tmp_path, f"kill{kill}", marker, delay_s)
            keyed_after_kill.append(check_after_kill(checker))

        assert keyed_after_kill == sorted(keyed_after_kill)
        assert 0 < keyed_after_kill[-1] < RUNS

        final, _ = run_to_end(killed_url, tmp_path, "final")
        assert counter_values(final.stdout())["updated"] == RUNS - keyed_after_kill[-1]
        assert check_after_kill(checker) == RUNS

    for sql in (KEYS_CHECKSUM, LEDGER_CHECKSUM):
        assert query_one(killed_url, sql) == query_one(reference_url, sql)
    assert query_one(killed_url, OTHER_COLUMNS_CHECKSUM) == other_columns_before
    assert query_one(reference_url, OTHER_COLUMNS_CHECKSUM) == other_columns_before
    assert (
        query_one(killed_url, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    )
    assert (
        query_one(killed_url, "SELECT version_num FROM alembic_version")
        == "042_backfill_workflow_run_keys"
    )
