"""The demo: the whole upgrade on generated data, on an embedded server.

It starts an embedded PostgreSQL, creates a database at revision 040,
loads generated runs, runs a dry run and then ``alembic upgrade head``
through Alembic's command API, checks the result and prints the counters
and a sample of keyed runs. Run it with ``workflow-run-keys-demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from migrations_support import database, demo_data, embedded
from migrations_support.errors import BackfillError
from migrations_support.metrics import COUNTER_HELP, METRIC_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_DATABASE = "run_keys_demo"
SAMPLE_SQL = """
SELECT DISTINCT ON (l.source, r.run_key <> l.run_key OR r.run_key ~ '-[0-9a-f]{8}$')
       r.id, r.workflow_id, r.status, l.source, r.run_key, r.run_key_normalized
FROM workflow_runs r JOIN workflow_run_key_backfill_ledger l ON l.run_id = r.id
ORDER BY l.source, r.run_key <> l.run_key OR r.run_key ~ '-[0-9a-f]{8}$', r.id
"""
CHECKS_SQL = {
    "runs without a key": "SELECT count(*) FROM workflow_runs WHERE run_key IS NULL",
    "active runs sharing a normalized key": (
        "SELECT count(*) FROM (SELECT 1 FROM workflow_runs "
        "WHERE status IN ('pending', 'queued', 'running', 'waiting') "
        "GROUP BY workflow_id, run_key_normalized HAVING count(*) > 1) AS duplicates"
    ),
}
OWN_DATABASE_STEPS = """\
To run the same upgrade on your own database (UTF-8 encoding, a UTF-8 collation):
  export DATABASE_URL=postgresql://user:password@host:5432/dbname
  alembic stamp 040_workflow_runs      # only if workflow_runs already exists
  RUN_KEY_BACKFILL_DRY_RUN=1 alembic upgrade head > dry-run.prom   # preview
  alembic upgrade head
"""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="workflow-run-keys-demo",
        description="Run the run key migrations on generated data on an embedded "
        "PostgreSQL server, then print the counters and a sample of keyed runs.",
    )
    parser.add_argument(
        "--rows", type=int, default=100_000, help="runs to generate (default 100000)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("demo-output"),
        help="folder for the dry-run listing and the backfill log "
        "(default ./demo-output)",
    )
    return parser.parse_args(argv)


def alembic_config() -> Config:
    """Return the project's Alembic configuration, without its logging setup."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.attributes["configure_logger"] = False
    return cfg


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the block and put the old values back."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Send the backfill's INFO lines and conflict warnings to ``path``."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
    loggers = [logging.getLogger(name) for name in ("migrations_support", "alembic")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()


def load(url: sa.URL, cfg: Config, rows: int) -> float:
    """Create the table at revision 040 and load ``rows`` generated runs."""
    started = time.monotonic()
    command.upgrade(cfg, "040_workflow_runs")
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        demo_data.load_runs(conn, rows)
    return time.monotonic() - started


def upgrade_to_file(cfg: Config, output: Path, *, dry_run: bool) -> float:
    """Run ``alembic upgrade head`` with its standard output sent to ``output``."""
    started = time.monotonic()
    with (
        environment(RUN_KEY_BACKFILL_DRY_RUN="true" if dry_run else "false"),
        output.open("w", encoding="utf-8") as out,
        contextlib.redirect_stdout(out),
    ):
        try:
            command.upgrade(cfg, "head")
        except BackfillError as error:
            if not dry_run:
                raise
            print(f"# {error}")
    return time.monotonic() - started


def counter_lines(exposition: Path) -> list[str]:
    """Return the counter samples of an exposition, one per line."""
    names = tuple(METRIC_PREFIX + name for name in COUNTER_HELP)
    text = exposition.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith(names)]


def verify(engine: sa.Engine, counters: list[str]) -> list[str]:
    """Return the problems found in the upgraded table, empty when all is well."""
    problems = []
    with engine.connect() as connection:
        for name, sql in CHECKS_SQL.items():
            count = connection.execute(sa.text(sql)).scalar_one()
            if count:
                problems.append(f"{count} {name}")
        version = connection.execute(
            sa.text("SELECT version_num FROM alembic_version")
        ).scalar()
    if version != "042_backfill_workflow_run_keys":
        problems.append(
            f"alembic_version is {version}, not 042_backfill_workflow_run_keys"
        )
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in counters}
    processed = values[METRIC_PREFIX + "processed_total"]
    accounted = sum(
        values[METRIC_PREFIX + name + "_total"]
        for name in ("updated", "skipped", "failures")
    )
    if processed != accounted:
        problems.append(
            f"processed {processed} != updated + skipped + failures {accounted}"
        )
    return problems


def print_sample(engine: sa.Engine) -> None:
    """Print one keyed run of each source, with and without a conflict suffix."""
    with engine.connect() as connection:
        rows = connection.execute(sa.text(SAMPLE_SQL)).all()
    print("\nA sample of keyed runs (one per source, plain and suffixed):")
    for row in rows:
        print(
            f"  {row.id}  {row.workflow_id:<28} {row.status:<10} {row.source:<9} "
            f"{row.run_key!r} -> {row.run_key_normalized!r}"
        )


def run_demo(rows: int, work_dir: Path) -> int:
    """Run the demo and return the process exit status."""
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server = embedded.EmbeddedServer()
    try:
        url = embedded.create_database(server.url, DEMO_DATABASE)
        print(f"Embedded PostgreSQL started; database {DEMO_DATABASE} created.")
        raw_url = url.render_as_string(hide_password=False)
        with log_to_file(work_dir / "backfill.log"), environment(DATABASE_URL=raw_url):
            problems = upgrade_and_check(url, rows, work_dir)
    finally:
        server.stop()

    print(f"\nConflict warnings and batch lines are in {work_dir}/backfill.log.")
    if problems:
        print("Checks FAILED: " + "; ".join(problems))
        return 1
    print(
        "Checks passed: every run has a key, no two active runs of a workflow share "
        "a normalized key, the counters add up and 042 is stamped."
    )
    print(f"Demo finished in {time.monotonic() - started:.1f} s.\n")
    print(OWN_DATABASE_STEPS)
    return 0


def upgrade_and_check(url: sa.URL, rows: int, work_dir: Path) -> list[str]:
    """Load runs, dry-run and upgrade, print what happened; return the problems."""
    cfg = alembic_config()
    load_s = load(url, cfg, rows)
    print(f"Loaded {rows} generated runs at revision 040 in {load_s:.1f} s.")

    listing = work_dir / "dry-run.prom"
    dry_s = upgrade_to_file(cfg, listing, dry_run=True)
    print(f"\nDry run in {dry_s:.1f} s (one line per candidate in {listing}):")
    print("\n".join("  " + line for line in counter_lines(listing)))

    upgrade_s = upgrade_to_file(cfg, work_dir / "upgrade.prom", dry_run=False)
    counters = counter_lines(work_dir / "upgrade.prom")
    print(f"\nalembic upgrade head in {upgrade_s:.1f} s:")
    print("\n".join("  " + line for line in counters))

    engine = database.create_engine(url)
    try:
        print_sample(engine)
        return verify(engine, counters)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``workflow-run-keys-demo``."""
    arguments = parse_arguments(argv)
    sys.exit(run_demo(arguments.rows, arguments.work_dir))


if __name__ == "__main__":
    main()
