"""Batches that fail: a run locked by another session, a statement timeout.

A failing batch is retried, then split in halves down to a single run,
and a single run that still fails is counted once as a failure and passed
over. 042 is still stamped, as it is when runs inserted during the walk
are left after the catch-up passes, because a failure leaves a run in the
same state. A warning names each such run and the command that keys it.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from migrations_support import walker
from migrations_support.backfill import CATCH_UP_COMMAND, run_walk
from migrations_support.settings import BackfillSettings
from tests.helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    fetch_ledger,
    make_run,
    upgrade_to_041,
)

RUN_IDS = [uuid.UUID(f"{n:08x}-0000-4000-8000-000000000000") for n in range(1, 13)]


def upgrade_head(cfg: Config, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    command.upgrade(cfg, "head")
    return capsys.readouterr().out


def walker_warnings(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.getMessage().startswith(start)
    ]


def max_failed_attempts(batch_size: int) -> int:
    """Return the failed attempts one bad run may cost: two per halving."""
    return walker.RETRIES_PER_SIZE * (int(math.log2(batch_size)) + 1)


@pytest.fixture
def fast_batch_retries(alembic_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walker, "RETRY_BACKOFF_S", 0.01)


@pytest.mark.usefixtures("fast_batch_retries")
def test_locked_run_counted_as_one_failure(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [make_run(run_id, partition_key=f"p{n}") for n, run_id in enumerate(RUN_IDS)]
    upgrade_to_041(alembic_cfg, engine, runs)
    locked = RUN_IDS[5]
    monkeypatch.setenv("RUN_KEY_BACKFILL_LOCK_TIMEOUT", "100ms")
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "16")
    caplog.set_level(logging.INFO, logger="migrations_support")

    with engine.connect() as holder:
        holder.execute(
            sa.text("SELECT 1 FROM workflow_runs WHERE id = :id FOR UPDATE"),
            {"id": locked},
        )
        out = upgrade_head(alembic_cfg, capsys)
        holder.rollback()

    assert counter_values(out) == {
        "processed": 12,
        "updated": 11,
        "skipped": 0,
        "conflicts": 0,
        "failures": 1,
    }
    keys = fetch_keys(engine)
    assert keys[locked] == (None, None)
    for n, run_id in enumerate(RUN_IDS):
        if run_id != locked:
            assert keys[run_id] == (f"p{n}", f"p{n}")
    assert set(fetch_ledger(engine)) == set(RUN_IDS) - {locked}
    assert walker_warnings(caplog, "run ") == [
        f"run {locked} could not be keyed after retries; counted as a failure"
    ]
    failed_attempts = walker_warnings(caplog, "batch of ")
    assert 0 < len(failed_attempts) <= max_failed_attempts(16)
    for line in failed_attempts:
        assert line.endswith("canceling statement due to lock timeout")
    assert walker_warnings(caplog, "1 runs could not be keyed") == [
        f"1 runs could not be keyed after retries (first: {locked}); run "
        f"`{CATCH_UP_COMMAND}` to key them once whatever held them is gone"
    ]
    # No catch-up pass: a failed run is not retried within this walk.
    assert not [r for r in caplog.records if "catch-up" in r.getMessage()]
    assert current_revision(engine) == "042_backfill_workflow_run_keys"

    # Once the lock is gone, another walk keys the run.
    with engine.connect() as connection:
        result = run_walk(connection, BackfillSettings(), io.StringIO())
    assert result.counters.updated == 1
    assert result.counters.failures == 0
    assert fetch_keys(engine)[locked] == ("p5", "p5")


def test_lock_released_within_timeout_is_waited_for(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = [make_run(run_id, partition_key=f"p{n}") for n, run_id in enumerate(RUN_IDS)]
    upgrade_to_041(alembic_cfg, engine, runs)
    locked = RUN_IDS[5]
    caplog.set_level(logging.WARNING, logger="migrations_support")

    # The application keys the run in a transaction that ends within the
    # default 2 s lock timeout. The batch waits for the row, finds that it
    # has a key now and counts it as skipped: another writer keyed it.
    holder = engine.connect()
    holder.execute(
        sa.text(
            "UPDATE workflow_runs SET run_key = 'App', run_key_normalized = 'app' "
            "WHERE id = :id"
        ),
        {"id": locked},
    )
    timer = threading.Timer(0.5, lambda: (holder.commit(), holder.close()))
    timer.start()
    try:
        out = upgrade_head(alembic_cfg, capsys)
    finally:
        timer.join(10)

    assert counter_values(out) == {
        "processed": 12,
        "updated": 11,
        "skipped": 1,
        "conflicts": 0,
        "failures": 0,
    }
    assert fetch_keys(engine)[locked] == ("App", "app")
    assert locked not in fetch_ledger(engine)
    assert walker_warnings(caplog, "") == [
        f"run {locked} was keyed or deleted by another writer during its batch; skipped"
    ]


SLOW_BATCH_TRIGGER = """
CREATE FUNCTION slow_big_batches() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM changed) > 5 THEN
        PERFORM pg_sleep(10);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER slow_big_batches AFTER UPDATE ON workflow_runs
REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
EXECUTE FUNCTION slow_big_batches();
"""

SLOW_RUN_TRIGGER = """
CREATE FUNCTION slow_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.partition_key = 'slow' THEN
        PERFORM pg_sleep(10);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_run BEFORE UPDATE ON workflow_runs
FOR EACH ROW EXECUTE FUNCTION slow_run();
"""


def add_trigger(engine: sa.Engine, ddl: str) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(ddl)


@pytest.mark.usefixtures("fast_batch_retries")
def test_timed_out_batch_split_until_it_fits(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_ids = RUN_IDS[:10]
    runs = [make_run(run_id, partition_key=f"p{n}") for n, run_id in enumerate(run_ids)]
    upgrade_to_041(alembic_cfg, engine, runs)
    # Updating more than 5 runs in one statement sleeps past the timeout.
    add_trigger(engine, SLOW_BATCH_TRIGGER)
    monkeypatch.setenv("RUN_KEY_BACKFILL_STATEMENT_TIMEOUT", "300ms")
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "10")
    caplog.set_level(logging.WARNING, logger="migrations_support")

    out = upgrade_head(alembic_cfg, capsys)

    assert counter_values(out) == {
        "processed": 10,
        "updated": 10,
        "skipped": 0,
        "conflicts": 0,
        "failures": 0,
    }
    assert walker_warnings(caplog, "") == [
        f"batch of 10 from run {walker.FIRST_ID} failed (attempt 1 of 2): "
        "canceling statement due to statement timeout",
        f"batch of 10 from run {walker.FIRST_ID} failed (attempt 2 of 2): "
        "canceling statement due to statement timeout",
        f"splitting the batch from run {walker.FIRST_ID} into 5",
    ]
    assert fetch_keys(engine) == {
        run_id: (f"p{n}", f"p{n}") for n, run_id in enumerate(run_ids)
    }


@pytest.mark.usefixtures("fast_batch_retries")
def test_timed_out_run_counted_as_one_failure(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_ids = RUN_IDS[:8]
    slow = run_ids[3]
    runs = [
        make_run(run_id, partition_key="slow" if run_id == slow else f"p{n}")
        for n, run_id in enumerate(run_ids)
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    add_trigger(engine, SLOW_RUN_TRIGGER)
    monkeypatch.setenv("RUN_KEY_BACKFILL_STATEMENT_TIMEOUT", "300ms")
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "8")
    caplog.set_level(logging.WARNING, logger="migrations_support")

    out = upgrade_head(alembic_cfg, capsys)

    assert counter_values(out) == {
        "processed": 8,
        "updated": 7,
        "skipped": 0,
        "conflicts": 0,
        "failures": 1,
    }
    keys = fetch_keys(engine)
    assert keys[slow] == (None, None)
    for n, run_id in enumerate(run_ids):
        if run_id != slow:
            assert keys[run_id] == (f"p{n}", f"p{n}")
    assert walker_warnings(caplog, "run ") == [
        f"run {slow} could not be keyed after retries; counted as a failure"
    ]
    failed_attempts = walker_warnings(caplog, "batch of ")
    assert 0 < len(failed_attempts) <= max_failed_attempts(8)
    for line in failed_attempts:
        assert line.endswith("canceling statement due to statement timeout")
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
