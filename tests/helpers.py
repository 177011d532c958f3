"""Small helpers shared by the tests: insert runs, read keys, read counters."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from prometheus_client.parser import text_string_to_metric_families

from migrations_support.schema import (
    key_columns,
    ledger,
    runs_columns_040,
    workflow_runs,
)

BASE_TIME = datetime(2026, 11, 1, tzinfo=timezone.utc)
COUNTER_NAMES = ("processed", "updated", "skipped", "conflicts", "failures")


def make_run(
    run_id: str | uuid.UUID | None = None,
    *,
    workflow_id: str = "billing.nightly",
    status: str = "running",
    partition_key: str | None = None,
    trigger: Any = None,
    event_id: str | None = None,
    minute: int = 0,
    run_key: str | None = None,
    run_key_normalized: str | None = None,
) -> dict[str, Any]:
    """Return a row for ``workflow_runs``; ``minute`` orders created_at."""
    created = BASE_TIME + timedelta(minutes=minute)
    row: dict[str, Any] = {
        "id": uuid.UUID(str(run_id)) if run_id is not None else uuid.uuid4(),
        "workflow_id": workflow_id,
        "status": status,
        "partition_key": partition_key,
        "trigger": trigger,
        "event_id": event_id,
        "created_at": created,
        "updated_at": created,
    }
    if run_key is not None or run_key_normalized is not None:
        row["run_key"] = run_key
        row["run_key_normalized"] = run_key_normalized
    return row


def insert_runs(engine: sa.Engine, runs: Iterable[Mapping[str, Any]]) -> None:
    """Insert runs. A ``trigger`` string is stored as that exact JSON text,
    so a test controls JSON types; any other value is serialized with json."""
    with engine.begin() as connection:
        table = current_runs_table(connection)
        for run in runs:
            values = dict(run)
            trigger = values.pop("trigger", None)
            if trigger is not None:
                text = trigger if isinstance(trigger, str) else json.dumps(trigger)
                values["trigger"] = sa.cast(
                    sa.literal(text, sa.Text), table.c.trigger.type
                )
            connection.execute(sa.insert(table).values(**values))


def current_runs_table(connection: sa.Connection) -> sa.Table:
    """Return workflow_runs with the columns it has now (before or after 041)."""
    names = {
        column["name"] for column in sa.inspect(connection).get_columns("workflow_runs")
    }
    columns = [
        column
        for column in (*runs_columns_040(), *key_columns())
        if column.name in names
    ]
    return sa.Table("workflow_runs", sa.MetaData(), *columns)


def fetch_keys(engine: sa.Engine) -> dict[uuid.UUID, tuple[str | None, str | None]]:
    """Return run id -> (run_key, run_key_normalized) for every run."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                workflow_runs.c.id,
                workflow_runs.c.run_key,
                workflow_runs.c.run_key_normalized,
            )
        )
        return {row.id: (row.run_key, row.run_key_normalized) for row in rows}


def fetch_ledger(engine: sa.Engine) -> dict[uuid.UUID, tuple[str, str, str]]:
    """Return run id -> (run_key, run_key_normalized, source) for every ledger row."""
    with engine.connect() as connection:
        rows = connection.execute(sa.select(ledger))
        return {
            row.run_id: (row.run_key, row.run_key_normalized, row.source)
            for row in rows
        }


def current_revision(engine: sa.Engine) -> str | None:
    """Return the revision stamped in alembic_version, or None."""
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT version_num FROM alembic_version")
        ).scalar()


def parse_counters(text: str) -> dict[str, dict[str, float]]:
    """Return counter name -> {dry_run label value -> value} from an exposition."""
    counters: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            counters.setdefault(sample.name, {})[sample.labels["dry_run"]] = (
                sample.value
            )
    return counters


def counter_values(text: str, dry_run: bool = False) -> dict[str, int]:
    """Return the five counters of one exposition as whole numbers, by short name."""
    parsed = parse_counters(text)
    label = "true" if dry_run else "false"
    return {
        name: int(parsed[f"workflow_run_key_backfill_{name}_total"][label])
        for name in COUNTER_NAMES
    }


def upgrade_to_041(
    cfg: Config, engine: sa.Engine, runs: Iterable[Mapping[str, Any]]
) -> None:
    """Upgrade to 040, insert ``runs``, then upgrade to 041."""
    command.upgrade(cfg, "040_workflow_runs")
    insert_runs(engine, runs)
    command.upgrade(cfg, "041_workflow_run_keys")
