"""Hostile source values, end to end through ``alembic upgrade head``.

Each case lists the run's columns and the exact key, normalized key and
source the backfill must write. Cases that share a workflow are ordered
by ``created_at``, and only those in CONFLICTING derive a normalized key
that an earlier active run holds. The hash part of a shortened key is
computed here with hashlib, independently of the SQL.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from tests.helpers import (
    counter_values,
    current_revision,
    fetch_keys,
    fetch_ledger,
    make_run,
    upgrade_to_041,
)


def run_id(number: int) -> uuid.UUID:
    """Return a run id whose first 8 hex digits, the short suffix, are ``number``."""
    return uuid.UUID(f"{number:08x}-0000-4000-8000-{number:012x}")


def shortened(value: str) -> str:
    """Return ``value`` as the key rules shorten it: 111 characters, ``~`` and
    the first 8 hex digits of its MD5."""
    return value[:111] + "~" + hashlib.md5(value.encode("utf-8")).hexdigest()[:8]


def suffixed(key: str, number: int) -> str:
    return f"{key}-{number:08x}"


LONG_ASCII = "A" * 3000
# 3,000 characters before cleaning; the trailing space goes, so the hash
# covers the 2,999 characters after cleaning.
LONG_WITH_SPACES = "Ev " * 1000
EMOJI = "\U0001f600" * 800
SHARED_PREFIX = "p" * 300
BIG_NUMBER = "1" + "0" * 400

# (number, workflow_id, status, minute, columns, (run_key, normalized, source))
Case = tuple[int, str, str, int, dict[str, Any], tuple[str, str, str]]
CASES: list[Case] = [
    # Long keys: 3,000 ASCII characters, 800 four-byte characters.
    (
        1,
        "long-ascii",
        "running",
        0,
        {"partition_key": LONG_ASCII},
        (shortened(LONG_ASCII), shortened(LONG_ASCII).lower(), "partition"),
    ),
    (
        2,
        "long-spaces",
        "running",
        0,
        {"event_id": LONG_WITH_SPACES},
        (
            shortened(LONG_WITH_SPACES.strip()),
            shortened(LONG_WITH_SPACES.strip()).lower().replace(" ", "-"),
            "event",
        ),
    ),
    (
        3,
        "long-emoji",
        "running",
        0,
        {"partition_key": EMOJI},
        (shortened(EMOJI), shortened(EMOJI), "partition"),
    ),
    # Two long keys that share their first 300 characters differ by hash.
    (
        4,
        "prefix",
        "running",
        1,
        {"partition_key": SHARED_PREFIX + "A"},
        (
            shortened(SHARED_PREFIX + "A"),
            shortened(SHARED_PREFIX + "A"),
            "partition",
        ),
    ),
    (
        5,
        "prefix",
        "running",
        2,
        {"partition_key": SHARED_PREFIX + "B"},
        (
            shortened(SHARED_PREFIX + "B"),
            shortened(SHARED_PREFIX + "B"),
            "partition",
        ),
    ),
    # Normalization applies to the shortened key, so two long keys that
    # differ only in case hash differently and do not conflict.
    (
        6,
        "prefix",
        "running",
        3,
        {"partition_key": SHARED_PREFIX.upper() + "A"},
        (
            shortened(SHARED_PREFIX.upper() + "A"),
            shortened(SHARED_PREFIX.upper() + "A").lower(),
            "partition",
        ),
    ),
    # NFC and NFD forms of one word normalize alike and conflict.
    (
        7,
        "unicode",
        "running",
        1,
        {"partition_key": "Caf\u00e9"},
        ("Caf\u00e9", "caf\u00e9", "partition"),
    ),
    (
        8,
        "unicode",
        "running",
        2,
        {"partition_key": "Cafe\u0301"},
        (suffixed("Cafe\u0301", 8), suffixed("caf\u00e9", 8), "partition"),
    ),
    # Ligatures and full-width forms normalize to ASCII and conflict.
    (
        9,
        "unicode",
        "pending",
        3,
        {"partition_key": "\ufb01le 7"},
        ("\ufb01le 7", "file-7", "partition"),
    ),
    (
        10,
        "unicode",
        "queued",
        4,
        {"partition_key": "file 7"},
        (suffixed("file 7", 10), suffixed("file-7", 10), "partition"),
    ),
    (
        11,
        "unicode",
        "waiting",
        5,
        {"partition_key": "\uff2f\uff32\uff24\uff25\uff32-7"},
        ("\uff2f\uff32\uff24\uff25\uff32-7", "order-7", "partition"),
    ),
    (
        12,
        "unicode",
        "running",
        6,
        {"partition_key": "Order-7"},
        (suffixed("Order-7", 12), suffixed("order-7", 12), "partition"),
    ),
    (
        13,
        "unicode",
        "running",
        7,
        {"partition_key": "\u216b\u3000\uff2b\uff27"},
        ("\u216b \uff2b\uff27", "xii-kg", "partition"),
    ),
    # Sources of only whitespace or control characters are not usable.
    (
        14,
        "blank",
        "running",
        0,
        {
            "partition_key": "\t \u3000\u00a0\u2028",
            "trigger": {"dedupe_key": "\u0001\u001f"},
            "event_id": "\x7f\x85\x9f",
        },
        ("run-0000000e0000", "run-0000000e0000", "uuid"),
    ),
    (
        15,
        "blank",
        "running",
        1,
        {"partition_key": "", "trigger": {"dedupe_key": ""}, "event_id": " "},
        ("run-0000000f0000", "run-0000000f0000", "uuid"),
    ),
    # dedupe_key of every JSON type: strings and numbers are used, numbers
    # as jsonb prints them. The rest fall through to event_id.
    (
        16,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": "Order 16"}'},
        ("Order 16", "order-16", "dedupe"),
    ),
    (
        17,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": 42}'},
        ("42", "42", "dedupe"),
    ),
    (
        18,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": 1.50}'},
        ("1.50", "1.50", "dedupe"),
    ),
    (
        19,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": 1e3}'},
        ("1000", "1000", "dedupe"),
    ),
    (20, "json", "failed", 0, {"trigger": '{"dedupe_key": -0}'}, ("0", "0", "dedupe")),
    (
        21,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": -1.5E-3}'},
        ("-0.0015", "-0.0015", "dedupe"),
    ),
    (
        22,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": 1e400}'},
        (shortened(BIG_NUMBER), shortened(BIG_NUMBER), "dedupe"),
    ),
    (
        23,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": true}', "event_id": "e23"},
        ("e23", "e23", "event"),
    ),
    (
        24,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": false}', "event_id": "e24"},
        ("e24", "e24", "event"),
    ),
    (
        25,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": null}', "event_id": "e25"},
        ("e25", "e25", "event"),
    ),
    (
        26,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": {"id": 1}}', "event_id": "e26"},
        ("e26", "e26", "event"),
    ),
    (
        27,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": ["x"]}', "event_id": "e27"},
        ("e27", "e27", "event"),
    ),
    (
        28,
        "json",
        "failed",
        0,
        {"trigger": '{"dedupe_key": " \\t "}', "event_id": "e28"},
        ("e28", "e28", "event"),
    ),
    # NULL, empty and non-object triggers.
    (
        29,
        "trigger",
        "failed",
        0,
        {"trigger": None, "event_id": "e29"},
        ("e29", "e29", "event"),
    ),
    (
        30,
        "trigger",
        "failed",
        0,
        {"trigger": "{}", "event_id": "e30"},
        ("e30", "e30", "event"),
    ),
    (
        31,
        "trigger",
        "failed",
        0,
        {"trigger": "null", "event_id": "e31"},
        ("e31", "e31", "event"),
    ),
    (
        32,
        "trigger",
        "failed",
        0,
        {"trigger": '["dedupe_key", 1]', "event_id": "e32"},
        ("e32", "e32", "event"),
    ),
    (
        33,
        "trigger",
        "failed",
        0,
        {"trigger": '"dedupe_key"', "event_id": "e33"},
        ("e33", "e33", "event"),
    ),
    (
        34,
        "trigger",
        "failed",
        0,
        {"trigger": "7"},
        ("run-000000220000", "run-000000220000", "uuid"),
    ),
    # Unknown statuses are not active, so they share keys freely.
    (40, "status", "running", 1, {"partition_key": "k"}, ("k", "k", "partition")),
    (41, "status", "RUNNING", 2, {"partition_key": "k"}, ("k", "k", "partition")),
    (42, "status", "archived", 3, {"partition_key": "k"}, ("k", "k", "partition")),
    (43, "status", "", 4, {"partition_key": "k"}, ("k", "k", "partition")),
    (44, "status", "running ", 5, {"partition_key": "k"}, ("k", "k", "partition")),
    (
        45,
        "status",
        "queued",
        6,
        {"partition_key": "k"},
        ("k-0000002d", "k-0000002d", "partition"),
    ),
]
CONFLICTING = {8, 10, 12, 45}


def test_hostile_values_keyed_exactly(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = [
        make_run(
            run_id(number),
            workflow_id=workflow,
            status=status,
            minute=minute,
            **columns,
        )
        for number, workflow, status, minute, columns, _ in CASES
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    caplog.set_level(logging.WARNING, logger="migrations_support")

    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    out = capsys.readouterr().out

    keys = fetch_keys(engine)
    ledger = fetch_ledger(engine)
    for number, workflow, _, _, _, (run_key, normalized, source) in CASES:
        case = f"case {number} ({workflow})"
        assert keys[run_id(number)] == (run_key, normalized), case
        assert ledger[run_id(number)] == (run_key, normalized, source), case
        assert len(run_key) <= 120, case
        assert len(normalized) <= 120, case
    assert counter_values(out) == {
        "processed": len(CASES),
        "updated": len(CASES),
        "skipped": 0,
        "conflicts": len(CONFLICTING),
        "failures": 0,
    }
    conflict_runs = {
        record.getMessage().split()[2]
        for record in caplog.records
        if record.getMessage().startswith("conflict: ")
    }
    assert conflict_runs == {str(run_id(number)) for number in CONFLICTING}
    assert current_revision(engine) == "042_backfill_workflow_run_keys"


FIRST_ID = uuid.UUID(int=0)
LAST_ID = uuid.UUID(int=2**128 - 1)


@pytest.mark.parametrize("batch_size", ["1", "2", "500"])
def test_uuid_range_ends_walked(
    alembic_cfg: Config,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    batch_size: str,
) -> None:
    middle = uuid.UUID("7fffffff-ffff-4fff-bfff-ffffffffffff")
    runs = [make_run(FIRST_ID), make_run(middle), make_run(LAST_ID)]
    upgrade_to_041(alembic_cfg, engine, runs)
    monkeypatch.setenv("RUN_KEY_BACKFILL_BATCH_SIZE", batch_size)
    caplog.set_level(logging.INFO, logger="migrations_support")

    capsys.readouterr()
    command.upgrade(alembic_cfg, "head")
    out = capsys.readouterr().out

    assert fetch_keys(engine) == {
        FIRST_ID: ("run-000000000000", "run-000000000000"),
        middle: ("run-7fffffffffff", "run-7fffffffffff"),
        LAST_ID: ("run-ffffffffffff", "run-ffffffffffff"),
    }
    assert counter_values(out)["updated"] == 3
    messages = [record.getMessage() for record in caplog.records]
    batches = [line for line in messages if line.startswith("batch ")]
    assert len(batches) == -(-3 // int(batch_size))
    assert not [line for line in messages if "catch-up" in line]
    assert current_revision(engine) == "042_backfill_workflow_run_keys"
