"""The ``workflow-run-key-backfill`` command: revision 042's backfill, run by hand.

It runs the same walk as revision 042 (``backfill.run_walk``) under the
same advisory lock, so an operator can run a dry run, a canary or the
whole backfill before or instead of ``alembic upgrade head``. It reads
the schema to check that revision 041 is applied and never reads or
writes the Alembic version table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError

from migrations_support import database, preflight, preview, progress
from migrations_support.backfill import run_walk
from migrations_support.errors import BackfillError
from migrations_support.settings import (
    ENV_PREFIX,
    KNOB_FIELDS,
    BackfillSettings,
    load_settings,
)
from migrations_support.walker import WalkResult

log = logging.getLogger(__name__)

PROG = "workflow-run-key-backfill"

EXIT_DONE = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED_AT_CAP = 3
EXIT_CONFLICTS = 4
EXIT_INTERRUPTED = 130

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_DEFAULTS = BackfillSettings()
_DURATION_FORMAT = "a duration such as 500ms, 2s or 1min; a bare number counts ms"

DESCRIPTION = """\
Give each workflow run that has no run key one, in committed batches, as
revision 042_backfill_workflow_run_keys does, under the same advisory lock.
Revision 041_workflow_run_keys must be applied first. The conflict preview,
the candidate lines (dry run) and the counters go to standard output;
progress, warnings and errors go to standard error.
"""

EPILOG = f"""\
environment:
  DATABASE_URL        the database to backfill, such as
                      {database.URL_EXAMPLE}
  {ENV_PREFIX}*  a default for each backfill option, named after it
                      (RUN_KEY_BACKFILL_BATCH_SIZE for --batch-size); the
                      option wins over its variable

exit status:
  0    done, with no conflicts or failures (a dry run: a real run would end
       this way)
  1    error: the database could not be reached or checked, or a batch
       failed with an error that retrying cannot fix; batches committed
       before it keep their keys
  2    invalid usage: an unknown option, or an invalid option or
       {ENV_PREFIX}* value; nothing was written
  3    stopped at --max-updates with runs still lacking a key (a dry run:
       a real run would stop there); run again to continue
  4    conflicts or failures were reported (a dry run: they would be);
       review the warnings; takes precedence over 3
  130  interrupted; batches committed before it keep their keys
"""


def _format_ms(value_ms: int) -> str:
    if value_ms and value_ms % 1000 == 0:
        return f"{value_ms // 1000}s"
    return f"{value_ms}ms" if value_ms else "0"


def _default_note(name: str, default: str) -> str:
    return f"({ENV_PREFIX}{name.upper()}; default: {default})"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; every knob option is read as a raw string."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # An abbreviation could change meaning when an option is added.
        allow_abbrev=False,
    )
    _add_backfill_options(parser.add_argument_group("backfill options"))
    _add_output_options(parser.add_argument_group("output options"))
    parser.set_defaults(log_level=logging.INFO)
    return parser


def _add_backfill_options(knobs: argparse._ArgumentGroup) -> None:
    knobs.add_argument(
        "--dry-run",
        action=argparse.BooleanOptionalAction,
        help="derive the keys, preview the conflicts and print one line per "
        "candidate, but write nothing; --no-dry-run overrides the variable "
        + _default_note("dry_run", "off"),
    )
    knobs.add_argument(
        "--batch-size",
        metavar="RUNS",
        help="candidates per batch, a whole number from 1 to 10000 "
        + _default_note("batch_size", str(_DEFAULTS.batch_size)),
    )
    knobs.add_argument(
        "--max-updates",
        metavar="KEYS",
        help="stop after writing this many keys, a positive whole number "
        + _default_note("max_updates", "unlimited"),
    )
    knobs.add_argument(
        "--on-conflict",
        metavar="{suffix,skip}",
        help="how to treat a run whose derived key another active run of its "
        "workflow already has: suffix appends '-' and the first 8 hex digits of "
        "its id, skip leaves it without a key "
        + _default_note("on_conflict", _DEFAULTS.on_conflict),
    )
    knobs.add_argument(
        "--lock-timeout",
        metavar="DURATION",
        help=f"PostgreSQL lock_timeout for each statement, {_DURATION_FORMAT} "
        + _default_note("lock_timeout", _format_ms(_DEFAULTS.lock_timeout_ms)),
    )
    knobs.add_argument(
        "--statement-timeout",
        metavar="DURATION",
        help="PostgreSQL statement_timeout for each batch and for the dry run's "
        f"conflict preview, {_DURATION_FORMAT} "
        + _default_note(
            "statement_timeout", _format_ms(_DEFAULTS.statement_timeout_ms)
        ),
    )
    knobs.add_argument(
        "--sleep",
        metavar="DURATION",
        help=f"pause between batches, {_DURATION_FORMAT}, 0 for none "
        + _default_note("sleep", _format_ms(_DEFAULTS.sleep_ms)),
    )
    knobs.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="also write the counters to this file, replaced atomically, for "
        "node_exporter's textfile collector " + _default_note("metrics_file", "none"),
    )


def _add_output_options(output: argparse._ArgumentGroup) -> None:
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=logging.WARNING,
        dest="log_level",
        help="log only warnings and errors to standard error",
    )
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=logging.DEBUG,
        dest="log_level",
        help="log every batch and debugging detail to standard error",
    )
    output.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, print the full traceback before the error line",
    )


def option_label(name: str) -> str:
    """Return the command-line option for knob ``name``: ``--batch-size``."""
    return "--" + name.replace("_", "-")


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> BackfillSettings:
    """Return the settings: RUN_KEY_BACKFILL_* variables, overridden by options.

    The options go through the same parsers as the variables and Alembic's
    ``-x`` arguments, so an invalid value raises the same ``BackfillError``.
    """
    overrides: dict[str, str] = {}
    for name in KNOB_FIELDS:
        value = getattr(args, name)
        if isinstance(value, bool):
            overrides[name] = "true" if value else "false"
        elif value is not None:
            overrides[name] = value
    # A variable that an option overrides is not read, so an invalid value
    # left in the environment does not stop a run that sets the option.
    overridden = {ENV_PREFIX + name.upper() for name in overrides}
    remaining = {key: value for key, value in environ.items() if key not in overridden}
    return load_settings(remaining, overrides, override_label=option_label)


@contextlib.contextmanager
def logging_to_stderr(level: int) -> Iterator[None]:
    """Send this package's log records at ``level`` and up to standard error.

    Other libraries log warnings only, so SQLAlchemy's INFO lines (the SQL
    it runs) stay out. The previous logging state is restored on exit, so
    ``main`` can be called more than once in a process.
    """
    root = logging.getLogger()
    package = logging.getLogger("migrations_support")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    previous_levels = (root.level, package.level)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    package.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_levels[0])
        package.setLevel(previous_levels[1])


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _runs_left(
    connection: sa.Connection, settings: BackfillSettings, result: WalkResult
) -> int:
    """Return the runs still without a key (a dry run: a real run would leave)."""
    if not settings.dry_run:
        return result.remaining
    if not result.stopped_at_cap:
        return 0
    # A real run excludes each candidate it read once it is keyed, skipped
    # or failed, so what it leaves are the candidates it never read.
    return max(progress.count_candidates(connection) - result.counters.processed, 0)


def exit_status(settings: BackfillSettings, result: WalkResult, runs_left: int) -> int:
    """Return the exit status for a finished walk and log the line that explains it."""
    counters = result.counters
    dry = "dry run: " if settings.dry_run else ""
    would = "would be " if settings.dry_run else ""
    stopped = result.stopped_at_cap and runs_left > 0
    cap_note = (
        f"stopped at --max-updates {settings.max_updates} with "
        f"{_plural(runs_left, 'run')} still lacking a key"
    )
    if counters.conflicts or counters.failures:
        log.warning(
            "%s%s and %s %sreported; review the warnings above%s",
            dry,
            _plural(counters.conflicts, "conflict"),
            _plural(counters.failures, "failure"),
            would,
            f"; {cap_note}" if stopped else "",
        )
        return EXIT_CONFLICTS
    if stopped:
        if settings.dry_run:
            next_step = "nothing was written"
        else:
            next_step = f"run {PROG} again to continue"
        log.warning("%s%s; %s", dry, cap_note, next_step)
        return EXIT_STOPPED_AT_CAP
    return EXIT_DONE


def run_backfill(connection: sa.Connection, settings: BackfillSettings) -> int:
    """Run the walk on a connection that holds the advisory lock; return the status."""
    preflight.check_key_schema(connection)
    if settings.dry_run:
        conflicts = preview.preview_conflicts(connection, settings.statement_timeout_ms)
        preview.write_preview(conflicts, sys.stdout)
    else:
        preflight.check_writable(connection)
    estimate = progress.estimate_candidates(connection)
    log.info(
        "%s%d runs without a key",
        "" if estimate.exact else "about ",
        estimate.count,
    )
    reporter = progress.ProgressReporter(estimate)
    result = run_walk(connection, settings, sys.stdout, on_batch=reporter)
    runs_left = _runs_left(connection, settings, result)
    reporter.summarize(result.counters, runs_left, settings.dry_run)
    return exit_status(settings, result, runs_left)


def run(settings: BackfillSettings, environ: Mapping[str, str]) -> int:
    """Connect to DATABASE_URL, check it, take the advisory lock and backfill."""
    url = database.url_from_environment(environ)
    engine = database.create_engine(url)
    try:
        try:
            connection = engine.connect()
        except OperationalError as error:
            raise database.connect_error(url, error) from None
        with connection:
            log.info("connected to %s", database.describe_url(url))
            database.check_server_encoding(connection)
            connection.commit()
            with database.advisory_lock(connection):
                return run_backfill(connection, settings)
    finally:
        engine.dispose()


def _database_error(error: DBAPIError) -> BackfillError:
    lines = str(error.orig).strip().splitlines()
    first_line = lines[0] if lines else type(error.orig).__name__
    return BackfillError(
        f"database error: {first_line}; batches committed before it keep their "
        f"keys, so run {PROG} again once it is fixed"
    )


def _report_error(message: str, show_traceback: bool) -> None:
    if show_traceback:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Errors end in one ``error: ...`` line on standard error; ``--traceback``
    prints the full traceback before it.
    """
    args = build_parser().parse_args(argv)
    with logging_to_stderr(args.log_level):
        try:
            settings = settings_from(args, os.environ)
        except BackfillError as error:
            _report_error(str(error), args.traceback)
            return EXIT_USAGE
        try:
            return run(settings, os.environ)
        except BackfillError as error:
            _report_error(str(error), args.traceback)
        except DBAPIError as error:
            _report_error(str(_database_error(error)), args.traceback)
        except KeyboardInterrupt:
            _report_error(
                f"interrupted; batches committed before it keep their keys, so run "
                f"{PROG} again to continue",
                args.traceback,
            )
            return EXIT_INTERRUPTED
    return EXIT_ERROR
