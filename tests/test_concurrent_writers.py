"""The backfill while other sessions insert, update and delete runs.

Old application instances insert runs without keys, new ones insert runs
with keys, and both change statuses and delete runs. Writers that key
runs take keys from a namespace of their own. A key the application
chose twice would be the application's own conflict, so with none chosen
twice, any error a writer gets would come from the backfill.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from migrations_support import demo_data, walker
from migrations_support.schema import ACTIVE_STATUSES, FINISHED_STATUSES
from tests.helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    insert_runs,
    make_run,
    upgrade_to_041,
)
from tests.processes import start_alembic, wait_until

TAIL_INSERT_CAP = 200
A = uuid.UUID("10000000-0000-4000-8000-00000000000a")
B = uuid.UUID("20000000-0000-4000-8000-00000000000b")


def libpq_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def test_unique_index_catches_concurrent_key(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="Order 7")])

    # The application inserts B with the key A derives, in a transaction
    # still open when the batch starts: the batch's snapshot misses B, and
    # its UPDATE of A waits on the unique index for that transaction.
    with engine.connect() as writer:
        writer.execute(
            sa.text(
                "INSERT INTO workflow_runs (id, workflow_id, status, run_key, "
                "run_key_normalized) VALUES (:id, 'billing.nightly', 'running', "
                "'ORDER 7', 'order-7')"
            ),
            {"id": B},
        )
        runner = start_alembic(database_url, tmp_path, "backfill", "upgrade", "head")
        # Autocommit, because pg_stat_activity stays the same within a
        # transaction.
        with engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        ) as observer:
            wait_until(
                lambda: bool(
                    observer.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() "
                            "AND wait_event = 'transactionid'"
                        )
                    ).scalar_one()
                ),
                timeout_s=60,
                description="the batch to wait for the writer's transaction",
            )
        writer.commit()
    assert runner.wait(timeout_s=60) == 0, runner.stderr()[-2000:]

    stderr = runner.stderr()
    assert (
        f"batch of 500 from run {uuid.UUID(int=0)} failed (attempt 1 of 2): "
        'duplicate key value violates unique constraint "'
        'workflow_runs_active_run_key_uniq"' in stderr
    )
    assert (
        f"conflict: run {A} of workflow 'billing.nightly' derives key 'order-7', "
        f"already held by run {B}; keyed as 'order-7-10000000'" in stderr
    )
    assert counter_values(runner.stdout()) == {
        "processed": 1,
        "updated": 1,
        "skipped": 0,
        "conflicts": 1,
        "failures": 0,
    }
    assert fetch_keys(engine) == {
        A: ("Order 7-10000000", "order-7-10000000"),
        B: ("ORDER 7", "order-7"),
    }


def test_walk_ends_under_steady_tail_inserts(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    initial = [uuid.UUID(int=(n + 1) << 120) for n in range(3)]
    upgrade_to_041(
        alembic_cfg, engine, [make_run(run_id, partition_key="p") for run_id in initial]
    )
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "1")
    caplog.set_level(logging.INFO, logger="migrations_support")

    # An application with time-ordered ids (UUIDv7, say) inserts every new
    # run after all others: one run without a key after each batch, always
    # ahead of the walk. The cap only ends the stream if the walk does not.
    tail_ids = [uuid.UUID(int=(1 << 127) + n) for n in range(1, TAIL_INSERT_CAP + 1)]
    inserted: list[uuid.UUID] = []
    record = walker.BatchWalker._record

    def record_then_insert(self: walker.BatchWalker, rows: Sequence[sa.Row]) -> None:
        record(self, rows)
        if len(inserted) < TAIL_INSERT_CAP:
            run_id = tail_ids[len(inserted)]
            insert_runs(engine, [make_run(run_id, partition_key="tail")])
            inserted.append(run_id)

    monkeypatch.setattr(walker.BatchWalker, "_record", record_then_insert)
    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    out = capsys.readouterr().out

    # Each pass ends at the last candidate it found when it started.
    passes = [
        record.getMessage().split(" pass")[0]
        for record in caplog.records
        if " pass: walking candidates" in record.getMessage()
    ]
    assert passes == ["main", "catch-up 1", "catch-up 2"]
    # Three batches a pass: the main pass keys the initial runs, each
    # catch-up pass the three tail runs the pass before it inserted.
    assert len(inserted) == 9
    assert counter_values(out)["updated"] == 9
    left = ", ".join(str(run_id) for run_id in inserted[6:])
    assert [
        record.getMessage()
        for record in caplog.records
        if "still lack one" in record.getMessage()
    ] == [
        f"3 runs inserted without a key during the walk still lack one (first: "
        f"{left}); run `workflow-run-key-backfill` to key them"
    ]
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


# -- many writers during a whole backfill ----------------------------------

INITIAL_RUNS = 40_000
WRITER_PAUSE_S = (0.001, 0.006)
STATUS_STEP = {"pending": "queued", "queued": "running", "waiting": "running"}


class Writer(threading.Thread):
    """Repeats one write in its own autocommit session until stopped.

    Each write is one statement on one row, so a writer never holds a row
    lock while it waits for another lock.
    """

    def __init__(
        self,
        name: str,
        url: str,
        write: Callable[[psycopg.Connection[tuple[object, ...]], random.Random], None],
        seed: int,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.url = url
        self.write = write
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.writes = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as connection:
            while not self.stop_event.is_set():
                try:
                    self.write(connection, self.random)
                    self.writes += 1
                except psycopg.Error as error:
                    self.errors.append(f"{error.sqlstate}: {error}")
                time.sleep(self.random.uniform(*WRITER_PAUSE_S))


class RunBook:
    """Run ids the writers created or deleted, shared between their threads."""

    def __init__(self, initial_ids: list[uuid.UUID]) -> None:
        self.initial_ids = initial_ids
        self.unkeyed_inserts: list[uuid.UUID] = []
        self.keyed_inserts: dict[uuid.UUID, tuple[str, str]] = {}
        self.deleted: set[uuid.UUID] = set()
        self.lock = threading.Lock()


def insert_unkeyed(book: RunBook) -> Callable[..., None]:
    """Insert a run as an old application instance does: without a key."""

    def write(
        connection: psycopg.Connection[tuple[object, ...]], rng: random.Random
    ) -> None:
        run_id = uuid.UUID(int=rng.getrandbits(128))
        status = rng.choice(ACTIVE_STATUSES + FINISHED_STATUSES)
        source = rng.choice(("partition", "event", "none"))
        connection.execute(
            "INSERT INTO workflow_runs (id, workflow_id, status, partition_key, "
            "event_id) VALUES (%s, %s, %s, %s, %s)",
            (
                run_id,
                rng.choice(demo_data.WORKFLOW_IDS),
                status,
                f"Old App {run_id.hex[:12]}" if source == "partition" else None,
                f"old-app-event-{run_id.hex}" if source == "event" else None,
            ),
        )
        with book.lock:
            book.unkeyed_inserts.append(run_id)

    return write


def insert_keyed(book: RunBook) -> Callable[..., None]:
    """Insert an active run with a key, as a new application instance does."""

    def write(
        connection: psycopg.Connection[tuple[object, ...]], rng: random.Random
    ) -> None:
        run_id = uuid.UUID(int=rng.getrandbits(128))
        key = f"New App {run_id.hex[:16]}"
        normalized = f"new-app-{run_id.hex[:16]}"
        connection.execute(
            "INSERT INTO workflow_runs (id, workflow_id, status, run_key, "
            "run_key_normalized) VALUES (%s, %s, %s, %s, %s)",
            (
                run_id,
                rng.choice(demo_data.WORKFLOW_IDS),
                rng.choice(ACTIVE_STATUSES),
                key,
                normalized,
            ),
        )
        with book.lock:
            book.keyed_inserts[run_id] = (key, normalized)

    return write


def advance_status(book: RunBook) -> Callable[..., None]:
    """Move a run forward: to a later active status or to a finished one.

    A finished run never becomes active again, so a status change can never
    make two active runs share a key.
    """

    def write(
        connection: psycopg.Connection[tuple[object, ...]], rng: random.Random
    ) -> None:
        run_id = rng.choice(book.initial_ids)
        finish = rng.choice(FINISHED_STATUSES)
        steps = " ".join(
            f"WHEN '{old}' THEN '{new}'" for old, new in STATUS_STEP.items()
        )
        connection.execute(
            f"UPDATE workflow_runs SET status = CASE status {steps} "
            "WHEN 'running' THEN %s ELSE status END, updated_at = now() "
            "WHERE id = %s",
            (finish, run_id),
        )

    return write


def delete_run(book: RunBook) -> Callable[..., None]:
    """Delete a run that existed before the backfill."""

    def write(
        connection: psycopg.Connection[tuple[object, ...]], rng: random.Random
    ) -> None:
        run_id = rng.choice(book.initial_ids)
        deleted = connection.execute(
            "DELETE FROM workflow_runs WHERE id = %s RETURNING id", (run_id,)
        ).fetchone()
        if deleted is not None:
            with book.lock:
                book.deleted.add(run_id)

    return write


@pytest.mark.slow
def test_backfill_under_concurrent_writers(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    url = libpq_url(database_url)
    with psycopg.connect(url) as connection:
        demo_data.load_runs(connection, INITIAL_RUNS)
    command.upgrade(alembic_cfg, "041_workflow_run_keys")
    with engine.connect() as connection:
        initial_ids = list(
            connection.execute(sa.text("SELECT id FROM workflow_runs")).scalars()
        )
    book = RunBook(initial_ids)
    writers = [
        Writer("old-app-insert", url, insert_unkeyed(book), seed=1),
        Writer("new-app-insert", url, insert_keyed(book), seed=2),
        Writer("status-1", url, advance_status(book), seed=3),
        Writer("status-2", url, advance_status(book), seed=4),
        Writer("delete", url, delete_run(book), seed=5),
    ]
    for writer in writers:
        writer.start()

    runner = start_alembic(
        database_url,
        tmp_path,
        "backfill",
        "upgrade",
        "head",
        knobs={"batch_size": "200", "sleep": "10ms"},
    )
    try:
        status = runner.wait(timeout_s=600)
    finally:
        for writer in writers:
            writer.stop_event.set()
        for writer in writers:
            writer.join(30)
    stderr = runner.stderr()
    assert status == 0, stderr[-3000:]

    # Writers saw no error, and each of them did write.
    assert {writer.name: writer.errors for writer in writers} == {
        writer.name: [] for writer in writers
    }
    for writer in writers:
        assert writer.writes > 100, writer.name
    assert len(book.deleted) > 100

    # The walk ended after at most two catch-up passes, and 042 is stamped.
    passes = re.findall(r"(main|catch-up \d+) pass: walking candidates", stderr)
    assert passes[0] == "main"
    assert set(passes[1:]) <= {"catch-up 1", "catch-up 2"}
    assert len(passes) == len(set(passes))
    assert current_revision(engine) == "042_backfill_workflow_run_keys"

    counters = counter_values(runner.stdout())
    assert counters["failures"] == 0
    assert counters["processed"] == (
        counters["updated"] + counters["skipped"] + counters["failures"]
    )
    assert counters["updated"] > INITIAL_RUNS // 2

    with engine.connect() as connection:
        # Every run that existed at the start and was not deleted has a key.
        unkeyed_initial = connection.execute(
            sa.text(
                "SELECT count(*) FROM workflow_runs "
                "WHERE run_key IS NULL AND id = ANY(:ids)"
            ),
            {"ids": initial_ids},
        ).scalar_one()
        assert unkeyed_initial == 0

        # No two active runs of a workflow share a normalized key.
        duplicates = connection.execute(
            sa.text(
                "SELECT workflow_id, run_key_normalized FROM workflow_runs "
                "WHERE status = ANY(:active) AND run_key_normalized IS NOT NULL "
                "GROUP BY 1, 2 HAVING count(*) > 1"
            ),
            {"active": list(ACTIVE_STATUSES)},
        ).all()
        assert duplicates == []

        # The ledger has one row per key the backfill wrote, and each run
        # still there still has that key.
        ledger_rows = connection.execute(
            sa.text("SELECT count(*) FROM workflow_run_key_backfill_ledger")
        ).scalar_one()
        assert ledger_rows == counters["updated"]
        mismatched = connection.execute(
            sa.text(
                "SELECT count(*) FROM workflow_run_key_backfill_ledger l "
                "JOIN workflow_runs r ON r.id = l.run_id "
                "WHERE (r.run_key, r.run_key_normalized) "
                "IS DISTINCT FROM (l.run_key, l.run_key_normalized)"
            )
        ).scalar_one()
        assert mismatched == 0

        # Keys the application wrote were left alone and not recorded.
        app_ids = list(book.keyed_inserts)
        app_keys = {
            row.id: (row.run_key, row.run_key_normalized)
            for row in connection.execute(
                sa.text(
                    "SELECT id, run_key, run_key_normalized FROM workflow_runs "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": app_ids},
            )
        }
        assert app_keys == book.keyed_inserts
        recorded_app_runs = connection.execute(
            sa.text(
                "SELECT count(*) FROM workflow_run_key_backfill_ledger "
                "WHERE run_id = ANY(:ids)"
            ),
            {"ids": app_ids},
        ).scalar_one()
        assert recorded_app_runs == 0

        # Runs still without a key are old-application inserts that came
        # after the last pass, and the final warning counts them.
        unkeyed = set(
            connection.execute(
                sa.text("SELECT id FROM workflow_runs WHERE run_key IS NULL")
            ).scalars()
        )
    assert unkeyed <= set(book.unkeyed_inserts)
    left = re.search(
        r"(\d+) runs inserted without a key during the walk still lack one "
        r"\(first: ([^)]*)\)",
        stderr,
    )
    if left is not None:
        assert passes == ["main", "catch-up 1", "catch-up 2"]
        left_count, left_ids = int(left.group(1)), left.group(2).split(", ")
        assert 0 < left_count <= len(unkeyed)
        assert len(left_ids) == min(left_count, 10)
        assert {uuid.UUID(run_id) for run_id in left_ids} <= unkeyed
