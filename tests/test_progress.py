"""Progress reporting: the candidate estimate and the per-batch lines."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from alembic.config import Config
from helpers import insert_runs, make_run, upgrade_to_041

from migrations_support.metrics import BackfillCounters
from migrations_support.progress import (
    CandidateEstimate,
    ProgressReporter,
    estimate_candidates,
    format_duration,
)


class FakeClock:
    """A clock the test moves by hand, in seconds."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0 s"),
        (59.4, "59 s"),
        (60, "1 min 0 s"),
        (200, "3 min 20 s"),
        (7500, "2 h 5 min"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_reporter_logs_rate_and_remaining(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(CandidateEstimate(1000, exact=True), 5.0, clock)
    totals = BackfillCounters()
    caplog.set_level(logging.DEBUG, logger="migrations_support.progress")

    for elapsed_s in (1.0, 2.0, 6.5):
        batch = BackfillCounters(processed=100, updated=99, skipped=1, conflicts=1)
        totals.add(batch)
        clock.now = 100.0 + elapsed_s
        reporter(batch, totals)

    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (
            logging.INFO,
            "batch 1: read 100, updated 99, skipped 1, conflicts 1; 100 of 1000 runs "
            "done (10%), 900 left, 100 runs/s, about 9 s remaining",
        ),
        (
            logging.DEBUG,
            "batch 2: read 100, updated 99, skipped 1, conflicts 1; 200 of 1000 runs "
            "done (20%), 800 left, 100 runs/s, about 8 s remaining",
        ),
        (
            logging.INFO,
            "batch 3: read 100, updated 99, skipped 1, conflicts 1; 300 of 1000 runs "
            "done (30%), 700 left, 46 runs/s, about 15 s remaining",
        ),
    ]


def test_reporter_marks_estimate_and_overrun() -> None:
    clock = FakeClock()
    reporter = ProgressReporter(CandidateEstimate(100, exact=False), 5.0, clock)
    clock.now += 2.0
    text = reporter.describe_progress(BackfillCounters(processed=150), clock.now)
    assert text == (
        "150 of about 150 runs done (100%), about 0 left, 75 runs/s, "
        "about 0 s remaining"
    )


def test_summary_line_for_dry_run(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(CandidateEstimate(10, exact=True), 5.0, clock)
    clock.now += 2.0
    caplog.set_level(logging.INFO, logger="migrations_support.progress")
    reporter.summarize(BackfillCounters(processed=10, updated=10), 4, dry_run=True)
    assert caplog.messages == [
        "dry run finished in 2 s: processed 10, updated 10, skipped 0, conflicts 0, "
        "failures 0 (5 runs/s); 4 runs would still lack a key"
    ]


def test_estimate_counts_small_table(alembic_cfg: Config, engine: sa.Engine) -> None:
    upgrade_to_041(
        alembic_cfg, engine, [make_run(partition_key=f"p{n}") for n in range(7)]
    )
    with engine.connect() as connection:
        estimate = estimate_candidates(connection)
    assert estimate == CandidateEstimate(7, exact=True)


def test_estimate_uses_statistics(alembic_cfg: Config, engine: sa.Engine) -> None:
    runs = [make_run(partition_key=f"p{n}") for n in range(40)]
    keyed = [
        make_run(partition_key=f"k{n}", run_key=f"k{n}", run_key_normalized=f"k{n}")
        for n in range(10)
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    insert_runs(engine, keyed)
    with engine.connect() as connection:
        connection.execute(sa.text("ANALYZE workflow_runs"))
        connection.commit()
        estimate = estimate_candidates(connection, exact_count_max_rows=0)
    # ANALYZE reads every row of a table this small, so the statistics are exact.
    assert estimate == CandidateEstimate(40, exact=False)
