"""The batch walker: key every candidate in committed keyset batches on ``id``.

Each batch is one statement in its own short transaction, with
lock_timeout and statement_timeout set ``LOCAL`` to it, so the settings
never leak into the session and a crash loses at most the batch in flight.
A failed batch is retried, then split in halves down to single runs; a
single run that still fails is counted as a failure and passed over.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from migrations_support import batches
from migrations_support.metrics import BackfillCounters
from migrations_support.schema import workflow_runs
from migrations_support.settings import BackfillSettings

log = logging.getLogger(__name__)

FIRST_ID = uuid.UUID(int=0)
LAST_ID = uuid.UUID(int=2**128 - 1)
CATCH_UP_PASSES = 2
RETRIES_PER_SIZE = 2
RETRY_BACKOFF_S = 0.1
REMAINING_IDS_SHOWN = 10

# SQLSTATE classes and codes a batch may hit because of other sessions or
# one bad row: retrying or splitting the batch can get past them.
_RETRYABLE_CLASSES = ("22", "23", "40")
_RETRYABLE_CODES = ("55P03", "57014")

CandidateSink = Callable[[sa.Row], None]
# Called with one batch's counts and the running totals of the walk.
BatchSink = Callable[[BackfillCounters, BackfillCounters], None]


@dataclasses.dataclass
class WalkResult:
    """Counters, remaining candidates and cap state of one finished walk."""

    counters: BackfillCounters
    remaining: int
    stopped_at_cap: bool
    remaining_ids: list[uuid.UUID]
    # Runs counted as failures, in the order the walk met them.
    failed_ids: list[uuid.UUID] = dataclasses.field(default_factory=list)


class _BatchFailed(Exception):
    """A batch failed with an error that splitting may get past."""


def next_id(run_id: uuid.UUID) -> uuid.UUID | None:
    """Return the uuid after ``run_id``, or None after the last one."""
    return None if run_id == LAST_ID else uuid.UUID(int=run_id.int + 1)


def _is_retryable(error: DBAPIError) -> bool:
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    return sqlstate in _RETRYABLE_CODES or sqlstate[:2] in _RETRYABLE_CLASSES


def _error_line(error: DBAPIError) -> str:
    lines = str(error.orig).strip().splitlines()
    return lines[0] if lines else type(error.orig).__name__


class BatchWalker:
    """Walks the candidates of one table once per pass, writing or previewing keys.

    ``on_candidate`` receives each candidate row. ``on_batch``, when given,
    receives each batch's counts in place of the walker's own batch log
    line, so a progress reporter can log one line per batch.
    """

    def __init__(
        self,
        connection: sa.Connection,
        settings: BackfillSettings,
        on_candidate: CandidateSink | None = None,
        on_batch: BatchSink | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.on_candidate = on_candidate
        self.on_batch = on_batch
        self.counters = BackfillCounters()
        self.excluded: list[uuid.UUID] = []
        self.failed: list[uuid.UUID] = []
        self.batch_number = 0
        self.max_batch_ms = 0.0
        inputs = batches.bound_inputs()
        if settings.dry_run:
            self.statement = batches.preview_batch_statement(
                inputs, settings.on_conflict, batches.bound_pending()
            )
        else:
            self.statement = batches.key_batch_statement(inputs, settings.on_conflict)
        self.derive_statement = batches.derive_batch_statement(inputs)
        # Keys a dry run would have written: (workflow_id, key) -> run id.
        self.pending: dict[tuple[str, str], uuid.UUID] = {}

    # -- the walk ---------------------------------------------------------

    def run(self) -> WalkResult:
        """Walk all candidates, then up to two catch-up passes for late inserts."""
        started = time.monotonic()
        if not self.settings.dry_run:
            self._refresh_statistics()
        self._walk_pass("main")
        passes = 0 if self.settings.dry_run else CATCH_UP_PASSES
        for number in range(1, passes + 1):
            if self._cap_reached() or self._count_remaining() == 0:
                break
            self._walk_pass(f"catch-up {number}")

        remaining, remaining_ids = (
            (0, []) if self.settings.dry_run else self._remaining()
        )
        log.info(
            "walk finished in %.1f s: %d batches, max batch %.0f ms",
            time.monotonic() - started,
            self.batch_number,
            self.max_batch_ms,
        )
        return WalkResult(
            self.counters,
            remaining,
            self._cap_reached(),
            remaining_ids,
            failed_ids=list(self.failed),
        )

    def _refresh_statistics(self) -> None:
        """ANALYZE the table so the planner reads batches from the candidate index.

        With statistics older than the last mass change of run_key (a
        downgrade, say) the planner can expect few candidates and sort them
        all instead of reading the first batch in id order. ANALYZE takes a
        lock that does not block writers; a failure only costs speed.
        """
        try:
            with self.connection.begin():
                self._set_local_settings()
                self.connection.execute(sa.text("ANALYZE workflow_runs"))
        except DBAPIError as error:
            log.warning(
                "ANALYZE workflow_runs failed, continuing: %s", _error_line(error)
            )

    def _walk_pass(self, name: str) -> None:
        log.info(
            "%s pass: walking candidates in batches of %d",
            name,
            self.settings.batch_size,
        )
        # The pass ends at the last candidate it finds when it starts. Runs
        # inserted after that id, as time-ordered ids always are, wait for
        # the next pass instead of keeping this one going for ever.
        last_id = self._last_candidate_id()
        lower: uuid.UUID | None = FIRST_ID
        limit = self.settings.batch_size
        # Candidates of a failed batch that the walk has not passed yet. It
        # keeps the split size over them, so each halving meets the failing
        # run once instead of once more after every half that succeeds.
        split_left = 0
        while (
            lower is not None
            and last_id is not None
            and lower <= last_id
            and not self._cap_reached()
        ):
            limit = min(limit, self._cap_left())
            try:
                rows = self._run_batch(lower, limit)
            except _BatchFailed:
                split_left = split_left or limit
                if limit > 1:
                    limit = max(1, limit // 2)
                    log.warning("splitting the batch from run %s into %d", lower, limit)
                    continue
                lower = self._fail_single(lower)
                split_left = 0
            else:
                if not rows:
                    return
                self._record(rows)
                lower = next_id(rows[-1].id)
                split_left = max(0, split_left - len(rows))
                if self.settings.sleep_ms:
                    time.sleep(self.settings.sleep_ms / 1000)
            limit = min(limit, split_left) if split_left else self.settings.batch_size

    # -- one batch ----------------------------------------------------------

    def _run_batch(self, lower: uuid.UUID, limit: int) -> Sequence[sa.Row]:
        """Run one batch with retries; raise ``_BatchFailed`` when they run out."""
        for attempt in range(1, RETRIES_PER_SIZE + 1):
            started = time.monotonic()
            try:
                rows = self._execute_batch(lower, limit)
            except DBAPIError as error:
                if not _is_retryable(error):
                    raise
                log.warning(
                    "batch of %d from run %s failed (attempt %d of %d): %s",
                    limit,
                    lower,
                    attempt,
                    RETRIES_PER_SIZE,
                    _error_line(error),
                )
                time.sleep(RETRY_BACKOFF_S * attempt)
                continue
            elapsed_ms = (time.monotonic() - started) * 1000
            self.max_batch_ms = max(self.max_batch_ms, elapsed_ms)
            return rows
        raise _BatchFailed

    def _execute_batch(self, lower: uuid.UUID, limit: int) -> Sequence[sa.Row]:
        params: dict[str, object] = {
            "lower_id": lower,
            "batch_limit": limit,
            "excluded_ids": self.excluded,
        }
        with self.connection.begin():
            self._set_local_settings()
            if self.settings.dry_run:
                params.update(self._pending_params(params))
            return self.connection.execute(self.statement, params).all()

    def _set_local_settings(self) -> None:
        """Set the batch's timeouts and planner settings for its transaction only.

        set_config(..., true) is SET LOCAL, so nothing outlives the batch.
        JIT compilation of this many expressions costs more than the batch
        (about 250 ms against 20 ms on PostgreSQL 15 with its default
        jit_above_cost). Sequential and bitmap scans are turned off so the
        batch always reads its candidates in id order from the candidate
        index: with statistics from before the key columns existed, the
        planner would otherwise sort every candidate to take the first 500.
        """
        lock_timeout = f"{self.settings.lock_timeout_ms}ms"
        statement_timeout = f"{self.settings.statement_timeout_ms}ms"
        self.connection.execute(
            sa.select(
                sa.func.set_config("lock_timeout", lock_timeout, True),
                sa.func.set_config("statement_timeout", statement_timeout, True),
                sa.func.set_config("jit", "off", True),
                sa.func.set_config("enable_seqscan", "off", True),
                sa.func.set_config("enable_bitmapscan", "off", True),
            )
        )

    def _pending_params(self, params: dict[str, object]) -> dict[str, object]:
        """Return the remembered keys this batch can collide with, as arrays.

        Passing only those keeps each statement small however many keys the
        dry run remembers.
        """
        relevant: dict[tuple[str, str], uuid.UUID] = {}
        for row in self.connection.execute(self.derive_statement, params):
            hex_id = row.id.hex
            for key in (
                row.run_key_normalized,
                f"{row.run_key_normalized}-{hex_id[: batches.SHORT_SUFFIX_HEX_DIGITS]}",
                f"{row.run_key_normalized}-{hex_id}",
            ):
                holder = self.pending.get((row.workflow_id, key))
                if holder is not None:
                    relevant[(row.workflow_id, key)] = holder
        return {
            "pending_workflow_ids": [workflow_id for workflow_id, _ in relevant],
            "pending_keys": [key for _, key in relevant],
            "pending_run_ids": list(relevant.values()),
        }

    def _fail_single(self, lower: uuid.UUID) -> uuid.UUID | None:
        """Count the first candidate from ``lower`` as failed and pass over it."""
        with self.connection.begin():
            self._set_local_settings()
            run_id = self.connection.execute(
                sa.select(workflow_runs.c.id)
                .where(workflow_runs.c.run_key.is_(None), workflow_runs.c.id >= lower)
                .where(
                    workflow_runs.c.id
                    != sa.func.all_(sa.bindparam("excluded", self.excluded))
                )
                .order_by(workflow_runs.c.id)
                .limit(1)
            ).scalar()
        if run_id is None:
            return None
        log.warning(
            "run %s could not be keyed after retries; counted as a failure", run_id
        )
        self.excluded.append(run_id)
        self.failed.append(run_id)
        self.counters.processed += 1
        self.counters.failures += 1
        return next_id(run_id)

    # -- bookkeeping -------------------------------------------------------

    def _record(self, rows: Sequence[sa.Row]) -> None:
        self.batch_number += 1
        batch = BackfillCounters(processed=len(rows))
        for row in rows:
            if row.outcome == batches.OUTCOME_TAKEN:
                batch.skipped += 1
                log.warning(
                    "run %s was keyed or deleted by another writer during its "
                    "batch; skipped",
                    row.id,
                )
                continue
            if row.holder_id is not None:
                batch.conflicts += 1
                self._warn_conflict(row)
            if row.outcome == batches.OUTCOME_UPDATED and (
                row.written or self.settings.dry_run
            ):
                batch.updated += 1
                if self.settings.dry_run and row.active:
                    self.pending[(row.workflow_id, row.final_normalized)] = row.id
            else:
                batch.skipped += 1
                self.excluded.append(row.id)
            if self.on_candidate is not None:
                self.on_candidate(row)
        self.counters.add(batch)
        if self.on_batch is not None:
            self.on_batch(batch, self.counters)
            return
        log.info(
            "batch %d: read %d, updated %d, skipped %d, conflicts %d; total updated %d",
            self.batch_number,
            batch.processed,
            batch.updated,
            batch.skipped,
            batch.conflicts,
            self.counters.updated,
        )

    def _warn_conflict(self, row: sa.Row) -> None:
        if row.outcome == batches.OUTCOME_UPDATED:
            action = f"keyed as {row.final_normalized!r}"
        else:
            action = "left without a key"
        log.warning(
            "conflict: run %s of workflow %r derives key %r, "
            "already held by run %s; %s",
            row.id,
            row.workflow_id,
            row.run_key_normalized,
            row.holder_id,
            action,
        )

    def _cap_left(self) -> int:
        if self.settings.max_updates is None:
            return self.settings.batch_size
        return self.settings.max_updates - self.counters.updated

    def _cap_reached(self) -> bool:
        return self._cap_left() <= 0

    def _candidates_left(self) -> sa.Select:
        return sa.select(workflow_runs.c.id).where(
            workflow_runs.c.run_key.is_(None),
            workflow_runs.c.id != sa.func.all_(sa.bindparam("excluded", self.excluded)),
        )

    def _last_candidate_id(self) -> uuid.UUID | None:
        # PostgreSQL 15 has no max(uuid); this reads the candidate index
        # backwards instead.
        query = self._candidates_left().order_by(workflow_runs.c.id.desc()).limit(1)
        with self.connection.begin():
            self._set_local_settings()
            last_id = self.connection.execute(query).scalar()
        return None if last_id is None else uuid.UUID(str(last_id))

    def _count_remaining(self) -> int:
        query = sa.select(sa.func.count()).select_from(
            self._candidates_left().subquery()
        )
        with self.connection.begin():
            self._set_local_settings()
            return int(self.connection.execute(query).scalar_one())

    def _remaining(self) -> tuple[int, list[uuid.UUID]]:
        """Return the count of candidates left and the first of their ids.

        One statement reads both, so the count and the ids agree while
        writers keep inserting runs.
        """
        query = (
            self._candidates_left()
            .add_columns(sa.func.count().over().label("total"))
            .order_by(workflow_runs.c.id)
            .limit(REMAINING_IDS_SHOWN)
        )
        with self.connection.begin():
            self._set_local_settings()
            rows = self.connection.execute(query).all()
        if not rows:
            return 0, []
        return int(rows[0].total), [uuid.UUID(str(row.id)) for row in rows]
