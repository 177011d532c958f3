"""Tests for the demo ``workflow_runs`` generator and its COPY loader.

The load tests run on a fresh database at revision 040, created by the shared
fixtures on the embedded server or the one in ``TEST_DATABASE_URL``.
"""

from __future__ import annotations

import json
import re
import tracemalloc
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from migrations_support.demo_data import (
    ACTIVE_STATUSES,
    CREATED_AT_END,
    CREATED_AT_SPAN,
    FINISHED_STATUSES,
    WORKFLOW_IDS,
    RunRow,
    generate_runs,
    load_runs,
)

SAMPLE_SIZE = 10_000
LOAD_SIZE = 5_000
CROCKFORD_BASE32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_PATTERN = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
UUID_PATTERN = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
STRIPE_EVENT_PATTERN = re.compile(r"evt_1[0-9A-Za-z]{23}")
DAILY_PARTITION_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")
# The key derivation turns control characters into spaces and collapses runs of
# Unicode White_Space.
CONTROL_CHARACTER = re.compile(r"[\x01-\x1f\x7f-\x9f]")
WHITESPACE_RUN = re.compile(
    r"[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
# Stands for a trigger without a dedupe_key field, which differs from JSON null.
MISSING = object()


@pytest.fixture(scope="module")
def sample() -> list[RunRow]:
    return list(generate_runs(SAMPLE_SIZE))


@pytest.fixture
def scratch_conn(
    alembic_cfg: Config, database_url: URL
) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """Yield a connection to a new UTF-8 database with an empty workflow_runs table."""
    command.upgrade(alembic_cfg, "040_workflow_runs")
    conninfo = database_url.set(drivername="postgresql").render_as_string(
        hide_password=False
    )
    with psycopg.connect(conninfo) as conn:
        yield conn


def _clean(text: str) -> str:
    """Turn control characters into spaces, collapse whitespace runs and trim."""
    return WHITESPACE_RUN.sub(" ", CONTROL_CHARACTER.sub(" ", text)).strip(" ")


def _normalize(text: str) -> str:
    """Return the run_key_normalized of a cleaned key, without the length limit.

    NFKC maps U+00A0, U+3000 and full-width forms to ASCII.
    """
    lowered = unicodedata.normalize("NFKC", text).lower()
    return WHITESPACE_RUN.sub("-", lowered)


def _trigger(row: RunRow) -> Any:
    return None if row[4] is None else json.loads(row[4])


def _dedupe_key(row: RunRow) -> Any:
    trigger = _trigger(row)
    if not isinstance(trigger, dict):
        return MISSING
    return trigger.get("dedupe_key", MISSING)


def _usable_text(value: Any) -> str | None:
    """Return the normalized text of a usable key source, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # jsonb prints a number in plain decimal notation, as Decimal's "f" does.
        return format(Decimal(repr(value)), "f")
    if not isinstance(value, str):
        return None
    cleaned = _clean(value)
    return _normalize(cleaned) if cleaned else None


def _run_key(row: RunRow) -> tuple[str, str]:
    """Return the first usable source of the run and its normalized text."""
    for source, value in (
        ("partition_key", row[3]),
        ("dedupe_key", _dedupe_key(row)),
        ("event_id", row[5]),
    ):
        text = _usable_text(value)
        if text is not None:
            return source, text
    return "id", str(row[0])


def _active_collision_groups(rows: list[RunRow]) -> list[list[RunRow]]:
    """Group active runs by workflow and run key, keeping groups of two or more."""
    groups: defaultdict[tuple[str, str], list[RunRow]] = defaultdict(list)
    for row in rows:
        if row[2] in ACTIVE_STATUSES:
            groups[(row[1], _run_key(row)[1])].append(row)
    return [group for group in groups.values() if len(group) > 1]


def _raw_key(row: RunRow) -> Any:
    source = _run_key(row)[0]
    if source == "partition_key":
        return row[3]
    if source == "dedupe_key":
        return _dedupe_key(row)
    return row[5]


def _decode_ulid_time(ulid: str) -> datetime:
    value = 0
    for digit in ulid:
        value = value * 32 + CROCKFORD_BASE32.index(digit)
    return datetime.fromtimestamp((value >> 80) / 1000, timezone.utc)


def test_generate_runs_deterministic() -> None:
    first = list(generate_runs(1_000))
    second = list(generate_runs(1_000))
    other_seed = list(generate_runs(1_000, seed=7))
    assert first == second
    assert first != other_seed
    assert {row[0] for row in first}.isdisjoint(row[0] for row in other_seed)


def test_generate_runs_prefix_stable() -> None:
    assert list(generate_runs(100)) == list(generate_runs(1_000))[:100]


def test_generate_runs_negative_count() -> None:
    with pytest.raises(ValueError, match="count must be zero or positive"):
        generate_runs(-1)


def test_generate_runs_zero_count() -> None:
    assert list(generate_runs(0)) == []


def test_generate_runs_constant_memory() -> None:
    tracemalloc.start()
    try:
        rows = generate_runs(50_000)
        for _ in rows:
            pass
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert iter(rows) is rows
    # The generator peaks near 0.1 MB. Keeping 50,000 rows would take tens of MB.
    assert peak_bytes < 2_000_000


def test_row_types(sample: list[RunRow]) -> None:
    for row in sample:
        assert len(row) == 8
        assert isinstance(row[0], uuid.UUID)
        assert row[0].version == 4
        assert row[1] in WORKFLOW_IDS
        assert row[3] is None or isinstance(row[3], str)
        assert row[4] is None or isinstance(row[4], str)
        assert row[5] is None or isinstance(row[5], str)


def test_ids_unique(sample: list[RunRow]) -> None:
    assert len({row[0] for row in sample}) == len(sample)


def test_no_nul_characters(sample: list[RunRow]) -> None:
    for row in sample:
        for value in (row[1], row[2], row[3], row[4], row[5]):
            assert value is None or "\x00" not in value


def test_timestamps_in_window(sample: list[RunRow]) -> None:
    window_start = CREATED_AT_END - CREATED_AT_SPAN
    for row in sample:
        created_at, updated_at = row[6], row[7]
        assert created_at.utcoffset() == timedelta(0)
        assert updated_at.utcoffset() == timedelta(0)
        assert window_start <= created_at <= CREATED_AT_END
        assert created_at <= updated_at <= CREATED_AT_END


def test_workflow_ids_skewed(sample: list[RunRow]) -> None:
    counts = Counter(row[1] for row in sample)
    assert len(WORKFLOW_IDS) == 40
    assert set(counts) == set(WORKFLOW_IDS)
    top_five = sum(count for _, count in counts.most_common(5))
    assert top_five > 0.35 * len(sample)
    assert min(counts.values()) < 0.005 * len(sample)


def test_every_status_present(sample: list[RunRow]) -> None:
    statuses = Counter(row[2] for row in sample)
    assert set(statuses) == set(ACTIVE_STATUSES) | set(FINISHED_STATUSES)


def test_active_fraction(sample: list[RunRow]) -> None:
    active = sum(1 for row in sample if row[2] in ACTIVE_STATUSES)
    assert 0.22 <= active / len(sample) <= 0.28


def test_dedupe_key_shapes(sample: list[RunRow]) -> None:
    keys = [_dedupe_key(row) for row in sample]
    triggers = [_trigger(row) for row in sample]
    assert any(isinstance(key, str) and key.strip() for key in keys)
    assert any(type(key) is int for key in keys)
    assert any(type(key) is float for key in keys)
    assert any(type(key) is int and key < 0 for key in keys)
    assert any(type(key) is int and key >= 2**63 for key in keys)
    assert any(key is None for key in keys)
    assert any(isinstance(key, bool) for key in keys)
    assert any(isinstance(key, dict) for key in keys)
    assert any(isinstance(key, list) for key in keys)
    assert any(isinstance(key, str) and not key.strip() for key in keys)
    assert any(trigger is None for trigger in triggers)
    assert any(
        isinstance(trigger, dict) and "dedupe_key" not in trigger
        for trigger in triggers
    )
    assert any(
        trigger is not None and not isinstance(trigger, dict) for trigger in triggers
    )


def test_dedupe_number_in_exponent_form(sample: list[RunRow]) -> None:
    triggers = [row[4] for row in sample if row[4] is not None]
    assert any(
        re.search(r'"dedupe_key": -?\d+(\.\d+)?e[+-]\d+', text) for text in triggers
    )


def test_partition_key_shapes(sample: list[RunRow]) -> None:
    keys = [row[3] for row in sample if row[3] is not None]
    assert any(DAILY_PARTITION_PATTERN.fullmatch(key) for key in keys)
    assert any(key.startswith("region=") and "|date=" in key for key in keys)
    assert any(
        re.fullmatch(r"[A-Z]{2} [A-Za-z0-9 ]+\t\d{4}-\d{2}-\d{2}", key) for key in keys
    )
    assert any(key != key.strip() for key in keys if key.strip())
    assert any("  " in key.strip() for key in keys)
    assert any("\u00a0" in key for key in keys)
    assert any("\u3000" in key for key in keys)
    assert any("ＯＲＤＥＲ" in key for key in keys)
    assert any(
        key.strip() and not key.strip().isascii() and _normalize(_clean(key)).isascii()
        for key in keys
    )
    assert any(key.isupper() for key in keys)


def test_partition_key_edge_characters(sample: list[RunRow]) -> None:
    keys = [row[3] for row in sample if row[3] is not None]
    controls = {chr(code) for code in range(0x01, 0x20)} - set("\t\n\r") | {
        "\x7f",
        "\x85",
    }
    assert any(set(key) & controls for key in keys)
    assert any(any(ord(char) > 0xFFFF for char in key) for key in keys)
    long_keys = [key for key in keys if len(key) > 120]
    assert long_keys
    assert any("\u200b" in key for key in keys)
    assert max(len(key) for key in long_keys) <= 300


def test_whitespace_partition_falls_through(sample: list[RunRow]) -> None:
    blank = [row for row in sample if row[3] is not None and not _clean(row[3])]
    assert blank
    assert any(_run_key(row)[0] == "dedupe_key" for row in blank)
    assert any(_run_key(row)[0] == "event_id" for row in blank)


def test_event_id_shapes(sample: list[RunRow]) -> None:
    event_ids = [row[5] for row in sample]
    ulids = [
        event_id
        for event_id in event_ids
        if event_id and ULID_PATTERN.fullmatch(event_id)
    ]
    assert ulids
    assert any(event_id and UUID_PATTERN.fullmatch(event_id) for event_id in event_ids)
    assert any(
        event_id and STRIPE_EVENT_PATTERN.fullmatch(event_id) for event_id in event_ids
    )
    assert None in event_ids
    assert "" in event_ids


def test_ulid_times_in_window(sample: list[RunRow]) -> None:
    window_start = CREATED_AT_END - CREATED_AT_SPAN
    for row in sample:
        event_id = row[5]
        if event_id and ULID_PATTERN.fullmatch(event_id):
            assert window_start <= _decode_ulid_time(event_id) <= CREATED_AT_END


def test_ulid_time_matches_created_at(sample: list[RunRow]) -> None:
    # Runs that reuse another run's event id are the exception, so most must match.
    ulid_rows = [row for row in sample if row[5] and ULID_PATTERN.fullmatch(row[5])]
    matching = [
        row
        for row in ulid_rows
        if row[5] is not None
        and abs(_decode_ulid_time(row[5]) - row[6]) < timedelta(milliseconds=1)
    ]
    assert len(matching) > 0.9 * len(ulid_rows)


def test_key_source_mix(sample: list[RunRow]) -> None:
    sources = Counter(_run_key(row)[0] for row in sample)
    assert set(sources) == {"partition_key", "dedupe_key", "event_id", "id"}
    assert 0.05 <= sources["id"] / len(sample) <= 0.15
    for source in ("partition_key", "dedupe_key", "event_id"):
        assert sources[source] > 0.15 * len(sample), source


def test_precedence_cases_present(sample: list[RunRow]) -> None:
    partition_over_dedupe = [
        row for row in sample if _usable_text(row[3]) and _usable_text(_dedupe_key(row))
    ]
    dedupe_over_event = [
        row
        for row in sample
        if _run_key(row)[0] == "dedupe_key" and _usable_text(row[5])
    ]
    assert partition_over_dedupe
    assert dedupe_over_event


def test_trigger_json_text(sample: list[RunRow]) -> None:
    for row in sample:
        if row[4] is not None:
            assert json.dumps(json.loads(row[4]), ensure_ascii=False) == row[4]


def test_active_collisions_within_workflow(sample: list[RunRow]) -> None:
    groups = _active_collision_groups(sample)
    active = sum(1 for row in sample if row[2] in ACTIVE_STATUSES)
    colliding = sum(len(group) for group in groups)
    assert 0.02 <= colliding / active <= 0.2
    sources = {_run_key(group[0])[0] for group in groups}
    assert {"partition_key", "dedupe_key", "event_id"} <= sources


def test_collisions_need_normalization(sample: list[RunRow]) -> None:
    raw_pairs: list[tuple[Any, Any]] = []
    for group in _active_collision_groups(sample):
        raw_keys = [_raw_key(row) for row in group]
        raw_pairs.extend((a, b) for a in raw_keys for b in raw_keys if a != b)
    text_pairs = [
        (a, b) for a, b in raw_pairs if isinstance(a, str) and isinstance(b, str)
    ]
    assert any(
        a.strip() != b.strip() and a.casefold() == b.casefold() for a, b in text_pairs
    )
    assert any(a.strip() == b.strip() for a, b in text_pairs)
    assert any(
        not a.isascii() and b.isascii() and unicodedata.normalize("NFKC", a) == b
        for a, b in text_pairs
    )
    assert any(type(a) is int and b == str(a) for a, b in raw_pairs)


def test_load_runs_copies_rows(
    scratch_conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    loaded = load_runs(scratch_conn, LOAD_SIZE)
    count = scratch_conn.execute("SELECT count(*) FROM workflow_runs").fetchone()
    assert loaded == LOAD_SIZE
    assert count == (LOAD_SIZE,)


def test_load_runs_status_histogram(
    scratch_conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    load_runs(scratch_conn, LOAD_SIZE)
    histogram = scratch_conn.execute(
        "SELECT status, count(*) FROM workflow_runs GROUP BY status"
    ).fetchall()
    expected = Counter(row[2] for row in generate_runs(LOAD_SIZE))
    assert dict(histogram) == dict(expected)


def test_load_runs_round_trip(
    scratch_conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    load_runs(scratch_conn, LOAD_SIZE)
    stored = scratch_conn.execute(
        "SELECT id, workflow_id, status, partition_key, trigger, event_id,"
        " created_at, updated_at FROM workflow_runs ORDER BY id"
    ).fetchall()
    generated = sorted(generate_runs(LOAD_SIZE), key=lambda row: row[0])
    assert len(stored) == len(generated)
    for stored_row, generated_row in zip(stored, generated, strict=True):
        expected = (*generated_row[:4], _trigger(generated_row), *generated_row[5:])
        assert stored_row == expected


def test_load_runs_analyzes_table(
    scratch_conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    load_runs(scratch_conn, LOAD_SIZE)
    assert scratch_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # COPY leaves reltuples at -1 on a new table. ANALYZE sets it to the row count.
    reltuples = scratch_conn.execute(
        "SELECT reltuples FROM pg_class WHERE relname = 'workflow_runs'"
    ).fetchone()
    assert reltuples == (LOAD_SIZE,)


def test_load_runs_rejects_non_utf8(
    scratch_conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    scratch_conn.execute("SET client_encoding TO 'LATIN1'")
    with pytest.raises(ValueError, match="client encoding must be UTF-8"):
        load_runs(scratch_conn, 10)
