"""Key derivation rules, run through the real SQL on a real server."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from migrations_support.derivation import derive_keys

RUN_ID = uuid.UUID("3f9a2c1b-77d0-4e21-9c3a-0b5e6d7f8a90")


def derive(
    engine: sa.Engine,
    partition_key: str | None = None,
    trigger: str | None = None,
    event_id: str | None = None,
    run_id: uuid.UUID = RUN_ID,
) -> tuple[str, str, str]:
    """Return (source, run_key, run_key_normalized) for one run's columns."""
    runs = sa.select(
        sa.literal(run_id, postgresql.UUID(as_uuid=True)).label("id"),
        sa.literal(partition_key, sa.Text).label("partition_key"),
        sa.cast(sa.literal(trigger, sa.Text), postgresql.JSONB).label("trigger"),
        sa.literal(event_id, sa.Text).label("event_id"),
    ).subquery("runs")
    derived = derive_keys(runs)
    query = sa.select(derived.c.source, derived.c.run_key, derived.c.run_key_normalized)
    with engine.connect() as connection:
        row = connection.execute(query).one()
    return row.source, row.run_key, row.run_key_normalized


def md5_tag(value: str) -> str:
    return hashlib.md5(value.encode("utf-8")).hexdigest()[:8]


def test_partition_example_from_spec(engine: sa.Engine) -> None:
    assert derive(engine, partition_key="  EU West\t2026-12-01 ") == (
        "partition",
        "EU West 2026-12-01",
        "eu-west-2026-12-01",
    )


def test_dedupe_number_example(engine: sa.Engine) -> None:
    assert derive(engine, trigger='{"dedupe_key": 12345}') == (
        "dedupe",
        "12345",
        "12345",
    )


def test_uuid_fallback_example(engine: sa.Engine) -> None:
    assert derive(engine) == ("uuid", "run-3f9a2c1b77d0", "run-3f9a2c1b77d0")


def test_full_width_example(engine: sa.Engine) -> None:
    assert derive(engine, partition_key="ＯＲＤＥＲ-7") == (
        "partition",
        "ＯＲＤＥＲ-7",
        "order-7",
    )


@pytest.mark.parametrize(
    ("partition_key", "trigger", "event_id", "expected"),
    [
        # Source order: partition wins over dedupe and event.
        ("p-1", '{"dedupe_key": "d-1"}', "e-1", ("partition", "p-1", "p-1")),
        (None, '{"dedupe_key": "d-1"}', "e-1", ("dedupe", "d-1", "d-1")),
        (None, None, "e-1", ("event", "e-1", "e-1")),
        # An unusable source moves on to the next.
        ("   ", '{"dedupe_key": "d-1"}', None, ("dedupe", "d-1", "d-1")),
        ("", None, "e-1", ("event", "e-1", "e-1")),
        ("\t\n\x01", None, "e-1", ("event", "e-1", "e-1")),
        (None, '{"dedupe_key": "  "}', "e-1", ("event", "e-1", "e-1")),
        (
            None,
            None,
            " \u00a0\u3000 ",
            ("uuid", "run-3f9a2c1b77d0", "run-3f9a2c1b77d0"),
        ),
        # JSON types of dedupe_key: strings and numbers only.
        (None, '{"dedupe_key": -7}', None, ("dedupe", "-7", "-7")),
        (None, '{"dedupe_key": 1.5e3}', None, ("dedupe", "1500", "1500")),
        (None, '{"dedupe_key": 0.25}', None, ("dedupe", "0.25", "0.25")),
        (None, '{"dedupe_key": null}', "e-1", ("event", "e-1", "e-1")),
        (None, '{"dedupe_key": true}', "e-1", ("event", "e-1", "e-1")),
        (None, '{"dedupe_key": {"a": 1}}', "e-1", ("event", "e-1", "e-1")),
        (None, '{"dedupe_key": [1, 2]}', "e-1", ("event", "e-1", "e-1")),
        (None, '{"other": "x"}', "e-1", ("event", "e-1", "e-1")),
        (None, '["dedupe_key"]', "e-1", ("event", "e-1", "e-1")),
        (None, '"a string trigger"', "e-1", ("event", "e-1", "e-1")),
        (None, '{"dedupe_key": "Order\\u0000"}', "e-1", None),
        # Control characters become spaces, whitespace collapses and trims.
        ("a\x01b\x7fc\x9fd", None, None, ("partition", "a b c d", "a-b-c-d")),
        (
            "\x85 lead\u2028and\u2029trail \u205f",
            None,
            None,
            ("partition", "lead and trail", "lead-and-trail"),
        ),
        (
            "tab\tvt\x0bff\x0ccr\rlf\n",
            None,
            None,
            ("partition", "tab vt ff cr lf", "tab-vt-ff-cr-lf"),
        ),
        (
            "nbsp\u00a0ogham\u1680en\u2002hair\u200anarrow\u202fideo\u3000end",
            None,
            None,
            (
                "partition",
                "nbsp ogham en hair narrow ideo end",
                "nbsp-ogham-en-hair-narrow-ideo-end",
            ),
        ),
        # Zero-width space is not White_Space: it stays.
        (
            "zero\u200bwidth",
            None,
            None,
            ("partition", "zero\u200bwidth", "zero\u200bwidth"),
        ),
        # Case folds only in the normalized key.
        ("Straße ÀÉÎ", None, None, ("partition", "Straße ÀÉÎ", "straße-àéî")),
        # NFKC: ligatures, full-width and compatibility forms.
        ("ﬁle ﬀ", None, None, ("partition", "ﬁle ﬀ", "file-ff")),
        ("Ⅻ ㎏", None, None, ("partition", "Ⅻ ㎏", "xii-kg")),
    ],
)
def test_source_and_cleaning_rules(
    engine: sa.Engine,
    partition_key: str | None,
    trigger: str | None,
    event_id: str | None,
    expected: tuple[str, str, str] | None,
) -> None:
    if expected is None:
        # jsonb rejects \u0000, so such a trigger cannot be stored at all.
        with pytest.raises(sa.exc.DataError):
            derive(engine, partition_key, trigger, event_id)
        return
    assert derive(engine, partition_key, trigger, event_id) == expected


def test_nfc_and_nfd_normalize_alike(engine: sa.Engine) -> None:
    nfc = derive(engine, partition_key="Caf\u00e9")
    nfd = derive(engine, partition_key="Cafe\u0301")
    assert nfc[1] == "Caf\u00e9"
    assert nfd[1] == "Cafe\u0301"
    assert nfc[2] == "caf\u00e9"
    assert nfd[2] == "caf\u00e9"


def test_key_of_120_characters_is_kept(engine: sa.Engine) -> None:
    value = "k" * 120
    assert derive(engine, partition_key=value) == ("partition", value, value)


def test_long_key_truncated_with_hash(engine: sa.Engine) -> None:
    value = "Order " + "X" * 200
    source, run_key, normalized = derive(engine, partition_key=value)
    assert source == "partition"
    assert run_key == value[:111] + "~" + md5_tag(value)
    assert len(run_key) == 120
    lowered = run_key.lower().replace(" ", "-")
    assert normalized == lowered


def test_long_keys_sharing_prefix_differ(engine: sa.Engine) -> None:
    prefix = "p" * 300
    first = derive(engine, partition_key=prefix + "A")
    second = derive(engine, partition_key=prefix + "B")
    assert first[1] == "p" * 111 + "~" + md5_tag(prefix + "A")
    assert second[1] == "p" * 111 + "~" + md5_tag(prefix + "B")
    assert first[2] != second[2]


def test_hash_uses_utf8_of_cleaned_value(engine: sa.Engine) -> None:
    value = "\U0001f680" * 800
    _, run_key, normalized = derive(engine, partition_key=value)
    assert run_key == "\U0001f680" * 111 + "~" + md5_tag(value)
    assert normalized == run_key


def test_hash_covers_value_after_cleaning(engine: sa.Engine) -> None:
    raw = "  a\tb  " + "c" * 150 + "  "
    cleaned = "a b " + "c" * 150
    _, run_key, _ = derive(engine, partition_key=raw)
    assert run_key == cleaned[:111] + "~" + md5_tag(cleaned)


def test_normalized_key_shortened_when_nfkc_grows_it(engine: sa.Engine) -> None:
    # U+FB03 (ffi ligature) is one character that NFKC turns into three.
    value = "\ufb03" * 50
    _, run_key, normalized = derive(engine, partition_key=value)
    grown = "ffi" * 50
    assert run_key == value
    assert normalized == grown[:111] + "~" + md5_tag(grown)


def test_event_id_shapes(engine: sa.Engine) -> None:
    assert derive(engine, event_id="01JDQ3Y5ZK8W0F9H7T2M4N6P8R") == (
        "event",
        "01JDQ3Y5ZK8W0F9H7T2M4N6P8R",
        "01jdq3y5zk8w0f9h7t2m4n6p8r",
    )
    assert derive(engine, event_id="evt_1NqZx2LkdIwHu7ix") == (
        "event",
        "evt_1NqZx2LkdIwHu7ix",
        "evt_1nqzx2lkdiwhu7ix",
    )


@pytest.mark.parametrize(
    ("run_id", "expected"),
    [
        ("00000000-0000-0000-0000-000000000000", "run-000000000000"),
        ("ffffffff-ffff-ffff-ffff-ffffffffffff", "run-ffffffffffff"),
        ("ABCDEF01-2345-6789-ABCD-EF0123456789", "run-abcdef012345"),
    ],
)
def test_uuid_fallback_at_range_ends(
    engine: sa.Engine, run_id: str, expected: str
) -> None:
    assert derive(engine, run_id=uuid.UUID(run_id)) == ("uuid", expected, expected)


def test_dedupe_string_is_unescaped(engine: sa.Engine) -> None:
    trigger = json.dumps({"dedupe_key": 'quote " and tab\there'})
    assert derive(engine, trigger=trigger) == (
        "dedupe",
        'quote " and tab here',
        'quote-"-and-tab-here',
    )
