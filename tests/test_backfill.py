"""Revisions 041 and 042 end to end through Alembic's command API."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from migrations_support.errors import BackfillError
from tests.helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    fetch_ledger,
    insert_runs,
    make_run,
    upgrade_to_041,
)

A = uuid.UUID("10000000-0000-4000-8000-00000000000a")
B = uuid.UUID("20000000-0000-4000-8000-00000000000b")
C = uuid.UUID("30000000-0000-4000-8000-00000000000c")
D = uuid.UUID("40000000-0000-4000-8000-00000000000d")
E = uuid.UUID("50000000-0000-4000-8000-00000000000e")
F = uuid.UUID("60000000-0000-4000-8000-00000000000f")


def upgrade_head(cfg: Config, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``alembic upgrade head`` and return what it printed to stdout."""
    capsys.readouterr()
    command.upgrade(cfg, "head")
    return capsys.readouterr().out


def test_every_source_keyed_exactly(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        make_run(A, partition_key="  EU West\t2026-12-01 "),
        make_run(B, trigger={"dedupe_key": 12345}),
        make_run(C, trigger={"dedupe_key": "ORD_2026_000123"}, event_id="evt_1"),
        make_run(D, event_id="01JDQ3Y5ZK8W0F9H7T2M4N6P8R"),
        make_run(E, status="succeeded", partition_key="  ", event_id=""),
        make_run(F, status="timed_out", partition_key="ＯＲＤＥＲ-7"),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)

    out = upgrade_head(alembic_cfg, capsys)

    assert fetch_keys(engine) == {
        A: ("EU West 2026-12-01", "eu-west-2026-12-01"),
        B: ("12345", "12345"),
        C: ("ORD_2026_000123", "ord_2026_000123"),
        D: ("01JDQ3Y5ZK8W0F9H7T2M4N6P8R", "01jdq3y5zk8w0f9h7t2m4n6p8r"),
        E: ("run-500000000000", "run-500000000000"),
        F: ("ＯＲＤＥＲ-7", "order-7"),
    }
    assert fetch_ledger(engine) == {
        A: ("EU West 2026-12-01", "eu-west-2026-12-01", "partition"),
        B: ("12345", "12345", "dedupe"),
        C: ("ORD_2026_000123", "ord_2026_000123", "dedupe"),
        D: ("01JDQ3Y5ZK8W0F9H7T2M4N6P8R", "01jdq3y5zk8w0f9h7t2m4n6p8r", "event"),
        E: ("run-500000000000", "run-500000000000", "uuid"),
        F: ("ＯＲＤＥＲ-7", "order-7", "partition"),
    }
    assert counter_values(out) == {
        "processed": 6,
        "updated": 6,
        "skipped": 0,
        "conflicts": 0,
        "failures": 0,
    }
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def test_exposition_has_labels_and_no_created(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="p")])

    out = upgrade_head(alembic_cfg, capsys)

    samples = [line for line in out.splitlines() if not line.startswith("#")]
    assert samples == [
        'workflow_run_key_backfill_processed_total{dry_run="false"} 1.0',
        'workflow_run_key_backfill_updated_total{dry_run="false"} 1.0',
        'workflow_run_key_backfill_skipped_total{dry_run="false"} 0.0',
        'workflow_run_key_backfill_conflicts_total{dry_run="false"} 0.0',
        'workflow_run_key_backfill_failures_total{dry_run="false"} 0.0',
    ]
    assert "_created" not in out


def test_conflict_in_batch_suffixes_later_run(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # B is created first, so B keeps the key although A comes first by id.
    runs = [
        make_run(A, partition_key="Order 7", minute=5),
        make_run(B, partition_key="order  7", status="queued", minute=1),
        make_run(C, partition_key="ORDER 7", status="succeeded", minute=0),
        make_run(D, partition_key="order 7", workflow_id="other.workflow", minute=9),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    caplog.set_level(logging.WARNING, logger="migrations_support")

    out = upgrade_head(alembic_cfg, capsys)

    assert fetch_keys(engine) == {
        A: ("Order 7-10000000", "order-7-10000000"),
        B: ("order 7", "order-7"),
        C: ("ORDER 7", "order-7"),
        D: ("order 7", "order-7"),
    }
    assert counter_values(out) == {
        "processed": 4,
        "updated": 4,
        "skipped": 0,
        "conflicts": 1,
        "failures": 0,
    }
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"conflict: run {A} of workflow 'billing.nightly' derives key 'order-7', "
        f"already held by run {B}; keyed as 'order-7-10000000'"
    ]


def test_conflict_with_key_in_table(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="Order-7")])
    # The application keyed B itself; C is finished, so its key does not count.
    insert_runs(
        engine,
        [
            make_run(B, run_key="order-7", run_key_normalized="order-7"),
            make_run(C, status="failed", run_key="x", run_key_normalized="order-7"),
        ],
    )

    out = upgrade_head(alembic_cfg, capsys)

    keys = fetch_keys(engine)
    assert keys[A] == ("Order-7-10000000", "order-7-10000000")
    assert keys[B] == ("order-7", "order-7")
    assert counter_values(out)["conflicts"] == 1
    assert set(fetch_ledger(engine)) == {A}


def test_taken_short_suffix_uses_full_id(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="order-7")])
    insert_runs(
        engine,
        [
            make_run(B, run_key="order-7", run_key_normalized="order-7"),
            make_run(C, run_key="x", run_key_normalized="order-7-10000000"),
        ],
    )

    out = upgrade_head(alembic_cfg, capsys)

    assert A.hex == "1000000000004000800000000000000a"
    assert fetch_keys(engine)[A] == (f"order-7-{A.hex}", f"order-7-{A.hex}")
    assert counter_values(out)["conflicts"] == 1


def test_short_suffix_taken_in_batch_uses_full_id(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    # B is created first and keeps order-7. C, in the same batch, keeps the
    # key that A's short suffix would give, so A gets its full id.
    runs = [
        make_run(A, partition_key="order-7", minute=5),
        make_run(B, partition_key="Order-7", minute=1),
        make_run(C, partition_key="order-7-10000000", minute=0),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)

    out = upgrade_head(alembic_cfg, capsys)

    assert fetch_keys(engine) == {
        A: (f"order-7-{A.hex}", f"order-7-{A.hex}"),
        B: ("Order-7", "order-7"),
        C: ("order-7-10000000", "order-7-10000000"),
    }
    assert counter_values(out)["conflicts"] == 1


def test_skip_policy_counts_skipped(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        make_run(A, partition_key="daily 2026-11-03", minute=1),
        make_run(B, partition_key="Daily 2026-11-03", minute=2),
        make_run(C, partition_key="weekly", minute=3),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_ON_CONFLICT", "skip")

    out = upgrade_head(alembic_cfg, capsys)

    assert fetch_keys(engine) == {
        A: ("daily 2026-11-03", "daily-2026-11-03"),
        B: (None, None),
        C: ("weekly", "weekly"),
    }
    assert counter_values(out) == {
        "processed": 3,
        "updated": 2,
        "skipped": 1,
        "conflicts": 1,
        "failures": 0,
    }
    assert set(fetch_ledger(engine)) == {A, C}
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def test_conflict_across_batches(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With one run per batch the walk order (by id) decides, not created_at.
    runs = [
        make_run(A, partition_key="k", minute=9),
        make_run(B, partition_key="K", minute=1),
        make_run(C, partition_key="k ", minute=0, status="waiting"),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "1")

    out = upgrade_head(alembic_cfg, capsys)

    assert fetch_keys(engine) == {
        A: ("k", "k"),
        B: ("K-20000000", "k-20000000"),
        C: ("k-30000000", "k-30000000"),
    }
    assert counter_values(out)["conflicts"] == 2


def test_dry_run_writes_nothing_and_matches_real_run(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        make_run(A, partition_key="k", minute=9),
        make_run(B, partition_key="K", minute=1),
        make_run(C, partition_key="line\nbreak", workflow_id="wf\u2028two", minute=2),
        make_run(D, trigger={"dedupe_key": "same"}, minute=3),
        make_run(E, event_id="same", status="cancelled", minute=4),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "2")
    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "true")

    capsys.readouterr()
    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")
    dry_out = capsys.readouterr().out

    assert str(error.value) == (
        "dry run: 5 keys would be written and 0 runs skipped; nothing was written, "
        "so 042_backfill_workflow_run_keys is not stamped"
    )
    assert current_revision(engine) == "041_workflow_run_keys"
    assert set(fetch_keys(engine).values()) == {(None, None)}
    assert fetch_ledger(engine) == {}
    candidate_lines = [
        line for line in dry_out.splitlines() if line.startswith("# candidate")
    ]
    # A and B share the first batch, where B was created first and wins.
    assert candidate_lines == [
        f'# candidate run_id={A} workflow_id="billing.nightly" source=partition '
        f'run_key="k-10000000" outcome=updated conflicts_with={B}',
        f'# candidate run_id={B} workflow_id="billing.nightly" source=partition '
        'run_key="K" outcome=updated',
        f'# candidate run_id={C} workflow_id="wf\\u2028two" source=partition '
        'run_key="line break" outcome=updated',
        f'# candidate run_id={D} workflow_id="billing.nightly" source=dedupe '
        'run_key="same" outcome=updated',
        f'# candidate run_id={E} workflow_id="billing.nightly" source=event '
        'run_key="same" outcome=updated',
    ]

    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "false")
    real_out = upgrade_head(alembic_cfg, capsys)

    assert counter_values(dry_out, dry_run=True) == counter_values(real_out)
    assert fetch_keys(engine)[A] == ("k-10000000", "k-10000000")
    assert fetch_keys(engine)[B] == ("K", "k")


def test_cap_stops_without_stamp_then_resumes(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        make_run(run_id, partition_key=f"p{n}")
        for n, run_id in enumerate([A, B, C, D, E])
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_MAX_UPDATES", "2")

    capsys.readouterr()
    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")
    capped_out = capsys.readouterr().out

    assert str(error.value) == (
        "stopped at max_updates=2: 3 runs still lack a key; "
        "run `alembic upgrade head` again to continue"
    )
    assert current_revision(engine) == "041_workflow_run_keys"
    keys = fetch_keys(engine)
    assert keys[A] == ("p0", "p0")
    assert keys[B] == ("p1", "p1")
    assert keys[C] == keys[D] == keys[E] == (None, None)
    assert counter_values(capped_out) == {
        "processed": 2,
        "updated": 2,
        "skipped": 0,
        "conflicts": 0,
        "failures": 0,
    }

    monkeypatch.delenv("RUN_KEY_BACKFILL_MAX_UPDATES")
    resumed_out = upgrade_head(alembic_cfg, capsys)

    assert counter_values(resumed_out)["updated"] == 3
    assert fetch_keys(engine) == {
        run_id: (f"p{n}", f"p{n}") for n, run_id in enumerate([A, B, C, D, E])
    }
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def test_cap_as_x_argument_equal_to_candidates(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="a"), make_run(B)])
    set_x_arguments(alembic_cfg, "max_updates=2")

    out = upgrade_head(alembic_cfg, capsys)

    # The cap is reached with no candidate left, so 042 is stamped.
    assert counter_values(out)["updated"] == 2
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


def set_x_arguments(cfg: Config, *pairs: str) -> None:
    """Give the config ``-x`` arguments, as the command line would."""

    class Options:
        x = list(pairs)

    cfg.cmd_opts = Options()  # type: ignore[assignment]


def test_invalid_knob_stops_before_any_write(
    alembic_cfg: Config, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "0")

    with pytest.raises(BackfillError) as error:
        command.upgrade(alembic_cfg, "head")

    assert str(error.value) == (
        "invalid RUN_KEY_BACKFILL_BATCH_SIZE '0': "
        "expected a whole number from 1 to 10000"
    )
    with engine.connect() as connection:
        assert not sa.inspect(connection).has_table("workflow_runs")
        assert not sa.inspect(connection).has_table("alembic_version")


def test_downgrade_reverts_only_backfilled_keys(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        make_run(A, partition_key="a"),
        make_run(B, partition_key="b"),
        make_run(C, partition_key="c"),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    insert_runs(engine, [make_run(D, run_key="App Key", run_key_normalized="app-key")])
    upgrade_head(alembic_cfg, capsys)
    # The application rewrote C's key after the backfill.
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE workflow_runs SET run_key = 'C2', run_key_normalized = 'c2' "
                "WHERE id = :id"
            ),
            {"id": C},
        )

    command.downgrade(alembic_cfg, "041_workflow_run_keys")

    assert fetch_keys(engine) == {
        A: (None, None),
        B: (None, None),
        C: ("C2", "c2"),
        D: ("App Key", "app-key"),
    }
    assert fetch_ledger(engine) == {}
    assert current_revision(engine) == "041_workflow_run_keys"


def test_downgrade_in_batches(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = [make_run(partition_key=f"k{n}") for n in range(7)]
    upgrade_to_041(alembic_cfg, engine, runs)
    upgrade_head(alembic_cfg, capsys)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "3")
    caplog.set_level(logging.INFO, logger="migrations_support")

    command.downgrade(alembic_cfg, "041_workflow_run_keys")

    batch_lines = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("revert batch")
    ]
    assert [line.split(" (")[0] for line in batch_lines] == [
        "revert batch: 3 ledger rows removed, 3 runs set back to NULL",
        "revert batch: 3 ledger rows removed, 3 runs set back to NULL",
        "revert batch: 1 ledger rows removed, 1 runs set back to NULL",
    ]
    assert set(fetch_keys(engine).values()) == {(None, None)}


def test_downgrade_to_040_drops_schema(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade_to_041(alembic_cfg, engine, [make_run(A, partition_key="a")])
    upgrade_head(alembic_cfg, capsys)

    command.downgrade(alembic_cfg, "040_workflow_runs")

    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        columns = {column["name"] for column in inspector.get_columns("workflow_runs")}
        indexes = {index["name"] for index in inspector.get_indexes("workflow_runs")}
        assert "run_key" not in columns
        assert "run_key_normalized" not in columns
        assert "workflow_runs_active_run_key_uniq" not in indexes
        assert not inspector.has_table("workflow_run_key_backfill_ledger")
        assert (
            connection.execute(sa.text("SELECT count(*) FROM workflow_runs")).scalar()
            == 1
        )


def test_downgrade_below_040_rejected_with_runs(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(A)])

    with pytest.raises(BackfillError) as error:
        command.downgrade(alembic_cfg, "base")

    assert str(error.value) == (
        "workflow_runs contains 1 runs: downgrading below 040_workflow_runs would drop "
        "them, so it is allowed only on an empty table"
    )
    assert current_revision(engine) == "040_workflow_runs"


def test_failed_042_leaves_041_applied(
    alembic_cfg: Config, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_runs(engine, [make_run(A), make_run(B)])
    monkeypatch.setenv("RUN_KEY_BACKFILL_MAX_UPDATES", "1")

    with pytest.raises(BackfillError):
        command.upgrade(alembic_cfg, "head")

    assert current_revision(engine) == "041_workflow_run_keys"
    with engine.connect() as connection:
        columns = {
            column["name"]
            for column in sa.inspect(connection).get_columns("workflow_runs")
        }
    assert {"run_key", "run_key_normalized"} <= columns


def test_index_is_partial_unique_and_valid(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    command.upgrade(alembic_cfg, "041_workflow_run_keys")

    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT i.indisunique, i.indisvalid, "
                "pg_get_indexdef(i.indexrelid) AS ddl "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = 'workflow_runs_active_run_key_uniq'"
            )
        ).one()
    assert row.indisunique is True
    assert row.indisvalid is True
    assert row.ddl == (
        "CREATE UNIQUE INDEX workflow_runs_active_run_key_uniq ON public.workflow_runs "
        "USING btree (workflow_id, run_key_normalized) WHERE ((status = ANY "
        "(ARRAY['pending'::text, 'queued'::text, 'running'::text, 'waiting'::text])) "
        "AND (run_key_normalized IS NOT NULL))"
    )


def test_invalid_index_rebuilt_on_next_upgrade(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    command.upgrade(alembic_cfg, "041_workflow_run_keys")
    # What an interrupted CREATE INDEX CONCURRENTLY leaves: the columns and
    # ledger committed, the index INVALID and 041 not stamped.
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = 'workflow_runs_active_run_key_uniq'::regclass"
            )
        )
        connection.execute(
            sa.text("UPDATE alembic_version SET version_num = '040_workflow_runs'")
        )

    command.upgrade(alembic_cfg, "041_workflow_run_keys")

    with engine.connect() as connection:
        valid = connection.execute(
            sa.text(
                "SELECT indisvalid FROM pg_index "
                "WHERE indexrelid = 'workflow_runs_active_run_key_uniq'::regclass"
            )
        ).scalar_one()
    assert valid is True
    assert current_revision(engine) == "041_workflow_run_keys"


def test_unique_index_rejects_duplicate_active_keys(
    alembic_cfg: Config, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [make_run(partition_key="same", minute=n) for n in range(5)]
    upgrade_to_041(alembic_cfg, engine, runs)
    upgrade_head(alembic_cfg, capsys)

    with engine.connect() as connection:
        duplicates = connection.execute(
            sa.text(
                "SELECT workflow_id, run_key_normalized FROM workflow_runs "
                "WHERE status IN ('pending', 'queued', 'running', 'waiting') "
                "GROUP BY 1, 2 HAVING count(*) > 1"
            )
        ).all()
    assert duplicates == []
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO workflow_runs (id, workflow_id, status, run_key, "
                "run_key_normalized) VALUES (gen_random_uuid(), 'billing.nightly', "
                "'running', 'same', 'same')"
            )
        )


def wait_for_lock_wait(engine: sa.Engine, timeout_s: float = 20) -> None:
    """Return once some session waits for a row lock, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            connection.rollback()
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("no session started waiting for a lock")


def test_run_keyed_meanwhile_counts_as_skipped(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = [make_run(A, partition_key="a"), make_run(B, partition_key="b"), make_run(C)]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_LOCK_TIMEOUT", "20s")
    caplog.set_level(logging.WARNING, logger="migrations_support")
    writer = engine.connect()
    writer.execute(
        sa.text("SELECT 1 FROM workflow_runs WHERE id = :id FOR UPDATE"), {"id": B}
    )

    capsys.readouterr()
    upgrade = threading.Thread(target=command.upgrade, args=(alembic_cfg, "head"))
    upgrade.start()
    wait_for_lock_wait(engine)
    writer.execute(
        sa.text(
            "UPDATE workflow_runs SET run_key = 'App', run_key_normalized = 'app' "
            "WHERE id = :id"
        ),
        {"id": B},
    )
    writer.commit()
    writer.close()
    upgrade.join(60)
    out = capsys.readouterr().out

    assert fetch_keys(engine) == {
        A: ("a", "a"),
        B: ("App", "app"),
        C: ("run-300000000000", "run-300000000000"),
    }
    assert counter_values(out) == {
        "processed": 3,
        "updated": 2,
        "skipped": 1,
        "conflicts": 0,
        "failures": 0,
    }
    assert set(fetch_ledger(engine)) == {A, C}
    assert (
        f"run {B} was keyed or deleted by another writer during its batch; skipped"
        in [record.getMessage() for record in caplog.records]
    )


def test_dry_run_remembers_keys_across_batches(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        make_run(A, partition_key="k", minute=9),
        make_run(B, partition_key="K", minute=1),
        make_run(C, partition_key="k ", minute=0, status="waiting"),
        make_run(D, partition_key="k", status="succeeded"),
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "1")
    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "1")

    capsys.readouterr()
    with pytest.raises(BackfillError):
        command.upgrade(alembic_cfg, "head")
    dry_out = capsys.readouterr().out

    assert [
        line for line in dry_out.splitlines() if line.startswith("# candidate")
    ] == [
        f'# candidate run_id={A} workflow_id="billing.nightly" source=partition '
        'run_key="k" outcome=updated',
        f'# candidate run_id={B} workflow_id="billing.nightly" source=partition '
        f'run_key="K-20000000" outcome=updated conflicts_with={A}',
        f'# candidate run_id={C} workflow_id="billing.nightly" source=partition '
        f'run_key="k-30000000" outcome=updated conflicts_with={A}',
        f'# candidate run_id={D} workflow_id="billing.nightly" source=partition '
        'run_key="k" outcome=updated',
    ]
    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "0")
    real_out = upgrade_head(alembic_cfg, capsys)
    assert counter_values(dry_out, dry_run=True) == counter_values(real_out)
    assert counter_values(real_out)["conflicts"] == 2
    assert fetch_keys(engine)[C] == ("k-30000000", "k-30000000")


def test_dry_run_with_cap_counts_like_real_run(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [make_run(run_id, partition_key="same") for run_id in (A, B, C, D)]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_MAX_UPDATES", "3")
    monkeypatch.setenv("RUN_KEY_BACKFILL_ON_CONFLICT", "skip")
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", "2")
    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "yes")

    capsys.readouterr()
    with pytest.raises(BackfillError) as dry_error:
        command.upgrade(alembic_cfg, "head")
    dry_out = capsys.readouterr().out
    monkeypatch.setenv("RUN_KEY_BACKFILL_DRY_RUN", "no")
    command.upgrade(alembic_cfg, "head")
    real_out = capsys.readouterr().out

    # With skip, only A gets a key; the cap is never reached, so the walk
    # reads all four, and the real run stamps 042 with three runs skipped.
    assert str(dry_error.value) == (
        "dry run: 1 keys would be written and 3 runs skipped; nothing was written, "
        "so 042_backfill_workflow_run_keys is not stamped"
    )
    assert counter_values(dry_out, dry_run=True) == counter_values(real_out)
    assert counter_values(real_out) == {
        "processed": 4,
        "updated": 1,
        "skipped": 3,
        "conflicts": 3,
        "failures": 0,
    }
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
