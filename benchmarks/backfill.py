"""Benchmark the run key backfill against a single UPDATE and a row-by-row loop.

Run from the repository root::

    python benchmarks/backfill.py --rows 100000,1000000 --repeat 3

Without ``DATABASE_URL`` it starts the embedded PostgreSQL server. With
``DATABASE_URL`` it uses that server: it creates a database of its own
there (so the role needs CREATEDB), and drops it at the end.

For each row count it upgrades a new database to revision 041 with
Alembic, loads the demo runs with ``demo_data.load_runs`` and copies them
to a snapshot table. Before each contender it restores ``workflow_runs``
from the snapshot (TRUNCATE, INSERT in the snapshot's order, VACUUM
ANALYZE, CHECKPOINT), so every contender starts from the same rows in the
same physical order with the same indexes and statistics. The contenders:

- ``single UPDATE``: one statement that derives and resolves every key with
  ``batches.resolve_keys`` over the whole table and writes the keys and
  their ledger rows.
- ``backfill``: ``walker.BatchWalker`` with ``BackfillSettings()``.
- ``row loop``: reads one candidate, resolves its key with the same SQL
  for that run alone, updates it by id, writes its ledger row and commits,
  run after run. ``--row-loop-limit`` stops it after that many runs, and
  its time for all runs is extrapolated from that sample.
- ``block walk (experiment)``, only with ``--contenders block-walk``: the
  backfill's statement shape over ranges of table pages instead of ids,
  to measure what a physical walk would gain. It is not the contract's
  walk, and its keys differ where conflicts fall in other batches.

Each contender runs in a new process, so its peak resident set size
(``ru_maxrss``) belongs to that contender alone. Meanwhile a writer
process updates ``updated_at`` of random runs, one autocommitted UPDATE
due every ``--writer-interval-ms``, and times each from when it was due.
Its latencies are compared with the same writer on the idle database,
measured right before the contender.

The report (Markdown) goes to standard output, progress to standard error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL

from migrations_support import batches, database, demo_data, embedded
from migrations_support.schema import ledger, workflow_runs
from migrations_support.settings import BackfillSettings
from migrations_support.walker import BatchWalker

log = logging.getLogger("benchmarks.backfill")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_TABLE = "bench_runs_snapshot"
# Contender names on the command line, and as the report shows them.
SINGLE_UPDATE = "single"
BACKFILL = "backfill"
ROW_LOOP = "row-loop"
BLOCK_WALK = "block-walk"
LABELS = {
    SINGLE_UPDATE: "single UPDATE",
    BACKFILL: "backfill",
    ROW_LOOP: "row loop",
    BLOCK_WALK: "block walk (experiment)",
}
DEFAULT_CONTENDERS = (SINGLE_UPDATE, BACKFILL, ROW_LOOP)
WRITER_SAMPLE_IDS = 10_000
WRITER_SEED = 7
WRITER_SQL = "UPDATE workflow_runs SET updated_at = now() WHERE id = %s"
KIB_PER_MIB = 1024


@dataclasses.dataclass(frozen=True)
class ContenderSpec:
    """Contender kind, database URL and sizes for one contender process."""

    kind: str
    url: str
    batch_size: int = BackfillSettings().batch_size
    row_limit: int | None = None
    sleep_ms: int = 0

    @property
    def label(self) -> str:
        """Return the contender's name in the report."""
        label = LABELS[self.kind]
        if self.kind != ROW_LOOP and self.batch_size != BackfillSettings().batch_size:
            label += f", batch {self.batch_size}"
        if self.sleep_ms:
            label += f", sleep {self.sleep_ms} ms"
        return label


@dataclasses.dataclass
class ContenderResult:
    """Timings and memory of one contender run."""

    label: str
    keys_written: int
    elapsed_s: float
    max_batch_ms: float
    start_rss_mib: float
    peak_rss_mib: float
    started: float
    finished: float


@dataclasses.dataclass
class Measurement:
    """One contender run with its writer latencies and the idle baseline."""

    rows: int
    repeat: int
    result: ContenderResult
    candidates: int
    writer_ms: list[float]
    idle_ms: list[float]
    wal_bytes: int
    keys_left: int
    keys_checksum: str

    @property
    def rows_per_s(self) -> float:
        """Return keys written per second."""
        return self.result.keys_written / self.result.elapsed_s

    @property
    def extrapolated(self) -> bool:
        """Return whether the run keyed only a sample of the candidates."""
        return self.result.keys_written < self.candidates

    @property
    def full_time_s(self) -> float:
        """Return the time to key every candidate, extrapolated for a sample."""
        return self.candidates / self.rows_per_s


# -- statements -------------------------------------------------------------


def _candidate_columns() -> list[sa.ColumnElement[Any]]:
    w = workflow_runs
    return [
        w.c.id,
        w.c.workflow_id,
        w.c.status,
        w.c.partition_key,
        w.c.trigger,
        w.c.event_id,
        w.c.created_at,
    ]


def _write_keys(resolved: sa.CTE) -> sa.Select:
    """Return a statement that writes the keys of ``resolved`` and their ledger rows.

    It returns the count of ledger rows written. The insert has no ON
    CONFLICT clause, because each run is keyed at most once per contender
    and the ledger is emptied before each contender.
    """
    to_write = (
        sa.select(resolved)
        .where(resolved.c.outcome == batches.OUTCOME_UPDATED)
        .cte("to_write")
    )
    w = workflow_runs
    updated = (
        sa.update(w)
        .where(w.c.id == to_write.c.id, w.c.run_key.is_(None))
        .values(
            run_key=to_write.c.final_key, run_key_normalized=to_write.c.final_normalized
        )
        .returning(w.c.id, w.c.run_key, w.c.run_key_normalized, to_write.c.source)
        .cte("updated")
    )
    insert = postgresql.insert(ledger).from_select(
        ["run_id", "run_key", "run_key_normalized", "source"], sa.select(updated)
    )
    written = insert.returning(ledger.c.run_id).cte("ledger_rows")
    return sa.select(sa.func.count()).select_from(written)


def single_update_statement() -> sa.Select:
    """Return one statement that keys every candidate, as the batches resolve them.

    The whole table is one batch: conflicts between candidates are decided
    by ``created_at`` and id across the table.
    """
    candidates = (
        sa.select(*_candidate_columns())
        .where(workflow_runs.c.run_key.is_(None))
        .cte("batch")
    )
    resolved = sa.select(batches.resolve_keys(candidates, "suffix")).cte("resolved")
    return _write_keys(resolved)


def one_run_statement() -> sa.Select:
    """Return the row loop's statement for one run: resolve its key and write it."""
    candidate = (
        sa.select(*_candidate_columns())
        .where(
            workflow_runs.c.id == sa.bindparam("run_id"),
            workflow_runs.c.run_key.is_(None),
        )
        .cte("batch")
    )
    resolved = sa.select(batches.resolve_keys(candidate, "suffix")).cte("resolved")
    return _write_keys(resolved)


def block_batch_statement() -> sa.Select:
    """Return the block walk's statement: key the candidates in a range of pages.

    The range is ``first_block`` up to, not including, ``end_block``, read
    with a TID Range Scan (PostgreSQL 14 and later).
    """
    in_blocks = sa.text(
        "workflow_runs.ctid >= ('(' || :first_block || ',0)')::tid "
        "AND workflow_runs.ctid < ('(' || :end_block || ',0)')::tid"
    )
    candidates = (
        sa.select(*_candidate_columns())
        .where(in_blocks, workflow_runs.c.run_key.is_(None))
        .with_for_update()
        .cte("batch")
    )
    resolved = sa.select(batches.resolve_keys(candidates, "suffix")).cte("resolved")
    return _write_keys(resolved)


def next_candidate_statement() -> sa.Select:
    """Return the row loop's read of the next candidate after ``after_id``."""
    w = workflow_runs
    return (
        sa.select(w.c.id)
        .where(w.c.run_key.is_(None), w.c.id > sa.bindparam("after_id"))
        .order_by(w.c.id)
        .limit(1)
    )


# -- contenders (each in its own process) ----------------------------------------


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def _set_session(connection: sa.Connection) -> None:
    # The walker turns JIT off for its batches, so the other contenders run
    # without JIT too and differ only in how they split the work.
    connection.execute(sa.select(sa.func.set_config("jit", "off", False)))
    connection.commit()


def time_single_update(
    connection: sa.Connection, spec: ContenderSpec
) -> tuple[int, float]:
    """Key every run in one statement; return the keys written and its duration.

    It locks each row as its UPDATE reaches it and holds the lock until the
    commit, so its whole duration, an upper bound, is reported as its
    longest batch.
    """
    started = time.monotonic()
    with connection.begin():
        written = connection.execute(single_update_statement()).scalar_one()
    return int(written), (time.monotonic() - started) * 1000


def time_backfill(connection: sa.Connection, spec: ContenderSpec) -> tuple[int, float]:
    """Run the project's walker; return the keys written and its longest batch."""
    settings = BackfillSettings(batch_size=spec.batch_size, sleep_ms=spec.sleep_ms)
    walker = BatchWalker(connection, settings)
    result = walker.run()
    return result.counters.updated, walker.max_batch_ms


def time_row_loop(connection: sa.Connection, spec: ContenderSpec) -> tuple[int, float]:
    """Key runs one at a time; return keys written and the longest transaction."""
    read_next, write_one = next_candidate_statement(), one_run_statement()
    after_id, written, max_ms = uuid.UUID(int=0), 0, 0.0
    while spec.row_limit is None or written < spec.row_limit:
        started = time.monotonic()
        with connection.begin():
            run_id = connection.execute(read_next, {"after_id": after_id}).scalar()
            if run_id is None:
                break
            written += connection.execute(write_one, {"run_id": run_id}).scalar_one()
        max_ms = max(max_ms, (time.monotonic() - started) * 1000)
        after_id = run_id
    return written, max_ms


def time_block_walk(
    connection: sa.Connection, spec: ContenderSpec
) -> tuple[int, float]:
    """Key the runs in batches of table pages, then the rest with the walker.

    This is an experiment, not the project's backfill. Its batches follow
    the physical order, so the conflicts inside a batch, and thus some
    suffixed keys, differ from the walk on id. Each batch spans enough
    pages for about ``batch_size`` runs. A run that another writer moves
    past the last page of the walk is keyed by the walker afterwards.
    """
    with connection.begin():
        end_block, runs_per_block = connection.execute(_TABLE_PAGES).one()
    blocks = max(1, round(spec.batch_size / max(runs_per_block, 1.0)))
    statement, written, max_ms = block_batch_statement(), 0, 0.0
    for first_block in range(0, int(end_block), blocks):
        started = time.monotonic()
        with connection.begin():
            params = {"first_block": first_block, "end_block": first_block + blocks}
            written += connection.execute(statement, params).scalar_one()
        max_ms = max(max_ms, (time.monotonic() - started) * 1000)
    # The walker counts the candidates left before a catch-up pass. That
    # count reads the index entries left by every run keyed so far and
    # marks them dead, so the first catch-up batch does not scan them while
    # it holds row locks.
    with connection.begin():
        connection.execute(_CANDIDATES_LEFT).scalar_one()
    rest, rest_max_ms = time_backfill(connection, spec)
    return written + rest, max(max_ms, rest_max_ms)


# Pages of workflow_runs now, and the average runs per page from statistics.
_TABLE_PAGES = sa.text(
    "SELECT pg_relation_size('workflow_runs') / current_setting('block_size')::int, "
    "reltuples / greatest(relpages, 1) FROM pg_class "
    "WHERE oid = 'workflow_runs'::regclass"
)

_CANDIDATES_LEFT = sa.select(sa.func.count()).where(workflow_runs.c.run_key.is_(None))

_CONTENDERS: dict[str, Callable[[sa.Connection, ContenderSpec], tuple[int, float]]] = {
    SINGLE_UPDATE: time_single_update,
    BACKFILL: time_backfill,
    ROW_LOOP: time_row_loop,
    BLOCK_WALK: time_block_walk,
}


def run_contender(spec: ContenderSpec) -> ContenderResult:
    """Run one contender in this (new) process and measure it."""
    # The walker logs each batch and conflict; writing them to /dev/null
    # keeps their formatting cost in the timing without flooding the report.
    handler = logging.FileHandler(os.devnull)
    logging.getLogger("migrations_support").addHandler(handler)
    logging.getLogger("migrations_support").setLevel(logging.INFO)
    engine = database.create_engine(sa.make_url(spec.url))
    with engine.connect() as connection:
        _set_session(connection)
        start_rss = _peak_rss_mib()
        started = time.monotonic()
        written, max_batch_ms = _CONTENDERS[spec.kind](connection, spec)
        finished = time.monotonic()
    engine.dispose()
    return ContenderResult(
        spec.label,
        written,
        finished - started,
        max_batch_ms,
        start_rss,
        _peak_rss_mib(),
        started,
        finished,
    )


def run_in_new_process(spec: ContenderSpec) -> ContenderResult:
    """Run a contender in a fresh interpreter and return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_contender, spec).result()


# -- the concurrent writer ------------------------------------------------------


def run_writer(
    conninfo: str,
    run_ids: list[uuid.UUID],
    interval_s: float,
    ready: Event,
    stop: Event,
    results: Pipe,
) -> None:
    """Update ``updated_at`` of random runs until ``stop``; send (due, ms) pairs.

    Updates are due on a fixed schedule, one every ``interval_s``, and each
    latency counts from when the update was due. A blocked update therefore
    also delays the updates due while it waits, as the requests of a real
    application would queue, instead of leaving one slow sample.
    """
    rng = random.Random(WRITER_SEED)
    samples: list[tuple[float, float]] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        due = time.monotonic()
        while not stop.is_set():
            conn.execute(WRITER_SQL, (rng.choice(run_ids),), prepare=True)
            samples.append((due, (time.monotonic() - due) * 1000))
            ready.set()
            due += interval_s
            stop.wait(max(0.0, due - time.monotonic()))
    results.send(samples)


class Writer:
    """A writer process; after it stops, ``samples`` contains (due, latency ms)."""

    def __init__(self, conninfo: str, run_ids: list[uuid.UUID], interval_ms: float):
        context = multiprocessing.get_context("spawn")
        self._ready, self._stop = context.Event(), context.Event()
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_writer,
            args=(conninfo, run_ids, interval_ms / 1000, self._ready, self._stop),
            kwargs={"results": sender},
        )
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> Writer:
        self._process.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the writer process did not start within 60 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self.samples = self._receiver.recv()
        self._process.join()


def latencies_between(
    samples: Sequence[tuple[float, float]], started: float, finished: float
) -> list[float]:
    """Return the latencies of the writer updates due in the interval."""
    return [ms for start, ms in samples if started <= start <= finished]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile, or NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# -- the database under test -------------------------------------------------------


def _autocommit(engine: sa.Engine, *statements: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def prepare_database(url: URL, rows: int) -> None:
    """Upgrade to 041, load ``rows`` demo runs and keep a snapshot of them."""
    os.environ[database.URL_VARIABLE] = url.render_as_string(hide_password=False)
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "041_workflow_run_keys")
    with psycopg.connect(conninfo_of(url)) as conn:
        demo_data.load_runs(conn, rows)
    engine = database.create_engine(url)
    # Autovacuum is off for these tables, because a vacuum starting in the
    # middle of one contender would favour or slow that one. Each contender
    # starts after an explicit VACUUM instead.
    _autocommit(
        engine,
        f"CREATE TABLE {SNAPSHOT_TABLE} AS TABLE workflow_runs",
        "ALTER TABLE workflow_runs SET (autovacuum_enabled = false)",
        f"ALTER TABLE {ledger.name} SET (autovacuum_enabled = false)",
        f"ALTER TABLE {SNAPSHOT_TABLE} SET (autovacuum_enabled = false)",
    )
    engine.dispose()


def reset_runs(engine: sa.Engine) -> None:
    """Restore the runs from the snapshot: no keys, no ledger, fresh statistics."""
    _autocommit(
        engine,
        f"TRUNCATE workflow_runs, {ledger.name}",
        f"INSERT INTO workflow_runs SELECT * FROM {SNAPSHOT_TABLE}",
        f"VACUUM (ANALYZE) workflow_runs, {ledger.name}",
    )
    try:
        _autocommit(engine, "CHECKPOINT")
    except sa.exc.DBAPIError as error:
        # CHECKPOINT needs superuser or pg_checkpoint (PostgreSQL 15+).
        log.warning("CHECKPOINT failed, continuing without it: %s", error.orig)


def writer_ids(engine: sa.Engine) -> list[uuid.UUID]:
    """Return a fixed sample of run ids for the writer."""
    query = sa.text(
        f"SELECT id FROM {SNAPSHOT_TABLE} ORDER BY md5(id::text) LIMIT :count"
    )
    with engine.connect() as connection:
        return list(connection.execute(query, {"count": WRITER_SAMPLE_IDS}).scalars())


def check_keys(engine: sa.Engine) -> tuple[int, str]:
    """Return the count of runs still without a key and a checksum of all keys."""
    query = sa.text(
        "SELECT count(*) FILTER (WHERE run_key IS NULL), "
        "coalesce(sum(hashtextextended("
        "id::text || '|' || run_key || '|' || run_key_normalized, 0)), 0) "
        "FROM workflow_runs"
    )
    with engine.connect() as connection:
        left, checksum = connection.execute(query).one()
    return int(left), format(int(checksum) % 16**8, "08x")


def conninfo_of(url: URL) -> str:
    """Return a libpq connection string for a SQLAlchemy URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclasses.dataclass(frozen=True)
class Options:
    """Command-line options that shape every run."""

    repeat: int
    row_loop_limit: int | None
    batch_sizes: tuple[int, ...]
    contenders: tuple[str, ...]
    idle_s: float
    writer_interval_ms: float
    sleep_ms: int


def contender_specs(url: URL, options: Options) -> list[ContenderSpec]:
    """Return the contenders to run on ``url``, in the report's order."""
    raw = url.render_as_string(hide_password=False)
    specs = []
    for kind in options.contenders:
        if kind in (BACKFILL, BLOCK_WALK):
            specs += [
                ContenderSpec(kind, raw, size, sleep_ms=options.sleep_ms)
                for size in options.batch_sizes
            ]
        elif kind == ROW_LOOP:
            specs.append(ContenderSpec(kind, raw, row_limit=options.row_loop_limit))
        else:
            specs.append(ContenderSpec(kind, raw))
    return specs


@dataclasses.dataclass
class ContenderRun:
    """A contender's result with what was measured around it."""

    result: ContenderResult
    writer_ms: list[float]
    idle_ms: list[float]
    wal_bytes: int


def wal_position(engine: sa.Engine) -> int:
    """Return the current WAL insert position in bytes."""
    query = sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')")
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def measure(
    engine: sa.Engine, spec: ContenderSpec, run_ids: list[uuid.UUID], options: Options
) -> ContenderRun:
    """Reset the runs, time the idle writer, then the contender with the writer.

    The WAL volume is the server's during the contender, so it includes the
    writer's few records.
    """
    conninfo = conninfo_of(engine.url)
    reset_runs(engine)
    with Writer(conninfo, run_ids, options.writer_interval_ms) as idle:
        time.sleep(options.idle_s)
    with Writer(conninfo, run_ids, options.writer_interval_ms) as busy:
        wal_before = wal_position(engine)
        result = run_in_new_process(spec)
        wal_bytes = wal_position(engine) - wal_before
    writer_ms = latencies_between(busy.samples, result.started, result.finished)
    return ContenderRun(result, writer_ms, [ms for _, ms in idle.samples], wal_bytes)


def benchmark_rows(url: URL, rows: int, options: Options) -> list[Measurement]:
    """Run every contender ``repeat`` times on ``rows`` runs, rotating their order."""
    prepare_database(url, rows)
    engine = database.create_engine(url)
    run_ids = writer_ids(engine)
    specs = contender_specs(url, options)
    measurements = []
    for repeat in range(options.repeat):
        shift = repeat % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            run = measure(engine, spec, run_ids, options)
            keys_left, checksum = check_keys(engine)
            measurement = Measurement(
                rows,
                repeat,
                run.result,
                rows,
                run.writer_ms,
                run.idle_ms,
                run.wal_bytes,
                keys_left,
                checksum,
            )
            log_measurement(measurement)
            measurements.append(measurement)
    engine.dispose()
    return measurements


def log_measurement(m: Measurement) -> None:
    """Log one run's headline figures to standard error."""
    log.info(
        "%d rows, repeat %d, %s: %d keys in %.2f s (%.0f rows/s), max batch %.0f ms, "
        "peak RSS %.1f MiB, WAL %.0f MiB, writer p99 %.1f ms (idle %.1f ms), "
        "%d left, checksum %s",
        m.rows,
        m.repeat + 1,
        m.result.label,
        m.result.keys_written,
        m.result.elapsed_s,
        m.rows_per_s,
        m.result.max_batch_ms,
        m.result.peak_rss_mib,
        m.wal_bytes / 2**20,
        percentile(m.writer_ms, 0.99),
        percentile(m.idle_ms, 0.99),
        m.keys_left,
        m.keys_checksum,
    )


# -- the report ----------------------------------------------------------------


def _median(values: Iterator[float]) -> float:
    return statistics.median(list(values))


def _by_label(measurements: Sequence[Measurement]) -> dict[str, list[Measurement]]:
    grouped: dict[str, list[Measurement]] = {}
    for m in measurements:
        grouped.setdefault(m.result.label, []).append(m)
    return grouped


def _ratio_to_single(runs: Sequence[Measurement], single: Sequence[Measurement]) -> str:
    """Return the median of per-repeat throughput ratios to the single UPDATE."""
    if not single:
        return "n/a"
    baseline = {m.repeat: m.rows_per_s for m in single}
    return f"{_median(m.rows_per_s / baseline[m.repeat] for m in runs):.2f}"


def rows_table(measurements: Sequence[Measurement]) -> list[str]:
    """Return the Markdown table of one row count, medians over the repeats."""
    grouped = _by_label(measurements)
    single = grouped.get(LABELS[SINGLE_UPDATE], [])
    lines = [
        "| contender | rows/s | ratio to single UPDATE | max batch ms, median / max "
        "| peak RSS MiB | WAL MiB | writer p50 / p99 ms | idle p50 / p99 ms "
        "| writer p99 / idle p99 | runs left | keys checksum |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, runs in grouped.items():
        sampled = " (sample, extrapolated)" if runs[0].extrapolated else ""
        checksums = ", ".join(sorted({m.keys_checksum for m in runs}))
        max_batch = [m.result.max_batch_ms for m in runs]
        lines.append(
            f"| {label}{sampled} | {_median(m.rows_per_s for m in runs):,.0f} "
            f"| {_ratio_to_single(runs, single)} "
            f"| {statistics.median(max_batch):,.0f} / {max(max_batch):,.0f} "
            f"| {_median(m.result.peak_rss_mib for m in runs):.1f} "
            f"| {_median(m.wal_bytes / 2**20 for m in runs):,.0f} "
            f"| {_latency_pair(runs, 'writer_ms')} | {_latency_pair(runs, 'idle_ms')} "
            f"| {_median(_p99_ratio(m) for m in runs):.1f} "
            f"| {max(m.keys_left for m in runs):,} | {checksums} |"
        )
    return lines


def _p99_ratio(m: Measurement) -> float:
    return percentile(m.writer_ms, 0.99) / percentile(m.idle_ms, 0.99)


def _latency_pair(runs: Sequence[Measurement], field: str) -> str:
    p50 = _median(percentile(getattr(m, field), 0.50) for m in runs)
    p99 = _median(percentile(getattr(m, field), 0.99) for m in runs)
    return f"{p50:.2f} / {p99:.2f}"


def growth_table(by_rows: dict[int, list[Measurement]]) -> list[str]:
    """Return how time and peak memory grow from the smallest to the largest count."""
    small, large = min(by_rows), max(by_rows)
    lines = [
        f"| contender | time at {large:,} / time at {small:,} "
        f"| peak RSS at {large:,} / at {small:,} |",
        "| --- | ---: | ---: |",
    ]
    small_runs, large_runs = _by_label(by_rows[small]), _by_label(by_rows[large])
    for label, runs in large_runs.items():
        before = small_runs.get(label, [])
        if not before:
            continue
        time_ratio = _median(m.full_time_s for m in runs) / _median(
            m.full_time_s for m in before
        )
        rss_ratio = _median(m.result.peak_rss_mib for m in runs) / _median(
            m.result.peak_rss_mib for m in before
        )
        lines.append(f"| {label} | {time_ratio:.2f} | {rss_ratio:.3f} |")
    return lines


def machine_lines(url: URL) -> list[str]:
    """Return the machine and server description for the report."""
    engine = database.create_engine(url)
    with engine.connect() as connection:
        version = connection.execute(sa.text("SHOW server_version")).scalar_one()
        settings = {
            name: connection.execute(sa.text(f"SHOW {name}")).scalar_one()
            for name in ("shared_buffers", "work_mem", "synchronous_commit")
        }
    engine.dispose()
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor()
    memory = _proc_field("/proc/meminfo", "MemTotal") or "unknown"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {memory}",
        f"- PostgreSQL {version}: "
        + ", ".join(f"{name} {value}" for name, value in settings.items()),
        f"- Python {platform.python_version()}, {platform.platform()}",
        f"- load average (1, 5, 15 min) at the start: {load}",
    ]


def _proc_field(path: str, name: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        return None
    return None


def write_report(
    by_rows: dict[int, list[Measurement]], machine: list[str], options: Options
) -> None:
    """Print the Markdown report to standard output."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [
        "## Command",
        "",
        "    python " + " ".join(sys.argv),
        "",
        "## Machine",
        "",
        *machine,
        f"- load average (1, 5, 15 min) at the end: {load}",
        "",
        "## Settings",
        "",
        f"- runs of each contender: {options.repeat}, order rotated between runs",
        f"- writer: one UPDATE due every {options.writer_interval_ms:g} ms; "
        f"idle baseline {options.idle_s:g} s before each contender",
        f"- row loop sample: {options.row_loop_limit or 'all'} runs",
        f"- backfill sleep between batches: {options.sleep_ms} ms",
        "",
    ]
    for rows, measurements in by_rows.items():
        lines += [f"## {rows:,} runs, median of {options.repeat}", ""]
        lines += [*rows_table(measurements), ""]
    if len(by_rows) > 1:
        lines += ["## Growth", "", *growth_table(by_rows), ""]
    print("\n".join(lines))


# -- command line ---------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: expected whole numbers separated by commas"
        ) from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: values must be >= 1")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Time the run key backfill against a single UPDATE and a "
        "row-by-row loop on generated runs.",
    )
    parser.add_argument(
        "--rows",
        type=_int_list,
        default=(1_000_000,),
        help="run counts to load, comma-separated (default 1000000)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each contender (default 3)"
    )
    parser.add_argument(
        "--row-loop-limit",
        type=int,
        default=5_000,
        help="runs the row loop keys before its time is extrapolated; "
        "0 keys them all (default 5000)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=(BackfillSettings().batch_size,),
        help="batch sizes to run the backfill at, comma-separated (default 500)",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"contenders to run, comma-separated, from {', '.join(LABELS)} "
        f"(default {','.join(DEFAULT_CONTENDERS)})",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="how long the writer runs alone before each contender (default 10)",
    )
    parser.add_argument(
        "--writer-interval-ms",
        type=float,
        default=10.0,
        help="pause between the writer's updates, in ms (default 10)",
    )
    parser.add_argument(
        "--sleep-ms",
        type=int,
        default=0,
        help="pause between the backfill's batches, in ms, as "
        "RUN_KEY_BACKFILL_SLEEP sets it (default 0)",
    )
    parser.add_argument("--json", type=Path, help="also write every run to this file")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    """Build the run options from parsed arguments, checking the contender names."""
    contenders = tuple(name.strip() for name in args.contenders.split(","))
    unknown = [name for name in contenders if name not in LABELS]
    if unknown:
        known = ", ".join(LABELS)
        raise SystemExit(f"unknown contender {unknown[0]!r}: expected one of {known}")
    return Options(
        repeat=args.repeat,
        row_loop_limit=args.row_loop_limit or None,
        batch_sizes=args.batch_sizes,
        contenders=contenders,
        idle_s=args.idle_seconds,
        writer_interval_ms=args.writer_interval_ms,
        sleep_ms=args.sleep_ms,
    )


def server_url() -> tuple[URL, embedded.EmbeddedServer | None]:
    """Return the server to benchmark on, starting the embedded one if needed."""
    raw = os.environ.get(database.URL_VARIABLE)
    if raw:
        return database.parse_database_url(raw), None
    server = embedded.EmbeddedServer()
    return server.url, server


def benchmark_in_new_database(
    base_url: URL, rows: int, options: Options
) -> list[Measurement]:
    """Run the benchmark for ``rows`` runs in a database created for it."""
    name = f"run_keys_bench_{uuid.uuid4().hex[:8]}"
    url = embedded.create_database(base_url, name)
    try:
        return benchmark_rows(url, rows, options)
    finally:
        embedded.drop_database(base_url, name)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its report."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from(args)
    base_url, server = server_url()
    try:
        machine = machine_lines(base_url)
        by_rows = {
            rows: benchmark_in_new_database(base_url, rows, options)
            for rows in args.rows
        }
    finally:
        if server is not None:
            server.stop()
    write_report(by_rows, machine, options)
    if args.json is not None:
        write_json(args.json, by_rows)


def write_json(path: Path, by_rows: dict[int, list[Measurement]]) -> None:
    """Write every run, with its raw latencies, as JSON."""
    records = [dataclasses.asdict(m) for runs in by_rows.values() for m in runs]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
