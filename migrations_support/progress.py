"""Progress of a backfill walk on standard error: runs done, runs left, rate, ETA.

The count of runs left comes from an estimate made once before the walk:
an exact count on small tables, else ``pg_class.reltuples`` scaled by the
fraction of ``run_key`` values that ``pg_stats`` records as NULL.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import sqlalchemy as sa

from migrations_support.metrics import BackfillCounters
from migrations_support.schema import workflow_runs

log = logging.getLogger(__name__)

# Up to this many rows (by pg_class.reltuples) the candidates are counted
# exactly. The count is one sequential scan, so larger tables use statistics.
EXACT_COUNT_MAX_ROWS = 1_000_000
# Batch lines come at INFO at most this often; the others go to DEBUG.
INFO_INTERVAL_S = 5.0

_TABLE_STATISTICS = sa.text(
    "SELECT c.reltuples, s.null_frac "
    "FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_stats s ON s.schemaname = n.nspname "
    "AND s.tablename = c.relname AND s.attname = 'run_key' "
    "WHERE c.oid = to_regclass(:table_name)"
)


@dataclasses.dataclass(frozen=True)
class CandidateEstimate:
    """Runs without a key before the walk, and whether the number was counted."""

    count: int
    exact: bool


def count_candidates(connection: sa.Connection) -> int:
    """Return the number of runs whose ``run_key`` is NULL, counted exactly."""
    query = (
        sa.select(sa.func.count())
        .select_from(workflow_runs)
        .where(workflow_runs.c.run_key.is_(None))
    )
    with connection.begin():
        return int(connection.execute(query).scalar_one())


def estimate_candidates(
    connection: sa.Connection, exact_count_max_rows: int = EXACT_COUNT_MAX_ROWS
) -> CandidateEstimate:
    """Estimate the runs without a key from the planner's statistics.

    The table is counted exactly when it has never been analyzed
    (``reltuples`` is -1 from PostgreSQL 14 on) or is small. Without
    statistics for ``run_key`` (no ANALYZE since revision 041 added it)
    every row counts as a candidate, an upper bound.
    """
    with connection.begin():
        statistics = connection.execute(
            _TABLE_STATISTICS, {"table_name": workflow_runs.name}
        ).one()
    reltuples = float(statistics.reltuples)
    if reltuples < exact_count_max_rows:
        return CandidateEstimate(count_candidates(connection), exact=True)
    null_fraction = 1.0 if statistics.null_frac is None else statistics.null_frac
    return CandidateEstimate(round(reltuples * float(null_fraction)), exact=False)


def format_duration(seconds: float) -> str:
    """Return ``seconds`` as ``42 s``, ``3 min 20 s`` or ``2 h 5 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


class ProgressReporter:
    """Logs one line per batch with the runs done, runs left, rate and ETA.

    It is a ``walker.BatchSink``. A batch's line goes to INFO when it is the
    first or when ``info_interval_s`` have passed since the last INFO line,
    so a large table logs a line every few seconds. The others go to DEBUG,
    which ``--verbose`` shows.
    """

    def __init__(
        self,
        estimate: CandidateEstimate,
        info_interval_s: float = INFO_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.estimate = estimate
        self.info_interval_s = info_interval_s
        self.clock = clock
        self.started = clock()
        self.last_info: float | None = None
        self.batch_number = 0

    def __call__(self, batch: BackfillCounters, totals: BackfillCounters) -> None:
        self.batch_number += 1
        now = self.clock()
        due = self.last_info is None or now - self.last_info >= self.info_interval_s
        if due:
            self.last_info = now
        log.log(
            logging.INFO if due else logging.DEBUG,
            "batch %d: read %d, updated %d, skipped %d, conflicts %d; %s",
            self.batch_number,
            batch.processed,
            batch.updated,
            batch.skipped,
            batch.conflicts,
            self.describe_progress(totals, now),
        )

    def describe_progress(self, totals: BackfillCounters, now: float) -> str:
        """Return ``1500 of about 10000 runs done (15%), ...`` for ``totals``."""
        total = max(self.estimate.count, totals.processed)
        left = total - totals.processed
        percent = 100 * totals.processed // total if total else 100
        about = "" if self.estimate.exact else "about "
        elapsed_s = now - self.started
        text = f"{totals.processed} of {about}{total} runs done ({percent}%)"
        if elapsed_s <= 0 or totals.processed == 0:
            return f"{text}, {about}{left} left"
        rate = totals.processed / elapsed_s
        return (
            f"{text}, {about}{left} left, {rate:.0f} runs/s, "
            f"about {format_duration(left / rate)} remaining"
        )

    def summarize(
        self, totals: BackfillCounters, remaining: int, dry_run: bool
    ) -> None:
        """Log the closing line: the counters, the time taken and the runs left.

        For a dry run, ``remaining`` is what a real run would leave.
        """
        elapsed_s = self.clock() - self.started
        rate = totals.processed / elapsed_s if elapsed_s > 0 else 0.0
        log.info(
            "%s in %s: processed %d, updated %d, skipped %d, conflicts %d, "
            "failures %d (%.0f runs/s); %d runs %s lack a key",
            "dry run finished" if dry_run else "finished",
            format_duration(elapsed_s),
            totals.processed,
            totals.updated,
            totals.skipped,
            totals.conflicts,
            totals.failures,
            rate,
            remaining,
            "would still" if dry_run else "still",
        )
