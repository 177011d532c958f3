"""The workflow-run-key-backfill command line, against a real PostgreSQL."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from cli_runner import (
    PROJECT_ROOT,
    cli_environment,
    last_line,
    log_messages,
    run_cli,
)
from helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    fetch_ledger,
    insert_runs,
    make_run,
    upgrade_to_041,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import URL

from migrations_support import cli, database
from migrations_support.schema import KEY_INDEX_NAME, LEDGER_TABLE_NAME

RUN_IDS = [
    uuid.UUID(f"{number:08x}-1111-4111-8111-111111111111") for number in range(1, 6)
]


def five_runs() -> list[dict[str, object]]:
    """Return five active runs of one workflow with distinct partition keys."""
    return [
        make_run(run_id, partition_key=f"Part {number}", minute=number)
        for number, run_id in enumerate(RUN_IDS, start=1)
    ]


@pytest.fixture
def keyed_schema(alembic_cfg: Config, engine: sa.Engine) -> sa.Engine:
    """A database at revision 041 holding the five runs, none of them keyed."""
    upgrade_to_041(alembic_cfg, engine, five_runs())
    return engine


def keyed_count(engine: sa.Engine) -> int:
    return sum(1 for key, _ in fetch_keys(engine).values() if key is not None)


# -- usage ---------------------------------------------------------------------


def test_help_names_options_units_and_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--help"])
    assert stopped.value.code == 0
    # argparse wraps help text to the terminal width.
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--dry-run",
        "--batch-size RUNS",
        "--max-updates KEYS",
        "--on-conflict {suffix,skip}",
        "--lock-timeout DURATION",
        "--statement-timeout DURATION",
        "--sleep DURATION",
        "--metrics-file PATH",
        "--quiet",
        "--verbose",
        "--traceback",
    ):
        assert option in text
    assert "a bare number counts ms" in text
    assert "(RUN_KEY_BACKFILL_BATCH_SIZE; default: 500)" in text
    assert "(RUN_KEY_BACKFILL_LOCK_TIMEOUT; default: 2s)" in text
    assert "(RUN_KEY_BACKFILL_STATEMENT_TIMEOUT; default: 30s)" in text
    assert "DATABASE_URL" in text


def test_help_exit_statuses_match_constants(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    statuses = text.split("exit status:", 1)[1]
    for status, start in (
        (cli.EXIT_DONE, "done"),
        (cli.EXIT_ERROR, "error"),
        (cli.EXIT_USAGE, "invalid usage"),
        (cli.EXIT_STOPPED_AT_CAP, "stopped at --max-updates"),
        (cli.EXIT_CONFLICTS, "conflicts or failures"),
        (cli.EXIT_INTERRUPTED, "interrupted"),
    ):
        assert f"\n  {status:<4} {start}" in statuses


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--batch-size", "0"],
            "error: invalid --batch-size '0': expected a whole number from 1 to 10000",
        ),
        (
            ["--batch-size", "10001"],
            "error: invalid --batch-size '10001': "
            "expected a whole number from 1 to 10000",
        ),
        (
            ["--max-updates", "0"],
            "error: invalid --max-updates '0': "
            "expected a whole number from 1 to 9223372036854775807",
        ),
        (
            ["--on-conflict", "rename"],
            "error: invalid --on-conflict 'rename': expected suffix or skip",
        ),
        (
            ["--lock-timeout", "0"],
            "error: invalid --lock-timeout '0': expected a duration such as "
            "500ms, 2s or 1min, from 1ms to 2147483647ms",
        ),
        (
            ["--statement-timeout", "5h"],
            "error: invalid --statement-timeout '5h': expected a duration such as "
            "500ms, 2s or 1min, from 1ms to 2147483647ms",
        ),
        (
            ["--sleep", "-1"],
            "error: invalid --sleep '-1': expected a duration such as "
            "500ms, 2s or 1min, from 0 to 2147483647ms",
        ),
        (
            ["--metrics-file", "/nonexistent-dir/backfill.prom"],
            "error: invalid --metrics-file '/nonexistent-dir/backfill.prom': "
            "expected a file in an existing directory (/nonexistent-dir)",
        ),
    ],
)
def test_invalid_option_exits_2(
    keyed_schema: sa.Engine, database_url: URL, args: list[str], error: str
) -> None:
    result = run_cli(args, database_url)
    assert result.returncode == cli.EXIT_USAGE
    assert last_line(result.stderr) == error
    assert result.stdout == ""
    assert keyed_count(keyed_schema) == 0


def test_invalid_variable_exits_2_without_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(database.URL_VARIABLE, raising=False)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "lots")
    status = cli.main([])
    assert status == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "error: invalid RUN_KEY_BACKFILL_BATCH_SIZE 'lots': "
        "expected a whole number from 1 to 10000\n"
    )


def test_unknown_option_exits_2() -> None:
    result = run_cli(["--batch", "5", "--frobnicate"], None)
    assert result.returncode == cli.EXIT_USAGE
    # Abbreviations are rejected, so --batch does not mean --batch-size.
    assert last_line(result.stderr) == (
        "workflow-run-key-backfill: error: unrecognized arguments: "
        "--batch 5 --frobnicate"
    )


def test_quiet_and_verbose_are_exclusive() -> None:
    result = run_cli(["--quiet", "--verbose"], None)
    assert result.returncode == 2
    assert last_line(result.stderr) == (
        "workflow-run-key-backfill: error: argument -v/--verbose: "
        "not allowed with argument -q/--quiet"
    )


# -- connecting and checking the schema ---------------------------------------


def test_missing_database_url_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(database.URL_VARIABLE, raising=False)
    status = cli.main([])
    assert status == cli.EXIT_ERROR
    assert capsys.readouterr().err == (
        "error: DATABASE_URL is not set: "
        "set it to postgresql://user:password@host:5432/dbname\n"
    )


def test_unreachable_database_hides_password() -> None:
    url = URL.create(
        "postgresql",
        username="backfill",
        password="s3cret-pw",
        host="127.0.0.1",
        port=1,
        database="app",
    )
    result = run_cli([], url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr).startswith(
        "error: could not connect to the database in DATABASE_URL "
        "(postgresql+psycopg://backfill:***@127.0.0.1:1/app): "
    )
    assert "s3cret-pw" not in result.stderr
    assert "s3cret-pw" not in result.stdout


def test_before_041_names_the_revision(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(RUN_IDS[0], partition_key="Part 1")])
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr) == (
        "error: workflow_runs has no run_key column: revision 041_workflow_run_keys "
        "is not applied; run `alembic upgrade 041_workflow_run_keys` first"
    )
    assert current_revision(engine) == "040_workflow_runs"


def test_empty_database_names_the_revision(database_url: URL) -> None:
    result = run_cli(["--dry-run"], database_url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr) == (
        "error: table workflow_runs not found: revision 041_workflow_run_keys "
        "is not applied; run `alembic upgrade 041_workflow_run_keys` first"
    )


def test_missing_ledger_names_the_revision(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    with keyed_schema.begin() as connection:
        connection.execute(sa.text(f"DROP TABLE {LEDGER_TABLE_NAME}"))
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr) == (
        f"error: ledger table {LEDGER_TABLE_NAME} not found: revision "
        "041_workflow_run_keys is not applied; "
        "run `alembic upgrade 041_workflow_run_keys` first"
    )
    assert keyed_count(keyed_schema) == 0


def test_invalid_index_names_the_revision(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    # What an interrupted CREATE INDEX CONCURRENTLY leaves behind.
    with keyed_schema.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = CAST(:name AS regclass)"
            ),
            {"name": KEY_INDEX_NAME},
        )
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr) == (
        f"error: index {KEY_INDEX_NAME} is INVALID (an interrupted concurrent "
        "build): revision 041_workflow_run_keys is not applied; "
        "run `alembic upgrade 041_workflow_run_keys` first"
    )
    assert keyed_count(keyed_schema) == 0


# -- running the backfill -------------------------------------------------------


def test_full_run_keys_every_run(keyed_schema: sa.Engine, database_url: URL) -> None:
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert counter_values(result.stdout) == {
        "processed": 5,
        "updated": 5,
        "skipped": 0,
        "conflicts": 0,
        "failures": 0,
    }
    keys = fetch_keys(keyed_schema)
    assert keys[RUN_IDS[0]] == ("Part 1", "part-1")
    assert keys[RUN_IDS[4]] == ("Part 5", "part-5")
    assert set(fetch_ledger(keyed_schema)) == set(RUN_IDS)
    summary = log_messages(result.stderr)[-1]
    assert summary.startswith("INFO finished in ")
    assert ": processed 5, updated 5, skipped 0, conflicts 0, failures 0 (" in summary
    assert summary.endswith(" runs/s); 0 runs still lack a key")


def test_cli_leaves_version_table_alone(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert current_revision(keyed_schema) == "041_workflow_run_keys"
    with keyed_schema.connect() as connection:
        updates = connection.execute(
            sa.text(
                "SELECT n_tup_ins + n_tup_upd + n_tup_del "
                "FROM pg_stat_xact_user_tables WHERE relname = 'alembic_version'"
            )
        ).scalar()
    assert not updates


def test_cli_runs_without_version_table(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    with keyed_schema.begin() as connection:
        connection.execute(sa.text("DROP TABLE alembic_version"))
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert keyed_count(keyed_schema) == 5
    with keyed_schema.connect() as connection:
        assert not sa.inspect(connection).has_table("alembic_version")


def test_canary_keys_exactly_the_cap(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli(["--max-updates", "3", "--batch-size", "2"], database_url)
    assert result.returncode == cli.EXIT_STOPPED_AT_CAP, result.stderr
    assert keyed_count(keyed_schema) == 3
    assert len(fetch_ledger(keyed_schema)) == 3
    assert counter_values(result.stdout)["updated"] == 3
    assert log_messages(result.stderr)[-1] == (
        "WARNING stopped at --max-updates 3 with 2 runs still lacking a key; "
        "run workflow-run-key-backfill again to continue"
    )
    assert current_revision(keyed_schema) == "041_workflow_run_keys"

    second = run_cli([], database_url)
    assert second.returncode == cli.EXIT_DONE, second.stderr
    assert counter_values(second.stdout)["updated"] == 2
    assert keyed_count(keyed_schema) == 5


def test_cap_covering_every_run_exits_0(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli(["--max-updates", "5"], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert keyed_count(keyed_schema) == 5


def test_option_overrides_variable(keyed_schema: sa.Engine, database_url: URL) -> None:
    result = run_cli(
        ["--max-updates", "4"],
        database_url,
        {"RUN_KEY_BACKFILL_MAX_UPDATES": "1", "RUN_KEY_BACKFILL_BATCH_SIZE": "2"},
    )
    assert result.returncode == cli.EXIT_STOPPED_AT_CAP, result.stderr
    assert keyed_count(keyed_schema) == 4
    assert "batch_size=2 max_updates=4" in result.stderr


def test_option_skips_invalid_variable(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli(
        ["--batch-size", "2"], database_url, {"RUN_KEY_BACKFILL_BATCH_SIZE": "0"}
    )
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert keyed_count(keyed_schema) == 5


def test_dry_run_variable_and_no_dry_run_option(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    environment = {"RUN_KEY_BACKFILL_DRY_RUN": "yes"}
    dry = run_cli([], database_url, environment)
    assert dry.returncode == cli.EXIT_DONE, dry.stderr
    assert keyed_count(keyed_schema) == 0
    assert counter_values(dry.stdout, dry_run=True)["updated"] == 5

    real = run_cli(["--no-dry-run"], database_url, environment)
    assert real.returncode == cli.EXIT_DONE, real.stderr
    assert keyed_count(keyed_schema) == 5


def test_conflicts_exit_4_and_suffix(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    first, second = RUN_IDS[0], RUN_IDS[1]
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(first, partition_key="EU West", minute=1),
            make_run(second, partition_key="eu  WEST", minute=2),
        ],
    )
    result = run_cli([], database_url)
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    assert counter_values(result.stdout)["conflicts"] == 1
    keys = fetch_keys(engine)
    assert keys[first] == ("EU West", "eu-west")
    assert keys[second] == ("eu WEST-00000002", "eu-west-00000002")
    messages = log_messages(result.stderr)
    assert (
        f"WARNING conflict: run {second} of workflow 'billing.nightly' derives key "
        f"'eu-west', already held by run {first}; keyed as 'eu-west-00000002'"
    ) in messages
    assert messages[-1] == (
        "WARNING 1 conflict and 0 failures reported; review the warnings above"
    )


def test_conflicts_at_cap_exit_4_and_name_remaining(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(RUN_IDS[0], partition_key="same", minute=1),
            make_run(RUN_IDS[1], partition_key="SAME", minute=2),
            make_run(RUN_IDS[2], partition_key="other", minute=3),
        ],
    )
    result = run_cli(["--max-updates", "2"], database_url)
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    assert log_messages(result.stderr)[-1] == (
        "WARNING 1 conflict and 0 failures reported; review the warnings above; "
        "stopped at --max-updates 2 with 1 run still lacking a key"
    )


def test_skip_policy_leaves_run_without_key(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(RUN_IDS[0], partition_key="same", minute=1),
            make_run(RUN_IDS[1], partition_key="SAME", minute=2),
        ],
    )
    result = run_cli(["--on-conflict", "skip"], database_url)
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    assert counter_values(result.stdout) == {
        "processed": 2,
        "updated": 1,
        "skipped": 1,
        "conflicts": 1,
        "failures": 0,
    }
    assert fetch_keys(engine)[RUN_IDS[1]] == (None, None)


# -- dry run ----------------------------------------------------------------------


def test_dry_run_previews_conflicts_and_writes_nothing(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    first, second, third = RUN_IDS[0], RUN_IDS[1], RUN_IDS[2]
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(first, partition_key="EU West", minute=1),
            make_run(second, partition_key="eu  WEST", minute=2),
            make_run(third, partition_key="Other", minute=3),
        ],
    )
    result = run_cli(["--dry-run", "--batch-size", "1"], database_url)
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "# conflict preview: conflicts=1 groups=1",
        '# conflict group workflow_id="billing.nightly" run_key_normalized="eu-west" '
        f"conflicts=1 keyed_run=none candidates={first},{second}",
    ]
    assert lines[2:5] == [
        f'# candidate run_id={first} workflow_id="billing.nightly" source=partition '
        'run_key="EU West" outcome=updated',
        f'# candidate run_id={second} workflow_id="billing.nightly" source=partition '
        f'run_key="eu WEST-00000002" outcome=updated conflicts_with={first}',
        f'# candidate run_id={third} workflow_id="billing.nightly" source=partition '
        'run_key="Other" outcome=updated',
    ]
    assert counter_values(result.stdout, dry_run=True) == {
        "processed": 3,
        "updated": 3,
        "skipped": 0,
        "conflicts": 1,
        "failures": 0,
    }
    assert log_messages(result.stderr)[-1] == (
        "WARNING dry run: 1 conflict and 0 failures would be reported; "
        "review the warnings above"
    )
    assert keyed_count(engine) == 0
    assert fetch_ledger(engine) == {}


def test_dry_run_output_is_one_exposition(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(RUN_IDS[0], partition_key="same\nkey", minute=1),
            make_run(RUN_IDS[1], partition_key="SAME key", minute=2),
        ],
    )
    result = run_cli(["--dry-run"], database_url)
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    # The preview and candidate lines are comments in the text format.
    families = list(text_string_to_metric_families(result.stdout))
    assert len(families) == 5
    assert all(line.startswith("# ") for line in result.stdout.splitlines()[:4])
    if shutil.which("promtool") is None:
        return
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=result.stdout,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_dry_run_without_conflicts_exits_0(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli(["--dry-run"], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert result.stdout.splitlines()[0] == "# conflict preview: conflicts=0 groups=0"
    assert keyed_count(keyed_schema) == 0


def test_dry_run_at_cap_exits_3(keyed_schema: sa.Engine, database_url: URL) -> None:
    result = run_cli(["--dry-run", "--max-updates", "2"], database_url)
    assert result.returncode == cli.EXIT_STOPPED_AT_CAP, result.stderr
    assert log_messages(result.stderr)[-1] == (
        "WARNING dry run: stopped at --max-updates 2 with 3 runs still lacking "
        "a key; nothing was written"
    )
    assert keyed_count(keyed_schema) == 0


def test_dry_run_in_read_only_session(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    # A hot standby accepts only read-only transactions; this session does too.
    read_only = database_url.update_query_dict(
        {"options": "-c default_transaction_read_only=on"}
    )
    result = run_cli(["--dry-run"], read_only)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert counter_values(result.stdout, dry_run=True)["updated"] == 5

    refused = run_cli([], read_only)
    assert refused.returncode == cli.EXIT_ERROR
    assert last_line(refused.stderr) == (
        "error: the database is read-only (transaction_read_only is on): a run "
        "that writes keys must connect to the primary; only --dry-run runs on a "
        "replica"
    )
    assert keyed_count(keyed_schema) == 0


# -- output --------------------------------------------------------------------------


def test_metrics_file_matches_stdout(
    keyed_schema: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    metrics_file = tmp_path / "workflow_run_key_backfill.prom"
    result = run_cli(["--metrics-file", str(metrics_file)], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert metrics_file.read_text() == result.stdout
    assert counter_values(metrics_file.read_text())["updated"] == 5
    assert list(tmp_path.iterdir()) == [metrics_file]


def test_progress_line_per_batch_when_verbose(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    result = run_cli(["--verbose", "--batch-size", "2"], database_url)
    assert result.returncode == cli.EXIT_DONE, result.stderr
    messages = log_messages(result.stderr)
    batches = [
        message.split(", ", 1)[0]
        for message in messages
        if message.split(" ", 1)[1].startswith("batch ")
    ]
    assert batches == [
        "INFO batch 1: read 2",
        "DEBUG batch 2: read 2",
        "DEBUG batch 3: read 1",
    ]
    assert "INFO 5 runs without a key" in messages
    assert any("; 2 of 5 runs done (40%), 3 left, " in message for message in messages)


def test_quiet_logs_only_warnings(keyed_schema: sa.Engine, database_url: URL) -> None:
    result = run_cli(["--quiet", "--max-updates", "1"], database_url)
    assert result.returncode == cli.EXIT_STOPPED_AT_CAP
    assert log_messages(result.stderr) == [
        "WARNING stopped at --max-updates 1 with 4 runs still lacking a key; "
        "run workflow-run-key-backfill again to continue"
    ]


def test_traceback_option_prints_traceback(database_url: URL) -> None:
    result = run_cli(["--traceback"], database_url)
    assert result.returncode == cli.EXIT_ERROR
    lines = result.stderr.splitlines()
    assert "Traceback (most recent call last):" in lines
    assert lines.index("Traceback (most recent call last):") < len(lines) - 1
    assert lines[-2].startswith("migrations_support.errors.BackfillError: table")
    assert last_line(result.stderr).startswith("error: table workflow_runs not found")


def test_in_process_run_matches_subprocess(
    keyed_schema: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    # alembic_cfg (through keyed_schema) put DATABASE_URL in os.environ.
    status = cli.main(["--max-updates", "3", "--quiet"])
    captured = capsys.readouterr()
    assert status == cli.EXIT_STOPPED_AT_CAP
    assert counter_values(captured.out)["updated"] == 3
    assert keyed_count(keyed_schema) == 3


def test_waits_for_advisory_lock(
    keyed_schema: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "stderr.txt"
    with (
        keyed_schema.connect() as holder,
        database.advisory_lock(holder),
        stderr_path.open("w") as stderr_file,
    ):
        process = subprocess.Popen(
            [sys.executable, "-m", "migrations_support"],
            env=cli_environment(database_url),
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
        try:
            assert wait_for_text(stderr_path, WAITING_LINE, timeout_s=30)
            # Two more polls: the waiting runner still writes nothing.
            time.sleep(2 * database.ADVISORY_LOCK_POLL_S)
            assert keyed_count(keyed_schema) == 0
        except BaseException:
            process.kill()
            process.communicate()
            raise
    stdout, _ = process.communicate(timeout=60)
    stderr = stderr_path.read_text()
    assert process.returncode == cli.EXIT_DONE, stderr
    assert f"INFO {WAITING_LINE}" in log_messages(stderr)
    assert counter_values(stdout)["updated"] == 5


WAITING_LINE = "another runner has the backfill lock; waiting for it to finish"


def wait_for_text(path: Path, text: str, timeout_s: float) -> bool:
    """Return whether ``text`` appears in the file at ``path`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.1)
    return False


def test_database_error_exits_1(keyed_schema: sa.Engine, database_url: URL) -> None:
    # A trigger error (SQLSTATE P0001) is not one that retrying can get past.
    with keyed_schema.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE FUNCTION reject_run() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'run % is frozen', NEW.id; END $$"
            )
        )
        connection.execute(
            sa.text(
                "CREATE TRIGGER reject_run BEFORE UPDATE ON workflow_runs "
                f"FOR EACH ROW WHEN (NEW.id = '{RUN_IDS[2]}') "
                "EXECUTE FUNCTION reject_run()"
            )
        )
    result = run_cli(["--batch-size", "2"], database_url)
    assert result.returncode == cli.EXIT_ERROR
    assert last_line(result.stderr) == (
        f"error: database error: run {RUN_IDS[2]} is frozen; batches committed "
        "before it keep their keys, so run workflow-run-key-backfill again once "
        "it is fixed"
    )
    assert result.stdout == ""
    assert keyed_count(keyed_schema) == 2


def test_interrupt_exits_130_keeping_batches(
    keyed_schema: sa.Engine, database_url: URL
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "migrations_support", "--batch-size", "1"]
        + ["--sleep", "30s"],
        env=cli_environment(database_url),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while keyed_count(keyed_schema) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keyed_count(keyed_schema) == 1
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == cli.EXIT_INTERRUPTED
    assert last_line(stderr) == (
        "error: interrupted; batches committed before it keep their keys, so run "
        "workflow-run-key-backfill again to continue"
    )
    assert stdout == ""
    assert keyed_count(keyed_schema) == 1
