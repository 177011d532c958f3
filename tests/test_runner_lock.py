"""Two ``alembic upgrade head`` processes on one database: one applies, one waits."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from tests.helpers import counter_values, current_revision, insert_runs, make_run
from tests.processes import start_alembic, wait_until

WAITING_LINE = "another runner has the backfill lock; waiting for it to finish"
RUNS = 50


def test_second_runner_waits_then_finds_nothing(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(partition_key=f"p{n}") for n in range(RUNS)])

    # The ACCESS SHARE lock stops whichever runner takes the runner lock
    # first at ADD COLUMN (for less than its lock timeout and retries), so
    # the other is surely waiting when the first builds the indexes
    # CONCURRENTLY and walks the runs.
    with engine.connect() as blocker:
        blocker.execute(sa.text("LOCK TABLE workflow_runs IN ACCESS SHARE MODE"))
        runners = [
            start_alembic(database_url, tmp_path, f"runner{n}", "upgrade", "head")
            for n in (1, 2)
        ]
        wait_until(
            lambda: any(WAITING_LINE in runner.stderr() for runner in runners),
            timeout_s=60,
            description="one runner to wait for the runner lock",
        )
        blocker.rollback()
    statuses = [runner.wait(timeout_s=120) for runner in runners]

    assert statuses == [0, 0], [runner.stderr()[-2000:] for runner in runners]
    waiters = [runner for runner in runners if WAITING_LINE in runner.stderr()]
    appliers = [runner for runner in runners if WAITING_LINE not in runner.stderr()]
    assert len(waiters) == 1
    assert len(appliers) == 1
    applier, waiter = appliers[0], waiters[0]
    assert "Running upgrade 041_workflow_run_keys -> 042" in applier.stderr()
    assert counter_values(applier.stdout())["updated"] == RUNS
    assert "Running upgrade" not in waiter.stderr()
    assert waiter.stdout() == ""
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
    with engine.connect() as connection:
        unkeyed = connection.execute(
            sa.text("SELECT count(*) FROM workflow_runs WHERE run_key IS NULL")
        ).scalar_one()
    assert unkeyed == 0
