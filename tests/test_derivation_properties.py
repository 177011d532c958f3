"""Properties of the key derivation over generated text, on the real server.

For any text PostgreSQL can store (no U+0000 and no surrogates):

- the key and the normalized key are never empty and never longer than
  120 characters;
- cleaning is idempotent: a key derived again from itself is unchanged;
- normalizing is idempotent: a normalized key used as a source gives
  itself back, as key and as normalized key;
- the three text sources clean alike: a value gives the same key as
  ``partition_key``, as a JSON string ``dedupe_key`` and as ``event_id``.
"""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql

from migrations_support.derivation import MAX_KEY_LENGTH, derive_keys

RUN_ID = uuid.UUID("3f9a2c1b-77d0-4e21-9c3a-0b5e6d7f8a90")
MAX_EXAMPLES = 200

STORABLE = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
# Characters the cleaning and normalizing rules treat specially, drawn more
# often than plain random text would draw them.
SPECIAL = st.sampled_from(
    [
        *"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000",
        *"\x01\x1f\x7f\x80\x9f",
        *"\ufb01\ufb03\uff21\uff41\u216b\u338f\u0130\u1e9e\u2126\u212a",
        "e",
        "\u0301",
        "\U0001f600",
        "A",
        "z",
        "-",
        "~",
    ]
)
SOURCE_TEXT = st.one_of(
    st.text(STORABLE, max_size=40),
    st.text(st.one_of(SPECIAL, STORABLE), max_size=60),
    st.text(st.one_of(SPECIAL, STORABLE), min_size=100, max_size=400),
)

Derived = tuple[str, str, str]


def derive_all(
    connection: sa.Connection, sources: list[tuple[str | None, str | None, str | None]]
) -> list[Derived]:
    """Return (source, run_key, run_key_normalized) for each row of columns.

    Each row is (partition_key, trigger JSON text, event_id); all rows go to
    the server in one statement.
    """
    rows = [
        sa.select(
            sa.literal(number, sa.Integer).label("number"),
            sa.literal(RUN_ID, postgresql.UUID(as_uuid=True)).label("id"),
            sa.literal(partition_key, sa.Text).label("partition_key"),
            sa.cast(sa.literal(trigger, sa.Text), postgresql.JSONB).label("trigger"),
            sa.literal(event_id, sa.Text).label("event_id"),
        )
        for number, (partition_key, trigger, event_id) in enumerate(sources)
    ]
    runs = sa.union_all(*rows).subquery("runs")
    derived = derive_keys(runs)
    query = sa.select(
        derived.c.source, derived.c.run_key, derived.c.run_key_normalized
    ).order_by(derived.c.number)
    return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


def test_cleaning_and_normalizing_properties(engine: sa.Engine) -> None:
    # One connection for every example: a function-scoped fixture cannot be
    # an argument of a @given test.
    with engine.connect() as connection:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(value=SOURCE_TEXT)
        def check(value: str) -> None:
            dedupe = json.dumps({"dedupe_key": value})
            by_partition, by_dedupe, by_event = derive_all(
                connection,
                [(value, None, None), (None, dedupe, None), (None, None, value)],
            )
            _, run_key, normalized = by_partition

            assert 0 < len(run_key) <= MAX_KEY_LENGTH
            assert 0 < len(normalized) <= MAX_KEY_LENGTH
            assert by_dedupe[1:] == by_partition[1:]
            assert by_event[1:] == by_partition[1:]

            again, from_normalized = derive_all(
                connection, [(run_key, None, None), (normalized, None, None)]
            )
            assert again == ("partition", run_key, normalized)
            assert from_normalized == ("partition", normalized, normalized)

        check()
